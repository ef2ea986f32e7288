"""The token-geometry panel: the layer profiles of a text's token cloud.

The section reads the report's shared capture (``needs=("resid",)``: h^0..h^L and the logits),
so it costs no forward pass of its own: ``layer_geometry`` measures every layer's token cloud
from ``ctx.cache`` and takes the contextual entropy and the loss from ``ctx.logits``.

Settings (``tlmicroscope.report(model, text, **settings)``):

* ``geometry_max_scale``: largest GRIDE range scaling (default: up to 256, or as far as the
  text's distinct tokens allow).
* ``geometry_twonn_variant``: ``"base"`` (default), ``"ml"`` or ``"microscope"``.
* ``geometry_overlap_k``: neighbourhood sizes of the overlap (default 1..6).
* ``geometry_final_norm``: pass the last layer through the final norm, as Hugging Face's last
  hidden state (default ``True``, the paper's setting).

Examples:
    >>> from tlmicroscope.models import tiny_model
    >>> from tlmicroscope.app import report
    >>> model = tiny_model(n_layers=2)
    >>> report(model, "The cat sat on the mat. " * 3, sections=["token_geometry"]).rendered
    ['token_geometry']
    >>> report(model, "Hi!", sections=["token_geometry"]).missing["token_geometry"][:42]
    'The text has 3 tokens; the token-geometry '
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tlmicroscope.app.sections import MissingPrerequisite, ReportContext, Section, register_section
from tlmicroscope.geometry.layer_geometry import LayerGeometry, layer_geometry, min_tokens
from tlmicroscope.layers import NORM_SUFFIX
from tlmicroscope.viz.html import escape
from tlmicroscope.viz.token_geometry import layer_geometry_figure

__all__ = ["report_layer_geometry", "token_geometry_section"]

#: Below this many tokens the paper's authors do not trust token-cloud IDs.
_RELIABLE_TOKENS = 500
_OVERLAP_K = (1, 2, 3, 4, 5, 6)


def _options(ctx: ReportContext) -> dict[str, Any]:
    s = ctx.settings
    max_scale = s.get("geometry_max_scale")
    return {
        "max_scale": None if max_scale is None else int(max_scale),
        "twonn_variant": str(s.get("geometry_twonn_variant", "base")),
        "overlap_k": tuple(int(k) for k in s.get("geometry_overlap_k", _OVERLAP_K)),
        "final_norm": bool(s.get("geometry_final_norm", True)),
    }


def _starts_with_bos(ctx: ReportContext) -> bool:
    """Whether the report tokenized the text with a BOS (the paper uses none)."""
    tokenizer = getattr(ctx.model, "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and int(ctx.tokens[0, 0]) == int(bos)


def _fix_command(n_needed: int) -> str:
    return (
        f"tlmicroscope report --text-file A_TEXT_OF_{n_needed}_OR_MORE_TOKENS.txt "
        "--sections token_geometry"
    )


def report_layer_geometry(ctx: ReportContext) -> LayerGeometry:
    """The ``LayerGeometry`` of the report's text, from its shared capture, computed once.

    Raises:
        MissingPrerequisite: the text has fewer tokens than the estimators need (the message
            says how many), or a layer has fewer than 3 distinct token vectors.
    """
    opts = _options(ctx)
    n_tokens = int(ctx.tokens.shape[-1])
    need = min_tokens(opts["max_scale"], opts["overlap_k"])
    if n_tokens < need:
        raise MissingPrerequisite(
            f"The text has {n_tokens} tokens; the token-geometry estimators need at least {need} "
            f"(GRIDE and TwoNN need 3 points, the overlap at k={max(opts['overlap_k'], default=0)} "
            f"needs k + 1, GRIDE at scale n2 needs n2 + 1). The paper's authors trust these IDs "
            f"from about {_RELIABLE_TOKENS} tokens.",
            fix=_fix_command(max(need, _RELIABLE_TOKENS)),
        )

    def compute() -> LayerGeometry:
        has_resid = ctx.cache is not None and "blocks.0.hook_resid_pre" in ctx.cache
        source = ctx.cache if has_resid else ctx.model
        try:
            geo = layer_geometry(
                source,
                ctx.tokens,
                output_logits=ctx.logits if has_resid else None,
                prepend_bos=None,
                **opts,
            )
        except ValueError as exc:
            if "distinct token vectors" not in str(exc):
                raise
            raise MissingPrerequisite(
                f"{exc} (A repetitive text has few distinct vectors in the embedding layer.)",
                fix=_fix_command(_RELIABLE_TOKENS),
            ) from exc
        return dataclasses.replace(
            geo,
            provenance=geo.provenance.with_settings(
                prepend_bos=_starts_with_bos(ctx),
                source="the report's shared capture" if has_resid else "its own forward pass",
            ),
        )

    return ctx.memo("geometry:layer_geometry", compute)


def _fmt(v: float, digits: int = 2) -> str:
    return "—" if not math.isfinite(v) else f"{v:.{digits}f}"


def _summary_table(geo: LayerGeometry) -> str:
    """The prompt-level numbers: peak layer, logits ID, contextual entropy, loss."""
    scales = [s for s in geo.gride_scales if s in (2, 4, 8)]
    ids = geo.id(2)
    peak = geo.peak_layer(2)
    rows = [
        ("tokens", str(geo.n_tokens)),
        (
            "ID peak (GRIDE n2=2, embedding skipped)",
            f"layer {geo.layer_labels[peak]} of {geo.layers[-1]}: {_fmt(float(ids[peak]))}",
        ),
        (
            "ID of the last layer"
            + (" (after the final norm)" if geo.layer_labels[-1].endswith(NORM_SUFFIX) else ""),
            _fmt(float(ids[-1])),
        ),
    ]
    if geo.logits_gride is not None:
        rows.append(
            (
                "logits ID (GRIDE n2=" + "/".join(map(str, scales)) + ")",
                " / ".join(
                    _fmt(float(geo.logits_gride[geo.gride_scales.index(s)])) for s in scales
                ),
            )
        )
    rows += [
        ("contextual entropy (mean softmax entropy, nats)", _fmt(geo.contextual_entropy, 3)),
        ("loss (mean next-token cross-entropy, nats)", _fmt(geo.loss, 3)),
    ]
    body = "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>" for k, v in rows)
    return f'<table class="token-geometry-summary">{body}</table>'


def _layer_table(geo: LayerGeometry) -> str:
    df = geo.to_dataframe()
    keep = ["layer", "label", "n_unique"]
    keep += [f"gride_{s}" for s in geo.gride_scales if s in (2, 4, 8)] + ["twonn"]
    keep += [f"overlap_{k}" for k in geo.overlap_k if k in (1, 2)]
    keep += ["cosine", "cosine_with_diagonal"]
    table = df[keep].round(4).to_html(index=False, na_rep="—", border=0)
    return f"<details><summary>Per-layer numbers</summary>{table}</details>"


@register_section(
    "token_geometry",
    "Token geometry",
    needs=("resid",),
    settings=(
        "geometry_max_scale",
        "geometry_twonn_variant",
        "geometry_overlap_k",
        "geometry_final_norm",
    ),
)
def _token_geometry(ctx: ReportContext) -> Section:
    return token_geometry_section(report_layer_geometry(ctx))


def token_geometry_section(geo: LayerGeometry) -> Section:
    """The token-geometry panel of a ``LayerGeometry``: the figure, the summary and per-layer
    tables, a notice under 500 tokens, and the caption. The report's ``token_geometry`` section and
    the ``tlmicroscope geometry`` command both draw it.

    Examples:
        >>> from tlmicroscope.geometry import layer_geometry
        >>> from tlmicroscope.models import tiny_model
        >>> geo = layer_geometry(tiny_model(n_layers=1), "The cat sat on the mat. " * 3)
        >>> sec = token_geometry_section(geo)
        >>> len(sec.items), "GRIDE" in sec.caption
        (4, True)
    """
    items: list[Any] = [layer_geometry_figure(geo), _summary_table(geo), _layer_table(geo)]
    if geo.n_tokens < _RELIABLE_TOKENS:
        items.insert(
            0,
            f'<p class="notice">This text has {geo.n_tokens} tokens: token-cloud IDs are noisy '
            f"below about {_RELIABLE_TOKENS} tokens (the paper uses 1024).</p>",
        )
    shown = "/".join(str(s) for s in geo.gride_scales if s in (2, 4, 8))
    caption = (
        geo.provenance.describe()
        + f" | ID: GRIDE at range scalings n2={geo.gride_scales[0]}..{geo.gride_scales[-1]} "
        f"(n2={shown} shown, the others in the legend) with Cramér-Rao errors, TwoNN "
        f"{geo.twonn_variant}; duplicate token vectors removed before the ID. Overlap chi_k with "
        f"the next layer, k={','.join(map(str, geo.overlap_k))}. Cosine with and without the "
        "diagonal (the paper includes it). The last layer "
        + (
            "goes through the final norm (Hugging Face's last hidden state)."
            if geo.layer_labels[-1].endswith(NORM_SUFFIX)
            else "is the raw residual."
        )
    )
    return Section(items, caption)
