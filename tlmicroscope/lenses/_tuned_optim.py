"""Optimizers for tuned-lens training: the reference SGD-Nesterov recipe, Muon + AdamW, Adam.

Muon (Jordan et al. 2024, the optimizer of the first tuned-lens author's open PR #141) takes
Nesterov momentum and replaces each matrix's update by its nearest semi-orthogonal matrix,
computed with five Newton-Schulz iterations. It is written here because torch 2.13's own
``torch.optim.Muon`` accepts only 2-D parameters, and the lens keeps its translators as one
``[n_layers d_model d_model]`` tensor (each layer's matrix is orthogonalised separately, in one
batched product). Biases are not matrices; they go to AdamW.

Optimizer state is flattened into named tensors plus JSON-able values so that checkpoints save
through ``tlmicroscope.io`` (safetensors + JSON), never through pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["RECIPES", "Muon", "Recipe", "flatten_state", "make_optimizers", "unflatten_state"]

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def orthogonalize(G: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately ``U V^T`` for ``G = U S V^T``, per matrix over the last two dims
    (Newton-Schulz)."""
    a, b, c = _NS_COEFFS
    X = G / (torch.linalg.matrix_norm(G, keepdim=True) + eps)
    tall = G.shape[-2] > G.shape[-1]
    if tall:
        X = X.mT
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum orthogonalised by Newton-Schulz, for matrices or stacks of matrices ``[..., m, n]``.

    Args:
        lr: Step size; each update has spectral norm about ``lr`` (times ``sqrt(max(1, m/n))``).
        momentum: Momentum coefficient.
        nesterov: Use the Nesterov look-ahead ``g + momentum * buf``.
        weight_decay: Decoupled decay ``p *= 1 - lr * weight_decay``.
        ns_steps: Newton-Schulz iterations.
        ns_dtype: Dtype of the Newton-Schulz iterations (bfloat16, as Muon's authors run them;
            float32 when a run asks for full precision, e.g. to compare runs bit for bit).
    """

    def __init__(
        self,
        params,
        lr: float = 0.01,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}.")
        self.ns_dtype = ns_dtype
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                nesterov=nesterov,
                weight_decay=weight_decay,
                ns_steps=ns_steps,
            ),
        )

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim < 2:
                    raise ValueError("Muon updates matrices only; give vectors (biases) to AdamW.")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                # bfloat16 iterations by default, as Muon's authors run them: the map tolerates it
                ortho = orthogonalize(update.to(self.ns_dtype), group["ns_steps"]).to(p.dtype)
                scale = max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(ortho, alpha=-group["lr"] * scale)
        return None


@dataclass(frozen=True)
class Recipe:
    """Default hyperparameters of a training recipe."""

    name: str
    lr: float
    bias_lr: float
    weight_decay: float
    momentum: float
    description: str


#: The recipes. ``sgd`` is the reference's exact recipe (lr = 1.0 * (1 - momentum) per step of
#: 2^18 tokens, weight decay 1e-3, Nesterov 0.9); ``muon`` is PR #141's (Muon lr 0.01, weight
#: decay 0.01) with an AdamW learning rate for biases chosen on the embedded model;
#: ``adam`` is the reference's Adam option (amsgrad, lr 1e-3) with its warmup actually applied.
RECIPES: dict[str, Recipe] = {
    "sgd": Recipe("sgd", 0.1, 0.1, 1e-3, 0.9, "SGD + Nesterov 0.9, lr 0.1, wd 1e-3 (reference)"),
    "muon": Recipe("muon", 0.03, 0.01, 0.01, 0.9, "Muon on matrices + AdamW on biases (PR #141)"),
    "adam": Recipe("adam", 1e-3, 1e-3, 0.0, 0.9, "Adam (amsgrad), lr 1e-3"),
}


def make_optimizers(
    recipe: str,
    weight: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    *,
    lr: float,
    bias_lr: float,
    weight_decay: float,
    momentum: float,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, torch.optim.Optimizer]:
    """The optimizers of a recipe, by name (their order is the order they step in)."""
    params = [weight] + ([bias] if bias is not None else [])
    if recipe == "sgd":
        return {
            "sgd": torch.optim.SGD(
                params, lr=lr, momentum=momentum, nesterov=True, weight_decay=weight_decay
            )
        }
    if recipe == "adam":
        return {
            "adam": torch.optim.Adam(
                params, lr=lr, betas=(momentum, 0.999), amsgrad=True, weight_decay=weight_decay
            )
        }
    if recipe == "muon":
        opts: dict[str, torch.optim.Optimizer] = {
            "muon": Muon(
                [weight], lr=lr, momentum=momentum, weight_decay=weight_decay, ns_dtype=ns_dtype
            )
        }
        if bias is not None:
            opts["adamw"] = torch.optim.AdamW(
                [bias], lr=bias_lr, betas=(momentum, 0.999), weight_decay=weight_decay
            )
        return opts
    raise ValueError(f"Unknown recipe {recipe!r}; choose from {sorted(RECIPES)}.")


def flatten_state(
    optimizers: Mapping[str, torch.optim.Optimizer],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer states as ``{name: tensor}`` plus JSON-able groups and scalars."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for oname, opt in optimizers.items():
        sd = opt.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, st in sd["state"].items():
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{oname}.{idx}.{key}"] = value
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[oname] = {"param_groups": sd["param_groups"], "scalars": scalars}
    return tensors, meta


def unflatten_state(
    optimizers: Mapping[str, torch.optim.Optimizer],
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
) -> None:
    """Load what ``flatten_state`` wrote back into ``optimizers``."""
    for oname, opt in optimizers.items():
        if oname not in meta:
            raise ValueError(f"The checkpoint has no state for the {oname!r} optimizer.")
        state: dict[int, dict[str, Any]] = {}
        prefix = f"optim.{oname}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                idx, name = key[len(prefix) :].split(".", 1)
                state.setdefault(int(idx), {})[name] = value
        for idx, scalars in meta[oname].get("scalars", {}).items():
            state.setdefault(int(idx), {}).update(scalars)
        opt.load_state_dict({"state": state, "param_groups": meta[oname]["param_groups"]})
