"""Turning what a user passes (text, token tensors, a model or an ActivationCache) into checked
tokens.

Cheap checks run before any forward pass, and each error names the fix.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int

from tlmicroscope.models import access

__all__ = [
    "ResolvedInput",
    "TextOrTokens",
    "check_cache",
    "check_layers",
    "ensure_eval",
    "resolve_input",
    "to_tokens",
]

TextOrTokens = str | Sequence[str] | torch.Tensor | Sequence[int]


def ensure_eval(model: Any) -> None:
    """Analyses run in eval mode; a model left in training mode is switched, with a warning."""
    if getattr(model, "training", False):
        warnings.warn(
            "The model was in training mode (dropout active); tlmicroscope put it in .eval(). "
            "Call model.eval() yourself to silence this.",
            UserWarning,
            stacklevel=3,
        )
        model.eval()


def to_tokens(
    model: Any,
    text_or_tokens: TextOrTokens,
    *,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> Int[torch.Tensor, "batch pos"]:
    """Tokenize and validate: no empty input, no token ids outside the vocabulary, nothing over
    n_ctx.

    Args:
        model: A TransformerLens model.
        text_or_tokens: A string, a list of strings (which must tokenize to equal lengths), or token
            ids as a ``[pos]`` or ``[batch pos]`` tensor or list.
        prepend_bos: Override the model's BOS policy (``model.cfg.default_prepend_bos``).
        truncate: Keep the first ``n_ctx`` tokens of a longer input instead of refusing it.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> to_tokens(tiny_model(n_layers=1), "hey").tolist()
        [[104, 101, 121]]
        >>> to_tokens(tiny_model(n_layers=1), "")
        Traceback (most recent call last):
        ...
        ValueError: The text is empty: there is nothing to analyse. Pass at least one token of text.
    """
    if isinstance(text_or_tokens, str):
        if not text_or_tokens:
            raise ValueError(
                "The text is empty: there is nothing to analyse. Pass at least one token of text."
            )
        tokens = model.to_tokens(text_or_tokens, prepend_bos=prepend_bos, truncate=False)
    elif isinstance(text_or_tokens, torch.Tensor) or (
        isinstance(text_or_tokens, Sequence)
        and text_or_tokens
        and isinstance(text_or_tokens[0], int)
    ):
        tokens = torch.as_tensor(text_or_tokens)
        if tokens.dtype == torch.bool:
            raise ValueError(
                "Token ids must be integers, got a boolean tensor (a mask?). Pass the token ids, "
                "e.g. model.to_tokens(text), or tokens[mask] to keep the masked ones."
            )
        if tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"Token ids must be integers, got dtype {tokens.dtype}.")
        tokens = tokens.long()
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2:
            raise ValueError(
                f"Tokens must be [pos] or [batch pos], got shape {tuple(tokens.shape)}."
            )
        d_vocab = model.cfg.d_vocab
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= d_vocab):
            raise ValueError(
                f"Token ids must lie in [0, {d_vocab}) for this model; got values from "
                f"{int(tokens.min())} to {int(tokens.max())}. Were they made by another tokenizer?"
            )
    elif isinstance(text_or_tokens, Sequence) and all(isinstance(t, str) for t in text_or_tokens):
        texts = list(text_or_tokens)
        if not texts or any(not t for t in texts):
            raise ValueError("A text in the batch is empty; every text needs at least one token.")
        rows = [model.to_tokens(t, prepend_bos=prepend_bos, truncate=False)[0] for t in texts]
        lengths = sorted({len(r) for r in rows})
        if len(lengths) > 1:
            raise ValueError(
                f"The texts tokenize to different lengths {lengths}; a batch needs equal lengths. "
                "Analyse them one at a time, or use tlmicroscope.corpus.token_windows for "
                "fixed-length windows."
            )
        tokens = torch.stack(rows)
    else:
        raise TypeError(
            "Expected a string, a list of strings or token ids, got "
            f"{type(text_or_tokens).__name__}."
        )
    if tokens.shape[-1] == 0:
        raise ValueError("The input has no tokens: there is nothing to analyse.")
    n_ctx = int(model.cfg.n_ctx)
    if tokens.shape[-1] > n_ctx:
        if not truncate:
            raise ValueError(
                f"The input is {tokens.shape[-1]} tokens long but the model's context is {n_ctx} "
                f"tokens. Shorten the text, or pass truncate=True to keep the first {n_ctx} tokens."
            )
        tokens = tokens[:, :n_ctx]
    device = getattr(model.cfg, "device", None)
    return tokens.to(device) if device is not None else tokens


@dataclass(frozen=True)
class ResolvedInput:
    """A model, an optional precomputed cache, and validated tokens (``None`` if unknown)."""

    model: Any
    cache: Any | None
    tokens: torch.Tensor | None


def resolve_input(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    require_tokens: bool = True,
) -> ResolvedInput:
    """Accept ``(model, text_or_tokens)`` or ``(ActivationCache, tokens)`` the same way.

    A cache carries its model, but not the tokens it was run on; analyses that need targets (the
    next token) ask for them with ``require_tokens``.
    """
    if access.is_activation_cache(model_or_cache):
        cache = model_or_cache
        model = getattr(cache, "model", None)
        if model is None:
            raise ValueError("This ActivationCache has no model attached; pass the model instead.")
        if tokens is None:
            if require_tokens:
                raise ValueError(
                    "With an ActivationCache, also pass the tokens it was computed on "
                    "(the cache does not store them)."
                )
            check_cache(cache)
            return ResolvedInput(model, cache, None)
        toks = to_tokens(model, tokens, prepend_bos=prepend_bos, truncate=truncate)
        check_cache(cache, toks)
        return ResolvedInput(model, cache, toks)
    model = model_or_cache
    if not hasattr(model, "run_with_hooks") or not hasattr(model, "cfg"):
        raise TypeError(
            f"Expected a TransformerLens model or an ActivationCache, got {type(model).__name__}."
        )
    if tokens is None:
        raise ValueError("Pass the text or tokens to analyse.")
    ensure_eval(model)
    return ResolvedInput(
        model, None, to_tokens(model, tokens, prepend_bos=prepend_bos, truncate=truncate)
    )


_LAYER = re.compile(r"blocks\.(\d+)\.")
# Hooks of shape [batch pos d_model] (or [pos d_model] without the batch axis).
_RESIDUAL_LIKE = (
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_embed",
    "hook_attn_out",
    "hook_mlp_out",
)


def _where(name: str) -> str:
    m = _LAYER.search(name)
    return f"{name} (layer {m.group(1)})" if m else f"{name} (outside the blocks)"


def check_cache(cache: Any, tokens: torch.Tensor | None = None) -> None:
    """Refuse an ``ActivationCache`` that holds NaN/inf, or that was computed on other tokens.

    Every analysis that accepts a cache calls this through ``resolve_input``. Masked attention
    scores (``hook_attn_scores``) may hold ``-inf`` by construction; only NaN is refused there.
    With ``tokens``, the cache's residual-shaped hooks must be ``[batch pos ...]`` for those
    tokens, and where the cache holds ``hook_embed`` its rows must be the embeddings of those
    tokens (up to a scale: direction, cosine > 0.99).

    Raises:
        ValueError: naming the hook and its layer (NaN/inf), or the two shapes / the first
            positions whose tokens differ (a cache of another text).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=1)
        >>> _, cache = model.run_with_cache(model.to_tokens("abc"))
        >>> check_cache(cache, model.to_tokens("abc"))  # the cache's own tokens: fine
        >>> check_cache(cache, model.to_tokens("abcd"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: The ActivationCache was computed on 1 x 3 tokens ... they belong to another
        text...
    """
    has_batch = bool(getattr(cache, "has_batch_dim", True))
    items = list(cache.cache_dict.items() if hasattr(cache, "cache_dict") else cache.items())
    # A TransformerBridge cache holds one tensor under several names (blocks.1.hook_resid_pre is
    # blocks.0.hook_out): check each tensor once and name it by its TransformerLens name.
    groups: dict[tuple, list[str]] = {}
    tensors: dict[tuple, torch.Tensor] = {}
    for name, t in items:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            key = (t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else (name,)
            groups.setdefault(key, []).append(name)
            tensors[key] = t
    for key, names in groups.items():
        t = tensors[key]
        # Fast path (about 30x cheaper than isfinite on every element): a finite sum means no NaN
        # and no inf. A non-finite sum (an inf, a NaN, or an overflow of huge finite values) is
        # looked at element by element, so the answer is exact either way.
        acc = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
        if bool(torch.isfinite(t.sum(dtype=acc))):
            continue
        scores = any("attn_scores" in n for n in names)
        bad = torch.isnan(t) if scores else ~torch.isfinite(t)
        if bool(bad.any()):
            names = sorted(names, key=lambda n: not n.endswith(_RESIDUAL_LIKE))
            also = f"; also named {', '.join(names[1:])}" if len(names) > 1 else ""
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"The ActivationCache holds {int(bad.sum())} NaN or infinite values in "
                f"{_where(names[0])[:-1]}{also}), the first at index {first}. NaN or inf "
                "activations usually mean an overflow (e.g. float16) or a broken hook; recompute "
                "the cache in float32, or fix the hook, before analysing it."
            )
    if tokens is None:
        return
    batch, n_pos = int(tokens.shape[0]), int(tokens.shape[-1])
    for name, t in items:
        if not isinstance(t, torch.Tensor) or not name.endswith(_RESIDUAL_LIKE) or t.ndim < 2:
            continue
        shape = tuple(t.shape[:2]) if has_batch else (1, int(t.shape[0]))
        if shape != (batch, n_pos):
            raise ValueError(
                f"The ActivationCache was computed on {shape[0]} x {shape[1]} tokens (batch x "
                f"positions; {name} has shape {tuple(t.shape)}), but the tokens passed are {batch} "
                f"x {n_pos}: they belong to another text. Pass the tokens the cache was computed "
                "on."
            )
    _check_embeddings_match(cache, tokens, has_batch)


def _check_embeddings_match(cache: Any, tokens: torch.Tensor, has_batch: bool) -> None:
    """Same length, other text: ``hook_embed`` rows point away from the given tokens' embeddings."""
    model = getattr(cache, "model", None)
    if "hook_embed" not in cache or model is None:
        return
    w_e = getattr(model, "W_E", None)
    if not isinstance(w_e, torch.Tensor) or w_e.ndim != 2:
        return
    cached = cache["hook_embed"].detach()
    cached = cached if has_batch else cached.unsqueeze(0)
    if cached.shape[-1] != w_e.shape[-1] or tuple(cached.shape[:2]) != tuple(tokens.shape):
        return
    with torch.no_grad():
        expected = w_e.detach()[tokens.to(w_e.device)].to(torch.float32)
        cos = torch.nn.functional.cosine_similarity(cached.to(expected), expected, dim=-1)
    off = (cos < 0.99).nonzero()
    if off.numel():
        where = ", ".join(f"(batch {int(b)}, position {int(p)})" for b, p in off[:3])
        raise ValueError(
            "The ActivationCache's embeddings (hook_embed) differ from those of the tokens passed "
            f"at {off.shape[0]} of {tokens.numel()} positions, first at {where}: the tokens belong "
            "to another text of the same length. Pass the tokens the cache was computed on."
        )


def check_layers(layers: Sequence[int] | None, n_max: int, what: str = "layer") -> list[int]:
    """Validate layer indices against ``range(n_max)``; negative indices count from the end."""
    if layers is None:
        return list(range(n_max))
    out = []
    for layer in layers:
        if not isinstance(layer, (int,)) and not (
            isinstance(layer, torch.Tensor) and layer.ndim == 0
        ):
            raise TypeError(f"{what} indices must be integers, got {layer!r}.")
        i = int(layer)
        if not -n_max <= i < n_max:
            raise ValueError(f"{what} {i} is out of range: valid {what}s are 0..{n_max - 1}.")
        out.append(i % n_max)
    return out
