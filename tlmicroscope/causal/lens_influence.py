"""Each causal-basis direction's lens influence on given hidden states.

The energies a ``CausalBasis`` stores are measured on its extraction corpus. ``lens_influence``
measures the same quantity on other hidden states (e.g. one text's, from a report's shared
capture): the KL of the lens's prediction when each direction is ablated with the basis's mode
and mean.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from tlmicroscope.causal._lens_ablation import LensAblationObjective
from tlmicroscope.causal.ablation import derangement
from tlmicroscope.lenses.readout import Readout

__all__ = ["lens_influence"]


def lens_influence(
    basis: Any,
    lens: Any,
    model: Any,
    hidden: Float[torch.Tensor, "... d_model"],
    *,
    seed: int = 0,
) -> Float[torch.Tensor, " k"]:
    """``[k]`` KL (nats) of the lens's prediction on ``hidden`` with each basis direction ablated.

    Args:
        basis: A fitted ``CausalBasis`` (its layer, mode, mean and vectors are used).
        lens: The lens the basis was extracted through (a ``Lens`` object).
        model: The model (its readout: final norm and unembedding).
        hidden: Hidden states at the basis's layer, any leading shape (flattened to rows).
        seed: Seed of the donor permutation in ``"resample"`` mode.

    Examples:
        >>> import torch
        >>> from types import SimpleNamespace
        >>> from tlmicroscope.lenses import resolve_lens
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> d = model.cfg.d_model
        >>> basis = SimpleNamespace(layer=1, k=2, d_model=d, mode="mean",
        ...                         mean=torch.zeros(d), vectors=torch.eye(d)[:, :2])
        >>> kl = lens_influence(basis, resolve_lens("logit"), model, torch.randn(5, d))
        >>> kl.shape, bool((kl >= 0).all())
        (torch.Size([2]), True)
    """
    h = hidden.reshape(-1, basis.d_model).float()
    donors = derangement(h.shape[0], seed=seed) if basis.mode == "resample" else None
    objective = LensAblationObjective(
        Readout.for_model(model),
        lens,
        basis.layer,
        h,
        basis.mode,
        mean=basis.mean.float(),
        donors=donors,
    )
    with torch.no_grad():
        return torch.tensor(
            [float(objective.energy(basis.vectors[:, j].float())) for j in range(basis.k)]
        )
