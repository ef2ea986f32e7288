"""The layer vocabulary: labels, hook names and the vectors they name, on several families."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope import layers
from tlmicroscope.geometry import capture_components, layer_geometry
from tlmicroscope.lenses import LogitLens, prediction_trajectory
from tlmicroscope.lenses.base import lens_features, lens_logits
from tlmicroscope.lenses.readout import Readout
from tlmicroscope.models import tiny_model

FAMILIES = ["llama", "gpt2"]
TEXT = "the cat sat on the mat and the dog sat on the log"


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_model(request.param, n_layers=3)


def _cache(model, text=TEXT):
    toks = model.to_tokens(text)
    with torch.no_grad():
        logits, cache = model.run_with_cache(toks)
    return toks, logits, cache


# ------------------------------------------------------------------- names and hooks
def test_residual_labels_and_hooks_by_hand():
    n = 4
    assert [layers.residual_label(i, n) for i in range(n + 1)] == ["h0", "h1", "h2", "h3", "h4"]
    assert [layers.residual_hook(i, n) for i in range(n + 1)] == [
        "blocks.0.hook_resid_pre",
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
        "blocks.2.hook_resid_post",
        "blocks.3.hook_resid_post",
    ]
    assert layers.residual_html(2) == "h<sup>2</sup>"
    assert layers.residual_labels(n, final_norm=True)[-1] == "h4·norm"
    assert layers.residual(n, n, normed=True).hook == "ln_final.hook_normalized"


@pytest.mark.parametrize("kind", list(layers.BLOCK_SITES))
def test_every_block_hook_round_trips(kind):
    n = 5
    for block in range(n):
        s = layers.site(kind, block, n_layers=n)
        assert layers.parse_label(s.label, n) == s
        if kind == "resid_pre":  # h^block: its canonical hook is the block before's resid_post
            assert s.label == f"h{block}"
            assert layers.parse_hook(f"blocks.{block}.hook_resid_pre", n) == s
        elif kind == "resid_post":
            assert s.label == f"h{block + 1}"
        else:
            assert s.label == f"b{block}.{kind}" and s.html == f"b<sub>{block}</sub>.{kind}"
            assert s.hook == layers.BLOCK_SITES[kind][0].format(l=block)
        assert layers.parse_hook(s.hook, n) == s
        assert s.description


def test_component_labels_follow_the_vocabulary():
    n = 3
    assert layers.component_label("embed", -1, n) == "h0"
    assert layers.component_label("resid_post", 1, n) == "h2"
    assert layers.component_label("resid_mid", 1, n) == "b1.resid_mid"
    assert layers.component_label("ln_final", n, n) == "h3·norm"
    assert layers.component_label("attn_out", None, n) == "attn_out mean"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: layers.residual_label(5, 4), r"h\^0\.\.h\^4"),
        (lambda: layers.parse_label("out"), r"'h<index>'.*'b<block>\.<site>'"),
        (lambda: layers.parse_hook("blocks.0.attn.hook_q"), r"not a hook the layer vocabulary"),
        (lambda: layers.site("attn_out", 4, n_layers=4), r"block in 0\.\.3"),
        (lambda: layers.parse_hook("ln_final.hook_normalized"), r"pass n_layers"),
        (lambda: layers.residual_index("b1.attn_out"), r"not a residual"),
        (lambda: layers.residual(2, 4, normed=True), r"Only the last residual"),
    ],
)
def test_bad_names_say_what_to_write(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_layer_labels_are_a_tuple_that_may_be_called():
    labels = layers.residual_labels(2)
    assert isinstance(labels, tuple) and labels == ("h0", "h1", "h2") and labels() == labels


def test_tokens_without_a_tokenizer_print_one_way():
    assert layers.token_text(12) == "<12>"
    assert layers.str_tokens(None, torch.tensor([[1, 2], [3, 4]])) == (
        ("<1>", "<2>"),
        ("<3>", "<4>"),
    )
    m = tiny_model("llama", n_layers=1)
    toks = m.to_tokens("hi", prepend_bos=False)
    assert layers.str_tokens(m, toks) == (tuple(m.to_str_tokens(toks[0])),)


# ------------------------------------------------- the named vector is the cache entry
def test_each_residual_label_names_the_cache_entry(model):
    """h^l read by hook name equals the residual the model computes there, computed independently
    (the embedding plus every block's attention and MLP outputs up to block l-1)."""
    _, _, cache = _cache(model)
    n = model.cfg.n_layers
    running = cache["blocks.0.hook_resid_pre"].clone()
    for idx in range(n + 1):
        site = layers.parse_label(f"h{idx}", n)
        torch.testing.assert_close(cache[site.hook], running, atol=1e-5, rtol=1e-5)
        if idx < n:  # the alias: resid_pre of block idx is the same vector, the same name
            alias = layers.parse_hook(f"blocks.{idx}.hook_resid_pre", n)
            assert alias.label == site.label
            torch.testing.assert_close(cache[alias.hook], running, atol=1e-5, rtol=1e-5)
            running = running + cache[f"blocks.{idx}.hook_attn_out"]
            torch.testing.assert_close(
                cache[layers.site("resid_mid", idx).hook], running, atol=1e-5, rtol=1e-5
            )
            running = running + cache[f"blocks.{idx}.hook_mlp_out"]


def test_results_label_rows_by_the_residual_they_read(model):
    """The row a trajectory, token geometry and latent capture call "h^l" holds what the hook of
    h^l holds."""
    toks, _, cache = _cache(model)
    n = model.cfg.n_layers
    readout = Readout.for_model(model)
    traj = prediction_trajectory(model, toks, top_k=3)
    assert traj.layer_labels == tuple(f"h{i}" for i in range(n + 1))
    for row, label in enumerate(traj.layer_labels):
        h = cache[layers.parse_label(label, n).hook][0]
        lp = lens_logits(LogitLens(), readout, h, row, n, log_probs=True)
        ent = -(lp.exp() * lp).sum(-1)
        torch.testing.assert_close(traj.entropy[row, 0], ent, atol=2e-5, rtol=1e-4)

    geo = layer_geometry(model, TEXT, final_norm=False)
    assert geo.layer_labels == tuple(f"h{i}" for i in range(n + 1))
    for row, label in enumerate(geo.layer_labels):
        x = torch.nn.functional.normalize(
            cache[layers.parse_label(label, n).hook][0].double(), dim=-1
        )
        sim = x @ x.T
        off = ~torch.eye(sim.shape[0], dtype=torch.bool)
        assert float(geo.cosine[row]) == pytest.approx(float(sim[off].mean()), abs=1e-5)

    states = capture_components(
        model, toks, components=("embed", "resid_mid", "resid_post"), progress=False
    )
    for i, label in enumerate(states.state_labels()):
        hook = layers.parse_label(label, n).hook
        torch.testing.assert_close(
            states.activations[i, 0], cache[hook][0].float(), atol=1e-5, rtol=1e-5
        )


def test_lens_features_is_the_first_half_of_lens_logits(model):
    _, _, cache = _cache(model)
    readout = Readout.for_model(model)
    h = cache["blocks.1.hook_resid_pre"][0]
    for lens in (LogitLens(), LogitLens.paper()):
        x, W, b = lens_features(lens, readout, h, 1)
        z = x @ W + (0 if b is None else b)
        torch.testing.assert_close(readout.finish(z), lens_logits(lens, readout, h, 1))
    with pytest.raises(ValueError, match="width d_model"):
        lens_logits(LogitLens(), readout, h[:, :-1], 1)
