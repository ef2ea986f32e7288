"""tlmicroscope's LLM-Microscope linearity and token non-linearity against the reference
computation.

The reference (AIRI-Institute/LLM-Microscope, ``LLM_microscope.ipynb``) is re-stated here: the
transformers model with ``output_hidden_states=True`` one window at a time, every token vector
appended to per-layer Python lists and stacked, then per layer pair an unguarded SVD
pseudo-inverse on the CPU (``procrustes_similarity`` with the residual, and again
``procrustes_similarity_centered`` without it), over pairs (0,1)..(L−2,L−1) as the notebook
loops. The notebook has no token-wise non-linearity; its faithful extension fits A* by the same
SVD on the corpus and applies it to the prompt's hidden states with the corpus centring and
normalisation.

Both sides read the same corpus tokens (windows of the embedded corpus) from the embedded model.
Run it under the shared lock:

    flock /tmp/tlm-heavy.lock .venv/bin/python benchmarks/microscope_vs_reference.py

It prints both times, their ratio, and the largest score differences (all pairs, and the pairs
whose centred token matrix is well conditioned).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from tlmicroscope.corpus import token_windows
from tlmicroscope.microscope import NonlinearityReference, linearity_scores, token_nonlinearity
from tlmicroscope.models import load_model
from tlmicroscope.models.embedded import embedded_gguf_path, load_gguf_hf_model


# ---- the reference, re-stated ------------------------------------------------------------------
def ref_collect(hf, windows):
    """The notebook's get_embeddings: batch 1, per-token lists, stacked per hidden state."""
    layer2embs = {}
    with torch.no_grad():
        for row in windows:
            hidden = hf(row[None], output_hidden_states=True).hidden_states
            for i, emb in enumerate(hidden):
                layer2embs.setdefault(i, []).extend(list(emb.cpu().detach()[0]))
        return {i: torch.stack(v) for i, v in layer2embs.items()}


def ref_est_svd(X, Y):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    A = Vh.T * (1 / S)[None, ...] @ U.T @ Y
    return X @ A, A, S


def ref_normalise(x, y):
    X = x - x.mean(dim=0, keepdim=True)
    Y = y - y.mean(dim=0, keepdim=True)
    return X / X.norm(), Y / Y.norm()


def ref_similarity(x, y):
    with torch.no_grad():
        X, Y = ref_normalise(x, y)
        Y_est, _, S = ref_est_svd(X, Y)
        return float(1 - (Y_est - Y).square().sum()), S


def ref_similarity_centered(x, y0):
    with torch.no_grad():
        return ref_similarity(x, y0 - x)[0]


def ref_linearity(embs):
    scores, scores_wo, conds = [], [], []
    for layer in range(max(embs.keys()) - 1):
        s, S = ref_similarity(embs[layer], embs[layer + 1])
        scores.append(s)
        scores_wo.append(ref_similarity_centered(embs[layer], embs[layer + 1]))
        conds.append(float(S.max() / S.min()))
    return scores, scores_wo, conds


def ref_fit_maps(embs, pairs):
    """A* per pair by the notebook's SVD pseudo-inverse, with the corpus centring and norms."""
    maps = {}
    with torch.no_grad():
        for layer in pairs:
            x, y = embs[layer], embs[layer + 1]
            mx, my = x.mean(0, keepdim=True), y.mean(0, keepdim=True)
            nx, ny = (x - mx).norm(), (y - my).norm()
            _, A, _ = ref_est_svd((x - mx) / nx, (y - my) / ny)
            maps[layer] = (A, mx, my, nx, ny)
    return maps


def ref_apply(hf, prompt, maps):
    """The prompt's hidden states from transformers, then E = ‖x̃A* − ỹ‖ per token (paper scale)."""
    with torch.no_grad():
        hidden = hf(prompt, output_hidden_states=True).hidden_states
        rows = []
        for layer, (A, mx, my, nx, ny) in maps.items():
            px, py = (hidden[layer][0] - mx) / nx, (hidden[layer + 1][0] - my) / ny
            rows.append((px @ A - py).norm(dim=-1))
    return torch.stack(rows)


# ---- the run -----------------------------------------------------------------------------------
class Timer:
    """Wall and CPU seconds of a block (CPU time is steadier on a shared machine)."""

    def __enter__(self):
        self.t, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.t, time.process_time() - self.c

    def __str__(self):
        return f"{self.wall:.1f} s (cpu {self.cpu:.1f} s)"


def best(fn, repeats):
    """The fastest of ``repeats`` runs of ``fn`` (by wall time), and its result."""
    out, timer = None, None
    for _ in range(repeats):
        with Timer() as t:
            out = fn()
        if timer is None or t.wall < timer.wall:
            timer = t
    return out, timer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--cond", type=float, default=1e3, help="well conditioned: σ_max/σ_min of X̃ below this"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model = load_model("smollm2-135m", kind="bridge")
    hf = load_gguf_hf_model(embedded_gguf_path())
    windows = token_windows(
        model, None, seq_len=args.seq_len, n_windows=args.n_windows, shuffle=True, seed=0
    )
    prompt = token_windows(
        model, None, seq_len=args.prompt_len, n_windows=1, shuffle=True, seed=123
    )
    n_tok, d = windows.numel(), int(model.cfg.d_model)
    with torch.inference_mode():  # warm both models up once
        hf(windows[:1, :32])
        model(windows[:1, :32])
    print(
        f"embedded SmolLM2-135M, {args.n_windows} windows x {args.seq_len} = N={n_tok} tokens, "
        f"d={d}, {torch.get_num_threads()} threads"
    )

    with Timer() as t_collect:
        embs = ref_collect(hf, windows)
    with Timer() as t_ref_lin:
        ref_s, ref_wo, conds = ref_linearity(embs)
    pairs = list(range(len(ref_s)))
    with Timer() as t_ours:
        ours = linearity_scores(model, windows, layers=pairs, progress=False)
    states = torch.stack([embs[i] for i in range(len(pairs) + 1)])
    ours_states, t_ours_states = best(lambda: linearity_scores(states, layers=pairs), 2)

    def diffs(a, b, mask=None):
        v = [abs(x - float(y)) for x, y in zip(a, b)]
        if mask is not None:
            v = [x for x, keep in zip(v, mask) if keep]
        return max(v) if v else float("nan")

    good = [c < args.cond for c in conds]
    ref_total = t_collect.wall + t_ref_lin.wall
    print(f"\nlinearity, {len(pairs)} pairs (with and without residual):")
    print(f"  reference: collect {t_collect} + per-pair SVD {t_ref_lin} = {ref_total:.1f} s")
    print(
        f"  tlmicroscope linearity_scores (streamed float64 moments, own forward): {t_ours}   "
        f"ratio {ref_total / t_ours.wall:.2f}x (cpu "
        f"{(t_collect.cpu + t_ref_lin.cpu) / t_ours.cpu:.2f}x)"
    )
    print(
        f"  from the same hidden states: reference {t_ref_lin}, tlmicroscope {t_ours_states}   "
        f"ratio {t_ref_lin.wall / t_ours_states.wall:.2f}x (cpu "
        f"{t_ref_lin.cpu / t_ours_states.cpu:.2f}x)"
    )
    print(
        f"  max |Δ score| with residual: {diffs(ref_s, ours.score):.2e} (all pairs), "
        f"{diffs(ref_s, ours.score, good):.2e} ({sum(good)} pairs with σmax/σmin < {args.cond:g})"
    )
    print(
        f"  max |Δ score| without residual: {diffs(ref_wo, ours.score_without_residual):.2e} "
        f"(all), {diffs(ref_wo, ours.score_without_residual, good):.2e} (well conditioned)"
    )
    print(
        f"  same hidden states, max |Δ|: {diffs(ref_s, ours_states.score):.2e} / "
        f"{diffs(ref_wo, ours_states.score_without_residual):.2e}"
    )
    print(
        f"  condition numbers σmax/σmin of X̃: min {min(conds):.3g}, median "
        f"{sorted(conds)[len(conds) // 2]:.3g}, max {max(conds):.3g}"
    )
    # The notebook computes in float32 (an fp32 model, its SVD and sums in float32). The same
    # formula evaluated in float64 on a few pairs shows how much of the difference is the
    # reference's rounding.
    check = sorted({0, len(pairs) // 4, len(pairs) // 2, 3 * len(pairs) // 4, len(pairs) - 1})
    exact = {
        i: (
            ref_similarity(embs[i].double(), embs[i + 1].double())[0],
            ref_similarity_centered(embs[i].double(), embs[i + 1].double()),
        )
        for i in check
    }
    worst_ours = max(
        max(
            abs(exact[i][0] - float(ours.score[i])),
            abs(exact[i][1] - float(ours.score_without_residual[i])),
        )
        for i in check
    )
    worst_ref = max(max(abs(exact[i][0] - ref_s[i]), abs(exact[i][1] - ref_wo[i])) for i in check)
    print(
        f"  the reference formula in float64 on pairs {check}: max |Δ| to tlmicroscope "
        f"{worst_ours:.2e}, to the float32 reference run {worst_ref:.2e}"
    )
    print("  pair  ref_score    ours_score   ref_wo     ours_wo    cond")
    for i in pairs:
        print(
            f"  {i:>4}  {ref_s[i]:.8f}  {float(ours.score[i]):.8f}  {ref_wo[i]:.6f}  "
            f"{float(ours.score_without_residual[i]):.6f}  {conds[i]:.3g}"
        )

    # token non-linearity of one prompt: fit the maps (from the corpus hidden states above), then
    # apply
    with Timer() as t_ref_fit:
        ref_maps = ref_fit_maps(embs, pairs)
    ref_err, t_ref_apply = best(lambda: ref_apply(hf, prompt, ref_maps), 3)
    reference, t_fit = best(lambda: NonlinearityReference().fit(states, layers=pairs), 1)
    with Timer() as t_fit_model:
        reference_model = NonlinearityReference().fit(model, windows, layers=pairs, progress=False)
    tn, t_apply = best(lambda: token_nonlinearity(model, prompt, reference=reference_model), 3)
    tn_states = token_nonlinearity(model, prompt, reference=reference)
    ours_err = tn.paper_scale()[:, 0]
    scale = math.sqrt(n_tok)
    d_abs = (ours_err.double() - ref_err.double()).abs()
    good_t = torch.tensor(good)
    print(
        f"\ntoken non-linearity, {args.prompt_len}-token prompt, maps fitted on the N={n_tok} "
        "corpus tokens:"
    )
    print(
        f"  fit the maps from the corpus hidden states: reference (per-pair SVD A*) {t_ref_fit}, "
        f"tlmicroscope (float64 moments) {t_fit}   ratio {t_ref_fit.wall / t_fit.wall:.2f}x (cpu "
        f"{t_ref_fit.cpu / t_fit.cpu:.2f}x)"
    )
    print(f"  tlmicroscope NonlinearityReference.fit with its own forward pass: {t_fit_model}")
    print(
        f"  apply to the prompt: reference (HF output_hidden_states + maps) {t_ref_apply}, "
        f"tlmicroscope token_nonlinearity (one hooked pass) {t_apply}   ratio "
        f"{t_ref_apply.wall / t_apply.wall:.2f}x"
    )
    print(
        "  fit from the same hidden states + apply: ratio "
        f"{(t_ref_fit.wall + t_ref_apply.wall) / (t_fit.wall + t_apply.wall):.2f}x"
    )
    d_states = (tn_states.paper_scale()[:, 0].double() - ref_err.double()).abs()
    print(
        f"  maps fitted on the reference's own hidden states: max |Δ E| {float(d_states.max()):.2e}"
    )
    print(
        f"  max |Δ E| (paper scale, E·√N in brackets): all pairs {float(d_abs.max()):.2e} "
        f"[{float(d_abs.max()) * scale:.2e}], well-conditioned pairs "
        f"{float(d_abs[good_t].max()):.2e} [{float(d_abs[good_t].max()) * scale:.2e}]; typical E "
        f"{float(ref_err.median()):.2e}"
    )
    embs64 = {i: embs[i].double() for i in sorted({p for c in check for p in (c, c + 1)})}
    maps64 = ref_fit_maps(embs64, check)
    with torch.no_grad():
        hidden = hf(prompt, output_hidden_states=True).hidden_states
    worst = 0.0
    for layer in check:
        A, mx, my, nx, ny = maps64[layer]
        e64 = (
            ((hidden[layer][0].double() - mx) / nx) @ A - (hidden[layer + 1][0].double() - my) / ny
        ).norm(dim=-1)
        worst = max(worst, float((e64 - ours_err[layer].double()).abs().max() / e64.abs().max()))
    print(
        f"  the reference formula in float64 on pairs {check}: max |Δ E| / max E to tlmicroscope "
        f"{worst:.2e}"
    )
    rel = d_abs / ref_err.double().abs().clamp_min(1e-30)
    print(
        f"  median relative |Δ E| {float(rel.median()):.2e}, well-conditioned max "
        f"{float(rel[good_t].max()):.2e}"
    )


if __name__ == "__main__":
    main()
