"""Intrinsic-dimension estimators against dadapy's reference values, independent re-statements of
the formulas, and manifolds of known dimension."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.optimize
import torch

from tlmicroscope.geometry import anisotropy, intrinsic_dimension, remove_duplicates
from tlmicroscope.geometry.intrinsic_dimension import gride_scales

# ALGORITHMS.md section 4 / reference/dadapy_reference.out (dadapy 0.3.4, N = 2000)
CUBE = {
    "base": 4.723459,
    "ml": 4.736761,
    "gride": [4.736761, 4.681714, 4.509694, 4.446793, 4.340236, 4.195750, 4.091207, 3.936172],
    "err": [0.105917, 0.075446, 0.051526, 0.035905, 0.024770, 0.016927, 0.011669, 0.007938],
}
GAUSS = {
    "base": 9.576141,
    "ml": 9.578024,
    "gride": [9.578024, 9.615794, 9.380162, 9.087746, 8.640730, 8.307740, 7.796845, 7.154216],
    "err": [0.214171, 0.155003, 0.107143, 0.073379, 0.049315, 0.033515, 0.022238, 0.014427],
}


def _cube() -> np.ndarray:
    rng = np.random.default_rng(0)
    x = np.zeros((2000, 50))
    x[:, :5] = rng.uniform(size=(2000, 5))
    return x


def _gauss() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2000, 10))


@pytest.mark.parametrize("make, ref", [(_cube, CUBE), (_gauss, GAUSS)], ids=["cube5", "gauss10"])
def test_reference_values(make, ref):
    x = make()
    # the table is printed to 6 decimals, so agreement to 1e-6 means |diff| <= 5e-7 + rounding
    assert intrinsic_dimension(x, "twonn").estimate == pytest.approx(ref["base"], abs=1e-6)
    assert intrinsic_dimension(x, "twonn", variant="ml").estimate == pytest.approx(
        ref["ml"], abs=1e-6
    )
    res = intrinsic_dimension(x, "gride", max_scale=256)
    assert res.scales == (2, 4, 8, 16, 32, 64, 128, 256)
    np.testing.assert_allclose(res.ids.numpy(), ref["gride"], atol=1e-6)
    np.testing.assert_allclose(res.errors.numpy(), ref["err"], atol=1e-6)
    assert res.n_duplicates == 0 and res.n_points == 2000


def _brute_sorted_distances(x: np.ndarray) -> np.ndarray:
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)


def test_twonn_and_gride_match_independent_formulas():
    """TwoNN by scipy's curve_fit, GRIDE by brentq on the score of the full likelihood."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 3)) @ rng.standard_normal((3, 20))
    d = _brute_sorted_distances(x)
    mu = d[:, 1] / d[:, 0]
    n = len(mu)
    x_fit = np.sort(np.log(mu))[: int(n * 0.9)]
    y_fit = -np.log(1 - np.arange(1, len(x_fit) + 1) / n)
    base, _ = scipy.optimize.curve_fit(lambda t, m: m * t, x_fit, y_fit)
    assert intrinsic_dimension(x, "twonn").estimate == pytest.approx(base[0], rel=1e-9)
    assert intrinsic_dimension(x, "twonn", variant="ml").estimate == pytest.approx(
        (n - 1) / np.log(mu).sum(), rel=1e-12
    )
    res = intrinsic_dimension(x, "gride", scales=(4, 16))
    for j, n2 in enumerate((4, 16)):
        n1 = n2 // 2
        m = d[:, n2 - 1] / d[:, n1 - 1]
        q95, q50 = np.percentile(m, [95, 50])
        m = m[m < 20 * (q95 - q50) + q50]
        nn = len(m)

        def score(dim, m=m, nn=nn, n1=n1, n2=n2):
            return (nn - 1) / dim + np.sum(
                ((n2 - n1 - 1) / (1 - m ** (-dim)) - (n2 - 1)) * np.log(m)
            )

        root = scipy.optimize.brentq(score, 0.01, 100, xtol=1e-12)
        assert float(res.ids[j]) == pytest.approx(root, abs=1e-6)


def _microscope_reference(emb: torch.Tensor, reduction_factor: int = 5) -> float:
    """A direct restatement of the LLM-Microscope loop (per-row distances, kthvalue)."""
    eps = 1e-8
    e = emb.to(torch.float64)
    e = e - e.mean(0, keepdim=True)
    e = e / (e * e).sum(1).sqrt().mean()
    r1, r2 = [], []
    for i in range(len(e)):
        dst = torch.nn.functional.pairwise_distance(e[i, None], e, eps=0)
        dst = torch.cat([dst[:i], dst[i + 1 :]])
        r1.append(torch.kthvalue(dst, 1)[0])
        r2.append(torch.kthvalue(dst, 2)[0])
    r1, r2 = torch.stack(r1), torch.stack(r2)
    bad = r1 < eps
    r1[bad], r2[bad] = eps, eps
    mu = r2 / r1
    mu[bad] = -1
    mu = torch.sort(mu).values
    useless = int((mu <= 1 + eps).sum())
    mu = mu[useless:]
    n = mu.shape[0]
    f = torch.arange(1 + useless, n + 1 + useless) / (n + useless)
    k = min(n // reduction_factor, n - 1)
    x, y = torch.log(mu)[:k], -torch.log(1 - f)[:k]
    return float((x * y).sum() / (x * x).sum())


@pytest.mark.parametrize("with_duplicates", [False, True])
def test_microscope_variant_matches_reference_loop(with_duplicates):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=g) @ torch.randn(4, 64, generator=g) + 3.0
    if with_duplicates:
        x = torch.cat([x, x[:30]])  # duplicates are dropped from the fit but kept in the ranks
    res = intrinsic_dimension(x, "twonn", variant="microscope")
    # the reference builds its empirical CDF in float32 (integer arange / int); we use float64
    assert res.estimate == pytest.approx(_microscope_reference(x), abs=1e-6)
    assert res.variant == "microscope" and res.n_duplicates == (30 if with_duplicates else 0)
    assert res.n_points == x.shape[0]  # this variant keeps duplicates in the ranks


def test_microscope_variant_recovers_known_dimensions():
    # ALGORITHMS/llm-microscope notes: the 20% fit over-reads high dimensions somewhat
    g = torch.Generator().manual_seed(2)
    for dim, lo, hi in ((2, 1.8, 2.3), (5, 4.4, 5.6)):
        x = (
            torch.randn(2000, dim, generator=g)
            @ torch.linalg.qr(torch.randn(100, dim, generator=g))[0].T
        )
        assert lo < intrinsic_dimension(x, "twonn", variant="microscope").estimate < hi


@pytest.mark.parametrize("method", ["twonn-base", "twonn-ml", "gride"])
def test_known_dimension_manifolds(method):
    g = torch.Generator().manual_seed(3)
    kind, _, variant = method.partition("-")
    kw = {"variant": variant} if variant else {"max_scale": 8}
    line = torch.rand(1500, 1, generator=g) * torch.randn(1, 576, generator=g)
    plane = torch.rand(1500, 2, generator=g) @ torch.randn(2, 576, generator=g)
    frame = torch.linalg.qr(torch.randn(576, 10, generator=g))[0]
    gauss10 = torch.randn(4000, 10, generator=g) @ frame.T + torch.randn(576, generator=g)
    for cloud, true, tol in ((line, 1, 0.1), (plane, 2, 0.15), (gauss10, 10, 1.0)):
        ids = intrinsic_dimension(cloud, kind, **kw).ids
        assert torch.all((ids - true).abs() < tol), (true, ids)


def test_gride_scale_two_equals_twonn_ml_without_outliers():
    x = _gauss()
    assert intrinsic_dimension(x, "gride", max_scale=2).estimate == pytest.approx(
        intrinsic_dimension(x, "twonn", variant="ml").estimate, abs=1e-6
    )


def test_duplicates_are_removed_and_reported():
    x = torch.tensor(_gauss())
    dup = torch.cat([x, x[:100], x[:10]])
    res = intrinsic_dimension(dup, "gride", max_scale=16)
    ref = intrinsic_dimension(x, "gride", max_scale=16)
    assert res.n_duplicates == 110 and res.n_points == 2000 and res.n_input == 2110
    torch.testing.assert_close(res.ids, ref.ids)
    _, kept, n_dup = remove_duplicates(dup)
    assert n_dup == 110 and kept.tolist() == list(range(2000))


def test_bad_input_messages():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 8, generator=g)
    with pytest.raises(ValueError, match="at least 257 distinct points"):
        intrinsic_dimension(x, "gride", max_scale=256)
    with pytest.raises(ValueError, match="at least 3 distinct points"):
        intrinsic_dimension(x[:2], "twonn")
    with pytest.raises(ValueError, match="All 50 points are identical"):
        intrinsic_dimension(torch.ones(50, 8), "twonn")
    with pytest.raises(ValueError, match="All 50 points are identical"):
        intrinsic_dimension(torch.ones(50, 8), "gride")
    with pytest.raises(ValueError, match="after removing 90 duplicates"):
        intrinsic_dimension(torch.cat([x[:10]] * 10), "gride", max_scale=16)
    bad = x.clone()
    bad[3, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        intrinsic_dimension(bad, "gride")
    with pytest.raises(ValueError, match="power of two"):
        intrinsic_dimension(x, "gride", max_scale=12)
    with pytest.raises(ValueError, match="Unknown TwoNN variant"):
        intrinsic_dimension(x, "twonn", variant="fit")
    with pytest.raises(ValueError, match="2-D"):
        intrinsic_dimension(x[None], "twonn")


def test_zero_distance_after_deduplication_is_refused():
    # distinct rows whose difference underflows float64 next to a unit-scale point
    x = torch.zeros(40, 3, dtype=torch.float64)
    x[:, 0] = torch.arange(40, dtype=torch.float64)
    x[1, 0], x[1, 1] = 0.0, 1e-300
    with pytest.raises(ValueError, match="zero distance after removing exact duplicates"):
        intrinsic_dimension(x, "twonn")


def test_auto_scales_follow_the_number_of_points():
    g = torch.Generator().manual_seed(6)
    res = intrinsic_dimension(torch.randn(70, 5, generator=g), "gride")
    assert res.scales == (2, 4, 8, 16, 32, 64)
    assert gride_scales(None, 3) == (2,)


def test_anisotropy_matches_svd():
    g = torch.Generator().manual_seed(7)
    for n, d in ((50, 200), (500, 20)):
        x = torch.randn(n, d, generator=g) * torch.linspace(0.1, 3, d) + 5
        e = x.double() - x.double().mean(0)
        s = torch.linalg.svdvals(e)
        ref = float(s[0] ** 2 / (s**2).sum())
        res = anisotropy(x)
        assert res.estimate == pytest.approx(ref, rel=1e-10)
        assert res.top_eigenvalue == pytest.approx(float(s[0] ** 2) / (n - 1), rel=1e-10)
    with pytest.raises(ValueError, match="identical"):
        anisotropy(torch.ones(10, 3))
    with pytest.raises(ValueError, match="at least 2 points"):
        anisotropy(torch.ones(1, 3))
