"""Turning what a user passes (text, token tensors, a model or an ActivationCache) into checked tokens.

Cheap checks run before any forward pass, and each error names the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from jaxtyping import Int

from tlmicroscope.models import _compat

__all__ = ["TextOrTokens", "to_tokens", "resolve_input", "ResolvedInput", "ensure_eval", "check_layers"]

TextOrTokens = Union[str, Sequence[str], torch.Tensor, Sequence[int]]


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
    """Tokenize and validate: no empty input, no token ids outside the vocabulary, nothing over n_ctx.

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
        isinstance(text_or_tokens, Sequence) and text_or_tokens and isinstance(text_or_tokens[0], int)
    ):
        tokens = torch.as_tensor(text_or_tokens)
        if tokens.is_floating_point() or tokens.is_complex():
            raise ValueError(f"Token ids must be integers, got dtype {tokens.dtype}.")
        tokens = tokens.long()
        if tokens.ndim == 1:
            tokens = tokens.unsqueeze(0)
        if tokens.ndim != 2:
            raise ValueError(f"Tokens must be [pos] or [batch pos], got shape {tuple(tokens.shape)}.")
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
            f"Expected a string, a list of strings or token ids, got {type(text_or_tokens).__name__}."
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
    if _compat.is_activation_cache(model_or_cache):
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
            return ResolvedInput(model, cache, None)
        toks = to_tokens(model, tokens, prepend_bos=prepend_bos, truncate=truncate)
        return ResolvedInput(model, cache, toks)
    model = model_or_cache
    if not hasattr(model, "run_with_hooks") or not hasattr(model, "cfg"):
        raise TypeError(
            f"Expected a TransformerLens model or an ActivationCache, got {type(model).__name__}."
        )
    if tokens is None:
        raise ValueError("Pass the text or tokens to analyse.")
    ensure_eval(model)
    return ResolvedInput(model, None, to_tokens(model, tokens, prepend_bos=prepend_bos, truncate=truncate))


def check_layers(layers: Sequence[int] | None, n_max: int, what: str = "layer") -> list[int]:
    """Validate layer indices against ``range(n_max)``; negative indices count from the end."""
    if layers is None:
        return list(range(n_max))
    out = []
    for layer in layers:
        if not isinstance(layer, (int,)) and not (isinstance(layer, torch.Tensor) and layer.ndim == 0):
            raise TypeError(f"{what} indices must be integers, got {layer!r}.")
        i = int(layer)
        if not -n_max <= i < n_max:
            raise ValueError(f"{what} {i} is out of range: valid {what}s are 0..{n_max - 1}.")
        out.append(i % n_max)
    return out
