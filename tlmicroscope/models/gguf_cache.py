"""Loading GGUF files fast: the dequantized weights cached as safetensors, the file parsed once.

transformers reads a GGUF file's metadata with ``gguf.GGUFReader``, which walks every element of
the vocabulary arrays in Python. For a 262k-token vocabulary (Gemma 3) that walk takes tens of
seconds, and one ``from_pretrained`` call does it twice (config, then weights) and the tokenizer
twice more. Within one load tlmicroscope shares one parse among these calls; after the first load
it reads a float32 safetensors copy of the dequantized weights (plus ``config.json``) instead,
keyed by the file's sha256 and the transformers version, so later loads take seconds.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.models.embedded import cache_dir, load_gguf_hf_model, load_gguf_tokenizer

__all__ = ["gguf_architecture", "gguf_file_key", "load_gguf_cached", "supported_gguf_architectures"]

_WEIGHTS = "model.safetensors"
_CHUNK = 4 << 20


def gguf_file_key(path: str | Path) -> str:
    """A short key for a file's content: the start of its sha256, remembered per path and mtime.

    The full hash (about a second for 250 MB) is computed once per path, size and modification
    time and kept under ``cache_dir() / "file-hashes"``; so the same file installed in two
    virtual environments shares one cache entry, and a rewritten file never reuses a stale one.

    Examples:
        >>> import hashlib, tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.gguf"
        >>> _ = p.write_bytes(b"GGUF" * 10)
        >>> gguf_file_key(p) == hashlib.sha256(b"GGUF" * 10).hexdigest()[:16]
        True
    """
    path = Path(path)
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    memo = cache_dir() / "file-hashes" / hashlib.sha256(stamp).hexdigest()[:24]
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    key = h.hexdigest()[:16]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hash-", dir=memo.parent)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        os.replace(tmp, memo)
    except OSError:  # a read-only cache only costs the hash next time
        pass
    return key


def _weights_dir(path: Path) -> Path:
    import transformers

    # Dequantization and name mapping belong to transformers; a new version re-converts.
    return (
        cache_dir() / "weights" / f"{path.stem}-{gguf_file_key(path)}-tf{transformers.__version__}"
    )


@contextlib.contextmanager
def _parse_once(path: Path) -> Iterator[None]:
    """Within the block, every metadata read of ``path`` by transformers reuses the first parse."""
    import gguf
    import transformers.modeling_gguf_pytorch_utils as mgu

    real_reader = getattr(gguf, "GGUFReader", None)
    real_load = getattr(mgu, "load_gguf_checkpoint", None)
    if real_reader is None or real_load is None:  # another transformers layout: parse as it does
        yield
        return
    readers: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    target = str(path.resolve())

    def reader(p, *args, **kwargs):
        key = str(Path(p).resolve())
        if key != target or args or kwargs:
            return real_reader(p, *args, **kwargs)
        if key not in readers:
            readers[key] = real_reader(p)
        return readers[key]

    def load(p, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs or str(Path(p).resolve()) != target:
            return real_load(p, return_tensors, *args, **kwargs)
        if "parsed" not in metadata:
            metadata["parsed"] = real_load(p, False)
        return copy.deepcopy(metadata["parsed"])  # callers pop and edit what they get

    gguf.GGUFReader, mgu.load_gguf_checkpoint = reader, load
    try:
        yield
    finally:
        gguf.GGUFReader, mgu.load_gguf_checkpoint = real_reader, real_load


def _save_weights(hf: Any, folder: Path) -> None:
    """Write ``hf``'s float32 weights and a plain config (no GGUF quantization entry) atomically."""
    from safetensors.torch import save_file

    state, seen = {}, set()
    for name, tensor in hf.state_dict().items():
        if tensor.data_ptr() in seen:  # tied unembedding: from_pretrained ties it again
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach().to(torch.float32).contiguous()
    config = copy.deepcopy(hf.config)
    config.__dict__.pop("quantization_config", None)
    config.architectures = [type(hf).__name__]
    tmp: Path | None = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".weights-", dir=folder.parent))
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / _WEIGHTS), metadata={"format": "pt"})
        os.replace(tmp, folder)  # atomic: readers see the whole folder or none
    except OSError:  # read-only cache, no space, or another process won the race
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _load_saved(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation="eager", local_files_only=True
    ).eval()


def load_gguf_cached(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The transformers model and tokenizer of a GGUF file, from tlmicroscope's caches when present.

    The first load parses the file once, dequantizes it through transformers and saves the float32
    weights and the converted tokenizer under ``cache_dir()``; later loads read those. The model's
    ``config.architectures`` is always set (a GGUF-loaded config has it empty).

    Examples:
        >>> from tlmicroscope.models import embedded_gguf_path
        >>> hf, tok = load_gguf_cached(embedded_gguf_path())  # doctest: +SKIP
        >>> hf.config.architectures  # doctest: +SKIP
        ['LlamaForCausalLM']
    """
    from tlmicroscope.models.embedded import _require_gguf

    _require_gguf()  # the pip command, before anything imports gguf
    path = Path(path)
    folder = _weights_dir(path)
    with _parse_once(path):
        tok = load_gguf_tokenizer(path)
        hf = None
        if (folder / _WEIGHTS).is_file():
            try:
                hf = _load_saved(folder, dtype)
            except Exception:
                shutil.rmtree(folder, ignore_errors=True)
        if hf is None:
            hf = load_gguf_hf_model(path, torch.float32)
            _save_weights(hf, folder)
            hf.config.__dict__.pop("quantization_config", None)
            hf = hf.to(dtype)
    if not getattr(hf.config, "architectures", None):
        hf.config.architectures = [type(hf).__name__]
    return hf, tok


_NOT_CAUSAL_LM = {"general", "tokenizer", "t5", "umt5"}
# GGUF value types: fixed sizes of the scalar ones (8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def supported_gguf_architectures() -> list[str]:
    """GGUF ``general.architecture`` values this transformers version dequantizes into a causal LM.

    Examples:
        >>> "llama" in supported_gguf_architectures() and "gemma3" in supported_gguf_architectures()
        True
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(set(GGUF_SUPPORTED_ARCHITECTURES) - _NOT_CAUSAL_LM)


def gguf_architecture(path: str | Path) -> str:
    """The ``general.architecture`` field of a GGUF file, read from the header without parsing the
    rest.

    ``gguf.GGUFReader`` would parse every vocabulary entry first (tens of seconds for 262k tokens);
    the architecture comes first in every file llama.cpp writes, so this stops as soon as it is
    found.

    Raises:
        ValueError: the file is not GGUF, or has no ``general.architecture`` field.

    Examples:
        >>> from tlmicroscope.models import embedded_gguf_path
        >>> gguf_architecture(embedded_gguf_path())  # doctest: +SKIP
        'llama'
    """
    import struct

    with Path(path).open("rb") as f:

        def read(fmt: str):
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path} ends inside its GGUF header.")
            return struct.unpack(fmt, data)[0]

        def read_str() -> bytes:
            return f.read(read("<Q"))

        def skip(vtype: int) -> None:
            if vtype == 8:
                f.seek(read("<Q"), os.SEEK_CUR)
            elif vtype == 9:
                itype, n = read("<I"), read("<Q")
                if itype in _SCALAR_SIZES:
                    f.seek(n * _SCALAR_SIZES[itype], os.SEEK_CUR)
                else:
                    for _ in range(n):
                        skip(itype)
            elif vtype in _SCALAR_SIZES:
                f.seek(_SCALAR_SIZES[vtype], os.SEEK_CUR)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}.")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (its first bytes are not 'GGUF').")
        read("<I")  # version
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key, vtype = read_str(), read("<I")
            if key == b"general.architecture" and vtype == 8:
                return read_str().decode("utf-8")
            skip(vtype)
    raise ValueError(f"{path} has no general.architecture field in its GGUF header.")
