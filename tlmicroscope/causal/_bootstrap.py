"""Percentile bootstrap intervals shared by the causal analyses (fidelity, stimulus-response,
injection).

Every interval is drawn from ``bootstrap_indices(n, n_boot, seed)``: ``n_boot`` resamples of ``n``
indices with replacement from ``numpy.random.default_rng(seed)``, so a caller (or a test) can
rebuild the exact resamples behind a reported interval.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_indices", "bootstrap_mean_ci", "percentile_interval"]


def bootstrap_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot n]`` indices drawn with replacement from ``range(n)``.

    Examples:
        >>> bootstrap_indices(3, 2, seed=0).shape
        (2, 3)
    """
    if n < 1:
        raise ValueError("A bootstrap needs at least one observation.")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}.")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def percentile_interval(stats: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The ``(1-level)/2`` and ``(1+level)/2`` quantiles of bootstrap statistics along axis 0 (NaNs
    ignored).

    Examples:
        >>> lo, hi = percentile_interval(np.arange(101.0), 0.9)
        >>> round(float(lo), 6), round(float(hi), 6)
        (5.0, 95.0)
    """
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95; got {level}.")
    q = np.nanquantile(
        np.asarray(stats, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2], axis=0
    )
    return q[0], q[1]


def bootstrap_mean_ci(
    x: np.ndarray, *, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval of the mean over the last axis of ``x`` (NaN entries left out of each
    mean).

    All leading entries share the same resamples, so differences stay paired.

    Examples:
        >>> lo, hi = bootstrap_mean_ci(np.array([[1.0, 2.0, 3.0, 4.0]]), n_boot=500)
        >>> bool(1.0 <= lo[0] <= 2.5 <= hi[0] <= 4.0)
        True
    """
    x = np.asarray(x, dtype=np.float64)
    idx = bootstrap_indices(x.shape[-1], n_boot, seed)
    with np.errstate(invalid="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter(
                "ignore", RuntimeWarning
            )  # an all-NaN resample gives NaN, then ignored
            means = np.nanmean(x[..., idx], axis=-1)  # [... n_boot]
    lo, hi = percentile_interval(np.moveaxis(means, -1, 0), level)
    return lo, hi
