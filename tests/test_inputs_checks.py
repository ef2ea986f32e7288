"""The shared input layer refuses what would silently give wrong numbers (issue 14, item 7).

A cache holding NaN/inf, boolean "token ids", and a cache paired with another text's tokens are
refused by ``tlmicroscope.inputs`` before any analysis that takes a cache does its work.
"""

import pytest
import torch

from tlmicroscope.capture import capture
from tlmicroscope.causal._hidden import hidden_states
from tlmicroscope.geometry.components import capture_components
from tlmicroscope.geometry.layer_geometry import layer_geometry
from tlmicroscope.geometry.norms import norm_profile
from tlmicroscope.inputs import check_cache, to_tokens
from tlmicroscope.lenses.trajectory import prediction_trajectory
from tlmicroscope.microscope.contextualization import contextualization
from tlmicroscope.microscope.contributions import component_attribution, layer_contributions
from tlmicroscope.microscope.nonlinearity import token_nonlinearity

pytestmark = pytest.mark.models

TEXT = "The cat sat on the mat, then it slept."
OTHER = "A dog ran."
SAME_LENGTH = "The dog sat on the mat, then it slept."  # one letter of TEXT changed

# Every public analysis that accepts an ActivationCache, called on (cache, tokens).
ANALYSES = {
    "capture": lambda c, t: capture(c, t, sites=("resid",)),
    "prediction_trajectory": lambda c, t: prediction_trajectory(c, t),
    "layer_geometry": lambda c, t: layer_geometry(c, t),
    "norm_profile": lambda c, t: norm_profile(c, t, progress=False),
    "capture_components": lambda c, t: capture_components(c, t, progress=False),
    "token_nonlinearity": lambda c, t: token_nonlinearity(c, t, mode="paper"),
    "layer_contributions": lambda c, t: layer_contributions(c, t),
    "component_attribution": lambda c, t: component_attribution(c, t),
    "contextualization": lambda c, t: contextualization(c, t, probe=None),
}


def _cache(model, text=TEXT):
    toks = model.to_tokens(text)
    _, cache = model.run_with_cache(toks)
    return cache, toks


def _poison(cache, name, value):
    t = cache[name].clone()
    t[0, 2, 3] = value
    cache.cache_dict[name] = t
    return cache


@pytest.mark.parametrize("analysis", sorted(ANALYSES))
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_cache_with_nan_or_inf_is_refused_naming_hook_and_layer(tiny_llama, analysis, value):
    cache, toks = _cache(tiny_llama)
    _poison(cache, "blocks.1.hook_resid_pre", value)
    with pytest.raises(
        ValueError, match=r"1 NaN or infinite values in .*layer [01].*index \(0, 2, 3\)"
    ) as err:
        ANALYSES[analysis](cache, toks)
    assert "blocks.1.hook_resid_pre" in str(err.value)


def test_cache_without_tokens_is_checked_too(tiny_llama):
    cache, _ = _cache(tiny_llama)
    _poison(cache, "blocks.2.hook_mlp_out", float("nan"))
    with pytest.raises(ValueError, match=r"blocks\.2\.hook_mlp_out \(layer 2"):
        capture(cache, sites=("resid",))
    with pytest.raises(ValueError, match="NaN or infinite"):
        hidden_states(tiny_llama, cache, 1)


@pytest.mark.parametrize("analysis", sorted(ANALYSES))
def test_cache_of_another_text_is_named_as_such(tiny_llama, analysis):
    cache, toks = _cache(tiny_llama)
    other = tiny_llama.to_tokens(OTHER)
    n, m = toks.shape[-1], other.shape[-1]
    with pytest.raises(
        ValueError, match=rf"computed on 1 x {n} tokens.*passed are 1 x {m}.*another text"
    ):
        ANALYSES[analysis](cache, other)


@pytest.mark.parametrize("analysis", sorted(ANALYSES))
def test_cache_of_another_text_of_the_same_length_is_refused(tiny_llama, analysis):
    cache, toks = _cache(tiny_llama)
    other = tiny_llama.to_tokens(SAME_LENGTH)
    assert other.shape == toks.shape
    # Independent count: the positions whose token differs.
    n_diff = int((other != toks).sum())
    first = int((other != toks).nonzero()[0, 1])
    with pytest.raises(
        ValueError,
        match=rf"at {n_diff} of {toks.numel()} positions, first at \(batch 0, "
        rf"position {first}\).*same length",
    ):
        ANALYSES[analysis](cache, other)


def test_a_sound_cache_gives_what_the_model_gives(tiny):
    cache, toks = _cache(tiny)
    check_cache(cache, toks)
    from_cache = prediction_trajectory(cache, toks)
    from_model = prediction_trajectory(tiny, toks)
    torch.testing.assert_close(from_cache.kl, from_model.kl, atol=1e-5, rtol=0)


def test_masked_attention_scores_may_hold_minus_inf_but_not_nan(tiny_llama):
    cache, toks = _cache(tiny_llama)
    name = "blocks.0.attn.hook_attn_scores"
    scores = cache[name].clone()
    scores[..., 0, 1:] = float("-inf")  # what a causal mask writes
    cache.cache_dict[name] = scores
    check_cache(cache, toks)
    scores[0, 0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_cache(cache, toks)


@pytest.mark.parametrize("bools", [torch.tensor([[True, False, True]]), [True, False, True]])
def test_boolean_tokens_are_not_token_ids(tiny_llama, bools):
    with pytest.raises(ValueError, match="boolean"):
        to_tokens(tiny_llama, bools)
    with pytest.raises(ValueError, match="boolean"):
        prediction_trajectory(tiny_llama, bools)
    # Integer ids 1, 0, 1 stay accepted.
    assert to_tokens(tiny_llama, [1, 0, 1]).tolist() == [[1, 0, 1]]


@pytest.mark.parametrize("dtype, big", [(torch.float32, 3e38), (torch.float16, 6e4)])
def test_huge_finite_values_are_not_taken_for_inf(tiny_llama, dtype, big):
    # In float32 their sum overflows (the fast path's signal), but every element is finite: no
    # error. float16 is summed in float32, where it cannot overflow.
    cache, toks = _cache(tiny_llama)
    name = "blocks.1.hook_resid_pre"
    t = torch.full_like(cache[name], big, dtype=dtype)
    assert bool(torch.isfinite(t).all())
    if dtype == torch.float32:
        assert not torch.isfinite(t.sum())
    cache.cache_dict[name] = t
    check_cache(cache, toks)
    t[0, 1, 0] = float("inf")
    with pytest.raises(ValueError, match=r"1 NaN or infinite values .*index \(0, 1, 0\)"):
        check_cache(cache, toks)
