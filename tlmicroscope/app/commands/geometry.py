"""Subcommands ``geometry`` (token geometry of one text) and ``geometry-sweep`` (of a corpus)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tlmicroscope.app.cli import add_model_args, load_from_args, log, read_text_arg


def _ints(text: str | None):
    return None if text is None else tuple(int(v) for v in text.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "geometry",
        help="intrinsic dimension, overlap and cosine of a text's token cloud per layer (HTML)",
    )
    p.add_argument(
        "text", nargs="?", default=None, help="the text (use hundreds of tokens: IDs need ~500+)"
    )
    p.add_argument("--text-file", default=None, help="read the text from a file instead")
    p.add_argument("--out", default="geometry.html", help="HTML file to write")
    p.add_argument("--csv", default=None, help="also write the per-layer table as CSV")
    p.add_argument(
        "--max-scale",
        type=int,
        default=None,
        help="largest GRIDE range scaling (default: up to 256)",
    )
    p.add_argument("--twonn-variant", default="base", choices=["base", "ml", "microscope"])
    p.add_argument(
        "--no-final-norm",
        action="store_true",
        help="keep the raw last residual (default: final norm, as HF)",
    )
    p.add_argument(
        "--truncate", action="store_true", help="keep the first n_ctx tokens of a long text"
    )
    add_model_args(p)
    p.set_defaults(func=_geometry)

    s = sub.add_parser(
        "geometry-sweep",
        help="token geometry of corpus windows at several shuffle levels (resumable JSONL)",
    )
    s.add_argument(
        "--corpus", default="embedded", help="'embedded', a .txt/.jsonl file or a folder"
    )
    s.add_argument("--out", required=True, help="JSONL file of results (resumed if it exists)")
    s.add_argument("--html", default=None, help="summary page (default: OUT with .html)")
    s.add_argument("--seq-len", type=int, default=1024, help="tokens per window (the paper: 1024)")
    s.add_argument("--n-windows", type=int, default=50)
    s.add_argument("--window-seed", type=int, default=0)
    s.add_argument(
        "--shuffle-levels", default=None, help="comma-separated S values (default 0..max)"
    )
    s.add_argument("--seeds", default="0", help="comma-separated shuffle seeds")
    s.add_argument("--max-scale", type=int, default=None)
    s.add_argument("--twonn-variant", default="base", choices=["base", "ml", "microscope"])
    s.add_argument("--no-final-norm", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    add_model_args(s)
    s.set_defaults(func=_sweep)


def _geometry(args: argparse.Namespace) -> int:
    from tlmicroscope.app.panels.token_geometry import token_geometry_section
    from tlmicroscope.geometry import layer_geometry
    from tlmicroscope.viz import HtmlPage

    text = read_text_arg(args.text, args.text_file)
    model = load_from_args(args)
    geo = layer_geometry(
        model,
        text,
        max_scale=args.max_scale,
        twonn_variant=args.twonn_variant,
        final_norm=not args.no_final_norm,
        truncate=args.truncate,
    )
    if args.csv:
        geo.to_dataframe().to_csv(args.csv, index=False)
    page = HtmlPage(title="Token geometry")
    section = token_geometry_section(geo)  # the report's token_geometry panel, drawn once
    page.add_section("Token geometry per layer", *section.items, caption=section.caption)
    out = page.save(args.out)
    log(
        f"{geo.n_tokens} tokens; ID (GRIDE n2=2) peaks at layer {geo.peak_layer()}; loss "
        f"{geo.loss:.3f} nats"
    )
    print(Path(out).resolve())
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from tlmicroscope.geometry import geometry_sweep, id_loss_correlation
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz.token_geometry import id_loss_correlation_figure, sweep_profile_figure

    model = load_from_args(args)
    sweep = geometry_sweep(
        model,
        args.corpus,
        out=args.out,
        seq_len=args.seq_len,
        n_windows=args.n_windows,
        window_seed=args.window_seed,
        shuffle_levels=_ints(args.shuffle_levels),
        seeds=_ints(args.seeds) or (0,),
        max_scale=args.max_scale,
        twonn_variant=args.twonn_variant,
        final_norm=not args.no_final_norm,
        progress=not args.no_progress,
    )
    page = HtmlPage(title="Token geometry sweep")
    cap = f"{len(sweep.records)} records from {args.out}"
    for metric, kw in (
        ("gride", {"scale": 2}),
        ("gride", {"scale": 8}),
        ("overlap", {"k": 2}),
        ("cosine", {}),
    ):
        page.add_section(
            f"Profile: {metric} {kw or ''}", sweep_profile_figure(sweep, metric, **kw), caption=cap
        )
    if len(sweep.select(0)) >= 3:
        corr = id_loss_correlation(sweep)
        page.add_section("ID-loss correlation", id_loss_correlation_figure(corr), caption=cap)
    for level in sweep.shuffle_levels:
        ids = sweep.metric("gride", level, scale=2)[:, 1:].mean(0)
        log(
            f"S={level}: mean ID peaks at layer {int(ids.argmax()) + 1} ({ids.max():.2f}); "
            f"mean loss {sweep.scalar('loss', level).mean():.3f}"
        )
    out = page.save(args.html or str(Path(args.out).with_suffix(".html")))
    print(Path(out).resolve())
    return 0
