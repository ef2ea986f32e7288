"""The latent-geometry panel: projections of the sub-block outputs, and the norm profile.

Both read the report's shared capture (``needs=("attn_out", "mlp_out", "resid")``) and cost no
forward pass of their own: ``capture_components`` and ``norm_profile`` take ``ctx.cache``. The
residual stream h^0..h^L comes from the same ``"resid"`` capture the trajectory and token-geometry
sections use (``blocks.{l}.hook_resid_post`` is read as the identical
``blocks.{l+1}.hook_resid_pre``).

* ``latent_projections``: PCA of the attention and MLP outputs of the intermediate blocks (raw
  vectors, position 0 dropped, fitted centred and applied uncentred as the reference does), PCA of
  the residual stream h^0..h^L (unit vectors), both in the reference's colours shaded by depth with
  the token on hover, and the attention-vs-MLP separation of every block as numbers.
* ``latent_umap`` (not in the default page): the cosine UMAP of the same attention and MLP outputs;
  without ``umap-learn`` it is a missing prerequisite with the install command.
* ``norm_profile``: the residual norm by layer and position on a log scale, and position 0's
  norm over the median of the other positions (the first-token spike) per layer.

Settings (``tlmicroscope.report(model, text, **settings)``):

* ``latent_layers``: blocks of the attention-vs-MLP projections (default ``intermediate_layers``).
* ``latent_max_points``: points drawn per scatter (default 6000, a seeded random subset).
* ``latent_separation``: score the separation (default ``True``).
* ``latent_umap_fit_size``: about how many points UMAP embeds (default 2000: evenly spaced
  positions of every block shown).

Examples:
    >>> from tlmicroscope.models import tiny_model
    >>> from tlmicroscope.app import report
    >>> model = tiny_model(n_layers=2)
    >>> text = "The cat sat on the mat."
    >>> report(model, text, sections=["latent_projections", "norm_profile"]).rendered
    ['latent_projections', 'norm_profile']
    >>> report(model, "a", sections=["norm_profile"]).missing["norm_profile"][:38]
    'The text has 1 token; the norm profile'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from tlmicroscope.app.sections import MissingPrerequisite, ReportContext, Section, register_section
from tlmicroscope.geometry.component_states import ComponentStates
from tlmicroscope.geometry.components import ATTN_VS_MLP, capture_components, intermediate_layers
from tlmicroscope.geometry.norms import NormProfile, norm_profile
from tlmicroscope.geometry.projection import UMAP_DEFAULTS, Projection, project
from tlmicroscope.geometry.separation import SeparationResult, component_separation
from tlmicroscope.viz.html import escape
from tlmicroscope.viz.latent import (
    first_token_plot,
    norm_heatmap,
    norm_profile_plot,
    projection_scatter,
    separation_plot,
)

__all__ = ["report_component_states", "report_norm_profile", "report_residual_states"]

#: The capture sites these sections read from the report's shared forward pass.
NEEDS = ("attn_out", "mlp_out", "resid")
#: Fewest tokens for the projections: two positions left once position 0 is dropped.
_MIN_TOKENS = 3
#: Folds of the separation probe, and the fewest vectors per component it needs.
_N_FOLDS = 5
#: Vectors per component and block the separation scores: 256 keeps all 30 blocks of the
#: embedded model to about 4 s on two cores (1000, the function's default, takes about 20 s).
_SEP_POINTS = 256
_UMAP_EPOCHS = 200
_UMAP_FIX = "pip install 'tlmicroscope[umap]'"
_TEXT_FIX = (
    "tlmicroscope report --text-file A_LONGER_TEXT.txt --sections latent_projections norm_profile"
)


def _source(ctx: ReportContext, hooks: Sequence[str]) -> Any:
    """The shared capture when it holds the last block's ``hooks`` (and h^0), else the model."""
    cache = ctx.cache
    n = ctx.model.cfg.n_layers
    if (
        cache is not None
        and "blocks.0.hook_resid_pre" in cache
        and all(f"blocks.{n - 1}.{h}" in cache for h in hooks)
    ):
        return cache
    return ctx.model


def _check_length(ctx: ReportContext, need: int, what: str) -> None:
    n = int(ctx.tokens.shape[-1])
    if n < need:
        raise MissingPrerequisite(
            f"The text has {n} token{'s' if n != 1 else ''}; the {what} needs at least {need}.",
            fix=_TEXT_FIX,
        )


def _position0(ctx: ReportContext) -> str:
    """What position 0 holds: the tokenizer's BOS or the text's first token."""
    tokenizer = getattr(ctx.model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    first = int(ctx.tokens[0, 0])
    if bos is not None and first == int(bos):
        return "the BOS token"
    return "the text's first token (no BOS)"


def report_component_states(ctx: ReportContext) -> ComponentStates:
    """Every block's attention and MLP outputs of the text (all positions), computed once."""
    return ctx.memo(
        "latent:attn_mlp",
        lambda: capture_components(
            _source(ctx, ("hook_attn_out", "hook_mlp_out")),
            ctx.tokens,
            components=ATTN_VS_MLP,
            progress=False,
        ),
    )


def report_residual_states(ctx: ReportContext) -> ComponentStates:
    """The residual stream h^0..h^L of the text as ``ComponentStates`` (embed + resid_post)."""
    return ctx.memo(
        "latent:resid",
        lambda: capture_components(
            _source(ctx, ("hook_resid_post",)),
            ctx.tokens,
            components=("embed", "resid_post"),
            progress=False,
        ),
    )


def _layers(ctx: ReportContext) -> list[int]:
    chosen = ctx.settings.get("latent_layers")
    n = ctx.model.cfg.n_layers
    return sorted({int(x) % n for x in chosen}) if chosen is not None else intermediate_layers(n)


def _span(layers: Sequence[int]) -> str:
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _attn_mlp_projection(ctx: ReportContext) -> tuple[ComponentStates, Projection]:
    states = report_component_states(ctx).select(layers=_layers(ctx)).drop_first()
    return states, ctx.memo("latent:attn_mlp_pca", lambda: project(states, "pca", n_components=2))


def report_separation(ctx: ReportContext) -> SeparationResult | None:
    """Attention-vs-MLP separation of every block (``None`` when the text is too short to score)."""
    states = report_component_states(ctx)
    if int(ctx.tokens.shape[-1]) - 1 < _N_FOLDS:
        return None
    return ctx.memo(
        "latent:separation",
        lambda: component_separation(
            states, n_folds=_N_FOLDS, max_points=_SEP_POINTS, progress=False
        ),
    )


def _fmt(v: float, digits: int = 3) -> str:
    return "—" if not math.isfinite(v) else f"{v:.{digits}f}"


def _separation_table(sep: SeparationResult, shown: Sequence[int]) -> str:
    acc, sil = sep.accuracy.numpy(), sep.silhouette.numpy()
    chosen = [i for i, lay in enumerate(sep.layers) if lay in set(shown)]
    summary = (
        f"<p>Attention vs MLP outputs, linear-probe accuracy ({_N_FOLDS}-fold, chance 0.5): "
        f"mean <b>{_fmt(float(acc[chosen].mean()))}</b> over the blocks shown above "
        f"({_span(shown)}), {_fmt(float(acc.min()))} to {_fmt(float(acc.max()))} over all blocks; "
        f"cosine silhouette {_fmt(float(sil[chosen].mean()))} over the blocks shown.</p>"
    )
    rows = "".join(
        f"<tr><td>{lay}</td><td>{_fmt(float(a))}</td><td>{_fmt(float(s))}</td><td>{int(n)}</td></tr>"
        for lay, a, s, n in zip(sep.layers, acc, sil, sep.n_points.numpy())
    )
    table = (
        '<table class="latent-separation"><tr><th>block</th><th>probe accuracy</th>'
        f"<th>silhouette</th><th>vectors per component</th></tr>{rows}</table>"
    )
    return summary + f"<details><summary>Separation by block</summary>{table}</details>"


def _max_points(ctx: ReportContext) -> int:
    return int(ctx.settings.get("latent_max_points", 6000))


@register_section(
    "latent_projections",
    "Latent projections",
    needs=NEEDS,
    settings=("latent_layers", "latent_max_points", "latent_separation"),
)
def _latent_projections(ctx: ReportContext) -> Section:
    _check_length(ctx, _MIN_TOKENS, "attention-vs-MLP projection (position 0 is dropped)")
    layers = _layers(ctx)
    _, proj = _attn_mlp_projection(ctx)
    n_pts = _max_points(ctx)
    items: list[Any] = [
        projection_scatter(
            proj,
            "component",
            max_points=n_pts,
            title=f"Attention (blue) vs MLP (red) outputs of blocks {_span(layers)}, PCA "
            "(darker = earlier block)",
        )
    ]
    resid = report_residual_states(ctx).normalized(unit=True)
    rproj = ctx.memo("latent:resid_pca", lambda: project(resid, "pca", n_components=2))
    items.append(
        projection_scatter(
            rproj,
            "component",
            max_points=n_pts,
            title="Residual stream h^0 (green) .. h^L (red, darker = earlier), unit vectors, PCA",
        )
    )
    sep = report_separation(ctx) if ctx.settings.get("latent_separation", True) else None
    if sep is not None:
        items.append(separation_plot(sep, title="Attention vs MLP outputs: separation by block"))
        items.append(_separation_table(sep, layers))
    elif ctx.settings.get("latent_separation", True):
        items.append(
            f'<p class="notice">The separation needs at least {_N_FOLDS + 1} tokens '
            f"({_N_FOLDS} vectors per component after position 0); not scored.</p>"
        )
    caption = (
        proj.provenance.describe()
        + f" | Attention/MLP: blocks {_span(layers)} (the reference's intermediate blocks), raw "
        "vectors, position 0 dropped; PCA fitted with centring and applied without it (the origin "
        "stays the origin). Residual: h^0..h^L as unit vectors, every position. Colours as the "
        "reference: attention blue, MLP red, embedding green, shaded dark (first block) to light."
    )
    if sep is not None:
        caption += (
            f" Separation: {_N_FOLDS}-fold standardised logistic-regression accuracy and cosine "
            f"silhouette per block, position 0 dropped, at most {_SEP_POINTS} random vectors per "
            "component."
        )
    return Section(items, caption)


@register_section(
    "latent_umap",
    "Latent projections (UMAP)",
    default=False,
    needs=NEEDS,
    settings=("latent_layers", "latent_max_points", "latent_umap_fit_size"),
)
def _latent_umap(ctx: ReportContext) -> Section:
    from tlmicroscope.app.prerequisites import require_umap

    try:
        require_umap()
    except ImportError as exc:
        raise MissingPrerequisite(
            "The UMAP projection needs the optional umap-learn package, which is not installed.",
            fix=_UMAP_FIX,
        ) from exc
    _check_length(ctx, _MIN_TOKENS + 2, "UMAP projection")
    layers = _layers(ctx)
    fit_size = int(ctx.settings.get("latent_umap_fit_size", 2000))
    # Evenly spaced positions so that every point is in the fit: UMAP's transform of the rest
    # would cost more than the fit itself.
    per_state = max(4, fit_size // (2 * len(layers)))
    states = capture_components(
        _source(ctx, ("hook_attn_out", "hook_mlp_out")),
        ctx.tokens,
        components=ATTN_VS_MLP,
        layers=layers,
        drop_first=True,
        max_positions=per_state,
        progress=False,
    )
    proj = ctx.memo(
        "latent:attn_mlp_umap",
        lambda: project(states, "umap", fit_size=states.n_points, n_epochs=_UMAP_EPOCHS, seed=0),
    )
    fig = projection_scatter(
        proj,
        "component",
        max_points=_max_points(ctx),
        title=f"Attention (blue) vs MLP (red) outputs of blocks {_span(layers)}, cosine UMAP",
    )
    caption = (
        proj.provenance.describe()
        + f" | UMAP with the reference's settings (cosine metric, {UMAP_DEFAULTS['n_neighbors']} "
        f"neighbours, min_dist {UMAP_DEFAULTS['min_dist']}) and {_UMAP_EPOCHS} epochs, fitted on "
        f"{len(proj)} points: {states.positions.numel()} evenly spaced positions (position 0 "
        "dropped) of each block's attention and MLP outputs."
    )
    return Section([fig], caption)


def report_norm_profile(ctx: ReportContext) -> NormProfile:
    """Norms of h^0..h^L at every position of the report's text, from its shared capture."""

    def compute() -> NormProfile:
        return norm_profile(
            _source(ctx, ("hook_resid_post",)),
            ctx.tokens,
            components=("embed", "resid_post"),
            progress=False,
        )

    return ctx.memo("latent:norm_profile", compute)


def _spike_table(prof: NormProfile) -> str:
    df = prof.to_dataframe()
    labels = prof.layer_labels
    ratio = prof.first_token_ratio.numpy()
    peak = int(np.argmax(ratio))
    head = (
        f"<p>First-token spike: position 0's norm is <b>{_fmt(float(ratio[peak]), 1)}×</b> the "
        f"median of the other positions at layer {escape(labels[peak])} (the largest ratio); "
        f"{_fmt(float(ratio[-1]), 1)}× at the last layer. Mean norm without position 0 grows from "
        f"{_fmt(float(df['mean_norm'].iloc[0]), 2)} (h^0) to "
        f"{_fmt(float(df['mean_norm'].iloc[-1]), 2)}"
        " (h^L).</p>"
    )
    rows = "".join(
        f"<tr><td>{escape(lab)}</td><td>{_fmt(float(m), 3)}</td><td>{_fmt(float(f), 3)}</td>"
        f"<td>{_fmt(float(r), 2)}</td></tr>"
        for lab, m, f, r in zip(
            labels, df["mean_norm"], df["first_token_norm"], df["first_token_ratio"]
        )
    )
    table = (
        '<table class="latent-norms"><tr><th>layer</th><th>mean norm (positions ≥ 1)</th>'
        f"<th>position 0's norm</th><th>ratio</th></tr>{rows}</table>"
    )
    return head + f"<details><summary>Norms by layer</summary>{table}</details>"


@register_section("norm_profile", "Norm profile", needs=("resid",))
def _norm_profile(ctx: ReportContext) -> Section:
    _check_length(ctx, 2, "norm profile (position 0 against the others)")
    prof = report_norm_profile(ctx)
    items: list[Any] = [
        norm_heatmap(prof, title="Residual norm ‖h^l‖ by layer and position (log10 colour)"),
        norm_profile_plot(
            prof,
            max_lines=len(prof.layers),
            title="Residual norm by position, one line per layer (log scale)",
        ),
        first_token_plot(prof, title="First-token spike: position 0 vs the median other position"),
        _spike_table(prof),
    ]
    caption = (
        prof.provenance.describe()
        + f" | L2 norm of the residual stream h^0 (embedding) .. h^L (last block's output, before "
        f"the final norm) at every position; position 0 is {_position0(ctx)}. Ratio = position "
        "0's norm / median norm of positions ≥ 1, per layer."
    )
    return Section(items, caption)
