import pytest
import torch

from tlmicroscope.inputs import check_layers, resolve_input, to_tokens

pytestmark = pytest.mark.models


def test_text_is_tokenized_without_bos_for_byte_tokenizer(tiny_llama):
    assert to_tokens(tiny_llama, "ab").tolist() == [[97, 98]]


def test_empty_text_is_refused(tiny_llama):
    with pytest.raises(ValueError, match="empty"):
        to_tokens(tiny_llama, "")


def test_over_long_text_names_length_and_limit(tiny_llama):
    n_ctx = tiny_llama.cfg.n_ctx
    text = "x" * (n_ctx + 5)
    with pytest.raises(
        ValueError, match=rf"{n_ctx + 5} tokens long.*{n_ctx} tokens.*truncate=True"
    ):
        to_tokens(tiny_llama, text)
    assert to_tokens(tiny_llama, text, truncate=True).shape == (1, n_ctx)


def test_token_ids_outside_vocab_are_refused(tiny_llama):
    with pytest.raises(ValueError, match=r"\[0, 259\)"):
        to_tokens(tiny_llama, torch.tensor([1, 2, 400]))
    with pytest.raises(ValueError, match="integers"):
        to_tokens(tiny_llama, torch.tensor([1.0, 2.0]))


def test_batches_need_equal_lengths(tiny_llama):
    assert to_tokens(tiny_llama, ["ab", "cd"]).shape == (2, 2)
    with pytest.raises(ValueError, match="different lengths"):
        to_tokens(tiny_llama, ["ab", "abc"])


def test_training_mode_model_is_switched_to_eval_with_warning(tiny_gpt2):
    tiny_gpt2.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            resolve_input(tiny_gpt2, "abc")
        assert not tiny_gpt2.training
    finally:
        tiny_gpt2.eval()


def test_cache_input_needs_tokens(tiny_llama):
    _, cache = tiny_llama.run_with_cache(to_tokens(tiny_llama, "abc"))
    with pytest.raises(ValueError, match="also pass the tokens"):
        resolve_input(cache)
    resolved = resolve_input(cache, "abc")
    assert resolved.cache is cache and resolved.model is tiny_llama


def test_check_layers():
    assert check_layers(None, 3) == [0, 1, 2]
    assert check_layers([-1, 0], 3) == [2, 0]
    with pytest.raises(ValueError, match="out of range: valid layers are 0..2"):
        check_layers([3], 3)
