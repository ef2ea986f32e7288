"""layer_geometry against an independent computation from captured activations, on both tiny
architectures and both model classes (marked ``models``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlmicroscope.capture import residual_stream_names
from tlmicroscope.geometry import (
    cosine_similarity,
    intrinsic_dimension,
    layer_geometry,
    neighbourhood_overlap,
)
from tlmicroscope.models import access

pytestmark = pytest.mark.models


def _tokens(n=120, seed=0):
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _final_norm(model, h):
    norm = access.final_norm(model)
    h = h.double()
    if norm.kind == "LN":
        h = h - h.mean(-1, keepdim=True)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    return h * norm.weight.double() + (0 if norm.bias is None else norm.bias.double())


def test_matches_estimators_on_captured_activations(tiny):
    toks = _tokens()
    geo = layer_geometry(tiny, toks)
    names = residual_stream_names(tiny.cfg.n_layers)
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(toks, names_filter=names)
    clouds = [cache[name][0].double() for name in names]
    clouds[-1] = _final_norm(tiny, clouds[-1])
    assert geo.layers == tuple(range(tiny.cfg.n_layers + 1))
    assert geo.gride_scales == (2, 4, 8, 16, 32, 64)
    for layer, cloud in enumerate(clouds):
        ref = intrinsic_dimension(cloud, "gride", max_scale=64)
        usable = torch.isfinite(geo.gride[layer])
        np.testing.assert_allclose(
            geo.gride[layer][usable].numpy(), ref.ids[: int(usable.sum())].numpy(), atol=1e-5
        )
        assert geo.twonn[layer] == pytest.approx(
            intrinsic_dimension(cloud, "twonn").estimate, abs=1e-6
        )
        assert geo.cosine[layer] == pytest.approx(cosine_similarity(cloud).mean, abs=1e-6)
        assert int(geo.n_unique[layer]) == ref.n_points
        if layer < len(clouds) - 1:
            ov = neighbourhood_overlap(cloud, clouds[layer + 1]).overlap
            np.testing.assert_allclose(geo.overlap[layer].numpy(), ov.numpy(), atol=1e-12)
    # the logits' cloud, measured on the [N d_vocab] logits themselves
    ref_logits = intrinsic_dimension(logits[0].double(), "gride", max_scale=64)
    np.testing.assert_allclose(geo.logits_gride.numpy(), ref_logits.ids.numpy(), atol=1e-4)
    logp = torch.log_softmax(logits[0].double(), -1)
    assert geo.contextual_entropy == pytest.approx(
        float(-(logp.exp() * logp).sum(-1).mean()), abs=1e-6
    )
    with torch.no_grad():
        assert geo.loss == pytest.approx(float(tiny(toks, return_type="loss")), abs=1e-5)


def test_cache_input_equals_model_input(tiny_llama):
    toks = _tokens(seed=1)
    _, cache = tiny_llama.run_with_cache(
        toks, names_filter=residual_stream_names(tiny_llama.cfg.n_layers)
    )
    a = layer_geometry(tiny_llama, toks)
    b = layer_geometry(cache, toks)
    torch.testing.assert_close(a.gride, b.gride, equal_nan=True, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.overlap, b.overlap)
    assert a.loss == pytest.approx(b.loss, abs=1e-5)
    assert a.contextual_entropy == pytest.approx(b.contextual_entropy, abs=1e-5)


def test_raw_last_layer_and_records(tiny_llama):
    toks = _tokens(seed=2)
    geo = layer_geometry(
        tiny_llama, toks, final_norm=False, logits=False, overlap_k=(1, 2), max_scale=16
    )
    assert geo.layer_labels[-1] == f"h{tiny_llama.cfg.n_layers}" and geo.logits_gride is None
    with torch.no_grad():
        last = tiny_llama.run_with_cache(toks)[1][
            f"blocks.{tiny_llama.cfg.n_layers - 1}.hook_resid_post"
        ][0]
    assert geo.cosine[-1] == pytest.approx(cosine_similarity(last).mean, abs=1e-6)
    rec = geo.to_record()
    assert len(rec["gride"]) == tiny_llama.cfg.n_layers + 1 and rec["overlap_k"] == [1, 2]
    df = geo.to_dataframe()
    assert list(df["layer"]) == list(geo.layers) and "gride_16" in df and "overlap_2" in df


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match="at least 257 tokens"):
        layer_geometry(tiny_llama, _tokens(100), max_scale=256)
    with pytest.raises(ValueError, match="batch of 2"):
        layer_geometry(tiny_llama, torch.cat([_tokens(50), _tokens(50, 1)]))
    with pytest.raises(ValueError, match="at least 3 tokens"):
        layer_geometry(tiny_llama, _tokens(2))


def test_hooks_are_removed_when_a_layer_fails(tiny_llama, monkeypatch):
    import importlib

    lg = importlib.import_module(
        "tlmicroscope.geometry.layer_geometry"
    )  # the module, not the function

    toks = _tokens(seed=3)
    with torch.no_grad():
        before = tiny_llama(toks)

    def boom(*args, **kwargs):
        raise RuntimeError("estimator failed")

    monkeypatch.setattr(lg, "cloud_geometry", boom)
    with pytest.raises(RuntimeError, match="estimator failed"):
        lg.layer_geometry(tiny_llama, toks)
    monkeypatch.undo()
    with torch.no_grad():
        torch.testing.assert_close(tiny_llama(toks), before)  # no hook left behind
    geo = lg.layer_geometry(tiny_llama, toks)
    assert torch.isfinite(geo.gride[1:, 0]).all()


def test_cache_with_the_models_logits(tiny_llama):
    """With the logits of the cached run, entropy and loss come from them, not from a readout."""
    toks = _tokens(seed=4)
    names = residual_stream_names(tiny_llama.cfg.n_layers)
    with torch.no_grad():
        logits, cache = tiny_llama.run_with_cache(toks, names_filter=names)
    geo = layer_geometry(cache, toks, output_logits=logits)
    logp = torch.log_softmax(logits[0].double(), -1)
    assert geo.contextual_entropy == pytest.approx(
        float(-(logp.exp() * logp).sum(-1).mean()), abs=1e-9
    )
    nll = -logp[:-1].gather(1, toks[0, 1:, None]).mean()
    assert geo.loss == pytest.approx(float(nll), abs=1e-9)
    # the given logits are used as they are (a sharper copy has a lower entropy)
    doubled = layer_geometry(cache, toks, output_logits=2 * logits)
    assert doubled.contextual_entropy < geo.contextual_entropy
    torch.testing.assert_close(doubled.gride, geo.gride, equal_nan=True)
    with pytest.raises(ValueError, match="output_logits must be the"):
        layer_geometry(cache, toks, output_logits=logits[:, :-1])


def test_too_few_tokens_for_the_overlap(tiny_llama):
    from tlmicroscope.geometry.layer_geometry import min_tokens

    with pytest.raises(ValueError, match="overlap at k=6 needs at least 7 tokens"):
        layer_geometry(tiny_llama, _tokens(5))
    assert min_tokens(overlap_k=(1, 2, 3, 4)) == 5
    geo = layer_geometry(tiny_llama, _tokens(5), overlap_k=(1, 2, 3, 4))
    assert geo.overlap.shape == (tiny_llama.cfg.n_layers, 4)
