"""Subcommands: ``report`` (the full page of a text), ``demo`` and ``artifacts``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tlmicroscope.app.cli import add_model_args, load_from_args, log, read_text_arg, write_report
from tlmicroscope.app.prerequisites import load_lens_arg


def register(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("report", help="the full HTML report of a text")
    r.add_argument("text", nargs="?", default=None)
    r.add_argument("--text-file", default=None)
    r.add_argument("--out", default="report.html")
    r.add_argument(
        "--lens",
        default=None,
        help="a saved lens folder to show beside the logit lens (default: the artifact store's "
        "tuned lens, if one is fitted; 'logit' for none)",
    )
    r.add_argument("--sections", default=None, help="comma-separated section names (default: all)")
    r.add_argument("--truncate", action="store_true")
    add_model_args(r)
    r.set_defaults(func=_report)

    d = sub.add_parser(
        "demo",
        help="the report of a shipped text with every default section drawn, fitting quick "
        "versions of what is missing into the artifact store",
    )
    d.add_argument("--out", default="out/demo-report.html")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--budget", type=float, default=600.0, help="seconds allowed for the quick fits")
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    d.set_defaults(func=_demo)

    a = sub.add_parser(
        "artifacts", help="what is fitted for a model in the artifact store, and what is missing"
    )
    add_model_args(a)
    a.set_defaults(func=_artifacts, model=None)  # no --model: every model in the store


def _report(args: argparse.Namespace) -> int:
    from tlmicroscope import artifacts
    from tlmicroscope.app.report import report

    text = read_text_arg(args.text, args.text_file)
    model = load_from_args(args)
    spec = args.lens
    if spec is None:  # a tuned lens fitted into the artifact store is shown by default
        spec = artifacts.find_artifact("tuned-lens", model)
        if spec is not None:
            log(f"showing the tuned lens in {spec} beside the logit lens (--lens logit: none)")
    lens = load_lens_arg(spec, model)
    sections = args.sections.split(",") if args.sections else None
    rep = report(
        model,
        text,
        lens=lens if lens not in ("logit", "logit-paper") else None,
        sections=sections,
        truncate=args.truncate,
    )
    return write_report(rep, args.out)


def _demo(args: argparse.Namespace) -> int:
    import torch

    from tlmicroscope.app.demo import run_demo

    if args.budget <= 0:
        raise ValueError(f"--budget must be a positive number of seconds, got {args.budget}.")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(
                f"--threads must be a positive number of CPU threads, got {args.threads}."
            )
        torch.set_num_threads(args.threads)
    out = run_demo(args.model, out=args.out, budget_s=args.budget, progress=True)
    print(Path(out).resolve())
    return 0


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def artifacts_table(model: Any = None) -> str:
    """The ``tlmicroscope artifacts`` listing: what the store holds (and, for a model, what not).

    Examples:
        >>> print(artifacts_table("no-such-model-here").splitlines()[0])  # doctest: +ELLIPSIS
        Artifact store: ...
    """
    from tlmicroscope import artifacts

    records = artifacts.list_artifacts(model)
    lines = [f"Artifact store: {artifacts.home()}"]
    if model is not None:
        lines.append(f"Model key: {artifacts.model_key(model)}")
    for rec in records:
        when = rec.modified.strftime("%Y-%m-%d %H:%M")
        fit = "quick" if rec.quick else "full"
        kind = rec.kind + (f" ({rec.variant})" if rec.variant else "")
        lines.append(f"  {kind:<28} {fit:<5} {_human_size(rec.size_bytes):>9}  {when}  {rec.path}")
        if rec.quick:
            lines.append(f"  {'':<28} full fit: {rec.make_command}")
    if not records:
        lines.append("  (nothing fitted" + (" for this model)" if model else ")"))
    if model is not None:
        have = {r.kind for r in records}
        missing = [k for k in artifacts.KINDS if k not in have]
        if missing:
            lines.append("Missing (the command that makes each):")
            lines += [f"  {k:<28} {artifacts.make_command(k, model)}" for k in missing]
    return "\n".join(lines)


def _artifacts(args: argparse.Namespace) -> int:
    # The model is loaded (seconds) so that its key is exact: name and processed weights.
    model = load_from_args(args) if args.model is not None else None
    print(artifacts_table(model))
    return 0
