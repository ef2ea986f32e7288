"""Figures of target-token readouts: trajectories with bootstrap bands, and layer x head logit
shares.

They take ``TargetTrajectories`` and ``ComponentLens`` results and run no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tlmicroscope.layers import RESIDUAL_AXIS

__all__ = ["head_logit_heatmap", "target_trajectory_figure"]

_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
_Y = {
    "prob": "probability of the target",
    "logprob": "log-probability of the target (nats)",
    "rank": "rank of the target (0 = top-1)",
}


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _pick(names: Sequence[str], chosen: Any, what: str) -> list[int]:
    if chosen is None:
        return list(range(len(names)))
    out = []
    for c in [chosen] if isinstance(chosen, (str, int)) else chosen:
        if isinstance(c, int):
            if not 0 <= c < len(names):
                raise ValueError(
                    f"{what} {c} is out of range: valid {what}s are 0..{len(names) - 1}."
                )
            out.append(c)
        elif c in names:
            out.append(list(names).index(c))
        else:
            raise ValueError(f"No {what} {c!r}; this result has {list(names)}.")
    return out


def target_trajectory_figure(
    tt: Any,
    statistic: str = "prob",
    *,
    lenses: Any = None,
    targets: Any = None,
    title: str | None = None,
):
    """One line per (lens, target) over the layers, its bootstrap band shaded.

    Args:
        tt: A ``TargetTrajectories``.
        statistic: ``"prob"``, ``"logprob"`` or ``"rank"``.
        lenses, targets: Names or indices to draw (default all).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import target_trajectories
        >>> tt = target_trajectories(
        ...     tiny_model(n_layers=2), ["ab", "cde"], targets=["x", "y"], progress=False
        ... )
        >>> fig = target_trajectory_figure(tt)
        >>> [t.name for t in fig.data if t.showlegend is not False]
        ["logit: 'x'", "logit: 'y'"]
    """
    import plotly.graph_objects as go

    mean, low, high = (t.double().numpy() for t in tt.band(statistic))
    a_idx = _pick(tt.lens_names, lenses, "lens")
    t_idx = _pick(tt.target_names, targets, "target")
    x = list(tt.layer_labels)
    fig = go.Figure()
    i = 0
    for a in a_idx:
        for t in t_idx:
            color = _COLORS[i % len(_COLORS)]
            i += 1
            name = f"{tt.lens_names[a]}: {tt.target_names[t]}"
            fig.add_trace(
                go.Scatter(
                    x=x + x[::-1],
                    y=np.concatenate([high[a, :, t], low[a, :, t][::-1]]),
                    fill="toself",
                    fillcolor=_rgba(color, 0.18),
                    line={"width": 0},
                    hoverinfo="skip",
                    showlegend=False,
                    name=f"{name} band",
                )
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=mean[a, :, t],
                    name=name,
                    mode="lines+markers",
                    line={"color": color},
                    customdata=np.stack([low[a, :, t], high[a, :, t]], -1),
                    hovertemplate=(
                        f"{name}<br>layer %{{x}}<br>{statistic} %{{y:.4f}} "
                        f"[%{{customdata[0]:.4f}}, %{{customdata[1]:.4f}}]<extra></extra>"
                    ),
                )
            )
    n = tt.prob.shape[2]
    pct = round(100 * tt.confidence)
    fig.update_layout(
        title=title or f"{_Y[statistic]} per layer: mean over {n} prompts, {pct}% bootstrap band",
        xaxis={"title": RESIDUAL_AXIS, "type": "category"},
        yaxis={"title": _Y[statistic]},
        height=440,
        legend={"orientation": "h"},
        margin={"l": 70, "r": 20, "t": 60, "b": 60},
    )
    if tt.target_notes:
        fig.add_annotation(
            text="; ".join(tt.target_notes),
            xref="paper",
            yref="paper",
            x=0,
            y=-0.25,
            showarrow=False,
            font={"size": 10},
            align="left",
        )
    return fig


def head_logit_heatmap(
    cl: Any,
    *,
    batch: int = 0,
    pos: int = -1,
    target: int = 0,
    title: str | None = None,
    with_mlp: bool = True,
):
    """Layer x head heatmap of each head's share of one target's logit (an MLP column beside it).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import component_lens
        >>> fig = head_logit_heatmap(component_lens(tiny_model(n_layers=2), "hello", targets="o"))
        >>> fig.data[0].z.shape, list(fig.data[0].x)
        ((2, 5), ['H0', 'H1', 'H2', 'H3', 'MLP'])
    """
    import plotly.graph_objects as go

    z = cl.head_map(batch=batch, pos=pos, target=target).double().numpy()
    cols = [f"H{h}" for h in range(cl.n_heads)]
    if with_mlp:
        z = np.concatenate([z, cl.mlp[:, batch, pos, target].double().numpy()[:, None]], 1)
        cols.append("MLP")
    lim = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
    token = cl.str_tokens[batch][pos]
    name = (
        cl.target_names[target]
        if len(cl.target_names) > 1 or cl.target_names[0] not in ("predicted", "next")
        else repr(str(cl.target_strings[batch, pos, target]))
    )
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=[str(layer) for layer in range(cl.n_layers)],
            colorscale="RdBu",
            zmid=0.0,
            zmin=-lim,
            zmax=lim,
            colorbar={"title": "logit share"},
            hovertemplate="layer %{y} %{x}<br>share %{z:.4f}<extra></extra>",
        )
    )
    total = float(cl.logit[batch, pos, target])
    fig.update_layout(
        title=title
        or (f"Direct effect on the {cl.logit_space} of {name} after {token!r} (total {total:.3g})"),
        xaxis={"title": "head", "type": "category"},
        yaxis={"title": RESIDUAL_AXIS, "autorange": "reversed"},
        height=max(320, 22 * cl.n_layers + 140),
        margin={"l": 70, "r": 20, "t": 60, "b": 50},
    )
    return fig
