"""``load_model("tiny-...")`` honours every option, or refuses it with a clear error (issue 14,
item 8)."""

import pytest
import torch

from tlmicroscope.models import access, load_model, tiny_model

pytestmark = pytest.mark.models

TEXT = "The cat sat on the mat."


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_n_ctx_is_honoured_not_capped(name):
    model = load_model(name, n_ctx=1500)
    assert model.cfg.n_ctx == 1500
    toks = model.to_tokens("x" * 1200)  # over the old 512 cap, under the asked context
    assert model(toks).shape == (1, 1200, model.cfg.d_vocab)
    assert load_model(name, n_ctx=64).cfg.n_ctx == 64


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_dtype_is_honoured(name, model_kind):
    ref = load_model(name, kind=model_kind)
    model = load_model(name, kind=model_kind, dtype=torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    toks = ref.to_tokens(TEXT)
    out = model(toks)
    assert out.dtype == torch.float64
    # The same weights, in more precision: the float32 model's log-probabilities agree.
    torch.testing.assert_close(
        out.log_softmax(-1).float(), ref(toks).log_softmax(-1), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prepend_bos_is_honoured(name):
    assert load_model(name).to_tokens("ab").tolist() == [[97, 98]]  # the byte tokenizer adds none
    model = load_model(name, prepend_bos=True)
    bos = model.tokenizer.bos_token_id
    assert model.cfg.default_prepend_bos is True
    assert model.to_tokens("ab").tolist() == [[bos, 97, 98]]
    assert load_model(name, prepend_bos=False).to_tokens("ab").tolist() == [[97, 98]]


def test_process_weights_is_honoured(model_kind):
    raw = load_model("tiny-gpt2", kind=model_kind)
    model = load_model("tiny-gpt2", kind=model_kind, process_weights=True)
    assert access.weights_processed(model) is True and access.weights_processed(raw) is False
    toks = raw.to_tokens(TEXT)
    # fold_ln and centring keep the output distribution (logits move by a constant per row) ...
    torch.testing.assert_close(
        model(toks).log_softmax(-1), raw(toks).log_softmax(-1), atol=1e-4, rtol=0
    )
    # ... and centre every vector written to the residual stream: its mean over d_model is 0.
    _, cache = model.run_with_cache(toks)
    _, raw_cache = raw.run_with_cache(toks)
    name = "blocks.2.hook_resid_pre"
    assert float(cache[name].mean(-1).abs().max()) < 1e-5
    assert float(raw_cache[name].mean(-1).abs().max()) > 1e-3


def test_tiny_defaults_match_tiny_model():
    # Without options, the named model is tiny_model's (same weights), at the asked context.
    a, b = load_model("tiny-llama", n_ctx=128), tiny_model("llama", n_ctx=128)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(device="nonsense"), ValueError, "not a torch device"),
        (dict(dtype="float16"), TypeError, "dtype must be a torch.dtype"),
        (dict(prepend_bos="yes"), ValueError, "prepend_bos must be 'tokenizer', True or False"),
        (dict(n_ctx=-5), ValueError, "n_ctx must be positive"),
        (dict(n_ctx=2.5), ValueError, "n_ctx must be positive"),
    ],
)
def test_bad_options_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        load_model("tiny-llama", **kwargs)


def test_cuda_without_a_gpu_is_refused_clearly():
    if torch.cuda.is_available():
        model = load_model("tiny-llama", device="cuda")
        assert next(model.parameters()).device.type == "cuda"
        return
    with pytest.raises(ValueError, match="no CUDA GPU is available here.*device='cpu'"):
        load_model("tiny-llama", device="cuda")
