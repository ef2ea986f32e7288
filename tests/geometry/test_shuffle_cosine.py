"""Block shuffle structure and reference sequence; cosine similarity against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tlmicroscope.geometry import cosine_similarity, shuffle_tokens
from tlmicroscope.geometry.shuffle import block_permutation, max_shuffle_level


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_block_structure(level):
    n = 256
    tokens = torch.arange(1000, 1000 + n)
    out, perm = shuffle_tokens(tokens, level, seed=level + 11, return_permutation=True)
    k, size = 4**level, n // 4**level
    assert torch.equal(out, tokens[perm])
    assert sorted(perm.tolist()) == list(range(n))  # a permutation
    blocks = perm.reshape(k, size)
    # each block is one original block, in its original internal order
    assert torch.all(blocks[:, 0] % size == 0)
    assert torch.equal(blocks - blocks[:, :1], torch.arange(size).expand(k, size))
    if level == 0:
        assert torch.equal(out, tokens)


def test_reference_sequence_of_the_paper_code():
    """dadapy_reference.out section 5: one default_rng(0) reused for S = 0, 1, 2 on arange(16)."""
    rng = np.random.default_rng(0)
    got = [shuffle_tokens(np.arange(16), s, rng).tolist() for s in (0, 1, 2)]
    assert got[0] == list(range(16))
    assert got[1] == [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    assert got[2] == [2, 10, 3, 12, 0, 4, 7, 5, 1, 14, 15, 11, 6, 13, 9, 8]


def test_seeds_batches_and_remainders():
    t = torch.arange(64)
    assert torch.equal(shuffle_tokens(t, 2, seed=3), shuffle_tokens(t, 2, seed=3))
    assert not torch.equal(shuffle_tokens(t, 3, seed=3), shuffle_tokens(t, 3, seed=4))
    batch = torch.stack([t, t + 100])
    out = shuffle_tokens(batch, 3, seed=5)
    assert out.shape == (2, 64) and not torch.equal(out[0], out[1] - 100)  # independent rows
    # 4 blocks do not divide 10 tokens: the documented rule keeps the first 4 * 2 = 8
    cut = shuffle_tokens(torch.arange(10), 1, seed=0)
    assert cut.shape == (8,) and sorted(cut.tolist()) == list(range(8))
    with pytest.raises(ValueError, match="do not divide 10 tokens"):
        shuffle_tokens(torch.arange(10), 1, seed=0, remainder="error")
    with pytest.raises(ValueError, match="largest level for 100 tokens is 3"):
        block_permutation(100, 4, 0)
    assert max_shuffle_level(1024) == 5 and max_shuffle_level(512) == 4


def test_cosine_against_the_full_matrix():
    g = torch.Generator().manual_seed(0)
    for n, d in ((50, 7), (30, 200)):
        x = torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3
        x[3] = 0  # a zero row: cosine 0 with everything (scikit-learn's convention)
        norm = x.norm(dim=1, keepdim=True)
        u = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        c = u @ u.T
        off = c[~torch.eye(n, dtype=torch.bool)]
        res = cosine_similarity(x)
        assert res.mean == pytest.approx(float(off.mean()), abs=1e-12)
        assert res.std == pytest.approx(float(off.std(unbiased=False)), abs=1e-10)
        assert res.mean_with_diagonal == pytest.approx(float(c.mean()), abs=1e-12)
        assert res.std_with_diagonal == pytest.approx(float(c.std(unbiased=False)), abs=1e-10)


def test_cosine_reference_value():
    """dadapy_reference.out section 4: N(0,1)^(1024x64) + 0.5, seed 2."""
    x = np.random.default_rng(2).standard_normal((1024, 64)) + 0.5
    res = cosine_similarity(x)
    assert res.mean_with_diagonal == pytest.approx(0.199928, abs=1e-6)
    assert res.mean == pytest.approx(0.199146, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 points"):
        cosine_similarity(x[:1])
