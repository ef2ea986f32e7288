"""The paper's findings on the embedded SmolLM2-135M (short windows, to stay quick)."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry import (
    capture_components,
    component_separation,
    norm_profile,
    positional_geometry,
    project,
)

pytestmark = [pytest.mark.embedded, pytest.mark.models]


@pytest.fixture(scope="module")
def windows(embedded_model):
    from tlmicroscope.corpus import token_windows

    return token_windows(embedded_model, None, seq_len=64, n_windows=4, shuffle=True, seed=0)


@pytest.fixture(scope="module")
def states(embedded_model, windows):
    return capture_components(
        embedded_model,
        windows,
        components=("embed", "attn_out", "resid_mid", "mlp_out", "resid_post"),
        progress=False,
    )


def test_residual_pieces_add_up(states):
    """The reference's faithfulness check, on the real model."""
    prev = states.select(components=("embed",)).activations[0]
    for layer in range(states.n_layers):

        def get(c, layer=layer):
            return states.select(components=(c,), layers=[layer]).activations[0]

        mid = get("resid_mid")
        torch.testing.assert_close(
            prev + get("attn_out"), mid, rtol=1e-4, atol=1e-3 * float(mid.abs().max())
        )
        post = get("resid_post")
        torch.testing.assert_close(
            mid + get("mlp_out"), post, rtol=1e-4, atol=1e-3 * float(post.abs().max())
        )
        prev = post


def test_first_token_norm_spike(states):
    prof = norm_profile(states, components="resid_post")
    ratio = prof.first_token_ratio
    assert float(ratio[0]) < 2.0  # no spike straight after the first block
    assert float(ratio[11:28].min()) > 20.0  # a massive first-token norm through the middle
    assert int(ratio.argmax()) >= 2


def test_attention_and_mlp_outputs_separate(states):
    res = component_separation(
        states.select(components=("attn_out", "mlp_out"), layers=[5, 14, 23]),
        n_folds=3,
        max_points=200,
    )
    assert res.layers == (5, 14, 23)
    assert float(res.accuracy.min()) > 0.9
    assert float(res.silhouette.min()) > 0.0


def test_projection_keeps_the_origin(states):
    pair = states.select(components=("attn_out", "mlp_out"), layers=[10]).drop_first()
    proj = project(pair, n_components=2)
    torch.testing.assert_close(proj.coords, pair.flat() @ proj.reducer.components_.T)


def test_rotary_positions_use_the_mean_residual(embedded_model, windows):
    geo = positional_geometry(embedded_model, windows, n_components=4, progress=False)
    assert geo.source == "mean_residual" and "rotary" in geo.description
    assert geo.vectors.shape == (64, embedded_model.cfg.d_model)
    # Later positions converge on one direction; the first position stands apart.
    assert float(geo.convergence[32:].mean()) > float(geo.convergence[0])
