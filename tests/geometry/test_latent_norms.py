"""Norm profiles: the first-token spike on a synthetic cache, streamed norms, states input."""

from __future__ import annotations

import pytest
import torch
from transformer_lens import ActivationCache

from tlmicroscope.geometry import capture_components, norm_profile


def _vectors_with_norms(norms: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """Random directions scaled to exactly the given norms (any leading shape)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(*norms.shape, d, generator=g)
    return v / v.norm(dim=-1, keepdim=True) * norms.unsqueeze(-1)


@pytest.mark.models
def test_first_token_spike_on_a_synthetic_cache(tiny_llama):
    n_layers, batch, pos, d = tiny_llama.cfg.n_layers, 3, 9, tiny_llama.cfg.d_model
    spike = torch.tensor([2.0, 40.0, 7.0])
    cache_dict = {}
    expected_ratio = []
    for layer in range(n_layers):
        norms = torch.linspace(1.0, 3.0, pos).repeat(batch, 1) * (layer + 1)  # grows with depth
        norms[:, 0] = (
            spike[layer] * (layer + 1) * torch.tensor([0.5, 1.0, 1.5])
        )  # mean = spike*(l+1)
        cache_dict[f"blocks.{layer}.hook_resid_post"] = _vectors_with_norms(norms, d, layer)
        rest = norms[:, 1:].mean(0)
        expected_ratio.append(float(norms[:, 0].mean() / rest.median()))
    prof = norm_profile(ActivationCache(cache_dict, tiny_llama))
    torch.testing.assert_close(
        prof.first_token_ratio, torch.tensor(expected_ratio), rtol=1e-5, atol=1e-5
    )
    assert int(prof.first_token_ratio.argmax()) == 1
    # Without position 0 the mean norm grows with depth.
    by_layer = prof.by_layer()
    assert (by_layer[1:] > by_layer[:-1]).all()
    mean_rest = float(torch.linspace(1.0, 3.0, pos)[1:].mean())
    torch.testing.assert_close(
        by_layer, mean_rest * torch.tensor([1.0, 2.0, 3.0]), rtol=1e-5, atol=1e-5
    )
    df = prof.to_dataframe()
    assert list(df["first_token_ratio"].round(4)) == [round(r, 4) for r in expected_ratio]


@pytest.mark.models
def test_streamed_norms_equal_run_with_cache(tiny):
    toks = torch.randint(0, 250, (5, 11), generator=torch.Generator().manual_seed(0))
    prof = norm_profile(
        tiny, toks, components=("resid_mid", "resid_post"), batch_size=2, progress=False
    )
    names = [
        f"blocks.{lay}.hook_{c}"
        for lay in range(tiny.cfg.n_layers)
        for c in ("resid_mid", "resid_post")
    ]
    _, cache = tiny.run_with_cache(toks, names_filter=lambda n: n in names)
    ref = torch.stack([cache[n].norm(dim=-1) for n in names])
    torch.testing.assert_close(prof.norms, ref, rtol=1e-5, atol=1e-5)
    assert prof.layer_labels[:2] == ("b0.resid_mid", "h1") == prof.layer_labels()[:2]
    assert prof.str_tokens.shape == (5, 11)
    states = capture_components(tiny, toks, components=("resid_post",), progress=False)
    from_states = norm_profile(states)
    torch.testing.assert_close(from_states.norms, ref[1::2], rtol=1e-5, atol=1e-5)


@pytest.mark.models
def test_bad_input(tiny_llama):
    one = norm_profile(tiny_llama, "h", progress=False)
    with pytest.raises(ValueError, match="position 0 and at least one other"):
        _ = one.first_token_ratio
    with pytest.raises(ValueError, match="Only position 0"):
        one.by_layer()
    states = capture_components(tiny_llama, "hey", components=("attn_out",), progress=False)
    with pytest.raises(ValueError, match="hold none of"):
        norm_profile(states, components="resid_post")
    with pytest.raises(ValueError, match="averaged over positions"):
        norm_profile(states.mean("positions"), components="attn_out")
    with pytest.raises(ValueError, match="Unknown components"):
        norm_profile(tiny_llama, "hey", components="resid")
