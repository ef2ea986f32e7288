"""Component capture: equality with run_with_cache, streaming, averaging, preprocessing, bad
input."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry.components import (
    COMPONENTS,
    ComponentStates,
    capture_components,
    layer_norm_parameter_free,
    state_plan,
    stream_states,
    unit_length,
)

pytestmark = pytest.mark.models


def _windows(n: int = 5, pos: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 250, (n, pos), generator=g)


def _reference(model, tokens, components, layers=None):
    """Every requested state from run_with_cache, stacked in forward order."""
    plan = state_plan(components, layers, model.cfg.n_layers)
    names = [s.hook for s in plan]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    return torch.stack([cache[n] for n in names]), plan


def _n_hooks(model) -> int:
    return sum(len(hp._forward_hooks) for hp in model.hook_dict.values())


def test_capture_matches_run_with_cache(tiny):
    toks = _windows()
    # The hooks' own vectors (norm states before the gain; test_latent_norm_gain covers the
    # default).
    st = capture_components(tiny, toks, batch_size=2, progress=False, norm_gain=False)
    ref, plan = _reference(tiny, toks, COMPONENTS)
    assert st.components == tuple(s.component for s in plan)
    assert st.components[0] == "embed" and st.components[-1] == "ln_final"
    assert st.layers[0] == -1 and st.layers[-1] == tiny.cfg.n_layers
    assert st.activations.shape == (1 + 6 * tiny.cfg.n_layers + 1, 5, 12, 32)
    torch.testing.assert_close(st.activations, ref, rtol=1e-5, atol=1e-5)
    assert st.str_tokens.shape == (5, 12)
    assert _n_hooks(tiny) == 0


def test_residual_pieces_add_up(tiny):
    """The reference's faithfulness check: resid_pre + attn_out = resid_mid, + mlp_out =
    resid_post."""
    st = capture_components(
        tiny,
        _windows(2),
        components=("embed", "attn_out", "resid_mid", "mlp_out", "resid_post"),
        progress=False,
    )
    prev = st.select(components=("embed",)).activations[0]
    for layer in range(tiny.cfg.n_layers):

        def get(c, layer=layer):
            return st.select(components=(c,), layers=[layer]).activations[0]

        torch.testing.assert_close(prev + get("attn_out"), get("resid_mid"), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            get("resid_mid") + get("mlp_out"), get("resid_post"), rtol=1e-5, atol=1e-5
        )
        prev = get("resid_post")


def test_layers_positions_and_subsampling(tiny_gpt2):
    toks = _windows(3, 20)
    st = capture_components(
        tiny_gpt2,
        toks,
        components=("attn_out", "mlp_out"),
        layers=[2, 0],
        drop_first=True,
        max_positions=5,
        progress=False,
    )
    assert st.layers == (0, 0, 2, 2)
    assert st.positions.tolist() == [1, 5, 10, 15, 19]  # 5 evenly spaced of 1..19
    ref, _ = _reference(tiny_gpt2, toks, ("attn_out", "mlp_out"), [0, 2])
    torch.testing.assert_close(st.activations, ref[:, :, st.positions], rtol=1e-5, atol=1e-5)
    assert st.tokens.tolist() == toks[:, st.positions].tolist()
    only = capture_components(
        tiny_gpt2, toks, components=("embed",), positions=slice(0, 4), progress=False
    )
    torch.testing.assert_close(
        only.activations[0], _reference(tiny_gpt2, toks, ("embed",))[0][0, :, :4]
    )


def test_streamed_averages_equal_means_of_the_full_capture(tiny_llama):
    toks = _windows(5, 10)
    full = capture_components(tiny_llama, toks, progress=False).activations
    s = capture_components(tiny_llama, toks, average="samples", batch_size=2, progress=False)
    torch.testing.assert_close(s.activations, full.mean(1, keepdim=True), rtol=1e-5, atol=1e-5)
    assert s.tokens is None and s.str_tokens is None and s.positions.tolist() == list(range(10))
    p = capture_components(tiny_llama, toks, average=("positions",), batch_size=3, progress=False)
    torch.testing.assert_close(p.activations, full.mean(2, keepdim=True), rtol=1e-5, atol=1e-5)
    assert p.positions is None and "position" not in p.point_fields()
    lay = capture_components(
        tiny_llama, toks, components=("attn_out", "mlp_out"), average="layers", progress=False
    )
    ref, _ = _reference(tiny_llama, toks, ("attn_out", "mlp_out"))
    torch.testing.assert_close(
        lay.activations, torch.stack([ref[0::2].mean(0), ref[1::2].mean(0)]), rtol=1e-5, atol=1e-5
    )
    assert lay.components == ("attn_out", "mlp_out") and lay.layers == (None, None)
    assert lay.layer_labels() == ("mean", "mean") == lay.layer_labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mean_and_normalized_methods(tiny_gpt2, dtype):
    st = capture_components(
        tiny_gpt2, _windows(3, 7), components=("attn_out", "mlp_out"), dtype=dtype, progress=False
    )
    full = st.activations.float()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    m = st.mean("samples")
    assert m.activations.dtype == dtype and m.tokens is None and m.averaged == ("samples",)
    torch.testing.assert_close(m.activations.float(), full.mean(1, keepdim=True), **tol)
    torch.testing.assert_close(
        st.mean("positions").activations.float(), full.mean(2, keepdim=True), **tol
    )
    both = st.mean(("samples", "positions", "layers"))
    expected = torch.stack([full[0::2].mean(0), full[1::2].mean(0)]).mean((1, 2), keepdim=True)
    torch.testing.assert_close(both.activations.float(), expected, **tol)
    assert both.activations.shape == (2, 1, 1, 32) and both.components == ("attn_out", "mlp_out")
    u = st.normalized(layer_norm=True, unit=True)
    ln = torch.nn.functional.layer_norm(full, (32,), eps=1e-5)
    torch.testing.assert_close(u.activations.float(), ln / ln.norm(dim=-1, keepdim=True), **tol)
    assert u.activations.dtype == dtype and u.unit and u.layer_normed


def test_preprocessing_order_and_formulas(tiny_llama):
    toks = _windows(3, 8)
    raw = capture_components(
        tiny_llama, toks, components=("resid_post",), progress=False
    ).activations
    ln = capture_components(
        tiny_llama, toks, components=("resid_post",), layer_norm=True, progress=False
    )
    torch.testing.assert_close(
        ln.activations, torch.nn.functional.layer_norm(raw, (32,), eps=1e-5), rtol=1e-5, atol=1e-5
    )
    both = capture_components(
        tiny_llama,
        toks,
        components=("resid_post",),
        average="samples",
        layer_norm=True,
        unit=True,
        progress=False,
    )
    mean = raw.mean(1, keepdim=True)  # averaging comes first, then the norm, then unit length
    expected = torch.nn.functional.layer_norm(mean, (32,), eps=1e-5)
    expected = expected / expected.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(both.activations, expected, rtol=1e-5, atol=1e-5)
    assert both.layer_normed and both.unit and both.averaged == ("samples",)


def test_helpers():
    x = torch.tensor([[1.0, 2.0, 6.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(
        layer_norm_parameter_free(x), torch.nn.functional.layer_norm(x, (3,), eps=1e-5)
    )
    u = unit_length(x)
    torch.testing.assert_close(u[0], x[0] / x[0].norm())
    assert u[1].tolist() == [0.0, 0.0, 0.0]


def test_float16_storage(tiny_gpt2):
    toks = _windows(2, 8)
    f32 = capture_components(tiny_gpt2, toks, progress=False)
    f16 = capture_components(tiny_gpt2, toks, dtype=torch.float16, progress=False)
    assert f16.activations.dtype == torch.float16
    torch.testing.assert_close(f16.activations.float(), f32.activations, rtol=2e-3, atol=2e-3)


def test_cache_input_equals_model_input(tiny):
    toks = _windows(2, 9)
    names = [s.hook for s in state_plan(COMPONENTS, None, tiny.cfg.n_layers)]
    _, cache = tiny.run_with_cache(toks, names_filter=lambda n: n in names)
    from_cache = capture_components(cache, toks, drop_first=True)
    from_model = capture_components(tiny, toks, drop_first=True, progress=False)
    torch.testing.assert_close(from_cache.activations, from_model.activations, rtol=1e-5, atol=1e-5)
    assert from_cache.components == from_model.components
    _, partial = tiny.run_with_cache(toks, names_filter=lambda n: n == names[1])
    with pytest.raises(ValueError, match="lacks .* requested hooks"):
        capture_components(partial, toks)


def test_float16_overflow_is_refused(tiny_gpt2):
    from transformer_lens import ActivationCache

    name = "blocks.0.hook_attn_out"
    cache = ActivationCache({name: torch.full((1, 3, 32), 1e6)}, tiny_gpt2)
    with pytest.raises(ValueError, match="float16"):
        capture_components(cache, components=("attn_out",), layers=[0], dtype=torch.float16)


def test_hooks_removed_when_the_callback_raises(tiny):
    plan = state_plan(("attn_out",), [1], tiny.cfg.n_layers)

    def boom(i, act):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        stream_states(tiny, _windows(1, 4), plan, boom)
    assert _n_hooks(tiny) == 0


def test_forward_stops_after_the_last_needed_hook(tiny_gpt2):
    fired = []
    last = f"blocks.{tiny_gpt2.cfg.n_layers - 1}.hook_resid_post"
    tiny_gpt2.add_hook(last, lambda act, hook: fired.append(1), is_permanent=True)
    try:
        capture_components(
            tiny_gpt2, _windows(1, 4), components=("attn_out",), layers=[0], progress=False
        )
        assert fired == []
        capture_components(tiny_gpt2, _windows(1, 4), components=("ln_final",), progress=False)
        assert fired == [1]
    finally:
        tiny_gpt2.reset_hooks(including_permanent=True)


def test_selection_and_fields(tiny_gpt2):
    st = capture_components(
        tiny_gpt2, "hello", components=("embed", "attn_out", "ln_final"), progress=False
    )
    assert st.state_labels() == ("h0", "b0.attn_out", "b1.attn_out", "b2.attn_out", "h3·norm")
    f = st.point_fields()
    n = st.n_points
    assert all(len(v) == n for v in f.values())
    assert list(f["token"][:5]) == list("hello") and list(f["position"][:5]) == [0, 1, 2, 3, 4]
    assert set(f["layer"]) == {-1, 0, 1, 2, 3}
    sub = st.select(components=("attn_out",), layers=[1])
    torch.testing.assert_close(sub.activations[0], st.activations[2])
    dropped = st.drop_first()
    assert dropped.positions.tolist() == [1, 2, 3, 4] and dropped.str_tokens.shape == (1, 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"components": ("attn",)}, "Unknown components"),
        ({"components": ()}, "at least one component"),
        ({"average": "tokens"}, "Cannot average over"),
        ({"layers": [7]}, "out of range"),
        ({"positions": [40]}, "positions must lie"),
        ({"max_positions": 0}, "max_positions"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": torch.int8}, "floating dtype"),
    ],
)
def test_bad_input(tiny_llama, kwargs, match):
    with pytest.raises(ValueError, match=match):
        capture_components(tiny_llama, "hello", progress=False, **kwargs)


def test_bad_input_positions(tiny_llama):
    with pytest.raises(ValueError, match="after dropping position 0"):
        capture_components(tiny_llama, "h", drop_first=True, progress=False)
    with pytest.raises(ValueError, match="empty"):
        capture_components(tiny_llama, "", progress=False)
    st = capture_components(tiny_llama, "hey", average="positions", progress=False)
    with pytest.raises(ValueError, match="averaged over"):
        st.drop_first()
    with pytest.raises(ValueError, match="No state matches"):
        st.select(components=("ln1",), layers=[9])
    with pytest.raises(ValueError, match="state batch pos d_model"):
        ComponentStates(torch.zeros(2, 3), ("a",), (0,), ("h",), None, None, None, 1)
