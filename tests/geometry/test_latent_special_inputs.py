"""Repeated-token sequences and every token fed alone."""

from __future__ import annotations

import pytest
import torch

from tlmicroscope.geometry import (
    repeated_token_sequence,
    single_token_inputs,
    vocabulary_norms,
    vocabulary_states,
)

pytestmark = pytest.mark.models


def test_repeated_token_sequence(tiny_llama):
    bos = tiny_llama.tokenizer.bos_token_id
    ids = repeated_token_sequence(tiny_llama, "e", 6, n_sequences=2)
    assert ids.tolist() == [[bos] + [101] * 5] * 2
    assert repeated_token_sequence(tiny_llama, 120, 3, bos=False).tolist() == [[120, 120, 120]]
    with pytest.raises(ValueError, match="not one"):
        repeated_token_sequence(tiny_llama, "ab", 4)
    with pytest.raises(ValueError, match="context"):
        repeated_token_sequence(tiny_llama, "a", tiny_llama.cfg.n_ctx + 1)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        repeated_token_sequence(tiny_llama, 10_000, 4)


def test_single_token_inputs(tiny_llama):
    assert single_token_inputs(tiny_llama).shape == (tiny_llama.cfg.d_vocab, 1)
    bos = tiny_llama.tokenizer.bos_token_id
    assert single_token_inputs(tiny_llama, [5, 6], prepend_bos=True).tolist() == [
        [bos, 5],
        [bos, 6],
    ]
    with pytest.raises(ValueError, match="empty"):
        single_token_inputs(tiny_llama, [])
    with pytest.raises(ValueError, match="must lie in"):
        single_token_inputs(tiny_llama, [-1])


def test_vocabulary_norms_equal_one_forward_per_token(tiny):
    ids = [3, 65, 200, 257]
    vn = vocabulary_norms(tiny, ids, batch_size=3, progress=False)
    n_layers = tiny.cfg.n_layers
    for j, i in enumerate(ids):
        _, cache = tiny.run_with_cache(
            torch.tensor([[i]]), names_filter=lambda n: n.endswith("hook_resid_post")
        )
        ref = torch.stack(
            [cache[f"blocks.{lay}.hook_resid_post"][0, 0].norm() for lay in range(n_layers)]
        )
        torch.testing.assert_close(vn.norms[:, j], ref, rtol=1e-5, atol=1e-5)
    assert vn.token_ids.tolist() == ids and vn.str_tokens[1] == "A"
    mid = vn.mean_norm()
    assert mid.shape == (4,)
    torch.testing.assert_close(vn.mean_norm([0, 1]), vn.norms[:2].mean(0))
    top = vn.top(2)
    assert len(top) == 2 and top["mean_norm"].iloc[0] >= top["mean_norm"].iloc[1]
    with pytest.raises(ValueError, match="None of the blocks"):
        vn.mean_norm([17])


def test_vocabulary_norms_after_bos_measure_position_one(tiny_llama):
    vn = vocabulary_norms(tiny_llama, [65], prepend_bos=True, progress=False)
    bos = tiny_llama.tokenizer.bos_token_id
    _, cache = tiny_llama.run_with_cache(
        torch.tensor([[bos, 65]]), names_filter=lambda n: n.endswith("resid_post")
    )
    torch.testing.assert_close(vn.norms[0, 0], cache["blocks.0.hook_resid_post"][0, 1].norm())


def test_vocabulary_states(tiny_gpt2):
    st = vocabulary_states(
        tiny_gpt2, [65, 66, 67], components=("resid_post",), layers=[1], progress=False
    )
    assert st.activations.shape == (1, 3, 1, 32) and st.tokens.tolist() == [[65], [66], [67]]
    _, cache = tiny_gpt2.run_with_cache(
        torch.tensor([[66]]), names_filter=lambda n: n == "blocks.1.hook_resid_post"
    )
    torch.testing.assert_close(
        st.activations[0, 1, 0], cache["blocks.1.hook_resid_post"][0, 0], rtol=1e-5, atol=1e-5
    )
