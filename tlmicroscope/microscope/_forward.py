"""Running a model over corpus windows with hooks on the residual stream, layer by layer.

Shared by the corpus-level fits (linearity scores, the non-linearity reference, the
contextualization probe's features): each residual state h^l is handed to a callback as the
forward pass makes it, and the pass stops right after the last state needed (the unembedding,
about a fifth of a small model's forward cost, is never computed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from tlmicroscope.capture import stream
from tlmicroscope.corpus import CorpusSource, token_stream

__all__ = ["StopForward", "corpus_windows", "str_tokens_of", "stream_residual"]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every needed activation has been seen.

    ``run_with_hooks`` removes its hooks in ``finally`` on both model classes, so nothing stays
    attached."""


def corpus_windows(
    model: Any,
    corpus: CorpusSource | torch.Tensor,
    *,
    n_tokens: int,
    seq_len: int,
    seed: int = 0,
    what: str = "this fit",
    min_tokens: int | None = None,
) -> torch.Tensor:
    """Fixed-length ``[n seq_len]`` token windows holding about ``n_tokens`` tokens.

    ``corpus`` is a corpus source (``None``/``"embedded"``, a file, a folder, an iterable of texts)
    or token ids ``[n seq]`` used as given. Windows are drawn at random (seeded) from the whole
    stream, so a sample covers the corpus rather than its first documents.

    Raises:
        ValueError: the corpus holds fewer than ``min_tokens`` tokens (the message gives both).
    """
    if isinstance(corpus, torch.Tensor):
        toks = corpus.long()
        if toks.ndim == 1:
            toks = toks.unsqueeze(0)
        if toks.ndim != 2 or toks.numel() == 0:
            raise ValueError(
                f"Corpus token ids must be a non-empty [n seq] tensor, got {tuple(toks.shape)}."
            )
        if toks.shape[1] > model.cfg.n_ctx:
            raise ValueError(
                f"Corpus windows of {toks.shape[1]} tokens exceed the model's context of "
                f"{model.cfg.n_ctx}."
            )
        if min_tokens is not None and toks.numel() < min_tokens:
            raise ValueError(
                f"{what} needs at least {min_tokens} tokens but the corpus has {toks.numel()}. "
                "Pass a larger corpus."
            )
        return toks
    seq_len = int(min(seq_len, model.cfg.n_ctx))
    stream = token_stream(model, corpus)  # tokenized once (the embedded corpus is cached)
    total = int(stream.numel())
    if min_tokens is not None and total < min_tokens:
        raise ValueError(
            f"{what} needs at least {min_tokens} tokens but the corpus has only {total}. "
            "Pass a larger corpus (a folder of text files, a JSONL file, or the embedded corpus)."
        )
    if total == 0:
        raise ValueError("The corpus holds no tokens.")
    seq_len = min(seq_len, total)
    n_windows = max(1, min(total // seq_len, -(-int(n_tokens) // seq_len)))
    # the same windows as token_windows(model, corpus, seq_len=, n_windows=, shuffle=True, seed=)
    windows = stream.unfold(0, seq_len, seq_len)
    order = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    return windows[order[:n_windows]].contiguous()


def stream_residual(
    model: Any,
    windows: torch.Tensor,
    on_state: Callable[[int, torch.Tensor], None],
    *,
    layers: Sequence[int],
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "forward",
) -> None:
    """Call ``on_state(layer, h)`` for each requested residual index (0..n_layers) of each batch.

    ``h`` is ``[batch pos d_model]``, arriving in increasing layer order within a batch; the
    forward pass stops after the last requested state.
    """
    layers = sorted({int(x) for x in layers})
    last = layers[-1]

    def callback(site: str, layer: int | None, act: torch.Tensor) -> None:
        on_state(int(layer), act)
        if layer == last:
            raise StopForward

    n = windows.shape[0]
    bar = tqdm(total=int(windows.numel()), desc=desc, unit="tok", disable=not progress, leave=False)
    try:
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size]
            try:
                stream(model, batch, callback, sites=("resid",), layers=layers, return_logits=False)
            except StopForward:
                pass
            bar.update(int(batch.numel()))
    finally:
        bar.close()


def str_tokens_of(model: Any, toks: torch.Tensor) -> list[list[str]]:
    """Each row's token strings (ids as text when the model has no tokenizer)."""
    if getattr(model, "tokenizer", None) is None:
        return [[str(int(t)) for t in row] for row in toks]
    return [model.to_str_tokens(row) for row in toks]
