"""Tiny seeded random models with a byte-level tokenizer, for tests and runnable docstrings.

They need no network and no weights on disk, and exist for both model classes:
``"llama"`` is RMSNorm + rotary + gated MLP + grouped-query attention, ``"gpt2"`` is LayerNorm +
learned positions + multi-head attention, both built natively by TransformerLens. Every family
of ``tlmicroscope.models.families.FAMILIES`` (Gemma 2 and 3, Mixtral, Cohere, ...) is built as a
random transformers model instead and booted from it, as a real checkpoint would be.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from tlmicroscope.models import access
from tlmicroscope.models.byte_tokenizer import TINY_VOCAB, byte_tokenizer

__all__ = ["TINY_VOCAB", "byte_tokenizer", "tiny_model"]


def _shape(arch: str, n_layers: int, d_model: int, n_ctx: int) -> dict[str, Any]:
    common = dict(
        d_model=d_model,
        d_head=d_model // 4,
        n_heads=4,
        n_layers=n_layers,
        n_ctx=n_ctx,
        d_vocab=TINY_VOCAB,
        d_mlp=2 * d_model,
    )
    if arch == "llama":
        return dict(
            common,
            n_key_value_heads=2,
            act_fn="silu",
            gated_mlp=True,
            normalization_type="RMS",
            final_rms=True,
            positional_embedding_type="rotary",
            rotary_dim=d_model // 4,
        )
    if arch == "gpt2":
        return dict(
            common, act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard"
        )
    from tlmicroscope.models.families import FAMILIES

    raise ValueError(
        f"arch must be 'llama' or 'gpt2' for a native tiny model, or one of the families "
        f"{sorted(FAMILIES)}; got {arch!r}."
    )


def tiny_model(
    arch: str = "llama",
    *,
    kind: Literal["auto", "bridge", "hooked"] = "auto",
    n_layers: int = 3,
    d_model: int = 32,
    n_ctx: int = 128,
    seed: int = 0,
    source: Literal["native", "transformers"] | None = None,
) -> Any:
    """A seeded random model of the chosen architecture, in eval mode, with ``byte_tokenizer()``.

    Args:
        arch: ``"llama"`` or ``"gpt2"`` (built natively by TransformerLens unless ``source`` says
            otherwise), or any family in ``tlmicroscope.models.families.FAMILIES``.
        kind: ``"bridge"``, ``"hooked"`` (TransformerLens 3 only) or ``"auto"``.
        source: ``"native"`` builds the model from a TransformerLens config (``llama``/``gpt2``
            only); ``"transformers"`` builds a random transformers model of the family and boots
            TransformerLens from it. ``None`` picks native for ``llama``/``gpt2``.

    Raises:
        ValueError: an unknown architecture, or ``kind="hooked"`` for a family HookedTransformer
            cannot hold (the message says why).

    Examples:
        >>> model = tiny_model("llama", n_layers=2)
        >>> model.cfg.n_layers, model.cfg.d_vocab
        (2, 259)
        >>> tuple(model(model.to_tokens("hi")).shape)
        (1, 2, 259)
    """
    resolved = access.resolve_kind(kind)
    if source is None:
        source = "native" if arch in ("llama", "gpt2") else "transformers"
    if source == "transformers":
        from tlmicroscope.models.families import tiny_family_model

        return tiny_family_model(
            arch, kind=resolved, n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, seed=seed
        )
    if source != "native":
        raise ValueError(f"source must be 'native', 'transformers' or None, got {source!r}.")
    shape = _shape(arch, n_layers, d_model, n_ctx)
    tok = byte_tokenizer()
    torch.manual_seed(seed)
    if resolved == "hooked":
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        cfg = HookedTransformerConfig(
            **shape, seed=seed, default_prepend_bos=False, tokenizer_prepends_bos=False
        )
        model = HookedTransformer(cfg, tokenizer=tok)
    else:
        from transformer_lens import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(
            TransformerBridgeConfig(**shape, seed=seed), tokenizer=tok
        )
    # Random init leaves biases (and norm gains) at 0 and 1; perturb them so those paths are tested.
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("bias", "b") or leaf.startswith("b_"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and leaf in ("weight", "w"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    model.cfg.default_prepend_bos = False
    model._tlmicroscope_processed = False
    model._tlmicroscope_name = f"tiny-{arch}-L{n_layers}-d{d_model}-s{seed}"
    return model.eval()


def model_kind(model: Any) -> str:
    """``"bridge"`` or ``"hooked"``."""
    return "bridge" if access.is_bridge(model) else "hooked"
