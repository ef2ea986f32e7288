"""Cost of ``prediction_trajectory`` against its FLOP floor, a forward pass and TransformerLens's
``logit_lens``.

In one process, on a prompt from the embedded corpus (``--tokens``, 512, and ``--short-tokens``,
32):

* one plain forward pass;
* the FLOP floor: the bare readout products ``normalize(h^l) @ W`` of every residual
  h^0..h^L, one per layer, on residuals captured beforehand (nothing but the unembeddings the
  trajectory cannot avoid); also the same products as one stacked matrix product, for reference;
* ``prediction_trajectory`` over every layer and position with every statistic (entropy, KL to
  the final distribution, cross-entropy, target rank, top-10), its own forward pass included;
* ``transformer_lens.tools.analysis.logit_lens(model, tokens, positions=None, top_k=10)``, where
  its ``[layer pos d_vocab]`` tensor fits in 2 GiB (not on a 262k vocabulary).

Then peak memory at ``--memory-tokens`` (2048): each of a forward pass and a trajectory in a fresh
process, as the kernel's resident-set high-water mark (``VmHWM``, reset after loading the model,
just before a short first call and the measured one, so per-model caches built on first use count),
which counts torch's CPU allocations as the OS sees them.

Models (``--model``): ``smollm2-135m`` (the default embedded model), ``gemma3-270m`` (the second
embedded model, 262,144-token vocabulary), or ``synthetic-large-vocab``: a random Llama-shaped
bridge with Gemma 3 270M's sizes (18 layers, d_model 640, 262,144 tokens) and the byte tokenizer,
whose ids past 258 have no text (shown as ``<id>``); its prompt is random ids over the vocabulary.

Usage: python benchmarks/lens_overhead.py [--model gemma3-270m] [--tokens 512] [--short-tokens 32]
       [--repeat 2] [--memory-tokens 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import best_time, peak_rss_during

from tlmicroscope.lenses import prediction_trajectory
from tlmicroscope.lenses.readout import Readout

MODELS = ("smollm2-135m", "gemma3-270m", "synthetic-large-vocab")


def load(name: str):
    if name == "synthetic-large-vocab":
        return synthetic_large_vocab()
    from tlmicroscope import load_model

    return load_model(name)


def synthetic_large_vocab(seed: int = 0):
    """A random bridge of Gemma 3 270M's sizes (Llama-shaped: RMSNorm, rotary, gated MLP, GQA)."""
    from transformer_lens import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    from tlmicroscope.models.tiny import byte_tokenizer

    cfg = TransformerBridgeConfig(
        d_model=640,
        d_head=256,
        n_heads=4,
        n_key_value_heads=1,
        n_layers=18,
        n_ctx=4096,
        d_vocab=262144,
        d_mlp=2048,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        positional_embedding_type="rotary",
        rotary_dim=256,
        seed=seed,
    )
    torch.manual_seed(seed)
    model = TransformerBridge.boot_native(cfg, tokenizer=byte_tokenizer())
    model.cfg.default_prepend_bos = False
    model._tlmicroscope_processed = False
    model._tlmicroscope_name = "synthetic-large-vocab (random, Gemma 3 270M sizes)"
    return model.eval()


def prompt(model, name: str, n_tokens: int) -> torch.Tensor:
    if name == "synthetic-large-vocab":
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, int(model.cfg.d_vocab), (1, n_tokens), generator=g)
    from tlmicroscope.corpus import token_windows

    return token_windows(model, seq_len=n_tokens, n_windows=1)


def residuals(model, toks):
    L = int(model.cfg.n_layers)
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=names)
    return [cache[n][0] for n in names]


def floor_times(model, toks, repeat: int) -> tuple[float, float]:
    """Best times of the bare readout products: one per layer, and all layers stacked in one."""
    hs = residuals(model, toks)
    readout = Readout.for_model(model)
    W = readout.W

    def per_layer():
        with torch.inference_mode():
            for h in hs:
                readout.normalize(h).to(W.dtype) @ W

    stacked_x = torch.cat([readout.normalize(h) for h in hs]).to(W.dtype)

    def stacked():
        with torch.inference_mode():
            stacked_x @ W

    return best_time(per_layer, repeat, warmup=0), best_time(stacked, repeat, warmup=0)


def time_at(model, name: str, n_tokens: int, repeat: int, with_tl: bool) -> dict[str, float]:
    toks = prompt(model, name, n_tokens)

    def forward():
        with torch.inference_mode():
            model(toks)

    out = {"forward": best_time(forward, repeat)}
    out["floor"], out["floor_stacked"] = floor_times(model, toks, repeat)
    # main() warmed the trajectory's caches and kernels up on a short prompt already.
    out["trajectory"] = best_time(
        lambda: prediction_trajectory(model, toks, top_k=10), repeat, warmup=0
    )
    fits = (model.cfg.n_layers + 1) * n_tokens * model.cfg.d_vocab * 4 * 3 < 2 * 2**30
    if with_tl and fits:
        from transformer_lens.tools.analysis import logit_lens

        out["tl"] = best_time(
            lambda: logit_lens(model, toks, positions=None, top_k=10), max(1, repeat - 1)
        )
    return out


def report_times(n_tokens: int, t: dict[str, float], target: float) -> None:
    f = t["floor"]
    print(f"\n{n_tokens} tokens:")
    print(f"  forward pass:                          {t['forward']:8.3f} s")
    print(
        f"  FLOP floor, one product per layer:     {f:8.3f} s   = {f / t['forward']:.1f}x a "
        "forward pass"
    )
    print(f"  the same products stacked in one:      {t['floor_stacked']:8.3f} s")
    print(
        f"  prediction_trajectory (top 10):        {t['trajectory']:8.3f} s   = "
        f"{t['trajectory'] / t['forward']:.1f}x forward"
    )
    if "tl" in t:
        print(
            f"  TransformerLens logit_lens (top 10):   {t['tl']:8.3f} s   = "
            f"{t['tl'] / t['trajectory']:.2f}x the trajectory"
        )
    print(
        f"  ratio trajectory / floor:              {t['trajectory'] / f:.2f}x (target <= "
        f"{target}); / stacked products {t['trajectory'] / t['floor_stacked']:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=MODELS, default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--short-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--memory-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument(
        "--memory-child", choices=["forward", "trajectory"], default=None, help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.model, args.memory_child, args.memory_tokens)
        return

    t0 = time.perf_counter()
    model = load(args.model)
    cfg = model.cfg
    load_s = time.perf_counter() - t0
    with open("/proc/loadavg") as f:
        load_avg = " ".join(f.read().split()[:3])
    print(
        f"{args.model}: {cfg.n_layers} layers, d_model {cfg.d_model}, d_vocab {cfg.d_vocab}; "
        f"loaded in {load_s:.0f} s; {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"load average {load_avg}"
    )
    prediction_trajectory(model, prompt(model, args.model, 8), top_k=10)  # warm-up: caches, kernels
    for n, target in ((args.tokens, 1.3), (args.short_tokens, 1.5)):
        if n:
            report_times(n, time_at(model, args.model, n, args.repeat, with_tl=True), target)

    if not args.no_memory:
        # Fresh processes: freed memory is not returned to the OS, so a process that already ran
        # the timings would report their high-water mark.
        res = {
            w: _memory_child(args.model, w, args.memory_tokens, args.threads)
            for w in ("forward", "trajectory")
        }
        (pf, bf), (pt, bt) = res["forward"], res["trajectory"]
        print(
            f"\npeak RSS (VmHWM) at {args.memory_tokens} tokens, each in a fresh process "
            f"(model loaded: {bf:.0f} MiB):"
        )
        print(f"  forward pass:           {pf:7.0f} MiB (+{pf - bf:.0f} MiB over the loaded model)")
        print(f"  prediction_trajectory:  {pt:7.0f} MiB (+{pt - bt:.0f} MiB)")
        print(
            f"  ratio trajectory / forward: {pt / pf:.2f}x total (target < 2), "
            f"{(pt - bt) / max(pf - bf, 1):.2f}x over the loaded model"
        )
    with open("/proc/loadavg") as f:
        print(f"\nload average at the end: {' '.join(f.read().split()[:3])} on {_cpus()} CPUs")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _memory_child(model: str, what: str, n_tokens: int, threads: int) -> tuple[float, float]:
    import subprocess

    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--model",
            model,
            "--memory-child",
            what,
            "--memory-tokens",
            str(n_tokens),
            "--threads",
            str(threads),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def memory_child(name: str, what: str, n_tokens: int) -> None:
    model = load(name)
    toks = prompt(model, name, n_tokens)

    def forward(t=toks):
        with torch.inference_mode():
            return model(t).shape

    def trajectory(t=toks):
        return prediction_trajectory(model, t, top_k=10).kl.shape

    fn = forward if what == "forward" else trajectory
    # A short call first, inside the measured span: the readout caches a first call builds count.
    _, peak, before = peak_rss_during(lambda: (fn(toks[:, :8]), fn()))
    print(peak, before)


if __name__ == "__main__":
    main()
