"""component_lens: shares add up to the model's logits; a head's share equals what removing that
head from the final residual does to the logit, measured by a patched forward pass (independent
of the W_O/W_U algebra the lens uses)."""

import pytest
import torch

from tlmicroscope.inputs import to_tokens
from tlmicroscope.lenses.components import component_lens
from tlmicroscope.models import access

pytestmark = pytest.mark.models


def _scale(model, h):
    """1 / rms of the (centred, for LayerNorm) final residual, with the model's epsilon."""
    if model.cfg.normalization_type in ("LN", "LNPre"):
        h = h - h.mean(-1, keepdim=True)
    return torch.rsqrt(h.pow(2).mean(-1) + model.cfg.eps)


def test_shares_add_up_to_the_model_logits(tiny):
    toks = to_tokens(tiny, "Shares add up.")
    with torch.no_grad():
        logits = tiny(toks)
    cl = component_lens(tiny, toks, targets=["a", 17, "d"])
    total = cl.embed + cl.heads.sum(1).sum(0) + cl.attn_bias.sum(0) + cl.mlp.sum(0) + cl.bias
    if cl.pos_embed is not None:
        total = total + cl.pos_embed
    ids = [
        int(tiny.to_tokens("a", prepend_bos=False)[0, 0]),
        17,
        int(tiny.to_tokens("d", prepend_bos=False)[0, 0]),
    ]
    torch.testing.assert_close(total, logits[..., ids], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cl.attn, cl.heads.sum(1) + cl.attn_bias, atol=1e-5, rtol=1e-4)
    assert cl.max_logit_error < 1e-4 and cl.logit_space == "logit"
    assert (cl.pos_embed is not None) == (tiny.cfg.positional_embedding_type == "standard")


@pytest.mark.parametrize("layer", [0, 2])
def test_a_heads_share_is_its_direct_effect_in_a_patched_run(tiny, layer):
    """Zero head h at `layer` while every later attention and MLP output is pinned to its clean
    value: the final residual loses exactly that head's output, so with the final norm's scale
    frozen, the logit change is the head's direct effect: (z - b) - (s / s') (z' - b)."""
    toks = to_tokens(tiny, "Patch one head.")
    n = tiny.cfg.n_layers
    head, tid = 1, 42
    last = f"blocks.{n - 1}.hook_resid_post"
    with torch.no_grad():
        logits, cache = tiny.run_with_cache(toks)
        clean = {
            name: cache[name].clone()
            for name in cache.cache_dict
            if name.endswith(("attn.hook_z", "hook_mlp_out"))
        }
        got = {}

        def zero_head(z, hook):
            z = z.clone()
            z[:, :, head] = 0
            return z

        hooks = [
            (f"blocks.{layer}.attn.hook_z", zero_head),
            (last, lambda h, hook: got.__setitem__("h", h.clone())),
        ]
        for later in range(layer + 1, n):
            hooks.append(
                (
                    f"blocks.{later}.attn.hook_z",
                    lambda z, hook, k=f"blocks.{later}.attn.hook_z": clean[k],
                )
            )
        for later in range(layer, n):
            hooks.append(
                (
                    f"blocks.{later}.hook_mlp_out",
                    lambda m, hook, k=f"blocks.{later}.hook_mlp_out": clean[k],
                )
            )
        patched = tiny.run_with_hooks(toks, fwd_hooks=hooks)
        norm = access.final_norm(tiny)
        W_U, b_U = access.unembed_weights(tiny)
        b = (b_U[tid] if b_U is not None else 0.0) + (
            norm.bias @ W_U[:, tid] if norm.bias is not None else 0.0
        )
        s, s2 = _scale(tiny, cache[last]), _scale(tiny, got["h"])
        expected = (logits[..., tid] - b) - (s / s2) * (patched[..., tid] - b)
    cl = component_lens(tiny, toks, targets=tid)
    torch.testing.assert_close(cl.head(layer, head)[..., 0], expected, atol=2e-5, rtol=1e-4)
    assert float(expected.abs().max()) > 1e-3  # the head does move the logit


def test_predicted_and_next_targets_and_dataframe(tiny_llama):
    toks = to_tokens(tiny_llama, "next one")
    cl = component_lens(tiny_llama, toks, targets="predicted")
    with torch.no_grad():
        logits = tiny_llama(toks)
    assert torch.equal(cl.target_ids[..., 0], logits.argmax(-1))
    nxt = component_lens(tiny_llama, toks, targets="next")
    assert int(nxt.target_ids[0, -1, 0]) == -1 and torch.isnan(nxt.heads[:, :, 0, -1]).all()
    assert torch.equal(nxt.target_ids[0, :-1, 0], toks[0, 1:])
    df = cl.to_dataframe(pos=-1)
    n, H = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads
    assert len(df) == 1 + n * (H + 2) + 1
    assert df.logit_share.sum() == pytest.approx(float(cl.logit[0, -1, 0]), abs=1e-4)


def test_cache_input_and_per_block_mode(tiny_gpt2):
    toks = to_tokens(tiny_gpt2, "cache me")
    logits, cache = tiny_gpt2.run_with_cache(toks)
    a = component_lens(cache, toks, targets="e", logits=logits)
    b = component_lens(tiny_gpt2, toks, targets="e", heads=False)
    torch.testing.assert_close(a.attn, b.attn, atol=1e-6, rtol=1e-6)
    assert torch.isnan(b.heads).all() and not b.per_head
    with pytest.raises(ValueError, match="heads=False"):
        b.head(0, 0)
    _, small = tiny_gpt2.run_with_cache(toks, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="ActivationCache lacks"):
        component_lens(small, toks)


def test_bad_input_names_the_fix(tiny_llama):
    cl = component_lens(tiny_llama, "abc", targets="a")
    H = tiny_llama.cfg.n_heads
    with pytest.raises(
        ValueError, match=f"Head {H} is out of range: .* valid heads are 0..{H - 1}"
    ):
        cl.head(0, H)
    with pytest.raises(ValueError, match="Layer -1 is out of range: valid layers are 0..2"):
        cl.head(-1, 0)
    with pytest.raises(ValueError, match="targets is empty"):
        component_lens(tiny_llama, "abc", targets=[])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        component_lens(tiny_llama, "abc", targets=[10**6])
    with pytest.raises(ValueError, match="probabilities add, logits do not"):
        component_lens(tiny_llama, "abc", targets=[{"a", "b"}])
