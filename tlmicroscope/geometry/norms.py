"""``norm_profile``: the residual norm by layer and position, and the first token's spike.

Ning and Rangaraju find that the state at position 0 has a norm many times larger than every
other position in the intermediate layers (linked to the "massive activations" of Sun et al.), and
that the mean norm of the other positions grows with depth. The spike is summarised per layer as
the ratio of position 0's mean norm to the median over the other positions of their mean norms.

Norms are computed inside the hooks as the forward pass runs: no activation is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from tlmicroscope.geometry.components import (
    ComponentStates,
    _from_cache,
    state_plan,
    stream_states,
)
from tlmicroscope.inputs import TextOrTokens, resolve_input
from tlmicroscope.layers import LayerLabels, component_label, layer_labels
from tlmicroscope.results import Provenance

__all__ = ["NormProfile", "norm_profile"]


@dataclass(frozen=True)
class NormProfile:
    """L2 norms of one or more components per state, sample and position.

    Attributes:
        norms: ``[state batch pos]`` norms.
        components, layers: Component and block of each state (forward order).
        positions: Original position of each column.
        str_tokens: Token text ``[batch pos]`` when known.
        n_layers: The model's number of blocks.
        provenance: Model and settings.
    """

    norms: Float[torch.Tensor, "state batch pos"]
    components: tuple[str, ...]
    layers: tuple[int | None, ...]
    positions: torch.Tensor
    str_tokens: np.ndarray | None
    n_layers: int
    provenance: Provenance | None = None

    @property
    def layer_labels(self) -> LayerLabels:
        """One label per state from the layer vocabulary (``tlmicroscope.layers``): ``"h0"`` the
        embedding, ``"h4"`` block 3's ``resid_post``, ``"b3.attn_out"``, ..., ``"hL·norm"``.

        A property; calling it, ``layer_labels()``, still works."""
        return layer_labels(
            component_label(c, lay, self.n_layers) for c, lay in zip(self.components, self.layers)
        )

    @property
    def by_position(self) -> Float[torch.Tensor, "state pos"]:
        """Mean norm over samples, per state and position."""
        return self.norms.mean(1)

    def by_layer(self, *, include_first: bool = False) -> Float[torch.Tensor, " state"]:
        """Mean norm per state over samples and positions (position 0 left out by default)."""
        keep = (
            self.positions != 0
            if not include_first
            else torch.ones_like(self.positions, dtype=torch.bool)
        )
        if not bool(keep.any()):
            raise ValueError("Only position 0 was measured; pass include_first=True.")
        return self.norms[:, :, keep].mean((1, 2))

    @property
    def first_token_ratio(self) -> Float[torch.Tensor, " state"]:
        """Position 0's mean norm over the median of the other positions' mean norms, per state."""
        first = (self.positions == 0).nonzero().flatten()
        rest = (self.positions != 0).nonzero().flatten()
        if first.numel() == 0 or rest.numel() == 0:
            raise ValueError(
                "The first-token ratio needs position 0 and at least one other position; "
                "measure all positions of inputs longer than one token."
            )
        prof = self.by_position
        return prof[:, first[0]] / prof[:, rest].median(dim=1).values

    def to_dataframe(self):
        """One row per state: mean norm without position 0, position 0's norm, and the ratio."""
        import pandas as pd

        data = {
            "component": list(self.components),
            "layer": list(self.layers),
            "mean_norm": self.by_layer().numpy(),
        }
        if bool((self.positions == 0).any()) and bool((self.positions != 0).any()):
            data["first_token_norm"] = self.by_position[
                :, int((self.positions == 0).nonzero()[0])
            ].numpy()
            data["first_token_ratio"] = self.first_token_ratio.numpy()
        return pd.DataFrame(data)


def norm_profile(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    components: str | Sequence[str] = "resid_post",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> NormProfile:
    """Norms of the residual stream (or any components) per layer, sample and position.

    Args:
        model_or_cache: A model with ``tokens``, an ``ActivationCache`` holding the hooks, or a
            ``ComponentStates`` (its stored vectors are measured).
        tokens: Text or ``[batch pos]`` windows.
        components: One of ``COMPONENTS`` or several, e.g. ``("resid_mid", "resid_post")`` for
            the paper's post-add states. Default ``"resid_post"``.
        layers: Blocks (default all).
        batch_size: Windows per forward pass.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> prof = norm_profile(tiny_model(n_layers=2), "hello world")
        >>> tuple(prof.norms.shape), tuple(prof.first_token_ratio.shape)
        ((2, 1, 11), (2,))
    """
    comps = (components,) if isinstance(components, str) else tuple(components)
    if isinstance(model_or_cache, ComponentStates):
        return _from_states(model_or_cache, comps, layers)
    resolved = resolve_input(
        model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate, require_tokens=False
    )
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    plan = state_plan(comps, layers, model.cfg.n_layers)
    if cache is not None:
        norms = _from_cache(cache, plan).double().norm(dim=-1).float()
        n_pos = norms.shape[-1]
    else:
        norms = _stream_norms(model, toks, plan, batch_size, progress)
        n_pos = toks.shape[-1]
    str_tokens = None
    if toks is not None:
        from tlmicroscope.vocab import token_strings

        str_tokens = token_strings(model, toks.cpu())
    return NormProfile(
        norms=norms,
        components=tuple(s.component for s in plan),
        layers=tuple(s.layer for s in plan),
        positions=torch.arange(n_pos),
        str_tokens=str_tokens,
        n_layers=model.cfg.n_layers,
        provenance=Provenance.from_model(model, components=list(comps), n_sequences=norms.shape[1]),
    )


def _stream_norms(
    model: Any, toks: torch.Tensor, plan: Sequence[Any], batch_size: int, progress: bool
) -> torch.Tensor:
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    out = torch.zeros(len(plan), toks.shape[0], toks.shape[1])
    starts = range(0, toks.shape[0], batch_size)
    for start in tqdm(starts, desc="norms", unit="batch", disable=not progress or len(starts) < 2):
        chunk = toks[start : start + batch_size]

        def on_state(i: int, act: torch.Tensor, start: int = start) -> None:
            out[i, start : start + act.shape[0]] = (
                torch.linalg.vector_norm(act.double(), dim=-1).float().cpu()
            )

        stream_states(model, chunk, plan, on_state)
    return out


def _from_states(
    states: ComponentStates, comps: tuple[str, ...], layers: Sequence[int] | None
) -> NormProfile:
    if states.positions is None:
        raise ValueError(
            "These states were averaged over positions; a norm profile needs positions."
        )
    present = [c for c in comps if c in states.components]
    if not present:
        raise ValueError(
            f"The states hold none of {comps}; they hold {sorted(set(states.components))}."
        )
    sub = states.select(components=present, layers=None if layers is None else list(layers))
    return NormProfile(
        norms=torch.linalg.vector_norm(sub.activations.double(), dim=-1).float(),
        components=sub.components,
        layers=sub.layers,
        positions=sub.positions.clone(),
        str_tokens=sub.str_tokens,
        n_layers=sub.n_layers,
        provenance=sub.provenance,
    )
