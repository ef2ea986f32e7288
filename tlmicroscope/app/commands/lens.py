"""Subcommands: ``lens`` (trajectory views of a text), ``report`` and ``demo``."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlmicroscope.cli import DEFAULT_TEXT, add_model_args, load_from_args, log, read_text_arg


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

    r = sub.add_parser("report", help="the full HTML report of a text")
    r.add_argument("text", nargs="?", default=None)
    r.add_argument("--text-file", default=None)
    r.add_argument("--out", default="report.html")
    r.add_argument(
        "--lens", default=None, help="a saved tuned-lens folder to show beside the logit lens"
    )
    r.add_argument("--sections", default=None, help="comma-separated section names (default: all)")
    r.add_argument("--truncate", action="store_true")
    add_model_args(r)
    r.set_defaults(func=_report)

    d = sub.add_parser("demo", help="the report for a sample text on the embedded model")
    d.add_argument("--out", default="out/demo-report.html")
    d.add_argument("--text", default=DEFAULT_TEXT)
    d.add_argument("--lens", default=None)
    add_model_args(d)
    d.set_defaults(func=_demo)


def _load_lens(spec: str | None, model):
    """'logit', 'logit-paper', None, or a path to a saved lens (loaded through the lens registry)."""
    if spec in (None, "logit", "logit-paper"):
        return spec
    from tlmicroscope.lenses import load_lens

    return load_lens(spec, model)


def _lens(args: argparse.Namespace) -> int:
    from tlmicroscope.lenses import prediction_trajectory
    from tlmicroscope.viz import HtmlPage, logit_lens_table, trajectory_heatmap, trajectory_tokens

    text = read_text_arg(args.text if args.text is not None else DEFAULT_TEXT, args.text_file)
    model = load_from_args(args)
    lens = _load_lens(args.lens, model)
    traj = prediction_trajectory(model, text, lens=lens, top_k=args.top_k, truncate=args.truncate)
    page = HtmlPage(title=f"Lens view: {traj.provenance.lens}")
    cap = traj.provenance.describe()
    for stat in ("cross_entropy", "kl", "entropy", "target_rank", "max_prob"):
        page.add_section(f"Heatmap: {stat}", trajectory_heatmap(traj, stat), caption=cap)
    page.add_section("Logit-lens table", logit_lens_table(traj), caption=cap)
    page.add_section("Tokens by output cross-entropy", trajectory_tokens(traj), caption=cap)
    out = page.save(args.out)
    last = traj.top_strings[-1, 0, -1, 0]
    log(f"the model predicts {last!r} after the last token")
    print(Path(out).resolve())
    return 0


def _report(args: argparse.Namespace) -> int:
    from tlmicroscope.report import report

    text = read_text_arg(args.text, args.text_file)
    model = load_from_args(args)
    lens = _load_lens(args.lens, model)
    sections = args.sections.split(",") if args.sections else None
    rep = report(
        model,
        text,
        lens=lens if lens not in ("logit", "logit-paper") else None,
        sections=sections,
        truncate=args.truncate,
    )
    for name, secs in rep.seconds.items():
        state = "missing" if name in rep.missing else "failed" if name in rep.failed else "ok"
        log(f"section {name}: {state} ({secs:.1f} s)")
    out = rep.save(args.out)
    print(Path(out).resolve())
    return 0


def _demo(args: argparse.Namespace) -> int:
    args.text_file = None
    args.sections = None
    args.truncate = False
    if args.lens is None:  # a tuned lens trained with the default `train-lens` command, if any
        from tlmicroscope.lenses.train import default_lens_dir

        found = default_lens_dir(args.model)
        if (found / "config.json").is_file():
            log(f"showing the tuned lens in {found} beside the logit lens")
            args.lens = str(found)
    return _report(args)
