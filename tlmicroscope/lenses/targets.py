"""``target_trajectories``: how given tokens' probabilities build up over the layers, over many
prompts.

For each prompt, only the positions asked about are read out (by default the last of each
prompt): the lens's softmax normaliser needs the whole vocabulary, but only at those rows, so
over many short prompts the cost is about their forward passes (which, after a first batch whose
logits check the readout identity, stop at the last residual). The rows go through the same
streaming kernel as ``prediction_trajectory`` (``trajectory.read_rows``), which never builds a
``[layer pos d_vocab]`` tensor; tracked tokens cost one extra comparison pass per vocabulary block.

Prompts of different lengths are batched by right-padding: a causal model's positions never see
later ones, so padding changes no number at the positions read (tested against one-at-a-time).
Bands are percentile bootstrap intervals over prompts (positions of one prompt are averaged first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tlmicroscope import layers as layers_vocab
from tlmicroscope.capture import stream
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.inputs import ensure_eval, to_tokens
from tlmicroscope.lenses._target_ids import resolve_targets
from tlmicroscope.lenses.base import check_lens_sites, resolve_lens
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.lenses.trajectory import read_rows, resolve_sites, site_label
from tlmicroscope.results import Provenance

__all__ = ["TARGET_STATISTICS", "TargetTrajectories", "target_trajectories"]

#: Per-target statistics with bootstrap bands.
TARGET_STATISTICS = ("prob", "logprob", "rank")


@dataclass(frozen=True)
class TargetTrajectories:
    """Target-token probabilities per lens, layer, prompt and position read, with bootstrap bands.

    Attributes:
        lens_names: One per lens read (the figure draws one line per lens and target).
        layers, sites, layer_labels: The rows read (``tlmicroscope.layers`` labels: ``"h0"``..
            ``"h{n_layers}"``, the last being the model's own output; ``"b3.resid_mid"`` for mid
            readouts).
        target_names: One label per target; ``target_read`` the text of the token(s) read (one
            row when shared, one per prompt with ``per_prompt``); ``target_notes`` says which
            token of a multi-token string is read.
        prob, logprob, rank: ``[lens layer prompt position target]`` (nats; rank 0 = top-1).
        positions: The absolute position read in each prompt ``[prompt position]``.
        read_tokens: The token at each position read (the context the prediction follows).
        n_tokens: Each prompt's length in tokens.
        mean, low, high: Per statistic in ``TARGET_STATISTICS``, ``[lens layer target]``: the mean
            over prompts and the ``confidence`` percentile bootstrap band.
        provenance: Model, weight processing, lenses, settings, identity check.

    """

    lens_names: tuple[str, ...]
    layers: tuple[int, ...]
    sites: tuple[str, ...]
    layer_labels: tuple[str, ...]
    target_names: tuple[str, ...]
    target_read: list[list[str]]
    target_notes: tuple[str, ...]
    prob: Float[torch.Tensor, "lens layer prompt position target"]
    logprob: Float[torch.Tensor, "lens layer prompt position target"]
    rank: Int[torch.Tensor, "lens layer prompt position target"]
    positions: Int[torch.Tensor, "prompt position"]
    read_tokens: list[list[str]]
    n_tokens: tuple[int, ...]
    mean: dict[str, torch.Tensor] = field(default_factory=dict)
    low: dict[str, torch.Tensor] = field(default_factory=dict)
    high: dict[str, torch.Tensor] = field(default_factory=dict)
    confidence: float = 0.95
    n_bootstrap: int = 0
    provenance: Provenance | None = None

    def band(self, statistic: str = "prob") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(mean, low, high)`` of a statistic, each ``[lens layer target]``."""
        if statistic not in TARGET_STATISTICS:
            raise ValueError(f"Unknown statistic {statistic!r}; choose from {TARGET_STATISTICS}.")
        return self.mean[statistic], self.low[statistic], self.high[statistic]

    def to_dataframe(self):
        """One row per (lens, layer, target) with the mean and band of every statistic."""
        import pandas as pd

        rows = []
        for a, lens in enumerate(self.lens_names):
            for li, label in enumerate(self.layer_labels):
                for t, name in enumerate(self.target_names):
                    row = {
                        "lens": lens,
                        "layer": self.layers[li],
                        "site": self.sites[li],
                        "layer_label": label,
                        "target": name,
                    }
                    for s in TARGET_STATISTICS:
                        row[s] = float(self.mean[s][a, li, t])
                        row[f"{s}_low"] = float(self.low[s][a, li, t])
                        row[f"{s}_high"] = float(self.high[s][a, li, t])
                    rows.append(row)
        return pd.DataFrame(rows)


class _StopForward(Exception):
    """Raised from a hook to end a forward pass once the last residual is captured."""


def _bootstrap(values: torch.Tensor, n_boot: int, confidence: float, seed: int):
    """Mean over dim 0 and its percentile bootstrap band (prompts resampled with replacement)."""
    v = values.double().reshape(values.shape[0], -1)
    n = v.shape[0]
    mean = v.mean(0)
    if n_boot <= 0 or n < 2:
        return mean, mean.clone(), mean.clone()
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randint(n, (n_boot, n), generator=g)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(n_boot, n, dtype=torch.float64)
    )
    boots = counts @ v / n
    alpha = (1.0 - confidence) / 2.0
    q = torch.quantile(boots, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64), dim=0)
    return mean, q[0], q[1]


def _prompt_tokens(model: Any, prompts: Any, prepend_bos: bool | None) -> list[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):  # [prompt pos] ids (equal lengths) or one [pos] prompt
        prompts = list(prompts) if prompts.ndim == 2 else [prompts]
    elif isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, bytearray)):
        raise TypeError(
            f"prompts must be a list of strings or token-id lists, got {type(prompts).__name__}."
        )
    if len(prompts) == 0:
        raise ValueError("prompts is empty: pass at least one prompt.")
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, (list, tuple)) and not p:
            raise ValueError(f"Prompt {i} has no tokens; every prompt needs at least one.")
        toks = to_tokens(model, p, prepend_bos=prepend_bos)
        if toks.shape[0] != 1:
            raise ValueError(
                f"Prompt {i} is a batch of {toks.shape[0]}; pass each prompt as one text or id row."
            )
        rows.append(toks[0])
    return rows


def _positions(positions: Any, lengths: list[int]) -> torch.Tensor:
    pos = [positions] if isinstance(positions, int) else list(positions)
    if not pos or any(isinstance(p, bool) or not isinstance(p, int) for p in pos):
        raise ValueError(
            f"positions must be an int or a non-empty list of ints (negative: from the end), "
            f"got {positions!r}."
        )
    out = torch.empty(len(lengths), len(pos), dtype=torch.long)
    for i, n in enumerate(lengths):
        for j, p in enumerate(pos):
            if not -n <= p < n:
                raise ValueError(
                    f"Position {p} is outside prompt {i}, which has {n} tokens; "
                    f"pass positions in -{n}..{n - 1} (default -1: its last token)."
                )
            out[i, j] = p % n
    return out


@renamed_arguments(
    renamed={"prompts": "tokens", "n_bootstrap": "n_boot", "confidence": "ci_level"},
    old_positional=("model", "tokens", "targets"),
)
def target_trajectories(
    model: Any,
    tokens: Any = None,
    *,
    targets: Any,
    lens: Any = None,
    positions: int | Sequence[int] = -1,
    per_prompt: bool = False,
    target_names: Sequence[str] | None = None,
    sites: Any = "pre",
    batch_size: int = 16,
    n_boot: int = 1000,
    ci_level: float = 0.95,
    seed: int = 0,
    prepend_bos: bool | None = None,
    chunk_size: int | None = None,
    progress: bool = True,
) -> TargetTrajectories:
    """Probability, log-probability and rank of target tokens at every layer, over many prompts.

    Args:
        model: A TransformerLens model.
        tokens: The prompts: texts or token-id lists (or a ``[prompt pos]`` tensor), of any
            lengths.
        targets: A string (read at its first token, with a warning, when it is several), a token
            id, a set of them whose probabilities add up, or a list of those; with
            ``per_prompt=True`` one such entry (or one list, of equal length) per prompt.
        lens: A lens (``None``/``"logit"``, ``"logit-paper"``, a ``TunedLens``...) or a list of
            lenses, all read from the same forward passes.
        positions: Position(s) read in every prompt, negative from its end (default: the last).
        target_names: Labels for the targets (default: their text; ``"target"`` per prompt).
        sites: ``"pre"`` (block inputs), ``"pre+mid"`` (also ``resid_mid``) or ``"mid"``.
        batch_size: Prompts per forward pass (right-padded; padding changes no number read).
        n_boot, ci_level, seed: The percentile bootstrap over prompts (resamples, coverage).
        chunk_size: Rows read out together (see ``prediction_trajectory``).

    Returns:
        A ``TargetTrajectories``.

    The old spellings ``target_trajectories(model, prompts, targets)``, ``prompts=``,
    ``n_bootstrap=`` and ``confidence=`` still work for one release, with a ``DeprecationWarning``.

    Raises:
        ValueError: no prompts, an empty target list, a target outside the vocabulary, a position
            outside a prompt, a lens made for another model or unable to read ``resid_mid``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> tt = target_trajectories(
        ...     model, ["ab", "a longer one"], targets=["x", {"y", "z"}], progress=False
        ... )
        >>> tt.layer_labels, tt.target_names, tuple(tt.prob.shape)
        (('h0', 'h1', 'h2'), ("'x'", "{'y' | 'z'}"), (1, 3, 2, 1, 2))
        >>> mean, low, high = tt.band("prob")
        >>> bool(((low <= mean + 1e-12) & (mean <= high + 1e-12)).all())
        True
    """
    ensure_eval(model)
    site_list = resolve_sites(sites)
    lenses, names = _resolve_lenses(model, lens, site_list)
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if not 0.0 < float(ci_level) < 1.0:
        raise ValueError(f"ci_level must be in (0, 1), got {ci_level}.")
    if tokens is None:
        raise ValueError("Pass the prompts: target_trajectories(model, prompts, targets=...).")
    rows = _prompt_tokens(model, tokens, prepend_bos)
    n_prompts = len(rows)
    lengths = [int(r.shape[0]) for r in rows]
    pos = _positions(positions, lengths)
    tracked = resolve_targets(
        model, targets, per_row=per_prompt, n_rows=n_prompts, names=target_names
    )

    n_layers = int(model.cfg.n_layers)
    plan = [(layer, site) for layer in range(n_layers) for site in site_list] + [
        (n_layers, "resid_post")
    ]
    prob, logprob, rank, read_tokens, identity_diff = _read_batches(
        model, lenses, rows, pos, plan, tracked, int(batch_size), chunk_size, progress
    )
    A = len(lenses)
    mean, low, high = _bands(
        {"prob": prob, "logprob": logprob, "rank": rank.double()}, n_boot, ci_level, seed
    )
    prov = Provenance.from_model(
        model,
        lens=names[0] if A == 1 else " / ".join(names),
        lenses=names,
        sites=list(site_list),
        positions=positions if isinstance(positions, int) else list(positions),
        per_prompt=per_prompt,
        n_prompts=n_prompts,
        n_bootstrap=int(n_boot),
        confidence=float(ci_level),
        seed=seed,
        readout_identity_max_abs_diff=identity_diff,
        readout_identity_checked=True,
        readout_identity_rows="the first batch (later forward passes stop at the last residual)",
        target_notes=list(tracked.notes),
    )
    return TargetTrajectories(
        lens_names=tuple(names),
        layers=tuple(layer for layer, _ in plan),
        sites=tuple(site for _, site in plan),
        layer_labels=layers_vocab.layer_labels(
            site_label(layer, site, n_layers) for layer, site in plan
        ),
        target_names=tracked.names,
        target_read=tracked.read,
        target_notes=tracked.notes,
        prob=prob,
        logprob=logprob,
        rank=rank,
        positions=pos,
        read_tokens=read_tokens,
        n_tokens=tuple(lengths),
        mean=mean,
        low=low,
        high=high,
        confidence=float(ci_level),
        n_bootstrap=int(n_boot),
        provenance=prov,
    )


def _resolve_lenses(model: Any, lens: Any, site_list: Sequence[str]) -> tuple[list, list[str]]:
    """The lenses to read (checked against the model and the sites) and a distinct name each."""
    lenses = list(lens) if isinstance(lens, (list, tuple)) else [lens]
    if not lenses:
        raise ValueError("lens is an empty list; pass a lens, or None for the logit lens.")
    lenses = [resolve_lens(x) for x in lenses]
    for x in lenses:
        x.check_model(model)
        check_lens_sites(x, site_list)
    names: list[str] = []
    for i, x in enumerate(lenses):
        name = str(getattr(x, "name", type(x).__name__))
        names.append(name if name not in names else f"{name} #{i}")
    return lenses, names


def _batch_residuals(
    model: Any,
    rows: Sequence[torch.Tensor],
    batch: Sequence[int],
    pos: torch.Tensor,
    site_list: Sequence[str],
    *,
    check: bool,
) -> tuple[dict[tuple[str, int | None], torch.Tensor], torch.Tensor | None]:
    """One right-padded forward pass over ``batch``, keeping only the read positions' residuals.

    With ``check`` the pass runs to the logits (returned at the read positions); otherwise it
    stops at the last residual and the logits are ``None``.
    """
    n_layers = int(model.cfg.n_layers)
    n_sel = pos.shape[1]
    pad_id = getattr(getattr(model, "tokenizer", None), "pad_token_id", None)
    pad_id = int(pad_id) if pad_id is not None and 0 <= int(pad_id) < int(model.cfg.d_vocab) else 0
    width = max(int(rows[i].shape[0]) for i in batch)
    toks = torch.full((len(batch), width), pad_id, dtype=torch.long)
    for b, i in enumerate(batch):
        toks[b, : int(rows[i].shape[0])] = rows[i].cpu()
    dev_toks = to_tokens(model, toks)
    b_idx = torch.arange(len(batch)).repeat_interleave(n_sel).to(dev_toks.device)
    p_idx = pos[list(batch)].reshape(-1).to(dev_toks.device)
    got: dict[tuple[str, int | None], torch.Tensor] = {}

    def keep(site: str, layer: int | None, act: torch.Tensor) -> None:
        got[(site, layer)] = act[b_idx.to(act.device), p_idx.to(act.device)].clone()
        if not check and site == "resid" and layer == n_layers:
            raise _StopForward

    cap_sites = ("resid", "resid_mid") if "resid_mid" in site_list else ("resid",)
    final_logits = None
    try:
        logits = stream(model, dev_toks, keep, sites=cap_sites, layers=None, return_logits=True)
        final_logits = logits[b_idx.to(logits.device), p_idx.to(logits.device)]
        del logits
    except _StopForward:
        pass
    return got, final_logits


def _read_targets(
    lens: Any,
    readout: Readout,
    sources: list,
    final_logits: torch.Tensor,
    tracked: Any,
    batch: Sequence[int],
    n_sel: int,
    n_prompts: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tracked targets' probability, log-probability and rank in every row, through ``lens``."""
    dev = final_logits.device
    extra = (
        tracked.row_ids(n_prompts)[batch].to(dev).repeat_interleave(n_sel, 0)
        if tracked.per_row
        else tracked.row_ids(len(batch) * n_sel).to(dev)
    )
    mask = tracked.mask.to(dev)
    mask = (
        mask[batch].repeat_interleave(n_sel, 0)
        if tracked.per_row
        else mask.expand(len(batch) * n_sel, -1, -1)
    )
    tgt = torch.zeros(len(batch) * n_sel, dtype=torch.long, device=dev)
    out = read_rows(
        lens,
        readout,
        sources,
        None,
        final_logits,
        tgt,
        1,
        extra=extra,
        extra_group=tracked.group_size,
        lean=True,
        chunk_size=chunk_size,
    )
    return tracked.combine(out["ez"], out["lse"], out["erank"], mask)


def _bands(
    stats: dict[str, torch.Tensor], n_boot: int, ci_level: float, seed: int
) -> tuple[dict[str, torch.Tensor], ...]:
    """Bootstrap mean and band over prompts of each ``[lens layer prompt position target]`` stat."""
    mean, low, high = {}, {}, {}
    for s, v in stats.items():
        A, n_plan, _, _, T = v.shape
        per_prompt_v = v.mean(3).permute(2, 0, 1, 3)  # [prompt lens layer target]
        m, lo, hi = _bootstrap(per_prompt_v, int(n_boot), float(ci_level), seed)
        mean[s], low[s], high[s] = (t.reshape(A, n_plan, T).float() for t in (m, lo, hi))
    return mean, low, high


def _read_batches(
    model: Any,
    lenses: list,
    rows: Sequence[torch.Tensor],
    pos: torch.Tensor,
    plan: list[tuple[int, str]],
    tracked: Any,
    batch_size: int,
    chunk_size: int | None,
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[str]], float]:
    """Every lens's target statistics ``[lens layer prompt position target]`` over all prompts,
    batch by batch, with the text read and the readout identity's largest difference."""
    n_layers = int(model.cfg.n_layers)
    n_prompts, n_sel = len(rows), pos.shape[1]
    lengths = [int(r.shape[0]) for r in rows]
    site_list = tuple(dict.fromkeys(site for _, site in plan[:-1]))
    readout = Readout.for_model(model)
    T = tracked.n_targets
    A = len(lenses)
    prob = torch.empty(A, len(plan), n_prompts, n_sel, T)
    logprob = torch.empty_like(prob)
    rank = torch.empty(A, len(plan), n_prompts, n_sel, T, dtype=torch.long)
    read_tokens: list[list[str]] = [[] for _ in range(n_prompts)]
    order = sorted(range(n_prompts), key=lambda i: lengths[i])  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, n_prompts, batch_size)]
    identity_diff = 0.0
    for bi, batch in enumerate(tqdm(batches, desc="target trajectories", disable=not progress)):
        # The first batch runs to the logits, which check the readout identity; the others stop at
        # the last residual, so the model's unembedding of every position is not paid for.
        got, final_logits = _batch_residuals(model, rows, batch, pos, site_list, check=bi == 0)
        final_h = got[("resid", n_layers)]
        with torch.inference_mode():
            if final_logits is not None:
                identity_diff = max(
                    identity_diff, check_readout_identity(readout, final_h, final_logits)
                )
            else:
                final_logits = readout(final_h)
        sources = [
            (layer, site, got[("resid_mid", layer) if site == "resid_mid" else ("resid", layer)])
            for layer, site in plan[:-1]
        ]
        for a, x in enumerate(lenses):
            p, lp, r = _read_targets(
                x, readout, sources, final_logits, tracked, batch, n_sel, n_prompts, chunk_size
            )
            prob[a][:, batch] = p.reshape(len(plan), len(batch), n_sel, T).cpu()
            logprob[a][:, batch] = lp.reshape(len(plan), len(batch), n_sel, T).cpu()
            rank[a][:, batch] = r.reshape(len(plan), len(batch), n_sel, T).cpu()
        for i in batch:
            strs = layers_vocab.str_tokens(model, rows[i][None])[0]
            read_tokens[i] = [strs[int(q)] for q in pos[i]]

    return prob, logprob, rank, read_tokens, identity_diff
