"""Hidden states at one residual layer from tokens, a corpus, a text, a cache or given tensors."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from tlmicroscope.models import access

__all__ = ["check_lens_layer", "hidden_states", "residual_hook"]


def residual_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def check_lens_layer(model: Any, lens: Any, layer: Any) -> int:
    """A residual index with a lens translator: 0..n_layers-1 (negative counts from the end)."""
    n_layers = int(model.cfg.n_layers)
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer must be an integer, got {layer!r}.")
    if layer == n_layers:
        raise ValueError(
            f"Layer {n_layers} is the model's output, which has no lens translator; CBE and lens "
            f"ablations work on the block inputs 0..{n_layers - 1}."
        )
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} is out of range: lens layers are 0..{n_layers - 1}.")
    layer %= n_layers
    d = int(model.cfg.d_model)
    try:
        out = lens.transform(torch.zeros(1, d), layer)
    except (IndexError, KeyError) as exc:
        raise ValueError(
            f"The lens {getattr(lens, 'name', lens)!r} has no translator for layer {layer} "
            f"({exc}); train or load a lens covering that layer."
        ) from None
    if tuple(out.shape) != (1, d):
        raise ValueError(
            f"The lens maps width {d} to {tuple(out.shape)[-1]} at layer {layer}; it is for "
            "another model."
        )
    return layer


def _is_corpus(obj: Any) -> bool:
    if obj is None:
        return True
    if isinstance(obj, str):
        return obj == "embedded" or os.path.exists(os.path.expanduser(obj))
    return isinstance(obj, os.PathLike)


def hidden_states(
    model: Any,
    source: Any,
    layer: int,
    *,
    n_tokens: int = 2048,
    seq_len: int = 256,
    seed: int = 0,
    batch_size: int = 8,
) -> torch.Tensor:
    """``[N d_model]`` float32 rows of ``blocks.{layer}.hook_resid_pre``, from whatever ``source``
    is.

    ``source`` may be hidden states (a float tensor), token ids, a text, an ``ActivationCache``,
    or a corpus (``"embedded"``, a path, a list of texts: cut into ``seq_len`` windows, shuffled
    with ``seed``, up to ``n_tokens`` rows).
    """
    from tlmicroscope.capture import capture
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.inputs import check_cache, ensure_eval, to_tokens

    d = int(model.cfg.d_model)
    hook = residual_hook(layer)
    if isinstance(source, torch.Tensor) and source.is_floating_point():
        if source.shape[-1] != d:
            raise ValueError(
                f"The hidden states have width {source.shape[-1]} but the model's d_model is {d}; "
                "they come from another model."
            )
        h = source.detach().reshape(-1, d).float()
    elif access.is_activation_cache(source):
        check_cache(source)
        if hook not in source:
            raise ValueError(
                f"The ActivationCache lacks {hook}; run model.run_with_cache(tokens, "
                f"names_filter=[{hook!r}])."
            )
        h = source[hook].detach().reshape(-1, d).float()
    else:
        ensure_eval(model)
        if (
            isinstance(source, torch.Tensor)
            or (isinstance(source, (list, tuple)) and source and isinstance(source[0], int))
            or (isinstance(source, str) and not _is_corpus(source))
        ):
            toks = to_tokens(model, source)
        elif (
            isinstance(source, (list, tuple))
            and source
            and all(isinstance(t, list) for t in source)
        ):
            toks = to_tokens(model, torch.as_tensor(source))
        else:
            from tlmicroscope.corpus import token_stream

            seq_len = min(seq_len, int(model.cfg.n_ctx))
            stream = token_stream(model, source)
            if stream.numel() < 2:
                raise ValueError(
                    f"The corpus has {stream.numel()} tokens; at least 2 are needed (and thousands "
                    "for a stable mean). Pass more text."
                )
            available = stream.numel() // seq_len
            if available == 0:  # a small corpus: one window of all it has
                toks = stream[None]
            else:
                n_win = min(available, max(1, math.ceil(n_tokens / seq_len)))
                toks = token_windows(
                    model, source, seq_len=seq_len, n_windows=n_win, shuffle=True, seed=seed
                )
        rows = []
        for lo in range(0, toks.shape[0], batch_size):
            cap = capture(model, toks[lo : lo + batch_size], sites=("resid",), layers=[layer])
            rows.append(cap["resid"][0].reshape(-1, d).float())
        h = torch.cat(rows)
    if h.shape[0] == 0:
        raise ValueError("There are no hidden states: the input has no tokens.")
    if not torch.isfinite(h).all():
        raise ValueError(f"The hidden states at {hook} hold NaN or infinite values.")
    return h.cpu()
