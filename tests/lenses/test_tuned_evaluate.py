"""evaluate_lens against a brute-force computation, bits per byte by hand, and the figures."""

import math

import pytest
import torch

from tlmicroscope.lenses import TunedLens
from tlmicroscope.lenses.evaluate import compare_layers, evaluate_lens, nats_to_bits_per_byte
from tlmicroscope.lenses.train import lens_token_windows, train_tuned_lens
from tlmicroscope.viz.tuned import (
    lens_comparison_figure,
    training_curve_figure,
    trajectory_comparison,
    transfer_heatmap,
)

pytestmark = pytest.mark.models

TEXT = [
    "Brute force is the slow, obvious way to compute the same numbers. " * 10,
    "Each layer is read through the lens and compared with the output. " * 10,
]


def _random_lens(model, seed=0):
    lens = TunedLens.for_model(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(0.2 * torch.randn(lens.weight.shape, generator=g))
        lens.bias.copy_(0.2 * torch.randn(lens.bias.shape, generator=g))
    return lens


def _brute_force(model, lens, windows):
    """Full [rows d_vocab] log-softmax per layer, via the model's own ln_final and unembed."""
    L = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    logits, cache = model.run_with_cache(windows, names_filter=names)
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    tgt = windows[:, 1:]
    out = {"kl": [], "cross_entropy": [], "entropy": [], "bias_kl": [], "q": []}
    p_bar = p.reshape(-1, p.shape[-1]).mean(0)
    for layer in range(L + 1):
        h = cache[names[layer]]
        if layer < L:
            h = lens.transform(h, layer)
        logq = torch.log_softmax(model.unembed(model.ln_final(h)), -1)
        q = logq.exp()
        out["kl"].append((p * (logp - logq)).sum(-1).mean())
        out["cross_entropy"].append(-logq[:, :-1].gather(-1, tgt.unsqueeze(-1)).mean())
        out["entropy"].append(-(q * logq).sum(-1).mean())
        q_bar = q.reshape(-1, q.shape[-1]).mean(0)
        out["bias_kl"].append((p_bar * (p_bar.log() - q_bar.log())).sum())
    return {k: torch.stack(v) for k, v in out.items() if v}


def test_evaluate_matches_brute_force(tiny):
    lens = _random_lens(tiny)
    ev = evaluate_lens(
        tiny,
        lens=lens,
        corpus=TEXT,
        n_tokens=96,
        seq_len=32,
        split="all",
        bias=True,
        transfer=True,
        progress=False,
        chunk_size=20,
    )
    windows = lens_token_windows(tiny, TEXT, seq_len=32, split="all")[:3]
    brute = _brute_force(tiny, lens, windows)
    for stat in ("kl", "cross_entropy", "entropy", "bias_kl"):
        torch.testing.assert_close(
            getattr(ev, stat), brute[stat].float(), rtol=1e-4, atol=1e-5, msg=stat
        )
    assert ev.n_tokens == 96 and ev.layer_labels[-1] == f"h{len(ev.layer_labels) - 1}"
    # the transfer matrix's diagonal is each layer's own translator
    torch.testing.assert_close(torch.diagonal(ev.transfer_kl), ev.kl[:-1], rtol=1e-5, atol=1e-6)
    # the baseline is the logit lens on the same tokens
    logit = _brute_force(tiny, TunedLens.for_model(tiny), windows)
    torch.testing.assert_close(ev.baseline.kl, logit["kl"].float(), rtol=1e-4, atol=1e-5)
    assert ev.baseline.lens_name == "logit" and ev.baseline.transfer_kl is None


def test_bits_per_byte_hand_computation(tiny_llama):
    assert nats_to_bits_per_byte(100, 400) == pytest.approx(0.25 / math.log(2))
    # One ASCII character is one token and one byte; each document ends with an EOS token, which
    # decodes to no bytes. Two documents of 31 characters and seq_len 32: two windows of
    # 31 characters + EOS, so 64 tokens for 62 bytes.
    docs = ["abcdefghijklmnopqrstuvwxyz01234", "ABCDEFGHIJKLMNOPQRSTUVWXYZ56789"]
    ev = evaluate_lens(
        tiny_llama,
        lens="logit",
        corpus=docs,
        n_tokens=64,
        seq_len=32,
        split="all",
        baseline=False,
        progress=False,
    )
    assert (ev.n_tokens, ev.n_bytes) == (64, 62)
    factor = (64 / 62) / math.log(2)
    assert ev.nats_to_bpb == pytest.approx(factor)
    torch.testing.assert_close(ev.bits_per_byte("kl"), ev.kl * factor)
    torch.testing.assert_close(ev.statistic("cross_entropy", "bpb"), ev.cross_entropy * factor)
    # two-byte characters: 'é' is two byte tokens and two bytes
    ev2 = evaluate_lens(
        tiny_llama,
        lens="logit",
        corpus=["é" * 40],
        n_tokens=64,
        seq_len=32,
        split="all",
        baseline=False,
        progress=False,
    )
    assert (ev2.n_tokens, ev2.n_bytes) == (64, 64)
    with pytest.raises(ValueError, match="bytes"):
        nats_to_bits_per_byte(10, 0)
    with pytest.raises(ValueError, match="unit"):
        ev.statistic("kl", "bits")


def test_untrained_lens_evaluates_like_the_logit_lens(tiny_gpt2):
    ev = evaluate_lens(
        tiny_gpt2,
        lens=TunedLens.for_model(tiny_gpt2),
        corpus=TEXT,
        n_tokens=64,
        seq_len=32,
        holdout=0.3,
        progress=False,
    )
    assert torch.equal(ev.kl, ev.baseline.kl)
    assert compare_layers(ev) == [False] * tiny_gpt2.cfg.n_layers
    df = ev.to_dataframe()
    assert list(df["label"]) == ["h0", "h1", "h2", "h3"] and "kl_bpb" in df and "logit_kl" in df


def test_evaluation_refuses_another_models_lens(tiny_llama, tiny_gpt2):
    with pytest.raises(ValueError, match="another model"):
        evaluate_lens(
            tiny_gpt2,
            lens=TunedLens.for_model(tiny_llama),
            corpus=TEXT,
            n_tokens=32,
            seq_len=32,
            progress=False,
        )


def test_figures_from_results(tiny_llama):
    res = train_tuned_lens(
        tiny_llama,
        TEXT,
        steps=2,
        tokens_per_step=64,
        seq_len=32,
        precision="fp32",
        progress=False,
        init_tokens=64,
    )
    ev = evaluate_lens(
        tiny_llama,
        lens=res.lens,
        corpus=TEXT,
        n_tokens=64,
        seq_len=32,
        holdout=0.3,
        bias=True,
        transfer=True,
        progress=False,
    )
    fig = lens_comparison_figure(ev, "kl", unit="bpb")
    assert [t.name for t in fig.data] == ["tuned", "logit"]
    assert list(fig.data[0].y) == pytest.approx((ev.kl * ev.nats_to_bpb).tolist())
    assert len(lens_comparison_figure({"a": ev, "b": ev.baseline}, "bias_kl").data) == 2
    curve = training_curve_figure({"muon": res, "again": res}, layers=[0, 2])
    assert len(curve.data) == 6 and list(curve.data[0].x) == [0, 64]
    heat = transfer_heatmap(ev)
    assert all(abs(heat.data[0].z[i][i]) < 1e-9 for i in range(3))
    with pytest.raises(ValueError, match="transfer=True"):
        transfer_heatmap(ev.baseline)
    from tlmicroscope.lenses import prediction_trajectory

    figs = trajectory_comparison(
        prediction_trajectory(tiny_llama, "abc", lens=res.lens),
        prediction_trajectory(tiny_llama, "abc"),
    )
    assert len(figs) == 2
