"""The artifact store: one place and one naming rule for every fitted object.

Fitted objects (tuned and Jacobian lenses, the non-linearity reference, the contextualization
probe, the causal basis, the injection detector, the latent PCA) cost minutes to hours to make, so
they live in one root that is not a cache folder::

    $TLMICROSCOPE_HOME (default ~/.local/share/tlmicroscope)/
        <model key>/                 e.g. smollm2-135m, smollm2-135m-processed
            tuned-lens/              config.json + tensors (one folder per fitted object)
            nonlinearity-reference/
            causal-basis/            (a variant, e.g. the lens it was extracted through:
            causal-basis.tuned/       ``artifact_path("causal-basis", model, variant="tuned")``)
            ...

``$TLMICROSCOPE_CACHE`` stays the cache of converted weights and tokenizers; deleting it costs a
re-conversion, deleting the store costs the fits. The folder of a model is ``model_key(model)``:
its name (the embedded models by their short names) and whether its weights were processed, the
two fields of ``tlmicroscope.io.model_fingerprint`` that decide whether a fitted object fits it.

Every fitted class follows one contract (``Fitted``): settings in ``__init__``, then
``fit(model, corpus=None, *, ...) -> self``, ``save(path=None) -> Path`` (``None``: the store) and
``Cls.load(path, model)`` (``path=None``: the store). The registry below maps each ``kind`` to its
class (imported only when needed, so this module imports no analysis package) and to the command
that makes it.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = [
    "KINDS",
    "ArtifactRecord",
    "Fitted",
    "MissingArtifactError",
    "artifact_class",
    "artifact_path",
    "find_artifact",
    "fit_artifact",
    "home",
    "is_quick",
    "list_artifacts",
    "load_artifact",
    "load_path",
    "make_command",
    "model_key",
    "save_path",
]

_CONFIG = "config.json"


# --------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Kind:
    cls: str  # "module:Class", imported on first use
    command: str  # the command that makes it; {model} is filled in by make_command


_REGISTRY: dict[str, _Kind] = {
    "tuned-lens": _Kind("tlmicroscope.lenses.tuned:TunedLens", "tlmicroscope train-lens {model}"),
    "jacobian-lens": _Kind(
        "tlmicroscope.lenses.jacobian:JacobianLens", "tlmicroscope fit-jlens {model}"
    ),
    "nonlinearity-reference": _Kind(
        "tlmicroscope.microscope.nonlinearity:NonlinearityReference",
        "tlmicroscope microscope-fit {model}",
    ),
    "contextualization-probe": _Kind(
        "tlmicroscope.microscope.contextualization:ContextualizationProbe",
        "tlmicroscope microscope-train-probe {model}",
    ),
    "causal-basis": _Kind(
        "tlmicroscope.causal.basis:CausalBasis",
        "python -m tlmicroscope.artifacts fit causal-basis {model}",
    ),
    "injection-detector": _Kind(
        "tlmicroscope.causal.detector:InjectionDetector",
        "python -m tlmicroscope.artifacts fit injection-detector {model}",
    ),
    "latent-pca": _Kind(
        "tlmicroscope.geometry.projection:LatentPCA",
        "python -m tlmicroscope.artifacts fit latent-pca {model}",
    ),
}

#: The kinds of fitted object the store knows, in the order ``list_artifacts`` reports them.
KINDS: tuple[str, ...] = tuple(_REGISTRY)


def _check_kind(kind: str) -> _Kind:
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown artifact kind {kind!r}; the kinds are: {', '.join(KINDS)}."
        ) from None


def artifact_class(kind: str) -> type:
    """The class that fits, saves and loads ``kind`` (imported now, not when this module loads).

    Examples:
        >>> artifact_class("latent-pca").__name__
        'LatentPCA'
    """
    module, _, name = _check_kind(kind).cls.partition(":")
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------------------------- contract
@runtime_checkable
class Fitted(Protocol):
    """What every fitted class offers (checked for each kind by ``tests/test_artifacts.py``).

    - ``Cls(**settings)``: settings only; shapes come from the model at ``fit``.
    - ``fit(model, corpus=None, *, n_tokens=..., batch_size=..., seed=..., progress=True,
      quick=False) -> self``: the shared settings carry these names in every class that has them
      (a given one overrides the setting of that name); ``quick=True`` applies ``Cls.QUICK``
      first and records the fit as quick.
    - ``save(path=None) -> Path``: ``None`` saves to ``artifact_path(kind, model)``; atomic, with
      the model's fingerprint and ``quick`` in ``config.json``.
    - ``Cls.load(path, model) -> Cls``: ``path=None`` loads from the store; refuses another model
      with the field that differs and what to do.
    """

    kind: ClassVar[str]
    quick: bool

    def fit(self, model: Any, corpus: Any = None, **settings: Any) -> Any: ...

    def save(self, path: Any = None) -> Path: ...

    @classmethod
    def load(cls, path: Any, model: Any) -> Any: ...


# ---------------------------------------------------------------------------------- places
def home() -> Path:
    """The store's root: ``$TLMICROSCOPE_HOME``, else ``~/.local/share/tlmicroscope``
    (``$XDG_DATA_HOME/tlmicroscope`` where that is set).

    Examples:
        >>> home().is_absolute() or "TLMICROSCOPE_HOME" in os.environ
        True
    """
    root = os.environ.get("TLMICROSCOPE_HOME")
    if root:
        return Path(root).expanduser()
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(data) / "tlmicroscope"


def _short_name(name: str) -> str:
    """A folder name: the embedded models by their short names, others by their last path part."""
    from tlmicroscope.models.embedded import EMBEDDED_HF_NAME, EMBEDDED_NAMES
    from tlmicroscope.models.gemma import GEMMA_HF_NAME, GEMMA_NAMES

    if name == EMBEDDED_HF_NAME or name.lower() in EMBEDDED_NAMES:
        return EMBEDDED_NAMES[0]
    if name == GEMMA_HF_NAME or name.lower() in GEMMA_NAMES:
        return GEMMA_NAMES[0]
    slug = re.sub(r"[^a-z0-9._-]+", "-", Path(str(name)).name.lower()).strip("-.")
    return slug[:80] or "model"


def model_key(model: Any, *, processed: bool | None = None) -> str:
    """The store's folder name for a model: its name, plus ``-processed`` when its weights were
    processed (``fold_ln`` and centring change what a fitted object learns).

    Args:
        model: A loaded model; a model name as ``load_model`` takes it (then ``processed`` says
            how it would be loaded; default: unprocessed, ``load_model``'s default); or the
            fingerprint a fitted object saved (``tlmicroscope.io.model_fingerprint``).
        processed: Override whether the weights count as processed.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model_key(tiny_model(n_layers=2))
        'tiny-llama-l2-d32-s0'
        >>> model_key("HuggingFaceTB/SmolLM2-135M-Instruct"), model_key("smollm2", processed=True)
        ('smollm2-135m', 'smollm2-135m-processed')
    """
    name, was_processed = _name_and_processing(model)
    if processed is not None:
        was_processed = bool(processed)
    return _short_name(name) + ("-processed" if was_processed else "")


def _name_and_processing(model: Any) -> tuple[str, bool]:
    if isinstance(model, (str, os.PathLike)):
        return os.fspath(model), False
    if isinstance(model, Mapping):  # a saved fingerprint
        return str(model.get("name") or "model"), bool(model.get("weights_processed"))
    from tlmicroscope.models import access

    return access.model_label(model), access.weights_processed(model)


def _folder(kind: str, variant: str | None) -> str:
    if variant is None:
        return kind
    v = re.sub(r"[^a-z0-9_-]+", "-", str(variant).lower()).strip("-")
    if not v:
        raise ValueError(f"variant {variant!r} has no letters or digits; give a plain name.")
    return f"{kind}.{v}"


def artifact_path(
    kind: str, model: Any, *, variant: str | None = None, processed: bool | None = None
) -> Path:
    """Where ``kind`` for ``model`` lives: ``home() / model_key(model) / kind``.

    ``variant`` names one of several objects of a kind (e.g. the lens a causal basis was extracted
    through): ``home() / model_key(model) / "kind.variant"``. ``processed`` is passed to
    ``model_key`` (for a model given by name, e.g. a command's ``--process-weights``).

    Examples:
        >>> artifact_path("tuned-lens", "smollm2-135m").relative_to(home()).as_posix()
        'smollm2-135m/tuned-lens'
        >>> artifact_path("causal-basis", "smollm2-135m", variant="tuned").name
        'causal-basis.tuned'
    """
    _check_kind(kind)
    return home() / model_key(model, processed=processed) / _folder(kind, variant)


def find_artifact(kind: str, model: Any, *, variant: str | None = None) -> Path | None:
    """``artifact_path(kind, model)`` if something is saved there, else ``None``.

    Examples:
        >>> find_artifact("latent-pca", "no-such-model") is None
        True
    """
    from tlmicroscope.io import recover_dir

    path = artifact_path(kind, model, variant=variant)
    recover_dir(path)  # a save killed half-way: the previous copy comes back
    return path if (path / _CONFIG).is_file() or _is_reference_lens(path) else None


def _is_reference_lens(path: Path) -> bool:
    return (path / "params.pt").is_file()


def _model_arg(model: Any) -> str:
    """The ``--model`` argument of the commands that make an artifact for ``model``."""
    name, processed = _name_and_processing(model)
    short = _short_name(name)
    from tlmicroscope.models.embedded import EMBEDDED_NAMES
    from tlmicroscope.models.gemma import GEMMA_NAMES

    arg = short if short in (EMBEDDED_NAMES[0], GEMMA_NAMES[0]) else name
    out = f"--model {shlex.quote(arg)}"
    return out + (" --process-weights" if processed else "")


def make_command(kind: str, model: Any) -> str:
    """The shell command that fits ``kind`` for ``model`` into the store (full settings).

    Examples:
        >>> make_command("tuned-lens", "smollm2-135m")
        'tlmicroscope train-lens --model smollm2-135m'
        >>> make_command("latent-pca", "gemma-3-270m")
        'python -m tlmicroscope.artifacts fit latent-pca --model gemma3-270m'
    """
    return _check_kind(kind).command.format(model=_model_arg(model))


class MissingArtifactError(FileNotFoundError):
    """Nothing of a kind is saved for a model; the message says where it looked, what makes it."""

    def __init__(self, kind: str, path: Path, command: str):
        self.kind, self.path, self.command = kind, path, command
        super().__init__(
            f"No {kind} is saved for this model: looked in {path}. Make one with: {command} "
            f"(or point TLMICROSCOPE_HOME at the store that holds it)."
        )


def load_artifact(kind: str, model: Any, *, variant: str | None = None) -> Any:
    """Load ``kind`` for ``model`` from the store, checked against the model.

    Raises:
        MissingArtifactError: nothing saved there (a ``FileNotFoundError``); the message names the
            folder and the command that makes it.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> try:
        ...     load_artifact("latent-pca", tiny_model(n_layers=2))
        ... except MissingArtifactError as e:
        ...     print(e.command)
        python -m tlmicroscope.artifacts fit latent-pca --model tiny-llama-L2-d32-s0
    """
    path = find_artifact(kind, model, variant=variant)
    if path is None:
        raise MissingArtifactError(
            kind, artifact_path(kind, model, variant=variant), make_command(kind, model)
        )
    return artifact_class(kind).load(path, model)


def save_path(kind: str, path: str | os.PathLike | None, fingerprint: Any) -> Path:
    """Where ``save(path)`` writes: ``path``, or for ``None`` the store's place for the model that
    ``fingerprint`` (a saved ``model_fingerprint``) names. Used by every fitted class's ``save``.

    Examples:
        >>> save_path("latent-pca", "here/pca", None).as_posix()
        'here/pca'
        >>> fp = {"name": "smollm2-135m", "weights_processed": True}
        >>> save_path("latent-pca", None, fp).relative_to(home()).as_posix()
        'smollm2-135m-processed/latent-pca'
    """
    if path is not None:
        return Path(path)
    if not fingerprint:
        raise ValueError(
            f"This {kind} is tied to no model (it was fitted on arrays, not on a model), so it has "
            "no default place in the store; pass a path: save(path)."
        )
    return artifact_path(kind, fingerprint)


def load_path(kind: str, path: str | os.PathLike | None, model: Any) -> Path:
    """Where ``Cls.load(path, model)`` reads: ``path``, or for ``None`` the store's place for
    ``model`` (``MissingArtifactError`` when nothing is saved there).

    Examples:
        >>> load_path("latent-pca", "there/pca", None).as_posix()
        'there/pca'
    """
    if path is not None:
        return Path(path)
    if model is None:
        raise ValueError(
            f"Cannot find a {kind} without a path or a model: pass load(path, model) or "
            "load(None, model) to read it from the artifact store."
        )
    found = find_artifact(kind, model)
    if found is None:
        raise MissingArtifactError(kind, artifact_path(kind, model), make_command(kind, model))
    return found


# ----------------------------------------------------------------------------------- quick
def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((Path(path) / _CONFIG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_quick(obj_or_path: Any) -> bool:
    """Whether a fitted object (or the folder it was saved in) was made with quick settings.

    A fit made with ``fit(..., quick=True)`` records ``"quick": true`` in its saved
    ``config.json``; a report uses this to say a section drew from a quick fit.

    Examples:
        >>> import tempfile, pathlib
        >>> from tlmicroscope.geometry.projection import LatentPCA
        >>> pca = LatentPCA(n_components=2)
        >>> is_quick(pca)
        False
        >>> pca.quick = True
        >>> is_quick(pca)
        True
        >>> is_quick(pathlib.Path(tempfile.mkdtemp()))  # no config.json: not a quick fit
        False
    """
    if isinstance(obj_or_path, (str, os.PathLike)):
        meta = _read_meta(Path(obj_or_path))
        config = meta.get("config")
        in_config = isinstance(config, dict) and config.get("quick") is True
        return meta.get("quick") is True or in_config
    return bool(getattr(obj_or_path, "quick", False))


# ---------------------------------------------------------------------------------- listing
@dataclass(frozen=True)
class ArtifactRecord:
    """One fitted object in the store.

    Attributes:
        kind: One of ``KINDS``; ``variant`` is the part after the dot in ``kind.variant`` folders.
        model_key: The model's folder (``model_key(model)``).
        path: The object's folder.
        size_bytes: Bytes of all its files.
        modified: When it was last written (UTC).
        quick: Made with quick settings (``is_quick``).
        make_command: The command that makes the full one.
    """

    kind: str
    model_key: str
    path: Path
    size_bytes: int
    modified: _dt.datetime
    quick: bool
    make_command: str
    variant: str | None = None


def _size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def _records(model_dir: Path) -> Iterator[ArtifactRecord]:
    for entry in sorted(model_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue  # temporaries of a save in flight
        kind, _, variant = entry.name.partition(".")
        if kind not in _REGISTRY:
            continue
        if not ((entry / _CONFIG).is_file() or _is_reference_lens(entry)):
            continue
        mtime = max(
            (p.stat().st_mtime for p in entry.iterdir() if p.is_file()),
            default=entry.stat().st_mtime,
        )
        yield ArtifactRecord(
            kind=kind,
            model_key=model_dir.name,
            path=entry,
            size_bytes=_size(entry),
            modified=_dt.datetime.fromtimestamp(mtime, tz=_dt.timezone.utc),
            quick=is_quick(entry),
            make_command=_check_kind(kind).command.format(model=_model_arg_from_key(model_dir)),
            variant=variant or None,
        )


def _model_arg_from_key(model_dir: Path) -> str:
    key = model_dir.name
    processed = key.endswith("-processed")
    name = key.removesuffix("-processed") if processed else key
    return f"--model {shlex.quote(name)}" + (" --process-weights" if processed else "")


def list_artifacts(model: Any = None) -> list[ArtifactRecord]:
    """What the store holds: for ``model`` (a model or a name), or for every model.

    Records come sorted by model key, then in the order of ``KINDS``.

    Examples:
        >>> [r.kind for r in list_artifacts("no-such-model")]
        []
    """
    root = home()
    if not root.is_dir():
        return []
    if model is not None:
        dirs = [root / model_key(model)]
    else:
        dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    order = {k: i for i, k in enumerate(KINDS)}
    out: list[ArtifactRecord] = []
    for d in dirs:
        if d.is_dir():
            out.extend(sorted(_records(d), key=lambda r: (order[r.kind], r.variant or "")))
    return out


# ------------------------------------------------------------------------------------- fit
def fit_artifact(
    kind: str,
    model: Any,
    corpus: Any = None,
    *,
    quick: bool = False,
    path: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    **fit_kwargs: Any,
) -> Any:
    """Fit ``kind`` for ``model`` with its class's defaults (or ``settings``) and save it.

    Args:
        kind: One of ``KINDS``.
        model: The model.
        corpus: Passed to ``fit`` (``None``: the class's default, usually the embedded corpus).
        quick: Fit with the class's quick settings and record ``quick: true``.
        path: Where to save (``None``: ``artifact_path(kind, model)``).
        settings: Keyword arguments for the class's constructor.
        **fit_kwargs: Passed to ``fit`` (``n_tokens``, ``batch_size``, ``seed``, ``progress``, ...).

    Returns:
        The fitted object, already saved.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> import tempfile
        >>> pca = fit_artifact("latent-pca", tiny_model(n_layers=2), quick=True,
        ...                    path=tempfile.mkdtemp() + "/pca", progress=False)
        >>> pca.quick, pca.components_.shape[0]
        (True, 2)
    """
    obj = artifact_class(kind)(**(settings or {}))
    obj.fit(model, corpus, quick=quick, **fit_kwargs)
    obj.save(path)
    return obj


# ------------------------------------------------------------------------------------ CLI
def _main(argv: list[str] | None = None) -> int:
    """``python -m tlmicroscope.artifacts list|fit``: the store from a shell."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m tlmicroscope.artifacts", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="what the store holds")
    ls.add_argument("--model", default=None)
    f = sub.add_parser("fit", help="fit one kind into the store")
    f.add_argument("kind", choices=KINDS)
    f.add_argument("--model", default="smollm2-135m")
    f.add_argument("--process-weights", action="store_true")
    f.add_argument("--quick", action="store_true", help="quick settings (recorded as quick)")
    f.add_argument("--out", default=None, help="folder (default: the store)")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for r in list_artifacts(args.model):
            flag = "quick" if r.quick else "full"
            print(
                f"{r.model_key}\t{r.path.name}\t{r.size_bytes}\t{r.modified:%Y-%m-%d %H:%M}\t{flag}"
            )
        return 0
    from tlmicroscope.models import load_model

    model = load_model(args.model, process_weights=args.process_weights)
    obj = fit_artifact(args.kind, model, quick=args.quick, path=args.out)
    print(
        f"saved {args.kind} to {args.out or artifact_path(args.kind, model)} ({type(obj).__name__})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
