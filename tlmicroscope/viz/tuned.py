"""Figures of tuned-lens evaluation and training: tuned vs logit lens per layer, learning curves,
the transfer matrix, and two trajectories side by side. They take result objects and run no
model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tlmicroscope.layers import RESIDUAL_AXIS

__all__ = [
    "lens_comparison_figure",
    "training_curve_figure",
    "trajectory_comparison",
    "transfer_heatmap",
]

_TITLES = {
    "kl": "KL(final ‖ lens)",
    "cross_entropy": "cross-entropy of the next token",
    "entropy": "entropy of the lens distribution",
    "bias_kl": "bias: KL(marginal final ‖ marginal lens)",
}
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def lens_comparison_figure(
    evaluations: Any, statistic: str = "kl", *, unit: str = "nats", title: str | None = None
):
    """Lines of one per-layer statistic for several lenses (tuned vs logit, for instance).

    Args:
        evaluations: A ``LensEvaluation`` (its ``baseline`` is drawn too), a sequence of them,
            or a mapping from label to evaluation.
        statistic: ``"kl"``, ``"cross_entropy"``, ``"entropy"`` or ``"bias_kl"``.
        unit: ``"nats"`` or ``"bpb"`` (bits per byte).

    Examples:
        >>> import torch
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import TunedLens
        >>> from tlmicroscope.lenses.evaluate import evaluate_lens
        >>> model = tiny_model(n_layers=2)
        >>> ev = evaluate_lens(model, ["a b c d e f " * 30], lens=TunedLens.for_model(model),
        ...                    n_tokens=64, seq_len=32, holdout=0.3, progress=False)
        >>> [trace.name for trace in lens_comparison_figure(ev).data]
        ['tuned', 'logit']
    """
    import plotly.graph_objects as go

    series = _as_series(evaluations)
    fig = go.Figure()
    for i, (label, ev) in enumerate(series.items()):
        values = ev.statistic(statistic, unit).double().numpy()
        fig.add_trace(
            go.Scatter(
                x=list(ev.layer_labels),
                y=values,
                name=label,
                mode="lines+markers",
                line={"color": _COLORS[i % len(_COLORS)]},
                hovertemplate=(
                    f"{label}<br>layer %{{x}}<br>{statistic} %{{y:.4f}} {unit}<extra></extra>"
                ),
            )
        )
    first = next(iter(series.values()))
    fig.update_layout(
        title=title or f"{_TITLES.get(statistic, statistic)} per layer ({first.n_tokens} tokens)",
        xaxis={"title": RESIDUAL_AXIS, "type": "category"},
        yaxis={
            "title": f"{statistic} ({'bits per byte' if unit == 'bpb' else 'nats'})",
            "rangemode": "tozero",
        },
        height=420,
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
        legend={"orientation": "h"},
    )
    return fig


def _as_series(evaluations: Any) -> dict[str, Any]:
    if isinstance(evaluations, Mapping):
        return dict(evaluations)
    if isinstance(evaluations, Sequence) and not hasattr(evaluations, "kl"):
        return {ev.lens_name: ev for ev in evaluations}
    out = {evaluations.lens_name: evaluations}
    if evaluations.baseline is not None:
        out[evaluations.baseline.lens_name] = evaluations.baseline
    return out


def training_curve_figure(
    results: Any,
    *,
    layers: Sequence[int] | None = None,
    mean: bool = True,
    title: str | None = None,
):
    """Held-out KL against tokens seen, for one or several training runs.

    Args:
        results: A ``TrainResult`` or a mapping from label to ``TrainResult``.
        layers: Layers to draw a line for each (default none when ``mean``; else every 5th).
        mean: Draw the mean over layers for each run.
    """
    import plotly.graph_objects as go

    runs = dict(results) if isinstance(results, Mapping) else {"run": results}
    fig = go.Figure()
    for i, (label, res) in enumerate(runs.items()):
        color = _COLORS[i % len(_COLORS)]
        x = res.tokens_seen.numpy()
        kl = res.kl.numpy()
        if mean:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=kl.mean(1),
                    name=f"{label}: mean over layers",
                    mode="lines",
                    line={"color": color, "width": 3},
                )
            )
        chosen = layers if layers is not None else ([] if mean else range(0, kl.shape[1], 5))
        for layer in chosen:
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=kl[:, layer],
                    name=f"{label}: layer {layer}",
                    mode="lines",
                    line={"color": color, "dash": "dot", "width": 1},
                )
            )
    fig.update_layout(
        title=title or "KL(final ‖ lens) on unseen batches, against tokens seen",
        xaxis={"title": "training tokens seen"},
        yaxis={"title": "KL (nats)", "rangemode": "tozero"},
        height=440,
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
    )
    return fig


def transfer_heatmap(evaluation: Any, *, penalty: bool = True, title: str | None = None):
    """The transfer matrix: translator ``i`` (rows) read on layer ``j`` (columns).

    With ``penalty`` the colour is the extra KL over layer ``j``'s own translator, so the
    diagonal is zero.
    """
    import plotly.graph_objects as go

    if evaluation.transfer_kl is None:
        raise ValueError(
            "This evaluation has no transfer matrix; run evaluate_lens(..., transfer=True)."
        )
    m = evaluation.transfer_kl.double().numpy()
    z = m - np.diag(m)[None, :] if penalty else m
    labels = list(evaluation.layer_labels[: m.shape[0]])
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=labels,
            y=labels,
            colorscale="Viridis",
            colorbar={"title": "penalty (nats)" if penalty else "KL (nats)"},
            hovertemplate="translator %{y} on layer %{x}: %{z:.4f} nats<extra></extra>",
        )
    )
    fig.update_layout(
        title=title or ("Transfer penalty" if penalty else "Transfer KL"),
        xaxis={"title": "residual h^j read", "type": "category"},
        yaxis={"title": "translator trained on h^i", "type": "category"},
        height=520,
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
    )
    return fig


def trajectory_comparison(tuned: Any, logit: Any, statistic: str = "kl"):
    """Two prediction trajectories' heatmaps of one statistic (tuned lens, then logit lens)."""
    from tlmicroscope.viz.lens import trajectory_heatmap

    return [trajectory_heatmap(tuned, statistic), trajectory_heatmap(logit, statistic)]
