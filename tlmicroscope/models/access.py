"""The model-access layer: the few places where TransformerLens 3.x and 4.x, or HookedTransformer
and TransformerBridge, differ.

Everything else in tlmicroscope relies only on the surface both model classes share: the standard
hook names, ``run_with_cache``, ``run_with_hooks``, ``hooks()``, ``cfg``, ``W_U``, ``to_tokens``.
Never write ``isinstance(model, HookedTransformer)``: that name does not exist on TransformerLens 4.
"""

from __future__ import annotations

import importlib.metadata
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "TL_MAJOR",
    "TL_VERSION",
    "FinalNorm",
    "OutputTransform",
    "expand_kv_heads",
    "final_norm",
    "has_hooked_transformer",
    "is_activation_cache",
    "is_bridge",
    "model_family",
    "model_label",
    "output_transform",
    "positional_embedding_weights",
    "unembed_weights",
    "weights_processed",
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


def resolve_kind(kind: str) -> str:
    """The model class ``load_model`` and ``tiny_model`` build for ``kind``: "hooked" or "bridge".

    ``"auto"`` is HookedTransformer where TransformerLens still has it (3.x), else
    TransformerBridge; ``"hooked"`` on TransformerLens 4 is refused with what to do.

    Examples:
        >>> resolve_kind("bridge")
        'bridge'
        >>> resolve_kind("auto") in ("hooked", "bridge")
        True
    """
    if kind not in ("auto", "bridge", "hooked"):
        raise ValueError(f"kind must be 'auto', 'bridge' or 'hooked', got {kind!r}.")
    if kind == "auto":
        return "hooked" if has_hooked_transformer() else "bridge"
    if kind == "hooked" and not has_hooked_transformer():
        raise ValueError(
            f"kind='hooked' needs HookedTransformer, which TransformerLens {TL_VERSION} "
            "does not have (it was removed in 4.0). Use kind='bridge', or install "
            "'transformer-lens>=3.9,<4'."
        )
    return kind


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


def named_param(module: torch.nn.Module, *names: str) -> torch.Tensor | None:
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
            f"model.cfg.normalization_type={norm_type!r} but the model exposes no `ln_final` "
            "module; tlmicroscope cannot rebuild the final norm for a lens readout."
        )
    kind = "RMS" if str(norm_type).upper().startswith("RMS") else "LN"
    weight = named_param(ln_final, "weight", "w")
    bias = named_param(ln_final, "bias", "b")
    eps = float(getattr(cfg, "eps", 1e-5))
    inner = getattr(ln_final, "_original_component", None)
    for attr in ("variance_epsilon", "eps"):
        if inner is not None and isinstance(getattr(inner, attr, None), float):
            eps = float(getattr(inner, attr))
            break
    if weight is not None and norm_uses_offset(ln_final, cfg):
        weight = weight + 1.0
    return FinalNorm(kind, weight, bias, eps)


def norm_uses_offset(ln_final: torch.nn.Module, cfg: Any) -> bool:
    """Whether the norm multiplies by ``1 + weight`` (Gemma's RMSNorm) rather than ``weight``.

    TransformerLens 4's bridge says so per norm (``uses_weight_offset``, which also covers
    LayerNorm1P slots); 3.9's bridge only has ``cfg.rmsnorm_uses_offset``. HookedTransformer has
    neither: its Gemma weight conversion already added the 1 to the stored weight.
    """
    flag = getattr(ln_final, "uses_weight_offset", None)
    if isinstance(flag, bool):
        return flag
    return bool(getattr(cfg, "rmsnorm_uses_offset", False))


def model_family(model: Any) -> str:
    """The model's architecture as its config names it (``Gemma2ForCausalLM``, ``gemma2``, ...).

    Read from ``cfg.architecture``, ``cfg.original_architecture`` or the wrapped Hugging Face
    config's ``architectures``/``model_type``, whichever exists first; the class name otherwise.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> isinstance(model_family(tiny_model(n_layers=1)), str)
        True
    """
    cfg = model.cfg
    for attr in ("architecture", "original_architecture"):
        value = getattr(cfg, attr, None)
        if value:
            return str(value)
    hf_cfg = _hf_config(model)
    if hf_cfg is not None:
        archs = getattr(hf_cfg, "architectures", None) or []
        if archs:
            return str(archs[0])
        if getattr(hf_cfg, "model_type", None):
            return str(hf_cfg.model_type)
    return type(model).__name__


def _hf_config(model: Any) -> Any:
    inner = getattr(model, "original_model", None)
    return getattr(inner, "config", None)


@dataclass(frozen=True)
class OutputTransform:
    """What the model does to ``W_U · final_norm(h) + b_U`` before its logits come out.

    ``logits = softcap * tanh(scale * z / softcap)``, or ``scale * z`` without a soft cap: Gemma 2
    caps its final logits (``final_logit_softcapping``), Cohere multiplies them by
    ``logit_scale`` and Granite divides them by ``logits_scaling`` before any cap. Every known
    transform has this form; ``source`` says where it was read from, for error messages.

    Examples:
        >>> OutputTransform(scale=0.25, softcap=30.0).describe()
        'logits x 0.25, then soft cap 30 * tanh(logits / 30)'
    """

    scale: float = 1.0
    softcap: float | None = None
    source: str = "none"

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def describe(self) -> str:
        parts = []
        if self.scale != 1.0:
            parts.append(f"logits x {self.scale:g}")
        if self.softcap is not None:
            parts.append(f"soft cap {self.softcap:g} * tanh(logits / {self.softcap:g})")
        return ", then ".join(parts) if parts else "none"


def _positive(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _probe_transform(fn: Any, source: str) -> OutputTransform:
    """Read scale and soft cap off an elementwise logits transform by evaluating it."""
    delta, big = 1e-4, 1e12
    with torch.no_grad():
        y = fn(torch.tensor([delta, big], dtype=torch.float64)).double()
    scale = float(y[0]) / delta
    cap = None if abs(float(y[1]) - scale * big) <= 1e-6 * abs(scale * big) else float(y[1])
    found = OutputTransform(scale=scale, softcap=cap, source=source)
    grid = torch.linspace(-60.0, 60.0, 241, dtype=torch.float64) / max(abs(scale), 1e-12)
    with torch.no_grad():
        expect = fn(grid.clone()).double()
    ours = apply_output_transform(grid, found)
    if not torch.allclose(ours, expect, rtol=1e-6, atol=1e-9):
        raise ValueError(
            f"{source} applies an output transform tlmicroscope cannot express as "
            "softcap * tanh(scale * logits / softcap), so no lens readout can reproduce this "
            "model's logits."
        )
    if abs(scale - 1.0) < 1e-9:
        found = OutputTransform(scale=1.0, softcap=cap, source=source)
    return found


def apply_output_transform(z: torch.Tensor, t: OutputTransform) -> torch.Tensor:
    if t.scale != 1.0:
        z = z * t.scale
    if t.softcap is not None:
        z = t.softcap * torch.tanh(z / t.softcap)
    return z


def output_transform(model: Any) -> OutputTransform:
    """The transform the model applies after its unembedding, on either model class.

    A bridge declares it through its architecture adapter's ``apply_output_logits_transform``
    (both TransformerLens lines; Cohere's adapter knows whether the scale was folded into
    ``W_U`` already), which is evaluated on a probe grid. HookedTransformer only has
    ``cfg.output_logits_soft_cap``. A bridge without that method falls back to the Hugging Face
    config's ``final_logit_softcapping``, ``logit_scale`` (Cohere) and ``logits_scaling`` (Granite).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> output_transform(tiny_model(n_layers=1)).is_identity
        True
    """
    adapter = getattr(model, "adapter", None)
    fn = getattr(adapter, "apply_output_logits_transform", None)
    if callable(fn):
        found = _probe_transform(fn, f"{type(adapter).__name__}.apply_output_logits_transform")
        # TransformerLens 3.9's Cohere adapter still applies cfg.logit_scale after weight
        # processing has folded it into W_U (and set the HF model's own scale to 1); 4.x does not.
        declared = _positive(getattr(model.cfg, "logit_scale", None))
        if (
            getattr(adapter, "_logit_scale_already_folded", False)
            and declared
            and abs(found.scale - declared) <= 1e-9 * declared
        ):
            found = OutputTransform(
                scale=1.0,
                softcap=found.softcap,
                source=found.source + " (logit_scale already folded into W_U)",
            )
        return found
    cap = _positive(getattr(model.cfg, "output_logits_soft_cap", None))
    scale, source = 1.0, "cfg.output_logits_soft_cap" if cap else "none"
    hf_cfg = _hf_config(model) if is_bridge(model) else None
    if hf_cfg is not None:
        model_type = str(getattr(hf_cfg, "model_type", ""))
        cap = cap or _positive(getattr(hf_cfg, "final_logit_softcapping", None))
        if model_type.startswith("cohere") and _positive(getattr(hf_cfg, "logit_scale", None)):
            scale = float(hf_cfg.logit_scale)
        if model_type.startswith("granite") and _positive(getattr(hf_cfg, "logits_scaling", None)):
            scale = 1.0 / float(hf_cfg.logits_scaling)
        source = f"Hugging Face config ({model_type})"
    return OutputTransform(scale=scale, softcap=cap, source=source)


def unembed_weights(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``W_U`` ``[d_model d_vocab]`` and ``b_U`` ``[d_vocab]`` (``None``: absent or all zero)."""
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
    for owner, attr in (
        (model, "W_pos"),
        (getattr(model, "pos", None), "W_pos"),
        (getattr(model, "pos_embed", None), "W_pos"),
        (getattr(model, "pos", None), "weight"),
    ):
        if owner is None:
            continue
        try:
            w = getattr(owner, attr)
        except AttributeError:
            continue
        if isinstance(w, torch.Tensor) and w.ndim == 2:
            return w
    return None
