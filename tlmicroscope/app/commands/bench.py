"""CLI commands of the lens bench and the Jacobian lens (``lens-bench``, ``fit-jlens``).

``tlmicroscope fit-jlens`` fits a Jacobian lens with TransformerLens's estimator over prompt
slices (resumable: run it again to continue, or with more ``--prompts`` to extend the fit) into
the artifact store's ``jacobian-lens`` folder for the model (``<store>/<model>/jacobian-lens/``,
``<model>-processed`` with ``--process-weights``); ``--curve`` then evaluates the merge of the
first 1, 2, ... slices on held-out tokens. ``tlmicroscope lens-bench`` compares the logit lens
with every saved lens it is given (by default the tuned and Jacobian lenses in the artifact store,
where present) and writes an HTML page and a JSON file.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tlmicroscope.app.cli import add_model_args, load_from_args, log


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``fit-jlens`` and ``lens-bench`` to the ``tlmicroscope`` parser."""
    f = sub.add_parser(
        "fit-jlens",
        help="fit a Jacobian lens (TransformerLens 4.x; resumable, over prompt slices)",
        description="Fit a Jacobian lens with TransformerLens's JacobianLens estimator: one "
        "forward and "
        "d_model/dim-batch backward passes per prompt. Slices of prompts are saved as they finish "
        "and merged; run the command again to resume.",
    )
    f.add_argument(
        "--corpus",
        default="embedded",
        help="'embedded' (pydoc topics), a .txt/.jsonl file or folder",
    )
    f.add_argument(
        "--out",
        default=None,
        help="output folder (default: the artifact store's jacobian-lens folder for the model)",
    )
    f.add_argument(
        "--prompts", type=int, default=32, help="number of prompts (windows of the training split)"
    )
    f.add_argument("--prompt-tokens", type=int, default=24, help="tokens per prompt")
    f.add_argument(
        "--skip-first", type=int, default=4, help="leading positions left out of the average"
    )
    f.add_argument("--dim-batch", type=int, default=32, help="output dimensions per backward pass")
    f.add_argument("--slice-size", type=int, default=4, help="prompts per saved slice")
    f.add_argument("--holdout", type=float, default=0.1, help="corpus tail never fitted on")
    f.add_argument("--fresh", action="store_true", help="discard saved slices and start over")
    f.add_argument(
        "--curve",
        action="store_true",
        help="afterwards, evaluate the merge of the first 1, 2, ... slices on held-out tokens",
    )
    f.add_argument("--curve-tokens", type=int, default=512)
    add_model_args(f)
    f.set_defaults(func=_fit_jlens)

    b = sub.add_parser(
        "lens-bench", help="compare lenses on the same held-out tokens (HTML + JSON)"
    )
    b.add_argument(
        "--lens",
        action="append",
        default=None,
        help="a saved lens folder or .pt, or 'logit'/'logit-paper' (repeatable; default: logit, "
        "plus the tuned and Jacobian lenses in the artifact store when present)",
    )
    b.add_argument("--corpus", default="embedded")
    b.add_argument("--tokens", type=int, default=2048)
    b.add_argument("--seq-len", type=int, default=128)
    b.add_argument("--holdout", type=float, default=0.1)
    b.add_argument("--depth-tokens", type=int, default=512)
    b.add_argument(
        "--cbe-layer",
        type=int,
        action="append",
        default=None,
        help="residual index for CBE + fidelity (repeatable; default the middle layer)",
    )
    b.add_argument("--cbe-k", type=int, default=4)
    b.add_argument("--cbe-tokens", type=int, default=256)
    b.add_argument("--cbe-max-iter", type=int, default=30)
    b.add_argument("--sra-samples", type=int, default=16)
    b.add_argument("--sra-every", type=int, default=1, help="stimulus-response on every n-th layer")
    b.add_argument(
        "--out",
        default=None,
        help="HTML page (default out/lens-bench-<model>.html; JSON beside it)",
    )
    add_model_args(b)
    b.set_defaults(func=_bench)


def _fit_jlens(args: argparse.Namespace) -> int:
    from tlmicroscope.lenses.jacobian import (
        default_jlens_dir,
        fit_jacobian_lens,
        require_jacobian_lens,
    )

    require_jacobian_lens("tlmicroscope fit-jlens")  # before loading a model for nothing
    model = load_from_args(args)
    out = (
        Path(args.out)
        if args.out
        else default_jlens_dir(args.model, processed=args.process_weights)
    )
    log(
        f"fitting a Jacobian lens on {args.prompts} prompts of {args.prompt_tokens} tokens into "
        f"{out}"
    )
    lens = fit_jacobian_lens(
        model,
        args.corpus,
        out_dir=out,
        n_prompts=args.prompts,
        seq_len=args.prompt_tokens,
        skip_first_positions=args.skip_first,
        chunk_size=args.dim_batch,
        slice_size=args.slice_size,
        holdout=args.holdout,
        resume=not args.fresh,
    )
    log(f"saved {lens.describe()} to {out}")
    if args.curve:
        from tlmicroscope.lenses.jacobian import prompt_curve

        curve = prompt_curve(
            model, out, corpus=args.corpus, tokens=args.curve_tokens, holdout=args.holdout
        )
        from tlmicroscope.io import atomic_write_text

        atomic_write_text(out / "curve.json", json.dumps(curve, indent=1))
        for row in curve:
            log(f"{row['n_prompts']:4d} prompts: mean held-out KL {row['mean_kl']:.4f} nats")
    return 0


def _default_lenses(model_name: str, processed: bool = False) -> list[str]:
    """``logit``, plus the store's tuned and Jacobian lenses of the model where they exist."""
    from tlmicroscope.lenses.jacobian import default_jlens_dir
    from tlmicroscope.lenses.train import default_lens_dir

    specs = ["logit"]
    folders = (
        default_lens_dir(model_name, processed=processed),
        default_jlens_dir(model_name, processed=processed),
    )
    for folder in folders:
        if (folder / "config.json").is_file():
            specs.append(str(folder))
    return specs


def _bench(args: argparse.Namespace) -> int:
    from tlmicroscope.lenses import load_lens
    from tlmicroscope.lenses.bench import lens_bench
    from tlmicroscope.viz.bench import lens_bench_page

    specs = args.lens or _default_lenses(args.model, args.process_weights)
    model = load_from_args(args)
    lenses = [s if s in ("logit", "logit-paper") else load_lens(s, model) for s in specs]
    L = int(model.cfg.n_layers)
    bench = lens_bench(
        model,
        lenses=lenses,
        corpus=args.corpus,
        n_tokens=args.tokens,
        seq_len=args.seq_len,
        holdout=args.holdout,
        depth_n_tokens=args.depth_tokens,
        cbe_layers=args.cbe_layer,
        cbe_k=args.cbe_k,
        cbe_n_tokens=args.cbe_tokens,
        cbe_max_iter=args.cbe_max_iter,
        sra_layers=list(range(0, L, max(1, args.sra_every))),
        sra_n_samples=args.sra_samples,
    )
    from tlmicroscope.artifacts import model_key
    from tlmicroscope.io import atomic_write_text

    # the store's model name (default_lens_dir's folder is now <store>/<model>/tuned-lens)
    slug = model_key(args.model, processed=args.process_weights)
    html = Path(args.out) if args.out else Path("out") / f"lens-bench-{slug}.html"
    atomic_write_text(html, lens_bench_page(bench).render())
    bench.save_json(html.with_suffix(".json"))
    print(bench.to_markdown())
    log(f"wrote {html} and {html.with_suffix('.json')}")
    return 0
