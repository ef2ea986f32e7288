"""Subcommands ``train-lens`` and ``eval-lens``.

``tlmicroscope train-lens`` trains a tuned lens (resumable, and under ``torchrun`` on several
processes) and writes it by default to the artifact store's ``tuned-lens`` folder for the model
(``tlmicroscope.artifacts``: ``<store>/<model>/tuned-lens/``, ``<model>-processed`` with
``--process-weights``), where ``tlmicroscope demo`` and ``report`` find it.
``tlmicroscope eval-lens`` compares a saved lens with the logit lens layer by layer on held-out
text.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tlmicroscope.app.cli import add_model_args, load_from_args, log


def register(sub: argparse._SubParsersAction) -> None:
    from tlmicroscope.lenses.train import TrainConfig

    d = TrainConfig()
    t = sub.add_parser(
        "train-lens",
        help="train a tuned lens (KL objective; resumable; torchrun for several processes)",
        description="Train a tuned lens. Run several processes with "
        "`torchrun --nproc-per-node N -m tlmicroscope.cli train-lens ...`.",
    )
    t.add_argument(
        "--corpus",
        default="embedded",
        help="'embedded' (pydoc topics), a .txt/.jsonl file or a folder of them",
    )
    t.add_argument(
        "--out",
        default=None,
        help="output folder (default: the artifact store's tuned-lens folder for the model, "
        "which `demo` and `report` pick up)",
    )
    t.add_argument("--steps", type=int, default=d.steps)
    t.add_argument("--tokens-per-step", type=int, default=d.tokens_per_step)
    t.add_argument("--seq-len", type=int, default=d.seq_len)
    t.add_argument(
        "--recipe",
        choices=["muon", "sgd", "adam"],
        default=d.recipe,
        help="muon: Muon + AdamW (fast, default); sgd: the reference's SGD-Nesterov recipe",
    )
    t.add_argument("--lr", type=float, default=None, help="learning rate (default: the recipe's)")
    t.add_argument(
        "--init",
        choices=["lstsq", "zero"],
        default=d.init,
        help="lstsq: closed-form fit to the last residual first; zero: start from the logit lens",
    )
    t.add_argument("--init-tokens", type=int, default=d.init_tokens)
    t.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision)
    t.add_argument(
        "--holdout",
        type=float,
        default=d.holdout,
        help="fraction of the corpus (its tail) kept for evaluation",
    )
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    t.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    t.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="stop cleanly (with a checkpoint) after this many minutes; --resume later",
    )
    t.add_argument(
        "--eval-tokens",
        type=int,
        default=0,
        help="after training, compare with the logit lens on this many held-out tokens",
    )
    t.add_argument("--text-field", default="text", help="JSONL field holding the text")
    add_model_args(t)
    t.set_defaults(func=_train)
    _register_eval(sub)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval-lens", help="compare a saved lens with the logit lens, layer by layer")
    e.add_argument(
        "--lens",
        default=None,
        help="saved lens folder (default: the artifact store's tuned-lens folder for the model)",
    )
    e.add_argument("--corpus", default="embedded")
    e.add_argument("--tokens", type=int, default=4096)
    e.add_argument("--seq-len", type=int, default=256)
    e.add_argument("--split", choices=["heldout", "train", "all"], default="heldout")
    e.add_argument("--holdout", type=float, default=0.1)
    e.add_argument("--bias", action="store_true", help="also the bias (KL between marginals)")
    e.add_argument("--transfer", action="store_true", help="also the transfer matrix (slow)")
    e.add_argument("--html", default=None, help="write the comparison figures to this HTML file")
    e.add_argument("--json", default=None, help="write the per-layer numbers to this JSON file")
    e.add_argument("--text-field", default="text")
    add_model_args(e)
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from tlmicroscope.distributed import dist_context
    from tlmicroscope.lenses.train import TrainingDivergedError, default_lens_dir, train_tuned_lens

    model = load_from_args(args)
    out = (
        Path(args.out) if args.out else default_lens_dir(args.model, processed=args.process_weights)
    )
    ctx = dist_context(args.device)
    if ctx.is_main:
        log(f"training a tuned lens ({args.recipe}, init {args.init}) into {out}")
    try:
        res = train_tuned_lens(
            model,
            args.corpus,
            steps=args.steps,
            tokens_per_step=args.tokens_per_step,
            seq_len=args.seq_len,
            recipe=args.recipe,
            lr=args.lr,
            init=args.init,
            init_tokens=args.init_tokens,
            precision=args.precision,
            holdout=args.holdout,
            seed=args.seed,
            out_dir=str(out),
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            max_seconds=None if args.time_limit is None else 60 * args.time_limit,
            text_field=args.text_field,
        )
    except TrainingDivergedError as exc:
        raise ValueError(str(exc)) from exc
    if not ctx.is_main:
        return 0
    steps_done = int(res.kl.shape[0])
    log(
        f"{steps_done} steps, {res.tokens_per_second:.0f} tokens/s (all {res.lens.n_layers} "
        "layers), "
        f"least-squares init {res.init_seconds:.0f} s"
    )
    if steps_done:
        first, last = res.kl[0], res.kl[-1]
        log(
            "KL(final || lens) per layer on fresh batches, first step -> last step (nats): "
            + ", ".join(
                f"{i}:{float(a):.2f}->{float(b):.2f}" for i, (a, b) in enumerate(zip(first, last))
            )
        )
    if steps_done < args.steps:
        log(f"stopped at step {steps_done} of {args.steps}; continue with --resume")
    if args.eval_tokens > 0:
        _print_eval(
            _evaluate(
                model,
                res.lens,
                args.corpus,
                args.eval_tokens,
                args.seq_len,
                "heldout",
                args.holdout,
                False,
                False,
                args.text_field,
            )
        )
    print(out.resolve())
    return 0


def _evaluate(model, lens, corpus, tokens, seq_len, split, holdout, bias, transfer, text_field):
    from tlmicroscope.lenses.evaluate import evaluate_lens

    return evaluate_lens(
        model,
        lens=lens,
        corpus=corpus,
        n_tokens=tokens,
        seq_len=seq_len,
        split=split,
        holdout=holdout,
        bias=bias,
        transfer=transfer,
        text_field=text_field,
    )


def _print_eval(ev) -> None:
    base = ev.baseline
    print(
        f"{'layer':>5} {'tuned KL':>9} {'logit KL':>9} {'tuned CE':>9} {'logit CE':>9}  "
        f"(nats; x{ev.nats_to_bpb:.3f} for bits/byte; {ev.n_tokens} held-out tokens)"
    )
    for i, label in enumerate(ev.layer_labels):
        bk = f"{float(base.kl[i]):9.3f}" if base is not None else " " * 9
        bc = f"{float(base.cross_entropy[i]):9.3f}" if base is not None else " " * 9
        print(f"{label:>5} {float(ev.kl[i]):9.3f} {bk} {float(ev.cross_entropy[i]):9.3f} {bc}")
    if base is not None:
        better = [bool(a < b) for a, b in zip(ev.kl[:-1], base.kl[:-1])]
        log(f"tuned lens KL below the logit lens's at {sum(better)} of {len(better)} layers")


def _eval(args: argparse.Namespace) -> int:
    from tlmicroscope.lenses import load_lens
    from tlmicroscope.lenses.train import default_lens_dir

    model = load_from_args(args)
    path = (
        Path(args.lens)
        if args.lens
        else default_lens_dir(args.model, processed=args.process_weights)
    )
    if not path.exists():
        raise FileNotFoundError(
            f"No lens at {path}. Train one with `tlmicroscope train-lens` or pass --lens DIR."
        )
    lens = load_lens(path, model)
    ev = _evaluate(
        model,
        lens,
        args.corpus,
        args.tokens,
        args.seq_len,
        args.split,
        args.holdout,
        args.bias,
        args.transfer,
        args.text_field,
    )
    _print_eval(ev)
    if args.json:
        from tlmicroscope.io import atomic_write_text

        atomic_write_text(
            args.json, json.dumps(ev.to_dataframe().to_dict(orient="records"), indent=1)
        )
    if args.html:
        from tlmicroscope.viz import HtmlPage
        from tlmicroscope.viz.tuned import lens_comparison_figure, transfer_heatmap

        page = HtmlPage(title=f"Lens evaluation: {ev.lens_name}")
        cap = ev.provenance.describe()
        for stat in ("kl", "cross_entropy", "entropy"):
            page.add_section(f"{stat} per layer", lens_comparison_figure(ev, stat), caption=cap)
        if ev.bias_kl is not None:
            page.add_section("bias per layer", lens_comparison_figure(ev, "bias_kl"), caption=cap)
        if ev.transfer_kl is not None:
            page.add_section("transfer matrix", transfer_heatmap(ev), caption=cap)
        print(Path(page.save(args.html)).resolve())
    return 0
