"""Attention-vs-MLP separation: ~1 on separable clouds, ~0.5 on mixed ones, and bad input."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry import ComponentStates, component_separation


def _states(attn: torch.Tensor, mlp: torch.Tensor, n_layers: int = 1) -> ComponentStates:
    """Two components for one block, as ``[state batch pos d]`` with positions 1.. (no position
    0)."""
    acts = torch.stack([attn, mlp]).unsqueeze(1)  # [2 1 pos d]
    return ComponentStates(
        activations=acts,
        components=("attn_out", "mlp_out"),
        layers=(0, 0),
        hook_names=("blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"),
        tokens=None,
        str_tokens=None,
        positions=torch.arange(1, acts.shape[2] + 1),
        n_layers=n_layers,
    )


def _two_blocks(sep: torch.Tensor, mixed: torch.Tensor) -> ComponentStates:
    a = _states(*sep)
    b = _states(*mixed)
    acts = torch.cat([a.activations, b.activations])
    return ComponentStates(
        activations=acts,
        components=("attn_out", "mlp_out") * 2,
        layers=(0, 0, 1, 1),
        hook_names=("a0", "m0", "a1", "m1"),
        tokens=None,
        str_tokens=None,
        positions=a.positions,
        n_layers=2,
    )


def test_separable_clouds_score_one_and_mixed_clouds_score_chance():
    g = torch.Generator().manual_seed(0)
    n, d = 300, 16
    shift = torch.zeros(d)
    shift[0] = 6.0
    separable = (
        torch.randn(n, d, generator=g) + shift + 2.0,
        torch.randn(n, d, generator=g) - shift + 2.0,
    )
    mixed = (torch.randn(n, d, generator=g) + 2.0, torch.randn(n, d, generator=g) + 2.0)
    res = component_separation(
        _two_blocks(torch.stack(separable), torch.stack(mixed)), n_folds=5, seed=0
    )
    assert res.layers == (0, 1)
    assert float(res.accuracy[0]) >= 0.99
    assert float(res.silhouette[0]) > 0.3
    assert abs(float(res.accuracy[1]) - 0.5) < 0.08
    assert abs(float(res.silhouette[1])) < 0.05
    assert res.chance == 0.5 and res.most_separated() == 0
    assert res.n_points.tolist() == [300, 300]
    df = res.to_dataframe()
    assert list(df.columns) == ["layer", "accuracy", "accuracy_std", "silhouette", "n_points"]


def test_top_pca_components_only():
    g = torch.Generator().manual_seed(2)
    n, d = 200, 10
    # The classes differ only along a low-variance direction: separable in full, not in the top 2
    # PCs.
    scale = torch.ones(d)
    scale[:2] = 20.0
    a = torch.randn(n, d, generator=g) * scale
    b = torch.randn(n, d, generator=g) * scale
    a[:, 9] += 4.0
    full = component_separation(_states(a, b), metric="euclidean")
    top2 = component_separation(_states(a, b), metric="euclidean", n_pca=2)
    assert float(full.accuracy[0]) > 0.95
    assert abs(float(top2.accuracy[0]) - 0.5) < 0.1
    assert top2.provenance is None or top2.provenance.settings["separation"]["n_pca"] == 2
    with pytest.raises(ValueError, match="n_pca"):
        component_separation(_states(a, b), n_pca=50)


def test_euclidean_silhouette_and_unit_vectors():
    g = torch.Generator().manual_seed(1)
    n, d = 200, 8
    # Same directions, very different lengths: separable by norm, not by direction.
    base = torch.randn(n, d, generator=g)
    base[:, 0] += 3.0
    short, long = base[:100], base[100:] * 50
    res_raw = component_separation(_states(short, long), metric="euclidean", max_points=100)
    res_unit = component_separation(
        _states(short, long), unit=True, metric="cosine", max_points=100
    )
    assert float(res_raw.accuracy[0]) > 0.9
    assert abs(float(res_unit.accuracy[0]) - 0.5) < 0.15


def test_on_a_tiny_model(tiny):
    toks = torch.randint(0, 250, (4, 16), generator=torch.Generator().manual_seed(0))
    res = component_separation(tiny, toks, n_folds=3, progress=False)
    assert res.layers == tuple(range(tiny.cfg.n_layers))
    assert res.n_points.tolist() == [4 * 15] * tiny.cfg.n_layers  # position 0 dropped
    assert ((res.accuracy >= 0) & (res.accuracy <= 1)).all()
    assert res.provenance.settings["separation"]["n_folds"] == 3


def test_bad_input():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="fewer than n_folds"):
        component_separation(_states(x[0, :3], x[1, :3]), n_folds=5)
    with pytest.raises(ValueError, match="constant"):
        component_separation(_states(torch.ones(10, 4), torch.ones(10, 4)), n_folds=2)
    with pytest.raises(ValueError, match="two different components"):
        component_separation(_states(x[0], x[1]), components=("attn_out", "attn_out"))
    with pytest.raises(ValueError, match="no block with both"):
        component_separation(_states(x[0], x[1]), components=("attn_out", "resid_mid"))
    with pytest.raises(ValueError, match="metric"):
        component_separation(_states(x[0], x[1]), metric="manhattan")
    with pytest.raises(ValueError, match="n_folds"):
        component_separation(_states(x[0], x[1]), n_folds=1)
