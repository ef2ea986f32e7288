"""Layer linearity: how well an affine map carries the residual stream from one layer to the next.

For adjacent residual states X = h^l and Y = h^{l+1} (token rows pooled over a corpus),
LLM-Microscope ("Your Transformer is Secretly Linear") centres the columns, divides each matrix by
its Frobenius norm, fits A* = X⁺Y and reports ``1 − ‖XA* − Y‖²_F``. That is the R² of an affine
regression of layer l+1 on layer l. "Without residual" regresses the block's update
``h^{l+1} − h^l`` on h^l.

The reference takes an unguarded SVD pseudo-inverse of the N×d token matrix per pair. Here the
same numbers come from float64 moments gathered during one streamed forward pass: the centred
Gram ``XᵀX`` of each layer and the cross moment ``XᵀY`` of each pair. An eigendecomposition of the
Gram gives the solve, its numerical rank and an optional ridge. Pairs share the moments, so a
layer costs two d×d products per batch and one d×d eigendecomposition, never an N×d SVD.

Two facts make raw scores misleading, and the result reports both with every score:
* with N ≤ d tokens the fit is exact, so the score is 1 whatever the data;
* for unrelated data the expected score is ``rank/(N−1)`` (the chance floor), not 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.corpus import CorpusSource
from tlmicroscope.inputs import check_layers, ensure_eval
from tlmicroscope.layers import residual_label
from tlmicroscope.microscope._forward import corpus_windows, stream_residual
from tlmicroscope.microscope._moments import (
    DEFAULT_RTOL,
    ResidualMoments,
    fit_pair,
    paper_fit,
    paper_pair_score,
)
from tlmicroscope.results import Provenance

__all__ = [
    "DEFAULT_RTOL",
    "LinearityResult",
    "linearity_score",
    "linearity_scores",
    "pair_label",
    "paper_fit",
]

Mode = Literal["lstsq", "paper"]


def pair_label(layer: int) -> str:
    """``"h3→h4"`` for the pair (h^3, h^4), in the layer vocabulary (``tlmicroscope.layers``)."""
    return f"{residual_label(layer)}→{residual_label(layer + 1)}"


@dataclass(frozen=True)
class LinearityResult:
    """Linearity scores of adjacent residual states, with what is needed to read them.

    Attributes:
        pairs: First residual index l of each pair (h^l, h^{l+1}); h^0 is the embedding and
            h^{n_layers} the last block's ``resid_post`` (no final norm).
        pair_labels: ``"hl→hl+1"`` labels for plots (``"h3→h4"``).
        score: Linearity with the residual, R² of h^{l+1} on h^l.
        score_without_residual: R² of the block's update h^{l+1} − h^l on h^l.
        rank: Numerical rank of the centred h^l used in the solve.
        chance_floor: ``rank/(N−1)``, the expected score of unrelated data.
        n_tokens: N, the token rows pooled.
        d_model: d.
        mode: ``"lstsq"`` (float64 moments, conditioned solve) or ``"paper"`` (the reference's
            per-pair SVD pseudo-inverse on the token matrix).
        provenance: Model, weight processing and the estimator settings.
    """

    pairs: tuple[int, ...]
    pair_labels: tuple[str, ...]
    score: Float[torch.Tensor, " pair"]
    score_without_residual: Float[torch.Tensor, " pair"]
    rank: Int[torch.Tensor, " pair"]
    chance_floor: Float[torch.Tensor, " pair"]
    n_tokens: int
    d_model: int
    mode: str
    provenance: Provenance

    def to_dataframe(self):
        """One row per pair: labels, both scores, rank, chance floor, N and d."""
        import pandas as pd

        return pd.DataFrame(
            {
                "pair": list(self.pair_labels),
                "layer": list(self.pairs),
                "score": self.score.tolist(),
                "score_without_residual": self.score_without_residual.tolist(),
                "rank": self.rank.tolist(),
                "chance_floor": self.chance_floor.tolist(),
                "n_tokens": self.n_tokens,
                "d_model": self.d_model,
            }
        )


def linearity_score(
    x: Any,
    y: Any,
    *,
    without_residual: bool = False,
    mode: Mode = "lstsq",
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
) -> float:
    """The linearity score of one pair of token matrices ``x, y`` ``[N d]`` (numpy or torch).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(500, 8, generator=g)
        >>> round(linearity_score(x, x @ torch.randn(8, 8, generator=g) + 3.0), 6)  # exactly affine
        1.0
        >>> round(linearity_score(x, torch.randn(500, 8, generator=g)), 2)  # chance: 8/499 ≈ 0.016
        0.02
    """
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    yt = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    if xt.ndim != 2 or yt.ndim != 2 or xt.shape[0] != yt.shape[0]:
        raise ValueError(
            "x and y must be [N d] matrices with the same N; got "
            f"{tuple(xt.shape)} and {tuple(yt.shape)}."
        )
    if without_residual and xt.shape != yt.shape:
        raise ValueError(
            "Without the residual, x and y must have the same shape (y − x is regressed on x)."
        )
    if mode == "paper":
        yy = yt - xt if without_residual else yt
        return paper_pair_score(xt, yy)[0]
    if mode != "lstsq":
        raise ValueError(f"mode must be 'lstsq' or 'paper', got {mode!r}.")
    xd, yd = xt.double(), yt.double()
    xc, yc = xd - xd.mean(0), yd - yd.mean(0)
    fit = fit_pair(xc.T @ xc, float((yc * yc).sum()), xc.T @ yc, rtol=rtol, ridge=ridge)
    return fit.score_without_residual if without_residual else fit.score


def _check_token_count(n: int, d: int, allow_underdetermined: bool, mode: str) -> None:
    if n <= d + 1:
        msg = (
            f"Only N={n} token rows for d_model={d}: with N ≤ d+1 an affine fit is exact, so every "
            "score is about 1 whatever the data. Use at least ~10×d tokens (n_tokens=...)"
        )
        if not allow_underdetermined:
            raise ValueError(msg + ", or pass allow_underdetermined=True to compute it anyway.")
        warnings.warn(msg + ".", UserWarning, stacklevel=3)
    elif d / (n - 1) > 0.1:
        warnings.warn(
            f"N={n} tokens for d_model={d}: unrelated data would already score about "
            f"{d / (n - 1):.2f} (the chance floor d/(N−1)). Use more tokens for a meaningful "
            "score.",
            UserWarning,
            stacklevel=3,
        )


def linearity_scores(
    model_or_states: Any,
    corpus: CorpusSource | torch.Tensor = None,
    *,
    layers: Sequence[int] | None = None,
    n_tokens: int | None = None,
    seq_len: int = 256,
    batch_size: int = 8,
    skip_positions: int = 0,
    mode: Mode = "lstsq",
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
    allow_underdetermined: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> LinearityResult:
    """Linearity scores of every adjacent pair of residual states over a corpus.

    Args:
        model_or_states: A model (run over ``corpus``), or residual states you already have as a
            ``[layer N d_model]`` tensor of h^0..h^L rows (then ``corpus`` is unused).
        corpus: Text source (``None``/``"embedded"``, a file, a folder, an iterable of texts) or
            token ids ``[n seq]``.
        layers: First indices l of the pairs (h^l, h^{l+1}) to score, in 0..n_layers−1 (default
            all).
        n_tokens: Token rows to pool (default ``max(8192, 32·d_model)``: a chance floor near 0.03).
        seq_len: Window length when cutting the corpus.
        skip_positions: Drop the first positions of each window (attention-sink tokens with
            outsized norms); the reference keeps them (0).
        mode: ``"lstsq"``: float64 moments and a conditioned eigen-solve; ``"paper"``: the
            reference's unguarded SVD pseudo-inverse per pair on the token matrix (it holds every
            state of every token in memory, ``(L+1)·N·d`` floats).
        rtol: Relative eigenvalue cut-off defining the rank (``"lstsq"``).
        ridge: Tikhonov term as a fraction of the mean eigenvalue (``"lstsq"``; 0 = none).
        allow_underdetermined: Compute even with N ≤ d+1 tokens (with a warning) instead of
            refusing.

    Returns:
        A ``LinearityResult`` with both scores, the rank, the chance floor, N and d per pair.

    Raises:
        ValueError: N ≤ d+1 without ``allow_underdetermined``, a corpus too small, NaN activations.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> text = (
        ...     "The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS! "
        ...     "0123456789 "
        ... ) * 6
        >>> res = linearity_scores(
        ...     tiny_model(n_layers=2), [text], n_tokens=512, seq_len=64, progress=False
        ... )
        >>> res.pair_labels, res.n_tokens, res.d_model
        (('h0→h1', 'h1→h2'), 512, 32)
        >>> bool((res.score > res.chance_floor).all())
        True
    """
    if mode not in ("lstsq", "paper"):
        raise ValueError(f"mode must be 'lstsq' or 'paper', got {mode!r}.")
    if isinstance(model_or_states, torch.Tensor):
        return _scores_from_states(
            model_or_states, layers, mode, rtol, ridge, allow_underdetermined
        )
    model = model_or_states
    ensure_eval(model)
    n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    pairs = check_layers(layers, n_layers, "pair")
    states = sorted(set(pairs) | {p + 1 for p in pairs})
    n_tokens = int(n_tokens or max(8192, 32 * d))
    windows = corpus_windows(
        model, corpus, n_tokens=n_tokens, seq_len=seq_len, seed=seed, what="linearity_scores"
    )
    if skip_positions >= windows.shape[1]:
        raise ValueError(
            f"skip_positions={skip_positions} drops every position of "
            f"{windows.shape[1]}-token windows."
        )
    n_rows = windows.shape[0] * (windows.shape[1] - skip_positions)
    _check_token_count(n_rows, d, allow_underdetermined, mode)

    if mode == "paper":
        held = {layer: [] for layer in states}
        stream_residual(
            model,
            windows,
            lambda layer, h: held[layer].append(
                h[:, skip_positions:].reshape(-1, d).to("cpu", torch.float32).clone()
            ),
            layers=states,
            batch_size=batch_size,
            progress=progress,
            desc="linearity (paper)",
        )
        stacked = {layer: torch.cat(v) for layer, v in held.items()}
        result = _paper_scores(stacked, pairs, d)
    else:
        moments = ResidualMoments(states, pairs, d)
        stream_residual(
            model,
            windows,
            lambda layer, h: moments.add(layer, h[:, skip_positions:].reshape(-1, d)),
            layers=states,
            batch_size=batch_size,
            progress=progress,
            desc="linearity",
        )
        result = _moment_scores(moments, pairs, rtol, ridge)
    scores, scores_wo, ranks = result
    prov = Provenance.from_model(
        model,
        mode=mode,
        n_tokens=n_rows,
        seq_len=int(windows.shape[1]),
        skip_positions=skip_positions,
        rtol=rtol,
        ridge=ridge,
        seed=seed,
    )
    return _result(pairs, scores, scores_wo, ranks, n_rows, d, mode, prov)


def _moment_scores(moments: ResidualMoments, pairs: list[int], rtol: float, ridge: float):
    scores, scores_wo, ranks = [], [], []
    for layer in pairs:
        fit = fit_pair(
            moments.gram(layer),
            float(torch.trace(moments.gram(layer + 1))),
            moments.cross_moment(layer),
            rtol=rtol,
            ridge=ridge,
        )
        scores.append(fit.score)
        scores_wo.append(fit.score_without_residual)
        ranks.append(fit.rank)
    return scores, scores_wo, ranks


def _paper_scores(stacked: dict[int, torch.Tensor], pairs: list[int], d: int):
    scores, scores_wo, ranks = [], [], []
    for layer in pairs:
        x, y = stacked[layer], stacked[layer + 1]
        s, r = paper_pair_score(x, y)
        s_wo, _ = paper_pair_score(x, y - x)
        scores.append(s)
        scores_wo.append(s_wo)
        ranks.append(int(r))
    return scores, scores_wo, ranks


def _scores_from_states(states: torch.Tensor, layers, mode, rtol, ridge, allow_underdetermined):
    if states.ndim != 3:
        raise ValueError(
            f"Residual states must be [layer N d_model], got shape {tuple(states.shape)}."
        )
    n_states, n, d = states.shape
    if n_states < 2:
        raise ValueError("Pass at least two residual states (h^l and h^{l+1}).")
    pairs = check_layers(layers, n_states - 1, "pair")
    _check_token_count(n, d, allow_underdetermined, mode)
    if mode == "paper":
        result = _paper_scores({i: states[i] for i in range(n_states)}, pairs, d)
    else:
        moments = ResidualMoments(range(n_states), pairs, d)
        for i in range(n_states):
            moments.add(i, states[i])
        result = _moment_scores(moments, pairs, rtol, ridge)
    prov = Provenance(
        "states", "Tensor", False, "", settings={"mode": mode, "rtol": rtol, "ridge": ridge}
    )
    return _result(pairs, *result, n, d, mode, prov)


def _result(pairs, scores, scores_wo, ranks, n, d, mode, prov) -> LinearityResult:
    rank_t = torch.tensor(ranks, dtype=torch.long)
    for layer, r in zip(pairs, ranks):
        if r < d and mode == "lstsq":
            warnings.warn(
                f"h^{layer} is rank-deficient over these tokens (rank {r} of d_model={d}); the "
                f"pair {pair_label(layer)} was solved on its {r}-dimensional span (truncated "
                "pseudo-inverse). Pass ridge=... for a Tikhonov solve instead.",
                UserWarning,
                stacklevel=3,
            )
            break
    return LinearityResult(
        pairs=tuple(pairs),
        pair_labels=tuple(pair_label(p) for p in pairs),
        score=torch.tensor(scores, dtype=torch.float64),
        score_without_residual=torch.tensor(scores_wo, dtype=torch.float64),
        rank=rank_t,
        chance_floor=rank_t.double() / max(n - 1, 1),
        n_tokens=int(n),
        d_model=int(d),
        mode=mode,
        provenance=prov,
    )
