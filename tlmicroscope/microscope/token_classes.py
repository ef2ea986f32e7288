"""Token classes, contextualization and non-linearity per class, and their correlation.

LLM-Microscope finds that punctuation, articles and other function words get the lowest
contextualization loss C (their states keep the most context), and that C correlates positively
with layer-averaged non-linearity (paper Table 2: Pearson 0.2 to 0.5). Tokens here fall in five
classes, decided on the token's text and its neighbours:

* ``punctuation``: every character is Unicode punctuation or a symbol (``,`` ``."`` ``)`` ``$``);
* ``number``: digits, optionally with ``,`` ``.`` ``_`` inside (SmolLM2 splits numbers into digits);
* ``article``: a whole word "a", "an" or "the" (any case);
* ``stop_word``: a whole word of ``STOP_WORDS`` that is not an article;
* ``other``: everything else, including whitespace-only tokens, special tokens and word pieces.

A token is a whole word when it starts one (leading whitespace, the first position, or a
previous token ending in whitespace or punctuation) and the word does not go on into the next
token (it starts with whitespace or punctuation, or there is none). So the "a" inside "c|a|t" is
not an article.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ARTICLES",
    "STOP_WORDS",
    "TOKEN_CLASSES",
    "CorrelationResult",
    "TokenClassSummary",
    "classify_tokens",
    "contextuality_nonlinearity_correlation",
    "token_class_summary",
    "token_table",
]

TOKEN_CLASSES = ("punctuation", "article", "stop_word", "number", "other")

ARTICLES = frozenset({"a", "an", "the"})

#: English stop words: NLTK's ``stopwords.words("english")`` list (179 words, as of NLTK 3.8),
#: fixed here so results do not depend on an installed corpus. Articles are among them; the
#: article class takes precedence.
STOP_WORDS = frozenset(
    [
        "i",
        "me",
        "my",
        "myself",
        "we",
        "our",
        "ours",
        "ourselves",
        "you",
        "you're",
        "you've",
        "you'll",
        "you'd",
        "your",
        "yours",
        "yourself",
        "yourselves",
        "he",
        "him",
        "his",
        "himself",
        "she",
        "she's",
        "her",
        "hers",
        "herself",
        "it",
        "it's",
        "its",
        "itself",
        "they",
        "them",
        "their",
        "theirs",
        "themselves",
        "what",
        "which",
        "who",
        "whom",
        "this",
        "that",
        "that'll",
        "these",
        "those",
        "am",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "have",
        "has",
        "had",
        "having",
        "do",
        "does",
        "did",
        "doing",
        "a",
        "an",
        "the",
        "and",
        "but",
        "if",
        "or",
        "because",
        "as",
        "until",
        "while",
        "of",
        "at",
        "by",
        "for",
        "with",
        "about",
        "against",
        "between",
        "into",
        "through",
        "during",
        "before",
        "after",
        "above",
        "below",
        "to",
        "from",
        "up",
        "down",
        "in",
        "out",
        "on",
        "off",
        "over",
        "under",
        "again",
        "further",
        "then",
        "once",
        "here",
        "there",
        "when",
        "where",
        "why",
        "how",
        "all",
        "any",
        "both",
        "each",
        "few",
        "more",
        "most",
        "other",
        "some",
        "such",
        "no",
        "nor",
        "not",
        "only",
        "own",
        "same",
        "so",
        "than",
        "too",
        "very",
        "s",
        "t",
        "can",
        "will",
        "just",
        "don",
        "don't",
        "should",
        "should've",
        "now",
        "d",
        "ll",
        "m",
        "o",
        "re",
        "ve",
        "y",
        "ain",
        "aren",
        "aren't",
        "couldn",
        "couldn't",
        "didn",
        "didn't",
        "doesn",
        "doesn't",
        "hadn",
        "hadn't",
        "hasn",
        "hasn't",
        "haven",
        "haven't",
        "isn",
        "isn't",
        "ma",
        "mightn",
        "mightn't",
        "mustn",
        "mustn't",
        "needn",
        "needn't",
        "shan",
        "shan't",
        "shouldn",
        "shouldn't",
        "wasn",
        "wasn't",
        "weren",
        "weren't",
        "won",
        "won't",
        "wouldn",
        "wouldn't",
    ]
)


def _is_punct_char(ch: str) -> bool:
    return unicodedata.category(ch)[0] in ("P", "S")


def _is_punctuation(core: str) -> bool:
    return bool(core) and all(_is_punct_char(c) for c in core)


def _is_number(core: str) -> bool:
    return (
        bool(core)
        and core[0].isdigit()
        and all(c.isdigit() or c in ",._" for c in core)
        and core[-1].isdigit()
    )


def _starts_word(tok: str, prev: str | None) -> bool:
    if prev is None or tok[:1].isspace():
        return True
    return prev[-1:].isspace() or (
        bool(prev) and _is_punct_char(prev[-1]) and prev[-1] not in "'’-"
    )


def _ends_word(nxt: str | None) -> bool:
    if nxt is None or not nxt:
        return True
    return nxt[0].isspace() or (_is_punct_char(nxt[0]) and nxt[0] not in "'’-")


def classify_tokens(str_tokens: Sequence[str]) -> list[str]:
    """The class of each token of one sequence (see the module docstring for the rules).

    Examples:
        >>> classify_tokens(["The", " cat", ",", " a", " c", "a", "t", " sat", " on", " 42", "."])
        ['article', 'other', 'punctuation', 'article', 'other', 'other', 'other', 'other',
        'stop_word', 'number', 'punctuation']
    """
    toks = list(str_tokens)
    out = []
    for i, tok in enumerate(toks):
        core = tok.strip()
        prev = toks[i - 1] if i > 0 else None
        nxt = toks[i + 1] if i + 1 < len(toks) else None
        if not core:
            out.append("other")
        elif _is_punctuation(core):
            out.append("punctuation")
        elif _is_number(core):
            out.append("number")
        elif _starts_word(tok, prev) and _ends_word(nxt) and core.lower() in STOP_WORDS:
            out.append("article" if core.lower() in ARTICLES else "stop_word")
        else:
            out.append("other")
    return out


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def token_table(
    contextualization: Any = None, nonlinearity: Any = None, *, skip_first: bool = True
):
    """One row per token: text index, position, token, class, C, layer-averaged non-linearity.

    Args:
        contextualization: A ``Contextualization`` or a list of them.
        nonlinearity: A ``TokenNonlinearity`` or a list of them (aligned with the first).
        skip_first: Leave out position 0 (no prefix, hence no C; and the attention-sink token).
    """
    import pandas as pd

    ctx, nl = _as_list(contextualization), _as_list(nonlinearity)
    if not ctx and not nl:
        raise ValueError("Pass contextualization results, non-linearity results, or both.")
    if ctx and nl and len(ctx) != len(nl):
        raise ValueError(
            f"Got {len(ctx)} contextualization results but {len(nl)} non-linearity results; "
            "pass one of each per text."
        )
    rows = []
    for t in range(max(len(ctx), len(nl))):
        c = ctx[t] if ctx else None
        n = nl[t] if nl else None
        base = c if c is not None else n
        if (
            c is not None
            and n is not None
            and not (c.tokens.shape == n.tokens.shape and bool((c.tokens == n.tokens).all()))
        ):
            raise ValueError(
                f"Text {t}: the contextualization and non-linearity results are for different "
                "tokens."
            )
        nl_tok = n.token_mean() if n is not None else None
        for b, strs in enumerate(base.str_tokens):
            classes = classify_tokens(strs)
            for p, tok in enumerate(strs):
                if skip_first and p == 0:
                    continue
                rows.append(
                    {
                        "text": t,
                        "batch": b,
                        "position": p,
                        "token": tok,
                        "class": classes[p],
                        "C": float(c.C[b, p]) if c is not None else np.nan,
                        "prefix_length": int(c.prefix_length[b, p]) if c is not None else np.nan,
                        "nonlinearity": float(nl_tok[b, p]) if nl_tok is not None else np.nan,
                    }
                )
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class TokenClassSummary:
    """Mean and standard error of C and of layer-averaged non-linearity per token class.

    ``table`` is the per-token table the summary was computed from."""

    classes: tuple[str, ...]
    count: np.ndarray
    C_mean: np.ndarray
    C_sem: np.ndarray
    nonlinearity_mean: np.ndarray
    nonlinearity_sem: np.ndarray
    table: Any

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "class": self.classes,
                "count": self.count,
                "C_mean": self.C_mean,
                "C_sem": self.C_sem,
                "nonlinearity_mean": self.nonlinearity_mean,
                "nonlinearity_sem": self.nonlinearity_sem,
            }
        )

    def lowest_C(self) -> list[str]:
        """Classes with at least one token, ordered from the lowest mean C."""
        order = np.argsort(np.where(np.isnan(self.C_mean), np.inf, self.C_mean))
        return [
            self.classes[i] for i in order if self.count[i] > 0 and not np.isnan(self.C_mean[i])
        ]


def _mean_sem(v: np.ndarray) -> tuple[float, float]:
    v = v[~np.isnan(v)]
    if v.size == 0:
        return np.nan, np.nan
    return float(v.mean()), float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else np.nan


def token_class_summary(
    contextualization: Any = None, nonlinearity: Any = None, *, skip_first: bool = True
) -> TokenClassSummary:
    """C and layer-averaged non-linearity per token class, over one or many texts.

    Examples:
        >>> import torch
        >>> from tlmicroscope.microscope.contextualization import Contextualization
        >>> from tlmicroscope.results import Provenance
        >>> ctx = Contextualization(C=torch.tensor([[float("nan"), 1.0, 3.0, 2.0]]),
        ...     prefix_length=torch.tensor([[0, 1, 2, 3]]),
        ...     tokens=torch.zeros(1, 4, dtype=torch.long),
        ...     str_tokens=[["Hi", ",", " cat", " the"]], reduction="mean",
        ...     provenance=Provenance("m", "M", False, ""))
        >>> s = token_class_summary(ctx)
        >>> s.lowest_C()
        ['punctuation', 'article', 'other']
    """
    table = token_table(contextualization, nonlinearity, skip_first=skip_first)
    count, cm, cs, nm, ns = [], [], [], [], []
    for cls in TOKEN_CLASSES:
        sub = table[table["class"] == cls]
        count.append(len(sub))
        m, s = _mean_sem(sub["C"].to_numpy(float))
        cm.append(m)
        cs.append(s)
        m, s = _mean_sem(sub["nonlinearity"].to_numpy(float))
        nm.append(m)
        ns.append(s)
    return TokenClassSummary(
        TOKEN_CLASSES,
        np.array(count),
        np.array(cm),
        np.array(cs),
        np.array(nm),
        np.array(ns),
        table,
    )


@dataclass(frozen=True)
class CorrelationResult:
    """Pearson (and Spearman) correlation of C with layer-averaged non-linearity, per token.

    The paper's sign convention: C is a loss (low = more context) and non-linearity an error, so
    its reported r > 0 means more contextualised tokens are more linear."""

    pearson_r: float
    p_value: float
    spearman_r: float
    spearman_p: float
    n: int
    C: np.ndarray
    nonlinearity: np.ndarray
    classes: np.ndarray
    tokens: np.ndarray


def contextuality_nonlinearity_correlation(
    contextualization: Any, nonlinearity: Any, *, skip_first: bool = True
) -> CorrelationResult:
    """Pearson r (with its two-sided p-value) between C_i and mean_l E_i^l over all tokens given.

    Raises:
        ValueError: fewer than three tokens with both values, or constant values.

    Examples:
        >>> import torch
        >>> from tlmicroscope.microscope.contextualization import Contextualization
        >>> from tlmicroscope.microscope.nonlinearity import TokenNonlinearity
        >>> from tlmicroscope.results import Provenance
        >>> prov, toks = Provenance("m", "M", False, ""), [["a", " b", " c", " d", " e"]]
        >>> C, pos = torch.tensor([[float("nan"), 1.0, 2.0, 3.0, 5.0]]), torch.arange(5)[None]
        >>> ctx = Contextualization(C, pos, pos, toks, "mean", prov)
        >>> e = torch.tensor([[[0.0, 1.0, 2.0, 4.0, 4.0]]])
        >>> nl = TokenNonlinearity((0,), ("h0→h1",), e, e, pos, toks, 100, "reference", prov)
        >>> corr = contextuality_nonlinearity_correlation(ctx, nl)
        >>> corr.n, round(corr.pearson_r, 3)
        (4, 0.878)
    """
    from scipy import stats

    table = token_table(contextualization, nonlinearity, skip_first=skip_first)
    table = table.dropna(subset=["C", "nonlinearity"])
    if len(table) < 3:
        raise ValueError(
            f"Only {len(table)} tokens have both C and a non-linearity; pass longer or more texts."
        )
    c, e = table["C"].to_numpy(float), table["nonlinearity"].to_numpy(float)
    if np.ptp(c) == 0 or np.ptp(e) == 0:
        raise ValueError(
            "C or the non-linearity is constant over these tokens: the correlation is undefined."
        )
    r, p = stats.pearsonr(c, e)
    rs, ps = stats.spearmanr(c, e)
    return CorrelationResult(
        float(r),
        float(p),
        float(rs),
        float(ps),
        len(table),
        c,
        e,
        table["class"].to_numpy(object),
        table["token"].to_numpy(object),
    )
