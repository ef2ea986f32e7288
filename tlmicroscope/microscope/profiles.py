"""Layer profiles of anisotropy and intrinsic dimension over a corpus.

They are LLM-Microscope's notebook plots.

The estimators are the geometry module's: ``tlmicroscope.geometry.anisotropy`` (λ_max/Σλ of the
centred covariance) and ``tlmicroscope.geometry.intrinsic_dimension`` with the LLM-Microscope
TwoNN variant (fit on the smallest 20 % of r2/r1; duplicates kept in the CDF's ranks). This module
only gathers the residual states h^0..h^L of corpus tokens in one streamed pass and applies them
per layer. The reference uses about 14k tokens for anisotropy and the first 4,096 for ID.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from tqdm.auto import tqdm

from tlmicroscope.corpus import CorpusSource
from tlmicroscope.geometry.anisotropy import anisotropy
from tlmicroscope.geometry.intrinsic_dimension import intrinsic_dimension
from tlmicroscope.inputs import check_layers, ensure_eval
from tlmicroscope.lenses import layer_label
from tlmicroscope.microscope._forward import corpus_windows, stream_residual
from tlmicroscope.results import Provenance

__all__ = ["LayerProfiles", "layer_profiles"]


@dataclass(frozen=True)
class LayerProfiles:
    """Anisotropy and intrinsic dimension of the corpus token cloud at each residual state.

    Attributes:
        layers, layer_labels: Residual indices (0 = embeddings, n_layers = last ``resid_post``).
        anisotropy: λ_max/Σλ per layer, on ``n_tokens`` tokens.
        intrinsic_dimension: LLM-Microscope TwoNN per layer, on the first ``id_points`` tokens (NaN,
            with a warning, where too few distinct points remain, as in an embedding layer of
            repeated tokens).
    """

    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    anisotropy: Float[torch.Tensor, " layer"]
    intrinsic_dimension: Float[torch.Tensor, " layer"]
    n_tokens: int
    id_points: int
    provenance: Provenance

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": self.layers,
                "label": self.layer_labels,
                "anisotropy": self.anisotropy.tolist(),
                "intrinsic_dimension": self.intrinsic_dimension.tolist(),
            }
        )


def layer_profiles(
    model: Any,
    corpus: CorpusSource | torch.Tensor = None,
    *,
    layers: Sequence[int] | None = None,
    n_tokens: int = 8192,
    id_points: int = 4096,
    seq_len: int = 256,
    batch_size: int = 8,
    skip_positions: int = 0,
    reduction_factor: int = 5,
    seed: int = 0,
    progress: bool = True,
) -> LayerProfiles:
    """Anisotropy and LLM-Microscope intrinsic dimension of every residual state over a corpus.

    Args:
        layers: Residual indices in 0..n_layers (default all).
        n_tokens: Corpus tokens pooled for anisotropy (held in memory, ``len(layers)·n_tokens·d``
            floats).
        id_points: The first tokens used for the intrinsic dimension (the reference uses 4,096).
        skip_positions: Drop the first positions of each window (attention-sink tokens dominate
            the top principal axis; the reference keeps them).
        reduction_factor: The microscope TwoNN fits the smallest ``n // reduction_factor`` ratios.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> text = (
        ...     "The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS! "
        ...     "0123456789 "
        ... ) * 6
        >>> prof = layer_profiles(tiny_model(n_layers=2), [text], n_tokens=256, id_points=128,
        ...                       seq_len=64, progress=False)
        >>> prof.layer_labels, bool(((prof.anisotropy > 0) & (prof.anisotropy <= 1)).all())
        (('h0', 'h1', 'h2'), True)
    """
    ensure_eval(model)
    n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    states = check_layers(layers, n_layers + 1, "residual layer")
    windows = corpus_windows(
        model,
        corpus,
        n_tokens=n_tokens + skip_positions * (n_tokens // seq_len + 1),
        seq_len=seq_len,
        seed=seed,
        what="layer_profiles",
        min_tokens=3,
    )
    if skip_positions >= windows.shape[1]:
        raise ValueError(
            f"skip_positions={skip_positions} drops every position of "
            f"{windows.shape[1]}-token windows."
        )
    held: dict[int, list[torch.Tensor]] = {s: [] for s in states}
    stream_residual(
        model,
        windows,
        lambda layer, h: held[layer].append(
            h[:, skip_positions:].reshape(-1, d).to("cpu", torch.float32).clone()
        ),
        layers=states,
        batch_size=batch_size,
        progress=progress,
        desc="layer profiles",
    )
    aniso, ids = [], []
    n_used = 0
    for s in tqdm(states, desc="anisotropy and ID", disable=not progress, leave=False):
        cloud = torch.cat(held.pop(s))[:n_tokens]
        n_used = cloud.shape[0]
        aniso.append(anisotropy(cloud).estimate)
        try:
            ids.append(
                float(
                    intrinsic_dimension(
                        cloud[:id_points],
                        "twonn",
                        variant="microscope",
                        reduction_factor=reduction_factor,
                    ).estimate
                )
            )
        except (
            ValueError
        ) as exc:  # e.g. the embedding layer of a short corpus: mostly repeated tokens
            warnings.warn(f"No intrinsic dimension at layer {s}: {exc}", UserWarning, stacklevel=2)
            ids.append(float("nan"))
    prov = Provenance.from_model(
        model,
        n_tokens=n_used,
        id_points=min(id_points, n_used),
        seq_len=int(windows.shape[1]),
        skip_positions=skip_positions,
        id_estimator="twonn (LLM-Microscope variant)",
        reduction_factor=reduction_factor,
        seed=seed,
    )
    return LayerProfiles(
        layers=tuple(states),
        layer_labels=tuple(layer_label(s, n_layers) for s in states),
        anisotropy=torch.tensor(aniso, dtype=torch.float64),
        intrinsic_dimension=torch.tensor(ids, dtype=torch.float64),
        n_tokens=n_used,
        id_points=min(id_points, n_used),
        provenance=prov,
    )
