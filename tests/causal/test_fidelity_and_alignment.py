"""Causal fidelity and stimulus-response alignment against computations done by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlmicroscope.causal import (
    aitchison_similarity,
    causal_fidelity,
    derangement,
    extract_causal_basis,
    stimulus_response_alignment,
)
from tlmicroscope.lenses import LogitLens, Readout

pytestmark = pytest.mark.filterwarnings("ignore:CBE on only")


def _tokens(batch=2, pos=12, seed=0):
    return torch.randint(0, 256, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _kl_rows(logp, logq):
    return float((logp.exp() * (logp - logq)).sum(-1).mean())


@pytest.mark.models
@pytest.mark.parametrize("mode", ["mean", "resample"])
def test_fidelity_influences_match_hand_computation(tiny_gpt2, mode):
    model = tiny_gpt2
    toks = _tokens()
    B = torch.linalg.qr(torch.randn(32, 3, generator=torch.Generator().manual_seed(2))).Q
    res = causal_fidelity(
        model, lens="logit", basis=B, layer=1, tokens=toks, mode=mode, seed=4, progress=False
    )
    name = "blocks.1.hook_resid_pre"
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks, names_filter=[name])
    h = cache[name].double()
    flat = h.reshape(-1, 32)
    target = (
        flat.mean(0).expand_as(flat) if mode == "mean" else flat[derangement(flat.shape[0], seed=4)]
    )
    readout = Readout(model)
    logp_model = torch.log_softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    for j in range(3):
        v = B[:, j].double()
        ablated = flat + torch.outer((target - flat) @ v, v)
        lp = torch.log_softmax(readout(flat.float()).double(), -1)
        lq = torch.log_softmax(readout(ablated.float()).double(), -1)
        assert float(res.lens_influence[j]) == pytest.approx(_kl_rows(lp, lq), rel=1e-3)
        with torch.no_grad():
            out = model.run_with_hooks(
                toks,
                fwd_hooks=[
                    (name, lambda a, hook, ablated=ablated: ablated.reshape(a.shape).to(a.dtype))
                ],
            )
        lq_model = torch.log_softmax(out.double(), -1).reshape(-1, out.shape[-1])
        assert float(res.model_influence[j]) == pytest.approx(
            _kl_rows(logp_model, lq_model), rel=1e-3
        )
    ranks = lambda x: np.argsort(np.argsort(x))  # noqa: E731 - Spearman = Pearson of ranks (no ties)
    expected = np.corrcoef(ranks(res.lens_influence.numpy()), ranks(res.model_influence.numpy()))[
        0, 1
    ]
    assert res.spearman == pytest.approx(expected)
    assert res.mode == mode and res.layer == 1 and res.n_tokens == 24


@pytest.mark.models
def test_fidelity_takes_the_basis_mode_layer_and_mean(tiny_llama):
    toks = _tokens(2, 16)
    basis = extract_causal_basis(
        tiny_llama, lens="logit", corpus=toks, layer=2, k=3, progress=False
    )
    res = causal_fidelity(tiny_llama, lens="logit", basis=basis, tokens=toks, progress=False)
    assert res.layer == 2 and res.mode == "mean"
    # On the extraction tokens with the extraction mean, the lens influence is the CBE energy.
    torch.testing.assert_close(res.lens_influence, basis.energies, rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="extracted at layer 2"):
        causal_fidelity(tiny_llama, lens="logit", basis=basis, layer=1, tokens=toks)
    with pytest.raises(ValueError, match="Pass the layer"):
        causal_fidelity(tiny_llama, lens="logit", basis=basis.vectors, tokens=toks)
    with pytest.raises(ValueError, match="d_model is 32"):
        causal_fidelity(tiny_llama, lens="logit", basis=torch.randn(16, 2), layer=1, tokens=toks)
    with pytest.raises(ValueError, match="no lens translator"):
        causal_fidelity(tiny_llama, lens="logit", basis=basis.vectors, layer=3, tokens=toks)


def test_aitchison_similarity_against_the_dense_clr_formula():
    g = torch.Generator().manual_seed(0)
    x, y = (
        torch.randn(5, 9, generator=g, dtype=torch.float64),
        torch.randn(5, 9, generator=g, dtype=torch.float64),
    )
    w = torch.rand(5, 9, generator=g, dtype=torch.float64)
    got = aitchison_similarity(x, y, w)
    for i in range(5):
        wi = w[i] / w[i].sum()
        C = torch.eye(9, dtype=torch.float64) - torch.ones(9, 1, dtype=torch.float64) @ wi[None]
        W = torch.diag(wi)
        cx, cy = C @ x[i], C @ y[i]
        expected = (cx @ W @ cy) / torch.sqrt((cx @ W @ cx) * (cy @ W @ cy))
        assert float(got[i]) == pytest.approx(float(expected), abs=1e-12)
    # Normalising (log_softmax) either side changes nothing; the score is a cosine.
    torch.testing.assert_close(aitchison_similarity(torch.log_softmax(x, -1), y + 3.0, w), got)
    assert (got.abs() <= 1).all()


@pytest.mark.models
def test_stimulus_response_sample_matches_a_hand_intervention(tiny_llama):
    model = tiny_llama
    toks = _tokens(2, 10, seed=3)
    res = stimulus_response_alignment(
        model,
        lens=["logit", LogitLens.paper()],
        tokens=toks,
        layer=[0, 2],
        n_samples=5,
        seed=1,
        progress=False,
    )
    assert res.alignment.shape == (2, 2, 5) and res.lens_names == (
        "logit",
        "logit (paper: no final norm)",
    )
    readout = Readout(model)
    names = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    with torch.no_grad():
        final, cache = model.run_with_cache(toks, names_filter=names)
    for ki, layer in enumerate((0, 2)):
        for s in (0, 4):
            (b, t), (db, dt) = res.positions[s].tolist(), res.donors[ki, s].tolist()
            h = cache[names[layer]]
            prev = torch.zeros_like(h) if layer == 0 else cache[names[layer - 1]]
            upd = h - prev
            new = h[b, t] + upd[db, dt] - upd[b, t]

            def patch(act, hook, t=t, new=new):
                act = act.clone()
                act[0, t] = new
                return act

            with torch.no_grad():
                treated = model.run_with_hooks(toks[b : b + 1], fwd_hooks=[(names[layer], patch)])[
                    0, t
                ]
            clean = final[b, t]
            stimulus = readout(new) - readout(h[b, t])
            w = 0.5 * (torch.softmax(clean, -1) + torch.softmax(treated, -1))
            expected = aitchison_similarity(
                stimulus.double(), (treated - clean).double(), w.double()
            )
            assert float(res.alignment[0, ki, s]) == pytest.approx(float(expected), abs=1e-4)
            assert (db, dt) != (b, t)
    df = res.to_dataframe()
    assert list(df["layer"]) == [0, 2, 0, 2]
    with pytest.raises(ValueError, match="out of range"):
        stimulus_response_alignment(model, lens="logit", tokens=toks, layer=3)


@pytest.mark.models
def test_fidelity_interval_is_the_percentile_bootstrap_over_tokens(tiny_gpt2):
    from scipy.stats import spearmanr

    from tlmicroscope.causal._bootstrap import bootstrap_indices

    toks = _tokens(2, 12)
    B = torch.linalg.qr(torch.randn(32, 5, generator=torch.Generator().manual_seed(3))).Q
    res = causal_fidelity(
        tiny_gpt2, lens="logit", basis=B, layer=1, tokens=toks, seed=2, n_boot=300, progress=False
    )
    assert res.n_directions == 5 and res.lens_kl.shape == (5, 24) and res.model_kl.shape == (5, 24)
    torch.testing.assert_close(res.lens_kl.mean(1), res.lens_influence)
    torch.testing.assert_close(res.model_kl.mean(1), res.model_influence)
    # Brute force: the same resamples, scipy's spearmanr on each, numpy percentiles.
    lk, mk = res.lens_kl.double().numpy(), res.model_kl.double().numpy()
    rhos = [
        spearmanr(lk[:, i].mean(1), mk[:, i].mean(1)).statistic
        for i in bootstrap_indices(24, 300, 2)
    ]
    lo, hi = np.nanquantile(rhos, [0.025, 0.975])
    assert res.spearman_ci == pytest.approx((lo, hi), abs=1e-9)
    assert "k = 5 directions" in res.describe()
    assert np.isnan(
        causal_fidelity(
            tiny_gpt2, lens="logit", basis=B, layer=1, tokens=toks, n_boot=0, progress=False
        ).spearman_ci[0]
    )


def test_spearman_bootstrap_covers_a_known_correlation():
    from tlmicroscope.causal.fidelity import spearman_bootstrap

    rng = np.random.default_rng(1)
    # Influences whose token means are exactly ordered in both: every resample keeps the order
    # only when the per-token noise is small against the gaps; here it is, so rho is 1 throughout.
    lens = np.arange(8.0)[:, None] + rng.normal(0, 0.05, (8, 200))
    assert spearman_bootstrap(lens, 2 * lens + 1, n_boot=200) == (1.0, 1.0)
    # Independent influences: the interval straddles 0 and is wide.
    lo, hi = spearman_bootstrap(rng.normal(size=(8, 200)), rng.normal(size=(8, 200)), n_boot=500)
    assert lo < 0 < hi and hi - lo > 0.5
    with pytest.raises(ValueError, match="k n_tokens"):
        spearman_bootstrap(np.zeros((3, 4)), np.zeros((3, 5)))


def test_bootstrap_mean_interval_matches_the_normal_theory_interval():
    from tlmicroscope.causal._bootstrap import bootstrap_mean_ci

    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.5, size=(3, 400))
    lo, hi = bootstrap_mean_ci(x, n_boot=4000, seed=1)
    half = 1.96 * x.std(1, ddof=1) / np.sqrt(400)
    np.testing.assert_allclose(lo, x.mean(1) - half, atol=0.03)
    np.testing.assert_allclose(hi, x.mean(1) + half, atol=0.03)
    # NaN samples are left out of each resample's mean.
    with_nan = np.concatenate([x, np.full((3, 50), np.nan)], 1)
    lo2, _ = bootstrap_mean_ci(with_nan, n_boot=4000, seed=1)
    assert np.all(np.isfinite(lo2)) and np.allclose(lo2, lo, atol=0.05)


@pytest.mark.models
def test_stimulus_response_same_position_donors_and_intervals(tiny_llama):
    from tlmicroscope.causal._bootstrap import bootstrap_indices

    toks = _tokens(3, 9, seed=5)
    res = stimulus_response_alignment(
        tiny_llama,
        lens=["logit", LogitLens.paper()],
        tokens=toks,
        n_samples=12,
        seed=2,
        progress=False,
    )
    assert res.donor_mode == "same_position"
    pos, don = res.positions, res.donors
    assert (pos[:, 1] != 0).all()  # position 0 is never treated
    assert (don[..., 1] == pos[None, :, 1]).all() and (don[..., 0] != pos[None, :, 0]).all()
    # Intervals against a brute-force percentile bootstrap over the samples.
    lo, hi = res.confidence_intervals(n_boot=500, seed=3)
    a = res.alignment.double().numpy()
    idx = bootstrap_indices(12, 500, 3)
    for li in range(2):
        for ki in range(len(res.layers)):
            means = [a[li, ki, i].mean() for i in idx]
            assert (lo[li, ki], hi[li, ki]) == pytest.approx(
                tuple(np.quantile(means, [0.025, 0.975])), abs=1e-12
            )
    cmp = res.compare("logit", 1, n_boot=500, seed=3)
    diff = a[0] - a[1]
    for ki in range(len(res.layers)):
        q = np.quantile([diff[ki, i].mean() for i in idx], [0.025, 0.975])
        assert (cmp["ci_low"][ki], cmp["ci_high"][ki]) == pytest.approx(tuple(q), abs=1e-12)
        assert bool(cmp["higher"][ki]) == (q[0] > 0) and bool(cmp["lower"][ki]) == (q[1] < 0)
    df = res.to_dataframe(n_boot=500, seed=3)
    assert {"ci_low", "ci_high"} <= set(df.columns)
    with pytest.raises(ValueError, match="at least 2 sequences"):
        stimulus_response_alignment(tiny_llama, lens="logit", tokens=toks[:1], progress=False)
    with pytest.raises(ValueError, match="donors must be one of"):
        stimulus_response_alignment(
            tiny_llama, lens="logit", tokens=toks, donors="near", progress=False
        )
    with pytest.raises(ValueError, match="No lens named"):
        res.compare("tuned")


@pytest.mark.models
def test_stimulus_response_any_donors_keep_the_earlier_draws(tiny_llama):
    toks = _tokens(1, 10, seed=3)  # one sequence: only the 'any' mode has donors
    res = stimulus_response_alignment(
        tiny_llama, lens="logit", tokens=toks, n_samples=6, seed=1, donors="any", progress=False
    )
    g = torch.Generator().manual_seed(1)
    treated = torch.randperm(10, generator=g)[:6]
    assert res.positions[:, 1].tolist() == treated.tolist()
    offs = torch.randint(1, 10, (6,), generator=g)
    assert res.donors[0, :, 1].tolist() == ((treated + offs) % 10).tolist()
