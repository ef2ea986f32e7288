"""Capture + PCA of every attention and MLP output: tlmicroscope against the reference approach.

Reference approach (Vainateya/Feature_Geometry_Visualization, re-created here, not copied): plain
PyTorch forward hooks on the transformers model's ``self_attn`` and ``mlp`` modules, one window per
forward pass, each output appended to a list as a float32 numpy array, then one stacked
``(state, sample, pos, d_model)`` array, then scikit-learn's ``PCA`` fitted on every vector and
applied without centring (``X @ components_.T``).

A careful variant of the reference ("reference-prealloc") writes the hooks straight into one
preallocated float32 array instead, to show how much of the difference is list-and-stack copying.

Ours: ``capture_components(model, windows, components=("attn_out", "mlp_out"))`` on the
TransformerLens model (streamed into one preallocated buffer, float32 and float16 storage), then
``LatentPCA(n).fit(states)`` and ``project(states, reducer=pca)``, which is what
``project(states, n_components=n)`` does, timed in two parts (streamed moments, same uncentred
application).

Each side runs in its own subprocess, so model loading and allocator state cannot leak between
them. Memory is the peak resident set size (``VmHWM``) of that process during capture + PCA: the
peak is reset through ``/proc/self/clear_refs`` right after the model is loaded (falling back to
``ru_maxrss``, which then includes loading). The model's own resident memory counts on both sides.

Run it under the heavy lock:

    flock /tmp/tlm-heavy.lock .venv/bin/python benchmarks/latent_capture.py
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SIDES = ("reference", "reference-prealloc", "float32", "float16")


def _peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _windows(tokenizer, n_windows: int, seq_len: int):
    from tlmicroscope.corpus import token_windows

    return token_windows(
        tokenizer, None, seq_len=seq_len, n_windows=n_windows, shuffle=True, seed=0
    )


def run_reference(args, preallocated: bool = False) -> dict:
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from tlmicroscope.models.embedded import (
        embedded_gguf_path,
        load_gguf_hf_model,
        load_gguf_tokenizer,
    )

    path = embedded_gguf_path()
    model = load_gguf_hf_model(path)
    windows = _windows(load_gguf_tokenizer(path), args.n_windows, args.seq_len)
    reset = _reset_peak()
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    layers = model.model.layers
    modules = [m for layer in layers for m in (layer.self_attn, layer.mlp)]
    stored: list[list[np.ndarray]] = [[] for _ in modules]
    d_model = model.config.hidden_size
    if preallocated:  # a careful variant: hooks write straight into the final array
        states = np.empty((len(modules), len(windows), windows.shape[1], d_model), dtype=np.float32)
    current = [0]

    def make_hook(i):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            if preallocated:
                states[i, current[0]] = out[0].detach().cpu().numpy()
            else:
                stored[i].append(out.detach().cpu().numpy().astype(np.float32, copy=False))

        return hook

    handles = [m.register_forward_hook(make_hook(i)) for i, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for j, w in enumerate(windows):  # one sample per forward, as the reference does
                current[0] = j
                model(w.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    if not preallocated:  # the reference's way: per-window lists, then one stacked array
        states = np.stack([np.concatenate(s) for s in stored])  # (state, sample, pos, d_model)
        stored.clear()
    t_capture = time.perf_counter() - t0
    x = states.reshape(-1, states.shape[-1])
    pca = PCA(n_components=args.n_components).fit(x)
    t_fit = time.perf_counter() - t0
    coords = x @ pca.components_.T
    t_total = time.perf_counter() - t0
    return {
        "capture_s": t_capture,
        "pca_s": t_total - t_capture,
        "total_s": t_total,
        "fit_s": t_fit - t_capture,
        "transform_s": t_total - t_fit,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_reset": reset,
        "n_vectors": int(x.shape[0]),
        "evr": pca.explained_variance_ratio_.tolist(),
        "components": pca.components_.tolist(),
        "coords_head": coords[:5].tolist(),
    }


def run_ours(args, dtype_name: str) -> dict:
    import torch

    from tlmicroscope.geometry import LatentPCA, capture_components, project
    from tlmicroscope.models import load_model

    model = load_model()
    windows = _windows(model, args.n_windows, args.seq_len)
    reset = _reset_peak()
    rss_loaded = _rss_mb()
    t0 = time.perf_counter()
    states = capture_components(
        model,
        windows,
        components=("attn_out", "mlp_out"),
        dtype=getattr(torch, dtype_name),
        batch_size=args.batch_size,
        progress=False,
    )
    t_capture = time.perf_counter() - t0
    pca = LatentPCA(args.n_components).fit(states)
    t_fit = time.perf_counter() - t0
    proj = project(states, reducer=pca)
    t_total = time.perf_counter() - t0
    return {
        "capture_s": t_capture,
        "pca_s": t_total - t_capture,
        "total_s": t_total,
        "fit_s": t_fit - t_capture,
        "transform_s": t_total - t_fit,
        "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": _peak_rss_mb(),
        "peak_reset": reset,
        "n_vectors": len(proj),
        "evr": pca.explained_variance_ratio_.tolist(),
        "components": proj.reducer.components_.tolist(),
        "coords_head": proj.coords[:5].tolist(),
    }


def _child(side: str, args) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--side",
        side,
        "--n-windows",
        str(args.n_windows),
        "--seq-len",
        str(args.seq_len),
        "--n-components",
        str(args.n_components),
        "--batch-size",
        str(args.batch_size),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"the {side} run failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _agreement(a: dict, b: dict) -> tuple[float, float]:
    import numpy as np

    ca, cb = np.asarray(a["components"]), np.asarray(b["components"])
    cos = float(np.abs(np.sum(ca * cb, axis=1)).min())
    evr = float(np.max(np.abs(np.asarray(a["evr"]) - np.asarray(b["evr"]))))
    return cos, evr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--n-components", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (ours)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="runs per side (the best time is kept)")
    p.add_argument("--side", default="all", choices=["all", *SIDES])
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.side in ("reference", "reference-prealloc"):
        print(json.dumps(run_reference(args, preallocated=args.side == "reference-prealloc")))
        return
    if args.side in ("float32", "float16"):
        print(json.dumps(run_ours(args, args.side)))
        return

    print(
        f"capture + PCA({args.n_components}) of all attention and MLP outputs of the embedded "
        f"model, {args.n_windows} windows x {args.seq_len} tokens, {args.threads} threads; each "
        "side in its own process"
    )
    results: dict[str, dict] = {}
    for rep in range(
        args.repeats
    ):  # interleaved, so a burst of load on the machine hits every side
        for side in SIDES:
            r = _child(side, args)
            print(
                f"  run {rep + 1} {side:>18}: capture {r['capture_s']:6.1f} s  PCA "
                f"{r['pca_s']:5.1f} s (fit {r['fit_s']:4.1f})  total {r['total_s']:6.1f} s  RSS "
                f"after load {r['rss_after_load_mb']:7.0f} MB  peak {r['peak_rss_mb']:7.0f} MB"
                + ("" if r["peak_reset"] else "  (peak includes loading: clear_refs unavailable)"),
                flush=True,
            )
            best = results.get(side)
            if best is None or r["total_s"] < best["total_s"]:
                results[side] = {
                    **r,
                    "peak_rss_mb": max(r["peak_rss_mb"], (best or r)["peak_rss_mb"]),
                }
            else:
                best["peak_rss_mb"] = max(best["peak_rss_mb"], r["peak_rss_mb"])
    print(f"best time of {args.repeats} runs per side, highest peak:")
    for ref_side in ("reference", "reference-prealloc"):
        ref = results[ref_side]
        for side in ("float32", "float16"):
            r = results[side]
            cos, devr = _agreement(r, ref)
            extra_ours = r["peak_rss_mb"] - r["rss_after_load_mb"]
            extra_ref = ref["peak_rss_mb"] - ref["rss_after_load_mb"]
            print(
                f"ours ({side} storage) / {ref_side}: time {r['total_s'] / ref['total_s']:.2f}x, "
                f"peak RSS {r['peak_rss_mb'] / ref['peak_rss_mb']:.2f}x (above the loaded model: "
                f"{extra_ours:.0f} vs {extra_ref:.0f} MB, {extra_ours / extra_ref:.2f}x); "
                f"components agree |cos| >= {cos:.5f}, explained-variance ratios within {devr:.1e}"
            )
    print("target (against the reference approach): time ratio <= 1 and peak RSS ratio <= 0.5")


if __name__ == "__main__":
    main()
