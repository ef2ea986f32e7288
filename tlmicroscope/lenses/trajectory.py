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

``targets=`` tracks given tokens too (probability, log-probability and rank per layer and
position): their logits come from their rows of the unembedding and their ranks from one more
comparison pass over each block already in cache, so they cost no second unembedding.
``sites="pre+mid"`` interleaves readouts of ``resid_mid`` (between attention and MLP) with the
block inputs, for lenses that can read it (``lenses.base.lens_sites``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope import layers as layers_vocab
from tlmicroscope.capture import capture
from tlmicroscope.inputs import TextOrTokens, check_layers, resolve_input
from tlmicroscope.layers import residual_label
from tlmicroscope.lenses import _readout_stats
from tlmicroscope.lenses._target_ids import TargetIds, resolve_targets
from tlmicroscope.lenses.base import check_lens_sites, lens_features, resolve_lens
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.results import Provenance
from tlmicroscope.vocab import token_strings

__all__ = [
    "SITE_CHOICES",
    "STATISTICS",
    "PredictionTrajectory",
    "layer_label",
    "prediction_trajectory",
    "read_rows",
    "resolve_sites",
    "site_label",
]

#: Per-layer, per-position statistics of a trajectory (all natural-log units).
STATISTICS = ("entropy", "kl", "cross_entropy", "target_rank", "max_prob")


#: ``sites=`` spellings: which residuals of each block a trajectory reads.
SITE_CHOICES = {"pre": ("resid_pre",), "mid": ("resid_mid",), "pre+mid": ("resid_pre", "resid_mid")}


def layer_label(layer: int, n_layers: int) -> str:
    """The label of residual index ``layer``: ``"h0"``..``"h{n_layers}"``
    (``layers.residual_label``).

    Index ``n_layers`` (h^L, the last block's output) is what the model itself reads out; it was
    labelled ``"out"`` before the layer vocabulary (``tlmicroscope.layers``).

    Examples:
        >>> layer_label(0, 4), layer_label(4, 4)
        ('h0', 'h4')
    """
    return residual_label(layer, n_layers)


def site_label(layer: int, site: str, n_layers: int, *, named: bool = True) -> str:
    """The label of one trajectory row: ``"h3"`` for h^3, ``"b3.resid_mid"`` for block 3's mid
    residual.

    ``named`` is kept for older callers; the labels are unambiguous either way.

    Examples:
        >>> [site_label(1, s, 4) for s in ("resid_pre", "resid_mid")]
        ['h1', 'b1.resid_mid']
        >>> site_label(4, "resid_post", 4), site_label(2, "resid_pre", 4, named=False)
        ('h4', 'h2')
    """
    if layer == n_layers or site in ("resid_pre", "resid_post"):
        return layer_label(layer, n_layers)
    return layers_vocab.site(site, layer, n_layers=n_layers).label


def resolve_sites(sites: Any) -> tuple[str, ...]:
    """``"pre"``, ``"mid"``, ``"pre+mid"`` or a tuple of ``resid_pre``/``resid_mid``, in block
    order.
    """
    if isinstance(sites, str):
        if sites in SITE_CHOICES:
            return SITE_CHOICES[sites]
        sites = (sites,)
    chosen = tuple(sites)
    bad = [s for s in chosen if s not in ("resid_pre", "resid_mid")]
    if bad or not chosen:
        raise ValueError(
            f"sites must be one of {list(SITE_CHOICES)} or a tuple of 'resid_pre'/'resid_mid'; "
            f"got {sites!r}."
        )
    return tuple(s for s in ("resid_pre", "resid_mid") if s in chosen)


@dataclass(frozen=True)
class PredictionTrajectory:
    """Per-layer, per-position lens predictions and their statistics.

    Attributes:
        layers: Residual indices read (0..n_layers; n_layers is the model's output).
        layer_labels: One label per row from the layer vocabulary (``tlmicroscope.layers``):
            ``"h0"`` .. ``"h{n_layers}"``, and ``"b3.resid_mid"`` for mid readouts.
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
        sites: The residual each row reads (``resid_pre``, ``resid_mid``, or ``resid_post`` for
            the output); with mid readouts ``layers`` repeats a block and the labels say
            ``"h3"``/``"b3.resid_mid"``.
        tracked_prob, tracked_logprob, tracked_rank: With ``targets=``, the probability,
            log-probability (nats) and rank (0 = top-1) of each tracked target
            ``[layer batch pos target]``; ``None`` otherwise. (``target_rank`` above is the rank
            of the next token.)
        tracked_names: One label per tracked target; ``tracked_read`` the text of the token(s)
            read, per row (one row when shared); ``tracked_notes`` says which token of a
            multi-token string is read; ``tracked_ids`` ``[rows target member]`` (-1: no member).
    """

    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
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
    sites: tuple[str, ...] = ()
    tracked_prob: Float[torch.Tensor, "layer batch pos target"] | None = None
    tracked_logprob: Float[torch.Tensor, "layer batch pos target"] | None = None
    tracked_rank: Int[torch.Tensor, "layer batch pos target"] | None = None
    tracked_names: tuple[str, ...] = ()
    tracked_read: list[list[str]] | None = None
    tracked_notes: tuple[str, ...] = ()
    tracked_ids: Int[torch.Tensor, "rows target member"] | None = None

    def statistic(self, name: str) -> torch.Tensor:
        """One of ``STATISTICS`` by name, ``[layer batch pos]``."""
        if name not in STATISTICS:
            raise ValueError(f"Unknown statistic {name!r}; choose from {STATISTICS}.")
        return getattr(self, name)

    def layer_index(self, layer: int, site: str | None = None) -> int:
        """Row of residual index ``layer`` (its first row, or the one reading ``site``)."""
        for i, lay in enumerate(self.layers):
            if lay == layer and (site is None or not self.sites or self.sites[i] == site):
                return i
        raise ValueError(
            f"Layer {layer}{'' if site is None else ' ' + site} is not in this trajectory "
            f"(rows {self.layer_labels})."
        )

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
                        **(
                            {
                                f"p({name})": float(self.tracked_prob[li, batch, pos, t])
                                for t, name in enumerate(self.tracked_names)
                            }
                            if self.tracked_prob is not None
                            else {}
                        ),
                    }
                )
        return pd.DataFrame(rows)


_ROW_CHUNK = 512  # (layer, position) rows read out together
_COL_BLOCK = _readout_stats._COL_BLOCK

_KEYS = ("entropy", "kl", "ce", "rank", "top_p", "top_i", "lse")


def _store(
    out: dict[str, torch.Tensor],
    li: int,
    rows: slice,
    st: _readout_stats.RowStats,
    kl: torch.Tensor,
    every: tuple[int, int] = (0, 1),
) -> None:
    """Write rows ``j::n`` of ``st`` (position-major: layer j of each position) as layer ``li``."""
    j, n = every
    pick = slice(j, None, n)
    out["entropy"][li, rows] = st.entropy[pick]
    out["kl"][li, rows] = kl[pick]
    out["ce"][li, rows] = st.ce[pick]
    out["rank"][li, rows] = st.rank[pick]
    out["top_p"][li, rows] = st.top_v[pick].exp()
    out["top_i"][li, rows] = st.top_i[pick]
    out["lse"][li, rows] = st.lse[pick]
    if st.extra_z is not None:
        out["ez"][li, rows] = st.extra_z[pick]
        out["erank"][li, rows] = st.extra_rank[pick]


def read_rows(
    lens: Any,
    readout: Readout,
    sources: Sequence[tuple[int, str, torch.Tensor]],
    final_h: torch.Tensor | None,
    final_logits: torch.Tensor | None,
    tgt: torch.Tensor,
    k: int,
    *,
    extra: torch.Tensor | None = None,
    extra_group: int = 1,
    lean: bool = False,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Lens statistics of residual rows: the kernel shared by trajectories and target trajectories.

    Args:
        sources: ``(layer, site, h)`` with ``h`` ``[rows d_model]``, read through ``lens``.
        final_h, final_logits: The last residual rows, or the model's logits for them (preferred).
        tgt: ``[rows]`` ids whose cross-entropy and rank are wanted (clamped to >= 0).
        extra: ``[rows m]`` more ids whose logits (``ez``) are wanted, and the ranks of the best
            of each consecutive group of ``extra_group`` of them (``erank``).
        lean: Only ``lse`` and the extras for the lensed rows (entropy, KL, ranks and top-k are
            NaN or -1 there): what target trajectories need, at a lower cost.

    Returns:
        ``[len(sources) + 1, rows, ...]`` tensors (the last index is the model's output):
        ``entropy``, ``kl``, ``ce``, ``rank``, ``top_p``, ``top_i``, ``lse`` and, with ``extra``,
        ``ez`` ``[.. m]`` and ``erank`` ``[.. m/extra_group]``.
    """
    n_in = len(sources)
    R = int(tgt.shape[0])
    dev = tgt.device
    n_out = n_in + 1
    out = {key: torch.empty(n_out, R, device=dev) for key in ("entropy", "kl", "ce", "lse")}
    out["rank"] = torch.empty(n_out, R, dtype=torch.long, device=dev)
    out["top_p"] = torch.empty(n_out, R, k, device=dev)
    out["top_i"] = torch.empty(n_out, R, k, dtype=torch.long, device=dev)
    if extra is not None:
        out["ez"] = torch.empty(n_out, R, extra.shape[1], device=dev)
        out["erank"] = torch.empty(
            n_out, R, extra.shape[1] // extra_group, dtype=torch.long, device=dev
        )
    # Rows of every intermediate layer at a few positions are read out together, so the
    # unembedding streams through the cache once per chunk rather than once per layer.
    per_chunk = max(1, (chunk_size or _ROW_CHUNK) // max(n_in, 1))
    n_chunks = max(1, -(-R // per_chunk))
    per_chunk = max(1, -(-R // n_chunks))
    col = min(_COL_BLOCK, readout.d_vocab)
    W_rows, b = _readout_stats.unembed_rows(readout, lens.final_norm)
    finish = readout.finish if readout.softcap is not None else None
    with torch.inference_mode():
        for start in range(0, R, per_chunk):
            rows = slice(start, min(start + per_chunk, R))
            t = tgt[rows]
            ex = None if extra is None else extra[rows]
            zf = final_logits[rows].float() if final_logits is not None else readout(final_h[rows])
            fin, p_f, p_sums = _readout_stats.final_stats(zf, t, k, col, ex, extra_group)
            del zf
            _store(out, n_in, rows, fin, torch.zeros_like(fin.lse))
            if not n_in:
                continue
            # The first half of lens_logits, the one readout path; blocked_stats is its second.
            hs = [
                lens_features(lens, readout, h[rows], layer, site=site)[0]
                for layer, site, h in sources
            ]
            x = torch.stack(hs, 1).reshape(-1, hs[0].shape[-1])  # position-major rows
            del hs
            st = _readout_stats.blocked_stats(
                x,
                W_rows,
                b,
                finish,
                t.repeat_interleave(n_in),
                p_f,
                p_sums,
                n_in,
                k,
                col,
                extra=None if ex is None else ex.repeat_interleave(n_in, 0),
                extra_group=extra_group,
                lean=lean,
            )
            del p_f
            neg_h_f = (fin.pz - fin.lse).repeat_interleave(n_in)  # sum p log p of the final
            kl_rows = (neg_h_f - st.pz + st.lse).clamp_min(0.0)  # KL(p_final || q)
            for j in range(n_in):
                _store(out, j, rows, st, kl_rows, every=(j, n_in))
    return out


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
    targets: Any = None,
    per_row: bool = False,
    target_names: Sequence[str] | None = None,
    sites: Any = "pre",
) -> PredictionTrajectory:
    """Read every layer's prediction at every position through a lens, with its statistics.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` holding ``hook_resid_pre`` of the
            requested blocks and the last block's ``hook_resid_post`` (then pass ``tokens`` too;
            with ``sites`` including ``mid``, every ``hook_resid_mid`` and ``hook_resid_pre`` too).
        tokens: Text or token ids.
        lens: ``None``/``"logit"`` for the logit lens, ``"logit-paper"`` for LLM-Microscope's
            variant, or any ``Lens`` (a ``TunedLens``, for instance).
        layers: Residual indices in 0..n_layers (default all); n_layers is the model's output.
        top_k: How many top tokens to keep per cell.
        chunk_size: Rows (positions) read out together (default 512); smaller saves memory.
        logits: With a cache, the model's logits for the same tokens: they serve as the output
            layer and let the readout identity be checked (otherwise the output is re-read).
        targets: Tokens to track at every layer and position (``tracked_prob``/``_logprob``/
            ``_rank``): a string (read at its first token, with a warning, when it is several),
            a token id, a set of them whose probabilities add up, or a list of those.
        per_row: ``targets`` holds one entry per batch row (a target, or a list of targets of
            the same length for every row).
        target_names: Labels for the tracked targets (default: their text).
        sites: ``"pre"`` (block inputs, the default), ``"pre+mid"`` (also ``resid_mid``, between
            attention and MLP, interleaved after each block's input) or ``"mid"``.

    Returns:
        A ``PredictionTrajectory``.

    Raises:
        ValueError: empty or over-long text, a layer out of range, a lens made for another model,
            a lens that cannot read ``resid_mid``, a model without ``resid_mid`` (parallel
            blocks), an empty target list or a target outside the vocabulary.
        ReadoutIdentityError: the readout of the last residual does not reproduce the logits.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> traj = prediction_trajectory(tiny_model(n_layers=2), "hello", top_k=3)
        >>> traj.layer_labels, tuple(traj.kl.shape), tuple(traj.top_tokens.shape)
        (('h0', 'h1', 'h2'), (3, 1, 5), (3, 1, 5, 3))
        >>> float(traj.kl[-1].abs().max()) < 1e-4  # the output row is the model itself
        True
        >>> traj = prediction_trajectory(tiny_model(n_layers=2), "hello", targets=["o", {"l", "p"}],
        ...                              sites="pre+mid")
        >>> traj.layer_labels, traj.tracked_names, tuple(traj.tracked_prob.shape)
        (('h0', 'b0.resid_mid', 'h1', 'b1.resid_mid', 'h2'), ("'o'", "{'l' | 'p'}"), (5, 1, 5, 2))
    """
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    lens = resolve_lens(lens)
    lens.check_model(model)
    site_list = resolve_sites(sites)
    check_lens_sites(lens, site_list)
    n_layers = int(model.cfg.n_layers)
    layer_list = check_layers(layers, n_layers + 1, "residual layer")
    k = int(top_k)
    if not 1 <= k <= int(model.cfg.d_vocab):
        raise ValueError(f"top_k must be in 1..{int(model.cfg.d_vocab)}, got {top_k}.")
    batch, n_pos = toks.shape
    tracked: TargetIds | None = None
    if targets is not None:
        tracked = resolve_targets(model, targets, per_row=per_row, n_rows=batch, names=target_names)

    res = _residual_rows(model, cache, toks, layer_list, site_list, logits)
    dev = res.final_h.device
    next_tok = torch.full((batch, n_pos), -1, dtype=torch.long, device=toks.device)
    next_tok[:, :-1] = toks[:, 1:]
    flat_targets = next_tok.reshape(-1).to(dev)

    # One row per (layer, site): a block's input, then its mid residual; the output last read.
    plan = _row_plan(layer_list, site_list, n_layers)
    sources = [(layer, site, res.rows(layer, site)) for layer, site in plan if layer != n_layers]
    extra = None
    if tracked is not None:
        extra = tracked.row_ids(batch).to(dev).repeat_interleave(n_pos, 0)
    out = read_rows(
        lens,
        res.readout,
        sources,
        None if res.final_logits is not None else res.final_h,
        res.final_logits,
        flat_targets.clamp_min(0),
        k,
        extra=extra,
        extra_group=1 if tracked is None else tracked.group_size,
        chunk_size=chunk_size,
    )
    # read_rows puts the output row last; put it back where the plan has it.
    order = iter(range(len(sources)))
    idx = torch.tensor(
        [len(sources) if layer == n_layers else next(order) for layer, _ in plan], device=dev
    )
    shape = (len(plan), batch, n_pos)
    stats = _trajectory_stats(out, idx, flat_targets >= 0, shape, k)
    tracked_fields = {} if tracked is None else _tracked_fields(tracked, out, idx, shape)
    prov = Provenance.from_model(
        model,
        lens=lens,
        top_k=k,
        sites=list(site_list),
        readout_identity_max_abs_diff=res.identity_diff,
        readout_identity_checked=res.identity_diff is not None,
        **(
            {"tracked_targets": list(tracked.names), "tracked_notes": list(tracked.notes)}
            if tracked
            else {}
        ),
    )
    str_tokens = layers_vocab.as_str_tokens(res.str_tokens) or layers_vocab.str_tokens(None, toks)
    return PredictionTrajectory(
        layers=tuple(layer for layer, _ in plan),
        layer_labels=layers_vocab.layer_labels(
            site_label(layer, site, n_layers) for layer, site in plan
        ),
        tokens=toks.detach().cpu(),
        str_tokens=str_tokens,
        targets=next_tok.cpu(),
        top_strings=token_strings(model, stats["top_tokens"]),
        n_layers=n_layers,
        provenance=prov,
        sites=tuple(site for _, site in plan),
        **{key: v.cpu() for key, v in stats.items()},
        **tracked_fields,
    )


def _row_plan(
    layer_list: Sequence[int], site_list: Sequence[str], n_layers: int
) -> list[tuple[int, str]]:
    """``(layer, site)`` per trajectory row: each block's sites in order, the output as
    resid_post.
    """
    plan: list[tuple[int, str]] = []
    for layer in layer_list:
        if layer == n_layers:
            plan.append((layer, "resid_post"))
        else:
            plan.extend((layer, site) for site in site_list)
    return plan


@dataclass
class _ResidualRows:
    """The captured residuals of a trajectory as ``[rows d_model]`` per layer, and its output."""

    flat: torch.Tensor  # [captured-layer rows d_model]
    flat_mid: torch.Tensor | None  # [n_layers rows d_model] with mid readouts
    row_of: dict[int, int]
    final_h: torch.Tensor
    final_logits: torch.Tensor | None
    identity_diff: float | None
    readout: Readout
    str_tokens: Any

    def rows(self, layer: int, site: str) -> torch.Tensor:
        return self.flat_mid[layer] if site == "resid_mid" else self.flat[self.row_of[layer]]


def _residual_rows(
    model: Any,
    cache: Any,
    toks: torch.Tensor,
    layer_list: Sequence[int],
    site_list: Sequence[str],
    logits: torch.Tensor | None,
) -> _ResidualRows:
    """Capture the residuals a trajectory reads and check the readout identity on the output."""
    n_layers = int(model.cfg.n_layers)
    batch, n_pos = toks.shape
    with_mid = "resid_mid" in site_list
    needed = sorted(set(layer_list) | {n_layers})
    cap = capture(
        cache if cache is not None else model,
        toks,
        sites=("resid", "resid_mid") if with_mid else ("resid",),
        layers=None if with_mid else needed,
        return_logits=cache is None,
    )
    resid = cap["resid"]  # [len(needed) batch pos d_model]
    row_of = {layer: i for i, layer in enumerate(cap.layers["resid"])}
    n_rows = batch * n_pos
    flat = resid.reshape(resid.shape[0], n_rows, -1)
    flat_mid = cap["resid_mid"].reshape(n_layers, n_rows, -1) if with_mid else None
    readout = Readout.for_model(model)
    given = cap.logits if cap.logits is not None else logits
    if given is not None and tuple(given.shape[:2]) != (batch, n_pos):
        raise ValueError(
            f"logits have shape {tuple(given.shape)}, but the tokens are {batch} x {n_pos}."
        )
    final_logits = None if given is None else given.reshape(n_rows, -1)
    final_h = flat[row_of[n_layers]]
    identity_diff = None
    if final_logits is not None:
        probe = slice(max(0, n_rows - 8), n_rows)
        with torch.inference_mode():
            identity_diff = check_readout_identity(readout, final_h[probe], final_logits[probe])
    return _ResidualRows(
        flat, flat_mid, row_of, final_h, final_logits, identity_diff, readout, cap.str_tokens
    )


def _trajectory_stats(
    out: dict[str, torch.Tensor],
    idx: torch.Tensor,
    has_target: torch.Tensor,
    shape: tuple[int, int, int],
    k: int,
) -> dict[str, torch.Tensor]:
    """``read_rows``'s statistics in plan order as the trajectory's ``[layer batch pos]`` fields."""
    entropy, kl, ce, rank, top_p, top_i = (
        out[key].index_select(0, idx) for key in ("entropy", "kl", "ce", "rank", "top_p", "top_i")
    )
    ce[:, ~has_target] = math.nan
    rank[:, ~has_target] = -1
    return {
        "entropy": entropy.reshape(shape),
        "kl": kl.reshape(shape),
        "cross_entropy": ce.reshape(shape),
        "target_rank": rank.reshape(shape),
        "max_prob": top_p[..., 0].reshape(shape),
        "top_tokens": top_i.reshape(*shape, k),
        "top_probs": top_p.reshape(*shape, k),
    }


def _tracked_fields(
    tracked: TargetIds, out: dict[str, torch.Tensor], idx: torch.Tensor, shape: tuple[int, ...]
) -> dict[str, Any]:
    """The ``tracked_*`` fields of a trajectory from ``read_rows``'s extra logits and ranks."""
    _, batch, n_pos = shape
    dev = idx.device
    rows_mask = tracked.mask.to(dev)
    rows_mask = rows_mask.expand(batch, -1, -1) if rows_mask.shape[0] == 1 else rows_mask
    rows_mask = rows_mask.repeat_interleave(n_pos, 0)
    prob, logprob, trank = tracked.combine(
        out["ez"].index_select(0, idx),
        out["lse"].index_select(0, idx),
        out["erank"].index_select(0, idx),
        rows_mask,
    )
    T = tracked.n_targets
    return {
        "tracked_prob": prob.reshape(*shape, T).cpu(),
        "tracked_logprob": logprob.reshape(*shape, T).cpu(),
        "tracked_rank": trank.reshape(*shape, T).cpu(),
        "tracked_names": tracked.names,
        "tracked_read": tracked.read,
        "tracked_notes": tracked.notes,
        "tracked_ids": tracked.ids.masked_fill(~tracked.mask, -1),
    }
