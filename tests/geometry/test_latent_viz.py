"""Latent-geometry figures on synthetic projections and results (no model needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from tlmicroscope.geometry import project
from tlmicroscope.geometry.norms import NormProfile
from tlmicroscope.geometry.positions import PositionalGeometry
from tlmicroscope.geometry.separation import SeparationResult
from tlmicroscope.geometry.special_inputs import VocabularyNorms
from tlmicroscope.viz.latent import (
    component_color,
    first_token_plot,
    norm_profile_plot,
    pca_pair_grid,
    positional_cosine_heatmap,
    projection_scatter,
    separation_plot,
    trajectory_plot,
    vocabulary_norm_histogram,
)


def _rgb(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s[4:-1].split(","))


@pytest.fixture
def synthetic():
    """A projection of 4 layers x {attn_out, mlp_out} x 10 positions, every label present."""
    rng = np.random.default_rng(0)
    n_layers, n_pos = 4, 10
    comps = ["attn_out", "mlp_out"]
    x, fields = (
        [],
        {k: [] for k in ("component", "layer", "layer_label", "position", "sample", "token")},
    )
    for layer in range(n_layers):
        for c in comps:
            for p in range(n_pos):
                x.append(rng.normal(size=8) + (3 if c == "attn_out" else -3))
                fields["component"].append(c)
                fields["layer"].append(layer)
                fields["layer_label"].append(str(layer))
                fields["position"].append(p)
                fields["sample"].append(0)
                fields["token"].append(f"tok{p}")
    proj = project(np.asarray(x, dtype=np.float32), n_components=6, fields=fields)
    return dataclasses.replace(proj, n_layers=n_layers)


def test_reference_colours_shaded_by_depth():
    early, late = _rgb(component_color("attn_out", 0.0)), _rgb(component_color("attn_out", 1.0))
    assert early == (0, 0, 128) and late == (153, 153, 255)
    assert (
        _rgb(component_color("mlp_out", 0.5))[0] > 150
        and _rgb(component_color("mlp_out", 0.5))[2] < 100
    )
    g = _rgb(component_color("embed", 0.5))
    assert g[1] > g[0] and g[1] > g[2]
    y = _rgb(component_color("ln_final", 0.5))
    assert y[0] > 200 and y[1] > 200 and y[2] < 120
    assert sum(_rgb(component_color("mlp_out", 0.1))) < sum(_rgb(component_color("mlp_out", 0.9)))


def test_scatter_by_component(synthetic):
    fig = projection_scatter(synthetic, "component")
    assert [t.name for t in fig.data] == ["attn_out", "mlp_out"]
    attn = fig.data[0]
    assert isinstance(attn, go.Scattergl) and len(attn.x) == 40
    colours = [_rgb(c) for c in attn.marker.color]
    assert all(b > r for r, g, b in colours)  # blue family
    assert sum(colours[0]) < sum(colours[-1])  # layer 0 darker than layer 3
    assert all(r > b for r, g, b in (_rgb(c) for c in fig.data[1].marker.color))  # red family
    assert "token: %{customdata[0]}" in attn.hovertemplate and "position" in attn.hovertemplate
    assert attn.customdata[3][0] == "tok3"
    assert fig.layout.xaxis.title.text.startswith("PC1")


@pytest.mark.parametrize("color_by", ["layer", "position", "token", None])
def test_scatter_other_colourings(synthetic, color_by):
    fig = projection_scatter(synthetic, color_by)
    n = sum(len(t.x) for t in fig.data)
    assert n == len(synthetic)
    if color_by == "position":
        assert list(fig.data[0].marker.color[:3]) == [0.0, 1.0, 2.0]
    if color_by == "token":
        assert len(fig.data) == 10  # one legend entry per token text


def test_scatter_3d_and_subsampling(synthetic):
    fig = projection_scatter(synthetic, "layer", dims=3, max_points=25)
    assert isinstance(fig.data[0], go.Scatter3d) and len(fig.data[0].x) == 25
    assert "25 of 80 points shown" in fig.layout.title.text
    assert fig.layout.scene.zaxis.title.text.startswith("PC3")


def test_scatter_bad_input(synthetic):
    plain = project(np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32))
    with pytest.raises(ValueError, match="no 'token' field"):
        projection_scatter(plain, "token")
    with pytest.raises(ValueError, match="no 'component' field"):
        projection_scatter(plain, "component")
    with pytest.raises(ValueError, match="n_components=3"):
        projection_scatter(plain, None, dims=3)
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        projection_scatter(synthetic, None, dims=4)
    with pytest.raises(ValueError, match="color_by must be"):
        projection_scatter(synthetic, "sample")


def test_pair_grid(synthetic):
    fig = pca_pair_grid(synthetic, "position")
    assert len(fig.data) == 15
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0] == "PC1 vs PC2" and titles[-1] == "PC5 vs PC6"
    assert sum(bool(t.marker.showscale) for t in fig.data) == 1
    comp = pca_pair_grid(synthetic, "component", n_components=3)
    assert len(comp.data) == 3 * 2
    with pytest.raises(ValueError, match="at least 2 components"):
        pca_pair_grid(
            project(np.random.default_rng(0).normal(size=(9, 4)).astype(np.float32), n_components=1)
        )


def test_separation_norms_positions_vocab_plots():
    res = SeparationResult(
        (0, 1, 2),
        torch.tensor([0.5, 0.8, 0.99]),
        torch.tensor([0.02, 0.03, 0.01]),
        torch.tensor([0.0, 0.2, 0.5]),
        torch.tensor([10, 10, 10]),
        ("attn_out", "mlp_out"),
        0.5,
    )
    fig = separation_plot(res)
    two = separation_plot(res, also=res)
    assert len(two.data) == 3 and two.data[1].name == "accuracy (second result)"
    assert list(fig.data[0].y) == pytest.approx([0.5, 0.8, 0.99]) and list(
        fig.data[0].error_y.array
    )[2] == pytest.approx(0.01)
    norms = torch.ones(3, 2, 6)
    norms[:, :, 0] = torch.tensor([[5.0], [50.0], [8.0]])
    prof = NormProfile(norms, ("resid_post",) * 3, (0, 1, 2), torch.arange(6), None, 3)
    fig = norm_profile_plot(prof)
    assert fig.layout.yaxis.type == "log" and len(fig.data) == 3 and fig.data[1].y[0] == 50.0
    ft = first_token_plot(prof)
    assert list(ft.data[2].y) == [5.0, 50.0, 8.0]
    no_first = NormProfile(
        norms[:, :, 1:], ("resid_post",) * 3, (0, 1, 2), torch.arange(1, 6), None, 3
    )
    with pytest.raises(ValueError, match="no position 0"):
        first_token_plot(no_first)
    cos = torch.eye(4)
    geo = PositionalGeometry(
        "W_pos",
        "d",
        torch.eye(4),
        project(torch.eye(4) + 1e-3 * torch.arange(16.0).reshape(4, 4)),
        cos,
        torch.zeros(2),
        torch.zeros(2),
        torch.ones(4),
    )
    assert positional_cosine_heatmap(geo).data[0].z.shape == (4, 4)
    vn = VocabularyNorms(
        torch.rand(3, 50),
        torch.arange(50),
        np.array(["t"] * 50, dtype=object),
        ("resid_post",) * 3,
        (0, 1, 2),
        3,
        False,
    )
    h = vocabulary_norm_histogram(vn, layers=[1, 2])
    np.testing.assert_allclose(h.data[0].x, vn.norms[1:].mean(0).numpy(), rtol=1e-6)


@pytest.mark.models
def test_trajectory_plot(tiny_gpt2):
    from tlmicroscope.geometry import token_trajectories

    tr = token_trajectories(tiny_gpt2, "hello", positions=[1, 3], n_components=3)
    fig = trajectory_plot(tr, dims=3)
    assert [t.name for t in fig.data] == ["all states", "e @1", "l @3"]
    assert isinstance(fig.data[1], go.Scatter3d) and list(fig.data[1].text) == list(tr.layer_labels)
    np.testing.assert_allclose(fig.data[2].x, tr.coords[1, :, 0].numpy())
    with pytest.raises(ValueError, match="dims"):
        trajectory_plot(token_trajectories(tiny_gpt2, "hello", positions=[1]), dims=3)
