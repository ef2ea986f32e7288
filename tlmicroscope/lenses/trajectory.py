"""``prediction_trajectory``: what each layer predicts at each position, through a lens.

Cost model: reading out every layer is about ``n_layers`` unembeddings on top of the forward pass
(the model's own output supplies the last one). The statistics come from identities that need
only a few passes over each ``[rows d_vocab]`` logit chunk:

* ``lse = logsumexp(z)``; ``entropy = lse - E_q[z]``;
* ``KL(p_final || q) = -H(p_final) - E_p[z] + lse``, since ``sum(p_final) = 1``;
* ``cross_entropy = lse - z[target]``; ``rank = #{z > z[target]}``; top-k from ``topk(z)``.

Rows are read out 512 at a time, and each layer's logits are produced in vocabulary blocks of
4096 that are reduced (online log-sum-exp, running top-k) while still in cache, so neither a
``[layer pos d_vocab]`` nor even a full ``[pos d_vocab]`` tensor is built for any layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope._vocab import token_strings
from tlmicroscope.capture import capture
from tlmicroscope.inputs import TextOrTokens, check_layers, resolve_input
from tlmicroscope.lenses.base import lens_logits, resolve_lens
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.results import Provenance

__all__ = ["PredictionTrajectory", "prediction_trajectory", "STATISTICS", "layer_label"]

#: Per-layer, per-position statistics of a trajectory (all natural-log units).
STATISTICS = ("entropy", "kl", "cross_entropy", "target_rank", "max_prob")


def layer_label(layer: int, n_layers: int) -> str:
    """``"0"``..``"n_layers-1"`` for the residual entering each block, ``"out"`` for the output."""
    return "out" if layer == n_layers else str(layer)


@dataclass(frozen=True)
class PredictionTrajectory:
    """Per-layer, per-position lens predictions and their statistics.

    Attributes:
        layers: Residual indices read (0..n_layers; n_layers is the model's output).
        layer_labels: Labels for plots ("0", "1", ..., "out").
        tokens: The input ``[batch pos]``; ``str_tokens`` their text.
        targets: The next token at each position; -1 at the last position (no target).
        entropy: Entropy of the lens distribution, nats.
        kl: KL(final distribution || lens distribution), nats.
        cross_entropy: -log q(next token), nats; NaN at the last position.
        target_rank: Rank of the next token under the lens (0 = top-1); -1 at the last position.
        max_prob: Probability of the lens's top-1 token.
        top_tokens, top_probs: The top-k ids and probabilities, ``[layer batch pos k]``.
        top_strings: Text of ``top_tokens`` (an object array of the same shape).
        n_layers: The model's number of blocks.
        provenance: Model, weight processing, lens, settings, and whether the readout identity
            was checked against the model's logits.
    """

    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: list[list[str]]
    targets: Int[torch.Tensor, "batch pos"]
    entropy: Float[torch.Tensor, "layer batch pos"]
    kl: Float[torch.Tensor, "layer batch pos"]
    cross_entropy: Float[torch.Tensor, "layer batch pos"]
    target_rank: Int[torch.Tensor, "layer batch pos"]
    max_prob: Float[torch.Tensor, "layer batch pos"]
    top_tokens: Int[torch.Tensor, "layer batch pos k"]
    top_probs: Float[torch.Tensor, "layer batch pos k"]
    top_strings: np.ndarray
    n_layers: int
    provenance: Provenance

    def statistic(self, name: str) -> torch.Tensor:
        """One of ``STATISTICS`` by name, ``[layer batch pos]``."""
        if name not in STATISTICS:
            raise ValueError(f"Unknown statistic {name!r}; choose from {STATISTICS}.")
        return getattr(self, name)

    def layer_index(self, layer: int) -> int:
        """Row of residual index ``layer`` in this trajectory's tensors."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise ValueError(f"Layer {layer} is not in this trajectory (layers {self.layers}).") from None

    def to_dataframe(self, batch: int = 0):
        """Long format: one row per (layer, position) with every statistic and the top-1 token."""
        import pandas as pd

        rows = []
        for li, layer in enumerate(self.layers):
            for pos in range(self.tokens.shape[1]):
                rows.append(
                    {
                        "layer": layer,
                        "layer_label": self.layer_labels[li],
                        "position": pos,
                        "token": self.str_tokens[batch][pos],
                        "top1": self.top_strings[li, batch, pos, 0],
                        **{s: float(getattr(self, s)[li, batch, pos]) for s in STATISTICS},
                    }
                )
        return pd.DataFrame(rows)


_ROW_CHUNK = 512
_COL_BLOCK = 4096


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


@dataclass
class _RowStats:
    entropy: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    rank: torch.Tensor
    top_v: torch.Tensor  # log-probabilities of the top k
    top_i: torch.Tensor


def _dense_stats(z: torch.Tensor, neg_h_f: torch.Tensor, tgt: torch.Tensor, k: int) -> _RowStats:
    """Statistics of the model's own output distribution (its KL to itself is 0)."""
    lse = torch.logsumexp(z, -1)
    q = torch.exp(z - lse.unsqueeze(1))
    z_t = z.gather(1, tgt.unsqueeze(1)).squeeze(1)
    tv, ti = z.topk(k, dim=-1)
    return _RowStats(
        entropy=-neg_h_f,
        kl=torch.zeros_like(lse),
        ce=lse - z_t,
        rank=torch.count_nonzero(z > z_t.unsqueeze(1), dim=-1),
        top_v=tv - lse.unsqueeze(1),
        top_i=ti,
    )


def _final_blocks(p_f: torch.Tensor, col: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The final distribution cut into contiguous vocabulary blocks, and each block's row sums."""
    blocks = [p_f[:, lo : lo + col].contiguous() for lo in range(0, p_f.shape[1], col)]
    return blocks, [p.sum(-1) for p in blocks]


def _blocked_stats(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None,
                   p_blocks: list[torch.Tensor], p_sums: list[torch.Tensor], neg_h_f: torch.Tensor,
                   tgt: torch.Tensor, k: int, finish: Any = None) -> _RowStats:
    """Statistics of ``x @ W + b`` computed one vocabulary block at a time.

    Each ``[rows col]`` block of logits z is reduced while it is still in cache. With ``m`` the
    running maximum and ``z' = z - m`` (shifted in place), ``s = sum exp(z')`` and
    ``a = sum exp(z') z'`` are re-expressed when ``m`` grows (an online log-sum-exp);
    ``sum p z`` is linear and needs no rescaling. The count of logits above the target's and a
    running top-k finish the block. (Boolean reductions are slow on the CPU, so the count is
    ``sum(clamp(sign(z - z_t), 0))`` in float, exact below 2^24.) ``finish`` is the readout's
    output soft cap, applied in place to each float32 block and to the target's logit.
    """
    n = x.shape[0]
    dev = x.device
    s = torch.zeros(n, device=dev)
    a = torch.zeros(n, device=dev)
    pz = torch.zeros(n, device=dev)
    above = torch.zeros(n, device=dev)
    top_v = torch.full((n, k), -torch.inf, device=dev)
    top_i = torch.zeros((n, k), dtype=torch.long, device=dev)
    z_t = (x * W[:, tgt].T).sum(-1).float()
    if b is not None:
        z_t = z_t + b[tgt]
    if finish is not None:
        z_t = finish(z_t)
    e_buf = torch.empty((n, p_blocks[0].shape[1]), device=dev)
    tmp = torch.empty_like(e_buf)
    m = torch.zeros(n, device=dev)
    lo = 0
    for p, p_sum in zip(p_blocks, p_sums):
        width = p.shape[1]
        e, t = e_buf[:, :width], tmp[:, :width]
        z = x @ W[:, lo : lo + width]
        if z.dtype != torch.float32:
            z = z.float()
        if b is not None:
            z += b[lo : lo + width]
        if finish is not None:
            z = finish(z)
        bv, bi = z.topk(min(k, width), dim=-1)
        if lo == 0:
            m = bv[:, 0].clone()
        else:
            new_m = torch.maximum(m, bv[:, 0])
            shift = m - new_m  # <= 0: re-express the sums so far relative to the new maximum
            scale = torch.exp(shift)
            a = (a + shift * s) * scale  # sum e (z - m_old)  ->  sum e' (z - m_new)
            s = s * scale
            m = new_m
        above += torch.sub(z, z_t.unsqueeze(1), out=t).sign_().clamp_(min=0).sum(-1)
        local = tgt - lo
        inside = (local >= 0) & (local < width)
        if inside.any():  # the target never counts as above itself, whatever the rounding
            self_v = z.gather(1, local.clamp(0, width - 1).unsqueeze(1)).squeeze(1)
            above -= (inside & (self_v > z_t)).float()
        pz += torch.linalg.vecdot(p, z)
        z.sub_(m.unsqueeze(1))
        torch.exp(z, out=e)
        s += e.sum(-1)
        a += torch.linalg.vecdot(e, z)
        cat_v = torch.cat([top_v, bv], 1)
        cat_i = torch.cat([top_i, bi + lo], 1)
        top_v, idx = cat_v.topk(k, dim=-1)
        top_i = cat_i.gather(1, idx)
        lo += width
    lse = m + torch.log(s)
    neg_h = a / s - torch.log(s)  # E_q[z - m] - log s = sum q log q
    return _RowStats(
        entropy=-neg_h,
        kl=(neg_h_f - pz + lse).clamp_min(0.0),
        ce=lse - z_t,
        rank=above.round().long(),
        top_v=top_v - lse.unsqueeze(1),
        top_i=top_i,
    )


def prediction_trajectory(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    lens: Any = None,
    layers: Sequence[int] | None = None,
    top_k: int = 10,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    chunk_size: int | None = None,
    logits: torch.Tensor | None = None,
) -> PredictionTrajectory:
    """Read every layer's prediction at every position through a lens, with its statistics.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` holding ``hook_resid_pre`` of the
            requested blocks and the last block's ``hook_resid_post`` (then pass ``tokens`` too).
        tokens: Text or token ids.
        lens: ``None``/``"logit"`` for the logit lens, ``"logit-paper"`` for LLM-Microscope's
            variant, or any ``Lens`` (a ``TunedLens``, for instance).
        layers: Residual indices in 0..n_layers (default all); n_layers is the model's output.
        top_k: How many top tokens to keep per cell.
        chunk_size: Rows (positions) read out together (default 512); smaller saves memory.
        logits: With a cache, the model's logits for the same tokens: they serve as the output
            layer and let the readout identity be checked (otherwise the output is re-read).

    Returns:
        A ``PredictionTrajectory``.

    Raises:
        ValueError: empty or over-long text, a layer out of range, a lens made for another model.
        ReadoutIdentityError: the readout of the last residual does not reproduce the logits.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> traj = prediction_trajectory(tiny_model(n_layers=2), "hello", top_k=3)
        >>> traj.layer_labels, tuple(traj.kl.shape), tuple(traj.top_tokens.shape)
        (('0', '1', 'out'), (3, 1, 5), (3, 1, 5, 3))
        >>> float(traj.kl[-1].abs().max()) < 1e-4  # the output row is the model itself
        True
    """
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    lens = resolve_lens(lens)
    lens.check_model(model)
    n_layers = int(model.cfg.n_layers)
    layer_list = check_layers(layers, n_layers + 1, "residual layer")
    d_vocab = int(model.cfg.d_vocab)
    k = int(top_k)
    if not 1 <= k <= d_vocab:
        raise ValueError(f"top_k must be in 1..{d_vocab}, got {top_k}.")

    needed = sorted(set(layer_list) | {n_layers})
    cap = capture(cache if cache is not None else model, toks, sites=("resid",), layers=needed,
                  return_logits=cache is None)
    resid = cap["resid"]  # [len(needed) batch pos d_model]
    row_of = {layer: i for i, layer in enumerate(needed)}
    batch, n_pos = toks.shape
    n_rows = batch * n_pos
    flat = resid.reshape(len(needed), n_rows, -1)
    readout = Readout.for_model(model)

    given = cap.logits if cap.logits is not None else logits
    if given is not None and tuple(given.shape[:2]) != (batch, n_pos):
        raise ValueError(f"logits have shape {tuple(given.shape)}, but the tokens are {batch} x {n_pos}.")
    final_logits = None if given is None else given.reshape(n_rows, -1)
    identity_diff = None
    if final_logits is not None:
        probe = slice(max(0, n_rows - 8), n_rows)
        with torch.inference_mode():
            identity_diff = check_readout_identity(readout, flat[row_of[n_layers], probe], final_logits[probe])

    targets = torch.full((batch, n_pos), -1, dtype=torch.long, device=toks.device)
    targets[:, :-1] = toks[:, 1:]
    flat_targets = targets.reshape(-1)
    has_target = flat_targets >= 0
    safe_targets = flat_targets.clamp_min(0)

    n_l = len(layer_list)
    dev = resid.device
    entropy = torch.empty(n_l, n_rows, device=dev)
    kl = torch.empty(n_l, n_rows, device=dev)
    ce = torch.empty(n_l, n_rows, device=dev)
    rank = torch.empty(n_l, n_rows, dtype=torch.long, device=dev)
    top_p = torch.empty(n_l, n_rows, k, device=dev)
    top_i = torch.empty(n_l, n_rows, k, dtype=torch.long, device=dev)

    row_chunk = chunk_size or _ROW_CHUNK
    col = _COL_BLOCK
    with torch.inference_mode():
        for start in range(0, n_rows, row_chunk):
            rows = slice(start, min(start + row_chunk, n_rows))
            tgt = safe_targets[rows]
            if final_logits is not None:
                zf = final_logits[rows].float()
            else:
                zf = readout(flat[row_of[n_layers], rows]).float()
            lse_f = torch.logsumexp(zf, -1)
            p_f = torch.exp(zf - lse_f.unsqueeze(1))
            neg_h_f = _row_dot(p_f, zf) - lse_f  # sum p log p
            # The final distribution, cut once into per-block work buffers shared by every layer.
            p_blocks, p_sums = _final_blocks(p_f, col)
            del p_f
            for li, layer in enumerate(layer_list):
                if layer == n_layers:
                    st = _dense_stats(zf, neg_h_f, tgt, k)
                else:
                    h = lens.transform(flat[row_of[layer], rows], layer)
                    W, b = readout.weights(lens.final_norm)
                    x = (readout.normalize(h) if lens.final_norm else h).to(W.dtype)
                    st = _blocked_stats(x, W, b, p_blocks, p_sums, neg_h_f, tgt, k, readout.finish)
                entropy[li, rows] = st.entropy
                kl[li, rows] = st.kl
                ce[li, rows] = st.ce
                rank[li, rows] = st.rank
                top_p[li, rows] = st.top_v.exp()
                top_i[li, rows] = st.top_i

    ce[:, ~has_target] = math.nan
    rank[:, ~has_target] = -1
    shape = (n_l, batch, n_pos)
    str_tokens = cap.str_tokens or [[str(int(t)) for t in row] for row in toks]
    top_tokens = top_i.reshape(*shape, k)
    prov = Provenance.from_model(
        model,
        lens=lens,
        top_k=k,
        readout_identity_max_abs_diff=identity_diff,
        readout_identity_checked=identity_diff is not None,
    )
    return PredictionTrajectory(
        layers=tuple(layer_list),
        layer_labels=tuple(layer_label(layer, n_layers) for layer in layer_list),
        tokens=toks.detach().cpu(),
        str_tokens=str_tokens,
        targets=targets.cpu(),
        entropy=entropy.reshape(shape).cpu(),
        kl=kl.reshape(shape).cpu(),
        cross_entropy=ce.reshape(shape).cpu(),
        target_rank=rank.reshape(shape).cpu(),
        max_prob=top_p[..., 0].reshape(shape).cpu(),
        top_tokens=top_tokens.cpu(),
        top_probs=top_p.reshape(*shape, k).cpu(),
        top_strings=token_strings(model, top_tokens),
        n_layers=n_layers,
        provenance=prov,
    )
