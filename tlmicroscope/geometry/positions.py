"""``positional_geometry``: how positions are laid out in the model's space.

Two cases, and the result says which it did:

* **Learned positions** (GPT-2 and other models with a ``W_pos`` table): PCA of ``W_pos`` and the
  cosine similarity between positions. GPT-2's table is known to lie on a high-dimensional helix:
  each leading principal component is close to a sinusoid of the position, with frequencies rising
  pair by pair. Each component's best-fitting sinusoid (frequency and R²) quantifies that.
* **Rotary (or no) positions** (LLaMA, SmolLM2): there is no table, so it measures what the
  reference measured for LLaMA: the residual stream at each position, averaged over many corpus
  windows and the intermediate blocks, then the same PCA, cosines and sinusoid fits. The reference
  saw a "tail" of early positions leading into a dense cloud of later ones; ``convergence`` (each
  position's cosine to the mean of the last tenth of positions) measures it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float

from tlmicroscope.geometry.components import (
    ComponentStates,
    capture_components,
    default_components,
    intermediate_layers,
    unit_length,
)
from tlmicroscope.geometry.projection import Projection, project
from tlmicroscope.models import access
from tlmicroscope.results import Provenance

__all__ = ["PositionalGeometry", "fit_sinusoid", "positional_geometry"]


@dataclass(frozen=True)
class PositionalGeometry:
    """Geometry of per-position vectors: a PCA, cosines between positions, sinusoid fits.

    Attributes:
        source: ``"W_pos"`` (learned positional embeddings) or ``"mean_residual"`` (the mean
            residual per position over corpus windows, for rotary models).
        description: One sentence saying what was measured.
        vectors: ``[pos d_model]`` the vectors analysed (unit length if ``unit``).
        projection: PCA of ``vectors`` (field ``position``).
        cosine: ``[pos pos]`` cosine similarity between positions.
        pc_frequency: Per component, the frequency of its best sinusoid in cycles over the
            positions.
        pc_sinusoid_r2: Fraction of each component's variance that sinusoid (plus a constant)
            explains.
        convergence: Cosine of each position to the mean of the last tenth of positions.
        layers: Blocks averaged (``mean_residual`` only).
        n_windows: Windows averaged (``mean_residual`` only).
        provenance: Model and settings.
    """

    source: Literal["W_pos", "mean_residual"]
    description: str
    vectors: Float[torch.Tensor, "pos d_model"]
    projection: Projection
    cosine: Float[torch.Tensor, "pos pos"]
    pc_frequency: Float[torch.Tensor, " component"]
    pc_sinusoid_r2: Float[torch.Tensor, " component"]
    convergence: Float[torch.Tensor, " pos"]
    layers: tuple[int, ...] = ()
    n_windows: int = 0
    provenance: Provenance | None = None

    @property
    def is_helix(self) -> bool:
        """True when the first four components are each at least 80% explained by a sinusoid."""
        k = min(4, len(self.pc_sinusoid_r2))
        return bool((self.pc_sinusoid_r2[:k] >= 0.8).all())

    def summary(self) -> str:
        freqs = ", ".join(
            f"PC{i + 1} {float(f):.2f} cycles (R² {float(r):.2f})"
            for i, (f, r) in enumerate(zip(self.pc_frequency, self.pc_sinusoid_r2))
        )
        evr = self.projection.explained_variance_ratio
        var = (
            ""
            if evr is None
            else f"; variance in the first {len(evr)} PCs: {100 * float(evr.sum()):.1f}%"
        )
        return f"{self.description} Sinusoid fits: {freqs}{var}."


def fit_sinusoid(series: Any, *, oversample: int = 8) -> tuple[float, float]:
    """Best single sinusoid (plus a constant) through a series, by least squares over a frequency
    grid.

    Returns:
        ``(frequency, r2)``: frequency in cycles over the series' length (0.5 to length/2), and the
        fraction of the series' variance the fit explains.

    Examples:
        >>> p = np.arange(64)
        >>> f, r2 = fit_sinusoid(np.cos(2 * np.pi * 3 * p / 64 + 0.4))
        >>> round(f, 2), round(r2, 4)
        (3.0, 1.0)
    """
    y = np.asarray(series, dtype=np.float64)
    n = len(y)
    y = y - y.mean()
    total = float(y @ y)
    if n < 4 or total == 0:
        return 0.0, 0.0
    freqs = np.arange(0.5, n / 2 + 1e-9, 1.0 / oversample)
    phase = 2 * np.pi * np.outer(freqs, np.arange(n)) / n
    # Regress on [cos, sin, 1] for every frequency at once: centre the two columns (absorbing the
    # constant), then solve each 2x2 normal system; pinv handles sin = 0 at the Nyquist frequency.
    basis = np.stack([np.cos(phase), np.sin(phase)], 1)  # [freq 2 n]
    basis -= basis.mean(-1, keepdims=True)
    gram = basis @ basis.transpose(0, 2, 1)  # [freq 2 2]
    rhs = basis @ y  # [freq 2]
    coef = np.einsum("fij,fj->fi", np.linalg.pinv(gram), rhs)
    r2 = np.einsum("fi,fi->f", coef, rhs) / total
    best = int(np.argmax(r2))
    return float(freqs[best]), float(np.clip(r2[best], 0.0, 1.0))


def _learned_table(model: Any) -> torch.Tensor | None:
    w = access.positional_embedding_weights(model)
    return None if w is None else w.detach().float().cpu()


def _analyse(
    vectors: torch.Tensor, n_components: int
) -> tuple[Projection, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    n_pos = vectors.shape[0]
    k = min(n_components, n_pos - 1, vectors.shape[1])
    proj = project(vectors, "pca", n_components=k, fields={"position": np.arange(n_pos)})
    unit = unit_length(vectors)
    cosine = unit @ unit.T
    fits = [fit_sinusoid(proj.coords[:, i].numpy()) for i in range(k)]
    tail = unit[-max(1, n_pos // 10) :].mean(0)
    convergence = unit @ unit_length(tail.unsqueeze(0))[0]
    return (
        proj,
        cosine,
        torch.tensor([f for f, _ in fits]),
        torch.tensor([r for _, r in fits]),
        convergence,
    )


def positional_geometry(
    model_or_states: Any,
    tokens: Any = None,
    *,
    n_components: int = 6,
    n_positions: int | None = None,
    corpus: Any = None,
    n_windows: int = 32,
    seq_len: int = 256,
    layers: Sequence[int] | None = None,
    components: Sequence[str] | None = None,
    unit: bool = True,
    batch_size: int = 8,
    progress: bool = True,
) -> PositionalGeometry:
    """PCA of learned positional embeddings, or of the mean residual per position for rotary models.

    Args:
        model_or_states: A model, or (rotary case) a ``ComponentStates`` already captured on
            windows.
        tokens: Rotary case: ``[batch pos]`` windows to average over (default: ``n_windows``
            windows of ``seq_len`` tokens from ``corpus``).
        n_components: Principal components kept (the reference shows 6, in 15 pairwise panels).
        n_positions: Learned case: rows of ``W_pos`` to use (default all ``n_ctx``).
        corpus: Rotary case: corpus source for the windows (default the embedded corpus).
        layers: Rotary case: blocks to average (default ``intermediate_layers``).
        components: Rotary case: the post-add states averaged (default ``resid_mid`` and
            ``resid_post``, the reference's choice; only ``resid_post`` where parallel attention
            and MLP leave no ``resid_mid``).
        unit: Rotary case: unit-length mean vectors, keeping position 0 (the reference's variant).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> geo = positional_geometry(tiny_model("gpt2", n_layers=1))
        >>> geo.source, tuple(geo.cosine.shape)
        ('W_pos', (128, 128))
    """
    model = None if isinstance(model_or_states, ComponentStates) else model_or_states
    table = _learned_table(model) if model is not None else None
    if table is not None:
        if n_positions is not None:
            if not 4 <= n_positions <= table.shape[0]:
                raise ValueError(
                    f"n_positions must lie in [4, {table.shape[0]}], got {n_positions}."
                )
            table = table[:n_positions]
        proj, cos, freq, r2, conv = _analyse(table, n_components)
        description = (
            f"Learned positional embeddings: PCA of W_pos ({table.shape[0]} positions × "
            f"{table.shape[1]} dims)."
        )
        return PositionalGeometry(
            source="W_pos",
            description=description,
            vectors=table,
            projection=proj,
            cosine=cos,
            pc_frequency=freq,
            pc_sinusoid_r2=r2,
            convergence=conv,
            provenance=Provenance.from_model(model, source="W_pos", n_components=n_components),
        )
    if model is not None and components is None:
        components = default_components(model, ("resid_mid", "resid_post"))
    states = (
        model_or_states
        if model is None
        else _capture_windows(
            model, tokens, corpus, n_windows, seq_len, layers, components, batch_size, progress
        )
    )
    if states.positions is None or states.positions.numel() < 4:
        raise ValueError("The mean-residual geometry needs at least 4 positions per window.")
    sel = states.activations.float()
    vectors = sel.mean(dim=(0, 1))  # over states (layers and components) and samples
    if unit:
        vectors = unit_length(vectors)
    proj, cos, freq, r2, conv = _analyse(vectors, n_components)
    n_win = (
        int(states.provenance.settings.get("n_sequences", states.activations.shape[1]))
        if states.provenance is not None
        else int(states.activations.shape[1])
    )
    used_layers = tuple(sorted({lay for lay in states.layers if lay is not None}))
    kind = str(getattr(getattr(model, "cfg", None), "positional_embedding_type", "rotary"))
    description = (
        f"This model has no learned positional table (positional_embedding_type={kind!r}), so this "
        f"is the mean residual stream per position over {n_win} corpus windows and blocks "
        f"{_span(used_layers)} ({'unit-length' if unit else 'raw'} vectors, position 0 kept)."
    )
    return PositionalGeometry(
        source="mean_residual",
        description=description,
        vectors=vectors,
        projection=proj,
        cosine=cos,
        pc_frequency=freq,
        pc_sinusoid_r2=r2,
        convergence=conv,
        layers=used_layers,
        n_windows=n_win,
        provenance=(states.provenance or Provenance("unknown", "", False, "")).with_settings(
            source="mean_residual", unit=unit, n_components=n_components
        ),
    )


def _span(layers: Sequence[int]) -> str:
    if not layers:
        return "(none)"
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ", ".join(map(str, layers))


def _capture_windows(
    model, tokens, corpus, n_windows, seq_len, layers, components, batch_size, progress
) -> ComponentStates:
    if tokens is None:
        from tlmicroscope.corpus import token_windows

        seq_len = min(seq_len, int(model.cfg.n_ctx))
        tokens = token_windows(
            model, corpus, seq_len=seq_len, n_windows=n_windows, shuffle=True, seed=0
        )
    chosen = list(layers) if layers is not None else intermediate_layers(model.cfg.n_layers)
    return capture_components(
        model,
        tokens,
        components=components,
        layers=chosen,
        average="samples",
        batch_size=batch_size,
        progress=progress,
    )
