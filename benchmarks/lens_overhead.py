"""Cost of ``prediction_trajectory`` against one forward pass and TransformerLens's ``logit_lens``.

On the embedded SmolLM2-135M with a 512-token prompt from the embedded corpus, in one process:

* one plain forward pass;
* ``prediction_trajectory`` over all 31 residual layers and all positions, with every statistic
  (entropy, KL to the final distribution, cross-entropy, target rank, top-1 probability, top-10);
* ``transformer_lens.tools.analysis.logit_lens(model, tokens, positions=None, top_k=10)``.

The FLOP floor: reading out every layer costs n_layers + 1 unembeddings on top of nothing else,
2 * d_model * d_vocab FLOPs per token each. It is printed as a time, scaled from the measured
forward pass by the FLOP ratio. Then the peak resident memory at 2048 tokens, for a forward pass
and for a trajectory (each measured from a reset high-water mark, after loading).

Usage: python benchmarks/lens_overhead.py [--tokens 512] [--repeat 3] [--memory-tokens 2048]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _measure import best_time, peak_rss_during  # noqa: E402

from tlmicroscope import load_model  # noqa: E402
from tlmicroscope.corpus import token_windows  # noqa: E402
from tlmicroscope.lenses import prediction_trajectory  # noqa: E402


def forward_flops(cfg, n_tokens: int) -> float:
    """Matrix-multiply FLOPs of one forward pass (2 per multiply-add), attention included."""
    d, L, dh = cfg.d_model, cfg.n_layers, cfg.d_head
    n_kv = getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    attn_proj = d * (cfg.n_heads * dh) * 2 + d * (n_kv * dh) * 2  # q, o and k, v
    mlp = d * cfg.d_mlp * (3 if cfg.gated_mlp else 2)
    per_token = 2 * L * (attn_proj + mlp) + 2 * d * cfg.d_vocab
    attention = 2 * 2 * L * cfg.n_heads * dh * n_tokens * (n_tokens + 1) / 2  # QK^T and AV, causal
    return per_token * n_tokens + attention


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--memory-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--memory-child", choices=["forward", "trajectory"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child, args.memory_tokens)
        return

    model = load_model()
    cfg = model.cfg
    toks = token_windows(model, seq_len=args.tokens, n_windows=1)

    def forward():
        with torch.inference_mode():
            model(toks)

    def ours():
        prediction_trajectory(model, toks, top_k=10)

    def transformer_lens_logit_lens():
        from transformer_lens.tools.analysis import logit_lens

        logit_lens(model, toks, positions=None, top_k=10)

    t_fwd = best_time(forward, args.repeat)
    t_ours = best_time(ours, args.repeat)
    t_tl = best_time(transformer_lens_logit_lens, max(1, args.repeat - 1))

    f_fwd = forward_flops(cfg, args.tokens)
    f_floor = (cfg.n_layers + 1) * 2 * cfg.d_model * cfg.d_vocab * args.tokens
    t_floor = t_fwd * f_floor / f_fwd

    print(f"SmolLM2-135M, {args.tokens} tokens, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"forward pass:                         {t_fwd:7.3f} s   ({f_fwd / 1e9:.0f} GFLOP)")
    print(f"FLOP floor ({cfg.n_layers + 1} unembeddings):          {t_floor:7.3f} s   "
          f"({f_floor / 1e9:.0f} GFLOP, {f_floor / f_fwd:.2f}x a forward pass)")
    print(f"tlmicroscope prediction_trajectory:   {t_ours:7.3f} s   = {t_ours / t_fwd:.2f}x forward, "
          f"{t_ours / t_floor:.2f}x the floor")
    print(f"TransformerLens logit_lens (top 10):  {t_tl:7.3f} s   = {t_tl / t_fwd:.2f}x forward")
    print(f"ratio TransformerLens / tlmicroscope: {t_tl / t_ours:.2f}x (target >= 1.3)")
    print(f"ratio tlmicroscope / floor:           {t_ours / t_floor:.2f}x (target <= 1.3)")

    # Memory in fresh processes: freed memory is not returned to the OS, so a process that already
    # ran the timings would report their high-water mark.
    res = {what: _memory_child(what, args.memory_tokens, args.threads) for what in ("forward", "trajectory")}
    (pf, bf), (pt, bt) = res["forward"], res["trajectory"]
    print(f"peak RSS at {args.memory_tokens} tokens, each in a fresh process (model loaded: {bf:.0f} MiB):")
    print(f"  forward pass:           {pf:7.0f} MiB (+{pf - bf:.0f} MiB over the loaded model)")
    print(f"  prediction_trajectory:  {pt:7.0f} MiB (+{pt - bt:.0f} MiB)")
    print(f"  ratio trajectory / forward: {pt / pf:.2f}x total, "
          f"{(pt - bt) / max(pf - bf, 1):.2f}x over the loaded model (target < 2)")


def _memory_child(what: str, n_tokens: int, threads: int) -> tuple[float, float]:
    import subprocess

    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", what, "--memory-tokens", str(n_tokens),
         "--threads", str(threads)],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def memory_child(what: str, n_tokens: int) -> None:
    model = load_model()
    toks = token_windows(model, seq_len=n_tokens, n_windows=1)

    def forward():
        with torch.inference_mode():
            return model(toks).shape

    def trajectory():
        return prediction_trajectory(model, toks, top_k=10).kl.shape

    _, peak, before = peak_rss_during(forward if what == "forward" else trajectory)
    print(peak, before)


if __name__ == "__main__":
    main()
