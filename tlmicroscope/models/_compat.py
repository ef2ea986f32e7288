"""The few places where TransformerLens 3.x and 4.x, or HookedTransformer and TransformerBridge, differ.

Everything else in tlmicroscope relies only on the surface both model classes share: the standard
hook names, ``run_with_cache``, ``run_with_hooks``, ``hooks()``, ``cfg``, ``W_U``, ``to_tokens``.
Never write ``isinstance(model, HookedTransformer)``: that name does not exist on TransformerLens 4.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TL_VERSION",
    "TL_MAJOR",
    "has_hooked_transformer",
    "is_bridge",
    "is_activation_cache",
    "FinalNorm",
    "final_norm",
    "unembed_weights",
    "weights_processed",
    "model_label",
    "expand_kv_heads",
    "positional_embedding_weights",
]


def _tl_version() -> str:
    try:
        return importlib.metadata.version("transformer-lens")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - editable checkouts
        return "0"


TL_VERSION: str = _tl_version()
TL_MAJOR: int = int(TL_VERSION.split(".")[0]) if TL_VERSION.split(".")[0].isdigit() else 0


def has_hooked_transformer() -> bool:
    """True where ``transformer_lens.HookedTransformer`` can be imported (TransformerLens < 4)."""
    if TL_MAJOR >= 4:
        return False
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def cli_kind_args(model: Any) -> list[str]:
    """The ``--kind`` option a command line needs to load ``model``'s class again.

    ``kind="auto"`` picks HookedTransformer where it exists, so a bridge on TransformerLens 3
    needs ``--kind bridge``; everywhere else the default already gives the same class.
    """
    return ["--kind", "bridge"] if is_bridge(model) and has_hooked_transformer() else []


def is_bridge(model: Any) -> bool:
    """True for a ``TransformerBridge``, judged by class name so it works on every TL line."""
    return any(cls.__name__ == "TransformerBridge" for cls in type(model).__mro__)


def is_activation_cache(obj: Any) -> bool:
    from transformer_lens import ActivationCache

    return isinstance(obj, ActivationCache)


@dataclass(frozen=True)
class FinalNorm:
    """The model's final normalisation as plain tensors, so a lens can recompute it from any h.

    ``kind`` is ``"RMS"``, ``"LN"`` or ``None`` (no final norm). ``weight`` and ``bias`` are
    ``None`` where the norm has no affine part (``LNPre``/``RMSPre`` after ``fold_ln``).
    """

    kind: str | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float


def _named_param(module: torch.nn.Module, *names: str) -> torch.Tensor | None:
    for full, p in module.named_parameters():
        if full.split(".")[-1] in names:
            return p
    return None


def final_norm(model: Any) -> FinalNorm:
    """Read the final norm's kind, weight, bias and epsilon from either model class."""
    cfg = model.cfg
    norm_type = getattr(cfg, "normalization_type", None)
    if norm_type is None:
        return FinalNorm(None, None, None, 0.0)
    ln_final = getattr(model, "ln_final", None)
    if not isinstance(ln_final, torch.nn.Module):
        raise ValueError(
            f"model.cfg.normalization_type={norm_type!r} but the model exposes no `ln_final` module; "
            "tlmicroscope cannot rebuild the final norm for a lens readout."
        )
    kind = "RMS" if str(norm_type).upper().startswith("RMS") else "LN"
    weight = _named_param(ln_final, "weight", "w")
    bias = _named_param(ln_final, "bias", "b")
    eps = float(getattr(cfg, "eps", 1e-5))
    inner = getattr(ln_final, "_original_component", None)
    for attr in ("variance_epsilon", "eps"):
        if inner is not None and isinstance(getattr(inner, attr, None), float):
            eps = float(getattr(inner, attr))
            break
    if weight is not None and getattr(cfg, "rmsnorm_uses_offset", False):
        weight = weight + 1.0
    return FinalNorm(kind, weight, bias, eps)


def unembed_weights(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_U`` ``[d_model d_vocab]`` and ``b_U`` ``[d_vocab]`` (``None`` when absent or all zero)."""
    W_U = model.W_U
    b_U = getattr(model, "b_U", None)
    if b_U is not None and not torch.count_nonzero(b_U):
        b_U = None
    return W_U, b_U


def weights_processed(model: Any) -> bool:
    """Whether fold_ln / centring changed the weights from how the source model computes."""
    flag = getattr(model, "_tlmicroscope_processed", None)
    if flag is not None:
        return bool(flag)
    norm_type = str(getattr(model.cfg, "normalization_type", "") or "")
    if norm_type.endswith("Pre"):
        return True
    return bool(getattr(model, "compatibility_mode", False)) or bool(
        getattr(model.cfg, "layer_norm_folding", False)
    )


def model_label(model: Any) -> str:
    name = getattr(model, "_tlmicroscope_name", None) or getattr(model.cfg, "model_name", None)
    return str(name or type(model).__name__)


def expand_kv_heads(t: torch.Tensor, n_heads: int, head_dim: int = -2) -> torch.Tensor:
    """Repeat grouped key/value heads so there is one per query head (GQA)."""
    n_kv = t.shape[head_dim]
    if n_kv == n_heads:
        return t
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads cannot share {n_kv} key/value heads evenly.")
    return t.repeat_interleave(n_heads // n_kv, dim=head_dim)


def positional_embedding_weights(model: Any) -> torch.Tensor | None:
    """The learned positional table ``[n_ctx d_model]`` (a live parameter), or ``None`` without one.

    ``model.W_pos`` exists on HookedTransformer and on TransformerLens 4's bridge; TransformerLens
    3.9's bridge only has it on its ``pos`` component.
    """
    if str(getattr(model.cfg, "positional_embedding_type", "")) != "standard":
        return None
    for owner, attr in ((model, "W_pos"), (getattr(model, "pos", None), "W_pos"),
                        (getattr(model, "pos_embed", None), "W_pos"), (getattr(model, "pos", None), "weight")):
        if owner is None:
            continue
        try:
            w = getattr(owner, attr)
        except AttributeError:
            continue
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return w
    return None
