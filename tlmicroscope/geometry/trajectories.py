"""``token_trajectories``: chosen tokens' paths across layers in one shared projection.

Every residual state h^0..h^L of a prompt (or of the chosen tokens only) is projected with one
PCA (or UMAP) fitted on all of them, so a token's successive layers become a path whose steps can
be compared between tokens. Unit length is the default, as in the reference's layerwise figure:
raw norms grow with depth and would stretch every path along the same direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from tlmicroscope.geometry.components import ComponentStates, capture_components
from tlmicroscope.geometry.projection import Projection, project
from tlmicroscope.inputs import TextOrTokens
from tlmicroscope.results import Provenance

__all__ = ["TokenTrajectories", "token_trajectories"]


@dataclass(frozen=True)
class TokenTrajectories:
    """Paths of chosen tokens through the layers, in one shared projection.

    Attributes:
        coords: ``[token layer component]`` coordinates.
        positions: Position of each chosen token.
        str_tokens: Text of each chosen token.
        layer_labels: One label per step from the layer vocabulary (``tlmicroscope.layers``):
            ``"h0"``, ``"h1"``, ... for residuals, ``"b3.resid_mid"``, ``"hL·norm"``.
        step_length: ``[token layer-1]`` distance between consecutive steps in the projection.
        projection: The fitted projection (every projected point, with labels).
        provenance: Model and settings.
    """

    coords: Float[torch.Tensor, "token layer component"]
    positions: tuple[int, ...]
    str_tokens: tuple[str, ...]
    layer_labels: tuple[str, ...]
    projection: Projection
    provenance: Provenance | None = None

    @property
    def step_length(self) -> Float[torch.Tensor, "token step"]:
        return (self.coords[:, 1:] - self.coords[:, :-1]).norm(dim=-1)

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for t, (pos, tok) in enumerate(zip(self.positions, self.str_tokens)):
            for li, lab in enumerate(self.layer_labels):
                rows.append(
                    {
                        "position": pos,
                        "token": tok,
                        "layer": lab,
                        **{
                            f"dim{k + 1}": float(self.coords[t, li, k])
                            for k in range(self.coords.shape[-1])
                        },
                    }
                )
        return pd.DataFrame(rows)


def token_trajectories(
    model_or_states: Any,
    tokens: TextOrTokens | None = None,
    *,
    positions: Sequence[int] | None = None,
    sample: int = 0,
    components: Sequence[str] = ("embed", "resid_post"),
    layers: Sequence[int] | None = None,
    method: str = "pca",
    n_components: int = 2,
    fit_on: Literal["all", "selected"] = "all",
    unit: bool = True,
    seed: int = 0,
) -> TokenTrajectories:
    """Project chosen tokens' states at every layer with one shared reducer.

    Args:
        model_or_states: A model (or ``ActivationCache``) with ``tokens``, or a ``ComponentStates``.
        tokens: One text or ``[batch pos]`` ids; ``sample`` picks the row whose tokens are traced.
        positions: Positions to trace (default every position, up to 32 evenly spaced).
        components: The states that make a path, in forward order; the default
            ``("embed", "resid_post")`` is h^0..h^L. Add ``"resid_mid"`` for half-steps, or
            ``"ln_final"`` for the final norm.
        layers: Blocks (default all).
        method, n_components, seed: Passed to ``project`` (2 or 3 components for plotting).
        fit_on: ``"all"`` fits on every captured position of ``sample`` (the shared space),
            ``"selected"`` only on the traced tokens.
        unit: Unit-length vectors first (the reference's layerwise figure).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> tr = token_trajectories(tiny_model(n_layers=2), "hello", positions=[0, 4])
        >>> tuple(tr.coords.shape), tr.layer_labels, tr.str_tokens
        ((2, 3, 2), ('h0', 'h1', 'h2'), ('h', 'o'))
    """
    if isinstance(model_or_states, ComponentStates):
        states = model_or_states
        if layers is not None:
            states = states.select(layers=[-1, *layers, states.n_layers])
        states = states.select(components=components)
    else:
        states = capture_components(
            model_or_states, tokens, components=components, layers=layers, progress=False
        )
    if states.positions is None or "samples" in states.averaged:
        raise ValueError("Trajectories need per-sample, per-position states (not averaged ones).")
    if not 0 <= sample < states.activations.shape[1]:
        raise ValueError(
            f"sample {sample} is out of range for {states.activations.shape[1]} sequences."
        )
    if unit:
        states = states.normalized(unit=True)
    kept = states.positions.tolist()
    if positions is None:
        chosen = [
            kept[int(i)]
            for i in np.unique(np.linspace(0, len(kept) - 1, min(32, len(kept))).round())
        ]
    else:
        missing = [p for p in positions if p not in kept]
        if missing:
            raise ValueError(
                f"Positions {missing} were not captured; captured positions are {kept[:10]}..."
            )
        chosen = list(dict.fromkeys(int(p) for p in positions))
    cols = [kept.index(p) for p in chosen]
    row = states.activations[:, sample].float()  # [state pos d]
    fields = {
        "layer_label": np.repeat(np.asarray(_step_labels(states), dtype=object), row.shape[1]),
        "position": np.tile(np.asarray(kept), row.shape[0]),
        "component": np.repeat(np.asarray(states.components, dtype=object), row.shape[1]),
    }
    if all(lay is not None for lay in states.layers):
        fields["layer"] = np.repeat(np.asarray(states.layers), row.shape[1])
    if states.str_tokens is not None:
        fields["token"] = np.tile(states.str_tokens[sample], row.shape[0])
    selected = row[:, cols]
    fit_data = row if fit_on == "all" else selected
    if fit_on not in ("all", "selected"):
        raise ValueError(f"fit_on must be 'all' or 'selected', got {fit_on!r}.")
    proj = project(
        row.reshape(-1, row.shape[-1]),
        method,
        n_components=n_components,
        fit_on=fit_data.reshape(-1, row.shape[-1]),
        fields=fields,
        seed=seed,
    )
    coords = proj.coords.reshape(row.shape[0], row.shape[1], -1)[:, cols].transpose(0, 1)
    labels = _step_labels(states)
    strs = (
        tuple(str(states.str_tokens[sample, c]) for c in cols)
        if states.str_tokens is not None
        else tuple(str(p) for p in chosen)
    )
    prov = states.provenance
    return TokenTrajectories(
        coords=coords.contiguous(),
        positions=tuple(chosen),
        str_tokens=strs,
        layer_labels=tuple(labels),
        projection=proj,
        provenance=None
        if prov is None
        else prov.with_settings(
            trajectories=dict(method=method, fit_on=fit_on, unit=unit, sample=sample)
        ),
    )


def _step_labels(states: ComponentStates) -> list[str]:
    """One layer-vocabulary label per step: ``"h0"``, ``"b0.resid_mid"``, ``"h1"``, ..."""
    return list(states.state_labels())
