"""The readout reproduces the model's output on every family with an output transform.

Tiny seeded random-weight Hugging Face models (Gemma 2 soft cap and ``1 + w`` norms, Gemma 3,
Cohere ``logit_scale``, Granite ``logits_scaling``, Phi's biased ``lm_head``, GPT-2, an untied
Llama) are booted offline as ``TransformerBridge``; HookedTransformer gets the families its
config can express (``output_logits_soft_cap``, a biased unembedding). Every check is against
the model's own forward pass or autograd, never against the readout's own output.
"""

from __future__ import annotations

import os
from functools import cache

import pytest
import torch

from tlmicroscope.lenses import (
    Readout,
    ReadoutIdentityError,
    check_readout_identity,
    prediction_trajectory,
)
from tlmicroscope.models import access
from tlmicroscope.models.tiny import byte_tokenizer

pytestmark = pytest.mark.models

KIND = os.environ.get("TLMICROSCOPE_TEST_KIND", "auto")
RUN_BRIDGE = KIND in ("auto", "bridge")
RUN_HOOKED = KIND == "hooked" or (KIND == "auto" and access.has_hooked_transformer())
V = 259  # the byte tokenizer's vocabulary
TARGET_LOGIT = (
    40.0  # largest |logit| after scaling the unembedding: tens of nats, past any soft cap
)
COMMON = {
    "vocab_size": V,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}


def _families() -> dict:
    import transformers as tf

    return {
        "gemma2": (
            tf.Gemma2Config,
            tf.Gemma2ForCausalLM,
            dict(
                COMMON,
                final_logit_softcapping=10.0,
                attn_logit_softcapping=50.0,
                query_pre_attn_scalar=8,
                sliding_window=16,
            ),
        ),
        "gemma3": (
            tf.Gemma3TextConfig,
            tf.Gemma3ForCausalLM,
            dict(COMMON, query_pre_attn_scalar=8, sliding_window=16),
        ),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, dict(COMMON, logit_scale=0.25)),
        "granite": (
            tf.GraniteConfig,
            tf.GraniteForCausalLM,
            dict(COMMON, logits_scaling=4.0, tie_word_embeddings=False),
        ),
        "phi": (
            tf.PhiConfig,
            tf.PhiForCausalLM,
            {
                "vocab_size": V,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "max_position_embeddings": 64,
                "partial_rotary_factor": 0.5,
            },
        ),
        "gpt2": (
            tf.GPT2Config,
            tf.GPT2LMHeadModel,
            {"vocab_size": V, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 64},
        ),
        "llama-untied": (
            tf.LlamaConfig,
            tf.LlamaForCausalLM,
            dict(COMMON, tie_word_embeddings=False),
        ),
    }


FAMILIES = ("gemma2", "gemma3", "cohere", "granite", "phi", "gpt2", "llama-untied")
TOKENS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _hf_output_scale(hf) -> float:
    c = hf.config
    if c.model_type == "cohere":
        return float(c.logit_scale)
    if c.model_type == "granite":
        return 1.0 / float(c.logits_scaling)
    return 1.0


@cache
def _hf(family: str, dtype: torch.dtype = torch.float32):
    """The seeded Hugging Face model: perturbed norms and biases, unembedding scaled so the
    largest pre-cap output logit is about ``TARGET_LOGIT``."""
    cfg_cls, model_cls, kw = _families()[family]
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(**kw)).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.add_(0.5 * torch.randn(p.shape, generator=g))  # Gemma stores w with gain 1 + w
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        head = hf.get_output_embeddings()
        hidden = hf.base_model(TOKENS).last_hidden_state
        z = head(hidden) * _hf_output_scale(hf)
        head.weight.mul_(TARGET_LOGIT / float(z.abs().max()))
        if head.bias is not None:
            head.bias.mul_(TARGET_LOGIT / float(z.abs().max()))
    hf.config.architectures = [model_cls.__name__]  # a config built in memory names none
    return hf.to(dtype)


@cache
def _bridge(family: str, dtype: torch.dtype = torch.float32):
    from transformer_lens.model_bridge import TransformerBridge

    hf = _hf(family, dtype)
    bridge = TransformerBridge.boot_transformers(
        f"tiny-{family}", hf_model=hf, tokenizer=byte_tokenizer(), dtype=dtype
    )
    bridge.cfg.default_prepend_bos = False
    bridge._tlmicroscope_processed = False
    bridge._tlmicroscope_name = f"tiny-{family}-{str(dtype).split('.')[-1]}"
    return bridge.eval(), hf


def _hooked_gemma2():
    """The Hugging Face Gemma 2 converted by TransformerLens 3's own ``convert_gemma_weights``,
    which stores the final norm's gain as ``1 + w``."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    hf = _hf("gemma2")
    c = hf.config
    rope = (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    cfg = HookedTransformerConfig(
        d_model=32,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        n_layers=2,
        n_ctx=64,
        eps=c.rms_norm_eps,
        d_vocab=V,
        act_fn="gelu_pytorch_tanh",
        normalization_type="RMS",
        rotary_base=rope,
        rotary_dim=8,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        n_key_value_heads=2,
        window_size=16,
        use_local_attn=True,
        attn_types=["local", "global"],
        attn_scores_soft_cap=50.0,
        output_logits_soft_cap=c.final_logit_softcapping,
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
    )
    model = HookedTransformer(cfg, tokenizer=byte_tokenizer())
    model.load_state_dict(convert_gemma_weights(hf, cfg), strict=False)
    model._tlmicroscope_processed = False
    return model.eval()


@cache
def _hooked(family: str):
    """HookedTransformer families from its own config: a soft-capped RMS model, a biased LN one,
    and Gemma 2 converted from Hugging Face."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if family == "gemma2":
        return _hooked_gemma2()
    shape = {
        "d_model": 32,
        "d_head": 8,
        "n_heads": 4,
        "n_layers": 2,
        "n_ctx": 64,
        "d_vocab": V,
        "d_mlp": 64,
        "seed": 0,
        "default_prepend_bos": False,
        "tokenizer_prepends_bos": False,
    }
    if family == "softcap":
        cfg = HookedTransformerConfig(
            **shape,
            act_fn="gelu",
            normalization_type="RMS",
            final_rms=True,
            positional_embedding_type="rotary",
            rotary_dim=8,
            output_logits_soft_cap=10.0,
        )
    else:
        cfg = HookedTransformerConfig(**shape, act_fn="gelu_new", normalization_type="LN")
    torch.manual_seed(0)
    model = HookedTransformer(cfg, tokenizer=byte_tokenizer())
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in ("b", "b_U") or leaf.startswith("b_"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1 and leaf == "w":
                p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g))
        model.W_U.mul_(20.0)
    model._tlmicroscope_processed = False
    return model.eval()


def _model(spec: str):
    kind, family = spec.split(":")
    if kind == "bridge":
        if not RUN_BRIDGE:
            pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
        return _bridge(family)[0]
    if not RUN_HOOKED:
        pytest.skip(
            "HookedTransformer families need TransformerLens 3 and "
            "TLMICROSCOPE_TEST_KIND=hooked/auto"
        )
    return _hooked(family)


SPECS = [f"bridge:{f}" for f in FAMILIES] + ["hooked:softcap", "hooked:biased", "hooked:gemma2"]


def _last_resid(model, toks):
    L = int(model.cfg.n_layers)
    logits, cache = model.run_with_cache(toks, names_filter=[f"blocks.{L - 1}.hook_resid_post"])
    return cache[f"blocks.{L - 1}.hook_resid_post"], logits


# ------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("spec", SPECS)
def test_readout_reproduces_the_models_log_probs(spec):
    model = _model(spec)
    with torch.no_grad():
        h, logits = _last_resid(model, TOKENS)
        readout = Readout.for_model(model)
        ours = torch.log_softmax(readout(h), -1)
    theirs = torch.log_softmax(logits.float(), -1)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=2e-4, rtol=0)
    if spec.startswith("bridge:") or spec == "hooked:gemma2":  # the Hugging Face model itself
        with torch.no_grad():
            hf_logits = _hf(spec.split(":")[1])(TOKENS).logits
        # Its own kernels (attention, norms) may round differently from the model class's.
        atol = 2e-4 + 5e-5 * float(hf_logits.abs().max())
        torch.testing.assert_close(
            ours, torch.log_softmax(hf_logits.float(), -1), atol=atol, rtol=0
        )
    assert check_readout_identity(readout, h[0], logits[0]) < 2e-4
    # The logits are large enough that every transform matters.
    assert float(logits.abs().max()) > 5.0


@pytest.mark.parametrize("spec", ["bridge:gemma2", "hooked:softcap", "hooked:gemma2"])
def test_soft_cap_bites_and_bounds_the_logits(spec):
    model = _model(spec)
    readout = Readout.for_model(model)
    assert readout.softcap == 10.0
    with torch.no_grad():
        h, _ = _last_resid(model, TOKENS)
        pre = readout.linear(h)
        post = readout(h)
    assert float(pre.abs().max()) > 2 * readout.softcap  # the cap changes the distribution
    assert float(post.abs().max()) <= readout.softcap
    torch.testing.assert_close(post, 10.0 * torch.tanh(pre / 10.0))


@pytest.mark.parametrize(
    "spec,expect",
    [
        ("bridge:cohere", 0.25),
        ("bridge:granite", 0.25),
        ("bridge:gemma2", 1.0),
        ("bridge:gpt2", 1.0),
    ],
)
def test_output_transform_is_read_from_the_model(spec, expect):
    t = access.output_transform(_model(spec))
    assert t.scale == pytest.approx(expect)
    assert (t.softcap is not None) == spec.endswith("gemma2")


@pytest.mark.parametrize(
    "spec,attr",
    [
        ("bridge:gemma2", "softcap"),
        ("bridge:cohere", "scale"),
        ("bridge:granite", "scale"),
        ("bridge:gemma3", "norm"),
    ],
)
def test_a_readout_without_the_transform_is_refused_naming_the_family(spec, attr):
    model = _model(spec)
    readout = Readout(model)
    with torch.no_grad():
        h, logits = _last_resid(model, TOKENS)
    if attr == "softcap":
        readout.softcap = None
    elif attr == "scale":
        readout.W = readout.W / readout.scale
        readout.b = None if readout.b is None else readout.b / readout.scale
    else:  # the norm's gain w instead of Gemma's 1 + w
        w = access.final_norm(model).weight.detach()
        readout.W = readout.W / w[:, None] * (w[:, None] - 1.0)
    with pytest.raises(ReadoutIdentityError, match=access.model_family(model)):
        check_readout_identity(readout, h[0], logits[0])


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_processed_weights_keep_the_identity(family):
    """After fold_ln/centring (Cohere's adapter then folds logit_scale into W_U itself)."""
    if not RUN_BRIDGE:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    from transformer_lens.model_bridge import TransformerBridge

    cfg_cls, model_cls, kw = _families()[family]
    hf = model_cls(cfg_cls(**kw)).eval()
    hf.load_state_dict(_hf(family).state_dict())
    hf.config.architectures = [model_cls.__name__]
    with torch.no_grad():
        expect = torch.log_softmax(hf(TOKENS).logits, -1)
    model = TransformerBridge.boot_transformers(
        f"tiny-{family}", hf_model=hf, tokenizer=byte_tokenizer()
    )
    model.enable_compatibility_mode(disable_warnings=True)
    with torch.no_grad():
        h, logits = _last_resid(model, TOKENS)
        ours = torch.log_softmax(Readout.for_model(model)(h), -1)
    torch.testing.assert_close(ours, torch.log_softmax(logits, -1), atol=2e-4, rtol=0)
    torch.testing.assert_close(ours, expect, atol=2e-4 + 5e-5 * float(logits.abs().max()), rtol=0)


def test_bias_and_tying_are_what_the_model_has():
    if not RUN_BRIDGE:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    phi = Readout.for_model(_model("bridge:phi"))
    assert phi.b is not None and float(phi.b.abs().max()) > 0.1  # Phi's lm_head has a bias
    _, hf = _bridge("llama-untied")
    assert (
        hf.get_output_embeddings().weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    )
    _, hf = _bridge("gemma2")
    assert (
        hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    )


# ------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize(
    "spec",
    [
        "bridge:gemma2",
        "bridge:cohere",
        "bridge:granite",
        "bridge:phi",
        "hooked:softcap",
        "hooked:gemma2",
    ],
)
def test_gradient_through_the_readout_is_the_models(spec):
    """d log p(target) / d h at the last residual: autograd through the readout against autograd
    through the model's own final norm, head and output transform."""
    model = _model(spec)
    L = int(model.cfg.n_layers)
    with torch.no_grad():
        h0, logits = _last_resid(model, TOKENS)
    target = logits.argmin(-1)  # a token far from the top: the soft cap's slope is far from 1
    leaf = h0.detach().clone().requires_grad_(True)
    model_logits = model.run_with_hooks(
        TOKENS, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", lambda act, hook: leaf)]
    )
    torch.log_softmax(model_logits.float(), -1).gather(-1, target[..., None]).sum().backward()
    theirs = leaf.grad.clone()
    h = h0.detach().clone().requires_grad_(True)
    readout = Readout.for_model(model)
    torch.log_softmax(readout(h), -1).gather(-1, target[..., None]).sum().backward()
    torch.testing.assert_close(h.grad, theirs, atol=1e-4 * float(theirs.abs().max()), rtol=1e-3)


def test_tuned_lens_kl_gradient_goes_through_the_soft_cap():
    from tlmicroscope.lenses._tuned_kl import FinalDistribution, LensObjective

    model = _model("bridge:gemma2")
    readout = Readout.for_model(model)
    with torch.no_grad():
        h, logits = _last_resid(model, TOKENS)
    x = readout.normalize(h.reshape(-1, h.shape[-1]) * 1.3 + 0.2)
    final = FinalDistribution.from_logits(logits.reshape(-1, logits.shape[-1]))
    kl, gx = LensObjective(readout, chunk_rows=7).kl_and_grad_x(x, final)
    xg = x.clone().requires_grad_(True)
    logq = torch.log_softmax(
        readout.finish(xg @ readout.W + readout.b if readout.b is not None else xg @ readout.W), -1
    )
    ref = (final.p * (torch.log(final.p) - logq)).sum(-1)
    ref.sum().backward()
    torch.testing.assert_close(kl, ref.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gx, xg.grad, atol=1e-5, rtol=1e-3)


def test_cbe_energy_gradient_goes_through_the_soft_cap():
    from tlmicroscope.causal._lens_ablation import LensAblationObjective
    from tlmicroscope.lenses.base import resolve_lens

    model = _model("bridge:gemma2")
    with torch.no_grad():
        h, _ = _last_resid(model, TOKENS)
    h = h.reshape(-1, h.shape[-1]).float()
    readout = Readout.for_model(model)
    lens = resolve_lens("logit")
    fast = LensAblationObjective(readout, lens, 1, h, "mean", chunk=5)
    slow = LensAblationObjective(readout, lens, 1, h, "mean", chunk=5)
    assert fast.affine and fast.softcap == 10.0
    v = torch.nn.functional.normalize(
        torch.randn(h.shape[1], generator=torch.Generator().manual_seed(3)), dim=0
    )
    v1 = v.clone().requires_grad_(True)
    e1 = fast.energy(v1)
    e1.backward()
    v2 = v.clone().requires_grad_(True)
    e2 = slow._energy_autograd(v2, slow.delta @ v2)
    e2.backward()
    assert float(e1.detach()) > 1e-3
    torch.testing.assert_close(e1, e2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(v1.grad, v2.grad, atol=1e-5, rtol=1e-3)


# ------------------------------------------------------------------------------- lenses
def test_logit_lens_trajectory_through_the_soft_cap_matches_hugging_face():
    """Per-layer statistics against the HF model's own norm, lm_head and cap, applied by hand."""
    model, hf = _bridge("gemma2") if RUN_BRIDGE else (None, None)
    if model is None:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    toks = TOKENS[:1]
    traj = prediction_trajectory(model, toks, top_k=3)
    with torch.no_grad():
        hidden = hf(toks, output_hidden_states=True).hidden_states
        cap = hf.config.final_logit_softcapping
        for li, layer in enumerate(traj.layers[:-1]):
            z = hf.lm_head(hf.model.norm(hidden[layer]))[0].float()
            z = cap * torch.tanh(z / cap)
            logq = torch.log_softmax(z, -1)
            logp = torch.log_softmax(hf(toks).logits[0].float(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            ent = -(logq.exp() * logq).sum(-1)
            torch.testing.assert_close(traj.kl[li, 0], kl, atol=2e-4, rtol=1e-4)
            torch.testing.assert_close(traj.entropy[li, 0], ent, atol=2e-4, rtol=1e-4)
            assert torch.equal(traj.top_tokens[li, 0, :, 0], z.argmax(-1))
    assert traj.provenance.settings["readout_identity_checked"]


# ------------------------------------------------------------------------------- precision
@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_bfloat16_model_gets_float32_statistics(family):
    if not RUN_BRIDGE:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    model16, _ = _bridge(family, torch.bfloat16)
    model32, _ = _bridge(family)
    assert model16.W_U.dtype == torch.bfloat16
    traj16 = prediction_trajectory(model16, TOKENS, top_k=3)
    traj32 = prediction_trajectory(model32, TOKENS, top_k=3)
    for name in ("entropy", "kl", "max_prob", "top_probs"):
        t = getattr(traj16, name)
        assert t.dtype == torch.float32 and bool(torch.isfinite(t).all()), name
    # The same model in bfloat16: its residuals and logits round, the statistics stay close.
    assert float((traj16.entropy - traj32.entropy).abs().mean()) < 0.3
    assert float(traj16.kl[-1].abs().max()) < 1e-4  # the output row is the model itself
    readout = Readout.for_model(model16)
    assert readout.W.dtype == torch.float32  # CPU: products in float32, not bfloat16
    with torch.no_grad():
        h, logits = _last_resid(model16, TOKENS)
        assert readout(h).dtype == torch.float32
    assert check_readout_identity(readout, h[0], logits[0]) < 1.0


def test_bfloat16_hooked_transformer_gets_float32_statistics():
    import copy

    model = _model("hooked:gemma2")
    model16 = copy.deepcopy(model).to(torch.bfloat16)
    model16.cfg.dtype = torch.bfloat16
    traj16 = prediction_trajectory(model16, TOKENS, top_k=3)
    traj32 = prediction_trajectory(model, TOKENS, top_k=3)
    assert traj16.kl.dtype == torch.float32 and bool(torch.isfinite(traj16.kl).all())
    assert traj16.provenance.settings["readout_identity_checked"]
    assert float((traj16.entropy - traj32.entropy).abs().mean()) < 0.3


def test_bfloat16_model_runs_the_lens_and_causal_analyses():
    """Tuned-lens evaluation and training, CBE and attribution on a soft-capped bfloat16 model:
    finite float32 results close to the same model in float32."""
    if not RUN_BRIDGE:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    from tlmicroscope.causal import extract_causal_basis
    from tlmicroscope.lenses import TunedLens, evaluate_lens, train_tuned_lens
    from tlmicroscope.microscope import component_attribution

    text = ["the quick brown fox jumps over the lazy dog " * 8]
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, _ = _bridge("gemma2", dtype)
        ev = evaluate_lens(
            model,
            lens=TunedLens.for_model(model),
            corpus=text,
            n_tokens=64,
            seq_len=32,
            holdout=0.3,
            progress=False,
        )
        trained = train_tuned_lens(
            model, text, steps=1, tokens_per_step=32, seq_len=32, progress=False
        )
        basis = extract_causal_basis(
            model,
            lens="logit",
            corpus=TOKENS,
            layer=1,
            k=2,
            max_iter=8,
            progress=False,
            on_nonconvergence="ignore",
        )
        attr = component_attribution(model, TOKENS)
        results[dtype] = (ev.kl, attr.attribution)
        assert float(basis.energies[0]) > 0
        for t in (ev.kl, ev.entropy, basis.energies, attr.attribution):
            assert t.dtype == torch.float32 and bool(torch.isfinite(t).all())
        assert bool(torch.isfinite(trained.lens.weight).all())
    for a, b in zip(results[torch.bfloat16], results[torch.float32]):
        assert float((a - b).abs().max()) < 0.1 * float(b.abs().max()) + 0.05


def test_float16_logits_past_its_range_stay_finite():
    """Logits beyond float16's range overflow in the model's dtype; the readout's do not."""
    if not RUN_BRIDGE:
        pytest.skip("bridge families run under TLMICROSCOPE_TEST_KIND=bridge/auto")
    model, _ = _bridge("gpt2")
    readout = Readout.for_model(model)
    with torch.no_grad():
        h, _ = _last_resid(model, TOKENS)
        z = readout(h.half())
        stats = torch.log_softmax(z * 2000.0, -1)  # what a float16 log-softmax would get wrong
    assert z.dtype == torch.float32
    assert bool(torch.isfinite(stats).all())
    assert not bool(torch.isfinite((z * 2000.0).half()).all())


# ------------------------------------------------------------------------------- cache
def test_for_model_is_cached_until_the_weights_change(tiny_llama):
    from tlmicroscope.models import tiny_model

    model = tiny_model("llama", kind=KIND, n_layers=1, seed=3)
    first = Readout.for_model(model)
    assert Readout.for_model(model) is first
    h = torch.randn(4, model.cfg.d_model)
    before = first(h)
    with torch.no_grad():
        for p in model.ln_final.parameters():
            p.mul_(2.0)
    second = Readout.for_model(model)
    assert second is not first
    b = 0.0 if first.b is None else first.b  # RMS has no bias: the doubled gain doubles W h only
    torch.testing.assert_close(second(h), 2.0 * (before - b) + b, atol=1e-4, rtol=1e-4)
    assert Readout.for_model(tiny_llama) is not second  # one per model
    model2 = tiny_model("gpt2", kind=KIND, n_layers=1, seed=4)
    with torch.inference_mode():  # built under inference mode, still usable with autograd
        r = Readout.for_model(model2)
    x = torch.randn(2, model2.cfg.d_model, requires_grad=True)
    r(x).sum().backward()
    assert x.grad is not None


# ------------------------------------------------------------------------------- detection
def _fake_model(adapter=None, **hf_config):
    from types import SimpleNamespace

    cfg = SimpleNamespace(model_name="fake", output_logits_soft_cap=-1.0)
    inner = SimpleNamespace(config=SimpleNamespace(**hf_config))
    model = type("TransformerBridge", (), {})()
    model.cfg, model.original_model = cfg, inner
    if adapter is not None:
        model.adapter = adapter
    return model


def test_output_transform_falls_back_to_the_hugging_face_config():
    """A bridge whose adapter declares no transform: the HF config's fields, in HF's order."""
    t = access.output_transform(_fake_model(model_type="cohere", logit_scale=0.0625))
    assert (t.scale, t.softcap) == (0.0625, None)
    t = access.output_transform(_fake_model(model_type="granite", logits_scaling=8.0))
    assert (t.scale, t.softcap) == (0.125, None)
    t = access.output_transform(_fake_model(model_type="gemma2", final_logit_softcapping=30.0))
    assert (t.scale, t.softcap) == (1.0, 30.0)
    z = torch.linspace(-100, 100, 9)
    torch.testing.assert_close(access.apply_output_transform(z, t), 30.0 * torch.tanh(z / 30.0))


def test_an_inexpressible_adapter_transform_is_refused():
    from types import SimpleNamespace

    adapter = SimpleNamespace(apply_output_logits_transform=lambda z: z + 0.1 * z.pow(3))
    with pytest.raises(ValueError, match="cannot express"):
        access.output_transform(_fake_model(adapter=adapter))
    scaled = SimpleNamespace(
        apply_output_logits_transform=lambda z: 20.0 * torch.tanh(0.5 * z / 20.0)
    )
    t = access.output_transform(_fake_model(adapter=scaled))
    assert t.scale == pytest.approx(0.5) and t.softcap == pytest.approx(20.0)
