"""How the presentation layer finds what a section or command needs before it can draw.

One home for what the report sections and the family commands both need: the lens named on a
command line or in a setting, the folders of fitted objects (the non-linearity reference, the
contextualization probe, ...), and the command-line flags that load a model again (used in every
"run this to make it" hint).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from tlmicroscope import artifacts

__all__ = [
    "fit_command",
    "fitted_path",
    "load_fitted",
    "load_lens_arg",
    "model_cli_args",
    "model_flags",
    "quick_note",
]


def fitted_path(kind: str, model: Any, given: str | os.PathLike | None = None) -> Path:
    """Where a fitted object of ``kind`` is looked for: ``given``, else the artifact store.

    Examples:
        >>> fitted_path("nonlinearity-reference", None, "here/ref").as_posix()
        'here/ref'
    """
    if given:
        return Path(os.path.expanduser(str(given)))
    return artifacts.artifact_path(kind, model)


def load_fitted(
    kind: str, model: Any, given: str | os.PathLike | None = None
) -> tuple[Any | None, Path]:
    """A saved fitted object and its folder: ``given``, else the store's one for ``model``.

    Returns ``(None, folder)`` when the store holds none; a ``given`` folder with nothing in it
    is a ``FileNotFoundError`` naming the folder and the command that makes one.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> obj, where = load_fitted("nonlinearity-reference", tiny_model(n_layers=1))
        >>> obj is None, where.name
        (True, 'nonlinearity-reference')
    """
    path = fitted_path(kind, model, given)
    if given is None and artifacts.find_artifact(kind, model) is None:
        return None, path
    if given is not None and not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"No saved {kind} at {path}. Make one with: {fit_command(kind, model, path)}"
        )
    return artifacts.artifact_class(kind).load(path, model), path


def fit_command(kind: str, model: Any, out: str | os.PathLike | None = None) -> str:
    """The command that fits ``kind`` for ``model`` (into ``out`` when given, else the store).

    Examples:
        >>> fit_command("nonlinearity-reference", "smollm2-135m", "ref")
        'tlmicroscope microscope-fit --model smollm2-135m --out ref'
    """
    cmd = artifacts.make_command(kind, model)
    return cmd + (f" --out {shlex.quote(str(out))}" if out else "")


def quick_note(obj: Any, kind: str, model: Any) -> str:
    """A caption sentence when ``obj`` is a quick fit (with the full fit's command), else ``""``.

    Examples:
        >>> quick_note(object(), "tuned-lens", "smollm2-135m")
        ''
    """
    if obj is None or not artifacts.is_quick(obj):
        return ""
    return (
        f"This {kind} is a quick fit (fewer tokens and steps than the full one); "
        f"`{artifacts.make_command(kind, model)}` makes the full one. "
    )


def load_lens_arg(spec: Any, model: Any) -> Any:
    """A ``--lens`` value: ``None``, ``"logit"``, ``"logit-paper"`` as given; a path is loaded.

    Examples:
        >>> load_lens_arg("logit", None)
        'logit'
    """
    if spec in (None, "logit", "logit-paper"):
        return spec
    from tlmicroscope.lenses import load_lens

    return load_lens(spec, model)


def model_cli_args(model: Any) -> list[str]:
    """The ``--model`` (and ``--kind``, ``--process-weights``) options that load ``model`` again.

    The embedded models and the default tiny models go by their short names (the hub name would
    try to download), others by their label.

    Examples:
        >>> from tlmicroscope.models import load_model
        >>> model_cli_args(load_model("tiny-llama"))[:2]
        ['--model', 'tiny-llama']
    """
    from tlmicroscope.models import access
    from tlmicroscope.models.embedded import EMBEDDED_HF_NAME, EMBEDDED_NAMES
    from tlmicroscope.models.gemma import GEMMA_HF_NAME, GEMMA_NAMES
    from tlmicroscope.models.loading import TINY_NAMES

    label = access.model_label(model)
    name = label
    if label == EMBEDDED_HF_NAME or label.lower() in EMBEDDED_NAMES:
        name = EMBEDDED_NAMES[0]
    elif label == GEMMA_HF_NAME or label.lower() in GEMMA_NAMES:
        name = GEMMA_NAMES[0]
    else:
        for tiny in TINY_NAMES:
            if label == f"{tiny}-L3-d32-s0":  # what load_model(tiny) builds
                name = tiny
    args = ["--model", name, *access.cli_kind_args(model)]
    if access.weights_processed(model):
        args.append("--process-weights")
    return args


def model_flags(model: Any) -> str:
    """:func:`model_cli_args` as a string with a leading space, ``""`` for the default model.

    Examples:
        >>> from tlmicroscope.models import load_model
        >>> model_flags(load_model("tiny-llama"))
        ' --model tiny-llama'
    """
    from tlmicroscope.models import access
    from tlmicroscope.models.embedded import EMBEDDED_HF_NAME

    args = model_cli_args(model)
    if access.model_label(model) == EMBEDDED_HF_NAME:
        args = args[2:]  # the default --model
    return "".join(f" {shlex.quote(a)}" for a in args)


def require_umap() -> None:
    """Refuse, with the install command, when the optional umap-learn package is missing.

    Examples:
        >>> import sys
        >>> saved = sys.modules.get("umap")
        >>> sys.modules["umap"] = None  # as if not installed
        >>> try:
        ...     require_umap()
        ... except ImportError as exc:
        ...     print(str(exc).splitlines()[0])
        UMAP needs the optional umap-learn package, which is not installed. Install it with:
        >>> _ = sys.modules.pop("umap") if saved is None else sys.modules.update(umap=saved)
    """
    from tlmicroscope.geometry.projection import UMAP_INSTALL

    try:
        import umap  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "UMAP needs the optional umap-learn package, which is not installed. Install it "
            f"with:\n    {UMAP_INSTALL}\nor use PCA."
        ) from exc
