"""Positional geometry: a known helix in W_pos is recovered; rotary models get the mean residual."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tlmicroscope.geometry import capture_components, intermediate_layers, positional_geometry
from tlmicroscope.geometry.components import unit_length
from tlmicroscope.geometry.positions import fit_sinusoid

AMPS = (3.0, 2.0, 1.0)  # amplitude of frequencies 1, 2, 3 (cycles over the context)


def _helix(n_pos: int, d: int, seed: int = 0) -> torch.Tensor:
    p = torch.arange(n_pos, dtype=torch.float64)
    cols = []
    for f, a in enumerate(AMPS, start=1):
        cols += [
            a * torch.cos(2 * math.pi * f * p / n_pos),
            a * torch.sin(2 * math.pi * f * p / n_pos),
        ]
    q, _ = torch.linalg.qr(
        torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    )
    return (torch.stack(cols, 1) @ q[:, : len(cols)].T).float()


@pytest.mark.models
def test_helix_recovered_from_w_pos(model_kind):
    from tlmicroscope.models import tiny_model

    model = tiny_model(
        "gpt2", kind=model_kind, n_layers=1, seed=3
    )  # our own copy: W_pos is modified
    n_pos, d = model.cfg.n_ctx, model.cfg.d_model
    helix = _helix(n_pos, d)
    from tlmicroscope.models import access

    with torch.no_grad():
        access.positional_embedding_weights(model).copy_(helix)
    torch.testing.assert_close(access.positional_embedding_weights(model).detach(), helix)
    geo = positional_geometry(model)
    assert geo.source == "W_pos" and "W_pos" in geo.description
    assert geo.pc_frequency.tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    assert (geo.pc_sinusoid_r2 > 0.999).all() and geo.is_helix
    evr = geo.projection.explained_variance_ratio
    total = sum(a * a for a in AMPS)
    torch.testing.assert_close(
        evr, torch.tensor([9, 9, 4, 4, 1, 1]) / (2 * total), rtol=1e-4, atol=1e-5
    )
    c = geo.projection.coords.numpy()
    np.testing.assert_allclose(
        np.hypot(c[:, 0], c[:, 1]), AMPS[0], rtol=1e-4
    )  # a circle of radius 3
    steps = np.diff(np.unwrap(np.arctan2(c[:, 1], c[:, 0])))
    np.testing.assert_allclose(
        np.abs(steps), 2 * math.pi / n_pos, rtol=1e-3
    )  # one turn over the context
    lag = torch.arange(n_pos).unsqueeze(1) - torch.arange(n_pos).unsqueeze(0)
    expected = (
        sum(a * a * torch.cos(2 * math.pi * f * lag / n_pos) for f, a in enumerate(AMPS, 1)) / total
    )
    torch.testing.assert_close(geo.cosine, expected.float(), rtol=1e-4, atol=1e-4)
    assert "PC1 1.00 cycles" in geo.summary()


@pytest.mark.models
def test_random_w_pos_is_not_a_helix(tiny_gpt2):
    geo = positional_geometry(tiny_gpt2, n_positions=64)
    assert geo.source == "W_pos" and geo.vectors.shape == (64, 32)
    assert not geo.is_helix


@pytest.mark.models
def test_rotary_model_uses_the_mean_residual(tiny_llama):
    toks = torch.randint(0, 250, (6, 16), generator=torch.Generator().manual_seed(0))
    layers = intermediate_layers(tiny_llama.cfg.n_layers)
    geo = positional_geometry(tiny_llama, toks, n_components=4, progress=False)
    assert geo.source == "mean_residual"
    assert (
        "no learned positional table" in geo.description and "6 corpus windows" in geo.description
    )
    assert geo.layers == tuple(layers) and geo.n_windows == 6
    names = [f"blocks.{lay}.hook_{c}" for lay in layers for c in ("resid_mid", "resid_post")]
    _, cache = tiny_llama.run_with_cache(toks, names_filter=lambda n: n in names)
    expected = unit_length(torch.stack([cache[n] for n in names]).mean(dim=(0, 1)))
    torch.testing.assert_close(geo.vectors, expected, rtol=1e-5, atol=1e-5)
    assert geo.cosine.shape == (16, 16) and geo.convergence.shape == (16,)
    torch.testing.assert_close(geo.cosine.diagonal(), torch.ones(16), rtol=1e-5, atol=1e-5)
    # Same answer from states captured beforehand.
    states = capture_components(
        tiny_llama,
        toks,
        components=("resid_mid", "resid_post"),
        layers=layers,
        average="samples",
        progress=False,
    )
    torch.testing.assert_close(positional_geometry(states, n_components=4).vectors, geo.vectors)


@pytest.mark.models
def test_rotary_model_defaults_to_corpus_windows(tiny_llama):
    geo = positional_geometry(tiny_llama, n_windows=2, seq_len=12, n_components=3, progress=False)
    assert geo.source == "mean_residual" and geo.vectors.shape == (12, 32) and geo.n_windows == 2


def test_fit_sinusoid():
    p = np.arange(100)
    f, r2 = fit_sinusoid(2.0 * np.sin(2 * np.pi * 4.5 * p / 100) + 7.0)
    assert f == pytest.approx(4.5) and r2 == pytest.approx(1.0, abs=1e-9)
    noise = np.random.default_rng(0).normal(size=100)
    assert fit_sinusoid(noise)[1] < 0.3
    assert fit_sinusoid(np.ones(10)) == (0.0, 0.0)


@pytest.mark.models
def test_bad_input(tiny_gpt2, tiny_llama):
    with pytest.raises(ValueError, match="n_positions"):
        positional_geometry(tiny_gpt2, n_positions=2)
    states = capture_components(
        tiny_llama, "abc", components=("resid_post",), average="samples", progress=False
    )
    with pytest.raises(ValueError, match="at least 4 positions"):
        positional_geometry(states)
