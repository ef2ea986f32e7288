"""The byte-level tokenizer of the tiny models: one token per UTF-8 byte, plus three specials.

Its own module because both the native tiny models (``tlmicroscope.models.tiny``) and the tiny
family models (``tlmicroscope.models.families``) use it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

from tlmicroscope.models.embedded import cache_dir

__all__ = ["TINY_VOCAB", "byte_tokenizer"]

_SPECIALS = ("<bos>", "<eos>", "<pad>")
TINY_VOCAB = 256 + len(_SPECIALS)


@lru_cache(maxsize=1)
def byte_tokenizer() -> Any:
    """A byte-level tokenizer: one token per UTF-8 byte, plus ``<bos>``, ``<eos>`` and ``<pad>``.

    TransformerLens reloads a tokenizer from its ``name_or_path`` to make a BOS-adding twin, so
    the tokenizer is saved once to the tlmicroscope cache folder and loaded from there.
    """
    from transformers import AutoTokenizer

    folder = cache_dir() / "tokenizers" / "tiny-byte-v2"
    if (folder / "tokenizer.json").is_file():
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            if _is_byte_tokenizer(tok):
                return tok
        except Exception:  # a damaged cache is rebuilt, never trusted (as the GGUF tokenizer's)
            pass
    if (
        folder.exists()
    ):  # damaged, or lacking tokenizer.json: move it aside in one step, then delete
        aside = folder.with_name(f".{folder.name}.damaged-{os.getpid()}")
        try:
            os.replace(folder, aside)
        except OSError:  # another process moved it first
            pass
        shutil.rmtree(aside, ignore_errors=True)
    _save_atomically(_build_byte_tokenizer(), folder)
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        problem = None if _is_byte_tokenizer(tok) else "it does not encode bytes as their values"
    except Exception as exc:
        problem = str(exc)
    if problem is not None:
        raise OSError(
            f"The tiny models' cached tokenizer at {folder} is damaged and could not be rebuilt "
            f"({problem}). Delete that folder, or point TLMICROSCOPE_CACHE at a writable folder."
        )
    return tok


def _is_byte_tokenizer(tok: Any) -> bool:
    """What a loaded cache must do: the whole vocabulary, one token per byte, ids = byte values."""
    sample = "Ab \u00e9\n"
    return len(tok) == TINY_VOCAB and tok(sample)["input_ids"] == list(sample.encode("utf-8"))


def _build_byte_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: byte for byte, ch in _byte_to_unicode().items()}  # token id == byte value
    for s in _SPECIALS:
        vocab[s] = len(vocab)
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    inner.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte, as the ByteLevel pre-tokenizer uses."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _save_atomically(tokenizer: Any, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=folder.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, folder)
    except OSError:  # another process saved it first
        shutil.rmtree(tmp, ignore_errors=True)
