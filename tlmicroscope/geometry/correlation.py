"""The ID-loss link: per-layer correlation of a prompt's intrinsic dimension with its loss.

Over the prompts of a sweep, at one shuffle level at a time (pooling levels mixes the large
between-level differences in loss and ID into the correlation and can flip its sign in late
layers), for each layer: Pearson's r between log ID and the mean next-token cross-entropy, as the
paper, and Spearman's rho (rank-based, so the log does not matter), with two-sided p-values from
``scipy.stats``. The same is offered for the logits' ID against the contextual entropy.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from jaxtyping import Float
from scipy import stats

from tlmicroscope.geometry.sweep import GeometrySweep

__all__ = [
    "IdLossCorrelation",
    "LogitsEntropyCorrelation",
    "id_loss_correlation",
    "logits_entropy_correlation",
]


@dataclass(frozen=True)
class IdLossCorrelation:
    """Per-layer correlation of ID with loss, one row per shuffle level.

    Attributes:
        shuffle_levels: The levels, one row each (never pooled).
        layers, layer_labels: The residual layers, one column each.
        estimator: ``"gride"`` (at ``scale``) or ``"twonn"``.
        scale: The GRIDE range scaling.
        pearson, pearson_p: ``[level layer]`` Pearson r of log ID with loss, and its p-value.
        spearman, spearman_p: ``[level layer]`` Spearman rho of ID with loss, and its p-value.
        n_prompts: ``[level]`` prompts (records) per level.
    """

    shuffle_levels: tuple[int, ...]
    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    estimator: str
    scale: int
    pearson: Float[np.ndarray, "level layer"]
    pearson_p: Float[np.ndarray, "level layer"]
    spearman: Float[np.ndarray, "level layer"]
    spearman_p: Float[np.ndarray, "level layer"]
    n_prompts: tuple[int, ...]

    def to_dataframe(self):
        import pandas as pd

        rows = []
        for i, level in enumerate(self.shuffle_levels):
            for j, layer in enumerate(self.layers):
                rows.append(
                    {
                        "shuffle": level,
                        "layer": layer,
                        "label": self.layer_labels[j],
                        "pearson_log_id": self.pearson[i, j],
                        "pearson_p": self.pearson_p[i, j],
                        "spearman": self.spearman[i, j],
                        "spearman_p": self.spearman_p[i, j],
                        "n_prompts": self.n_prompts[i],
                    }
                )
        return pd.DataFrame(rows)


def _corr(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return (np.nan,) * 4  # type: ignore[return-value]
    pr = stats.pearsonr(np.log(x), y)
    sr = stats.spearmanr(x, y)
    return float(pr.statistic), float(pr.pvalue), float(sr.statistic), float(sr.pvalue)


def id_loss_correlation(
    sweep: GeometrySweep,
    *,
    estimator: str = "gride",
    scale: int = 2,
    shuffle_levels: Iterable[int] | None = None,
) -> IdLossCorrelation:
    """Per-layer Pearson (on log ID) and Spearman correlations of ID with the prompts' loss.

    Args:
        sweep: A ``GeometrySweep`` (``geometry_sweep`` or ``load_geometry_sweep``).
        estimator: ``"gride"`` or ``"twonn"``.
        scale: GRIDE range scaling (the paper's figures: 2; its appendix: 4 and 8).
        shuffle_levels: Levels to report (default all), each on its own, never pooled.

    Raises:
        ValueError: fewer than 3 prompts at a level, or an unknown estimator or scale.

    Examples:
        >>> import numpy as np
        >>> from tlmicroscope.geometry.sweep import GeometrySweep
        >>> rng = np.random.default_rng(0)
        >>> recs = [{"prompt": p, "shuffle": 0, "seed": 0, "layers": [0, 1], "gride_scales": [2],
        ...          "gride": [[float(np.exp(l))], [float(np.exp(l + rng.normal()))]], "loss": l}
        ...         for p, l in enumerate(np.linspace(1, 3, 20))]
        >>> corr = id_loss_correlation(GeometrySweep({"settings": {}}, recs))
        >>> round(float(corr.pearson[0, 0]), 3)
        1.0
    """
    if estimator not in ("gride", "twonn"):
        raise ValueError(f"estimator must be 'gride' or 'twonn', got {estimator!r}.")
    levels = (
        sweep.shuffle_levels if shuffle_levels is None else tuple(int(s) for s in shuffle_levels)
    )
    shape = (len(levels), len(sweep.layers))
    out = {name: np.full(shape, np.nan) for name in ("pr", "pp", "sr", "sp")}
    counts = []
    for i, level in enumerate(levels):
        ids = sweep.metric(estimator, level, scale=scale)
        loss = sweep.scalar("loss", level)
        if len(loss) < 3:
            raise ValueError(
                f"Shuffle level {level} has {len(loss)} prompts; a correlation needs at least 3."
            )
        counts.append(len(loss))
        for j in range(ids.shape[1]):
            out["pr"][i, j], out["pp"][i, j], out["sr"][i, j], out["sp"][i, j] = _corr(
                ids[:, j], loss
            )
    return IdLossCorrelation(
        levels,
        sweep.layers,
        sweep.layer_labels,
        estimator,
        scale,
        out["pr"],
        out["pp"],
        out["sr"],
        out["sp"],
        tuple(counts),
    )


@dataclass(frozen=True)
class LogitsEntropyCorrelation:
    """Correlation of the logits' ID with the contextual entropy, per shuffle level."""

    shuffle_levels: tuple[int, ...]
    scale: int
    pearson: Float[np.ndarray, " level"]
    pearson_p: Float[np.ndarray, " level"]
    spearman: Float[np.ndarray, " level"]
    spearman_p: Float[np.ndarray, " level"]
    n_prompts: tuple[int, ...]


def logits_entropy_correlation(
    sweep: GeometrySweep, *, scale: int = 2, shuffle_levels: Iterable[int] | None = None
) -> LogitsEntropyCorrelation:
    """Pearson (log logits-ID vs contextual entropy) and Spearman, per shuffle level."""
    levels = (
        sweep.shuffle_levels if shuffle_levels is None else tuple(int(s) for s in shuffle_levels)
    )
    vals = np.full((4, len(levels)), np.nan)
    counts = []
    for i, level in enumerate(levels):
        x = sweep.logits_id(level, scale=scale)
        y = sweep.scalar("contextual_entropy", level)
        counts.append(len(y))
        vals[:, i] = _corr(x, y)
    return LogitsEntropyCorrelation(
        levels, scale, vals[0], vals[1], vals[2], vals[3], tuple(counts)
    )
