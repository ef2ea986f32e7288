"""Cost of ``target_trajectories`` over many short prompts against their forward passes alone.

``target_trajectories`` reads out only the positions asked about (the last of each prompt): every
layer's residual at that row goes through the lens and the full-vocabulary normaliser, and nothing
else. So over short prompts its cost should be about the forward passes (target: within 1.5x).

In one process, on ``--prompts`` (64) short prompts from the embedded corpus (``--min-tokens`` to
``--max-tokens`` tokens each, different lengths):

* the forward passes alone: the same right-padded batches of ``--batch-size`` prompts that
  ``target_trajectories`` runs, ``model(tokens)`` under ``torch.inference_mode``;
* ``target_trajectories(model, prompts, targets, lens=...)`` with two targets (one a set), every
  layer, the logit lens, and a 1000-resample bootstrap (its forward passes after the first batch
  stop at the last residual: the model's own unembedding of every position is not needed);
* for reference, what it avoids: ``prediction_trajectory(..., targets=...)`` of every layer at
  every position of each prompt, one prompt at a time.

Prints each best-of-``--repeat`` time, the ratio to the forward passes, and the load average.

Usage: python benchmarks/target_trajectories.py [--model smollm2-135m] [--prompts 64] [--threads 2]
       [--repeat 3] [--mid] [--no-reference]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import best_time

from tlmicroscope.corpus import embedded_documents
from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses import prediction_trajectory, target_trajectories


def short_prompts(model, n: int, lo: int, hi: int, seed: int = 0) -> list[str]:
    """``n`` word-aligned snippets of the embedded corpus, of ``lo`` to ``hi`` tokens each."""
    rng = random.Random(seed)
    words = " ".join(embedded_documents()).split()
    out = []
    while len(out) < n:
        start = rng.randrange(len(words) - 64)
        k = rng.randrange(3, 24)
        text = " ".join(words[start : start + k])
        if lo <= to_tokens(model, text).shape[1] <= hi:
            out.append(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--min-tokens", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mid", action="store_true", help="also read resid_mid (sites='pre+mid')")
    ap.add_argument(
        "--no-reference", action="store_true", help="skip the full-trajectory reference"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from tlmicroscope import load_model

    t0 = time.perf_counter()
    model = load_model(args.model)
    print(f"model {args.model}: loaded in {time.perf_counter() - t0:.1f} s; {args.threads} threads")
    prompts = short_prompts(model, args.prompts, args.min_tokens, args.max_tokens)
    print("prompts ready", flush=True)
    rows = [to_tokens(model, p)[0] for p in prompts]
    lengths = [len(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda i: lengths[i])
    batches = []
    for i in range(0, len(order), args.batch_size):
        idx = order[i : i + args.batch_size]
        toks = torch.zeros(len(idx), max(lengths[j] for j in idx), dtype=torch.long)
        for b, j in enumerate(idx):
            toks[b, : lengths[j]] = rows[j]
        batches.append(toks)
    targets = [" the", {" a", " an"}]
    sites = "pre+mid" if args.mid else "pre"
    print(
        f"{len(prompts)} prompts of {min(lengths)}-{max(lengths)} tokens ({sum(lengths)} in all), "
        f"batches of {args.batch_size}, targets {targets}, sites {sites!r}"
    )

    def forward() -> None:
        with torch.inference_mode():
            for toks in batches:
                model(toks)

    def ours() -> None:
        target_trajectories(
            model, prompts, targets=targets, progress=False, batch_size=args.batch_size, sites=sites
        )

    def full() -> None:
        for p in prompts:
            prediction_trajectory(model, p, targets=targets, sites=sites)

    def timed(fn) -> tuple[float, float]:
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - w0, time.process_time() - c0

    # Interleaved, best of each (wall and CPU seconds): on a shared machine the load drifts.
    forward()
    ours()
    fw, ow = [], []
    for _ in range(args.repeat):
        fw.append(timed(forward))
        ow.append(timed(ours))
    t_fwd, c_fwd = min(w for w, _ in fw), min(c for _, c in fw)
    t_ours, c_ours = min(w for w, _ in ow), min(c for _, c in ow)
    print(f"{'what':<62} {'wall s':>8} {'x forward':>10} {'CPU s':>8} {'x forward':>10}")
    print(
        f"{'forward passes alone (same padded batches)':<62} {t_fwd:>8.3f} {1.0:>10.2f} "
        f"{c_fwd:>8.3f} {1.0:>10.2f}"
    )
    print(
        f"{'target_trajectories (last position, every layer, bootstrap)':<62} {t_ours:>8.3f} "
        f"{t_ours / t_fwd:>10.2f} {c_ours:>8.3f} {c_ours / c_fwd:>10.2f}",
        flush=True,
    )
    if not args.no_reference:
        t_full = best_time(full, repeat=1, warmup=0)
        print(
            f"{'full prediction_trajectory per prompt (reference)':<62} {t_full:>8.3f} "
            f"{t_full / t_fwd:>10.2f}"
        )
    load = os.getloadavg()[0]
    print(
        f"ratio target_trajectories / forward = {t_ours / t_fwd:.2f} wall, {c_ours / c_fwd:.2f} "
        f"CPU (target <= 1.5); load average {load:.2f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
