import pytest
import torch

from tlmicroscope.capture import (
    BLOCK_SITES,
    GLOBAL_SITES,
    capture,
    hook_name,
    residual_stream_names,
    stream,
)
from tlmicroscope.inputs import to_tokens

pytestmark = pytest.mark.models

TEXT = "The cat sat."


def _all_names(model, site):
    n = model.cfg.n_layers
    if site in GLOBAL_SITES:
        return [GLOBAL_SITES[site]]
    if site == "resid":
        return residual_stream_names(n)
    return [BLOCK_SITES[site].format(layer=layer) for layer in range(n)]


@pytest.mark.parametrize(
    "site",
    [
        "resid_pre",
        "resid_mid",
        "resid_post",
        "attn_out",
        "mlp_out",
        "ln1",
        "ln2",
        "z",
        "pattern",
        "mlp_post",
        "ln_final",
        "embed",
        "resid",
    ],
)
def test_capture_matches_run_with_cache(tiny, site):
    toks = to_tokens(tiny, TEXT)
    names = _all_names(tiny, site)
    logits, cache = tiny.run_with_cache(toks, names_filter=names)
    cap = capture(tiny, toks, sites=(site,), return_logits=True)
    expected = torch.stack([cache[n] for n in names])
    assert cap[site].shape == expected.shape
    torch.testing.assert_close(cap[site], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cap.logits, logits, rtol=1e-5, atol=1e-5)
    assert cap.labels(site) == names


def test_capture_layers_positions_and_cache_input(tiny_llama):
    toks = to_tokens(tiny_llama, TEXT)
    _, cache = tiny_llama.run_with_cache(toks)
    from_model = capture(tiny_llama, toks, sites=("attn_out",), layers=[2, 0], positions=[0, -1])
    from_cache = capture(cache, toks, sites=("attn_out",), layers=[2, 0], positions=[0, -1])
    expected = torch.stack([cache["blocks.2.hook_attn_out"], cache["blocks.0.hook_attn_out"]])[
        :, :, [0, len(TEXT) - 1]
    ]
    torch.testing.assert_close(from_model["attn_out"], expected)
    torch.testing.assert_close(from_cache["attn_out"], expected)
    assert from_model.layers["attn_out"] == (2, 0)
    assert from_model.positions.tolist() == [0, len(TEXT) - 1]


def test_cache_missing_a_hook_is_a_clear_error(tiny_llama):
    toks = to_tokens(tiny_llama, TEXT)
    _, cache = tiny_llama.run_with_cache(toks, names_filter=["blocks.0.hook_resid_post"])
    with pytest.raises(ValueError, match="lacks 1 requested hooks.*blocks.1.hook_resid_post"):
        capture(cache, toks, sites=("resid_post",), layers=[0, 1])


def test_unknown_site_and_layer_errors(tiny_llama):
    with pytest.raises(ValueError, match="Unknown site 'resid_prе'|Unknown site"):
        hook_name("resid_prе", 0)
    with pytest.raises(ValueError, match="out of range"):
        capture(tiny_llama, TEXT, sites=("resid_post",), layers=[7])


def test_stream_early_stop_gives_same_activations(tiny_llama):
    seen = {}
    out = stream(
        tiny_llama,
        TEXT,
        lambda s, layer, a: seen.__setitem__(layer, a.clone()),
        sites=("resid_pre",),
        layers=[0, 1],
        return_logits=False,
    )
    assert out is None
    _, cache = tiny_llama.run_with_cache(to_tokens(tiny_llama, TEXT))
    for layer in (0, 1):
        torch.testing.assert_close(seen[layer], cache[f"blocks.{layer}.hook_resid_pre"])


def test_hooks_are_removed_when_the_callback_raises(tiny_llama):
    toks = to_tokens(tiny_llama, TEXT)
    clean = tiny_llama(toks)

    def boom(site, layer, act):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        stream(tiny_llama, toks, boom, sites=("resid_post",))
    hooked = [name for name, hp in tiny_llama.hook_dict.items() if hp._forward_hooks]
    assert hooked == []
    torch.testing.assert_close(tiny_llama(toks), clean)
