"""Booting a ``TransformerBridge`` from a transformers model and its tokenizer.

Shared by ``load_model`` (checkpoints from GGUF files and Hugging Face folders) and the tiny
family models (``tlmicroscope.models.families``), which are booted as a real checkpoint would be.
"""

from __future__ import annotations

from typing import Any

import torch

__all__: list[str] = []


def _tokenizer_adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def _rope_base(hf_config: Any, layer_type: str = "full_attention") -> float | None:
    theta = getattr(hf_config, "rope_theta", None)
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    if theta is None and isinstance(params, dict):
        # Models with local and global layers (Gemma 3) keep one entry per layer type.
        if isinstance(params.get(layer_type), dict):
            params = params[layer_type]
        theta = params.get("rope_theta")
    return float(theta) if theta is not None else None


def _ensure_architectures(hf: Any) -> None:
    # A config read from a GGUF file (or an old folder) has no `architectures`; TransformerBridge
    # picks its adapter from that list, and the model's class is the answer.
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]


def _mark_bos(tok: Any) -> None:
    # TransformerLens rebuilds a tokenizer whose add_bos_token is unset with add_bos_token=True, a
    # second full load (seconds for a 262k vocabulary). Where the tokenizer already adds BOS
    # (Gemma), record that, so TransformerLens keeps this one.
    if tok is not None and not tok.init_kwargs.get("add_bos_token") and _tokenizer_adds_bos(tok):
        tok.init_kwargs["add_bos_token"] = True


def _bridge_from_hf(label: str, hf: Any, tok: Any, device: str, dtype: torch.dtype):
    from transformer_lens.model_bridge import TransformerBridge

    _ensure_architectures(hf)
    _mark_bos(tok)
    # n_ctx is enforced by tlmicroscope (cfg.n_ctx below); passing it here only makes TL warn
    # that it cannot resize an already-built HF model.
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf, tokenizer=tok, device=device, dtype=dtype
    )
    # transformers 5 keeps the rotary base in rope_parameters; TL reads only rope_theta and
    # reports 10000. The numerics use HF's own rotary module, but tools read cfg.rotary_base.
    base = _rope_base(hf.config)
    if base is not None and getattr(bridge.cfg, "positional_embedding_type", "") == "rotary":
        bridge.cfg.rotary_base = base
        local = _rope_base(hf.config, "sliding_attention")
        if local is not None and local != base and hasattr(bridge.cfg, "rotary_base_local"):
            bridge.cfg.rotary_base_local = local
    return bridge
