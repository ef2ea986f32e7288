"""Saving and loading fitted objects: safetensors plus a JSON config tied to the model.

Every fitted object (tuned lens, non-linearity reference maps, contextualization probe, causal
basis, anomaly detector) is a folder holding ``tensors.safetensors`` and ``config.json``. The
config records the kind of object, a format version, its settings and the fingerprint of the model
it belongs to; loading against another model is refused with the field that differs. Folders and
files are written atomically (a temporary sibling, then ``os.replace``), so an interrupted or
failed save never destroys the previous copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.models import _compat

__all__ = [
    "FORMAT_VERSION",
    "FittedFileError",
    "ModelMismatchError",
    "atomic_write_text",
    "atomic_write_bytes",
    "atomic_dir",
    "model_fingerprint",
    "check_fingerprint",
    "save_fitted",
    "load_fitted",
]

FORMAT_VERSION = 1
_TENSORS = "tensors.safetensors"
_CONFIG = "config.json"


class FittedFileError(ValueError):
    """A saved object is missing, truncated, corrupt, or of another kind."""


class ModelMismatchError(ValueError):
    """A saved object belongs to a different model."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder with ``fill(tmp)`` in a temporary sibling, then swap it in place of ``path``.

    If ``fill`` raises (a full disk, an interrupt), the previous folder is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        for child in tmp.iterdir():
            with open(child, "rb") as f:
                os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return path


def _unembed_hash(W_U: torch.Tensor) -> str:
    data = W_U.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies a model for a saved object: name, sizes, processing and a hash of ``W_U``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> fp = model_fingerprint(tiny_model(n_layers=2))
        >>> fp["n_layers"], fp["d_model"], fp["d_vocab"], len(fp["unembed_sha256"])
        (2, 32, 259, 64)
    """
    cfg = model.cfg
    return {
        "name": _compat.model_label(model),
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "d_vocab": int(cfg.d_vocab),
        "weights_processed": _compat.weights_processed(model),
        "unembed_sha256": _unembed_hash(model.W_U),
    }


_FIELD_HINTS = {
    "weights_processed": "load the model with the same process_weights setting",
    "unembed_sha256": "the unembedding weights differ: this is another model or another checkpoint",
}


def check_fingerprint(saved: Mapping[str, Any], model: Any, *, what: str = "This object") -> None:
    """Raise ``ModelMismatchError`` naming the first field where ``model`` differs from ``saved``."""
    current = model_fingerprint(model)
    for key in ("d_model", "n_layers", "d_vocab", "weights_processed", "unembed_sha256", "name"):
        if key not in saved:
            continue
        if saved[key] != current[key]:
            if key == "name" and saved.get("unembed_sha256") == current["unembed_sha256"]:
                continue  # same weights under another label (e.g. a local copy): accept
            hint = _FIELD_HINTS.get(key, "use the model it was made for")
            raise ModelMismatchError(
                f"{what} was saved for another model: {key} is {saved[key]!r} in the file but "
                f"{current[key]!r} for this model ({hint})."
            )


def save_fitted(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    config: Mapping[str, Any],
    model: Any | None = None,
    fingerprint: Mapping[str, Any] | None = None,
) -> Path:
    """Save a fitted object atomically as ``path/tensors.safetensors`` + ``path/config.json``."""
    from safetensors.torch import save_file

    meta = {
        "kind": kind,
        "format_version": FORMAT_VERSION,
        "model": dict(fingerprint) if fingerprint is not None else (model_fingerprint(model) if model is not None else None),
        "config": dict(config),
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def fill(tmp: Path) -> None:
        save_file(flat, str(tmp / _TENSORS), metadata={"kind": kind})
        (tmp / _CONFIG).write_text(text)

    return atomic_dir(path, fill)


def load_fitted(
    path: str | os.PathLike, *, kind: str, model: Any | None = None, device: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load what ``save_fitted`` wrote; check its kind, integrity and (given a model) its model.

    Returns:
        ``(tensors, meta)`` where ``meta`` has ``kind``, ``format_version``, ``model`` and ``config``.

    Raises:
        FittedFileError: a missing folder or file, a truncated or corrupt file, another kind.
        ModelMismatchError: ``model`` is not the model the object was saved for.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise FittedFileError(f"No saved {kind} at {path} (expected a folder with {_CONFIG} and {_TENSORS}).")
    cfg_path, tensor_path = path / _CONFIG, path / _TENSORS
    for p in (cfg_path, tensor_path):
        if not p.is_file():
            raise FittedFileError(f"{path} is incomplete: {p.name} is missing.")
    try:
        meta = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FittedFileError(f"{cfg_path} is not valid JSON ({exc}); the file is corrupt.") from exc
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise FittedFileError(f"{path} holds a {found!r}, not a {kind!r}.")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise FittedFileError(
            f"{path} was written by a newer tlmicroscope (format {meta['format_version']}); upgrade."
        )
    try:
        tensors = load_file(str(tensor_path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FittedFileError(f"{tensor_path} is truncated or corrupt: {exc}") from exc
    if model is not None and meta.get("model"):
        check_fingerprint(meta["model"], model, what=f"The {kind} at {path}")
    return tensors, meta
