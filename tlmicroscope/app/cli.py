"""The ``tlmicroscope`` command.

Each family's subcommands live in a module of ``tlmicroscope.app.commands`` with
``register(subparsers)``, listed in ``COMMAND_MODULES``; ``main`` checks the output path before
any work, and turns every error (bad input, unreadable or unwritable files, a model that does not
load) into one clear line and exit status 2; ``TLMICROSCOPE_DEBUG=1`` keeps the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "COMMAND_MODULES",
    "add_model_args",
    "check_output_path",
    "load_from_args",
    "log",
    "main",
    "read_text_arg",
    "render_preset",
    "write_report",
]

DEFAULT_TEXT = "The capital of France is"

# Modules with ``register(subparsers)``, in the order of the help text.
COMMAND_MODULES: tuple[str, ...] = (
    "tlmicroscope.app.commands.lens",
    "tlmicroscope.app.commands.report",
    "tlmicroscope.app.serve",
    "tlmicroscope.app.commands.latent",
    "tlmicroscope.app.commands.tuned",
    "tlmicroscope.app.commands.geometry",
    "tlmicroscope.app.commands.causal",
    "tlmicroscope.app.commands.microscope",
    "tlmicroscope.app.commands.bench",
)


def log(msg: str) -> None:
    print(f"[tlmicroscope] {msg}", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every model-facing command shares."""
    p.add_argument(
        "--model",
        default="smollm2-135m",
        help="embedded 'smollm2-135m' or 'gemma3-270m', a local .gguf or HF folder, "
        "or a TransformerLens name",
    )
    p.add_argument(
        "--kind",
        default="auto",
        choices=["auto", "bridge", "hooked"],
        help="TransformerBridge or HookedTransformer (TransformerLens 3 only)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-ctx", type=int, default=2048, help="longest accepted input, in tokens")
    p.add_argument(
        "--process-weights",
        action="store_true",
        help="apply fold_ln and centring (changes residual geometry; off by default)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def load_from_args(args: argparse.Namespace) -> Any:
    import torch

    from tlmicroscope.models import load_model

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive number of CPU threads, got {threads}.")
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    log(f"loading {args.model} ...")
    model = load_model(
        args.model,
        kind=args.kind,
        device=args.device,
        n_ctx=args.n_ctx,
        process_weights=args.process_weights,
    )
    log(
        f"loaded {type(model).__name__} with {model.cfg.n_layers} layers in "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return model


def read_text_arg(text: str | None, text_file: str | None) -> str:
    """The text argument or file, checked for emptiness before any model is loaded."""
    if text_file:
        text = Path(text_file).read_text(encoding="utf-8")
    if text is None:
        raise ValueError("Pass a text, or --text-file PATH.")
    if not text:
        raise ValueError(
            "The text is empty: there is nothing to analyse. Pass at least one token of text."
        )
    return text


def write_report(rep: Any, out: str | os.PathLike) -> int:
    """Log each section's state and time, save the page, print its path; the exit status (0).

    Examples:
        >>> import tempfile
        >>> from tlmicroscope.app import report
        >>> from tlmicroscope.models import tiny_model
        >>> rep = report(tiny_model(n_layers=1), "hello", sections="trajectory")
        >>> write_report(rep, tempfile.mkdtemp() + "/r.html")  # doctest: +ELLIPSIS
        /.../r.html
        0
    """
    for name, secs in rep.seconds.items():
        state = "missing" if name in rep.missing else "failed" if name in rep.failed else "ok"
        log(f"section {name}: {state} ({secs:.1f} s)")
    print(Path(rep.save(out)).resolve())
    return 0


def render_preset(
    name: str,
    model: Any,
    text: str,
    *,
    out: str | os.PathLike,
    lens: Any = None,
    intro: str | None = None,
    **settings: Any,
) -> int:
    """A family command's page: the preset ``name`` rendered by the report engine and saved.

    Examples:
        >>> import tempfile
        >>> from tlmicroscope.models import tiny_model
        >>> render_preset("lens", tiny_model(n_layers=1), "hello there",
        ...               out=tempfile.mkdtemp() + "/lens.html")  # doctest: +ELLIPSIS
        /.../lens.html
        0
    """
    from tlmicroscope.app.report import report
    from tlmicroscope.app.sections import PRESETS

    preset = PRESETS[name]
    rep = report(
        model,
        text,
        lens=lens,
        sections=list(preset.sections),
        title=preset.title,
        intro=intro,
        **{**preset.settings, **settings},
    )
    return write_report(rep, out)


# A command's ``--out`` names a folder when its help says "folder" (a fitted object: train-lens,
# microscope-fit, fit-jlens, ...); every other ``--out`` is one file. ``--out-dir`` is a folder.
_FOLDER_OUT: set[str] = set()


def check_output_path(
    path: str | os.PathLike, *, folder: bool = False, option: str = "--out"
) -> Path:
    """Refuse, before any work, an output path that cannot be written.

    A file output must not be an existing folder (and a folder output not an existing file), and
    the nearest existing folder above it must accept a new file (tried by creating and removing
    a temporary one, which also catches read-only file systems that permission bits do not show).

    Examples:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> check_output_path(d + "/new/page.html").name
        'page.html'
        >>> check_output_path(d)
        Traceback (most recent call last):
        ...
        ValueError: --out ... is a folder; give a file name inside it, e.g. .../out.html.
    """
    target = Path(os.path.expanduser(str(path)))
    if folder:
        if target.exists() and not target.is_dir():
            raise ValueError(
                f"{option} {target} is a file, but this command writes a folder there; "
                "give a folder path."
            )
    elif target.is_dir():
        raise ValueError(
            f"{option} {target} is a folder; give a file name inside it, "
            f"e.g. {target / 'out.html'}."
        )
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(
            f"{option} {target}: {parent} is a file, so no folder can be made under it."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".tlm-write-test-", dir=parent)
    except OSError as exc:
        raise ValueError(
            f"{option} {target} cannot be written: {parent} does not accept new files "
            f"({exc.strerror or exc}). Choose another path."
        ) from exc
    os.close(fd)
    os.unlink(probe)
    return target


def _check_outputs(args: argparse.Namespace) -> None:
    out = getattr(args, "out", None)
    if isinstance(out, (str, os.PathLike)) and str(out):
        check_output_path(out, folder=args.command in _FOLDER_OUT)
    out_dir = getattr(args, "out_dir", None)
    if isinstance(out_dir, (str, os.PathLike)) and str(out_dir):
        check_output_path(out_dir, folder=True, option="--out-dir")


def _one_line(exc: BaseException) -> str:
    """The exception's message on one line; its type where the message alone would be unclear."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    ours = (ValueError, TypeError, ImportError, FileNotFoundError)
    if not text:
        text = type(exc).__name__
    elif not isinstance(exc, ours):
        text = f"{type(exc).__name__}: {text}"
    if not isinstance(exc, ours + (OSError,)):
        text += " (TLMICROSCOPE_DEBUG=1 shows the traceback)"
    return text


def _build_parser() -> argparse.ArgumentParser:
    from tlmicroscope import __version__

    parser = argparse.ArgumentParser(
        prog="tlmicroscope",
        description="Look inside language models layer by layer, on TransformerLens. "
        "Runs offline on the embedded SmolLM2-135M by default.",
    )
    parser.add_argument("--version", action="version", version=f"tlmicroscope {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    for name, command in sub.choices.items():
        for action in command._actions:
            if "--out" in action.option_strings and "folder" in (action.help or ""):
                _FOLDER_OUT.add(name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        _check_outputs(args)
        return int(args.func(args) or 0)
    except Exception as exc:
        if os.environ.get("TLMICROSCOPE_DEBUG"):
            raise
        print(f"tlmicroscope {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlmicroscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
