"""Subcommands of the LLM-Microscope analyses.

* ``microscope "text"``: the five LLM-Microscope panels (non-linearity heatmap, average linearity
  per layer, layer contributions, contextualization heatmap, logit lens) plus the component
  attribution, in one offline HTML file;
* ``microscope-fit``: fit and save the non-linearity reference maps of a model;
* ``microscope-train-probe``: train (checkpointed, resumable) and save a contextualization probe;
* ``microscope-classes``: C and non-linearity per token class and their correlation over corpus
  texts;
* ``microscope-removal``: the filler-token removal experiment;
* ``microscope-linearity``: linearity scores (and anisotropy/ID profiles) of a model over a corpus.

The reference and the probe default to the artifact store (``tlmicroscope.artifacts``), so
``microscope`` finds what ``microscope-fit`` and ``microscope-train-probe`` saved. The
``microscope`` page is the ``microscope`` preset of the report (``tlmicroscope.app.sections``):
the same sections ``tlmicroscope report`` draws, built once in ``tlmicroscope.app.panels``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from tlmicroscope.app.cli import (
    DEFAULT_TEXT,
    add_model_args,
    load_from_args,
    log,
    read_text_arg,
    render_preset,
)
from tlmicroscope.app.prerequisites import fitted_path, load_fitted

REFERENCE, PROBE = "nonlinearity-reference", "contextualization-probe"


def _corpus_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--corpus", default="embedded", help="'embedded', a .txt/.jsonl file or a folder of them"
    )


def register(sub: argparse._SubParsersAction) -> None:
    _register_page(sub)
    _register_fit(sub)
    _register_train(sub)
    _register_classes(sub)
    _register_removal(sub)
    _register_linearity(sub)


def _register_page(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "microscope", help="the five LLM-Microscope panels of a text in one HTML file"
    )
    p.add_argument("text", nargs="?", default=None, help="the text to analyse")
    p.add_argument("--text-file", default=None, help="read the text from a file instead")
    p.add_argument("--out", default="microscope.html", help="HTML file to write")
    p.add_argument(
        "--reference",
        default=None,
        help="saved non-linearity reference folder (default: the artifact store's)",
    )
    p.add_argument(
        "--no-fit",
        action="store_true",
        help="do not fit a missing reference (show a notice instead)",
    )
    p.add_argument(
        "--fit-tokens",
        type=int,
        default=None,
        help="corpus tokens for a reference fitted on the fly",
    )
    p.add_argument(
        "--probe",
        default=None,
        help="saved contextualization probe folder (default: the artifact store's)",
    )
    p.add_argument(
        "--lens",
        default="logit",
        help="lens of the contribution panel: 'logit', 'logit-paper' or a saved lens",
    )
    p.add_argument(
        "--normalization",
        default="global",
        choices=["global", "layer", "token", "none"],
        help="min-max scaling of the non-linearity heatmap (as the paper's demo)",
    )
    p.add_argument(
        "--paper-nonlinearity",
        action="store_true",
        help="fit the maps on the prompt itself (the paper's reading; noise when the prompt is "
        "short)",
    )
    p.add_argument(
        "--truncate", action="store_true", help="keep the first n_ctx tokens of a long text"
    )
    add_model_args(p)
    p.set_defaults(func=_microscope)


def _register_fit(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "microscope-fit", help="fit and save the non-linearity reference maps of a model"
    )
    _corpus_arg(f)
    f.add_argument("--out", default=None, help="folder to write (default: the artifact store)")
    f.add_argument(
        "--n-tokens", type=int, default=None, help="corpus tokens (default max(8192, 32·d_model))"
    )
    f.add_argument("--seq-len", type=int, default=256)
    f.add_argument(
        "--skip-positions", type=int, default=0, help="drop the first positions of each window"
    )
    f.add_argument(
        "--ridge", type=float, default=0.0, help="Tikhonov term, fraction of the mean eigenvalue"
    )
    add_model_args(f)
    f.set_defaults(func=_fit)


def _register_train(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser(
        "microscope-train-probe", help="train a contextualization probe (checkpointed, resumable)"
    )
    _corpus_arg(t)
    t.add_argument("--out", default=None, help="folder to write (default: the artifact store)")
    t.add_argument(
        "--checkpoint-dir", default=None, help="checkpoints (default: OUT.ckpt); rerun to resume"
    )
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--prefix-length", type=int, default=None)
    t.add_argument("--mlp-hidden", type=int, default=None)
    t.add_argument("--decoder", default=None, choices=["frozen", "last_k", "full"])
    t.add_argument("--trainable-blocks", type=int, default=None)
    t.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    add_model_args(t)
    t.set_defaults(func=_train)


def _register_classes(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "microscope-classes", help="C and non-linearity per token class, and their correlation"
    )
    _corpus_arg(c)
    c.add_argument("--n-texts", type=int, default=40, help="corpus windows to analyse")
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--reference", default=None)
    c.add_argument("--probe", default=None)
    c.add_argument("--out", default="microscope-classes.html")
    c.add_argument("--csv", default=None, help="also write the per-token table")
    add_model_args(c)
    c.set_defaults(func=_classes)


def _register_removal(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "microscope-removal", help="filler-token removal: accuracy and LM-loss deltas"
    )
    r.add_argument(
        "--dataset",
        default="shipped",
        help="'shipped', 'none', or an MMLU CSV/JSONL file or folder",
    )
    r.add_argument(
        "--corpus",
        default="embedded",
        help="LM-loss passages: 'embedded', a file, a folder or 'none'",
    )
    r.add_argument(
        "--removals",
        default=",".join(("stop_words", "punctuation", "articles", "stop_words+punctuation")),
    )
    r.add_argument("--max-items", type=int, default=None)
    r.add_argument("--n-shots", type=int, default=None)
    r.add_argument("--n-passages", type=int, default=100)
    r.add_argument("--out", default="microscope-removal.html")
    r.add_argument("--csv", default=None)
    add_model_args(r)
    r.set_defaults(func=_removal)


def _register_linearity(sub: argparse._SubParsersAction) -> None:
    lin = sub.add_parser(
        "microscope-linearity",
        help="layer linearity scores (and anisotropy/ID profiles) over a corpus",
    )
    _corpus_arg(lin)
    lin.add_argument("--n-tokens", type=int, default=None)
    lin.add_argument("--seq-len", type=int, default=256)
    lin.add_argument("--mode", default="lstsq", choices=["lstsq", "paper"])
    lin.add_argument("--skip-positions", type=int, default=0)
    lin.add_argument(
        "--profiles", action="store_true", help="also anisotropy and intrinsic dimension per layer"
    )
    lin.add_argument("--out", default="microscope-linearity.html")
    lin.add_argument("--csv", default=None)
    add_model_args(lin)
    lin.set_defaults(func=_linearity)


def _corpus(value: str) -> Any:
    return None if value in (None, "embedded") else value


def _reference(model: Any, path: str | None, *, fit: bool, n_tokens: int | None):
    """The saved reference (``path`` or the store's); fitted and saved now if missing (``fit``)."""
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference

    ref, target = load_fitted(REFERENCE, model, path)
    if ref is not None or not fit:
        return ref, target
    log(
        "no non-linearity reference for this model yet: fitting one on the embedded corpus "
        f"(saved to {target})"
    )
    t0 = time.perf_counter()
    ref = NonlinearityReference(n_tokens=n_tokens).fit(model)
    ref.save(target)
    log(f"fitted on {ref.n_tokens_} tokens in {time.perf_counter() - t0:.0f} s")
    return ref, target


def _microscope(args: argparse.Namespace) -> int:
    from tlmicroscope.app.prerequisites import load_lens_arg

    text = read_text_arg(args.text if args.text is not None else DEFAULT_TEXT, args.text_file)
    model = load_from_args(args)
    lens = load_lens_arg(args.lens, model)
    settings: dict[str, Any] = {
        "microscope_normalization": args.normalization,
        "truncate": args.truncate,
    }
    if args.paper_nonlinearity:
        settings["microscope_nonlinearity_mode"] = "paper"
    else:
        _, ref_path = _reference(
            model, args.reference, fit=not args.no_fit, n_tokens=args.fit_tokens
        )
        settings["microscope_reference"] = str(ref_path) if args.reference else None
    _, probe_path = load_fitted(PROBE, model, args.probe)
    settings["microscope_probe"] = str(probe_path) if args.probe else None
    intro = "Panels follow Razzhigaev et al., arXiv 2502.15007."
    return render_preset(
        "microscope",
        model,
        text,
        out=args.out,
        lens=lens if lens not in ("logit", "logit-paper") else None,
        intro=intro,
        **{k: v for k, v in settings.items() if v is not None},
    )


def _fit(args: argparse.Namespace) -> int:
    from tlmicroscope.microscope.nonlinearity import NonlinearityReference

    model = load_from_args(args)
    out = fitted_path(REFERENCE, model, args.out)
    t0 = time.perf_counter()
    ref = NonlinearityReference(
        n_tokens=args.n_tokens,
        seq_len=args.seq_len,
        skip_positions=args.skip_positions,
        ridge=args.ridge,
    ).fit(model, _corpus(args.corpus))
    ref.save(out)
    log(f"{ref!r} in {time.perf_counter() - t0:.0f} s")
    print(ref.linearity_.to_dataframe().to_string(index=False))
    print(out.resolve())
    return 0


def _train(args: argparse.Namespace) -> int:
    from tlmicroscope.microscope.contextualization import ContextualizationProbe

    model = load_from_args(args)
    out = fitted_path(PROBE, model, args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".ckpt")
    overrides = {
        k: v
        for k, v in {
            "steps": args.steps,
            "prefix_length": args.prefix_length,
            "mlp_hidden": args.mlp_hidden,
            "decoder": args.decoder,
            "trainable_blocks": args.trainable_blocks,
        }.items()
        if v is not None
    }
    probe = ContextualizationProbe(**overrides)
    log(f"training {probe!r}; checkpoints in {ckpt}")
    t0 = time.perf_counter()
    probe.fit(model, _corpus(args.corpus), checkpoint_dir=ckpt, resume=not args.fresh)
    probe.save(out)
    h = probe.history_
    k = max(1, len(h) // 10)
    log(
        f"trained in {time.perf_counter() - t0:.0f} s this run ({probe.train_seconds_:.0f} s in "
        "all); "
        f"loss {sum(h[:k]) / k:.3f} (first {k} steps) -> {sum(h[-k:]) / k:.3f} (last {k})"
    )
    print(out.resolve())
    return 0


def _classes(args: argparse.Namespace) -> int:
    from tlmicroscope.corpus import token_windows
    from tlmicroscope.microscope import (
        contextuality_nonlinearity_correlation,
        contextualization,
        token_class_summary,
        token_nonlinearity,
    )
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz import microscope as mv

    model = load_from_args(args)
    ref, _ = _reference(model, args.reference, fit=True, n_tokens=None)
    probe, probe_path = load_fitted(PROBE, model, args.probe)
    if probe is None:
        raise ValueError(
            f"No contextualization probe at {probe_path}; train one with "
            f"`tlmicroscope microscope-train-probe --model {args.model}`."
        )
    windows = token_windows(
        model,
        _corpus(args.corpus),
        seq_len=args.seq_len,
        n_windows=args.n_texts,
        shuffle=True,
        seed=12345,
    )
    ctxs, nls = [], []
    from tqdm.auto import tqdm

    for w in tqdm(windows, desc="texts"):
        ctxs.append(contextualization(model, w, probe=probe))
        nls.append(token_nonlinearity(model, w, reference=ref))
    summary = token_class_summary(ctxs, nls)
    corr = contextuality_nonlinearity_correlation(ctxs, nls)
    print(summary.to_dataframe().to_string(index=False))
    print(f"lowest C: {summary.lowest_C()}")
    print(
        f"Pearson r(C, non-linearity) = {corr.pearson_r:.4f} (p = {corr.p_value:.3g}, n = "
        f"{corr.n}); "
        f"Spearman {corr.spearman_r:.4f}"
    )
    page = HtmlPage(title="LLM-Microscope: token classes")
    page.add_section(
        "Token classes",
        mv.token_class_plot(summary),
        caption=f"{args.n_texts} corpus windows of {args.seq_len} tokens; position 0 left out.",
    )
    page.add_section("C vs non-linearity", mv.correlation_scatter(corr))
    if args.csv:
        summary.table.to_csv(args.csv, index=False)
    print(Path(page.save(args.out)).resolve())
    return 0


def _removal(args: argparse.Namespace) -> int:
    from tlmicroscope.microscope import filler_removal_experiment
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz import microscope as mv

    model = load_from_args(args)
    dataset = {"shipped": None, "none": False}.get(args.dataset, args.dataset)
    corpus = {"embedded": None, "none": False}.get(args.corpus, args.corpus)
    res = filler_removal_experiment(
        model,
        dataset,
        corpus=corpus,
        removals=tuple(args.removals.split(",")),
        max_items=args.max_items,
        n_shots=args.n_shots,
        n_passages=args.n_passages,
    )
    df = res.to_dataframe()
    print(df.to_string(index=False))
    if args.csv:
        df.to_csv(args.csv, index=False)
    page = HtmlPage(title="LLM-Microscope: filler-token removal")
    page.add_section(
        "Deltas from the original text",
        mv.filler_removal_plot(res),
        df.to_html(index=False),
        caption=res.provenance.describe(),
    )
    print(Path(page.save(args.out)).resolve())
    return 0


def _linearity(args: argparse.Namespace) -> int:
    from tlmicroscope.microscope import layer_profiles, linearity_scores
    from tlmicroscope.viz import HtmlPage
    from tlmicroscope.viz import microscope as mv

    model = load_from_args(args)
    res = linearity_scores(
        model,
        _corpus(args.corpus),
        n_tokens=args.n_tokens,
        seq_len=args.seq_len,
        mode=args.mode,
        skip_positions=args.skip_positions,
    )
    df = res.to_dataframe()
    print(df.to_string(index=False))
    page = HtmlPage(title="LLM-Microscope: layer linearity")
    page.add_section(
        "Linearity per layer pair",
        mv.linearity_plot(res),
        df.to_html(index=False),
        caption=res.provenance.describe(),
    )
    if args.profiles:
        prof = layer_profiles(
            model, _corpus(args.corpus), seq_len=args.seq_len, skip_positions=args.skip_positions
        )
        print(prof.to_dataframe().to_string(index=False))
        page.add_section(
            "Anisotropy and intrinsic dimension",
            mv.layer_profiles_plot(prof),
            caption=prof.provenance.describe(),
        )
    if args.csv:
        df.to_csv(args.csv, index=False)
    print(Path(page.save(args.out)).resolve())
    return 0
