"""Block shuffling of a prompt's tokens (The Geometry of Tokens, Algorithm 1).

Shuffle index S splits the N tokens into K = 4^S equal blocks and permutes the blocks; tokens keep
their order inside a block. S = 0 is the original text; with N = 1024, S = 5 permutes single tokens
(block sizes 1024, 256, 64, 16, 4, 1). The reference code draws from numpy's unseeded global
generator; here the generator or seed is explicit, so shuffles are reproducible.

When K does not divide N the rule is ``remainder="truncate"`` (the default): the prompt is cut to
its first K * floor(N / K) tokens, so every block has the same size, as the paper's equal blocks
require. ``remainder="error"`` refuses instead. A level with more blocks than tokens is refused.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["block_permutation", "max_shuffle_level", "shuffle_tokens"]


def max_shuffle_level(n_tokens: int) -> int:
    """The largest S with 4^S <= n_tokens (single-token blocks when n_tokens is a power of 4)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}.")
    return math.floor(math.log(n_tokens, 4) + 1e-12)


def _generator(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(seed)


def block_permutation(
    n_tokens: int, level: int, seed: Any = None, *, remainder: str = "truncate"
) -> np.ndarray:
    """Positions of the block-shuffled prompt: ``shuffled = tokens[perm]``.

    Args:
        n_tokens: Prompt length N.
        level: Shuffle index S (K = 4^S blocks).
        seed: An int, a ``numpy.random.Generator`` (advanced by one ``permutation(K)`` call), or
            ``None`` for fresh entropy.
        remainder: ``"truncate"`` (drop the last N mod K tokens) or ``"error"``.

    Examples:
        >>> block_permutation(8, 1, 0).tolist()
        [4, 5, 0, 1, 2, 3, 6, 7]
        >>> len(block_permutation(10, 1, 0))  # 4 blocks of 2; the last 2 tokens are dropped
        8
    """
    level = int(level)
    if level < 0:
        raise ValueError(f"The shuffle level must be >= 0, got {level}.")
    k = 4**level
    if k > n_tokens:
        raise ValueError(
            f"Shuffle level {level} needs {k} blocks but the prompt has only {n_tokens} tokens; "
            f"the largest level for {n_tokens} tokens is {max_shuffle_level(n_tokens)}."
        )
    size, rest = divmod(n_tokens, k)
    if rest and remainder == "error":
        raise ValueError(
            f"{k} blocks do not divide {n_tokens} tokens (remainder {rest}). Use a length that is "
            f"a multiple of {k}, or remainder='truncate' to drop the last {rest} tokens."
        )
    if remainder not in ("truncate", "error"):
        raise ValueError(f"remainder must be 'truncate' or 'error', got {remainder!r}.")
    rng = _generator(seed)
    order = rng.permutation(k) if k > 1 else np.zeros(1, dtype=np.int64)
    return (order[:, None] * size + np.arange(size)[None, :]).reshape(-1)


def shuffle_tokens(
    tokens,
    level: int,
    seed: Any = None,
    *,
    remainder: str = "truncate",
    return_permutation: bool = False,
):
    """Block-shuffle token ids with shuffle index ``level`` (S); see the module docstring.

    Args:
        tokens: ``[pos]`` or ``[batch pos]`` ids (tensor, numpy array or list). Rows of a batch
            get independent permutations, drawn in row order from one generator.
        level: S; K = 4^S blocks.
        seed: An int, a ``numpy.random.Generator``, or ``None``.
        remainder: What to do when K does not divide the length: ``"truncate"`` or ``"error"``.
        return_permutation: Also return the positions used, ``[pos]`` or ``[batch pos]``.

    Examples:
        >>> shuffle_tokens(torch.arange(16), 1, seed=0).tolist()
        [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    """
    t = tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))
    if t.ndim not in (1, 2):
        raise ValueError(f"tokens must be [pos] or [batch pos], got shape {tuple(t.shape)}.")
    rows = t.unsqueeze(0) if t.ndim == 1 else t
    rng = _generator(seed)
    perms = [
        block_permutation(rows.shape[1], level, rng, remainder=remainder)
        for _ in range(rows.shape[0])
    ]
    perm = torch.as_tensor(np.stack(perms), dtype=torch.long, device=rows.device)
    out = rows.gather(1, perm)
    if t.ndim == 1:
        out, perm = out[0], perm[0]
    return (out, perm) if return_permutation else out
