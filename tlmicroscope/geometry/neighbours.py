"""Nearest-neighbour distances of a point cloud, computed in chunks; neighbourhood overlap.

Every token-geometry estimator needs, for each point, the distances to its neighbours at a few
ranks (TwoNN: 1 and 2; GRIDE: 1, 2, 4, ..., 256; overlap: the identities of the first k). They
all go through ``nearest_neighbours``:

1. The cloud is centred and rescaled by a power of two. Neither changes a ratio of distances (the
   rescaling is exact), and centring removes the common offset that would otherwise dominate
   the rounding error of ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``.
2. For a chunk of rows, one float64 GEMM gives every squared distance, with the rounding bound
   ``c (|x_i| + |x_j|)^2`` (``c ~ d * 2^-53``) of that formula. ``topk`` keeps the smallest.
   Memory is bounded by ``chunk_bytes`` for any number of points.
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

__all__ = [
    "NearestNeighbours",
    "nearest_neighbours",
    "NeighbourhoodOverlap",
    "neighbourhood_overlap",
    "overlap_from_indices",
    "as_points",
]

#: Default memory for one chunk of the float32 distance block, in bytes.
_CHUNK_BYTES = 256 * 2**20
#: Memory for one block of gathered candidates in the exact refinement (fits in cache), in bytes.
_EXACT_BLOCK_BYTES = 2 * 2**20
#: Memory for one block of coordinate differences in the direct pass, in bytes.
_DIRECT_BYTES = 64 * 2**20


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
        raise ValueError(f"{what} is empty (shape {tuple(points.shape)}); there is nothing to measure.")
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


def _bound_factor(dtype: torch.dtype, d: int) -> float:
    """``c`` with |computed - exact| <= c (|x_i|+|x_j|)^2 for ``|x_i|^2 + |x_j|^2 - 2 x_i.x_j``."""
    u = float(torch.finfo(dtype).eps) / 2
    gamma = d * u / (1 - d * u)
    return gamma + 4 * u


#: Candidates on each side of a requested rank whose exact distance the float32 search computes.
_WINDOW = 2
#: Extra candidates kept beyond the largest requested rank, for the exact re-ranking of rows
#: the GEMM cannot certify.
_MARGIN = 8
#: A row is recomputed directly when the bound on a distance's relative error exceeds this.
_REL_TOL = 1e-8


def _pass(
    x: torch.Tensor,
    raw: torch.Tensor,
    norms: torch.Tensor,
    rows: torch.Tensor,
    positions: list[int],
    index_upto: int,
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Squared distances at ``positions`` for ``rows`` from one float64 GEMM per chunk.

    ``x`` is the centred cloud (for the GEMM), ``raw`` the uncentred one (for exact differences:
    centring rounds, and would break exact ties between equidistant points).

    Returns the values, the neighbour indices, and a mask of the rows whose values are certified
    to ``_REL_TOL`` relative error and whose indices are certified (separated from the next and
    previous order statistics by more than the rounding bound).
    """
    n, d = x.shape
    n_other = n - 1
    c = _bound_factor(torch.float64, d)
    radius = norms.sqrt()
    m = min(n_other, positions[-1] + 2 + _MARGIN)
    pos = torch.tensor(positions, dtype=torch.long, device=x.device)
    out_e = torch.empty((rows.numel(), len(positions)), dtype=torch.float64, device=x.device)
    out_i = torch.empty((rows.numel(), len(positions)), dtype=torch.long, device=x.device)
    ok = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
    step = max(1, chunk_bytes // max(1, n * 8))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        block = x[r] @ x.T
        block.mul_(-2).add_(norms[r].unsqueeze(1)).add_(norms.unsqueeze(0))
        block[torch.arange(r.numel(), device=x.device), r] = math.inf
        vals, cand = torch.topk(block, m, dim=1, largest=False, sorted=False)
        del block
        vals, order = torch.sort(vals, dim=1)  # sorting m values is cheaper than a sorted topk
        cand = cand.gather(1, order)

        def bound(cols: torch.Tensor) -> torch.Tensor:
            """Rounding bound c (|x_i| + |x_j|)^2 of the computed squared distances at ``cols``."""
            return c * (radius[r].unsqueeze(1) + radius[cand[:, cols]]) ** 2

        e, i, b = vals[:, pos], cand[:, pos], bound(pos)
        good = b <= _REL_TOL * e.clamp_min(0)
        if index_upto:
            # the neighbour at position p is certain when its value is separated from both sides
            nxt = (pos + 1).clamp_max(m - 1)
            sep_next = (vals[:, nxt] - bound(nxt)) > (e + b)
            sep_next |= (pos + 1 >= n_other).unsqueeze(0)
            prv = (pos - 1).clamp_min(0)
            sep_prev = (vals[:, prv] + bound(prv)) < (e - b)
            sep_prev |= (pos == 0).unsqueeze(0)
            good &= sep_next & sep_prev | (pos >= index_upto).unsqueeze(0)
        row_ok = good.all(1)
        e, i = e.clamp_min(0), i
        unsure = torch.nonzero(~row_ok).flatten()
        if unsure.numel():
            # exact distances to all candidates of the uncertain rows; every other point is at
            # least (last candidate's value - the row's largest bound) away
            ce, ci = _sort_by_distance(_exact_sq(raw, r[unsure], cand[unsure]), cand[unsure])
            fine = torch.ones(unsure.numel(), dtype=torch.bool, device=x.device)
            if m < n_other:
                outside = vals[unsure, -1] - c * (radius[r[unsure]] + radius.max()) ** 2
                fine = ce[:, positions[-1]] < outside
            keep = unsure[fine]
            e[keep], i[keep] = ce[fine][:, pos], ci[fine][:, pos]
            row_ok[keep] = True
        ok[s : s + step] = row_ok
        out_e[s : s + step], out_i[s : s + step] = e, i
    return out_e, out_i, ok


def _merge_windows(positions: Sequence[int], n_other: int, w: int) -> list[tuple[int, int, int, int]]:
    """Merged windows ``(lo, hi, p_min, p_max)`` of 0-based positions around the requested ones."""
    out: list[list[int]] = []
    for p in sorted(positions):
        lo, hi = max(0, p - w), min(n_other - 1, p + w)
        if out and lo <= out[-1][1] + 1:
            out[-1][1], out[-1][3] = max(out[-1][1], hi), p
        else:
            out.append([lo, hi, p, p])
    return [(a, b, c, d) for a, b, c, d in out]


def _pass32(
    x: torch.Tensor,
    raw: torch.Tensor,
    norms: torch.Tensor,
    rows: torch.Tensor,
    positions: list[int],
    chunk_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A float32 search with exact float64 refinement; returns values, indices and a certified mask.

    The float32 GEMM yields a guaranteed lower bound ``L`` of every squared distance (the rounding
    bound ``c (|x_i| + |x_j|)^2`` is folded into the product through one extra coordinate) and an
    upper bound ``U = L + 2 c (|x_i| + |x_j|)^2``. Around each requested position a window of
    candidates gets its exact distance; the window holds the exact order statistics when every
    candidate before it is certainly closer (``max U`` below the window's values) and every point
    after it certainly farther (``L`` above them), which is checked per row.
    """
    n, d = x.shape
    n_other = n - 1
    windows = _merge_windows(positions, n_other, _WINDOW)
    m = min(n_other, max(hi for _, hi, _, _ in windows) + 2)
    c = 2 * _bound_factor(torch.float32, d + 1)
    radius = norms.sqrt()
    xa = torch.cat([x, (math.sqrt(c) * radius).unsqueeze(1)], 1).to(torch.float32)
    offset = ((1 - c) * norms).to(torch.float32)
    union = sorted({p for lo, hi, _, _ in windows for p in range(lo, hi + 1)})
    where = {p: j for j, p in enumerate(union)}
    col = {p: j for j, p in enumerate(positions)}
    out_e = torch.empty((rows.numel(), len(positions)), dtype=torch.float64, device=x.device)
    out_i = torch.empty((rows.numel(), len(positions)), dtype=torch.long, device=x.device)
    ok = torch.ones(rows.numel(), dtype=torch.bool, device=x.device)
    step = max(1, chunk_bytes // max(1, n * 4))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        block = xa[r] @ xa.T
        block.mul_(-2).add_(offset[r].unsqueeze(1)).add_(offset.unsqueeze(0))
        block[torch.arange(r.numel(), device=x.device), r] = math.inf
        low, cand = torch.topk(block, m, dim=1, largest=False, sorted=False)
        del block
        low, order = torch.sort(low, dim=1)
        cand = cand.gather(1, order)
        low = low.to(torch.float64)
        upper_max = torch.cummax(low + 2 * c * (radius[r].unsqueeze(1) + radius[cand]) ** 2, dim=1).values
        ucand = cand[:, union]
        exact = _exact_sq(raw, r, ucand)
        good = torch.ones(r.numel(), dtype=torch.bool, device=x.device)
        for lo, hi, p_min, p_max in windows:
            cols = [where[p] for p in range(lo, hi + 1)]
            e, i = _sort_by_distance(exact[:, cols], ucand[:, cols])
            if lo > 0:
                good &= upper_max[:, lo - 1] < e[:, p_min - lo]
            if hi + 1 < n_other:
                good &= e[:, p_max - lo] < low[:, hi + 1]
            for p in range(p_min, p_max + 1):
                if p in col:
                    out_e[s : s + step, col[p]], out_i[s : s + step, col[p]] = e[:, p - lo], i[:, p - lo]
        ok[s : s + step] = good
    return out_e, out_i, ok


def _exact_sq(x: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Squared distances ``|x[rows[r]] - x[idx[r, j]]|^2`` from coordinate differences."""
    n_rows, n_cols = idx.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.float64, device=x.device)
    # small blocks stay in cache: the gathered rows are written and read back at once
    step = max(1, _EXACT_BLOCK_BYTES // max(1, n_cols * x.shape[1] * 8))
    buf = torch.empty((min(step, n_rows) * n_cols, x.shape[1]), dtype=x.dtype, device=x.device)
    for s in range(0, n_rows, step):
        k = min(step, n_rows - s)
        g = torch.index_select(x, 0, idx[s : s + k].reshape(-1), out=buf[: k * n_cols]).view(k, n_cols, -1)
        g.sub_(x[rows[s : s + k]].unsqueeze(1))
        torch.linalg.vecdot(g, g, out=out[s : s + k])
    return out


def _sort_by_distance(e: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by distance, ties by the lower index."""
    by_index = torch.argsort(i, dim=1)
    e, i = e.gather(1, by_index), i.gather(1, by_index)
    order = torch.argsort(e, dim=1, stable=True)
    return e.gather(1, order), i.gather(1, order)


def _direct(x: torch.Tensor, rows: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared distances at ``positions`` from coordinate differences (ties by lower index)."""
    n, d = x.shape
    pos = torch.tensor(positions, dtype=torch.long, device=x.device)
    out_e = torch.empty((rows.numel(), len(positions)), dtype=torch.float64, device=x.device)
    out_i = torch.empty_like(out_e, dtype=torch.long)
    step = max(1, _DIRECT_BYTES // max(1, n * d * 8))
    for s in range(0, rows.numel(), step):
        r = rows[s : s + step]
        diff = x.unsqueeze(0) - x[r].unsqueeze(1)
        e = torch.linalg.vecdot(diff, diff)
        del diff
        e[torch.arange(r.numel(), device=x.device), r] = math.inf
        e_sorted, order = torch.sort(e, dim=1, stable=True)
        out_e[s : s + step], out_i[s : s + step] = e_sorted[:, pos], order[:, pos]
    return out_e, out_i


#: Below this n^2 d the float64 product is as fast as the float32 search plus its refinement.
_MIXED_MIN_WORK = 4096 * 4096 * 576


def _float32_is_exact(device: torch.device) -> bool:
    """float32 matmuls round as IEEE float32 (no TF32/bfloat16), so the error bound holds."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)


def nearest_neighbours(
    points,
    k: int | None = None,
    *,
    ranks: Sequence[int] | None = None,
    need_indices: bool | int = True,
    chunk_bytes: int = _CHUNK_BYTES,
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
        chunk_bytes: Memory for one chunk of the distance block; bounds peak memory.
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
            e[redo], i[redo], ok[redo] = _pass(x, raw, norms, redo, positions, index_upto, chunk_bytes)
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
