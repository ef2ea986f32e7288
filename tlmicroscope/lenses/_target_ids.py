"""Turning the target tokens a user names (strings, ids, sets, one per row) into checked token ids.

A target is one token (a string that tokenizes to it, or its id) or a set of them whose
probabilities add up (``{" Paris", " paris"}``). A string of several tokens is read at its first
token, which is what a next-token readout can score; that choice is warned about and recorded.
Targets are resolved once, before any forward pass, into padded ``[rows target member]`` ids so
the readout kernel sees one flat list of ids per row.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tlmicroscope.vocab import token_strings

_FORMS = (
    "a string, a token id, a set of them (probabilities summed), or a list of those; "
    "with per_row=True one such entry per row"
)


@dataclass(frozen=True)
class TargetIds:
    """Resolved targets.

    Attributes:
        ids: ``[rows target member]`` token ids (``rows`` is 1 when shared by every row); padded
            members repeat a real id and are masked out.
        mask: ``[rows target member]``: which members are real.
        names: One label per target column.
        read: ``[rows][target]`` the text of what is read (the tokens scored).
        notes: One sentence per multi-token string, saying which token is read.
        per_row: Whether each row has its own targets.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    names: tuple[str, ...]
    read: list[list[str]]
    notes: tuple[str, ...]
    per_row: bool

    @property
    def n_targets(self) -> int:
        return int(self.ids.shape[1])

    @property
    def group_size(self) -> int:
        """Members per target (padded): the ``extra_group`` of the readout kernel."""
        return int(self.ids.shape[2])

    def row_ids(self, n_rows: int) -> torch.Tensor:
        """``[n_rows target*member]`` ids, the shared ones repeated for every row."""
        flat = self.ids.reshape(self.ids.shape[0], -1)
        return flat.expand(n_rows, -1) if flat.shape[0] == 1 else flat

    def combine(
        self, z: torch.Tensor, lse: torch.Tensor, rank: torch.Tensor, rows_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-target ``(prob, logprob, rank)`` ``[... target]`` from member logits ``z``
        ``[... target*member]``, the log-normaliser ``lse`` ``[...]`` and the kernel's ranks of
        each target's best member ``[... target]``.

        ``rows_mask`` ``[... target member]`` marks the real members. A set's log-probability is
        the log-sum-exp of its members'; its rank is that of its best member (tokens above it).
        """
        T, G = self.ids.shape[1], self.ids.shape[2]
        lp = (z - lse.unsqueeze(-1)).reshape(*z.shape[:-1], T, G)
        lp = lp.masked_fill(~rows_mask, -torch.inf)
        logprob = torch.logsumexp(lp, -1).clamp(max=0.0)
        return logprob.exp(), logprob, rank


def _is_id(item: Any) -> bool:
    if isinstance(item, bool):
        return False
    if isinstance(item, (int, np.integer)):
        return True
    return isinstance(item, torch.Tensor) and item.ndim == 0 and not item.is_floating_point()


def _decode(model: Any, ids: list[int]) -> list[str]:
    return [str(s) for s in token_strings(model, torch.tensor(ids, dtype=torch.long))]


def _one_token(model: Any, item: Any, notes: list[str]) -> tuple[int, str]:
    """One target token: its id and the text of what is read."""
    d_vocab = int(model.cfg.d_vocab)
    if _is_id(item):
        i = int(item)
        if not 0 <= i < d_vocab:
            raise ValueError(
                f"Target token id {i} is not in the vocabulary: ids run 0..{d_vocab - 1} for this "
                "model. "
                "Pass an id below d_vocab, or the token's text."
            )
        return i, _decode(model, [i])[0]
    if isinstance(item, str):
        if not item:
            raise ValueError(
                "A target string is empty; pass the token's text, e.g. ' Paris' (with its space)."
            )
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(
                f"This model has no tokenizer to turn the target {item!r} into ids; pass token ids."
            )
        ids = [int(t) for t in model.to_tokens(item, prepend_bos=False)[0]]
        unk = getattr(model.tokenizer, "unk_token_id", None)
        if not ids or (unk is not None and unk in ids):
            raise ValueError(
                f"The target {item!r} is not in the vocabulary (it tokenizes to "
                f"{'nothing' if not ids else 'the unknown token'}). Pass another spelling or a "
                "token id."
            )
        pieces = _decode(model, ids)
        if len(ids) > 1:
            note = (
                f"target {item!r} is {len(ids)} tokens {pieces}; reading its first token "
                f"{pieces[0]!r} "
                f"(id {ids[0]}). Pass a one-token string or an id to read another."
            )
            if note not in notes:
                notes.append(note)
                warnings.warn("The " + note, UserWarning, stacklevel=5)
        return ids[0], pieces[0]
    raise TypeError(f"A target must be {_FORMS}; got {type(item).__name__}.")


def _one_target(model: Any, item: Any, notes: list[str]) -> tuple[list[int], str]:
    """One target (a token or a set of tokens): member ids and the text of what is read."""
    if isinstance(item, (set, frozenset)):
        if not item:
            raise ValueError("A target set is empty; put at least one token (string or id) in it.")
        members = sorted((_one_token(model, m, notes) for m in item), key=lambda p: p[0])
        ids = list(dict.fromkeys(i for i, _ in members))
        texts = list(dict.fromkeys(repr(t) for _, t in members))
        return ids, "{" + " | ".join(texts) + "}"
    i, text = _one_token(model, item, notes)
    return [i], repr(text)


def _as_list(targets: Any) -> list[Any]:
    if isinstance(targets, (str, set, frozenset)) or _is_id(targets):
        return [targets]
    if isinstance(targets, torch.Tensor):
        return [int(t) for t in targets.reshape(-1)]
    if isinstance(targets, Sequence):
        return list(targets)
    raise TypeError(f"targets must be {_FORMS}; got {type(targets).__name__}.")


def resolve_targets(
    model: Any,
    targets: Any,
    *,
    per_row: bool = False,
    n_rows: int | None = None,
    names: Sequence[str] | None = None,
) -> TargetIds:
    """Check and tokenize ``targets`` before any forward pass (see ``TargetIds``).

    Raises:
        ValueError: an empty target list or set, an id outside the vocabulary, a string that is
            not in it, per-row targets whose count differs from the rows', or names of the wrong
            length.
        TypeError: a target of another type.
    """
    notes: list[str] = []
    if per_row:
        entries = _as_list(targets)
        if n_rows is not None and len(entries) != n_rows:
            raise ValueError(
                f"per_row targets need one entry per row: got {len(entries)} for {n_rows} rows. "
                "Pass one target (or one list of targets) per row, or per_row=False to share them."
            )
        rows = []
        for entry in entries:
            items = list(entry) if isinstance(entry, (list, tuple)) else [entry]
            if not items:
                raise ValueError("A row's target list is empty; give each row at least one target.")
            rows.append([_one_target(model, it, notes) for it in items])
        if not rows:
            raise ValueError(f"targets is empty: pass {_FORMS}.")
        counts = sorted({len(r) for r in rows})
        if len(counts) > 1:
            raise ValueError(f"Every row needs the same number of targets; got counts {counts}.")
    else:
        items = _as_list(targets)
        if not items:
            raise ValueError(f"targets is empty: pass {_FORMS}.")
        rows = [[_one_target(model, it, notes) for it in items]]
    T = len(rows[0])
    G = max(len(ids) for row in rows for ids, _ in row)
    ids = torch.empty(len(rows), T, G, dtype=torch.long)
    mask = torch.zeros(len(rows), T, G, dtype=torch.bool)
    for r, row in enumerate(rows):
        for t, (members, _) in enumerate(row):
            ids[r, t] = torch.tensor(members + [members[0]] * (G - len(members)))
            mask[r, t, : len(members)] = True
    read = [[text for _, text in row] for row in rows]
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != T:
            raise ValueError(
                f"target_names has {len(names)} names for {T} targets; give one per target."
            )
    elif per_row:
        names = ("target",) if T == 1 else tuple(f"target {j}" for j in range(T))
    else:
        names = tuple(read[0])
    return TargetIds(
        ids=ids, mask=mask, names=names, read=read, notes=tuple(notes), per_row=bool(per_row)
    )
