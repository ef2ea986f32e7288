"""Figures of prediction trajectories: statistic heatmaps, the LLM-Microscope logit-lens table,
and coloured-token views. They take ``PredictionTrajectory`` objects and never run a model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tlmicroscope.layers import RESIDUAL_AXIS
from tlmicroscope.viz.html import CircuitsVisView

__all__ = [
    "STAT_TITLES",
    "colored_tokens",
    "logit_lens_table",
    "trajectory_heatmap",
    "trajectory_tokens",
]

STAT_TITLES = {
    "entropy": "Entropy of the lens distribution (nats)",
    "kl": "KL(final ‖ lens) (nats)",
    "cross_entropy": "Cross-entropy of the next token (nats)",
    "target_rank": "Rank of the next token (0 = top-1)",
    "max_prob": "Probability of the top-1 token",
    "neg_log_top1": "−log p(top-1) (LLM-Microscope 'loss')",
}


def _axis_tokens(str_tokens: Sequence[str], positions: Sequence[int]) -> list[str]:
    return [repr(str_tokens[p])[1:-1] or "∅" for p in positions]


def _select_positions(n_pos: int, positions: Any) -> list[int]:
    if positions is None:
        return list(range(n_pos))
    if isinstance(positions, slice):
        return list(range(n_pos))[positions]
    return [int(p) % n_pos for p in positions]


def _values(traj: Any, statistic: str, batch: int) -> np.ndarray:
    if statistic == "neg_log_top1":
        v = -torch.log(traj.max_prob[:, batch].clamp_min(1e-30))
    else:
        v = traj.statistic(statistic)[:, batch]
    return v.double().numpy()


def trajectory_heatmap(
    traj: Any,
    statistic: str = "entropy",
    *,
    batch: int = 0,
    positions: Any = None,
    show_text: bool | str = "auto",
    hover_top_k: int = 5,
    title: str | None = None,
    first_position: int = 0,
):
    """A layer × position heatmap of one statistic, with each cell's top-1 token written in it.

    Hovering a cell shows the input token, the top-k predictions with probabilities and every
    statistic. Ranks are coloured on a log scale.

    Args:
        traj: A ``PredictionTrajectory``.
        statistic: One of ``STATISTICS`` or ``"neg_log_top1"``.
        positions: Positions to show (default all).
        show_text: Write the top-1 token in the cells; ``"auto"`` does so up to 48 positions.
        first_position: The text position of the trajectory's first one (a trajectory of a
            text's last positions: the hover text then numbers positions as in the text).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import prediction_trajectory
        >>> fig = trajectory_heatmap(prediction_trajectory(tiny_model(n_layers=2), "hey"), "kl")
        >>> fig.data[0].z.shape
        (3, 3)
    """
    import plotly.graph_objects as go

    if statistic not in STAT_TITLES:
        raise ValueError(f"Unknown statistic {statistic!r}; choose from {list(STAT_TITLES)}.")
    n_pos = traj.tokens.shape[1]
    pos = _select_positions(n_pos, positions)
    z = _values(traj, statistic, batch)[:, pos]
    color = np.log10(np.maximum(z, 0) + 1) if statistic == "target_rank" else z
    top = traj.top_strings[:, batch][:, pos]
    text = np.vectorize(lambda s: repr(s)[1:-1])(top[..., 0]) if top.size else top[..., 0]
    k = min(hover_top_k, traj.top_probs.shape[-1])
    probs = traj.top_probs[:, batch][:, pos, :k].numpy()
    stats = {
        s: _values(traj, s, batch)[:, pos]
        for s in ("entropy", "kl", "cross_entropy", "target_rank")
    }
    hover = np.empty(z.shape, dtype=object)
    toks = traj.str_tokens[batch]
    for i, label in enumerate(traj.layer_labels):
        for j, p in enumerate(pos):
            preds = "<br>".join(
                f"{repr(top[i, j, r])[1:-1]!s}: {probs[i, j, r]:.3f}" for r in range(k)
            )
            nxt = repr(toks[p + 1])[1:-1] if p + 1 < n_pos else "—"
            hover[i, j] = (
                f"layer {label}, position {p + first_position}<br>"
                f"input {repr(toks[p])[1:-1]} → next {nxt}<br>"
                f"entropy {stats['entropy'][i, j]:.3f}, KL {stats['kl'][i, j]:.3f}<br>"
                f"CE {stats['cross_entropy'][i, j]:.3f}, rank {int(stats['target_rank'][i, j])}<br>"
                f"<b>top {k}</b><br>{preds}"
            )
    if show_text == "auto":
        show_text = len(pos) <= 48
    # Early logit-lens layers can reach 100+ nats and would flatten every other cell into one
    # colour: clip the colour scale at the 90th percentile (hover still shows true values).
    zmax = None
    finite = color[np.isfinite(color)]
    if statistic in ("entropy", "kl", "cross_entropy", "neg_log_top1") and finite.size:
        cap = float(np.percentile(finite, 90))
        if finite.max() > 1.5 * cap > 0:
            zmax = cap
    fig = go.Figure(
        go.Heatmap(
            z=color,
            x=list(range(len(pos))),
            y=list(range(len(traj.layer_labels))),
            text=text if show_text else None,
            texttemplate="%{text}" if show_text else None,
            textfont={"size": 9},
            customdata=hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale="Blues" if statistic == "max_prob" else "Viridis",
            zmin=0 if zmax is not None else None,
            zmax=zmax,
            colorbar={
                "title": "log10(rank+1)"
                if statistic == "target_rank"
                else statistic + (" (clipped)" if zmax is not None else "")
            },
        )
    )
    fig.update_layout(
        title=title or f"{STAT_TITLES[statistic]} — lens: {traj.provenance.lens}",
        xaxis={
            "tickmode": "array",
            "tickvals": list(range(len(pos))),
            "ticktext": _axis_tokens(toks, pos),
            "title": "input token",
        },
        yaxis={
            "tickmode": "array",
            "tickvals": list(range(len(traj.layer_labels))),
            "ticktext": list(traj.layer_labels),
            "title": RESIDUAL_AXIS,
        },
        height=max(420, 18 * len(traj.layer_labels) + 160),
        margin={"l": 70, "r": 20, "t": 60, "b": 80},
    )
    return fig


def logit_lens_table(traj: Any, *, batch: int = 0, positions: Any = None, title: str | None = None):
    """LLM-Microscope's logit-lens table: each layer's top-1 token per input token, coloured by
    −log p(top-1). Pass a trajectory made with ``lens="logit-paper"`` to reproduce the paper's
    numbers (no final norm on intermediate layers)."""
    return trajectory_heatmap(
        traj,
        "neg_log_top1",
        batch=batch,
        positions=positions,
        show_text=True,
        title=title
        or f"Logit lens (top-1 token, colour −log p(top-1)) — lens: {traj.provenance.lens}",
    )


def colored_tokens(tokens: Sequence[str], values: Any, **kwargs: Any) -> CircuitsVisView:
    """A circuitsvis view of tokens coloured by one value each (works offline).

    Examples:
        >>> view = colored_tokens(["a", "b"], [0.1, 0.9])
        >>> view.component, view.props["tokens"]
        ('ColoredTokens', ['a', 'b'])
    """
    vals = torch.as_tensor(values, dtype=torch.float32).reshape(-1).tolist()
    tokens = list(tokens)
    if len(vals) != len(tokens):
        raise ValueError(f"Got {len(tokens)} tokens but {len(vals)} values.")
    props = {"tokens": tokens, "values": vals}
    for key, prop in (
        ("min_value", "minValue"),
        ("max_value", "maxValue"),
        ("negative_color", "negativeColor"),
        ("positive_color", "positiveColor"),
    ):
        if kwargs.get(key) is not None:
            props[prop] = kwargs[key]
    return CircuitsVisView("ColoredTokens", props)


def trajectory_tokens(
    traj: Any, statistic: str = "cross_entropy", *, layer: int | None = None, batch: int = 0
) -> CircuitsVisView:
    """The input tokens coloured by one statistic at one layer (default: the model's output)."""
    li = len(traj.layers) - 1 if layer is None else traj.layer_index(layer)
    vals = _values(traj, statistic, batch)[li]
    vals = np.nan_to_num(vals, nan=0.0)
    return colored_tokens(traj.str_tokens[batch], vals)
