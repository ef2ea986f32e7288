"""Nearest-neighbour distances of a point cloud, computed in chunks; neighbourhood overlap.

Every token-geometry estimator needs, for each point, the distances to its neighbours at a few
ranks (TwoNN: 1 and 2; GRIDE: 1, 2, 4, ..., 256; overlap: the identities of the first k). They
all go through ``nearest_neighbours``:

1. The cloud is centred and rescaled by a power of two. Neither changes a ratio of distances (the
   rescaling is exact), and centring removes the common offset that would otherwise dominate
   the rounding error of ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``.
2. For a chunk of rows, one float64 GEMM gives every squared distance, with the rounding bound
   ``c (|x_i| + |x_j|)^2`` (``c ~ d * 2^-53``) of that formula. ``topk`` keeps the smallest.
   Memory is bounded by ``chunk_size`` rows for any number of points.
3. A row is accepted when, at every requested rank, the bound is below 1e-8 of the squared
   distance, and
   (when the neighbours' identities are wanted) the distance is separated from the previous and
   next ones by more than the bounds, so no rounding could reorder them.
4. The other rows (near-duplicates, near-ties, clouds far thinner than their extent) get exact
   distances to their candidates from coordinate differences, sorted with ties broken by the
   lower index; this is certified when every non-candidate is provably farther than the largest
   requested rank. What is left is recomputed directly against all points.

This is what scikit-learn and dadapy compute (float64, the same formula), plus the guarantee of
step 3, at the speed of one BLAS product.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.geometry._neighbour_search import (
    _MIXED_MIN_WORK,
    _direct,
    _float32_is_exact,
    _pass,
    _pass32,
)

__all__ = [
    "NearestNeighbours",
    "NeighbourhoodOverlap",
    "as_points",
    "nearest_neighbours",
    "neighbourhood_overlap",
    "overlap_from_indices",
]

#: Default memory for one chunk of the distance block, in bytes.
_CHUNK_BYTES = 256 * 2**20


def _chunk_bytes(chunk_size: int | None, n: int) -> int:
    """The byte budget of one distance block: ``chunk_size`` rows of ``n`` float64 distances."""
    if chunk_size is None:
        return _CHUNK_BYTES
    if isinstance(chunk_size, _ByteBudget):
        return int(chunk_size)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of points, got {chunk_size}.")
    return int(chunk_size) * max(1, n) * 8


def as_points(points, *, what: str = "points") -> Float[torch.Tensor, "n d"]:
    """Validate a point cloud and return it as a float64 ``[n d]`` tensor (same device).

    Raises:
        ValueError: not two-dimensional, empty, or holding NaN or infinite values.
    """
    if isinstance(points, np.ndarray):
        points = torch.from_numpy(points)
    if not isinstance(points, torch.Tensor):
        points = torch.as_tensor(points)
    if points.ndim != 2:
        raise ValueError(
            f"{what} must be a 2-D [n_points d] tensor, got shape {tuple(points.shape)}. "
            "For one prompt's activations [batch pos d_model], pass acts[0]."
        )
    if points.shape[0] == 0 or points.shape[1] == 0:
        raise ValueError(
            f"{what} is empty (shape {tuple(points.shape)}); there is nothing to measure."
        )
    if points.is_complex():
        raise ValueError(f"{what} must be real, got dtype {points.dtype}.")
    x = points.detach().to(torch.float64)
    if bool(torch.isfinite(x.sum())):  # one reduction; NaN or inf anywhere makes the sum non-finite
        return x
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(1)).flatten()
        raise ValueError(
            f"{what} hold {int(bad.sum())} NaN or infinite values in {rows.numel()} of "
            f"{x.shape[0]} rows (first rows {rows[:5].tolist()}). NaN activations usually mean an "
            "overflow in the model (try float32 instead of float16) or a broken hook; drop those "
            "rows or fix the input before estimating geometry."
        )
    return x


@dataclass(frozen=True)
class NearestNeighbours:
    """Exact distances and indices of each point's neighbours at chosen ranks.

    Attributes:
        distances: ``[n rank]`` float64 Euclidean distances, column j at rank ``ranks[j]``.
        indices: ``[n rank]`` index of that neighbour (the point itself is never its own
            neighbour; ties are broken by the lower index).
        ranks: The neighbour ranks (1 = nearest), ascending.
        n_recomputed: Rows that the float32 pass could not certify and that were redone in
            float64 (a diagnostic of how close to ties the data are).
    """

    distances: Float[torch.Tensor, "n rank"]
    indices: Int[torch.Tensor, "n rank"]
    ranks: tuple[int, ...]
    n_recomputed: int = 0

    def at(self, rank: int) -> Float[torch.Tensor, " n"]:
        """Distances to the ``rank``-th neighbour."""
        try:
            return self.distances[:, self.ranks.index(rank)]
        except ValueError:
            raise ValueError(f"Rank {rank} was not computed; ranks are {self.ranks}.") from None

    def first(self, k: int) -> Int[torch.Tensor, "n k"]:
        """Indices of the first ``k`` neighbours (needs ranks 1..k)."""
        if tuple(self.ranks[:k]) != tuple(range(1, k + 1)):
            raise ValueError(f"Ranks 1..{k} were not all computed; ranks are {self.ranks}.")
        return self.indices[:, :k]


class _ByteBudget(int):
    """A chunk given the old way, as bytes (``chunk_bytes=``) rather than rows."""


def _chunk_from_bytes(chunk_bytes: int, kwargs: dict) -> _ByteBudget:
    return _ByteBudget(chunk_bytes)


@renamed_arguments(renamed={"chunk_bytes": ("chunk_size", _chunk_from_bytes)})
def nearest_neighbours(
    points,
    k: int | None = None,
    *,
    ranks: Sequence[int] | None = None,
    need_indices: bool | int = True,
    chunk_size: int | None = None,
    precision: str = "auto",
) -> NearestNeighbours:
    """Exact distances to each point's neighbours at ranks ``1..k`` (or at chosen ``ranks``).

    Args:
        points: ``[n d]`` point cloud (any float dtype, any device; computed in float64 exactness).
        k: Compute ranks 1..k.
        ranks: Or exactly these ranks (1 = nearest), e.g. ``(1, 2, 4, 8)`` for GRIDE.
        need_indices: Certify the neighbours' identities too (the overlap needs them; ID
            estimators need only the distances, which are certified either way). An int k
            certifies the identities at ranks <= k only.
        chunk_size: Points whose distances to the whole cloud are computed together (bounds
            peak memory at about ``chunk_size * n * 8`` bytes); default: as many as fit in
            256 MiB. The old ``chunk_bytes=`` (a byte budget) still works for one release, with
            a ``DeprecationWarning``.
        precision: How the search runs (the answer is the same): ``"mixed"`` (a float32 product
            with certified bounds, then exact float64 distances around each rank), ``"float64"``
            (a float64 product), or ``"auto"`` (mixed for large clouds on CPU, where the GEMM
            dominates; never when float32 matmuls may use TF32 or bfloat16).

    Raises:
        ValueError: too few points for the largest rank (the message names the minimum), NaN
            values, or a bad rank.

    Examples:
        >>> x = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
        >>> nn = nearest_neighbours(x, 2)
        >>> nn.distances.tolist(), nn.indices.tolist()
        ([[1.0, 3.0], [1.0, 2.0], [2.0, 3.0], [4.0, 6.0]], [[1, 2], [0, 2], [1, 0], [2, 1]])
    """
    x = as_points(points)
    n, d = x.shape
    chunk_bytes = _chunk_bytes(chunk_size, n)
    if ranks is None:
        if k is None:
            raise ValueError("Pass k (ranks 1..k) or ranks=.")
        ranks = range(1, int(k) + 1)
    ranks_t = tuple(sorted({int(r) for r in ranks}))
    if not ranks_t or ranks_t[0] < 1:
        raise ValueError(f"Neighbour ranks must be positive integers, got {tuple(ranks)}.")
    if ranks_t[-1] > n - 1:
        raise ValueError(
            f"Neighbour rank {ranks_t[-1]} needs at least {ranks_t[-1] + 1} distinct points, "
            f"but the cloud has {n}. Use more points (tokens) or a smaller rank."
        )
    centre = x.mean(0, keepdim=True)
    r_max = float(torch.linalg.vector_norm(x - centre, dim=1).max())
    scale = 1.0 if r_max == 0 else 2.0 ** math.floor(math.log2(r_max))
    raw = x / scale  # a power of two: exact, so ties and duplicates survive
    x = raw - centre / scale
    norms = torch.linalg.vecdot(x, x)
    positions = [r - 1 for r in ranks_t]
    rows = torch.arange(n, device=x.device)
    index_upto = ranks_t[-1] if need_indices is True else int(need_indices)
    if precision == "auto":
        precision = "mixed" if n * n * d >= _MIXED_MIN_WORK else "float64"
    if precision == "mixed" and not _float32_is_exact(x.device):
        precision = "float64"  # TF32/bfloat16 matmuls would void the float32 error bound
    if precision == "mixed":
        e, i, ok = _pass32(x, raw, norms, rows, positions, chunk_bytes)
        if not bool(ok.all()):
            redo = rows[~ok]
            e[redo], i[redo], ok[redo] = _pass(
                x, raw, norms, redo, positions, index_upto, chunk_bytes
            )
    elif precision == "float64":
        e, i, ok = _pass(x, raw, norms, rows, positions, index_upto, chunk_bytes)
    else:
        raise ValueError(f"precision must be 'auto', 'mixed' or 'float64', got {precision!r}.")
    n_recomputed = int((~ok).sum())
    if n_recomputed:
        redo = rows[~ok]
        e[redo], i[redo] = _direct(raw, redo, positions)
    return NearestNeighbours(
        distances=e.sqrt() * scale, indices=i, ranks=ranks_t, n_recomputed=n_recomputed
    )


@dataclass(frozen=True)
class NeighbourhoodOverlap:
    """Neighbourhood overlap chi_k between two clouds of the same points.

    Attributes:
        ks: The neighbourhood sizes.
        overlap: ``[k]`` mean over points of |N_k^A(i) ∩ N_k^B(i)| / k.
        per_point: ``[n k]`` the per-point fractions (``None`` unless asked for).
    """

    ks: tuple[int, ...]
    overlap: Float[torch.Tensor, " k"]
    per_point: Float[torch.Tensor, "n k"] | None = None

    def at(self, k: int) -> float:
        return float(self.overlap[self.ks.index(k)])


def overlap_from_indices(
    indices_a: Int[torch.Tensor, "n kmax"],
    indices_b: Int[torch.Tensor, "n kmax"],
    ks: Sequence[int],
    *,
    per_point: bool = False,
) -> NeighbourhoodOverlap:
    """chi_k from two tables of ordered neighbour indices (column j = rank j+1)."""
    ks_t = tuple(int(k) for k in ks)
    kmax = max(ks_t)
    if indices_a.shape != indices_b.shape or indices_a.shape[1] < kmax:
        raise ValueError(
            f"Neighbour tables must have equal shapes with at least {kmax} columns, got "
            f"{tuple(indices_a.shape)} and {tuple(indices_b.shape)}."
        )
    a, b = indices_a[:, :kmax], indices_b[:, :kmax]
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).to(torch.float64)  # [n kmax kmax]
    # |N_k^A ∩ N_k^B| is the number of equal pairs in the leading k x k block (indices are distinct)
    cum = hits.cumsum(1).cumsum(2)
    frac = torch.stack([cum[:, k - 1, k - 1] / k for k in ks_t], 1)
    return NeighbourhoodOverlap(ks_t, frac.mean(0), frac if per_point else None)


def neighbourhood_overlap(
    a,
    b,
    k: int | Sequence[int] = (1, 2, 3, 4, 5, 6),
    *,
    per_point: bool = False,
) -> NeighbourhoodOverlap:
    """Neighbourhood overlap chi_k = (1/N) sum_i |N_k^A(i) ∩ N_k^B(i)| / k of two clouds.

    Row i of ``a`` and row i of ``b`` must be the same item (a token at two layers). A point is
    never its own neighbour, and exact ties are broken by the lower index. Duplicates are kept,
    as in the paper.

    Args:
        a, b: ``[n d_a]`` and ``[n d_b]`` clouds, or ``NearestNeighbours`` computed with ranks 1..k.
        k: One neighbourhood size or several (default 1..6, as the paper).
        per_point: Also return the per-point overlaps.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(200, 5, generator=g)
        >>> neighbourhood_overlap(x, 3 * x + 1, k=2).at(2)
        1.0
    """
    ks = (int(k),) if isinstance(k, (int, np.integer)) else tuple(int(v) for v in k)
    if not ks or min(ks) < 1:
        raise ValueError(f"Neighbourhood sizes must be positive, got {ks}.")
    kmax = max(ks)

    def table(p) -> torch.Tensor:
        if isinstance(p, NearestNeighbours):
            return p.first(kmax)
        return nearest_neighbours(p, kmax).indices

    ta, tb = table(a), table(b)
    if ta.shape[0] != tb.shape[0]:
        raise ValueError(
            f"The two clouds have {ta.shape[0]} and {tb.shape[0]} points; overlap needs the same "
            "points (rows) in both."
        )
    return overlap_from_indices(ta, tb, ks, per_point=per_point)
