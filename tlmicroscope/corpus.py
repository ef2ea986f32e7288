"""Text for fitting and sweeps: the embedded corpus, text and JSONL files, datasets, fixed-length
tokens.

The embedded corpus is the standard library's ``pydoc_data.topics``: about 750 kB of Python
documentation prose (roughly 180k SmolLM2 tokens), present in every Python install, so lens
training, reference fits and sweeps run offline out of the box.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int

__all__ = [
    "CorpusSource",
    "embedded_documents",
    "read_texts",
    "text_windows",
    "token_stream",
    "token_windows",
]

CorpusSource = None | str | os.PathLike | Iterable[str] | Iterable[dict]


def embedded_documents() -> list[str]:
    """The embedded corpus as a list of documents (one per pydoc topic, in a fixed order)."""
    from pydoc_data import topics

    return [topics.topics[k].strip() for k in sorted(topics.topics) if topics.topics[k].strip()]


def _read_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from exc
                if isinstance(row, str):
                    yield row
                elif isinstance(row, dict) and text_field in row:
                    yield str(row[text_field])
                else:
                    raise ValueError(
                        f"{path}:{lineno} has no {text_field!r} field; pass text_field= to name it."
                    )
    else:
        yield path.read_text(encoding="utf-8", errors="replace")


def read_texts(source: CorpusSource = None, *, text_field: str = "text") -> Iterator[str]:
    """Yield documents from a corpus source.

    Args:
        source: ``None`` or ``"embedded"`` for the embedded corpus; a path to a ``.txt`` file (one
            document), a ``.jsonl`` file (one document per line, a string or an object with
            ``text_field``) or a folder of such files; or any iterable of strings or of dicts (a
            Hugging Face dataset, for instance).
        text_field: The field holding the text in JSONL rows and dataset records.

    Examples:
        >>> docs = list(read_texts())
        >>> len(docs) > 50 and all(isinstance(d, str) for d in docs)
        True
        >>> list(read_texts(["one", {"text": "two"}]))
        ['one', 'two']
    """
    if source is None or (isinstance(source, str) and source == "embedded"):
        yield from embedded_documents()
        return
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.is_dir():
            files = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in (".txt", ".jsonl", ".ndjson", ".md")
            )
            if not files:
                raise ValueError(f"The folder {path} holds no .txt, .md or .jsonl files.")
            for p in files:
                yield from _read_file(p, text_field)
            return
        if path.is_file():
            yield from _read_file(path, text_field)
            return
        raise FileNotFoundError(
            f"No corpus at {source!r}. Pass 'embedded', a .txt/.jsonl file, a folder, or an "
            "iterable of strings."
        )
    for item in source:
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            if text_field not in item:
                raise ValueError(f"A corpus record has no {text_field!r} field; pass text_field=.")
            yield str(item[text_field])
        else:
            raise TypeError(f"Corpus items must be strings or dicts, got {type(item).__name__}.")


def _tokenizer_of(model_or_tokenizer: Any) -> Any:
    tok = getattr(model_or_tokenizer, "tokenizer", None)
    if tok is None and hasattr(model_or_tokenizer, "encode"):
        tok = model_or_tokenizer
    if tok is None:
        raise ValueError("This model has no tokenizer; pass token ids instead of text.")
    return tok


@lru_cache(maxsize=4)
def _embedded_stream(tok_key: str, tok_ref: Any) -> torch.Tensor:
    return _encode_docs(tok_ref, embedded_documents())


def _encode_docs(tok: Any, docs: Iterable[str]) -> torch.Tensor:
    sep = tok.eos_token_id
    ids: list[int] = []
    for doc in docs:
        if not doc:
            continue
        ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
        if sep is not None:
            ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


def token_stream(
    model_or_tokenizer: Any, source: CorpusSource = None, *, text_field: str = "text"
) -> Int[torch.Tensor, " n_tokens"]:
    """All documents tokenized without special tokens and joined with the EOS token.

    The embedded corpus's stream is cached per tokenizer for the life of the process.
    """
    tok = _tokenizer_of(model_or_tokenizer)
    if source is None or source == "embedded":
        key = f"{getattr(tok, 'name_or_path', '')}|{len(tok)}|{type(tok).__name__}"
        return _embedded_stream(key, tok)
    return _encode_docs(tok, read_texts(source, text_field=text_field))


def token_windows(
    model_or_tokenizer: Any,
    source: CorpusSource = None,
    *,
    seq_len: int,
    n_windows: int | None = None,
    stride: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    text_field: str = "text",
) -> Int[torch.Tensor, "window seq_len"]:
    """Cut the token stream into fixed-length windows ``[n seq_len]``.

    Args:
        seq_len: Tokens per window; must not exceed the model's ``n_ctx`` when a model is given.
        n_windows: Keep this many windows (after shuffling); ``None`` keeps all.
        stride: Step between window starts (default ``seq_len``: non-overlapping).
        shuffle: Shuffle the window order with ``seed``.

    Raises:
        ValueError: ``seq_len`` over the context, or a corpus too small for one window (the
            message gives both token counts).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> w = token_windows(tiny_model(n_layers=1), ["abcdefgh"], seq_len=4)
        >>> w.tolist()
        [[97, 98, 99, 100], [101, 102, 103, 104]]
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}.")
    cfg = getattr(model_or_tokenizer, "cfg", None)
    if cfg is not None and seq_len > cfg.n_ctx:
        raise ValueError(
            f"seq_len={seq_len} is longer than the model's context of {cfg.n_ctx} tokens; use at "
            f"most {cfg.n_ctx}."
        )
    stream = token_stream(model_or_tokenizer, source, text_field=text_field)
    stride = stride or seq_len
    if stream.numel() < seq_len:
        raise ValueError(
            f"The corpus has {stream.numel()} tokens, fewer than one window of {seq_len}. "
            "Use a larger corpus or a shorter seq_len."
        )
    windows = stream.unfold(0, seq_len, stride)
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        windows = windows[torch.randperm(windows.shape[0], generator=g)]
    if n_windows is not None:
        if n_windows > windows.shape[0]:
            raise ValueError(
                f"Asked for {n_windows} windows of {seq_len} tokens but the corpus gives only "
                f"{windows.shape[0]} ({stream.numel()} tokens)."
            )
        windows = windows[:n_windows]
    return windows.contiguous()


def text_windows(
    model: Any, source: CorpusSource = None, *, seq_len: int, n_windows: int, seed: int = 0
) -> list[str]:
    """Decoded windows of the corpus, for analyses that take text."""
    tok = _tokenizer_of(model)
    windows = token_windows(
        model, source, seq_len=seq_len, n_windows=n_windows, shuffle=True, seed=seed
    )
    return [tok.decode(w) for w in windows]
