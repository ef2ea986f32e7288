"""Layer contributions through a lens, and direct logit attribution of components."""

import pytest
import torch

from tlmicroscope.lenses import LogitLens
from tlmicroscope.microscope import component_attribution, layer_contributions

pytestmark = pytest.mark.models


class AffineLens:
    """A small lens of our own: h -> h @ W_l + b_l per layer (follows the Lens protocol)."""

    name = "affine-test"
    final_norm = True

    def __init__(self, n_layers: int, d: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.W = torch.eye(d) + 0.1 * torch.randn(n_layers, d, d, generator=g)
        self.b = 0.1 * torch.randn(n_layers, d, generator=g)

    def transform(self, h, layer):
        return h @ self.W[layer] + self.b[layer]

    def check_model(self, model):
        return None


def _brute_force_losses(model, text, transform):
    """−log softmax(unembed(ln_final(transform(h^l))))[next] with the model's own modules."""
    toks = model.to_tokens(text)
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    logits, cache = model.run_with_cache(toks, names_filter=names)
    out = []
    with torch.no_grad():
        for layer, name in enumerate(names):
            h = cache[name] if layer == n else transform(cache[name], layer)
            lg = logits if layer == n else model.unembed(model.ln_final(h))
            lp = torch.log_softmax(lg.float(), -1)[0, :-1]
            out.append(-lp.gather(1, toks[0, 1:, None]).squeeze(1))
    return torch.stack(out)


def test_logit_lens_losses_match_the_model_modules(tiny):
    text = "Layer contributions, checked."
    lc = layer_contributions(tiny, text)
    expected = _brute_force_losses(tiny, text, lambda h, layer: h)
    assert torch.allclose(lc.loss[:, 0, :-1], expected, atol=1e-4)
    assert torch.isnan(lc.loss[:, 0, -1]).all()
    assert torch.allclose(lc.delta, lc.loss[:-1] - lc.loss[1:], equal_nan=True)
    assert lc.layer_labels[-1] == f"h{tiny.cfg.n_layers}" and lc.mean_loss().shape == (
        tiny.cfg.n_layers + 1,
    )


def test_any_lens_can_be_used(tiny_llama):
    lens = AffineLens(tiny_llama.cfg.n_layers, tiny_llama.cfg.d_model)
    text = "Through a lens of our own."
    lc = layer_contributions(tiny_llama, text, lens=lens)
    assert torch.allclose(
        lc.loss[:, 0, :-1], _brute_force_losses(tiny_llama, text, lens.transform), atol=1e-4
    )
    assert lc.provenance.lens == "affine-test"
    plain = layer_contributions(tiny_llama, text, lens=LogitLens())
    assert not torch.allclose(plain.loss[:-1], lc.loss[:-1], equal_nan=True)


def test_component_attribution_sums_to_the_logit(tiny):
    attr = component_attribution(tiny, "Attribution adds up.", target="predicted")
    n = tiny.cfg.n_layers
    assert (
        attr.attribution.shape[0]
        == len(attr.labels)
        == (2 * n + (2 if "pos_embed" in attr.labels else 1))
    )
    assert torch.allclose(attr.attribution.sum(0) + attr.bias, attr.logit, atol=1e-4)
    with torch.no_grad():
        logits = tiny(tiny.to_tokens("Attribution adds up."))
    assert torch.equal(attr.target_tokens, logits.argmax(-1))
    centred = logits - logits.mean(-1, keepdim=True)
    assert torch.allclose(
        attr.logit, centred.gather(-1, attr.target_tokens[..., None])[..., 0], atol=1e-4
    )
    assert attr.block_totals().shape == (n, 1, attr.logit.shape[1])


def test_component_attribution_matches_transformer_lens_apply_ln(tiny):
    toks = tiny.to_tokens("TransformerLens agrees")
    with torch.no_grad():
        _, cache = tiny.run_with_cache(toks)
    stack, labels = cache.decompose_resid(layer=-1, mode="all", return_labels=True)
    scaled = cache.apply_ln_to_stack(stack, layer=-1)
    target = toks.roll(-1, 1)
    attr = component_attribution(cache, toks, target=target, center=False)
    W_U = tiny.W_U
    ln_w = dict(tiny.ln_final.named_parameters())
    weight = next(v for k, v in ln_w.items() if k.split(".")[-1] in ("w", "weight"))
    expected = (scaled * weight * W_U[:, target[0]].T).sum(-1)
    assert tuple(labels) == attr.labels
    assert torch.allclose(attr.attribution, expected, atol=1e-4)


def test_next_token_target_and_bad_targets(tiny_llama):
    toks = tiny_llama.to_tokens("next tokens")
    attr = component_attribution(tiny_llama, toks, target="next")
    assert attr.target_tokens[0, -1] == -1 and torch.isnan(attr.attribution[:, 0, -1]).all()
    assert torch.equal(attr.target_tokens[0, :-1], toks[0, 1:])
    with pytest.raises(ValueError, match="shape"):
        component_attribution(tiny_llama, toks, target=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="target must be"):
        component_attribution(tiny_llama, toks, target="best")
    _, partial = tiny_llama.run_with_cache(toks, names_filter=["hook_embed"])
    with pytest.raises(ValueError, match="lacks"):
        component_attribution(partial, toks)


def test_tuned_lens_through_the_shared_readout(tiny_llama):
    from tlmicroscope.lenses.tuned import TunedLens

    lens = TunedLens.for_model(tiny_llama)
    with torch.no_grad():
        lens.weight.add_(0.05 * torch.randn_like(lens.weight))
        lens.bias.add_(0.05 * torch.randn_like(lens.bias))
    text = "A tuned lens reads this."
    lc = layer_contributions(tiny_llama, text, lens=lens)
    expected = _brute_force_losses(tiny_llama, text, lambda h, layer: lens.transform(h, layer))
    assert torch.allclose(lc.loss[:, 0, :-1], expected, atol=1e-4)
