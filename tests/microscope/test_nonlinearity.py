"""Token-wise non-linearity: the corpus reference, its maps, paper mode, persistence and bad
input."""

import math

import numpy as np
import pytest
import torch

from tlmicroscope.capture import capture
from tlmicroscope.corpus import token_windows
from tlmicroscope.io import FittedFileError, ModelMismatchError
from tlmicroscope.microscope import NonlinearityReference, token_nonlinearity
from tlmicroscope.models import tiny_model

pytestmark = pytest.mark.models


def _affine_model():
    """A GPT-2-style tiny model whose blocks write only their biases: every step h -> h + b is
    affine."""
    model = tiny_model("gpt2", n_layers=3, d_model=32, seed=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if parts[-1] in ("W_O", "W_out") or (
                parts[-1] == "weight" and {"o", "fc_out", "out"} & set(parts)
            ):
                p.zero_()
    return model


def test_zero_for_an_exactly_affine_model():
    model = _affine_model()
    ref = NonlinearityReference(n_tokens=2048, seq_len=64).fit(model, progress=False)
    res = token_nonlinearity(
        model, "An affine model has no non-linearity at all, 1 2 3!", reference=ref
    )
    assert res.error.shape == (3, 1, 51)
    assert float(res.error.abs().max()) < 1e-4
    assert torch.allclose(ref.linearity_.score, torch.ones(3, dtype=torch.float64), atol=1e-9)


def test_zero_for_affine_states_through_an_activation_cache(tiny_llama):
    g = torch.Generator().manual_seed(0)
    d, n = tiny_llama.cfg.d_model, 3000
    maps = [torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d) for _ in range(3)]
    shifts = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3)]

    def chain(h0):
        hs = [h0]
        for A, b in zip(maps, shifts):
            hs.append(hs[-1] @ A + b)
        return torch.stack(hs)

    ref = NonlinearityReference().fit(chain(torch.randn(n, d, generator=g, dtype=torch.float64)))
    assert ref.model_ is None and ref.pairs_ == (0, 1, 2)
    from transformer_lens import ActivationCache

    held_out = chain(torch.randn(7, d, generator=g, dtype=torch.float64)).float()
    names = [f"blocks.{i}.hook_resid_pre" for i in range(3)] + ["blocks.2.hook_resid_post"]
    cache = ActivationCache({nm: held_out[i][None] for i, nm in enumerate(names)}, tiny_llama)
    res = token_nonlinearity(cache, torch.zeros(1, 7, dtype=torch.long), reference=ref)
    assert float(res.error.max()) < 1e-4


def test_mean_square_error_over_the_fit_corpus_is_one_minus_score(tiny):
    windows = token_windows(tiny, None, seq_len=64, n_windows=24, shuffle=True, seed=2)
    ref = NonlinearityReference().fit(tiny, windows, progress=False)
    res = token_nonlinearity(tiny, windows, reference=ref)
    mse = (res.error.double() ** 2).mean((1, 2))
    assert torch.allclose(mse, 1 - ref.linearity_.score, atol=2e-5)
    assert res.n_fit == 24 * 64
    assert torch.allclose(res.paper_scale(), res.error / math.sqrt(24 * 64))


def test_reference_errors_match_an_independent_computation(tiny_gpt2):
    windows = token_windows(tiny_gpt2, None, seq_len=64, n_windows=20, shuffle=True, seed=5)
    ref = NonlinearityReference().fit(tiny_gpt2, windows, progress=False)
    states = capture(tiny_gpt2, windows, sites=("resid",))["resid"].double()
    flat = states.reshape(states.shape[0], -1, states.shape[-1]).numpy()
    prompt = "Checking the maps by hand."
    res = token_nonlinearity(tiny_gpt2, prompt, reference=ref)
    h = capture(tiny_gpt2, prompt, sites=("resid",))["resid"][:, 0].double().numpy()
    for layer in (0, 2):
        x, y = flat[layer], flat[layer + 1]
        mx, my = x.mean(0), y.mean(0)
        sx = np.sqrt(((x - mx) ** 2).sum() / len(x))
        sy = np.sqrt(((y - my) ** 2).sum() / len(y))
        A, *_ = np.linalg.lstsq((x - mx) / sx, (y - my) / sy, rcond=None)
        expected = np.linalg.norm((h[layer] - mx) / sx @ A - (h[layer + 1] - my) / sy, axis=1)
        np.testing.assert_allclose(res.error[layer, 0].numpy(), expected, rtol=2e-3, atol=2e-4)
        np.testing.assert_allclose(
            res.relative_error[layer, 0].numpy(),
            expected / np.linalg.norm((h[layer + 1] - my) / sy, axis=1),
            rtol=2e-3,
            atol=2e-4,
        )


def test_paper_mode_fits_the_prompt_itself(tiny_llama):
    text = "The paper mode fits each pair on the prompt's own tokens; this one is long enough."
    res = token_nonlinearity(tiny_llama, text, mode="paper")
    h = capture(tiny_llama, text, sites=("resid",))["resid"][:, 0].double().numpy()
    n = h.shape[1]
    x, y = h[1] - h[1].mean(0), h[2] - h[2].mean(0)
    x /= np.linalg.norm(x)
    y /= np.linalg.norm(y)
    U, S, Vt = np.linalg.svd(x, full_matrices=False)
    rows = np.linalg.norm(x @ (Vt.T @ np.diag(1 / S) @ U.T @ y) - y, axis=1)
    np.testing.assert_allclose(res.paper_scale()[1, 0].numpy(), rows, rtol=1e-3, atol=1e-5)
    assert res.mode == "paper" and res.n_fit == n
    with pytest.warns(UserWarning, match="exact"):
        token_nonlinearity(tiny_llama, "short", mode="paper")


def test_cache_input_equals_model_input(tiny_llama):
    windows = token_windows(tiny_llama, None, seq_len=64, n_windows=20, shuffle=True, seed=7)
    ref = NonlinearityReference().fit(tiny_llama, windows, progress=False)
    toks = tiny_llama.to_tokens("A cached run gives the same map.")
    _, cache = tiny_llama.run_with_cache(toks)
    a = token_nonlinearity(tiny_llama, toks, reference=ref)
    b = token_nonlinearity(cache, toks, reference=ref)
    assert torch.allclose(a.error, b.error, atol=1e-6)
    _, partial = tiny_llama.run_with_cache(toks, names_filter=["blocks.0.hook_resid_pre"])
    with pytest.raises(ValueError, match="lacks"):
        token_nonlinearity(partial, toks, reference=ref)


def test_save_load_roundtrip_and_other_model_refused(tiny_llama, tmp_path):
    windows = token_windows(tiny_llama, None, seq_len=64, n_windows=20, shuffle=True, seed=9)
    ref = NonlinearityReference().fit(tiny_llama, windows, layers=[0, 2], progress=False)
    ref.save(tmp_path / "ref")
    back = NonlinearityReference.load(tmp_path / "ref", tiny_llama)
    assert back.pairs_ == (0, 2) and torch.equal(back.maps_, ref.maps_)
    assert torch.equal(back.linearity_.score, ref.linearity_.score)
    text = "Saved and loaded maps agree."
    assert torch.equal(
        token_nonlinearity(tiny_llama, text, reference=back).error,
        token_nonlinearity(tiny_llama, text, reference=tmp_path / "ref").error,
    )
    other = tiny_model("llama", n_layers=3, d_model=32, seed=1)
    with pytest.raises(ModelMismatchError, match="unembed_sha256"):
        NonlinearityReference.load(tmp_path / "ref", other)
    with pytest.raises(ModelMismatchError):
        token_nonlinearity(other, text, reference=ref)
    with pytest.raises(ValueError, match=r"no map for pairs \[1\]"):
        token_nonlinearity(tiny_llama, text, reference=ref, layers=[1])
    (tmp_path / "ref" / "tensors.safetensors").write_bytes(b"truncated")
    with pytest.raises(FittedFileError, match="corrupt"):
        NonlinearityReference.load(tmp_path / "ref", tiny_llama)


def test_bad_input(tiny_llama):
    with pytest.raises(ValueError, match=r"needs at least 34 tokens but the corpus has only"):
        NonlinearityReference().fit(tiny_llama, ["too short"], progress=False)
    with pytest.raises(ValueError, match="needs a fitted NonlinearityReference"):
        token_nonlinearity(tiny_llama, "no reference")
    with pytest.raises(ValueError, match="not fitted"):
        token_nonlinearity(tiny_llama, "unfitted", reference=NonlinearityReference())
    with pytest.raises(ValueError, match="mode"):
        token_nonlinearity(tiny_llama, "x", mode="exact")
    with pytest.raises(ValueError, match="empty"):
        token_nonlinearity(tiny_llama, "", mode="paper")


def test_rank_deficient_corpus_reports_rank(tiny_llama):
    repeated = ["abcab " * 400]  # four distinct bytes: the embeddings span 3 centred dimensions
    with pytest.warns(
        UserWarning, match=r"rank-deficient over these tokens \(rank 3 of d_model=32\)"
    ):
        ref = NonlinearityReference(n_tokens=1024, seq_len=64).fit(
            tiny_llama, repeated, progress=False
        )
    assert int(ref.linearity_.rank[0]) == 3
    assert torch.isfinite(ref.maps_).all()


def test_hooks_are_removed_when_a_hook_raises(tiny_llama):
    windows = token_windows(tiny_llama, None, seq_len=64, n_windows=20, shuffle=True, seed=9)
    ref = NonlinearityReference().fit(tiny_llama, windows, progress=False)
    ref.maps_ = ref.maps_[:, :5]  # a damaged map: the product fails inside the forward pass
    with pytest.raises(RuntimeError):
        token_nonlinearity(tiny_llama, "a hook raises here", reference=ref)
    assert not any(hp.fwd_hooks for hp in tiny_llama.hook_dict.values())
