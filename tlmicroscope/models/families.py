"""Tiny seeded random models of the model families researchers use, built offline from transformers.

Each family is a transformers config class with a tiny shape (byte vocabulary, a few layers,
d_model 32) and the family's own features switched on: GPT-NeoX's parallel attention and partial
rotary, Mistral's sliding window, Gemma 2's soft caps and sandwich norms, Gemma 3's qk-norm and
local/global layers, Mixtral's experts, Cohere's logit scale. The random model is booted with
``TransformerBridge.boot_transformers`` (every TransformerLens line) or converted into a
``HookedTransformer`` with TransformerLens's own weight conversion (TransformerLens 3 only, for
the families it supports). Nothing is downloaded.

The embeddings (and an untied unembedding) are scaled so that logits reach tens of nats, as in
trained models: otherwise a soft cap of 30 never bites and a readout that forgets it still
passes every check.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["FAMILIES", "LOGIT_TARGET", "Family", "tiny_family_model", "tiny_hf_model"]

#: Largest absolute logit on the probe text after scaling, in nats.
LOGIT_TARGET = 40.0
_PROBE = "The quick brown fox jumps over the lazy dog."


@dataclass(frozen=True)
class Family:
    """One model family of the architecture matrix.

    ``hooked`` says whether TransformerLens 3.9's ``HookedTransformer`` can hold it; when it
    cannot, ``hooked_note`` says why.
    """

    name: str
    title: str
    model_class: str
    config_class: str
    features: str
    hooked: bool = True
    hooked_note: str = ""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "gpt2",
            "GPT-2",
            "GPT2LMHeadModel",
            "GPT2Config",
            "LayerNorm, learned positions, tied embeddings, biases",
        ),
        Family(
            "gpt_neox",
            "GPT-NeoX / Pythia",
            "GPTNeoXForCausalLM",
            "GPTNeoXConfig",
            "parallel attention + MLP, partial rotary (25%), untied unembedding",
        ),
        Family(
            "llama",
            "Llama",
            "LlamaForCausalLM",
            "LlamaConfig",
            "RMSNorm, rotary, gated MLP, grouped-query attention",
        ),
        Family(
            "mistral",
            "Mistral",
            "MistralForCausalLM",
            "MistralConfig",
            "sliding-window attention (window 8), GQA",
        ),
        Family(
            "gemma2",
            "Gemma 2",
            "Gemma2ForCausalLM",
            "Gemma2Config",
            "final-logit soft cap 30, attention soft cap 50, sandwich norms, (1 + w) RMSNorm, "
            "scaled embeddings, local/global layers",
        ),
        Family(
            "gemma3",
            "Gemma 3",
            "Gemma3ForCausalLM",
            "Gemma3TextConfig",
            "qk-norm, local (window 8) and global layers with two rotary bases, sandwich norms",
        ),
        Family("qwen3", "Qwen 3", "Qwen3ForCausalLM", "Qwen3Config", "qk-norm, GQA"),
        Family(
            "mixtral",
            "Mixtral",
            "MixtralForCausalLM",
            "MixtralConfig",
            "mixture of experts (4 experts, top-2), GQA",
        ),
        Family(
            "phi3", "Phi-3", "Phi3ForCausalLM", "Phi3Config", "fused QKV and gate/up projections"
        ),
        Family(
            "olmo2",
            "OLMo-2",
            "Olmo2ForCausalLM",
            "Olmo2Config",
            "norms after attention and MLP (no pre-norm), qk-norm over all heads",
        ),
        Family(
            "cohere",
            "Cohere",
            "CohereForCausalLM",
            "CohereConfig",
            "logit scale 0.0625, parallel attention + MLP, bias-free LayerNorm",
            hooked=False,
            hooked_note="TransformerLens 3.9's HookedTransformer has no Cohere architecture",
        ),
    )
}

# The families TransformerLens 3.9 maps from an HF config by architecture; the others it knows
# only by official checkpoint name, so their HookedTransformer config starts from one of those.
_HOOKED_BY_NAME = {
    "gemma2": "google/gemma-2-2b",
    "gemma3": "google/gemma-3-270m",
}

# TransformerLens 3.9's weight conversion function for each family.
_CONVERTERS = {
    "gpt2": "convert_gpt2_weights",
    "gpt_neox": "convert_neox_weights",
    "llama": "convert_llama_weights",
    "mistral": "convert_mistral_weights",
    "gemma2": "convert_gemma_weights",
    "gemma3": "convert_gemma_weights",
    "qwen3": "convert_qwen3_weights",
    "mixtral": "convert_mixtral_weights",
    "phi3": "convert_phi3_weights",
    "olmo2": "convert_olmo2_weights",
}


def _config_kwargs(family: str, n_layers: int, d_model: int, n_ctx: int) -> dict[str, Any]:
    from tlmicroscope.models.byte_tokenizer import TINY_VOCAB

    n_heads, d_head = 4, d_model // 4
    special = dict(vocab_size=TINY_VOCAB, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    if family == "gpt2":
        return dict(
            special,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_positions=n_ctx,
            n_ctx=n_ctx,  # read by TransformerLens 3.9's config conversion
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    base = dict(
        special,
        hidden_size=d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        intermediate_size=2 * d_model,
        max_position_embeddings=n_ctx,
    )
    if family == "gpt_neox":
        return dict(
            base,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            hidden_dropout=0.0,
            attention_dropout=0.0,
        )
    base["num_key_value_heads"] = 2
    layer_types = ["sliding_attention", "full_attention"] * n_layers
    if family == "olmo2":  # TransformerLens 3.9's OLMo-2 conversion has no grouped heads
        return dict(base, num_key_value_heads=n_heads)
    if family in ("llama", "qwen3", "phi3", "cohere"):
        extra = {"qwen3": dict(head_dim=d_head), "cohere": dict(logit_scale=0.0625)}.get(family, {})
        return dict(base, **extra)
    if family == "mistral":
        return dict(base, sliding_window=8)
    if family == "mixtral":
        return dict(base, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0)
    if family == "gemma2":
        return dict(
            base,
            head_dim=d_head,
            sliding_window=8,
            final_logit_softcapping=30.0,
            attn_logit_softcapping=50.0,
            layer_types=layer_types[:n_layers],
            query_pre_attn_scalar=d_head,
        )
    if family == "gemma3":
        return dict(
            base,
            head_dim=d_head,
            sliding_window=8,
            layer_types=layer_types[:n_layers],
            query_pre_attn_scalar=d_head,
        )
    raise ValueError(f"Unknown family {family!r}; the families are {sorted(FAMILIES)}.")


def tiny_hf_model(
    family: str, *, n_layers: int = 2, d_model: int = 32, n_ctx: int = 128, seed: int = 0
) -> Any:
    """A seeded random transformers model of ``family``, in eval mode, with eager attention.

    Norm gains and biases are perturbed away from 1 and 0, so a readout that drops them fails;
    the embeddings are scaled so the largest logit on a short text is ``LOGIT_TARGET`` nats.
    """
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; the families are {sorted(FAMILIES)}.")
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4 (4 heads), got {d_model}.")
    fam = FAMILIES[family]
    config = getattr(transformers, fam.config_class)(
        **_config_kwargs(family, n_layers, d_model, n_ctx)
    )
    config.architectures = [fam.model_class]  # what TransformerBridge picks its adapter from
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = getattr(transformers, fam.model_class)(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.ndim != 1:
                continue
            if name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            else:  # norm gains: 1 + noise, or noise around 0 for Gemma's (1 + w) norms
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        _scale_embeddings(hf)
    return hf


def _scale_embeddings(hf: Any) -> None:
    from tlmicroscope.models.byte_tokenizer import byte_tokenizer

    ids = torch.tensor([byte_tokenizer()(_PROBE)["input_ids"]])
    emb, head = hf.get_input_embeddings().weight, hf.get_output_embeddings().weight
    # Scale the logits before the soft cap, which would otherwise hide how far they reach.
    cap, hf.config.final_logit_softcapping = (
        getattr(hf.config, "final_logit_softcapping", None),
        None,
    )
    for _ in range(3):  # with tied weights the logits are only nearly linear in the scale
        peak = float(hf(ids).logits.abs().max())
        factor = LOGIT_TARGET / peak
        if abs(factor - 1) < 0.05:
            break
        emb.mul_(factor)
        if head.data_ptr() != emb.data_ptr():
            head.mul_(factor)
    hf.config.final_logit_softcapping = cap


def tiny_family_model(
    family: str,
    *,
    kind: str = "bridge",
    n_layers: int = 2,
    d_model: int = 32,
    n_ctx: int = 128,
    seed: int = 0,
) -> Any:
    """``tiny_hf_model(family)`` as a ``TransformerBridge`` or a TransformerLens 3
    ``HookedTransformer``.

    Raises:
        ValueError: ``kind="hooked"`` for a family HookedTransformer cannot hold; the message
            says why.

    Examples:
        >>> model = tiny_family_model("gemma2")  # final-logit soft cap 30
        >>> logits = model(model.to_tokens("The cat sat"))
        >>> model.cfg.n_layers, 20 < float(logits.abs().max()) < 30
        (2, True)
    """
    from tlmicroscope.models.byte_tokenizer import byte_tokenizer

    hf = tiny_hf_model(family, n_layers=n_layers, d_model=d_model, n_ctx=n_ctx, seed=seed)
    tok = byte_tokenizer()
    label = f"tiny-{family}-L{n_layers}-d{d_model}-s{seed}"
    if kind == "hooked":
        model = _hooked(family, hf, tok, n_ctx)
    else:
        from tlmicroscope.models.bridge import _bridge_from_hf

        model = _bridge_from_hf(label, hf, tok, "cpu", torch.float32)
    model.cfg.n_ctx = n_ctx
    model.cfg.default_prepend_bos = False
    model._tlmicroscope_processed = False
    model._tlmicroscope_name = label
    return model.eval()


def _olmo2_config(c: Any) -> dict[str, Any]:
    """TransformerLens 3.9 knows OLMo-2 only by name, and fetches its config: build it here."""
    d_head = c.hidden_size // c.num_attention_heads
    return dict(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=c.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        gated_mlp=True,
        rotary_base=(c.rope_parameters or {}).get("rope_theta", 10000.0),
        attn_types=["global"] * c.num_hidden_layers,
    )


def _config_by_name(family: str, c: Any) -> dict[str, Any]:
    """The official model's TransformerLens config (name-based: no download), resized to ``c``."""
    from transformer_lens import loading_from_pretrained as lfp

    cfg_dict = lfp.convert_hf_model_config(_HOOKED_BY_NAME[family])
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg_dict.update(
        d_model=c.hidden_size,
        d_head=d_head,
        n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size,
        n_layers=c.num_hidden_layers,
        d_vocab=c.vocab_size,
        eps=c.rms_norm_eps,
        n_key_value_heads=c.num_key_value_heads,
    )
    types = getattr(c, "layer_types", None)
    if "attn_types" in cfg_dict:
        cfg_dict["attn_types"] = (
            ["local" if t == "sliding_attention" else "global" for t in types]
            if types and cfg_dict.get("use_local_attn")
            else ["global"] * c.num_hidden_layers
        )
    if cfg_dict.get("use_local_attn"):
        cfg_dict["window_size"] = c.sliding_window
    if family == "gemma2":
        cfg_dict.update(
            attn_scores_soft_cap=c.attn_logit_softcapping,
            output_logits_soft_cap=c.final_logit_softcapping,
        )
    if family == "gemma3":
        params = c.rope_parameters or {}
        full, local = params.get("full_attention", {}), params.get("sliding_attention", {})
        cfg_dict["rotary_base"] = full.get("rope_theta", cfg_dict["rotary_base"])
        cfg_dict["rotary_base_local"] = local.get("rope_theta", cfg_dict["rotary_base_local"])
    cfg_dict["rotary_dim"] = d_head
    return cfg_dict


def _config_from_folder(c: Any) -> dict[str, Any]:
    """TransformerLens's config for ``c``, mapped from a saved config.json by architecture."""
    from transformer_lens import loading_from_pretrained as lfp

    # A neutral folder name keeps TransformerLens's name-based branches ("llama", "gemma" in the
    # path) out of the way.
    with tempfile.TemporaryDirectory(prefix="tlm-cfg-") as folder:
        c.save_pretrained(folder)
        return lfp.convert_hf_model_config(str(Path(folder)))


def _hooked(family: str, hf: Any, tok: Any, n_ctx: int) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions

    fam = FAMILIES[family]
    if not fam.hooked:
        raise ValueError(
            f"{fam.title} cannot be a HookedTransformer: {fam.hooked_note}. Use kind='bridge'."
        )
    if family == "olmo2":
        cfg_dict = _olmo2_config(hf.config)
    elif family in _HOOKED_BY_NAME:
        cfg_dict = _config_by_name(family, hf.config)
    else:
        cfg_dict = _config_from_folder(hf.config)
    cfg_dict.update(
        n_ctx=n_ctx,
        original_architecture=fam.model_class,
        init_weights=False,
        default_prepend_bos=False,
        tokenizer_prepends_bos=False,
        device="cpu",
        dtype=torch.float32,
    )
    cfg = HookedTransformerConfig.from_dict(cfg_dict)
    for p in hf.parameters():
        p.requires_grad_(False)
    state = getattr(weight_conversions, _CONVERTERS[family])(hf, cfg)
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return model
