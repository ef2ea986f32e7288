"""Figures of token geometry: per-layer profiles of ID, neighbourhood overlap and cosine
similarity (one prompt, or a sweep with bands over prompts per shuffle level), and the ID-loss
correlation by layer. They take ``LayerGeometry``, ``GeometrySweep`` and ``IdLossCorrelation``
objects and never run a model."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from tlmicroscope.layers import RESIDUAL_AXIS

__all__ = [
    "SHUFFLE_COLOURS",
    "id_loss_correlation_figure",
    "layer_geometry_figure",
    "sweep_profile_figure",
]

#: One colour per shuffle level: structured text dark blue, then towards red as blocks shrink.
SHUFFLE_COLOURS = ("#1f3b73", "#3f6fb5", "#7aa6d9", "#e3a54a", "#d9622b", "#b2182b", "#67001f")


def _rgba(hex_colour: str, alpha: float) -> str:
    h = hex_colour.lstrip("#")
    r, g, b = (int(h[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def layer_geometry_figure(geo: Any, *, title: str | None = None):
    """Three panels for one prompt: ID per layer at every GRIDE scale (with error bars) and TwoNN,
    overlap with the next layer for each k, and the mean cosine similarity.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.geometry import layer_geometry
        >>> geo = layer_geometry(tiny_model(n_layers=2), "abcdefghijklmnop" * 3)
        >>> fig = layer_geometry_figure(geo)
        >>> len(fig.data) > 3
        True
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(
        rows=1,
        cols=3,
        horizontal_spacing=0.07,
        subplot_titles=("Intrinsic dimension", "Overlap with the next layer", "Cosine similarity"),
    )
    x = list(geo.layer_labels)
    for j, scale in enumerate(geo.gride_scales):
        fig.add_trace(
            go.Scatter(
                x=x,
                y=geo.gride[:, j].tolist(),
                mode="lines+markers",
                name=f"GRIDE n2={scale}",
                error_y={"type": "data", "array": geo.gride_error[:, j].tolist(), "visible": True},
                legendgroup="id",
                visible=True if scale in (2, 4, 8) else "legendonly",
            ),
            row=1,
            col=1,
        )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=geo.twonn.tolist(),
            mode="lines",
            name=f"TwoNN {geo.twonn_variant}",
            line={"dash": "dot"},
            legendgroup="id",
        ),
        row=1,
        col=1,
    )
    pairs = [f"{a}→{b}" for a, b in itertools.pairwise(x)]
    for j, k in enumerate(geo.overlap_k):
        fig.add_trace(
            go.Scatter(
                x=pairs,
                y=geo.overlap[:, j].tolist(),
                mode="lines",
                name=f"overlap k={k}",
                legendgroup="overlap",
                visible=True if k in (1, 2, 6) else "legendonly",
            ),
            row=1,
            col=2,
        )
    fig.add_trace(
        go.Scatter(x=x, y=geo.cosine.tolist(), mode="lines+markers", name="cosine (i≠j)"),
        row=1,
        col=3,
    )
    fig.add_trace(
        go.Scatter(
            x=x,
            y=geo.cosine_with_diagonal.tolist(),
            mode="lines",
            name="cosine (all N², paper)",
            line={"dash": "dot"},
        ),
        row=1,
        col=3,
    )
    loss = (
        ""
        if not np.isfinite(geo.loss)
        else f" — loss {geo.loss:.3f} nats, contextual entropy {geo.contextual_entropy:.3f}"
    )
    fig.update_layout(
        title=title or f"Token geometry of a {geo.n_tokens}-token prompt{loss}",
        height=430,
        legend={"font": {"size": 10}},
    )
    fig.update_xaxes(title_text=RESIDUAL_AXIS)
    return fig


def _band(values: np.ndarray, band: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = np.nanmean(values, 0)
    if band == "std":
        half = np.nanstd(values, 0)
    elif band == "ci95":
        n = np.sum(np.isfinite(values), 0)
        half = 1.96 * np.nanstd(values, 0, ddof=1) / np.sqrt(np.maximum(n, 1))
    else:
        raise ValueError(f"band must be 'std' or 'ci95', got {band!r}.")
    return mean, mean - half, mean + half


def sweep_profile_figure(
    sweep: Any,
    metric: str = "gride",
    *,
    scale: int = 2,
    k: int = 2,
    shuffle_levels: Any = None,
    band: str = "ci95",
    skip_embedding: bool = True,
    title: str | None = None,
):
    """A per-layer profile averaged over the sweep's prompts, one line and band per shuffle level.

    Args:
        sweep: A ``GeometrySweep``.
        metric: ``"gride"`` (at ``scale``), ``"twonn"``, ``"overlap"`` (at ``k``), ``"cosine"``
            or ``"cosine_with_diagonal"``.
        band: ``"ci95"`` (95% confidence interval of the mean) or ``"std"`` (spread of prompts).
        skip_embedding: Leave out layer 0 (the paper starts ID profiles at layer 1).

    Examples:
        >>> from tlmicroscope.geometry.sweep import GeometrySweep
        >>> recs = [{"prompt": p, "shuffle": s, "seed": 0, "layers": [0, 1, 2], "gride_scales": [2],
        ...          "gride": [[3.0], [5.0 + s + p], [4.0]], "loss": 1.0}
        ...         for p in range(3) for s in (0, 2)]
        >>> fig = sweep_profile_figure(GeometrySweep({"settings": {}}, recs))
        >>> [t.name for t in fig.data if t.showlegend is not False]
        ['S=0 (n=3)', 'S=2 (n=3)']
    """
    import plotly.graph_objects as go

    levels = sweep.shuffle_levels if shuffle_levels is None else tuple(shuffle_levels)
    labels = list(sweep.layer_labels)
    fig = go.Figure()
    for level in levels:
        vals = sweep.metric(metric, level, scale=scale, k=k)
        if metric == "overlap":
            x = [f"{a}→{b}" for a, b in itertools.pairwise(labels)]
        else:
            x = labels[: vals.shape[1]]
        start = 1 if skip_embedding else 0
        vals, x = vals[:, start:], x[start:]
        mean, lo, hi = _band(vals, band)
        colour = SHUFFLE_COLOURS[min(level, len(SHUFFLE_COLOURS) - 1)]
        fig.add_trace(
            go.Scatter(
                x=x + x[::-1],
                y=np.concatenate([hi, lo[::-1]]).tolist(),
                fill="toself",
                fillcolor=_rgba(colour, 0.18),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=str(level),
            )
        )
        fig.add_trace(
            go.Scatter(
                x=x,
                y=mean.tolist(),
                mode="lines+markers",
                line={"color": colour},
                name=f"S={level} (n={vals.shape[0]})",
                legendgroup=str(level),
            )
        )
    what = {
        "gride": f"Intrinsic dimension (GRIDE, n2={scale})",
        "twonn": "Intrinsic dimension (TwoNN)",
        "overlap": f"Neighbourhood overlap with the next layer (k={k})",
        "cosine": "Mean cosine similarity (i≠j)",
        "cosine_with_diagonal": "Mean cosine similarity (all N²)",
    }
    fig.update_layout(
        title=title
        or f"{what.get(metric, metric)} by layer, structured (S=0) vs shuffled; "
        f"bands: {'95% CI of the mean' if band == 'ci95' else '±1 std over prompts'}",
        xaxis_title=RESIDUAL_AXIS if metric != "overlap" else "residual pair (h^l, h^l+1)",
        yaxis_title=what.get(metric, metric),
        height=430,
    )
    return fig


def id_loss_correlation_figure(corr: Any, *, title: str | None = None, alpha: float = 0.01):
    """Pearson (log ID vs loss) and Spearman by layer, one colour per shuffle level; filled markers
    where p < ``alpha``.

    Examples:
        >>> import numpy as np
        >>> from tlmicroscope.geometry.correlation import IdLossCorrelation
        >>> c = IdLossCorrelation((0,), (0, 1), ("h0", "h1"), "gride", 2, np.array([[0.1, 0.6]]),
        ...                       np.array([[0.5, 0.001]]), np.array([[0.2, 0.5]]),
        ...                       np.array([[0.3, 0.01]]), (50,))
        >>> len(id_loss_correlation_figure(c).data)
        2
    """
    import plotly.graph_objects as go

    fig = go.Figure()
    x = list(corr.layer_labels)
    for i, level in enumerate(corr.shuffle_levels):
        colour = SHUFFLE_COLOURS[min(level, len(SHUFFLE_COLOURS) - 1)]
        for name, r, p, dash in (
            ("Pearson log ID", corr.pearson[i], corr.pearson_p[i], None),
            ("Spearman", corr.spearman[i], corr.spearman_p[i], "dot"),
        ):
            sig = np.asarray(p) < alpha
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=np.asarray(r).tolist(),
                    mode="lines+markers",
                    name=f"{name}, S={level} (n={corr.n_prompts[i]})",
                    line={"color": colour, "dash": dash},
                    marker={"symbol": ["circle" if s else "circle-open" for s in sig], "size": 8},
                    customdata=np.asarray(p).tolist(),
                    hovertemplate="layer %{x}<br>r=%{y:.3f}<br>p=%{customdata:.2g}",
                )
            )
    fig.add_hline(y=0, line={"color": "grey", "width": 1})
    fig.update_layout(
        title=title
        or f"Correlation of intrinsic dimension ({corr.estimator}, n2={corr.scale}) with the "
        f"prompt's loss, per layer (filled: p < {alpha})",
        xaxis_title=RESIDUAL_AXIS,
        yaxis_title="correlation",
        yaxis_range=[-1, 1],
        height=430,
    )
    return fig
