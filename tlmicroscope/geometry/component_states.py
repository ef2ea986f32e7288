"""``ComponentStates``: captured latent states with their labels, and the preprocessing of the
reference.

A state is one (component, layer) pair; the activations are ``[state batch pos d_model]``. The
preprocessing options follow Vainateya/Feature_Geometry_Visualization, in its order: average over
samples, positions or layers, then a LayerNorm without parameters, then unit length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.layers import (
    LayerLabels,
    block_label,
    component_label,
    layer_labels,
    residual_label,
)
from tlmicroscope.results import Provenance

__all__ = ["AVERAGE_AXES", "ComponentStates", "layer_norm_parameter_free", "unit_length"]

#: Axes ``ComponentStates.mean`` and ``capture_components(average=...)`` can average over.
AVERAGE_AXES = ("samples", "positions", "layers")


def layer_norm_parameter_free(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm without gain or bias over the last axis: ``(x - mean) / sqrt(var + eps)``.

    Examples:
        >>> y = layer_norm_parameter_free(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> round(float(y.mean()), 6), round(float(y.pow(2).mean()), 3)
        (0.0, 1.0)
    """
    x = x.float()
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + eps)


def unit_length(x: torch.Tensor) -> torch.Tensor:
    """Each vector divided by its L2 norm; all-zero vectors stay zero.

    Examples:
        >>> unit_length(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
        [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    x = x.float()
    norm = x.norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny), x)


@dataclass(frozen=True)
class ComponentStates:
    """Activations of chosen components, layers and positions: ``[state batch pos d_model]``.

    One *state* is one (component, layer) pair, in forward order. After averaging, the averaged
    axis has size 1 and its labels are dropped (``tokens`` after averaging over samples or
    positions, ``layers`` become ``None`` after averaging over layers).

    Attributes:
        activations: The states, in ``dtype`` (float32 unless asked otherwise).
        components: Component name of each state (``COMPONENTS``).
        layers: Block of each state (-1 the embedding, ``n_layers`` the final norm; ``None`` after
            averaging over layers).
        hook_names: Hook each state came from (several, joined by ``+``, after averaging layers).
        tokens: Input ids ``[batch pos]`` of the kept positions, or ``None`` once averaged away.
        str_tokens: Text of ``tokens`` (an object array), or ``None``.
        positions: Original position of each kept position, or ``None`` after averaging positions.
        n_layers: The model's number of blocks.
        averaged: Axes averaged over, from ``("samples", "positions", "layers")``.
        layer_normed, unit: Whether the parameter-free LayerNorm / unit length were applied.
        provenance: Model, weight processing and capture settings.
    """

    activations: Float[torch.Tensor, "state batch pos d_model"]
    components: tuple[str, ...]
    layers: tuple[int | None, ...]
    hook_names: tuple[str, ...]
    tokens: Int[torch.Tensor, "batch pos"] | None
    str_tokens: np.ndarray | None
    positions: Int[torch.Tensor, " pos"] | None
    n_layers: int
    averaged: tuple[str, ...] = ()
    layer_normed: bool = False
    unit: bool = False
    provenance: Provenance | None = None

    def __post_init__(self) -> None:
        s = self.activations.shape[0] if self.activations.ndim == 4 else -1
        if self.activations.ndim != 4:
            raise ValueError(
                "activations must be [state batch pos d_model], got shape "
                f"{tuple(self.activations.shape)}."
            )
        for name in ("components", "layers", "hook_names"):
            if len(getattr(self, name)) != s:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {s} states.")

    @property
    def n_states(self) -> int:
        return int(self.activations.shape[0])

    @property
    def n_points(self) -> int:
        """Number of vectors: states × batch × positions."""
        return int(np.prod(self.activations.shape[:3]))

    @property
    def d_model(self) -> int:
        return int(self.activations.shape[-1])

    @property
    def layer_labels(self) -> LayerLabels:
        """The block of each state: ``"h0"`` (the embedding), ``"b0"``..``"b{L-1}"``,
        ``"hL·norm"`` (the final norm), or ``"mean"`` after averaging layers.

        A property (``tlmicroscope.layers``); calling it, ``layer_labels()``, still works.
        """
        return layer_labels(_layer_label(layer, self.n_layers) for layer in self.layers)

    def state_labels(self) -> LayerLabels:
        """One label per state from the layer vocabulary: ``"h0"``, ``"b3.attn_out"``, ``"h4"``
        (block 3's ``resid_post``), ..., ``"hL·norm"``; ``"attn_out mean"`` after averaging
        layers."""
        return layer_labels(
            component_label(c, lay, self.n_layers) for c, lay in zip(self.components, self.layers)
        )

    def select(
        self, components: Sequence[str] | None = None, layers: Sequence[int] | None = None
    ) -> ComponentStates:
        """The states of some components and/or blocks (embed and final norm count as blocks -1
        and ``n_layers``)."""
        keep = [
            i
            for i, (c, lay) in enumerate(zip(self.components, self.layers))
            if (components is None or c in components) and (layers is None or lay in set(layers))
        ]
        if not keep:
            raise ValueError(
                f"No state matches components={components} layers={layers}; this object holds "
                f"{sorted(set(self.components))} for layers "
                f"{sorted({x for x in self.layers if x is not None})}."
            )
        return self._subset_states(keep)

    def _subset_states(self, keep: list[int]) -> ComponentStates:
        idx = torch.as_tensor(keep)
        return dataclasses.replace(
            self,
            activations=self.activations.index_select(0, idx),
            components=tuple(self.components[i] for i in keep),
            layers=tuple(self.layers[i] for i in keep),
            hook_names=tuple(self.hook_names[i] for i in keep),
        )

    def drop_first(self) -> ComponentStates:
        """Drop original position 0 (its norm spike dominates raw projections)."""
        if self.positions is None:
            raise ValueError("Positions were averaged over; drop position 0 before averaging.")
        keep = (self.positions != 0).nonzero().flatten()
        if keep.numel() == 0:
            raise ValueError("Only position 0 was captured: dropping it leaves nothing.")
        return dataclasses.replace(
            self,
            activations=self.activations.index_select(2, keep),
            tokens=None if self.tokens is None else self.tokens[:, keep],
            str_tokens=None if self.str_tokens is None else self.str_tokens[:, keep.numpy()],
            positions=self.positions[keep],
        )

    def mean(self, over: str | Sequence[str]) -> ComponentStates:
        """Average over ``"samples"``, ``"positions"`` and/or ``"layers"`` (per component)."""
        axes = _check_axes(over)
        out = self
        dims = tuple(
            d for d, a in ((0, "samples"), (1, "positions")) if a in axes
        )  # within a state
        if "samples" in axes:
            out = dataclasses.replace(out, tokens=None, str_tokens=None)
        if "positions" in axes:
            out = dataclasses.replace(out, tokens=None, str_tokens=None, positions=None)
        # One state at a time in float32, so a float16 capture is never copied whole in float32.
        x = (
            torch.stack([s.float().mean(dims, keepdim=True) for s in self.activations])
            if dims
            else self.activations
        )
        comps, layers, hooks = out.components, out.layers, out.hook_names
        if "layers" in axes:
            groups = list(dict.fromkeys(comps))
            x = torch.stack(
                [
                    sum(x[i].float() for i, c in enumerate(comps) if c == g) / comps.count(g)
                    for g in groups
                ]
            )
            hooks = tuple("+".join(h for h, c in zip(hooks, comps) if c == g) for g in groups)
            comps, layers = tuple(groups), (None,) * len(groups)
        return dataclasses.replace(
            out,
            activations=x.to(self.activations.dtype),
            components=comps,
            layers=layers,
            hook_names=hooks,
            averaged=tuple(dict.fromkeys((*self.averaged, *axes))),
        )

    def normalized(self, *, layer_norm: bool = False, unit: bool = False) -> ComponentStates:
        """Apply the parameter-free LayerNorm and/or unit length (in that order) to every vector."""
        out = torch.empty_like(self.activations)
        for i, x in enumerate(self.activations):  # state by state: bounded float32 temporaries
            if layer_norm:
                x = layer_norm_parameter_free(x)
            if unit:
                x = unit_length(x)
            out[i] = x
        return dataclasses.replace(
            self,
            activations=out,
            layer_normed=self.layer_normed or layer_norm,
            unit=self.unit or unit,
        )

    def point_fields(self) -> dict[str, np.ndarray]:
        """Per-vector labels in ``activations.reshape(-1, d_model)`` order.

        Keys: ``state``, ``component``, ``layer`` (missing after averaging layers), ``layer_label``,
        ``sample`` (missing after averaging samples), ``position`` (missing after averaging
        positions) and ``token`` (when token text is known).
        """
        s, b, p = self.activations.shape[:3]
        st, sa, po = (a.reshape(-1) for a in np.indices((s, b, p), dtype=np.int32))
        comps = np.asarray(self.components, dtype=object)
        fields: dict[str, np.ndarray] = {
            "state": st,
            "component": comps[st],
            "layer_label": np.asarray(self.layer_labels, dtype=object)[st],
        }
        if all(layer is not None for layer in self.layers):
            fields["layer"] = np.asarray(self.layers, dtype=np.int32)[st]
        if "samples" not in self.averaged:
            fields["sample"] = sa
        if self.positions is not None:
            fields["position"] = self.positions.numpy().astype(np.int32)[po]
        if self.str_tokens is not None:
            fields["token"] = self.str_tokens[sa, po]
        return fields

    def flat(self) -> Float[torch.Tensor, "point d_model"]:
        """All vectors as ``[point d_model]`` (a view when the buffer is contiguous)."""
        return self.activations.reshape(-1, self.d_model)


def _layer_label(layer: int | None, n_layers: int) -> str:
    """The block label of a state's layer (-1 the embedding, ``n_layers`` the final norm)."""
    if layer is None:
        return "mean"
    if layer < 0:
        return residual_label(0)
    if layer >= n_layers:
        return residual_label(n_layers, normed=True)
    return block_label(layer)


def _check_axes(over: str | Sequence[str]) -> tuple[str, ...]:
    axes = (over,) if isinstance(over, str) else tuple(over)
    bad = [a for a in axes if a not in AVERAGE_AXES]
    if bad:
        raise ValueError(f"Cannot average over {bad}; choose from {list(AVERAGE_AXES)}.")
    return axes
