import pytest

from tlmicroscope.models import access
from tlmicroscope.models.embedded import cache_dir, embedded_gguf_path, load_gguf_tokenizer

pytestmark = [pytest.mark.embedded, pytest.mark.models]


def test_embedded_model_shape_and_policy(embedded_model):
    cfg = embedded_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_vocab) == (30, 576, 9, 49152)
    assert cfg.n_ctx == 2048
    assert cfg.rotary_base == 100000.0  # patched: transformers 5 hides it in rope_parameters
    assert cfg.default_prepend_bos is False  # SmolLM2's tokenizer adds no BOS
    assert not access.weights_processed(embedded_model)
    assert not embedded_model.training


def test_converted_tokenizer_is_read_from_the_cache(embedded_model, monkeypatch):
    import transformers

    path = embedded_gguf_path()
    load_gguf_tokenizer(path)  # ensures the cache exists
    cached = list((cache_dir() / "tokenizers").glob(f"{path.stem}-*"))
    assert cached and (cached[0] / "tokenizer.json").is_file()
    calls = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    tok = load_gguf_tokenizer(path)
    assert len(calls) == 1 and "gguf_file" not in calls[0][1]  # no slow GGUF conversion
    assert str(calls[0][0][0]).startswith(str(cache_dir()))
    assert tok("The capital of France is")["input_ids"] == [504, 3575, 282, 4649, 314]


def test_the_skipped_docstring_examples_hold(embedded_model):
    """What the ``# doctest: +SKIP`` examples of ``load_model`` and the GGUF cache promise."""
    from tlmicroscope.models.gguf_cache import gguf_architecture

    logits = embedded_model(embedded_model.to_tokens("The capital of France is"))
    assert embedded_model.to_string(logits[0, -1].argmax()) == " Paris"
    assert gguf_architecture(embedded_gguf_path()) == "llama"
