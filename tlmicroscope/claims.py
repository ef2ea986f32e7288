"""The papers' headline claims measured on one model, so that two model families sit side by side.

Five measurements, each computed by the analysis that owns it (nothing is re-implemented here):

* **Where " Paris" emerges** (logit lens; Tuned Lens paper, nostalgebraist): the rank of " Paris"
  after "The capital of France is" at every residual state, read through each lens, via
  ``prediction_trajectory`` on the text followed by " Paris" (the next-token rank at the last prompt
  position *is* the rank of " Paris").
* **Tuned vs logit lens KL per layer** (Tuned Lens): ``evaluate_lens`` on the held-out tail of a
  corpus.
* **The linearity profile** (LLM-Microscope): ``linearity_scores`` without the residual, whose
  curve the paper finds lowest in the middle layers (a U-shape).
* **The intrinsic-dimension peak** (Geometry of Tokens, LLM-Microscope): ``layer_profiles``' TwoNN
  per residual state; the paper finds a peak in the early-to-middle layers.
* **The first-token norm spike** (latent-space geometry): ``norm_profile``'s position-0 norm over
  the median of the other positions, per block output.

``claims_table([a, b])`` renders several models' claims as one Markdown table;
``benchmarks/family_claims.py --write-readme`` puts it in the README.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tlmicroscope.corpus import CorpusSource, token_windows
from tlmicroscope.results import Provenance

__all__ = ["PARIS_PROMPT", "FamilyClaims", "claims_table", "family_claims"]

PARIS_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class FamilyClaims:
    """One model's values for the five claims (see the module docstring).

    Attributes:
        model_name, n_layers, d_model, d_vocab: The model.
        paris_rank: ``{lens name: [rank of " Paris" at h^0..h^L, output last]}`` (0 = top-1).
        paris_top1_from, paris_top5_from: ``{lens: first residual index from which " Paris" stays
            top-1 / in the top-5 through the output}`` (``None`` when it never does).
        kl: ``{lens: [held-out KL(final || lens) per residual state h^0..h^{L-1}]}`` in nats.
        kl_tokens: Held-out tokens the KL was measured on.
        linearity_without_residual: Per pair (h^l, h^{l+1}), l = 0..L-1.
        linearity_n_tokens: Tokens pooled for linearity.
        intrinsic_dimension: TwoNN per residual state h^0..h^L (NaN where too few distinct points).
        id_points: Tokens used for the intrinsic dimension.
        first_token_ratio: Position 0's norm over the median of the others, per block output
            (``resid_post`` of blocks 0..L-1).
        norm_tokens: Window length used for the norms.
        provenance: Settings.
    """

    model_name: str
    n_layers: int
    d_model: int
    d_vocab: int
    paris_rank: dict[str, list[int]]
    paris_top1_from: dict[str, int | None]
    paris_top5_from: dict[str, int | None]
    kl: dict[str, list[float]]
    kl_tokens: int
    linearity_without_residual: list[float]
    linearity_n_tokens: int
    intrinsic_dimension: list[float]
    id_points: int
    first_token_ratio: list[float]
    norm_tokens: int
    provenance: Provenance = field(compare=False)

    @property
    def linearity_min_pair(self) -> int:
        """The pair index l with the lowest linearity without residual."""
        vals = self.linearity_without_residual
        return min(range(len(vals)), key=vals.__getitem__)

    @property
    def linearity_thirds(self) -> tuple[float, float, float]:
        """Mean linearity without residual over the first, middle and last third of the pairs."""
        vals = self.linearity_without_residual
        n = len(vals)
        cuts = [0, round(n / 3), round(2 * n / 3), n]
        return tuple(sum(vals[a:b]) / max(1, b - a) for a, b in itertools.pairwise(cuts))

    @property
    def linearity_u_shape(self) -> bool:
        """True when the middle third's mean is below both outer thirds' by at least 0.02 (single
        pairs are too noisy to call a shape from one minimum)."""
        first, mid, last = self.linearity_thirds
        return min(first, last) - mid >= 0.02

    @property
    def id_peak_layer(self) -> int | None:
        """The residual index (1..L) of the largest finite intrinsic dimension. h^0 is left out:
        embedding rows are a lookup table, so their TwoNN estimate (hundreds on SmolLM2) says
        nothing about what the layers compute, and the papers' peak is about the blocks."""
        finite = [
            (v, i) for i, v in enumerate(self.intrinsic_dimension) if i > 0 and math.isfinite(v)
        ]
        return max(finite)[1] if finite else None

    @property
    def spike_layer(self) -> int:
        """The first block whose output has its first-token ratio above half of the largest
        ratio."""
        top = max(self.first_token_ratio)
        return next(i for i, r in enumerate(self.first_token_ratio) if r >= top / 2)

    def tuned_beats_logit(self) -> int | None:
        """At how many of the layers the tuned lens's KL is below the logit lens's (``None``
        without one)."""
        if "tuned" not in self.kl:
            return None
        return sum(t < g for t, g in zip(self.kl["tuned"], self.kl["logit"]))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FamilyClaims:
        """The inverse of ``to_dict`` (the derived summaries are recomputed, not read)."""
        names = [k for k in cls.__dataclass_fields__ if k != "provenance"]
        missing = [k for k in names + ["provenance"] if k not in data]
        if missing:
            raise ValueError(f"Not a FamilyClaims record: missing {missing}.")
        return cls(**{k: data[k] for k in names}, provenance=Provenance(**data["provenance"]))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready), with the derived summaries."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "provenance"}
        out.update(
            linearity_min_pair=self.linearity_min_pair,
            linearity_u_shape=self.linearity_u_shape,
            id_peak_layer=self.id_peak_layer,
            spike_layer=self.spike_layer,
            tuned_beats_logit=self.tuned_beats_logit(),
            provenance=self.provenance.to_dict(),
        )
        return out


def _paris_ranks(
    model: Any, lenses: dict[str, Any], prompt: str, answer: str
) -> dict[str, list[int]]:
    from tlmicroscope.lenses import prediction_trajectory

    prompt_ids = model.to_tokens(prompt)
    full = model.to_tokens(prompt + answer)
    answer_ids = model.to_tokens(answer, prepend_bos=False)[0]
    if answer_ids.numel() != 1:
        raise ValueError(
            f"{answer!r} is {answer_ids.numel()} tokens for this tokenizer; the emergence "
            "probe needs an answer that is one token."
        )
    if (
        full.shape[1] != prompt_ids.shape[1] + 1
        or not torch.equal(full[0, :-1], prompt_ids[0])
        or int(full[0, -1]) != int(answer_ids[0])
    ):
        raise ValueError(
            f"{prompt!r} + {answer!r} does not tokenize as the prompt's tokens plus "
            f"{answer!r}; pick a prompt and answer whose tokens concatenate."
        )
    pos = prompt_ids.shape[1] - 1
    out = {}
    for name, lens in lenses.items():
        traj = prediction_trajectory(model, full, lens=lens, top_k=1)
        out[name] = [int(r) for r in traj.target_rank[:, 0, pos]]
    return out


def _stays_from(ranks: Sequence[int], best: int) -> int | None:
    """First index from which every rank is at most ``best``."""
    first = None
    for i, r in enumerate(ranks):
        if r > best:
            first = None
        elif first is None:
            first = i
    return first


def family_claims(
    model: Any,
    corpus: CorpusSource = None,
    *,
    tuned_lens: Any = None,
    kl_tokens: int = 2048,
    linearity_tokens: int | None = None,
    id_points: int = 2048,
    norm_tokens: int = 256,
    seq_len: int = 256,
    prompt: str = PARIS_PROMPT,
    answer: str = " Paris",
    progress: bool = True,
) -> FamilyClaims:
    """Measure the five claims of the module docstring on ``model``.

    Args:
        model: A TransformerLens model.
        corpus: Text for the corpus-level claims (default: the embedded ``pydoc_data`` topics).
        tuned_lens: A trained ``TunedLens`` (or a folder ``load_lens`` reads); without one only the
            logit lens is measured.
        kl_tokens: Held-out tokens for the per-layer KL (whole windows of ``seq_len``).
        linearity_tokens: Tokens pooled for linearity (default ``linearity_scores``' own,
            ``max(8192, 32·d_model)``); must exceed ``d_model + 1``.
        id_points: Tokens for the intrinsic dimension.
        norm_tokens: Length of the one corpus window whose norms give the first-token ratio.
        prompt, answer: The emergence probe; ``prompt + answer`` must tokenize as the prompt's
            tokens plus the single token of ``answer``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> c = family_claims(model, ["Some corpus text about lenses and layers. " * 300],
        ...                   kl_tokens=64, linearity_tokens=600, id_points=200, norm_tokens=32,
        ...                   seq_len=32, answer="e", progress=False)
        >>> len(c.paris_rank["logit"]), len(c.linearity_without_residual), len(c.first_token_ratio)
        (3, 2, 2)
    """
    from tlmicroscope.geometry import norm_profile
    from tlmicroscope.inputs import ensure_eval
    from tlmicroscope.lenses import evaluate_lens, load_lens
    from tlmicroscope.microscope import layer_profiles, linearity_scores

    ensure_eval(model)
    if isinstance(tuned_lens, (str, os.PathLike)):
        tuned_lens = load_lens(tuned_lens, model)
    lenses = {"logit": None} | ({"tuned": tuned_lens} if tuned_lens is not None else {})

    ranks = _paris_ranks(model, lenses, prompt, answer)
    kl = {}
    for name, lens in lenses.items():
        ev = evaluate_lens(
            model,
            lens=lens,
            corpus=corpus,
            n_tokens=kl_tokens,
            seq_len=seq_len,
            baseline=False,
            progress=progress,
        )
        kl[name] = [float(v) for v in ev.kl[:-1]]
    lin = linearity_scores(
        model, corpus, n_tokens=linearity_tokens, seq_len=seq_len, progress=progress
    )
    prof = layer_profiles(
        model, corpus, n_tokens=id_points, id_points=id_points, seq_len=seq_len, progress=progress
    )
    window = token_windows(model, corpus, seq_len=norm_tokens, n_windows=1)
    norms = norm_profile(model, window, progress=False)
    prov = Provenance.from_model(
        model,
        lens=tuned_lens,
        kl_tokens=kl_tokens,
        linearity_tokens=lin.n_tokens,
        id_points=id_points,
        norm_tokens=norm_tokens,
        seq_len=seq_len,
        prompt=prompt,
        answer=answer,
        corpus=corpus if isinstance(corpus, str) or corpus is None else type(corpus).__name__,
    )
    return FamilyClaims(
        model_name=prov.model,
        n_layers=int(model.cfg.n_layers),
        d_model=int(model.cfg.d_model),
        d_vocab=int(model.cfg.d_vocab),
        paris_rank=ranks,
        paris_top1_from={k: _stays_from(v, 0) for k, v in ranks.items()},
        paris_top5_from={k: _stays_from(v, 4) for k, v in ranks.items()},
        kl=kl,
        kl_tokens=kl_tokens,
        linearity_without_residual=[float(v) for v in lin.score_without_residual],
        linearity_n_tokens=lin.n_tokens,
        intrinsic_dimension=[float(v) for v in prof.intrinsic_dimension],
        id_points=id_points,
        first_token_ratio=[float(v) for v in norms.first_token_ratio],
        norm_tokens=int(window.shape[1]),
        provenance=prov,
    )


def _fmt_layer(i: int | None, n: int) -> str:
    return "never" if i is None else f"{i} of {n}"


def _row(claim: str, paper: str, cells: list[str]) -> str:
    return "| " + " | ".join([claim, paper, *cells]) + " |"


def _kl_cell(c: FamilyClaims) -> str:
    mid = c.n_layers // 2
    logit = f"logit {c.kl['logit'][0]:.1f} / {c.kl['logit'][mid]:.1f} / {c.kl['logit'][-1]:.2f}"
    if "tuned" not in c.kl:
        return logit + f" (no tuned lens; {c.kl_tokens} tokens)"
    return (
        f"tuned {c.kl['tuned'][0]:.1f} / {c.kl['tuned'][mid]:.1f} / {c.kl['tuned'][-1]:.2f}; "
        f"{logit}; tuned lower at {c.tuned_beats_logit()} of {c.n_layers} ({c.kl_tokens} "
        "tokens)"
    )


def _lin_cell(c: FamilyClaims) -> str:
    v, i = c.linearity_without_residual, c.linearity_min_pair
    a, b, z = c.linearity_thirds
    shape = "U-shaped" if c.linearity_u_shape else "not U-shaped"
    return f"{a:.2f} / {b:.2f} / {z:.2f} ({shape}); lowest pair {i}→{i + 1}: {v[i]:.2f}"


def _id_cell(c: FamilyClaims) -> str:
    p = c.id_peak_layer
    if p is None:
        return "no finite ID"
    return (
        f"peak {c.intrinsic_dimension[p]:.1f} at h^{p} of {c.n_layers} "
        f"({p / c.n_layers:.0%} deep); {c.intrinsic_dimension[-1]:.1f} at the last"
    )


def _spike_cell(c: FamilyClaims) -> str:
    top = max(c.first_token_ratio)
    return f"×{top:.0f} (from block {c.spike_layer}); ×{c.first_token_ratio[0]:.1f} after block 0"


def _paris_rows(claims: Sequence[FamilyClaims]) -> list[str]:
    """Where " Paris" becomes top-1 (each lens the models have) and stays in the top-5."""
    rows = []
    for lens in ("logit", "tuned"):
        if not any(lens in c.paris_rank for c in claims):
            continue
        cells = [
            _fmt_layer(c.paris_top1_from.get(lens), c.n_layers)
            if lens in c.paris_rank
            else "no tuned lens"
            for c in claims
        ]
        rows.append(_row(f'" Paris" stays top-1 from layer ({lens} lens)', "late layers", cells))
    cells = [_fmt_layer(c.paris_top5_from["logit"], c.n_layers) for c in claims]
    rows.append(_row('" Paris" stays in the top-5 from layer (logit lens)', "late layers", cells))
    return rows


def claims_table(claims: Sequence[FamilyClaims]) -> str:
    """A Markdown table with one row per claim, one column per model, and the papers' finding.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> c = family_claims(tiny_model(n_layers=2), ["Some corpus text about lenses. " * 300],
        ...                   kl_tokens=64, linearity_tokens=600, id_points=200, norm_tokens=32,
        ...                   seq_len=32, answer="e", progress=False)
        >>> claims_table([c]).splitlines()[0].startswith("| claim | paper |")
        True
    """
    models = [
        f"{c.model_name} ({c.n_layers} layers, d={c.d_model}, vocab {c.d_vocab:,})" for c in claims
    ]
    lines = [_row("claim", "paper", models), "|" + "---|" * (2 + len(claims))]
    lines += _paris_rows(claims)
    for claim, paper, cell in (
        (
            "held-out KL(final ‖ lens), nats, at layers 0 / L/2 / L−1",
            "tuned below logit at every layer",
            _kl_cell,
        ),
        (
            "linearity without residual, mean over the first / middle / last third of the pairs",
            "lowest in the middle",
            _lin_cell,
        ),
        ("intrinsic-dimension peak over h^1..h^L (TwoNN)", "early-to-middle layers", _id_cell),
        (
            "first-token norm / median of the rest (block outputs)",
            "a large spike after the first layers",
            _spike_cell,
        ),
    ):
        lines.append(_row(claim, paper, [cell(c) for c in claims]))
    return "\n".join(lines)
