"""The neighbour search behind ``nearest_neighbours``: bounded GEMM passes and exact fallbacks.

Two passes produce squared distances at the requested neighbour positions, each with a per-row
certificate; rows that fail are handed to the next, more expensive one:

* ``_pass32``: a float32 GEMM giving guaranteed lower/upper bounds, then exact float64 distances in
  small windows around each requested position (for large clouds, where the GEMM dominates);
* ``_pass``: a float64 GEMM whose rounding bound certifies values to 1e-8 and identities by
  separation; uncertified rows get exact distances to all their candidates;
* ``_direct``: exact distances to every point, from coordinate differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

#: Memory for one block of gathered candidates in the exact refinement (fits in cache), in bytes.
_EXACT_BLOCK_BYTES = 4 * 2**20
#: Memory for one block of coordinate differences in the direct pass, in bytes.
_DIRECT_BYTES = 64 * 2**20


def gram_block(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T``: the product that is most of every estimator's cost.

    It stays in torch's own BLAS and thread pool. (numpy's OpenBLAS is faster single-threaded on
    AMD CPUs, but two thread pools on one machine oversubscribe it: measured 5x slower with two
    threads each.)
    """
    return a @ b.T


def _sort_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row (no stability needed: ties fail certification and are re-ranked exactly).
    On the CPU numpy's row sort is about 3x faster than torch's for a few hundred columns."""
    if v.device.type == "cpu":
        order = torch.from_numpy(np.argsort(v.numpy(), axis=1))
        return v.gather(1, order), order
    return torch.sort(v, dim=1)


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
        block = gram_block(x[r], x)
        block.mul_(-2).add_(norms[r].unsqueeze(1)).add_(norms.unsqueeze(0))
        block[torch.arange(r.numel(), device=x.device), r] = math.inf
        vals, cand = torch.topk(block, m, dim=1, largest=False, sorted=False)
        del block
        vals, order = _sort_rows(vals)  # sorting m values is cheaper than a sorted topk
        cand = cand.gather(1, order)

        def bound(
            cols: torch.Tensor, r: torch.Tensor = r, cand: torch.Tensor = cand
        ) -> torch.Tensor:
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
        e = e.clamp_min(0)
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


def _merge_windows(
    positions: Sequence[int], n_other: int, w: int
) -> list[tuple[int, int, int, int]]:
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
        block = gram_block(xa[r], xa)
        block.mul_(-2).add_(offset[r].unsqueeze(1)).add_(offset.unsqueeze(0))
        block[torch.arange(r.numel(), device=x.device), r] = math.inf
        low, cand = torch.topk(block, m, dim=1, largest=False, sorted=False)
        del block
        low, order = _sort_rows(low)
        cand = cand.gather(1, order)
        low = low.to(torch.float64)
        upper_max = torch.cummax(
            low + 2 * c * (radius[r].unsqueeze(1) + radius[cand]) ** 2, dim=1
        ).values
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
                    out_e[s : s + step, col[p]], out_i[s : s + step, col[p]] = (
                        e[:, p - lo],
                        i[:, p - lo],
                    )
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
        g = torch.index_select(x, 0, idx[s : s + k].reshape(-1), out=buf[: k * n_cols]).view(
            k, n_cols, -1
        )
        g.sub_(x[rows[s : s + k]].unsqueeze(1))
        torch.linalg.vecdot(g, g, out=out[s : s + k])
    return out


def _sort_by_distance(e: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by distance, ties by the lower index."""
    by_index = torch.argsort(i, dim=1)
    e, i = e.gather(1, by_index), i.gather(1, by_index)
    order = torch.argsort(e, dim=1, stable=True)
    return e.gather(1, order), i.gather(1, order)


def _direct(
    x: torch.Tensor, rows: torch.Tensor, positions: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact squared distances at ``positions`` from coordinate differences (ties by lower
    index)."""
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
