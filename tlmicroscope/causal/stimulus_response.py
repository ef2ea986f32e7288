"""Stimulus-response alignment: does a lens's reaction to an intervention predict the model's?

At residual layer l a treated position gets the residual update of block l-1 from a donor
(a resample ablation of that one update; at l = 0 the embedding itself is swapped). As in the
reference, the donor is the same position of another sequence, and position 0 is never treated
nor a donor (SmolLM2's first-token residual norm is about 90x the others', so a donor or a
treated token there swamps everything else); ``donors="any"`` draws from every (sequence,
position) instead, position 0 included:
``h̃ = h^l + Δ_donor - Δ``, ``Δ = h^l - h^{l-1}``. Then

* stimulus  s = log_softmax(lens_l(h̃) - lens_l(h^l)), what the lens says changed;
* response  r = log_softmax(final_treated - final_clean) at the same position, what the model
  did once ``h̃`` was patched into ``blocks.{l}.hook_resid_pre``;
* alignment = the Aitchison similarity of s and r, the cosine after a weighted centred log-ratio
  with weights ``w = (p_clean + p_treated) / 2`` (the model's output distributions).

Belrose et al. find the alignment rises with depth and is higher for the tuned lens than for the
logit lens at every layer. ``StimulusResponseResult.confidence_intervals`` and ``.compare`` give
percentile bootstrap intervals over the treated samples, per layer (paired between lenses, which
share the interventions), so "higher at N layers" counts only layers whose interval excludes 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.capture import capture
from tlmicroscope.causal._bootstrap import bootstrap_mean_ci
from tlmicroscope.causal._hidden import residual_hook
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.inputs import TextOrTokens, check_layers, resolve_input
from tlmicroscope.lenses.base import lens_logits, resolve_lens
from tlmicroscope.lenses.readout import Readout
from tlmicroscope.results import Provenance

__all__ = [
    "DONOR_MODES",
    "StimulusResponseResult",
    "aitchison_similarity",
    "stimulus_response_alignment",
]

#: ``"same_position"``: the reference's donors (same position, another sequence, never position 0);
#: ``"any"``: any other (sequence, position), position 0 included (this package's earlier default).
DONOR_MODES = ("same_position", "any")


def aitchison_similarity(
    x: Float[torch.Tensor, "... d_vocab"],
    y: Float[torch.Tensor, "... d_vocab"],
    weights: Float[torch.Tensor, "... d_vocab"],
) -> Float[torch.Tensor, ...]:
    """Weighted Aitchison similarity of two log-compositions (logits or log-probabilities).

    ``clr_w(x) = x - Σ w x``; ``<x, y>_w = Σ w clr_w(x) clr_w(y)``; the similarity is
    ``<x, y>_w / sqrt(<x, x>_w <y, y>_w)``. Adding a constant to ``x`` or ``y`` (normalising
    them) changes nothing. ``weights`` are normalised to sum to 1.

    Examples:
        >>> x = torch.tensor([1.0, 2.0, 4.0]); w = torch.tensor([0.2, 0.3, 0.5])
        >>> same, opposite = aitchison_similarity(x, x + 7.0, w), aitchison_similarity(x, -x, w)
        >>> round(float(same), 6), round(float(opposite), 6)
        (1.0, -1.0)
    """
    w = weights / weights.sum(-1, keepdim=True)
    cx = x - (w * x).sum(-1, keepdim=True)
    cy = y - (w * y).sum(-1, keepdim=True)
    num = (w * cx * cy).sum(-1)
    den = torch.sqrt((w * cx * cx).sum(-1) * (w * cy * cy).sum(-1))
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


@dataclass(frozen=True)
class StimulusResponseResult:
    """Aitchison alignment of lens stimulus and model response, per lens, layer and sample.

    Attributes:
        alignment: ``[lens layer sample]`` similarities in [-1, 1].
        layers: Residual indices (the lens layer; block ``l-1``'s update was resampled).
        lens_names: Names of the lenses, in the order of the first axis.
        positions: ``[sample 2]`` (batch row, position) of each treated token, per layer the same.
        donors: ``[layer sample 2]`` (batch row, position) of each donor.
        provenance: Model, lenses and settings.
        donor_mode: How donors were drawn (``DONOR_MODES``).
    """

    alignment: Float[torch.Tensor, "lens layer sample"]
    layers: tuple[int, ...]
    lens_names: tuple[str, ...]
    positions: Int[torch.Tensor, "sample 2"]
    donors: Int[torch.Tensor, "layer sample 2"]
    provenance: Provenance
    donor_mode: str = "any"

    @property
    def mean_alignment(self) -> Float[torch.Tensor, "lens layer"]:
        return self.alignment.nanmean(-1)

    def confidence_intervals(
        self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Percentile bootstrap interval of each lens's mean alignment per layer.

        Returns ``(low, high)``, each ``[lens layer]``, from ``n_boot`` resamples of the treated
        samples (``_bootstrap.bootstrap_indices``).

        Examples:
            >>> from tlmicroscope.models import tiny_model
            >>> toks = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(0))
            >>> res = stimulus_response_alignment(
            ...     tiny_model(n_layers=2), toks, lens="logit", n_samples=6, progress=False
            ... )
            >>> lo, hi = res.confidence_intervals()
            >>> lo.shape, bool((lo <= res.mean_alignment.numpy() + 1e-6).all())
            ((1, 2), True)
        """
        return bootstrap_mean_ci(
            self.alignment.double().numpy(), n_boot=n_boot, level=level, seed=seed
        )

    def compare(
        self,
        a: int | str = 0,
        b: int | str = 1,
        *,
        level: float = 0.95,
        n_boot: int = 2000,
        seed: int = 0,
    ):
        """Per layer, lens ``a``'s alignment minus lens ``b``'s: mean and paired bootstrap interval.

        Both lenses saw the same interventions, so the difference is taken per sample and the
        samples are resampled together. ``higher`` is True where the interval lies above 0,
        ``lower`` where it lies below; elsewhere the data do not say which lens is higher.

        Returns:
            A DataFrame with ``layer``, ``difference``, ``ci_low``, ``ci_high``, ``higher``,
            ``lower``.
        """
        import pandas as pd

        ia, ib = (self._lens_index(x) for x in (a, b))
        diff = (self.alignment[ia] - self.alignment[ib]).double().numpy()
        lo, hi = bootstrap_mean_ci(diff, n_boot=n_boot, level=level, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(diff, -1)
        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "difference": mean,
                "ci_low": lo,
                "ci_high": hi,
                "higher": lo > 0,
                "lower": hi < 0,
            }
        )

    def _lens_index(self, x: int | str) -> int:
        if isinstance(x, str):
            if x not in self.lens_names:
                raise ValueError(f"No lens named {x!r}; this result has {list(self.lens_names)}.")
            return self.lens_names.index(x)
        if not -len(self.lens_names) <= x < len(self.lens_names):
            raise ValueError(f"Lens index {x} is out of range for {len(self.lens_names)} lenses.")
        return int(x) % len(self.lens_names)

    def to_dataframe(self, *, level: float = 0.95, n_boot: int = 2000, seed: int = 0):
        """One row per (lens, layer): mean alignment, spread, sample count, bootstrap interval."""
        import pandas as pd

        lo, hi = self.confidence_intervals(level=level, n_boot=n_boot, seed=seed)
        rows = []
        for li, name in enumerate(self.lens_names):
            for ki, layer in enumerate(self.layers):
                a = self.alignment[li, ki]
                rows.append(
                    {
                        "lens": name,
                        "layer": layer,
                        "mean_alignment": float(a.nanmean()),
                        "std": float(a[~a.isnan()].std())
                        if (~a.isnan()).sum() > 1
                        else float("nan"),
                        "n_samples": int((~a.isnan()).sum()),
                        "ci_low": float(lo[li, ki]),
                        "ci_high": float(hi[li, ki]),
                    }
                )
        return pd.DataFrame(rows)


@renamed_arguments(old_positional=("model", "lens", "tokens", "layer"))
def stimulus_response_alignment(
    model: Any,
    tokens: TextOrTokens | None = None,
    *,
    lens: Any,
    layer: int | Sequence[int] | None = None,
    n_samples: int = 32,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
    donors: str = "same_position",
) -> StimulusResponseResult:
    """Stimulus-response alignment of one or several lenses at each layer.

    Args:
        model: A TransformerLens model.
        tokens: Text or token ids ``[batch pos]``.
        lens: A lens, or a sequence of lenses compared on the same interventions (e.g.
            ``["logit", tuned_lens]``).
        layer: Residual index or indices in 0..n_layers-1 (default all).
        n_samples: Treated positions per layer (drawn once, seeded; the same for every layer).
        seed: Seed of the positions and donors.
        batch_size: Treated sequences per forward pass.
        progress: Show a tqdm bar over layers.
        donors: ``"same_position"`` (default, the reference's: the donor is the treated position in
            another sequence, and position 0 is left out; needs at least 2 sequences of at least 2
            tokens) or ``"any"`` (any other (sequence, position), position 0 included).

    The old order ``stimulus_response_alignment(model, lens, tokens, layer)`` still works for one
    release, with a ``DeprecationWarning``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> toks = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
        >>> res = stimulus_response_alignment(
        ...     model, toks, lens="logit", n_samples=4, progress=False
        ... )
        >>> tuple(res.alignment.shape), bool((res.alignment.abs() <= 1 + 1e-5).all())
        ((1, 2, 4), True)
    """
    from tqdm.auto import tqdm

    if tokens is None:
        raise ValueError("Pass the text or tokens to intervene on.")
    resolved = resolve_input(model, tokens)
    model, toks = resolved.model, resolved.tokens
    lenses = [resolve_lens(x) for x in (lens if isinstance(lens, (list, tuple)) else [lens])]
    for ln in lenses:
        ln.check_model(model)
    n_layers = int(model.cfg.n_layers)
    layers = check_layers([layer] if isinstance(layer, int) else layer, n_layers, "lens layer")
    batch, n_pos = toks.shape
    n_rows = batch * n_pos
    if donors not in DONOR_MODES:
        raise ValueError(f"donors must be one of {DONOR_MODES}, got {donors!r}.")
    if n_samples < 1:
        raise ValueError(f"n_samples must be positive, got {n_samples}.")
    g = torch.Generator().manual_seed(seed)
    treated = _treated_rows(batch, n_pos, donors, n_samples, g)
    m = len(treated)

    needed = sorted(set(layers) | {max(x - 1, 0) for x in layers})
    cap = capture(model, toks, sites=("resid",), layers=needed, return_logits=True)
    row = {x: i for i, x in enumerate(needed)}
    resid = cap["resid"].float().reshape(len(needed), n_rows, -1)
    final = cap.logits.float().reshape(n_rows, -1)
    readout = Readout.for_model(model)
    t_b, t_p = treated // n_pos, treated % n_pos

    out = torch.full((len(lenses), len(layers), m), torch.nan)
    donor_idx = torch.empty(len(layers), m, 2, dtype=torch.long)
    for ki, lay in enumerate(
        tqdm(layers, desc="stimulus-response", disable=not progress, unit="layer")
    ):
        if donors == "any":
            offs = torch.randint(1, n_rows, (m,), generator=g)
            donor_rows = (treated + offs) % n_rows  # never the treated row itself
        else:  # the same position of another sequence
            other = (t_b + torch.randint(1, batch, (m,), generator=g)) % batch
            donor_rows = other * n_pos + t_p
        donor_idx[ki] = torch.stack([donor_rows // n_pos, donor_rows % n_pos], -1)
        h = resid[row[lay]]
        update = h if lay == 0 else h - resid[row[lay - 1]]
        h_treated = h[treated] + update[donor_rows] - update[treated]
        response_logits = _patched_logits(
            model, toks, residual_hook(lay), t_b, t_p, h_treated, batch_size
        )
        clean = final[treated]
        response = torch.log_softmax(response_logits - clean, -1)
        weights = 0.5 * (torch.softmax(clean, -1) + torch.softmax(response_logits, -1))
        with torch.no_grad():
            for li, ln in enumerate(lenses):
                stim = lens_logits(ln, readout, h_treated, lay, n_layers) - lens_logits(
                    ln, readout, h[treated], lay, n_layers
                )
                out[li, ki] = aitchison_similarity(torch.log_softmax(stim, -1), response, weights)
    return StimulusResponseResult(
        alignment=out,
        layers=tuple(layers),
        lens_names=tuple(ln.name for ln in lenses),
        positions=torch.stack([t_b, t_p], -1),
        donors=donor_idx,
        provenance=Provenance.from_model(
            model,
            lens=",".join(ln.name for ln in lenses),
            n_samples=m,
            seed=seed,
            donors=donors,
            intervention="resample one residual update",
        ),
        donor_mode=donors,
    )


def _treated_rows(
    batch: int, n_pos: int, donors: str, n_samples: int, g: torch.Generator
) -> torch.Tensor:
    """Up to ``n_samples`` flat (sequence, position) rows to treat, drawn with ``g``."""
    n_rows = batch * n_pos
    if donors == "any":
        if n_rows < 2:
            raise ValueError(
                "Resampling a residual update needs at least 2 token positions (a donor)."
            )
        candidates = torch.arange(n_rows)
    else:
        if batch < 2 or n_pos < 2:
            raise ValueError(
                "Same-position donors need at least 2 sequences of at least 2 tokens, got "
                f"{batch} of {n_pos}; pass a batch of texts or corpus windows, or donors='any'."
            )
        # position 0 left out
        candidates = torch.arange(n_rows).reshape(batch, n_pos)[:, 1:].reshape(-1)
    return candidates[
        torch.randperm(len(candidates), generator=g)[: min(n_samples, len(candidates))]
    ]


def _patched_logits(
    model: Any,
    toks: torch.Tensor,
    name: str,
    t_b: torch.Tensor,
    t_p: torch.Tensor,
    h_treated: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """``[m d_vocab]`` final logits at each treated position with its residual set at ``name``."""
    m = len(t_b)
    response_logits = None
    for lo in range(0, m, batch_size):
        sl = slice(lo, min(lo + batch_size, m))
        rows_b, rows_p, new = t_b[sl], t_p[sl], h_treated[sl]

        def patch(act, hook, rows_p=rows_p, new=new):
            act = act.clone()
            act[torch.arange(act.shape[0]), rows_p] = new.to(act.dtype)
            return act

        with torch.inference_mode():
            logits = model.run_with_hooks(toks[rows_b], fwd_hooks=[(name, patch)])
        if response_logits is None:
            response_logits = torch.empty(m, logits.shape[-1])
        response_logits[sl] = logits[torch.arange(len(rows_b)), rows_p].float()
    assert response_logits is not None  # m >= 1 (n_samples >= 1 and candidates exist)
    return response_logits
