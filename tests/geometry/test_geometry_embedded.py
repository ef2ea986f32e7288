"""Token geometry on the embedded SmolLM2-135M: one 512-token window of the embedded corpus."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.corpus import token_windows
from tlmicroscope.geometry import layer_geometry

pytestmark = [pytest.mark.embedded, pytest.mark.models]


def test_layer_geometry_on_the_embedded_model(embedded_model):
    tokens = token_windows(embedded_model, seq_len=512, n_windows=1, shuffle=True, seed=3)
    geo = layer_geometry(embedded_model, tokens, max_scale=64)
    n_layers = embedded_model.cfg.n_layers
    assert geo.layers == tuple(range(n_layers + 1)) and geo.layer_labels[-1] == f"h{n_layers}·norm"
    # layer 0 is the embedding: one distinct vector per distinct token id
    assert int(geo.n_unique[0]) == len(set(tokens[0].tolist()))
    assert torch.all(geo.n_unique[1:] == 512)  # positions make every later vector distinct
    with torch.no_grad():
        assert geo.loss == pytest.approx(
            float(embedded_model(tokens, return_type="loss")), abs=1e-4
        )
    ids = geo.id(2)[1:]
    assert torch.all((ids > 1) & (ids < 60)), ids  # token clouds are low-dimensional (paper: 3-15)
    assert torch.all((geo.overlap >= 0) & (geo.overlap <= 1))
    assert torch.all(geo.cosine_with_diagonal > geo.cosine)  # the diagonal adds (1 - c) / N
    assert 0 < geo.contextual_entropy < 11 and torch.isfinite(geo.logits_gride).all()
