"""Token classes, per-class summaries and the C–non-linearity correlation on hand-made results."""

import numpy as np
import pytest
import torch
from scipy import stats

from tlmicroscope.microscope import (
    ARTICLES,
    STOP_WORDS,
    TOKEN_CLASSES,
    classify_tokens,
    contextuality_nonlinearity_correlation,
    token_class_summary,
    token_table,
)
from tlmicroscope.microscope.contextualization import Contextualization
from tlmicroscope.microscope.nonlinearity import TokenNonlinearity
from tlmicroscope.results import Provenance

PROV = Provenance("m", "M", False, "")


def _ctx(tokens, C):
    n = len(tokens)
    return Contextualization(
        C=torch.tensor([C], dtype=torch.float32),
        prefix_length=torch.arange(n)[None],
        tokens=torch.arange(n)[None],
        str_tokens=[list(tokens)],
        reduction="mean",
        provenance=PROV,
    )


def _nl(tokens, per_layer):
    e = torch.tensor(np.asarray(per_layer, dtype=np.float32))[:, None, :]
    n = len(tokens)
    return TokenNonlinearity(
        pairs=tuple(range(e.shape[0])),
        pair_labels=tuple(f"{i}" for i in range(e.shape[0])),
        error=e,
        relative_error=e,
        tokens=torch.arange(n)[None],
        str_tokens=[list(tokens)],
        n_fit=100,
        mode="reference",
        provenance=PROV,
    )


def test_the_fixed_lists():
    assert len(STOP_WORDS) == 179 and ARTICLES <= STOP_WORDS
    assert {"the", "and", "of", "don't", "wouldn't"} <= STOP_WORDS
    assert "cat" not in STOP_WORDS
    assert TOKEN_CLASSES == ("punctuation", "article", "stop_word", "number", "other")


def test_classify_hand_made_tokens():
    toks = [
        "The",
        " cat",
        ",",
        " a",
        " c",
        "a",
        "t",
        " sat",
        " on",
        " 42",
        ".",
        "\n",
        " 3",
        ",",
        "000",
        " An",
        " ANd",
        " (",
        "—",
        "’s",
        "<|endoftext|>",
    ]
    assert classify_tokens(toks) == [
        "article",
        "other",
        "punctuation",
        "article",
        "other",
        "other",
        "other",
        "other",
        "stop_word",
        "number",
        "punctuation",
        "other",
        "number",
        "punctuation",
        "number",
        "article",
        "stop_word",
        "punctuation",
        "punctuation",
        "other",
        "other",
    ]
    # a stop word that continues into the next piece is a word piece, not a stop word
    assert classify_tokens([" in", "side"]) == ["other", "other"]


def test_summary_matches_a_hand_computation():
    toks = ["Start", " the", " cat", ",", " and", " the", " dog", "."]
    C = [np.nan, 1.0, 4.0, 0.5, 2.0, 1.5, 5.0, 0.3]
    E = [[9.0, 1.0, 3.0, 1.0, 2.0, 1.0, 4.0, 1.0], [9.0, 3.0, 5.0, 1.0, 2.0, 3.0, 6.0, 3.0]]
    s = token_class_summary(_ctx(toks, C), _nl(toks, E))
    df = s.to_dataframe().set_index("class")
    assert df.loc["article", "count"] == 2 and df.loc["article", "C_mean"] == pytest.approx(1.25)
    assert df.loc["article", "C_sem"] == pytest.approx(np.std([1.0, 1.5], ddof=1) / np.sqrt(2))
    assert df.loc["punctuation", "C_mean"] == pytest.approx(0.4)
    assert df.loc["punctuation", "nonlinearity_mean"] == pytest.approx(np.mean([1.0, 2.0]))
    assert df.loc["other", "count"] == 2  # position 0 ("Start") is left out
    assert df.loc["number", "count"] == 0 and np.isnan(df.loc["number", "C_mean"])
    assert s.lowest_C() == ["punctuation", "article", "stop_word", "other"]
    full = token_table(_ctx(toks, C), skip_first=False)
    assert len(full) == 8 and np.isnan(full.loc[0, "C"])


def test_correlation_is_pearson_with_its_p_value():
    rng = np.random.default_rng(0)
    n = 60
    toks = [f" w{i}" for i in range(n)]
    e = rng.normal(size=n)
    c = 0.5 * e + rng.normal(size=n)
    texts_c = [_ctx(toks[:30], [np.nan, *c[1:30]]), _ctx(toks[30:], [np.nan, *c[31:]])]
    texts_e = [_nl(toks[:30], [e[:30]]), _nl(toks[30:], [e[30:]])]
    corr = contextuality_nonlinearity_correlation(texts_c, texts_e)
    keep = np.r_[1:30, 31:60]
    r, p = stats.pearsonr(c[keep], e[keep])
    assert corr.n == 58
    assert corr.pearson_r == pytest.approx(r, abs=1e-5) and corr.p_value == pytest.approx(
        p, rel=1e-3
    )
    assert corr.pearson_r > 0 and corr.spearman_r == pytest.approx(
        stats.spearmanr(c[keep], e[keep])[0], abs=1e-5
    )


def test_correlation_bad_input():
    toks = ["a", " b", " c"]
    with pytest.raises(ValueError, match="Only 2 tokens"):
        contextuality_nonlinearity_correlation(_ctx(toks, [np.nan, 1, 2]), _nl(toks, [[1, 2, 3]]))
    toks = ["a", " b", " c", " d", " e"]
    with pytest.raises(ValueError, match="constant"):
        contextuality_nonlinearity_correlation(
            _ctx(toks, [np.nan, 1, 1, 1, 1]), _nl(toks, [[1, 2, 3, 4, 5]])
        )
    with pytest.raises(ValueError, match="different tokens"):
        token_table(_ctx(toks, [0] * 5), _nl(["x"] * 4, [[1, 2, 3, 4]]))
    with pytest.raises(ValueError, match="Pass contextualization"):
        token_table()
    with pytest.raises(ValueError, match="one of each per text"):
        token_table([_ctx(toks, [0] * 5)] * 2, [_nl(toks, [[0] * 5])])
