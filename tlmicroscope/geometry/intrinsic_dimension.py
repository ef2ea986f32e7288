"""Intrinsic dimension of a point cloud: TwoNN ("base", "ml", LLM-Microscope) and GRIDE.

All estimators use the ratios of neighbour distances mu = r_{n2} / r_{n1}, which are Pareto-like
with exponent d on a locally uniform d-dimensional manifold. The numbers reproduce dadapy 0.3.4
(``compute_id_2NN``, ``return_id_scaling_gride``) and the LLM-Microscope reference
(``intrinsic_dimension`` in ``llm_microscope``) to 1e-6; dadapy itself cannot be a dependency
(it pins numpy<2 and an old jax), and the distances here come from ``nearest_neighbours``.

* TwoNN "ml": d = (N - 1) / sum(log mu), mu = r2 / r1 over all points.
* TwoNN "base" (dadapy's default): keep the ``floor(N * fraction)`` smallest log mu and fit
  y = -log(1 - i/N) = d x through the origin, d = sum(xy) / sum(x^2).
* TwoNN "microscope" (LLM-Microscope): points with r1 ~ 0 or mu <= 1 + 1e-8 are left out of the
  fit but kept in the ranks of the empirical CDF F = (k + j) / N, and only the smallest
  ``n // reduction_factor`` (20%) ratios are fitted. Duplicates are handled this way, not removed.
* GRIDE at range scaling n2 = 2 n1 (scales 2, 4, 8, ...): the maximum-likelihood d of
  f(mu) = d (mu^d - 1)^(n2-n1-1) / (B(n2-n1, n1) mu^((n2-1)d+1)), after dadapy's outlier cut
  (keep mu < q50 + 20 (q95 - q50)), found by bisection of the score on [0.001, 1000] to 1e-7, with
  the Cramér-Rao error 1 / sqrt(N/d^2 + sum (n2-n1-1) (log mu)^2 mu^-d / (1 - mu^-d)^2).
  At scale 2 it equals TwoNN "ml" after the outlier cut.

Except for the microscope variant, exact duplicate points are removed first (as the Geometry of
Tokens code does) and their number is reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float

from tlmicroscope.geometry.neighbours import as_points, nearest_neighbours

__all__ = [
    "TWONN_VARIANTS",
    "IntrinsicDimensionResult",
    "gride_from_distances",
    "gride_scales",
    "intrinsic_dimension",
    "remove_duplicates",
    "twonn_from_distances",
]

TWONN_VARIANTS = ("base", "ml", "microscope")
_EPS64 = float(torch.finfo(torch.float64).eps)
#: Bisection bracket and tolerance of dadapy's GRIDE.
_GRIDE_D0, _GRIDE_D1, _GRIDE_TOL = 1e-3, 1e3, 1e-7


@dataclass(frozen=True)
class IntrinsicDimensionResult:
    """Intrinsic-dimension estimates of one cloud, one per scale.

    Attributes:
        method: ``"twonn"`` or ``"gride"``.
        variant: The TwoNN variant (``"base"``, ``"ml"``, ``"microscope"``); ``None`` for GRIDE.
        ids: ``[scale]`` the estimates (TwoNN has one).
        errors: ``[scale]`` one-sigma errors: Cramér-Rao for GRIDE and TwoNN "ml", NaN for the
            regression variants, which have none.
        scales: Range scaling n2 of each estimate (n1 = n2 / 2); TwoNN is scale 2.
        radii: ``[scale]`` mean distance of the neighbours involved (the length scale probed).
        n_points: Points the estimate used (after removing duplicates).
        n_input: Points passed in.
        n_duplicates: Exact duplicates found (removed, except by the microscope variant).
        n_discarded: Per scale, points left out of the fit (outlier cut, discard fraction, or the
            microscope variant's rules).
        settings: The estimator's settings.
    """

    method: str
    variant: str | None
    ids: Float[torch.Tensor, " scale"]
    errors: Float[torch.Tensor, " scale"]
    scales: tuple[int, ...]
    radii: Float[torch.Tensor, " scale"]
    n_points: int
    n_input: int
    n_duplicates: int
    n_discarded: tuple[int, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def estimate(self) -> float:
        """The estimate at the smallest scale (TwoNN's only one; GRIDE at n2 = 2 by default)."""
        return float(self.ids[0])

    @property
    def error(self) -> float:
        return float(self.errors[0])

    def at(self, scale: int) -> float:
        """The estimate at range scaling ``scale`` (n2)."""
        if scale not in self.scales:
            raise ValueError(f"Scale {scale} was not estimated; scales are {self.scales}.")
        return float(self.ids[self.scales.index(scale)])

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "method": self.method,
                "variant": self.variant,
                "scale": list(self.scales),
                "id": self.ids.tolist(),
                "error": self.errors.tolist(),
                "radius": self.radii.tolist(),
                "n_points": self.n_points,
                "n_duplicates": self.n_duplicates,
                "n_discarded": list(self.n_discarded),
            }
        )


def remove_duplicates(points) -> tuple[Float[torch.Tensor, "m d"], torch.Tensor, int]:
    """Drop exact duplicate rows, keeping each first occurrence in the original order.

    Returns:
        ``(unique_points, kept_row_indices, n_duplicates)``.

    Examples:
        >>> u, kept, n_dup = remove_duplicates(torch.tensor([[1.0, 2], [3, 4], [1, 2]]))
        >>> u.tolist(), kept.tolist(), n_dup
        ([[1.0, 2.0], [3.0, 4.0]], [0, 1], 1)
    """
    x = as_points(points) + 0.0  # + 0.0 turns -0.0 into 0.0
    n = x.shape[0]
    # equal rows have equal hashes of their bit patterns; distinct hashes prove there is no
    # duplicate
    weights = torch.randint(1, 2**62, (x.shape[1],), generator=torch.Generator().manual_seed(0)) | 1
    hashes = (x.view(torch.int64) * weights.to(x.device)).sum(1)
    if torch.unique(hashes).numel() == n:
        return x, torch.arange(n, device=x.device), 0
    _, inverse = torch.unique(x, dim=0, return_inverse=True)
    m = int(inverse.max()) + 1
    first = torch.full((m,), n, dtype=torch.long, device=x.device)
    first.scatter_reduce_(0, inverse, torch.arange(n, device=x.device), reduce="amin")
    kept = torch.sort(first).values
    return x[kept], kept, n - m


def gride_scales(
    max_scale: int | None = None, n_points: int | None = None, *, cap: int = 256
) -> tuple[int, ...]:
    """Range scalings 2, 4, ..., ``max_scale`` (a power of two).

    With ``max_scale=None`` the scales run up to ``cap`` or the largest power of two that
    ``n_points`` allow (a scale n2 needs n2 + 1 points).

    Examples:
        >>> gride_scales(16)
        (2, 4, 8, 16)
        >>> gride_scales(None, n_points=100)
        (2, 4, 8, 16, 32, 64)
    """
    if max_scale is None:
        top = cap if n_points is None else min(cap, max(2, n_points - 1))
        max_scale = 2 ** math.floor(math.log2(top))
    max_scale = int(max_scale)
    if max_scale < 2 or max_scale & (max_scale - 1):
        raise ValueError(f"max_scale must be a power of two >= 2 (2, 4, 8, ...), got {max_scale}.")
    return tuple(2**i for i in range(1, int(math.log2(max_scale)) + 1))


def _check_scales(scales: Sequence[int]) -> tuple[int, ...]:
    out = tuple(sorted({int(s) for s in scales}))
    bad = [s for s in out if s < 2 or s & (s - 1)]
    if not out or bad:
        raise ValueError(
            "GRIDE scales are range scalings n2 = 2, 4, 8, ... (powers of two); got "
            f"{tuple(scales)}."
        )
    return out


def _need_points(n_unique: int, need: int, what: str, n_input: int, n_dup: int, fix: str) -> None:
    if n_unique == 1 and n_input > 1:
        raise ValueError(
            f"All {n_input} points are identical: a cloud with a single distinct point has no "
            "intrinsic dimension. Check that the activations vary across tokens."
        )
    if n_unique < need:
        dup = f" after removing {n_dup} duplicates" if n_dup else ""
        raise ValueError(
            f"{what} needs at least {need} distinct points, but the cloud has {n_unique}{dup}. "
            f"{fix}"
        )


def _check_nonzero(r1: torch.Tensor) -> None:
    zero = int((r1 <= 0).sum())
    if zero:
        raise ValueError(
            f"{zero} points have a neighbour at zero distance after removing exact duplicates: "
            "their differences underflow float64. Rescale the cloud (e.g. divide by its largest "
            "norm) or round away near-duplicates before estimating the dimension."
        )


def twonn_from_distances(
    r1: Float[torch.Tensor, " n"],
    r2: Float[torch.Tensor, " n"],
    *,
    variant: str = "base",
    fraction: float = 0.9,
    reduction_factor: int = 5,
    scale: float = 1.0,
) -> tuple[float, float, int]:
    """TwoNN from first and second neighbour distances: ``(id, error, n_discarded)``.

    ``scale`` is the mean point norm of the centred cloud; the microscope variant's 1e-8
    threshold on r1 applies to distances in those units, as in the reference.
    """
    r1, r2 = r1.to(torch.float64), r2.to(torch.float64)
    n = r1.numel()
    if variant == "microscope":
        bad = r1 / scale < 1e-8
        mu = torch.where(
            bad, torch.full_like(r1, -1.0), r2 / torch.where(bad, torch.ones_like(r1), r1)
        )
        mu = torch.sort(mu).values
        useless = int((mu <= 1 + 1e-8).sum())
        kept = n - useless
        num = min(kept // reduction_factor, kept - 1)
        if num < 1:
            raise ValueError(
                f"The microscope TwoNN keeps {kept} of {n} points (the others have a duplicate or "
                f"a tie) and fits the smallest 1/{reduction_factor} of them: none is left. "
                f"Use at least {2 * reduction_factor + 1} distinct points."
            )
        f_emp = (
            torch.arange(useless + 1, useless + num + 1, dtype=torch.float64, device=r1.device) / n
        )
        x = torch.log(mu[useless : useless + num])
        y = -torch.log1p(-f_emp)
        return float((x * y).sum() / (x * x).sum()), math.nan, n - num
    log_mu = torch.log(r2 / r1)
    if variant == "ml" or math.isclose(fraction, 1.0):
        d = (n - 1) / float(log_mu.sum())
        return d, d / math.sqrt(n), 0
    if variant != "base":
        raise ValueError(f"Unknown TwoNN variant {variant!r}; choose from {TWONN_VARIANTS}.")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
    n_eff = int(n * fraction)
    if n_eff < 1:
        raise ValueError(
            f"fraction={fraction} of {n} points keeps none; use more points or a larger fraction."
        )
    x = torch.sort(log_mu).values[:n_eff]
    y = -torch.log1p(-torch.arange(1, n_eff + 1, dtype=torch.float64, device=r1.device) / n)
    return float((x * y).sum() / (x * x).sum()), math.nan, n - n_eff


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float64)


def _gride_score(d: np.ndarray, log_mu: np.ndarray, keep: np.ndarray, n1, n2, n_kept) -> np.ndarray:
    """dadapy's negative score -l'(d) (the bisection needs only its sign), per scale."""
    one_m = -np.expm1(-d[None, :] * log_mu)
    one_m = np.where(one_m < 2 * _GRIDE_TOL, 2 * _GRIDE_TOL, one_m)
    terms = ((1 - n2 + n1) / one_m + n2 - 1) * log_mu
    return np.where(keep, terms, 0.0).sum(0) - (n_kept - 1) / d


def gride_from_distances(
    distances: Float[torch.Tensor, "n rank"], ranks: Sequence[int], scales: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """GRIDE at each range scaling n2 in ``scales`` from neighbour distances at ``ranks``.

    The maximisation is numpy on the CPU: a few thousand ratios per scale, where torch's per-op
    overhead (and thread start-up on a busy machine) would dominate.

    Returns:
        ``(ids, errors, radii, n_discarded)``, one entry per scale.
    """
    col = {r: j for j, r in enumerate(ranks)}
    dist = distances.detach().to("cpu", torch.float64).numpy()
    n2 = np.array([float(s) for s in scales])
    n1 = n2 / 2
    r_n1 = dist[:, [col[int(s) // 2] for s in scales]]
    r_n2 = dist[:, [col[int(s)] for s in scales]]
    mus = r_n2 / r_n1
    mus = np.where(mus == 1, mus + 10 * _EPS64, mus)  # dadapy nudges exact ties off 1
    q95, q50 = np.percentile(mus, [95, 50], axis=0)
    keep = mus < 20 * (q95 - q50) + q50  # dadapy's outlier cut (overlapping points)
    n_kept = keep.sum(0).astype(np.float64)
    log_mu = np.log(mus)
    d0 = np.full(len(scales), _GRIDE_D0)
    d1 = np.full(len(scales), _GRIDE_D1)
    s1 = _gride_score(d1, log_mu, keep, n1, n2, n_kept)
    active = np.abs(d0 - d1) > _GRIDE_TOL
    while active.any():
        mid = (d0 + d1) / 2
        same = _gride_score(mid, log_mu, keep, n1, n2, n_kept) * s1 > 0
        d1 = np.where(active & same, mid, d1)
        d0 = np.where(active & ~same, mid, d0)
        active = np.abs(d0 - d1) > _GRIDE_TOL
    ids = (d0 + d1) / 2
    # Cramér-Rao error on every (unfiltered) ratio, as dadapy
    mu_d = np.exp(-ids[None, :] * log_mu)
    one_m = np.maximum(1 - mu_d, 5 * _EPS64)
    fisher = mus.shape[0] / ids**2 + (n2 - n1 - 1) * ((log_mu / one_m) ** 2 * mu_d).sum(0)
    return (
        _tensor(ids),
        _tensor(1 / np.sqrt(fisher)),
        _tensor(((r_n1 + r_n2) / 2).mean(0)),
        tuple(int(mus.shape[0] - k) for k in keep.sum(0)),
    )


def intrinsic_dimension(
    points,
    method: str = "twonn",
    *,
    variant: str = "base",
    fraction: float = 0.9,
    max_scale: int | None = None,
    scales: Sequence[int] | None = None,
    reduction_factor: int = 5,
    deduplicate: bool = True,
) -> IntrinsicDimensionResult:
    """Intrinsic dimension of a ``[n d]`` point cloud (one prompt's tokens at one layer).

    Args:
        points: The cloud, ``[n d]`` (any float dtype or device; computed in float64).
        method: ``"twonn"`` or ``"gride"``.
        variant: For TwoNN: ``"base"`` (dadapy's default: linear fit on the ``fraction`` smallest
            ratios), ``"ml"`` (maximum likelihood), or ``"microscope"`` (the LLM-Microscope
            variant: fit on the smallest 1/``reduction_factor`` ratios, duplicates and ties
            dropped from the fit but kept in the empirical CDF's ranks). Use
            ``intrinsic_dimension(points, "twonn", variant="microscope")`` for the LLM-Microscope
            ID profile.
        fraction: Share of the smallest ratios the "base" fit keeps (dadapy's ``mu_fraction``).
        max_scale: GRIDE: estimate at range scalings 2, 4, ..., ``max_scale``. ``None`` runs up
            to 256 or as far as the points allow; an explicit value needs ``max_scale + 1``
            distinct points.
        scales: GRIDE: or exactly these range scalings (powers of two).
        reduction_factor: The microscope variant fits the smallest ``n // reduction_factor`` ratios.
        deduplicate: Remove exact duplicate points first (ignored by the microscope variant,
            which has its own rule).

    Raises:
        ValueError: NaN or infinite values; all points identical; fewer distinct points than the
            largest neighbour rank needs (the message names the minimum); zero distances left
            after removing duplicates; an unknown method, variant or scale.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> plane = torch.rand(2000, 2, generator=g) @ torch.randn(2, 50, generator=g)
        >>> round(intrinsic_dimension(plane, "twonn").estimate, 1)
        2.0
        >>> res = intrinsic_dimension(plane, "gride", max_scale=8)
        >>> res.scales, [round(v, 1) for v in res.ids.tolist()]
        ((2, 4, 8), [2.0, 1.9, 1.9])
    """
    if method not in ("twonn", "gride"):
        raise ValueError(f"Unknown method {method!r}; choose 'twonn' or 'gride'.")
    if method == "twonn" and variant not in TWONN_VARIANTS:
        raise ValueError(f"Unknown TwoNN variant {variant!r}; choose from {TWONN_VARIANTS}.")
    x = as_points(points)
    if method == "twonn" and variant == "microscope":
        return _twonn_microscope(x, reduction_factor)
    n_input = x.shape[0]
    if deduplicate:
        x, _, n_dup = remove_duplicates(x)
    else:
        n_dup = 0
    if method == "twonn":
        return _twonn(x, n_input, n_dup, variant, fraction)
    return _gride(x, n_input, n_dup, scales, max_scale)


def _twonn_microscope(x: torch.Tensor, reduction_factor: int) -> IntrinsicDimensionResult:
    """The LLM-Microscope TwoNN: duplicates stay in the ranks, the fit drops them and ties."""
    n_input = x.shape[0]
    _, _, n_dup = remove_duplicates(x)
    centred = x - x.mean(0, keepdim=True)
    mean_norm = float(torch.linalg.vector_norm(centred, dim=1).mean())
    if mean_norm == 0:
        _need_points(1, 3, "TwoNN", n_input, n_input - 1, "")
    if n_input < 3:
        raise ValueError(f"TwoNN needs at least 3 points, but the cloud has {n_input}.")
    nn = nearest_neighbours(x, ranks=(1, 2), need_indices=False)
    d, err, n_disc = twonn_from_distances(
        nn.at(1),
        nn.at(2),
        variant="microscope",
        reduction_factor=reduction_factor,
        scale=mean_norm,
    )
    settings = {"method": "twonn", "variant": "microscope", "reduction_factor": reduction_factor}
    return IntrinsicDimensionResult(
        "twonn",
        "microscope",
        torch.tensor([d], dtype=torch.float64),
        torch.tensor([err], dtype=torch.float64),
        (2,),
        ((nn.at(1) + nn.at(2)) / 2).mean().reshape(1),
        n_input,
        n_input,
        n_dup,
        (n_disc,),
        settings,
    )


def _twonn(
    x: torch.Tensor, n_input: int, n_dup: int, variant: str, fraction: float
) -> IntrinsicDimensionResult:
    """TwoNN ("base" or "ml") on the (deduplicated) cloud ``x``."""
    n = x.shape[0]
    _need_points(n, 3, "TwoNN", n_input, n_dup, "Pass more points (tokens).")
    nn = nearest_neighbours(x, ranks=(1, 2), need_indices=False)
    _check_nonzero(nn.at(1))
    d, err, n_disc = twonn_from_distances(nn.at(1), nn.at(2), variant=variant, fraction=fraction)
    used = "ml" if variant == "base" and math.isclose(fraction, 1.0) else variant
    settings = {"method": "twonn", "variant": used, "fraction": fraction}
    return IntrinsicDimensionResult(
        "twonn",
        used,
        torch.tensor([d], dtype=torch.float64),
        torch.tensor([err], dtype=torch.float64),
        (2,),
        ((nn.at(1) + nn.at(2)) / 2).mean().reshape(1),
        n,
        n_input,
        n_dup,
        (n_disc,),
        settings,
    )


def _gride(
    x: torch.Tensor,
    n_input: int,
    n_dup: int,
    scales: Sequence[int] | None,
    max_scale: int | None,
) -> IntrinsicDimensionResult:
    """GRIDE at the requested range scalings on the (deduplicated) cloud ``x``."""
    n = x.shape[0]
    if scales is not None:
        sc = _check_scales(scales)
    elif max_scale is not None:
        sc = gride_scales(max_scale)
    else:
        _need_points(n, 3, "GRIDE", n_input, n_dup, "Pass more points (tokens).")
        sc = gride_scales(None, n)
    _need_points(
        n,
        sc[-1] + 1,
        f"GRIDE at scale {sc[-1]}",
        n_input,
        n_dup,
        f"Pass more points, or a max_scale of at most {2 ** int(math.log2(max(2, n - 1)))}."
        if n > 2
        else "Pass more points (tokens).",
    )
    ranks = sorted({1} | {r for s in sc for r in (s // 2, s)})
    nn = nearest_neighbours(x, ranks=ranks, need_indices=False)
    _check_nonzero(nn.at(1))
    ids, errors, radii, n_disc = gride_from_distances(nn.distances, nn.ranks, sc)
    settings = {"method": "gride", "scales": list(sc)}
    return IntrinsicDimensionResult(
        "gride", None, ids, errors, sc, radii, n, n_input, n_dup, n_disc, settings
    )
