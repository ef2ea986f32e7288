"""The ``tlmicroscope`` command.

Each analysis package contributes its subcommands through a module with
``register(subparsers)`` listed in ``_COMMAND_MODULES``; ``main`` turns the errors tlmicroscope
raises for bad input into one clear line and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main", "add_model_args", "load_from_args", "log", "read_text_arg"]

DEFAULT_TEXT = "The capital of France is"

# Modules with ``register(subparsers)``; each analysis package adds its own line.
_COMMAND_MODULES = ["tlmicroscope.lenses._cli", "tlmicroscope._serve_cli", "tlmicroscope.geometry._latent_cli",
                    "tlmicroscope.lenses._tuned_cli"]
_COMMAND_MODULES.append("tlmicroscope.geometry._cli")
_COMMAND_MODULES.append("tlmicroscope.causal._cli")
_COMMAND_MODULES.append("tlmicroscope.microscope._cli")
_COMMAND_MODULES.append("tlmicroscope.lenses._bench_cli")


def log(msg: str) -> None:
    print(f"[tlmicroscope] {msg}", file=sys.stderr, flush=True)


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The options every model-facing command shares."""
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded 'smollm2-135m' or 'gemma3-270m', a local .gguf or HF folder, "
                   "or a TransformerLens name")
    p.add_argument("--kind", default="auto", choices=["auto", "bridge", "hooked"],
                   help="TransformerBridge or HookedTransformer (TransformerLens 3 only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-ctx", type=int, default=2048, help="longest accepted input, in tokens")
    p.add_argument("--process-weights", action="store_true",
                   help="apply fold_ln and centring (changes residual geometry; off by default)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def load_from_args(args: argparse.Namespace) -> Any:
    import torch

    from tlmicroscope.models import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log(f"loading {args.model} ...")
    model = load_model(args.model, kind=args.kind, device=args.device, n_ctx=args.n_ctx,
                       process_weights=args.process_weights)
    log(f"loaded {type(model).__name__} with {model.cfg.n_layers} layers in {time.perf_counter() - t0:.1f} s")
    return model


def read_text_arg(text: str | None, text_file: str | None) -> str:
    """The text argument or file, checked for emptiness before any model is loaded."""
    if text_file:
        text = Path(text_file).read_text(encoding="utf-8")
    if text is None:
        raise ValueError("Pass a text, or --text-file PATH.")
    if not text:
        raise ValueError("The text is empty: there is nothing to analyse. Pass at least one token of text.")
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
    for mod in _COMMAND_MODULES:
        importlib.import_module(mod).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except (ValueError, ImportError, FileNotFoundError, TypeError) as exc:
        if os.environ.get("TLMICROSCOPE_DEBUG"):
            raise
        print(f"tlmicroscope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"tlmicroscope {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
