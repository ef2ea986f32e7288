"""Subcommand ``serve``: the local interactive dashboard."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local interactive dashboard (needs the 'dashboard' extra)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind; the default keeps it on this machine",
    )
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--models",
        default=None,
        help="comma-separated model names offered in the menu (default: those available offline)",
    )
    p.add_argument(
        "--model-dir",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder whose .gguf files and Hugging Face folders may be typed as the model "
        "(repeatable; default none: only the menu's models load)",
    )
    p.add_argument(
        "--lens-dir",
        action="append",
        default=[],
        metavar="FOLDER",
        help="a folder under which saved lenses may be typed (repeatable; default none)",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tlmicroscope.app.cli import log
    from tlmicroscope.app.dashboard import _folders, host_warning, serve

    models = [m for m in args.models.split(",") if m] if args.models else None
    model_dirs, lens_dirs = _folders(args.model_dir, "model"), _folders(args.lens_dir, "lens")
    warning = host_warning(args.host)
    if warning:
        log(f"warning: {warning}")
    log(f"dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)")
    serve(args.host, args.port, models, model_dirs=model_dirs, lens_dirs=lens_dirs, warn_host=False)
    return 0
