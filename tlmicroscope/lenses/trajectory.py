"""``prediction_trajectory``: what each layer predicts at each position, through a lens.

Cost model: reading out every layer is ``n_layers`` unembeddings on top of the forward pass (the
model's own output supplies the last one); everything else must cost little next to them. The
statistics come from identities that need only a few passes over each block of logits:

* ``lse = logsumexp(z)``; ``entropy = lse - E_q[z]``;
* ``KL(p_final || q) = -H(p_final) - E_p[z] + lse``, since ``sum(p_final) = 1``;
* ``cross_entropy = lse - z[target]``; ``rank = #{z > z[target]}``; the top-k from the k
  vocabulary groups with the largest maxima.

The rows of every layer at a few positions are read out together (512 rows by default), so the
unembedding streams through the cache once per chunk, not once per layer, and each ``[rows 2048]``
block of logits is reduced while still in cache (``_readout_stats``): no ``[layer pos d_vocab]``
nor even a ``[rows d_vocab]`` tensor is built for any layer. Statistics are float32 whatever the
model's dtype. Token strings are decoded only for the ids shown (``top_strings``).
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
from tlmicroscope.lenses import _readout_stats
from tlmicroscope.lenses.base import resolve_lens
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.results import Provenance

__all__ = ["STATISTICS", "PredictionTrajectory", "layer_label", "prediction_trajectory"]

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


_ROW_CHUNK = 512  # (layer, position) rows read out together
_COL_BLOCK = _readout_stats._COL_BLOCK


def _store(out: dict[str, torch.Tensor], li: int, rows: slice, st: _readout_stats.RowStats,
           kl: torch.Tensor, every: tuple[int, int] = (0, 1)) -> None:
    """Write rows ``j::n`` of ``st`` (position-major: layer j of each position) as layer ``li``."""
    j, n = every
    pick = slice(j, None, n)
    out["entropy"][li, rows] = st.entropy[pick]
    out["kl"][li, rows] = kl[pick]
    out["ce"][li, rows] = st.ce[pick]
    out["rank"][li, rows] = st.rank[pick]
    out["top_p"][li, rows] = st.top_v[pick].exp()
    out["top_i"][li, rows] = st.top_i[pick]


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
    dev = resid.device

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
    flat_targets = targets.reshape(-1).to(dev)
    has_target = flat_targets >= 0
    safe_targets = flat_targets.clamp_min(0)

    n_l = len(layer_list)
    out = {
        "entropy": torch.empty(n_l, n_rows, device=dev),
        "kl": torch.empty(n_l, n_rows, device=dev),
        "ce": torch.empty(n_l, n_rows, device=dev),
        "rank": torch.empty(n_l, n_rows, dtype=torch.long, device=dev),
        "top_p": torch.empty(n_l, n_rows, k, device=dev),
        "top_i": torch.empty(n_l, n_rows, k, dtype=torch.long, device=dev),
    }

    # Rows of every intermediate layer at a few positions are read out together, so the
    # unembedding streams through the cache once per chunk rather than once per layer.
    inner = [(li, layer) for li, layer in enumerate(layer_list) if layer != n_layers]
    out_li = layer_list.index(n_layers) if n_layers in layer_list else None
    n_in = len(inner)
    per_chunk = max(1, (chunk_size or _ROW_CHUNK) // max(n_in, 1))
    n_chunks = -(-n_rows // per_chunk)
    per_chunk = -(-n_rows // n_chunks)
    col = min(_COL_BLOCK, d_vocab)
    W_rows, b = _readout_stats.unembed_rows(readout, lens.final_norm)
    finish = readout.finish if readout.softcap is not None else None
    with torch.inference_mode():
        for start in range(0, n_rows, per_chunk):
            rows = slice(start, min(start + per_chunk, n_rows))
            tgt = safe_targets[rows]
            if final_logits is not None:
                zf = final_logits[rows].float()
            else:
                zf = readout(flat[row_of[n_layers], rows])
            fin, p_f, p_sums = _readout_stats.final_stats(zf, tgt, k, col)
            del zf
            if out_li is not None:
                _store(out, out_li, rows, fin, torch.zeros_like(fin.lse))
            if not inner:
                continue
            hs = []
            for _, layer in inner:
                h = lens.transform(flat[row_of[layer], rows], layer)
                hs.append(readout.normalize(h) if lens.final_norm else h.float())
            x = torch.stack(hs, 1).reshape(-1, hs[0].shape[-1])  # position-major rows
            del hs
            st = _readout_stats.blocked_stats(
                x, W_rows, b, finish, tgt.repeat_interleave(n_in), p_f, p_sums, n_in, k, col
            )
            del p_f
            neg_h_f = (fin.pz - fin.lse).repeat_interleave(n_in)  # sum p log p of the final
            kl_rows = (neg_h_f - st.pz + st.lse).clamp_min(0.0)  # KL(p_final || q)
            for j, (li, _) in enumerate(inner):
                _store(out, li, rows, st, kl_rows, every=(j, n_in))

    entropy, kl, ce, rank, top_p, top_i = (out[key] for key in ("entropy", "kl", "ce", "rank", "top_p", "top_i"))
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
