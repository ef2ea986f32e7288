"""Subcommands ``cbe`` (causal basis, fidelity, stimulus-response) and ``injection`` (AUROCs)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tlmicroscope.app.cli import add_model_args, load_from_args, log
from tlmicroscope.app.prerequisites import load_lens_arg


def register(sub: argparse._SubParsersAction) -> None:
    _register_cbe(sub)
    _register_injection(sub)


def _register_cbe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cbe",
        help="causal basis extraction at a layer, its causal fidelity, and "
        "stimulus-response alignment, as JSON + HTML",
    )
    p.add_argument(
        "--layer", type=int, default=None, help="residual layer (default: the middle one)"
    )
    p.add_argument("--k", type=int, default=10, help="number of directions")
    p.add_argument("--lens", default="logit", help="'logit' or a saved tuned-lens folder")
    p.add_argument("--mode", default="mean", choices=["mean", "zero", "resample"])
    p.add_argument(
        "--corpus", default="embedded", help="'embedded', a .txt/.jsonl file or a folder"
    )
    p.add_argument(
        "--n-tokens", type=int, default=2048, help="hidden-state rows for the extraction"
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument(
        "--fidelity-windows",
        type=int,
        default=2,
        help="held-out corpus windows for causal fidelity (0 skips it)",
    )
    p.add_argument(
        "--stimulus-response",
        type=int,
        default=0,
        metavar="N",
        help="also measure stimulus-response alignment with N treated positions per layer "
        "(all layers; the lens and the logit lens)",
    )
    p.add_argument(
        "--sr-donors",
        default="same_position",
        choices=["same_position", "any"],
        help="stimulus-response donors: the treated position in another window, position 0 "
        "left out (the reference's), or any other token",
    )
    p.add_argument(
        "--sr-windows",
        type=int,
        default=None,
        metavar="N",
        help="held-out windows for stimulus-response (default: the fidelity windows)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out-dir",
        default=None,
        help="output folder (default out/cbe-<model>-<lens>/, where the report's causal "
        "basis section looks for the basis)",
    )
    add_model_args(p)
    p.set_defaults(func=_cbe)


def _register_injection(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "injection", help="prompt-injection detection from lens trajectories: AUROCs as JSON + HTML"
    )
    q.add_argument(
        "--lens", default=None, help="a saved tuned-lens folder (the logit lens is always included)"
    )
    q.add_argument("--n-items", type=int, default=200, help="items sampled from the task set")
    q.add_argument(
        "--tasks",
        default=None,
        help="an MMLU-format .csv/.jsonl file or folder instead of the shipped set",
    )
    q.add_argument("--shots", type=int, default=3)
    q.add_argument("--splits", type=int, default=10)
    q.add_argument("--detector", default="lof", choices=["lof", "isolation_forest"])
    q.add_argument(
        "--choice-order",
        default="model",
        choices=["model", "given"],
        help="order each prompt's choices by the model's final preference, or keep the item order",
    )
    q.add_argument(
        "--mode",
        default="default",
        choices=["default", "paper"],
        help="'paper': the reference's features (log-odds for binary tasks, raw given-order "
        "log-likelihoods otherwise), unstandardised LOF, every injected prompt tested",
    )
    q.add_argument(
        "--by-task",
        action="store_true",
        help="one experiment per task (category), each beside the paper's AUROC for its type; "
        "without --tasks: every shipped category, fixed-label ones included",
    )
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out-dir", default="out/injection")
    add_model_args(q)
    q.set_defaults(func=_injection)


def _cbe(args: argparse.Namespace) -> int:
    from tlmicroscope.causal import extract_causal_basis
    from tlmicroscope.causal.basis import default_cbe_dir
    from tlmicroscope.io import atomic_write_text
    from tlmicroscope.lenses import resolve_lens
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz.causal import cbe_energy_figure

    model = load_from_args(args)
    lens = resolve_lens(load_lens_arg(args.lens or "logit", model))
    out = Path(args.out_dir) if args.out_dir else default_cbe_dir(model, lens)
    layer = model.cfg.n_layers // 2 if args.layer is None else args.layer
    windows, n_extract = _cbe_windows(model, args)
    basis = extract_causal_basis(
        model,
        lens=lens,
        corpus=windows[:n_extract],
        layer=layer,
        k=args.k,
        mode=args.mode,
        max_iter=args.max_iter,
        seed=args.seed,
    )
    basis.save(out / "basis")
    log(f"energies (nats): {[round(float(e), 5) for e in basis.energies]}")
    results = {
        "basis": {
            "layer": basis.layer,
            "mode": basis.mode,
            "lens": basis.lens,
            "n_tokens": basis.n_tokens,
            "energies": basis.energies.tolist(),
            "converged": basis.converged.tolist(),
            "n_evals": basis.n_evals.tolist(),
        },
        "provenance": basis.provenance.to_dict(),
    }
    page = HtmlPage(title=f"Causal basis extraction at layer {basis.layer}")
    page.add_section("CBE energies", cbe_energy_figure(basis), caption=basis.provenance.describe())
    if args.fidelity_windows > 0:
        results["fidelity"] = _fidelity_section(page, model, lens, basis, windows[n_extract:], args)
    if args.stimulus_response > 0:
        results.update(_stimulus_response_section(page, model, lens, windows[n_extract:], args))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    html = page.save(out / "cbe.html")
    print(Path(html).resolve())
    return 0


def _cbe_windows(model: Any, args: argparse.Namespace) -> tuple[Any, int]:
    """Corpus windows: the first ``n_extract`` for the extraction, the rest held out."""
    from tlmicroscope.corpus import token_windows

    seq_len = min(args.seq_len, model.cfg.n_ctx)
    n_extract = max(1, -(-args.n_tokens // seq_len))
    windows = token_windows(
        model,
        args.corpus,
        seq_len=seq_len,
        n_windows=n_extract + args.fidelity_windows,
        shuffle=True,
        seed=args.seed,
    )
    return windows, n_extract


def _fidelity_section(
    page: Any, model: Any, lens: Any, basis: Any, held_out: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Causal fidelity of the basis on held-out windows: a figure and its numbers."""
    from tlmicroscope.causal import causal_fidelity
    from tlmicroscope.viz.causal import fidelity_scatter

    fid = causal_fidelity(model, lens=lens, basis=basis, tokens=held_out, seed=args.seed)
    log(f"causal fidelity at layer {basis.layer}: {fid.describe()}")
    page.add_section("Causal fidelity", fidelity_scatter(fid), caption=fid.provenance.describe())
    return {
        "spearman": fid.spearman,
        "p_value": fid.p_value,
        "n_tokens": fid.n_tokens,
        "spearman_ci": list(fid.spearman_ci),
        "ci_level": fid.ci_level,
        "n_directions": fid.n_directions,
        "lens_influence": fid.lens_influence.tolist(),
        "model_influence": fid.model_influence.tolist(),
    }


def _stimulus_response_section(
    page: Any, model: Any, lens: Any, held_out: Any, args: argparse.Namespace
) -> dict[str, Any]:
    """Stimulus-response alignment of the lens (and of the logit lens beside a trained one)."""
    from tlmicroscope.causal import stimulus_response_alignment
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.viz.causal import stimulus_response_figure

    lenses = [lens] if lens.name == "logit" else [lens, "logit"]
    if args.sr_windows is not None:
        seq_len = min(args.seq_len, model.cfg.n_ctx)
        n_extract = max(1, -(-args.n_tokens // seq_len))
        held_out = token_windows(
            model,
            args.corpus,
            seq_len=seq_len,
            n_windows=n_extract + args.sr_windows,
            shuffle=True,
            seed=args.seed,
        )[n_extract:]
    sr = stimulus_response_alignment(
        model,
        lens=lenses,
        tokens=held_out[:, :128],
        n_samples=args.stimulus_response,
        seed=args.seed,
        donors=args.sr_donors,
    )
    results: dict[str, Any] = {"stimulus_response": sr.to_dataframe().to_dict(orient="records")}
    if len(lenses) == 2:
        cmp = sr.compare(0, 1)
        results["stimulus_response_compare"] = cmp.to_dict(orient="records")
        log(
            f"stimulus-response: {sr.lens_names[0]} higher than {sr.lens_names[1]} at "
            f"{int(cmp.higher.sum())}, lower at {int(cmp.lower.sum())} of {len(cmp)} layers "
            "(95% bootstrap intervals)"
        )
    page.add_section(
        "Stimulus-response alignment",
        stimulus_response_figure(sr),
        caption=sr.provenance.describe(),
    )
    return results


def _injection(args: argparse.Namespace) -> int:
    from tlmicroscope.causal import injection_experiment
    from tlmicroscope.io import atomic_write_text
    from tlmicroscope.tasks import load_tasks, read_mmlu
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz.causal import injection_auroc_figure

    model = load_from_args(args)
    lenses = (
        ["logit"]
        if args.lens in (None, "logit")
        else [load_lens_arg(args.lens or "logit", model), "logit"]
    )
    if args.by_task:
        return _injection_by_task(args, model, lenses)
    items = read_mmlu(args.tasks) if args.tasks else load_tasks()
    res = injection_experiment(
        model,
        items,
        lenses=lenses,
        n_items=args.n_items,
        n_shots=args.shots,
        n_splits=args.splits,
        detector=args.detector,
        choice_order=args.choice_order,
        seed=args.seed,
        mode=args.mode,
    )
    table = res.summary()
    for row in table.itertuples():
        log(
            f"AUROC {row.features}: {row.auroc_mean:.3f} ± {row.auroc_std:.3f} "
            f"(95% CI {row.ci_low:.2f}-{row.ci_high:.2f})"
        )
    log(
        f"model accuracy clean {res.accuracy_clean:.3f}, injected {res.accuracy_injected:.3f}; "
        f"follows the injection on {res.follows_injection:.3f}"
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "auroc": {k: v.tolist() for k, v in res.auroc.items()},
        "summary": table.to_dict(orient="records"),
        "accuracy_clean": res.accuracy_clean,
        "accuracy_injected": res.accuracy_injected,
        "follows_injection": res.follows_injection,
        "n_items": res.n_items,
        "n_shots": res.n_shots,
        "detector": res.detector,
        "provenance": res.provenance.to_dict(),
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    page = HtmlPage(title="Prompt-injection detection")
    page.add_section(
        "AUROC by feature set", injection_auroc_figure(res), caption=res.provenance.describe()
    )
    print(Path(page.save(out / "injection.html")).resolve())
    return 0


def _injection_by_task(args: argparse.Namespace, model, lenses) -> int:
    from tlmicroscope.causal import injection_by_task
    from tlmicroscope.io import atomic_write_text
    from tlmicroscope.tasks import ALL_CATEGORIES, load_tasks, read_mmlu

    items = read_mmlu(args.tasks) if args.tasks else load_tasks(ALL_CATEGORIES)
    mode = "paper" if args.mode == "paper" else "default"
    table, results = injection_by_task(
        model,
        items,
        lenses=lenses,
        mode=mode,
        n_items=args.n_items,
        n_shots=args.shots,
        n_splits=args.splits,
        detector=args.detector,
        choice_order=args.choice_order,
        seed=args.seed,
    )
    for row in table.itertuples():
        log(
            f"{row.task} ({row.task_type}, accuracy {row.accuracy_clean:.2f}): AUROC "
            f"{row.features} "
            f"{row.auroc_mean:.3f} (95% CI {row.ci_low:.2f}-{row.ci_high:.2f}); paper "
            f"{row.paper_low:.2f}-{row.paper_high:.2f}"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    per_task = {
        t: {
            "auroc": {k: v.tolist() for k, v in r.auroc.items()},
            "auroc_ci": r.auroc_ci,
            "accuracy_clean": r.accuracy_clean,
            "accuracy_injected": r.accuracy_injected,
            "follows_injection": r.follows_injection,
            "n_items": r.n_items,
            "task_type": r.task_type,
            "provenance": r.provenance.to_dict(),
        }
        for t, r in results.items()
    }
    atomic_write_text(
        out / "results_by_task.json",
        json.dumps(
            {"table": table.to_dict(orient="records"), "tasks": per_task, "mode": mode}, indent=2
        ),
    )
    print((out / "results_by_task.json").resolve())
    return 0
