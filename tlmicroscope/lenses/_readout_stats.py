"""Per-row statistics of readout logits without a ``[rows d_vocab]`` tensor: the kernel of
trajectories.

Reading out every layer costs one unembedding per layer; everything else must cost little next
to it. For rows ``x`` (normalised residuals, many layers of a few positions stacked) the logits
are made one vocabulary block of ``[rows col]`` at a time and reduced while the block is in
cache, in a handful of vectorised passes:

* the matrix product, with the running maximum already subtracted (``addmm`` with a column);
  logits are in log2 units (``x`` is pre-scaled by log2 e) so ``exp2`` gives the softmax
  numerators, which is about twice as fast as ``exp`` on the CPU;
* maxima over strided groups of ``_GROUP`` columns (kept for the top-k, below), whose maximum
  updates the running one (an online log-sum-exp, re-expressed only when it grows);
* ``exp2`` into a second buffer, its row sum and its row dot with the block (entropy);
* the count of logits above the target's (rank) as the sum of a float ``>`` (boolean
  reductions are slow on the CPU);
* the dot with the final distribution (KL), batched per position;
* optionally, for a few extra token ids per row (target-token trajectories), their logits and
  the count of logits above the best of each group of them (one more ``>`` pass per group and
  block, no second unembedding). ``lean=True`` keeps only the normaliser and those: no entropy,
  KL, next-token rank or top-k, which target trajectories do not report.

The top-k is found without a ``topk`` over the vocabulary: every one of a row's k largest logits
lies in one of the k groups with the largest maxima, so those k groups' logits are recomputed from
their rows of the unembedding and ranked. Everything is float32, whatever the model's dtype.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

_COL_BLOCK = 2048  # vocabulary columns per block: a [512 2048] float32 block is 4 MiB
_GROUP = 16  # columns per group of the top-k search
_LOG2E = 1.0 / math.log(2.0)
_LN2 = math.log(2.0)
_RESCALE_AT = 64.0  # log2 units: shift a block again before exp2 when its max is this far above

_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unembed_rows(readout: Any, final_norm: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W.T, b)`` of the readout with ``W.T`` contiguous ``[d_vocab d_model]``, kept per readout.

    Blocks of the vocabulary and single tokens are then contiguous rows. ``Readout.for_model``
    makes a new readout when the weights change, so the copy goes with the readout it came from.
    """
    W, b = readout.weights(final_norm)
    WT = W.T
    if WT.is_contiguous():
        return WT, b
    try:
        kept = _ROWS.setdefault(readout, {})
    except TypeError:  # not weakly referenceable: no cache
        return WT.contiguous(), b
    hit = kept.get(final_norm)
    if hit is None or hit[0] is not W:
        with torch.inference_mode(False), torch.no_grad():
            hit = (W, W.detach().T.contiguous())
        kept[final_norm] = hit
    return hit[1], b


@dataclass
class RowStats:
    """Statistics of a set of rows, natural-log units. ``pz`` is ``sum_j p_final_j z_j``."""

    entropy: torch.Tensor
    lse: torch.Tensor
    ce: torch.Tensor
    rank: torch.Tensor
    top_v: torch.Tensor  # log-probabilities of the top k
    top_i: torch.Tensor
    pz: torch.Tensor | None = None
    extra_z: torch.Tensor | None = None  # [rows m] logits (natural units) of the extra ids
    extra_rank: torch.Tensor | None = None  # [rows m/group] logits strictly above each group's best


def extra_logits(
    x: torch.Tensor, WT: torch.Tensor, b: torch.Tensor | None, finish: Any, ids: torch.Tensor
) -> torch.Tensor:
    """Logits ``finish(x @ WT[ids].T + b[ids])`` of ``ids`` ``[rows m]`` for rows ``x``, float32."""
    z = torch.einsum("rd,rmd->rm", x.float(), WT[ids].float())
    if b is not None:
        z = z + b.float()[ids]
    return finish(z) if finish is not None else z


def final_stats(
    zf: torch.Tensor,
    tgt: torch.Tensor,
    k: int,
    col: int,
    extra: torch.Tensor | None = None,
    extra_group: int = 1,
) -> tuple[RowStats, torch.Tensor, torch.Tensor]:
    """Statistics of the model's own logits ``zf`` ``[pos d_vocab]``, its distribution and block
    sums.

    Returns the statistics (``entropy`` is the final entropy, ``pz`` is ``sum p z``; with
    ``extra`` ids ``[pos m]``, their logits and the ranks of the best of each consecutive group
    of ``extra_group`` of them), the distribution ``p`` and ``p``'s sums over each vocabulary
    block of width ``col``.
    """
    zf = zf.float()
    lse = torch.logsumexp(zf, -1)
    p = torch.exp(zf - lse.unsqueeze(1))
    pz = torch.linalg.vecdot(p, zf)
    z_t = zf.gather(1, tgt.unsqueeze(1)).squeeze(1)
    above = torch.empty_like(zf)
    rank = torch.gt(zf, z_t.unsqueeze(1), out=above).sum(-1)
    extra_z = extra_rank = None
    if extra is not None:
        extra_z = zf.gather(1, extra)
        best = extra_z.view(extra.shape[0], -1, extra_group).amax(-1)
        extra_rank = (
            torch.stack(
                [torch.gt(zf, best[:, j : j + 1], out=above).sum(-1) for j in range(best.shape[1])],
                1,
            )
            .round()
            .long()
        )
    del above
    tv, ti = zf.topk(k, dim=-1)
    V = zf.shape[1]
    full = V - V % col
    sums = [p[:, :full].reshape(p.shape[0], -1, col).sum(-1)] if full else []
    if full < V:
        sums.append(p[:, full:].sum(-1, keepdim=True))
    # Entropy >= 0 and log-probabilities <= 0 exactly; float32 rounding at logits of tens of nats
    # can cross those bounds by ~1e-5, so clamp them.
    stats = RowStats(
        entropy=(lse - pz).clamp(min=0),
        lse=lse,
        ce=lse - z_t,
        rank=rank.round().long(),
        top_v=(tv - lse.unsqueeze(1)).clamp(max=0),
        top_i=ti,
        pz=pz,
        extra_z=extra_z,
        extra_rank=extra_rank,
    )
    return stats, p, torch.cat(sums, 1)


def _group_layout(
    V: int, col: int, g: int
) -> tuple[list[tuple[int, int, int, int]], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per block ``(lo, width, padded width, group offset)``, and per group its first column,
    column stride and end (one past the block's last column)."""
    blocks, base, stride, end = [], [], [], []
    off = 0
    for lo in range(0, V, col):
        w = min(col, V - lo)
        wp = -(-w // g) * g
        n = wp // g
        blocks.append((lo, w, wp, off))
        base.append(torch.arange(lo, lo + n))
        stride.append(torch.full((n,), n))
        end.append(torch.full((n,), lo + w))
        off += n
    return blocks, torch.cat(base), torch.cat(stride), torch.cat(end)


# One streaming pass over the vocabulary blocks of every row's logits, whose running sums
# (log-sum-exp, entropy, KL, ranks, top-k, extras) update in place per block while the block is
# in cache; helpers per statistic would cost a call and a re-read of each block.
# long-function: one fused pass over each vocabulary block (see above)
def blocked_stats(
    x: torch.Tensor,
    WT: torch.Tensor,
    b: torch.Tensor | None,
    finish: Any,
    tgt: torch.Tensor,
    p_f: torch.Tensor,
    p_sums: torch.Tensor,
    n_per_pos: int,
    k: int,
    col: int = _COL_BLOCK,
    extra: torch.Tensor | None = None,
    extra_group: int = 1,
    lean: bool = False,
) -> RowStats:
    """Statistics of ``finish(x @ WT.T + b)`` for rows ``x`` ``[pos*n_per_pos d_model]``.

    Rows are position-major: row ``r`` belongs to position ``r // n_per_pos`` of ``p_f``
    ``[pos d_vocab]`` (the final distribution, for the KL), whose block sums are ``p_sums``.
    ``finish`` is the readout's output soft cap, or ``None``; ``col`` the block width, a
    multiple of ``_GROUP`` (as ``p_sums``'s blocks). ``extra`` ``[rows m]``: token ids whose
    logits are wanted too (``extra_z``), in consecutive groups of ``extra_group`` whose best
    member's rank is wanted (``extra_rank``, ``[rows m/extra_group]``). ``lean``: only ``lse``
    and the extras (entropy, KL and ranks NaN or -1, no top-k; ``p_f`` is then unused).
    """
    R = x.shape[0]
    V = WT.shape[0]
    P = p_f.shape[0]
    dev = x.device
    col = min(col, V)
    g = _GROUP
    blocks, g_base, g_stride, g_end = _group_layout(V, col, g)
    fused = finish is None and WT.dtype == torch.float32
    x = x.float()
    xs = x * _LOG2E if fused else x.to(WT.dtype)
    b2 = None if b is None else (b.float() * _LOG2E if fused else b.float())

    z_t = (x * WT[tgt].float()).sum(-1)
    if b is not None:
        z_t = z_t + b.float()[tgt]
    if finish is not None:
        z_t = finish(z_t)
    zt2 = z_t * _LOG2E
    if extra is not None:
        ex_z = extra_logits(x, WT, b, finish, extra)
        # Each group's rank is its best member's: one threshold (and one pass) per group.
        ex_best2, arg = (ex_z * _LOG2E).view(R, -1, extra_group).max(-1)
        ex_ids = extra.view(R, -1, extra_group).gather(2, arg.unsqueeze(-1)).squeeze(-1)
        ex_above = torch.zeros(ex_ids.shape, device=dev)
        ex_block = ex_ids // col

    m = torch.zeros(R, device=dev)
    s = torch.zeros(R, device=dev)
    a = torch.zeros(R, device=dev)
    pz2 = torch.zeros(R, device=dev)
    above = torch.zeros(R, device=dev)
    gm_all = None if lean else torch.empty(R, int(g_base.numel()), device=dev)
    zbuf = torch.empty(R, col, device=dev)
    ebuf = torch.empty(R, col, device=dev)
    t_block = tgt // col
    for bi, (lo, w, wp, goff) in enumerate(blocks):
        Wb = WT[lo : lo + w]
        z = zbuf[:, :w] if w == col else torch.empty(R, w, device=dev)
        e = ebuf[:, :w] if w == col else torch.empty(R, w, device=dev)
        if fused and bi > 0:
            torch.addmm(-m.unsqueeze(1), xs, Wb.T, out=z)
            if b2 is not None:
                z.add_(b2[lo : lo + w])
            c = m
        else:
            if fused:
                torch.mm(xs, Wb.T, out=z)
                if b2 is not None:
                    z.add_(b2[lo : lo + w])
            else:
                z.copy_(xs @ Wb.T)
                if b2 is not None:
                    z.add_(b2[lo : lo + w])
                if finish is not None:
                    finish(z)
                z.mul_(_LOG2E)
                if bi > 0:
                    z.sub_(m.unsqueeze(1))
            c = m if bi > 0 else None
        if lean:
            gm = None
            bm = z.amax(-1)
        elif wp == w:
            gm = z.view(R, g, w // g).amax(1)
        else:
            padded = torch.full((R, wp), -torch.inf, device=dev)
            padded[:, :w] = z
            gm = padded.view(R, g, wp // g).amax(1)
        if gm is not None:
            bm = gm.amax(-1)
        if c is None:  # the first block: shift by its own maximum
            c = bm
            m = bm
            z.sub_(c.unsqueeze(1))
            if gm is not None:
                gm_all[:, goff : goff + gm.shape[1]] = gm
            bmax = bm
        else:
            if gm is not None:
                gm_all[:, goff : goff + gm.shape[1]] = gm + c.unsqueeze(1)
            bmax = bm + c
            if bool((bm > _RESCALE_AT).any()):  # exp2 would overflow: shift by the new maximum
                delta = bm.clamp_min(0.0)
                z.sub_(delta.unsqueeze(1))
                c = c + delta
        torch.exp2(z, out=e)
        S = e.sum(-1)
        A = None if lean else torch.linalg.vecdot(e, z)
        if not lean:
            thr = zt2 - c
            above += torch.gt(z, thr.unsqueeze(1), out=e).sum(-1)
            inside = (t_block == bi).nonzero().squeeze(1)
            if inside.numel():  # the target never counts as above itself, whatever the rounding
                self_v = z[inside, tgt[inside] - lo]
                above[inside] -= (self_v > thr[inside]).float()
        if extra is not None:
            ex_thr = (ex_best2 - c.unsqueeze(1)).T.contiguous()  # [groups R]: contiguous columns
            for j in range(ex_thr.shape[0]):
                ex_above[:, j] += torch.gt(z, ex_thr[j].unsqueeze(1), out=e).sum(-1)
            r_in, j_in = (ex_block == bi).nonzero(as_tuple=True)
            if r_in.numel():  # an id never counts as above itself
                self_v = z[r_in, ex_ids[r_in, j_in] - lo]
                ex_above[r_in, j_in] -= (self_v > ex_thr[j_in, r_in]).float()
        if not lean:
            zp = z.reshape(P, n_per_pos, w)
            pz2 += torch.bmm(zp, p_f[:, lo : lo + w].unsqueeze(2)).reshape(R)
            pz2 += c * p_sums[:, bi].repeat_interleave(n_per_pos)
        M = torch.maximum(m, bmax)
        fm = torch.exp2(m - M)
        fc = torch.exp2(c - M)
        if not lean:
            a = fm * (a + (m - M) * s) + fc * (A + (c - M) * S)
        s = fm * s + fc * S
        m = M
    log2s = torch.log2(s)
    lse = (m + log2s) * _LN2
    if lean:
        nan = torch.full((R,), torch.nan, device=dev)
        return RowStats(
            entropy=nan,
            lse=lse,
            ce=nan,
            rank=torch.full((R,), -1, dtype=torch.long, device=dev),
            top_v=torch.full((R, k), torch.nan, device=dev),
            top_i=torch.full((R, k), -1, dtype=torch.long, device=dev),
            pz=nan,
            extra_z=None if extra is None else ex_z,
            extra_rank=None if extra is None else ex_above.round().long(),
        )
    top_v, top_i = _top_k(x, WT, b, finish, gm_all, g_base, g_stride, g_end, k)
    return RowStats(
        entropy=((log2s - a / s) * _LN2).clamp(min=0),  # bounds that float32 rounding can cross
        lse=lse,
        ce=lse - z_t,
        rank=above.round().long(),
        top_v=(top_v - lse.unsqueeze(1)).clamp(max=0),
        top_i=top_i,
        pz=pz2 * _LN2,
        extra_z=None if extra is None else ex_z,
        extra_rank=None if extra is None else ex_above.round().long(),
    )


def _top_k(
    x, WT, b, finish, gm_all, g_base, g_stride, g_end, k
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest logits of each row and their ids, from the k groups with the largest maxima."""
    R, d = x.shape
    dev = x.device
    kg = min(k, gm_all.shape[1])
    groups = gm_all.topk(kg, dim=-1).indices  # [R kg]
    g = _GROUP
    offs = torch.arange(g, device=dev)
    g_base, g_stride, g_end = g_base.to(dev), g_stride.to(dev), g_end.to(dev)
    cols = g_base[groups].unsqueeze(-1) + g_stride[groups].unsqueeze(-1) * offs  # [R kg g]
    valid = (cols < g_end[groups].unsqueeze(-1)).reshape(R, -1)
    cols = torch.where(valid, cols.reshape(R, -1), 0)
    n_c = cols.shape[1]
    z = torch.empty(R, n_c, device=dev)
    step = max(1, (1 << 23) // (n_c * d))  # bound the gathered rows to 32 MiB
    xw = x.to(WT.dtype)
    for lo in range(0, R, step):
        hi = min(R, lo + step)
        rows = WT[cols[lo:hi].reshape(-1)].view(hi - lo, n_c, d)
        z[lo:hi] = torch.bmm(rows, xw[lo:hi].unsqueeze(2)).squeeze(2).float()
    if b is not None:
        z += b.float()[cols]
    if finish is not None:
        finish(z)
    z.masked_fill_(~valid, -torch.inf)
    tv, ti = z.topk(min(k, n_c), dim=-1)
    return tv, cols.gather(1, ti)
