"""Prediction depth: the first layer from which a lens's top-1 stays the model's final top-1.

After Baldock et al., as used by Belrose et al. to measure example difficulty: for each token,
the depth is the smallest lens layer l such that at l and at every later lens layer the lens's
most likely next token equals the model's own; a token whose lens never settles before the output
gets depth ``n_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Int

from tlmicroscope.layers import as_str_tokens
from tlmicroscope.lenses.trajectory import PredictionTrajectory
from tlmicroscope.results import Provenance

__all__ = ["PredictionDepthResult", "prediction_depth"]


@dataclass(frozen=True)
class PredictionDepthResult:
    """Per-token prediction depth.

    Attributes:
        depth: ``[batch pos]`` residual index (0..n_layers; n_layers = settled only at the output).
        layers: The lens layers considered (those of the trajectory, output excluded).
        n_layers: The model's number of blocks.
        str_tokens: The input tokens' text.
        final_top1: ``[batch pos]`` text of the model's top-1 next token (object array).
        provenance: The trajectory's provenance.
    """

    depth: Int[torch.Tensor, "batch pos"]
    layers: tuple[int, ...]
    n_layers: int
    str_tokens: tuple[tuple[str, ...], ...]
    final_top1: np.ndarray
    provenance: Provenance

    def to_dataframe(self, batch: int = 0):
        import pandas as pd

        return pd.DataFrame(
            {
                "position": range(self.depth.shape[1]),
                "token": self.str_tokens[batch],
                "depth": self.depth[batch].tolist(),
                "final_top1": list(self.final_top1[batch]),
            }
        )


def prediction_depth(trajectory: PredictionTrajectory) -> PredictionDepthResult:
    """Prediction depth of every token of a ``PredictionTrajectory``.

    The trajectory must include the model's output (residual index ``n_layers``, the default).
    With a subset of layers, depth is measured on that subset (the first listed layer from which
    every later listed layer agrees).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import prediction_trajectory
        >>> res = prediction_depth(prediction_trajectory(tiny_model(n_layers=2), "hello", top_k=1))
        >>> tuple(res.depth.shape), bool(((res.depth >= 0) & (res.depth <= 2)).all())
        ((1, 5), True)
    """
    n_layers = int(trajectory.n_layers)
    if n_layers not in trajectory.layers:
        raise ValueError(
            "Prediction depth compares each layer with the model's own top-1, but this trajectory "
            f"lacks the output row (layer {n_layers}). Compute it with layers=None or include "
            f"{n_layers}."
        )
    out_row = trajectory.layer_index(n_layers)
    order = sorted((lay, i) for i, lay in enumerate(trajectory.layers) if lay != n_layers)
    top1 = trajectory.top_tokens[..., 0]
    final = top1[out_row]
    batch, n_pos = final.shape
    if not order:
        depth = torch.full((batch, n_pos), n_layers, dtype=torch.long)
    else:
        rows = torch.tensor([i for _, i in order])
        agree = top1[rows] == final  # [lens_layer batch pos]
        # stays[i] = agree at i and at every later lens layer: a reversed cumulative product.
        stays = agree.flip(0).long().cumprod(0).flip(0).bool()
        lens_layers = torch.tensor([lay for lay, _ in order])
        n_settled = stays.sum(0)  # the settled layers are a suffix of the list
        first = len(order) - n_settled
        depth = torch.where(
            n_settled > 0, lens_layers[first.clamp(max=len(order) - 1)], torch.tensor(n_layers)
        )
    return PredictionDepthResult(
        depth=depth,
        layers=tuple(lay for lay, _ in order),
        n_layers=n_layers,
        str_tokens=as_str_tokens(trajectory.str_tokens),
        final_top1=trajectory.top_strings[out_row, ..., 0],
        provenance=trajectory.provenance.with_settings(statistic="prediction_depth"),
    )
