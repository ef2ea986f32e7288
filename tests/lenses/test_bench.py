"""lens_bench: its numbers against brute-force computations on tiny models, its files and its
page."""

from __future__ import annotations

import json
import math

import pytest
import torch

CORPUS = ["The river ran past the old mill, and the miller sang while the wheel turned. " * 12]
SEQ = 32


class RandomLinearLens:
    """A deliberately poor affine lens, so the bench has something non-trivial to measure."""

    name = "random-linear"
    final_norm = True

    def __init__(self, n_layers: int, d_model: int):
        g = torch.Generator().manual_seed(3)
        self.M = torch.eye(d_model) + 0.3 * torch.randn(n_layers, d_model, d_model, generator=g)
        self.b = 0.1 * torch.randn(n_layers, d_model, generator=g)
        self.n_layers = n_layers

    def transform(self, h, layer):
        return h @ self.M[layer].T.to(h.dtype) + self.b[layer].to(h.dtype)

    def check_model(self, model):
        if model.cfg.n_layers != self.n_layers:
            raise ValueError("another model")


def _brute_force(model, lens, windows):
    """KL, CE, bias and mean prediction depth from the model's own ln_final and unembed."""
    L = model.cfg.n_layers
    with torch.no_grad():
        logits, cache = model.run_with_cache(windows)
        final = torch.log_softmax(logits.float(), -1)
        out_check = model.unembed(model.ln_final(cache[f"blocks.{L - 1}.hook_resid_post"])).float()
        assert torch.allclose(
            out_check, logits.float(), atol=1e-4
        )  # the components read the output
        kl, ce, bias, top1 = [], [], [], []
        p = final.exp()
        for layer in range(L + 1):
            if layer == L:
                q = final
            else:
                h = cache[f"blocks.{layer}.hook_resid_pre"]
                q = torch.log_softmax(
                    model.unembed(model.ln_final(lens.transform(h, layer))).float(), -1
                )
            kl.append(float((p * (final - q)).sum(-1).mean()))
            nxt = windows[:, 1:]
            ce.append(float(-q[:, :-1].gather(-1, nxt.unsqueeze(-1)).mean()))
            pbar, qbar = (
                p.reshape(-1, p.shape[-1]).mean(0),
                q.exp().reshape(-1, p.shape[-1]).mean(0),
            )
            bias.append(float((pbar * (pbar.log() - qbar.log())).sum()))
            top1.append(q.argmax(-1))
    top1 = torch.stack(top1)  # [L+1 batch pos]
    agree = top1[:L] == top1[L]
    depth = torch.full(agree.shape[1:], L)
    for layer in range(L - 1, -1, -1):  # the first layer from which every later lens layer agrees
        settled = agree[layer:].all(0)
        depth = torch.where(settled, torch.full_like(depth, layer), depth)
    return torch.tensor(kl), torch.tensor(ce), torch.tensor(bias), depth.double().mean()


@pytest.fixture(scope="module")
def bench_and_windows(tiny_llama):
    from tlmicroscope.lenses._tuned_data import lens_token_windows
    from tlmicroscope.lenses.bench import lens_bench

    model = tiny_llama
    lenses = ["logit", RandomLinearLens(model.cfg.n_layers, model.cfg.d_model)]
    bench = lens_bench(
        model,
        lenses=lenses,
        corpus=CORPUS,
        n_tokens=96,
        seq_len=SEQ,
        holdout=0.5,
        depth_n_tokens=96,
        cbe_layers=[1],
        cbe_k=2,
        cbe_n_tokens=64,
        cbe_max_iter=4,
        fidelity_n_tokens=64,
        sra_n_samples=6,
        progress=False,
    )
    windows = lens_token_windows(model, CORPUS, seq_len=SEQ, split="heldout", holdout=0.5)[:3]
    return bench, windows, lenses


def test_kl_ce_bias_and_depth_match_brute_force(tiny_llama, bench_and_windows):
    bench, windows, lenses = bench_and_windows
    assert bench.n_tokens == windows.numel() == 96
    for i, lens in enumerate(lenses):
        from tlmicroscope.lenses.base import resolve_lens

        kl, ce, bias, depth = _brute_force(tiny_llama, resolve_lens(lens), windows)
        assert torch.allclose(bench.kl[i], kl, atol=2e-4, rtol=1e-3), (bench.kl[i], kl)
        assert torch.allclose(bench.cross_entropy[i], ce, atol=2e-4, rtol=1e-3)
        assert torch.allclose(bench.bias_kl[i], bias, atol=2e-4, rtol=1e-3)
        assert abs(float(bench.depth[i]) - float(depth)) < 1e-6
        assert abs(float(bench.depth_fraction[i].sum()) - 1) < 1e-6
    assert float((bench.kl[1, :-1] - bench.kl[0, :-1]).min()) > 0  # the random lens reads worse


def test_bits_per_byte_from_the_decoded_bytes(tiny_llama, bench_and_windows):
    bench, windows, _ = bench_and_windows
    tok = tiny_llama.tokenizer
    n_bytes = sum(len(tok.decode(w.tolist(), skip_special_tokens=True).encode()) for w in windows)
    assert bench.n_bytes == n_bytes
    assert math.isclose(bench.nats_to_bpb, (96 / n_bytes) / math.log(2), rel_tol=1e-12)
    row = bench.table().iloc[0]
    assert math.isclose(
        row["kl_bpb"], float(bench.kl[0, :-1].mean()) * bench.nats_to_bpb, rel_tol=1e-6
    )


def test_fidelity_and_sra_are_those_of_the_causal_functions(tiny_llama, bench_and_windows):
    from scipy.stats import spearmanr

    from tlmicroscope.causal.basis import extract_causal_basis
    from tlmicroscope.causal.fidelity import causal_fidelity
    from tlmicroscope.causal.stimulus_response import stimulus_response_alignment

    bench, windows, lenses = bench_and_windows
    basis = extract_causal_basis(
        tiny_llama,
        lens=lenses[1],
        corpus=windows[:2],
        layer=1,
        k=2,
        n_tokens=64,
        seq_len=SEQ,
        max_iter=4,
        progress=False,
        on_nonconvergence="ignore",
    )
    fid = causal_fidelity(
        tiny_llama, lens=lenses[1], basis=basis, layer=1, tokens=windows[:2], progress=False
    )
    rho = spearmanr(fid.lens_influence.numpy(), fid.model_influence.numpy()).statistic
    assert math.isclose(float(bench.fidelity_rho[1, 0]), float(rho), abs_tol=1e-9)
    sra = stimulus_response_alignment(
        tiny_llama, lens=lenses, tokens=windows, layer=list(range(3)), n_samples=6, progress=False
    )
    assert torch.allclose(bench.sra, sra.alignment.nanmean(-1), equal_nan=True)
    assert bench.sra_layers == (0, 1, 2) and bool((bench.sra.abs() <= 1 + 1e-5).all())
    lo, _hi = sra.confidence_intervals()
    assert torch.allclose(
        bench.sra_ci[..., 0].double(), torch.as_tensor(lo), equal_nan=True, atol=1e-6
    )
    assert bool(
        (bench.sra_ci[..., 0] <= bench.sra + 1e-6).all()
        and (bench.sra <= bench.sra_ci[..., 1] + 1e-6).all()
    )


def test_json_is_written_atomically_and_round_trips(bench_and_windows, tmp_path):
    bench, _, _ = bench_and_windows
    path = bench.save_json(tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert data["lens_names"] == ["logit", "random-linear"]
    assert torch.allclose(torch.tensor(data["kl"], dtype=torch.float64), bench.kl.double())
    assert data["table"][1]["lens"] == "random-linear"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    md = bench.to_markdown()
    assert md.count("\n") == 3 and "| random-linear |" in md


def test_page_has_a_figure_per_metric_and_the_table(bench_and_windows):
    from tlmicroscope.viz.bench import lens_bench_figure, lens_bench_page

    bench, _, _ = bench_and_windows
    html = lens_bench_page(bench).render()
    assert html.count("Plotly.newPlot") == 8 and "<table" in html and "random-linear" in html
    fig = lens_bench_figure(bench, "kl_bpb")
    assert torch.allclose(torch.tensor(fig.data[1].y), (bench.kl[1] * bench.nats_to_bpb).double())
    with pytest.raises(ValueError, match="metric must be one of"):
        lens_bench_figure(bench, "accuracy")


def test_bad_input_names_the_fix(tiny_llama):
    from tlmicroscope.lenses.bench import lens_bench

    with pytest.raises(ValueError, match="names repeat.*mapping"):
        lens_bench(tiny_llama, lenses=["logit", "logit"], corpus=CORPUS, progress=False)
    with pytest.raises(ValueError, match=r"residual indices 0\.\.2"):
        lens_bench(tiny_llama, lenses=["logit"], corpus=CORPUS, cbe_layers=[3], progress=False)
    with pytest.raises(ValueError, match="another model"):
        lens_bench(tiny_llama, lenses=[RandomLinearLens(5, 32)], corpus=CORPUS, progress=False)


def test_one_window_bench_falls_back_to_any_donors_and_says_so(tiny_llama):
    """Same-position donors need two sequences; one window uses donors anywhere in it (a note
    says so)."""
    from tlmicroscope.lenses.bench import lens_bench

    bench = lens_bench(
        tiny_llama,
        lenses=["logit"],
        corpus=CORPUS,
        n_tokens=SEQ,
        seq_len=SEQ,
        holdout=0.5,
        depth_n_tokens=SEQ,
        cbe_layers=[1],
        cbe_k=2,
        cbe_n_tokens=SEQ,
        cbe_max_iter=2,
        fidelity_n_tokens=SEQ,
        sra_n_samples=4,
        progress=False,
    )
    assert "same-position" in bench.notes["stimulus-response"]
    assert torch.isfinite(bench.sra).any()
