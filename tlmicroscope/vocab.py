"""Readable strings for token ids, decoded on demand and remembered per tokenizer.

``tlmicroscope.vocab`` is the token vocabulary's public home (it was the private
``tlmicroscope._vocab``, used by the lenses, the microscope, geometry and ``layers``):
``decode_ids(tokenizer, ids)`` gives the text of each id, ``token_strings(model, ids)`` an object
array of the text of an id tensor. ``layers.token_text`` and ``layers.str_tokens`` render tokens
the results' way on top of it.

Only the ids a result shows are decoded: a 262k-token vocabulary (Gemma 3) takes about 25 s to
decode whole, while the few hundred ids of a trajectory's top-k take milliseconds. Each
tokenizer keeps its own table of the ids decoded so far, held weakly (it goes with the
tokenizer) and emptied when the tokenizer's length changes (tokens added).
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["decode_ids", "token_strings"]


class _Table:
    """Decoded strings of one tokenizer, by id; ids at or past its length read ``"<i>"``."""

    def __init__(self, n_tok: int):
        self.n_tok = n_tok
        self.strings: dict[int, str] = {}


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG: dict[int, tuple[Any, _Table]] = {}  # tokenizers that cannot be weakly referenced


def _table(tokenizer: Any) -> _Table:
    n_tok = len(tokenizer)
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:
        hit = _STRONG.get(id(tokenizer))
        table = hit[1] if hit is not None and hit[0] is tokenizer else None
    if table is None or table.n_tok != n_tok:
        table = _Table(n_tok)
        try:
            _TABLES[tokenizer] = table
        except TypeError:
            _STRONG[id(tokenizer)] = (tokenizer, table)
    return table


def decode_ids(tokenizer: Any, ids: Any) -> list[str]:
    """``decode([i])`` for each id in ``ids``, decoding each distinct id at most once per tokenizer.

    Ids the tokenizer lacks (at or past ``len(tokenizer)``, e.g. padding rows of an unembedding)
    read ``"<i>"``.

    Examples:
        >>> from tlmicroscope.models.tiny import byte_tokenizer
        >>> decode_ids(byte_tokenizer(), [104, 105, 104, 9999])
        ['h', 'i', 'h', '<9999>']
    """
    flat = [int(i) for i in ids]
    table = _table(tokenizer)
    strings = table.strings
    missing = sorted({i for i in flat if i not in strings})
    if missing:
        known = [i for i in missing if 0 <= i < table.n_tok]
        if known:
            for i, s in zip(known, tokenizer.batch_decode([[i] for i in known])):
                strings[i] = s
        for i in missing:
            if not 0 <= i < table.n_tok:
                strings[i] = f"<{i}>"
    return [strings[i] for i in flat]


def token_strings(model: Any, ids: torch.Tensor) -> np.ndarray:
    """An object array of the same shape as ``ids`` holding each token's text (``"<id>"`` for
    every id when the model has no tokenizer).

    Examples:
        >>> import torch
        >>> from tlmicroscope.models import tiny_model
        >>> token_strings(tiny_model(n_layers=1), torch.tensor([[104, 105]])).tolist()
        [['h', 'i']]
    """
    tok = getattr(model, "tokenizer", None)
    arr = np.asarray(ids.detach().cpu() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
    flat = arr.reshape(-1)
    if tok is None:
        out = np.array([f"<{i}>" for i in flat], dtype=object)
    else:
        uniq, inverse = np.unique(flat, return_inverse=True)
        out = _objects(decode_ids(tok, uniq.tolist()))[inverse]
    return out.reshape(arr.shape)


def _objects(strings: list[str]) -> np.ndarray:
    out = np.empty(len(strings), dtype=object)
    out[:] = strings
    return out
