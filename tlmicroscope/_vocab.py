"""Readable strings for token ids, decoded once per tokenizer."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["vocab_strings", "token_strings"]

_TABLES: dict[int, tuple[Any, np.ndarray]] = {}


def vocab_strings(tokenizer: Any, d_vocab: int) -> np.ndarray:
    """``decode([i])`` for every id below ``d_vocab`` (ids the tokenizer lacks give ``"<i>"``)."""
    key = id(tokenizer)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is tokenizer and len(hit[1]) >= d_vocab:
        return hit[1]
    n_tok = len(tokenizer)
    decoded = tokenizer.batch_decode([[i] for i in range(min(n_tok, d_vocab))])
    table = np.array(decoded + [f"<{i}>" for i in range(n_tok, d_vocab)], dtype=object)
    _TABLES[key] = (tokenizer, table)
    return table


def token_strings(model: Any, ids: torch.Tensor) -> np.ndarray:
    """An object array of the same shape as ``ids`` holding each token's text."""
    tok = getattr(model, "tokenizer", None)
    flat = ids.detach().cpu().reshape(-1).numpy()
    if tok is None:
        out = np.array([f"<{i}>" for i in flat], dtype=object)
    else:
        out = vocab_strings(tok, int(model.cfg.d_vocab))[flat]
    return out.reshape(tuple(ids.shape))
