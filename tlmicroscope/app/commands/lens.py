"""Subcommand ``lens``: what each layer predicts for a text (the ``lens`` preset of the report)."""

from __future__ import annotations

import argparse

from tlmicroscope.app.cli import (
    DEFAULT_TEXT,
    add_model_args,
    load_from_args,
    read_text_arg,
    render_preset,
)
from tlmicroscope.app.prerequisites import load_lens_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lens", help="what each layer predicts for a text (logit or tuned lens) as HTML"
    )
    p.add_argument("text", nargs="?", default=None, help="the text to analyse")
    p.add_argument("--text-file", default=None, help="read the text from a file instead")
    p.add_argument("--out", default="lens.html", help="HTML file to write")
    p.add_argument(
        "--lens",
        default="logit",
        help="'logit', 'logit-paper' (LLM-Microscope variant) or a saved tuned-lens folder",
    )
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument(
        "--truncate", action="store_true", help="keep the first n_ctx tokens of a long text"
    )
    add_model_args(p)
    p.set_defaults(func=_lens)


def _lens(args: argparse.Namespace) -> int:
    text = read_text_arg(args.text if args.text is not None else DEFAULT_TEXT, args.text_file)
    model = load_from_args(args)
    lens = load_lens_arg(args.lens, model)
    return render_preset(
        "lens",
        model,
        text,
        out=args.out,
        lens=None if lens == "logit" else lens,
        top_k=args.top_k,
        truncate=args.truncate,
    )
