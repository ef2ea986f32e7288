"""Report sections: the LLM-Microscope panels of the report's text.

Five sections, in the demo's order, each reading the report's shared capture (``needs=("resid",)``:
h^0..h^L and the logits), so none makes a forward pass of the examined model of its own:

* ``microscope_nonlinearity``: the token-wise non-linearity heatmap E_i^l. With a saved
  ``NonlinearityReference`` (``tlmicroscope microscope-fit``; found in the model's cache folder or
  at ``microscope_reference=``) the corpus-fitted maps are applied. Without one, maps are fitted on
  the text itself (the paper's per-prompt reading, solved in float64 with a rank-truncated
  pseudo-inverse), but **only** when the text has at least ``3·d_model + 1`` tokens, so that
  unrelated data would score at most 1/3 (the chance floor ``d/(N−1)``); a shorter text gets a
  notice with the fit command, because an affine fit with N ≤ d tokens is exact and its "errors"
  are rounding noise (a 512-token text on a 576-wide model is such a case).
* ``microscope_linearity``: linearity per layer pair, the corpus scores of the reference (the
  prompt's mean E beside them), or the per-prompt scores with their chance floor under the same
  rule.
* ``microscope_contributions``: the per-layer next-token loss through the report's lens (a tuned
  lens when the report has one, else the logit lens) and its per-block drop. It reuses the
  trajectory the ``trajectory`` section computes (``ctx.memo``).
* ``microscope_context``: contextualization C from a saved ``ContextualizationProbe``
  (``tlmicroscope microscope-train-probe``; default folder or ``microscope_probe=``). The examined
  states come from the shared capture, but the decoder reads back every prefix (about P tokens of
  forward pass per position: ~30 s for all of a 512-token text on 2 CPU cores), so by default only
  the last ``microscope_context_positions=64`` positions are decoded (``"all"`` for every one).
* ``microscope_token_classes``: mean C and layer-averaged E per token class (punctuation,
  articles, stop words, numbers, other), from what the two sections above computed.

Settings (``tlmicroscope.report(model, text, **settings)``): ``microscope_reference``,
``microscope_probe`` (folders), ``microscope_normalization`` (``"global"``, ``"layer"``,
``"token"``, ``"none"``: the heatmap's min-max scaling, as in the paper's demo),
``microscope_context_positions`` (an int or ``"all"``), ``microscope_nonlinearity_mode``
(``"reference"``, the default, or ``"paper"``: maps fitted on the text with the paper's
pseudo-inverse, whatever its length).

A sixth section, ``microscope_attribution`` (not a default one), is the direct logit attribution
of each block's attention and MLP output; the ``tlmicroscope microscope`` command shows it.

Examples:
    >>> from tlmicroscope.models import tiny_model
    >>> from tlmicroscope.app import report
    >>> rep = report(tiny_model(n_layers=2), "The cat sat on the mat. " * 5,
    ...              sections=["microscope_nonlinearity", "microscope_context"])
    >>> rep.rendered, sorted(rep.missing)
    (['microscope_nonlinearity'], ['microscope_context'])
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlmicroscope.app.panels.lens import (
    report_lens_window,
    trajectory_window,
)
from tlmicroscope.app.prerequisites import fit_command, fitted_path, quick_note
from tlmicroscope.app.sections import (
    MissingPrerequisite,
    ReportContext,
    Section,
    register_section,
    require_tokens,
)
from tlmicroscope.capture import residual_stream_names
from tlmicroscope.io import FittedFileError, ModelMismatchError
from tlmicroscope.microscope.contextualization import (
    Contextualization,
    ContextualizationProbe,
    contextualization,
)
from tlmicroscope.microscope.contributions import LayerContributions, component_attribution
from tlmicroscope.microscope.linearity import LinearityResult
from tlmicroscope.microscope.nonlinearity import (
    NonlinearityReference,
    TokenNonlinearity,
    token_nonlinearity,
)
from tlmicroscope.microscope.token_classes import token_class_summary
from tlmicroscope.models import access
from tlmicroscope.viz import microscope as mv

__all__ = [
    "CONTEXT_POSITIONS",
    "PER_PROMPT_FACTOR",
    "report_contextualization",
    "report_contributions",
    "report_linearity",
    "report_nonlinearity",
]

#: A per-prompt fit is shown only with at least ``PER_PROMPT_FACTOR·d_model + 1`` tokens
#: (chance floor ≤ 1/3).
PER_PROMPT_FACTOR = 3
REFERENCE, PROBE = "nonlinearity-reference", "contextualization-probe"
#: Positions whose context is decoded by default (the last ones of the text).
CONTEXT_POSITIONS = 64


# -- prerequisites -------------------------------------------------------------------------------
def _fit_command(ctx: ReportContext) -> str:
    return fit_command(
        "nonlinearity-reference", ctx.model, ctx.settings.get("microscope_reference")
    )


def _train_command(ctx: ReportContext) -> str:
    return fit_command("contextualization-probe", ctx.model, ctx.settings.get("microscope_probe"))


def _load(ctx: ReportContext, key: str, kind: str, cls: Any, fix: str) -> tuple[Any, Path]:
    """A saved fitted object from ``ctx.settings[key]`` or the artifact store (once per report)."""

    what = {REFERENCE: "non-linearity reference", PROBE: "contextualization probe"}[kind]

    def load() -> tuple[Any, Path]:
        given = ctx.settings.get(key)
        target = fitted_path(kind, ctx.model, given)
        if not (target / "config.json").is_file():
            if given:
                raise MissingPrerequisite(f"No saved {what} at {target}.", fix=fix)
            return None, target
        try:
            return cls.load(target, ctx.model), target
        except (ModelMismatchError, FittedFileError) as exc:
            raise MissingPrerequisite(
                f"The {what} at {target} cannot be used: {exc}", fix=fix
            ) from exc

    return ctx.memo(f"microscope:saved:{kind}", load)


def _reference(ctx: ReportContext) -> tuple[NonlinearityReference | None, Path]:
    return _load(
        ctx,
        "microscope_reference",
        "nonlinearity-reference",
        NonlinearityReference,
        _fit_command(ctx),
    )


def _probe(ctx: ReportContext) -> tuple[ContextualizationProbe | None, Path]:
    return _load(
        ctx,
        "microscope_probe",
        "contextualization-probe",
        ContextualizationProbe,
        _train_command(ctx),
    )


def _source(ctx: ReportContext) -> Any:
    """The shared capture when it holds the residual stream, else the model (a pass of its own)."""
    has_resid = ctx.cache is not None and "blocks.0.hook_resid_pre" in ctx.cache
    return ctx.cache if has_resid else ctx.model


def _per_prompt_or_missing(ctx: ReportContext, ref_path: Path, panel: str) -> None:
    """Refuse a per-prompt fit on a text too short for it (see the module docstring)."""
    n, d = int(ctx.tokens.numel()), int(ctx.model.cfg.d_model)
    need = PER_PROMPT_FACTOR * d + 1
    if n < need:
        raise MissingPrerequisite(
            f"No non-linearity reference for this model (looked in {ref_path}), and the text has "
            f"{n} tokens: a "
            f"per-prompt affine fit of d_model={d} states needs at least {need} for the {panel} "
            "to mean anything "
            "(with N ≤ d tokens the fit is exact and E is rounding noise; unrelated data scores "
            "d/(N−1)). Fit "
            "the reference once on a corpus (about a minute for a 135M model on a CPU):",
            fix=_fit_command(ctx),
        )


# -- shared results ------------------------------------------------------------------------------
def _prompt_reference(ctx: ReportContext, ref_path: Path, panel: str) -> NonlinearityReference:
    """Maps fitted on the text's own residual states (the paper's per-prompt reading), once.

    The fit is the float64, rank-truncated least squares of ``NonlinearityReference``, not the
    paper's unguarded float32 pseudo-inverse: the embedding layer of a text has the rank of its
    distinct tokens, and inverting its zero singular values gives noise."""
    _per_prompt_or_missing(ctx, ref_path, panel)

    def fit() -> NonlinearityReference:
        source = _source(ctx)
        if source is ctx.model:
            from tlmicroscope.capture import capture

            states = capture(ctx.model, ctx.tokens, sites=("resid",))["resid"].flatten(1, 2)
        else:
            names = residual_stream_names(int(ctx.model.cfg.n_layers))
            states = torch.stack([source[name].flatten(0, 1) for name in names])
        with warnings.catch_warnings():  # the caption states N, d and the chance floor instead
            warnings.filterwarnings("ignore", message=".*(chance floor|rank-deficient).*")
            return NonlinearityReference().fit(states.float())

    return ctx.memo("microscope:prompt_reference", fit)


def report_nonlinearity(ctx: ReportContext) -> TokenNonlinearity:
    """The text's ``TokenNonlinearity`` (saved reference maps, else maps fitted on the text), once.

    Raises:
        MissingPrerequisite: no reference and a text shorter than ``3·d_model + 1`` tokens.
    """

    def compute() -> TokenNonlinearity:
        if ctx.settings.get("microscope_nonlinearity_mode", "reference") == "paper":
            return token_nonlinearity(_source(ctx), ctx.tokens, mode="paper")
        ref, path = _reference(ctx)
        if ref is None:
            ref = _prompt_reference(ctx, path, "token-wise non-linearity")
        return token_nonlinearity(_source(ctx), ctx.tokens, reference=ref)

    return ctx.memo("microscope:nonlinearity", compute)


def report_linearity(ctx: ReportContext) -> LinearityResult:
    """Linearity per pair: the reference's corpus scores, else the text's own (same rule)."""
    ref, path = _reference(ctx)
    if ref is not None:
        return ref.linearity_
    res = _prompt_reference(ctx, path, "linearity scores").linearity_
    prov = dataclasses.replace(
        res.provenance,
        model=access.model_label(ctx.model),
        model_class=type(ctx.model).__name__,
        weights_processed=access.weights_processed(ctx.model),
    )
    return dataclasses.replace(res, provenance=prov.with_settings(source="this text's tokens"))


def report_contributions(ctx: ReportContext) -> LayerContributions:
    """Layer contributions through the report's lens, read off the shared trajectory: the
    positions the trajectory section draws (``trajectory_positions``, the last 64 by default;
    ``"all"`` for the whole text)."""
    return LayerContributions.from_trajectory(report_lens_window(ctx)[0])


def _context_positions(ctx: ReportContext) -> slice | None:
    value = ctx.settings.get("microscope_context_positions", CONTEXT_POSITIONS)
    if value in (None, "all", 0):
        return None
    k = int(value)
    if k < 1:
        raise ValueError(
            f"microscope_context_positions must be a positive int or 'all', got {value!r}."
        )
    return slice(-k, None) if k < ctx.tokens.shape[-1] - 1 else None


def report_contextualization(
    ctx: ReportContext,
) -> tuple[Contextualization, ContextualizationProbe, Path]:
    """C of the text's last positions (``microscope_context_positions``) with the saved probe.

    Raises:
        MissingPrerequisite: no saved probe for this model (the message gives the training command).
    """

    def compute():
        require_tokens(
            ctx, 2, "contextualization (C rebuilds the tokens before each one; position 0 has none)"
        )
        probe, path = _probe(ctx)
        if probe is None:
            raise MissingPrerequisite(
                f"No contextualization probe for this model (looked in {path}). Training one "
                "takes minutes "
                "(400 steps by default; --steps 100 for a rough one):",
                fix=_train_command(ctx),
            )
        res = contextualization(
            _source(ctx), ctx.tokens, probe=probe, positions=_context_positions(ctx)
        )
        return res, probe, path

    return ctx.memo("microscope:contextualization", compute)


def _window(res: Contextualization) -> Contextualization:
    """The decoded stretch of positions (a contiguous run ending at the last token)."""
    decoded = torch.nonzero(~torch.isnan(res.C[0])).flatten()
    if decoded.numel() == 0:
        return res
    lo = int(decoded.min())
    lo = 0 if lo <= 1 else lo
    return dataclasses.replace(
        res,
        C=res.C[:, lo:],
        prefix_length=res.prefix_length[:, lo:],
        tokens=res.tokens[:, lo:],
        str_tokens=[s[lo:] for s in res.str_tokens],
    )


# -- sections ------------------------------------------------------------------------------------
def _nonlinearity_caption(tn: TokenNonlinearity, ctx: ReportContext, normalization: str) -> str:
    ref, path = _reference(ctx)
    if tn.mode == "paper":
        how = (
            "Maps fitted on this text itself with the paper's float32 pseudo-inverse "
            "(microscope_nonlinearity_mode='paper'; noise when the text is short)."
        )
    elif ref is not None:
        how = (
            f"Maps A*_l fitted once on a corpus of N={tn.n_fit} tokens ({ref.corpus_}), loaded "
            "from "
            f"{path!s}, applied to this text. "
            + quick_note(ref, "nonlinearity-reference", ctx.model)
        )
    else:
        n, d = int(ctx.tokens.numel()), int(ctx.model.cfg.d_model)
        how = (
            f"No saved reference: maps fitted on this text's own N={n} tokens, the paper's "
            "per-prompt reading "
            f"(float64 rank-truncated least squares; d_model={d}, so unrelated data would score "
            f"{d / (n - 1):.2f} and E is biased low). For corpus-fitted maps run "
            f"`{_fit_command(ctx)}`."
        )
    return (
        "E_i^l = ‖A*_l z_i^l − z_i^l+1‖ on standardised states (RMS-token units; green = linear, "
        "red = "
        f"non-linear); colours min-max scaled ({normalization}), the hover shows raw E. {how} | "
        f"{tn.provenance.describe()}"
    )


@register_section(
    "microscope_nonlinearity",
    "LLM-Microscope: token-wise non-linearity",
    needs=("resid",),
    settings=(
        "microscope_reference",
        "microscope_normalization",
        "microscope_nonlinearity_mode",
    ),
)
def _nonlinearity_section(ctx: ReportContext) -> Section:
    tn = report_nonlinearity(ctx)
    normalization = str(ctx.settings.get("microscope_normalization", "global"))
    fig = mv.nonlinearity_heatmap(tn, normalization=normalization)
    return Section([fig], _nonlinearity_caption(tn, ctx, normalization))


@register_section(
    "microscope_linearity",
    "LLM-Microscope: linearity per layer",
    needs=("resid",),
    settings=("microscope_reference",),
)
def _linearity_section(ctx: ReportContext) -> Section:
    lin = report_linearity(ctx)
    tn = report_nonlinearity(ctx)
    ref, path = _reference(ctx)
    where = (
        f"corpus scores of the reference at {path!s}"
        if ref is not None
        else "scores of this text's own tokens (no saved reference)"
    )
    low, high = int(np.argmin(lin.score.numpy())), int(np.argmax(lin.score.numpy()))
    caption = (
        "Linearity 1 − ‖XA* − Y‖² of h^l → h^l+1 (centred, Frobenius-normalised), with and "
        "without the "
        f"residual, {where}; N={lin.n_tokens}, d={lin.d_model}; the dotted line is the chance "
        "floor "
        f"rank/(N−1). Least linear pair {lin.pair_labels[low]} ({float(lin.score[low]):.3f}), "
        "most linear "
        f"{lin.pair_labels[high]} ({float(lin.score[high]):.3f}). Red: this text's mean E per "
        "pair. | "
        f"{lin.provenance.describe()}"
    )
    return Section([mv.linearity_plot(lin, prompt=tn)], caption)


@register_section(
    "microscope_contributions",
    "LLM-Microscope: layer contributions",
    needs=("resid",),
    settings=("top_k", "trajectory_positions"),
)
def _contributions_section(ctx: ReportContext) -> Section:
    require_tokens(ctx, 2, "the layer contributions (each token's loss on the next one)")
    lc = report_contributions(ctx)
    mean = lc.mean_loss().numpy()
    best = int(np.nanargmax(-np.diff(mean))) if len(mean) > 1 else 0
    lens_note = (
        f"through the report's lens ({getattr(ctx.lens, 'name', ctx.lens)})"
        if ctx.lens is not None and ctx.lens != "logit"
        else "through the logit lens (final norm recomputed per layer; pass lens= for a tuned lens)"
    )
    caption = (
        "E_i^l = −log q_l(w_i+1): the next-token loss if the model stopped at layer l, "
        f"{lens_note}. Mean "
        f"loss {mean[0]:.2f} nats at the embeddings, {mean[-1]:.2f} at the output; the largest "
        "mean drop "
        f"is in block {lc.layer_labels[best]}→{lc.layer_labels[best + 1]} "
        f"({mean[best] - mean[best + 1]:.2f} "
        f"nats). | {lc.provenance.describe()}"
    )
    n, n_pos = trajectory_window(ctx), int(ctx.tokens.shape[-1])
    shown = report_lens_window(ctx)[1]  # a full trajectory is drawn over the same window
    if n is not None:
        over = f"all {n_pos}" if shown is not None else f"the last {n} of {n_pos}"
        caption += (
            f" | The means are over {over} positions; the heatmaps draw the last {n} "
            "(trajectory_positions= changes it, 'all' for every position)."
        )
    return Section(
        [
            mv.layer_contributions_heatmap(lc, positions=shown),
            mv.layer_contributions_heatmap(lc, delta=True, positions=shown),
        ],
        caption,
    )


@register_section(
    "microscope_attribution",
    "LLM-Microscope: component attribution",
    default=False,
)
def _attribution_section(ctx: ReportContext) -> Section:
    attr = component_attribution(ctx.model, ctx.tokens)
    caption = (
        "Direct logit attribution of each block's attention and MLP output to the model's top-1 "
        f"prediction; pieces sum to the logit within {attr.max_identity_error:.1e}."
    )
    return Section([mv.component_attribution_heatmap(attr)], caption)


@register_section(
    "microscope_context",
    "LLM-Microscope: contextualization",
    needs=("resid",),
    settings=("microscope_probe", "microscope_context_positions"),
)
def _context_section(ctx: ReportContext) -> Section:
    res, probe, path = report_contextualization(ctx)
    shown = _window(res)
    decoded = int((~torch.isnan(res.C)).sum())
    c = res.C[~torch.isnan(res.C)]
    caption = (
        f"C_i = −log P(prefix | e_i), the {res.reduction} cross-entropy of rebuilding the "
        f"{probe.prefix_length} tokens before token i from its pooled hidden states (lower = more "
        "context "
        f"kept). {decoded} positions decoded"
        + (
            f" (the last {decoded}; microscope_context_positions='all' decodes every one)"
            if decoded < res.C.shape[-1] - 1
            else ""
        )
        + (
            f"; mean C {float(c.mean()):.2f} nats, range {float(c.min()):.2f}–{float(c.max()):.2f}"
            if c.numel()
            else ""
        )
        + f". Probe at {path!s}, trained {getattr(probe, 'steps_done_', 0)} steps. "
        + quick_note(probe, "contextualization-probe", ctx.model)
        + "| "
        + res.provenance.describe()
    )
    return Section(
        [mv.contextualization_heatmap(shown), mv.contextualization_tokens(shown)], caption
    )


@register_section(
    "microscope_token_classes",
    "LLM-Microscope: token classes",
    needs=("resid",),
    settings=("microscope_reference", "microscope_probe", "microscope_context_positions"),
)
def _token_classes_section(ctx: ReportContext) -> Section:
    require_tokens(ctx, 2, "the token-class summary (position 0 is left out)")
    notes, tn, cres = [], None, None
    fixes = []
    try:
        tn = report_nonlinearity(ctx)
    except MissingPrerequisite as exc:
        notes.append("non-linearity: no reference")
        fixes.append(exc.fix)
    try:
        cres = report_contextualization(ctx)[0]
    except MissingPrerequisite as exc:
        short = int(ctx.tokens.shape[-1]) < 2
        notes.append(
            "contextualization: text too short" if short else "contextualization: no probe"
        )
        fixes.append(exc.fix)
    if tn is None and cres is None:
        raise MissingPrerequisite(
            "Token classes summarise C and E; neither is available for this model and text "
            f"({'; '.join(notes)}).",
            fix=" && ".join(f for f in fixes if f),
        )
    summary = token_class_summary(cres, tn)
    table = summary.to_dataframe().to_html(
        index=False, float_format=lambda v: f"{v:.3f}", na_rep="—"
    )
    order = summary.lowest_C()
    caption = (
        "Mean (± standard error) per token class over this text, position 0 left out. The paper "
        "finds "
        "punctuation and articles carry the most context (lowest C). "
        + (f"Here, lowest C first: {', '.join(order)}. " if order else "")
        + (f"Missing: {'; '.join(notes)}." if notes else "")
    )
    return Section([mv.token_class_plot(summary), table], caption)
