"""Token windows for tuned-lens training and evaluation: a train/held-out split, a seeded order.

The corpus becomes one token stream (documents joined by EOS); its last ``holdout`` fraction is
held out, whatever the window length, so ``train-lens`` and ``eval-lens`` never share tokens. The
windows of a step depend only on the seed and the step number, which makes runs reproducible,
resumable, and the same for any number of processes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Int

from tlmicroscope.capture import capture
from tlmicroscope.corpus import CorpusSource, token_stream

__all__ = ["lens_token_windows"]


def _corpus_label(corpus: CorpusSource) -> str:
    if corpus is None or (isinstance(corpus, str) and corpus == "embedded"):
        return "embedded"
    if isinstance(corpus, (str, os.PathLike)):
        return str(Path(corpus).expanduser().resolve())
    return f"<{type(corpus).__name__}>"


def lens_token_windows(
    model: Any,
    corpus: CorpusSource = None,
    *,
    seq_len: int,
    split: Literal["train", "heldout", "all"] = "train",
    holdout: float = 0.1,
    text_field: str = "text",
) -> Int[torch.Tensor, "window seq_len"]:
    """Non-overlapping token windows from the training part or the held-out tail of a corpus.

    The corpus is tokenized into one stream (documents joined by EOS); its last ``holdout``
    fraction of tokens is the held-out split, the rest the training split, whatever ``seq_len``.
    Where the model prepends BOS to texts, each window starts with BOS.

    Raises:
        ValueError: ``seq_len`` over the model's context, or a split too small for one window.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=1)
        >>> # 10 bytes + EOS (257) = 11 tokens; the last 20% (2 tokens) are held out
        >>> lens_token_windows(model, ["abcdefghij"], seq_len=3, holdout=0.2).tolist()
        [[97, 98, 99], [100, 101, 102], [103, 104, 105]]
        >>> texts = ["abcdefghij"]
        >>> held = lens_token_windows(model, texts, seq_len=2, split="heldout", holdout=0.2)
        >>> held.tolist()
        [[106, 257]]
    """
    n_ctx = int(model.cfg.n_ctx)
    if seq_len > n_ctx:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {n_ctx} tokens; use at most "
            f"{n_ctx}."
        )
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    stream = token_stream(model, corpus, text_field=text_field)
    n_hold = 0 if split == "all" else round(stream.numel() * holdout)
    part = {
        "train": stream[: stream.numel() - n_hold],
        "heldout": stream[stream.numel() - n_hold :],
        "all": stream,
    }[split]
    tok = getattr(model, "tokenizer", None)
    bos = (
        getattr(tok, "bos_token_id", None)
        if getattr(model.cfg, "default_prepend_bos", False)
        else None
    )
    body = seq_len - (bos is not None)
    if body <= 0 or part.numel() < body:
        raise ValueError(
            f"The {split} split of the corpus ({_corpus_label(corpus)}) has {part.numel()} tokens, "
            f"fewer than one window of {seq_len}. Use a larger corpus, a shorter seq_len"
            + (" or a smaller holdout." if split != "all" else ".")
        )
    windows = part[: part.numel() // body * body].view(-1, body)
    if bos is not None:
        windows = torch.cat(
            [torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], 1
        )
    return windows.contiguous()


def _window_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _step_windows(n_windows: int, per_step: int, step: int, seed: int, cache: dict) -> list[int]:
    """Global window indices of ``step``: consecutive slices of a per-epoch permutation."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n_windows)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = _window_order(n_windows, seed, epoch)
        out.append(int(cache[epoch][pos]))
    return out


def _micro_batches(ids: list[int], per_batch: int) -> Iterator[list[int]]:
    for i in range(0, len(ids), per_batch):
        yield ids[i : i + per_batch]


def _forward(model: Any, toks: torch.Tensor, layers: list[int], logits: bool):
    """Residual stream ``[layer batch pos d]`` at residual indices ``layers``, and the logits."""
    with torch.inference_mode():
        cap = capture(model, toks, sites=("resid",), layers=layers, return_logits=logits)
    return cap["resid"], cap.logits


def _data_signature(corpus: CorpusSource, windows: torch.Tensor) -> dict[str, Any]:
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return {"corpus": _corpus_label(corpus), "n_windows": int(windows.shape[0]), "sha256": digest}
