"""Cost of the full report against the sum of its sections, each run on its own by its public
function.

On the embedded SmolLM2-135M, for texts of 128, 512 and 1024 tokens from the embedded corpus, in
one process:

* ``tlmicroscope.report(model, text)`` with every default section (no training: sections whose
  fitted prerequisite is absent show their notice, and the standalone side skips them too);
* each of those sections' analyses called on its own through its public function, as a user in a
  notebook would (each makes its own forward pass: that is what the report saves).

Target: the report takes at most 0.7x the sum of the standalone calls.

Then the peak resident memory, each in a fresh process after loading the model: the full report,
and one ``model.run_with_cache(tokens)`` on the same text (every hook). Target: the report's peak
is at or below that of the full ``run_with_cache``.

``--model gemma3-270m`` (or ``synthetic-large-vocab``, see ``lens_overhead.py``) runs the same on a
262k-token vocabulary, where the target is a report at most 0.5x the sum (issue 11).

Usage: python benchmarks/report_cost.py [--model smollm2-135m] [--tokens 128,512,1024] [--repeat 2]
[--lens DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import peak_rss_during
from lens_overhead import MODELS, load

import tlmicroscope
from tlmicroscope.corpus import token_windows
from tlmicroscope.inputs import to_tokens

# --- the standalone form of each section: public functions only, each with its own forward pass ---


def _trajectory(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.lenses import prediction_trajectory

    prediction_trajectory(model, tokens, top_k=10)
    if lens is not None:
        prediction_trajectory(model, tokens, lens=lens, top_k=10)


def _logit_lens_table(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.lenses import prediction_trajectory

    prediction_trajectory(model, tokens, lens="logit-paper", top_k=1)


def _token_geometry(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.geometry import layer_geometry

    layer_geometry(model, tokens, prepend_bos=None)


def _microscope_nonlinearity(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    # No saved reference: the maps fitted on the text's own tokens, as the report does.
    from tlmicroscope.microscope import NonlinearityReference, token_nonlinearity

    ref = NonlinearityReference().fit(model, tokens, progress=False)
    token_nonlinearity(model, tokens, reference=ref)


def _microscope_linearity(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.microscope import linearity_scores

    linearity_scores(model, tokens)


def _microscope_contributions(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.microscope import layer_contributions

    layer_contributions(model, tokens, lens=lens)


def _latent_projections(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.geometry import capture_components, component_separation, project
    from tlmicroscope.geometry.components import ATTN_VS_MLP

    states = capture_components(model, tokens, components=ATTN_VS_MLP, progress=False)
    project(states, "pca", n_components=2)
    resid = capture_components(model, tokens, components=("embed", "resid_post"), progress=False)
    project(resid.normalized(unit=True), "pca", n_components=2)
    component_separation(states, n_folds=5, max_points=256, progress=False)


def _norm_profile(model: Any, tokens: torch.Tensor, lens: Any) -> None:
    from tlmicroscope.geometry import norm_profile

    norm_profile(model, tokens, components=("embed", "resid_post"), progress=False)


STANDALONE: dict[str, Callable[[Any, torch.Tensor, Any], None]] = {
    "trajectory": _trajectory,
    "logit_lens_table": _logit_lens_table,
    "microscope_nonlinearity": _microscope_nonlinearity,
    "microscope_linearity": _microscope_linearity,
    "microscope_contributions": _microscope_contributions,
    "token_geometry": _token_geometry,
    "latent_projections": _latent_projections,
    "norm_profile": _norm_profile,
}


def _load_lens(model: Any, path: str | None) -> Any:
    if not path:
        return None
    from tlmicroscope.lenses import load_lens

    return load_lens(path, model)


def time_one(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """Best wall time over ``repeat`` runs (the first run also warms up the kernels)."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def memory_child(name: str, what: str, n_tokens: int, lens_dir: str | None) -> None:
    model = load(name)
    tokens = token_windows(model, seq_len=n_tokens, n_windows=1)
    text = model.tokenizer.decode(tokens[0])
    lens = _load_lens(model, lens_dir)

    def run(t):
        if what == "report":
            return tlmicroscope.report(model, t, lens=lens)
        return model.run_with_cache(to_tokens(model, t))

    with torch.inference_mode():
        # One warm-up on a short text first: imports (plotly, scikit-learn, numba for UMAP) and
        # one-off kernel set-up are code, not the activations this compares.
        run(model.tokenizer.decode(tokens[0, :64]))
        _, peak, before = peak_rss_during(lambda: run(text))
    print(json.dumps({"peak": peak, "before": before}))


def measure_memory(name: str, what: str, n_tokens: int, lens_dir: str | None) -> dict[str, float]:
    cmd = [
        sys.executable,
        __file__,
        "--model",
        name,
        "--memory-child",
        what,
        "--tokens",
        str(n_tokens),
    ]
    if lens_dir:
        cmd += ["--lens", lens_dir]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="smollm2-135m")
    ap.add_argument("--tokens", default="128,512,1024")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lens", default=None, help="a saved lens folder to pass to the report")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--memory-child", choices=["report", "run_with_cache"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(t) for t in str(args.tokens).split(",")]
    if args.memory_child:
        memory_child(args.model, args.memory_child, sizes[0], args.lens)
        return

    model = load(args.model)
    lens = _load_lens(model, args.lens)
    target = 0.5 if int(model.cfg.d_vocab) > 200_000 else 0.7
    with open("/proc/loadavg") as f:
        load_avg = " ".join(f.read().split()[:3])
    print(
        f"{args.model}, {args.threads} threads, torch {torch.__version__}, lens: "
        f"{args.lens or 'none'}, load average {load_avg}"
    )
    summary = []
    for n in sizes:
        tokens = token_windows(model, seq_len=n, n_windows=1)
        text = model.tokenizer.decode(tokens[0])
        toks = to_tokens(model, text)
        rep, t_report = time_one(
            lambda text=text: tlmicroscope.report(model, text, lens=lens), args.repeat
        )
        print(
            f"\n{toks.shape[-1]} tokens: report {t_report:.2f} s "
            f"(shared capture {rep.capture_seconds:.2f} s; rendered {rep.rendered}; "
            f"missing {list(rep.missing)}; failed {list(rep.failed)})"
        )
        total = 0.0
        for name in rep.rendered:
            fn = STANDALONE.get(name)
            if fn is None:
                print(
                    f"  {name:<22} no standalone form in this script: counted as 0 s (conservative)"
                )
                continue
            with torch.inference_mode():
                _, t = time_one(lambda fn=fn, toks=toks: fn(model, toks, lens), args.repeat)
            total += t
            print(f"  {name:<22} in report {rep.seconds[name]:6.2f} s | on its own {t:6.2f} s")
        ratio = t_report / total if total else float("nan")
        print(
            f"  sum of sections on their own: {total:.2f} s; report / sum = {ratio:.2f} (target <= "
            f"{target})"
        )
        summary.append((int(toks.shape[-1]), t_report, total, ratio))

    if not args.no_memory:
        print("\npeak RSS, each in a fresh process after loading the model (MiB):")
        for n in sizes:
            r = measure_memory(args.model, "report", n, args.lens)
            c = measure_memory(args.model, "run_with_cache", n, args.lens)
            dr, dc = r["peak"] - r["before"], c["peak"] - c["before"]
            print(
                f"  {n:5d} tokens: report {r['peak']:.0f} (+{dr:.0f}) | full run_with_cache "
                f"{c['peak']:.0f} (+{dc:.0f}) | ratio {r['peak'] / c['peak']:.2f} total, "
                f"{dr / dc:.2f} over the loaded model (target <= 1)"
            )
    print("\nsummary (tokens, report s, sum of sections s, ratio):")
    for row in summary:
        print(f"  {row[0]:5d}  {row[1]:7.2f}  {row[2]:7.2f}  {row[3]:.2f}")


if __name__ == "__main__":
    main()
