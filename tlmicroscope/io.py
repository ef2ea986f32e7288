"""Saving and loading fitted objects: safetensors plus a JSON config tied to the model.

Every fitted object (tuned lens, non-linearity reference maps, contextualization probe, causal
basis, anomaly detector) is a folder holding ``tensors.safetensors`` and ``config.json``. The
config records the kind of object, a format version, its settings and the fingerprint of the model
it belongs to; loading against another model is refused with the field that differs, before any
tensor is read. Folders and files are written atomically (a temporary sibling, then one atomic
swap), so an interrupted or failed save leaves the whole previous copy or the whole new one, and
the next save or load cleans up what a killed save left behind (``recover_dir``). Saved files get
the permissions the umask gives, so a lens saved in a shared folder can be read by the group.
Where each kind lives by default (the artifact store) is ``tlmicroscope.artifacts``.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.models import access

__all__ = [
    "FORMAT_VERSION",
    "FittedFileError",
    "ModelMismatchError",
    "atomic_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_fingerprint",
    "config_bool",
    "config_int",
    "json_type",
    "load_fitted",
    "model_fingerprint",
    "recover_dir",
    "save_fitted",
]

FORMAT_VERSION = 1
_TENSORS = "tensors.safetensors"
_CONFIG = "config.json"


class FittedFileError(ValueError):
    """A saved object is missing, truncated, corrupt, or of another kind."""


class ModelMismatchError(ValueError):
    """A saved object belongs to a different model."""


def check_model_shape(model: Any, what: str, fix: str, **expected: int) -> None:
    """Raise ``ModelMismatchError`` naming the first ``model.cfg`` field (e.g. ``d_model``) that
    differs from ``expected``; ``what`` names the object and ``fix`` says what to do instead."""
    for field, ours in expected.items():
        theirs = int(getattr(model.cfg, field))
        if theirs != ours:
            raise ModelMismatchError(
                f"This {what} was made for another model: {field} is {ours} for the lens but "
                f"{theirs} for this model ({fix})."
            )


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
    """The process's umask, read without changing it where Linux allows (``os.umask`` sets it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # the briefly set value is the usual one, never 0
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------ atomic saves
# Temporaries carry the writer's process id, so that a later save or load can tell the leftovers
# of a killed process (clean them up, or restore the previous copy from them) from a save still
# running in another process (leave it alone). Names: ``.NAME.tmp-PID-XXXX`` (a folder being
# filled, a file being written, or, after an exchange, the previous copy about to be deleted) and
# ``.NAME.old-PID-XXXX`` (the previous copy moved aside where the exchange is unavailable). The
# patterns without ``-XXXX`` / with ``.XXXXXXXX.tmp`` are the names older versions left behind.
_IN_FLIGHT: dict[str, int] = {}
_IN_FLIGHT_LOCK = threading.Lock()
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _leftover_pattern(name: str) -> re.Pattern:
    return re.compile(
        rf"^\.{re.escape(name)}\.(?:(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?|[A-Za-z0-9_]{{8}}\.tmp)$"
    )


def _flight_key(path: Path) -> str:
    return os.path.abspath(path)


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process (EPERM): alive
        return True
    return True


def _leftovers(path: Path, *, want_dir: bool, own_stale: bool) -> tuple[list[Path], list[Path]]:
    """Leftovers of ``path`` from processes no longer running: ``(old copies, temporaries)``.

    ``own_stale``: count this process's own leftovers as stale (no save of ``path`` runs here).
    """
    pattern = _leftover_pattern(path.name)
    old, tmp = [], []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return old, tmp
    for entry in entries:
        m = pattern.match(entry.name)
        if m is None:
            continue
        try:
            if entry.is_symlink() or entry.is_dir() != want_dir:
                continue
        except OSError:
            continue
        pid = m.group("pid")
        if pid is not None:
            pid = int(pid)
            # our own process: stale unless a save of this path is running in another thread
            if (not own_stale) if pid == os.getpid() else _pid_alive(pid):
                continue
        (old if m.group("kind") == "old" else tmp).append(Path(entry.path))
    return old, tmp


def _recover(path: Path, *, own_stale: bool) -> bool:
    old, tmp = _leftovers(path, want_dir=True, own_stale=own_stale)
    restored = False
    if old and not os.path.lexists(path):
        newest = max(old, key=lambda p: p.stat().st_mtime_ns)
        try:
            os.replace(newest, path)
        except OSError:
            pass
        else:
            old.remove(newest)
            restored = True
            warnings.warn(
                f"{path} was missing: a save was interrupted between moving the previous copy "
                f"aside and moving the new one in. The previous copy was restored from "
                f"{newest.name}.",
                UserWarning,
                stacklevel=3,
            )
    for leftover in old + tmp:
        shutil.rmtree(leftover, ignore_errors=True)
    if restored or old or tmp:
        _fsync_dir(path.parent)
    return restored


def recover_dir(path: str | os.PathLike) -> bool:
    """Finish what an interrupted ``atomic_dir`` save left behind next to ``path``.

    If ``path`` is missing and a previous copy was moved aside (``.NAME.old-PID...``) by a process
    that is no longer running, that copy is moved back. Temporaries of dead processes are deleted.
    ``atomic_dir`` and ``load_fitted`` call this first; saves still running elsewhere are left
    alone.

    Returns:
        True when a previous copy was restored (a ``UserWarning`` says so too).

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / ".lens.old-999999999").mkdir()  # a previous copy a killed save moved aside
        >>> (root / ".lens.old-999999999" / "config.json").write_text("{}")
        2
        >>> import warnings
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     recover_dir(root / "lens")
        True
        >>> sorted(p.name for p in root.iterdir()), (root / "lens" / "config.json").read_text()
        (['lens'], '{}')
    """
    path = Path(path)
    with _IN_FLIGHT_LOCK:
        own_stale = _IN_FLIGHT.get(_flight_key(path), 0) == 0
    try:
        return _recover(path, own_stale=own_stale)
    except OSError:  # a read-only or vanished folder: nothing can be repaired from here
        return False


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the system or the filesystem cannot (then the caller falls back to two
    renames); raises ``OSError`` for any other failure.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # no glibc 2.28+ renameat2
        return False
    renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, f"Cannot swap {a} and {b}: {os.strerror(err)}", str(b))


def _swap_in_two_steps(tmp: Path, path: Path) -> None:
    """Move ``path`` aside, ``tmp`` in, and on a failure move the previous copy back.

    A kill between the two renames leaves the previous copy in ``.NAME.old-PID-XXXX``, which the
    next save or load of ``path`` restores (``recover_dir``).
    """
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        try:
            os.replace(old, path)
        except OSError:
            pass  # recover_dir restores it on the next save or load
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _settle(folder: Path, umask: int) -> None:
    """Give every file the umask's permissions (some writers make 0600 files) and flush it."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            mode = os.stat(p).st_mode
            os.chmod(p, (0o777 if mode & 0o111 else 0o666) & ~umask)
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    The file gets the permissions the umask gives a new file. Temporaries that a killed writer
    left next to ``path`` are deleted.

    Examples:
        >>> import tempfile, pathlib
        >>> p = atomic_write_bytes(pathlib.Path(tempfile.mkdtemp()) / "a.bin", b"123")
        >>> p.read_bytes()
        b'123'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for group in _leftovers(path, want_dir=False, own_stale=False):
        for leftover in group:
            leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
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

    At every moment ``path`` is the whole previous folder or the whole new one: on Linux the two
    are exchanged in one step (``renameat2(RENAME_EXCHANGE)``). Elsewhere, and on filesystems
    without the exchange, the previous folder is moved aside and the new one in; a failure between
    the two moves puts the previous folder back, and a kill between them leaves it in
    ``.NAME.old-PID-XXXX``, which the next save or load restores (``recover_dir``). If ``fill``
    raises (a full disk, an interrupt), the previous folder is untouched. Files get the
    permissions the umask gives (whatever mode ``fill``'s writers chose) and are flushed to disk.

    Examples:
        >>> import tempfile, pathlib
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = atomic_dir(root / "obj", lambda tmp: (tmp / "a.txt").write_text("one"))
        >>> _ = atomic_dir(root / "obj", lambda tmp: (tmp / "a.txt").write_text("two"))
        >>> (root / "obj" / "a.txt").read_text(), sorted(p.name for p in root.iterdir())
        ('two', ['obj'])
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(path) and not path.is_dir():
        raise FileExistsError(
            f"{path} exists and is not a folder; remove it or save to another path."
        )
    key = _flight_key(path)
    with _IN_FLIGHT_LOCK:
        own_stale = _IN_FLIGHT.get(key, 0) == 0
        _IN_FLIGHT[key] = _IN_FLIGHT.get(key, 0) + 1
    try:
        try:
            _recover(path, own_stale=own_stale)
        except OSError:
            pass
        umask = _umask()
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
        try:
            os.chmod(tmp, 0o777 & ~umask)
            fill(tmp)
            _settle(tmp, umask)
            if not os.path.lexists(path):
                os.replace(tmp, path)
            elif _exchange(tmp, path):
                _fsync_dir(path.parent)
            else:
                _swap_in_two_steps(tmp, path)
        finally:
            shutil.rmtree(
                tmp, ignore_errors=True
            )  # the unused new folder, or the swapped-out old one
    finally:
        with _IN_FLIGHT_LOCK:
            _IN_FLIGHT[key] -= 1
            if not _IN_FLIGHT[key]:
                del _IN_FLIGHT[key]
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
        "name": access.model_label(model),
        "d_model": int(cfg.d_model),
        "n_layers": int(cfg.n_layers),
        "d_vocab": int(cfg.d_vocab),
        "weights_processed": access.weights_processed(model),
        "unembed_sha256": _unembed_hash(model.W_U),
    }


_FIELD_HINTS = {
    "weights_processed": "load the model with the same process_weights setting",
    "unembed_sha256": "the unembedding weights differ: this is another model or another checkpoint",
}


def check_fingerprint(saved: Mapping[str, Any], model: Any, *, what: str = "This object") -> None:
    """Raise ``ModelMismatchError`` naming the first field where ``model`` and ``saved`` differ."""
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
        "model": dict(fingerprint)
        if fingerprint is not None
        else (model_fingerprint(model) if model is not None else None),
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
        ``(tensors, meta)`` where ``meta`` has ``kind``, ``format_version``, ``model`` and
        ``config``.

    Raises:
        FittedFileError: a missing folder or file, a truncated or corrupt file, another kind.
        ModelMismatchError: ``model`` is not the model the object was saved for.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    recover_dir(path)  # a save killed half-way: restore the previous copy, drop its temporaries
    if not path.is_dir():
        raise FittedFileError(
            f"No saved {kind} at {path} (expected a folder with {_CONFIG} and {_TENSORS})."
        )
    cfg_path, tensor_path = path / _CONFIG, path / _TENSORS
    for p in (cfg_path, tensor_path):
        if not p.is_file():
            raise FittedFileError(f"{path} is incomplete: {p.name} is missing.")
    try:
        meta = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FittedFileError(
            f"{cfg_path} is not valid JSON ({exc}); the file is corrupt."
        ) from exc
    if not isinstance(meta, dict):
        raise FittedFileError(
            f"{cfg_path} holds a JSON {json_type(meta)}, not an object; the file is corrupt or "
            "not a tlmicroscope config."
        )
    if meta.get("kind") != kind:
        raise FittedFileError(f"{path} holds a {meta.get('kind')!r}, not a {kind!r}.")
    version = _config_int(meta, "format_version", cfg_path, minimum=0, default=0)
    if version > FORMAT_VERSION:
        raise FittedFileError(
            f"{path} was written by a newer tlmicroscope (format {version}); upgrade."
        )
    for key in ("model", "config"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise FittedFileError(
                f"{cfg_path}: field {key!r} must be a JSON object, got "
                f"{json_type(meta[key])}; the file is corrupt."
            )
    if model is not None and meta.get(
        "model"
    ):  # before reading any tensor: a wrong model costs nothing
        check_fingerprint(meta["model"], model, what=f"The {kind} at {path}")
    try:
        tensors = load_file(str(tensor_path), device=str(device) if device is not None else "cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FittedFileError(f"{tensor_path} is truncated or corrupt: {exc}") from exc
    return tensors, meta


# ------------------------------------------------------------------------- config fields
def json_type(value: Any) -> str:
    """The JSON name of a config value's type, for messages about a wrong field.

    Examples:
        >>> json_type({}), json_type(3), json_type(None)
        ('object', 'integer', 'null')
    """
    names = {
        dict: "object",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


_MISSING = object()


def config_int(
    cfg: Mapping[str, Any],
    key: str,
    file: Any,
    *,
    minimum: int = 1,
    maximum: int | None = None,
    default: Any = _MISSING,
) -> int:
    """``cfg[key]`` as an int, refused with the file and the field unless it is a JSON integer
    (not a boolean, a fraction or a string) in ``minimum..maximum``."""
    if key not in cfg:
        if default is not _MISSING:
            return default
        raise FittedFileError(f"{file}: field {key!r} is missing.")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FittedFileError(
            f"{file}: field {key!r} must be an integer, got {json_type(value)} {value!r}; the "
            "file is corrupt or was edited by hand."
        )
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f"{minimum}..{maximum}" if maximum is not None else f"at least {minimum}"
        raise FittedFileError(f"{file}: field {key!r} is {value}, outside {bounds}.")
    return value


def config_bool(cfg: Mapping[str, Any], key: str, file: Any, *, default: bool) -> bool:
    """``cfg[key]`` as a bool, refused with the file and the field unless it is a JSON boolean
    (``"false"`` is a non-empty string, which Python's ``bool`` reads as True)."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise FittedFileError(
            f"{file}: field {key!r} must be true or false, got {json_type(value)} {value!r}."
        )
    return value


_config_int, _config_bool = config_int, config_bool  # the names the loaders first used
