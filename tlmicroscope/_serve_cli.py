"""Subcommand ``serve``: the local interactive dashboard."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="a local interactive dashboard (needs the 'dashboard' extra)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; the default keeps it on this machine")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--models", default=None,
                   help="comma-separated model names offered in the menu (default: those available offline)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from tlmicroscope.cli import log
    from tlmicroscope.dashboard import serve

    models = [m for m in args.models.split(",") if m] if args.models else None
    log(f"dashboard on http://{args.host}:{args.port} (Ctrl-C stops it)")
    serve(args.host, args.port, models)
    return 0
