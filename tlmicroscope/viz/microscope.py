"""LLM-Microscope figures: non-linearity heatmap, linearity profile, layer contributions, component
attribution, contextualization, token classes, the C–non-linearity scatter, layer profiles and
filler removal. Each takes a result object and never runs a model."""

from __future__ import annotations

from typing import Any

import numpy as np

from tlmicroscope.layers import RESIDUAL_AXIS
from tlmicroscope.viz.html import CircuitsVisView
from tlmicroscope.viz.lens import colored_tokens, trajectory_heatmap

__all__ = [
    "NORMALIZATIONS",
    "component_attribution_heatmap",
    "contextualization_heatmap",
    "contextualization_tokens",
    "correlation_scatter",
    "filler_removal_plot",
    "layer_contributions_heatmap",
    "layer_profiles_plot",
    "linearity_plot",
    "nonlinearity_heatmap",
    "token_class_plot",
]

#: How the LLM-Microscope demo rescales a heatmap before colouring it.
NORMALIZATIONS = ("global", "layer", "token", "none")

_CLASS_COLORS = {
    "punctuation": "#d62728",
    "article": "#ff7f0e",
    "stop_word": "#2ca02c",
    "number": "#9467bd",
    "other": "#7f7f7f",
}


def _tick(tok: str) -> str:
    return repr(tok)[1:-1] or "∅"


def _normalize(z: np.ndarray, how: str) -> np.ndarray:
    """Min-max scaling over everything, each row (layer) or each column (token); constant -> 0."""
    if how not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {how!r}.")
    if how == "none":
        return z
    axis = None if how == "global" else (1 if how == "layer" else 0)
    with np.errstate(invalid="ignore", divide="ignore"), _quiet():
        lo = np.nanmin(z, axis=axis, keepdims=True)
        span = np.nanmax(z, axis=axis, keepdims=True) - lo
        return np.where(span > 0, (z - lo) / np.where(span > 0, span, 1), 0.0)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        self._w.__exit__(*exc)


def _layer_token_heatmap(
    z: np.ndarray,
    raw: np.ndarray,
    rows: list[str],
    toks: list[str],
    *,
    title: str,
    colorscale: str,
    colorbar: str,
    row_title: str,
    zmid: float | None = None,
    hover_label: str = "value",
):
    import plotly.graph_objects as go

    hover = np.empty(z.shape, dtype=object)
    for i, r in enumerate(rows):
        for j, t in enumerate(toks):
            hover[i, j] = (
                f"{row_title} {r}<br>position {j}: {_tick(t)}<br>{hover_label} {raw[i, j]:.4g}"
            )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(toks))),
            y=list(range(len(rows))),
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=colorscale,
            zmid=zmid,
            colorbar={"title": colorbar},
        )
    )
    fig.update_layout(
        title=title,
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(toks))),
            "ticktext": [_tick(t) for t in toks],
            "title": "token",
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(len(rows))),
            "ticktext": rows,
            "title": row_title,
        },
        height=max(380, 16 * len(rows) + 160),
        margin={"l": 80, "r": 20, "t": 60, "b": 80},
    )
    return fig


def nonlinearity_heatmap(
    result: Any,
    *,
    batch: int = 0,
    value: str = "error",
    normalization: str = "global",
    title: str | None = None,
):
    """LLM-Microscope's heatmap: one row per layer pair, one column per token, green (linear) to
    red.

    Args:
        result: A ``TokenNonlinearity``.
        value: ``"error"`` (E in RMS-token units) or ``"relative_error"`` (E / ‖target‖).
        normalization: ``"global"``, ``"layer"`` (each row min-max), ``"token"`` (each column) or
            ``"none"``.

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> r = SimpleNamespace(error=torch.rand(3, 1, 4), relative_error=torch.rand(3, 1, 4),
        ...     pair_labels=("h0→h1", "h1→h2", "h2→h3"), str_tokens=[["a", "b", "c", "d"]],
        ...     mode="reference", n_fit=100)
        >>> nonlinearity_heatmap(r).data[0].z.shape
        (3, 4)
    """
    raw = getattr(result, value)[:, batch].double().numpy()
    z = _normalize(raw, normalization)
    label = "E (RMS units)" if value == "error" else "relative E"
    return _layer_token_heatmap(
        z,
        raw,
        list(result.pair_labels),
        result.str_tokens[batch],
        colorscale="RdYlGn_r",
        colorbar=label if normalization == "none" else f"{label}, {normalization} min-max",
        row_title="layer pair",
        hover_label=label,
        title=title
        or f"Token-wise non-linearity ({result.mode} maps, fitted on N={result.n_fit} tokens)",
    )


def linearity_plot(result: Any, *, prompt: Any = None, title: str | None = None):
    """Average linearity per layer pair: both scores, the chance floor, and optionally a prompt's
    mean non-linearity (``prompt``: a ``TokenNonlinearity``) on a second axis.

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> lin = SimpleNamespace(pair_labels=("h0→h1", "h1→h2"), score=torch.tensor([0.99, 0.98]),
        ...     score_without_residual=torch.tensor([0.6, 0.5]),
        ...     chance_floor=torch.tensor([0.03, 0.03]),
        ...     n_tokens=9000, d_model=576)
        >>> [t.name for t in linearity_plot(lin).data]
        ['with residual', 'without residual', 'chance floor rank/(N−1)']
    """
    import plotly.graph_objects as go

    x = list(result.pair_labels)
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(x=x, y=result.score.tolist(), mode="lines+markers", name="with residual")
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=result.score_without_residual.tolist(),
            mode="lines+markers",
            name="without residual",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=result.chance_floor.tolist(),
            mode="lines",
            name="chance floor rank/(N−1)",
            line={"dash": "dot", "color": "grey"},
        )
    )
    if prompt is not None:
        fig.add_trace(
            go.Scatter(
                x=list(prompt.pair_labels),
                y=prompt.layer_mean().tolist(),
                mode="lines+markers",
                name="this prompt: mean E",
                yaxis="y2",
                line={"color": "firebrick"},
            )
        )
        fig.update_layout(
            yaxis2={"title": "mean token non-linearity E", "overlaying": "y", "side": "right"}
        )
    fig.update_layout(
        title=title or f"Layer linearity (N={result.n_tokens} tokens, d={result.d_model})",
        xaxis={"title": "layer pair (h^l → h^l+1)"},
        yaxis={"title": "linearity score (R²)"},
        legend={"orientation": "h", "y": -0.25},
        height=440,
    )
    return fig


def layer_contributions_heatmap(
    result: Any,
    *,
    batch: int = 0,
    delta: bool = False,
    title: str | None = None,
    positions: slice | None = None,
):
    """Per-layer next-token loss (or its per-block drop with ``delta=True``) as a layer × token
    heatmap; ``positions`` (a slice, default all) draws only those positions.
    """
    if not delta:
        return trajectory_heatmap(
            result.trajectory,
            "cross_entropy",
            batch=batch,
            positions=positions,
            title=title
            or f"Layer contribution: next-token loss per layer — lens {result.provenance.lens}",
        )
    cols = slice(None) if positions is None else positions
    raw = result.delta[:, batch].double().numpy()[:, cols]
    rows = [f"{a}→{b}" for a, b in zip(result.layer_labels[:-1], result.layer_labels[1:])]
    return _layer_token_heatmap(
        raw,
        raw,
        rows,
        list(result.str_tokens[batch])[cols],
        colorscale="RdBu",
        zmid=0.0,
        colorbar="loss drop (nats)",
        row_title="block",
        hover_label="loss drop",
        title=title or "Loss drop per block (E^l − E^l+1; an extension of the paper)",
    )


def component_attribution_heatmap(result: Any, *, batch: int = 0, title: str | None = None):
    """Direct logit attribution per component (rows) and position (columns), diverging around 0."""
    raw = result.attribution[:, batch].double().numpy()
    toks = result.str_tokens[batch]
    tgt = result.target_strings[batch] if result.target_strings.ndim > 1 else result.target_strings
    cols = [f"{_tick(t)}→{_tick(str(g))}" for t, g in zip(toks, tgt)]
    lim = float(np.nanmax(np.abs(raw))) if np.isfinite(raw).any() else 1.0
    fig = _layer_token_heatmap(
        raw,
        raw,
        list(result.labels),
        cols,
        colorscale="RdBu",
        zmid=0.0,
        colorbar="logit",
        row_title="component",
        hover_label="logit",
        title=title
        or f"Direct logit attribution to the {result.target} token"
        f"{' (centred logits)' if result.centered else ''}",
    )
    fig.data[0].update(zmin=-lim, zmax=lim)
    return fig


def contextualization_heatmap(result: Any, *, title: str | None = None):
    """C per token (rows: texts of the batch); lower C = more context kept. Position 0 is blank."""
    raw = result.C.double().numpy()
    rows = [f"text {b}" for b in range(raw.shape[0])]
    fig = _layer_token_heatmap(
        raw,
        raw,
        rows,
        result.str_tokens[0],
        colorscale="RdYlGn_r",
        colorbar=f"C ({result.reduction} CE, nats)",
        row_title="",
        hover_label="C",
        title=title
        or "Contextualization: prefix-reconstruction loss C per token (green = more context kept)",
    )
    fig.update_layout(height=260 + 30 * raw.shape[0])
    return fig


def contextualization_tokens(result: Any, *, batch: int = 0) -> CircuitsVisView:
    """The tokens coloured by C (position 0, which has no C, is shown at the mean)."""
    vals = result.C[batch].double().numpy()
    vals = np.where(np.isnan(vals), np.nanmean(vals) if np.isfinite(vals).any() else 0.0, vals)
    return colored_tokens(result.str_tokens[batch], vals)


def token_class_plot(summary: Any, *, title: str | None = None):
    """Mean C and mean layer-averaged non-linearity per token class, with standard errors."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "contextualization C (lower = more context)",
            "layer-averaged non-linearity E",
        ),
    )
    labels = [f"{c} (n={n})" for c, n in zip(summary.classes, summary.count)]
    colors = [_CLASS_COLORS.get(c, "#333") for c in summary.classes]
    for col, (m, s) in enumerate(
        [(summary.C_mean, summary.C_sem), (summary.nonlinearity_mean, summary.nonlinearity_sem)], 1
    ):
        fig.add_trace(
            go.Bar(
                x=labels,
                y=m,
                error_y={"type": "data", "array": np.nan_to_num(s)},
                marker_color=colors,
                showlegend=False,
            ),
            row=1,
            col=col,
        )
    fig.update_layout(title=title or "Token classes", height=420)
    return fig


def correlation_scatter(corr: Any, *, title: str | None = None):
    """The paper's Figure 5: C against layer-averaged non-linearity, one point per token."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for cls in dict.fromkeys(corr.classes.tolist()):
        m = corr.classes == cls
        fig.add_trace(
            go.Scattergl(
                x=corr.nonlinearity[m],
                y=corr.C[m],
                mode="markers",
                name=str(cls),
                marker={"size": 5, "opacity": 0.6, "color": _CLASS_COLORS.get(cls)},
                text=[_tick(t) for t in corr.tokens[m]],
                hovertemplate="%{text}<br>E %{x:.3g}<br>C %{y:.3g}<extra></extra>",
            )
        )
    slope, icpt = np.polyfit(corr.nonlinearity, corr.C, 1)
    xs = np.array([corr.nonlinearity.min(), corr.nonlinearity.max()])
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=slope * xs + icpt,
            mode="lines",
            name="least-squares line",
            line={"color": "black", "dash": "dash"},
        )
    )
    fig.update_layout(
        title=title
        or f"C vs non-linearity: Pearson r = {corr.pearson_r:.3f} "
        f"(p = {corr.p_value:.2g}, n = {corr.n})",
        xaxis={"title": "layer-averaged non-linearity E"},
        yaxis={"title": "contextualization C"},
        height=460,
    )
    return fig


def layer_profiles_plot(profiles: Any, *, title: str | None = None):
    """Anisotropy and intrinsic dimension per layer (two panels)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1, cols=2, subplot_titles=("anisotropy λ_max/Σλ", "intrinsic dimension (TwoNN)")
    )
    x = list(profiles.layer_labels)
    fig.add_trace(
        go.Scatter(x=x, y=profiles.anisotropy.tolist(), mode="lines+markers", showlegend=False),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=x, y=profiles.intrinsic_dimension.tolist(), mode="lines+markers", showlegend=False
        ),
        row=1,
        col=2,
    )
    fig.update_layout(
        title=title or f"Layer profiles ({profiles.n_tokens} tokens; ID on {profiles.id_points})",
        height=420,
    )
    fig.update_xaxes(title_text=RESIDUAL_AXIS)
    return fig


def filler_removal_plot(result: Any, *, title: str | None = None):
    """Deltas from the original text with 95 % bootstrap intervals: accuracy and LM loss."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    conds = list(result.conditions[1:])
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            f"Δ multiple-choice accuracy (n={result.n_items})",
            f"Δ continuation loss, nats (n={result.n_passages})",
        ),
    )
    for col, (d, ci) in enumerate(
        [(result.accuracy_delta, result.accuracy_ci), (result.loss_delta, result.loss_ci)], 1
    ):
        d, ci = np.asarray(d)[1:], np.asarray(ci)[1:]
        fig.add_trace(
            go.Bar(
                x=conds,
                y=d,
                showlegend=False,
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": np.nan_to_num(ci[:, 1] - d),
                    "arrayminus": np.nan_to_num(d - ci[:, 0]),
                },
            ),
            row=1,
            col=col,
        )
    fig.update_layout(title=title or "Filler-token removal (removed − original)", height=420)
    return fig
