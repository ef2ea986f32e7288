"""``component_separation``: how well attention and MLP outputs separate, layer by layer, as
numbers.

Ning and Rangaraju show that the attention and MLP outputs of the intermediate blocks occupy
different regions of PCA and UMAP plots, but give no number. Here each block gets two:

* the cross-validated accuracy of a linear classifier (standardised features, logistic
  regression, stratified k-fold) telling the block's attention outputs from its MLP outputs:
  1.0 means linearly separable, 0.5 (balanced classes) means indistinguishable;
* the silhouette score of the two groups (cosine distance by default): near 1 for tight,
  distant clouds, near 0 for overlapping ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.geometry.components import ComponentStates, capture_components, unit_length
from tlmicroscope.inputs import TextOrTokens
from tlmicroscope.results import Provenance

__all__ = ["SeparationResult", "component_separation"]


@dataclass(frozen=True)
class SeparationResult:
    """Per-block separability of two components' outputs.

    Attributes:
        layers: Blocks scored.
        accuracy: Mean cross-validated accuracy per block (chance is ``chance``).
        accuracy_std: Its standard deviation over folds.
        silhouette: Silhouette score of the two groups per block, in [-1, 1].
        n_points: Vectors per component used per block.
        components: The two components compared.
        chance: Accuracy of always guessing the larger class (0.5 when balanced).
        provenance: Model and settings (folds, metric, preprocessing).
    """

    layers: tuple[int, ...]
    accuracy: Float[torch.Tensor, " layer"]
    accuracy_std: Float[torch.Tensor, " layer"]
    silhouette: Float[torch.Tensor, " layer"]
    n_points: Int[torch.Tensor, " layer"]
    components: tuple[str, str]
    chance: float
    provenance: Provenance | None = None

    def to_dataframe(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "layer": list(self.layers),
                "accuracy": self.accuracy.numpy(),
                "accuracy_std": self.accuracy_std.numpy(),
                "silhouette": self.silhouette.numpy(),
                "n_points": self.n_points.numpy(),
            }
        )

    def most_separated(self) -> int:
        """The block with the highest accuracy (ties: the highest silhouette)."""
        key = self.accuracy.double() * 10 + self.silhouette.double()
        return self.layers[int(torch.argmax(key))]


def _score_layer(
    a: np.ndarray, b: np.ndarray, n_folds: int, metric: str, silhouette_size: int, seed: int
) -> tuple[float, float, float]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([a, b]).astype(np.float64)
    y = np.concatenate([np.zeros(len(a), dtype=int), np.ones(len(b), dtype=int)])
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    scores = cross_val_score(clf, x, y, cv=folds)
    if metric == "cosine" and (np.linalg.norm(x, axis=1) == 0).any():
        raise ValueError(
            "A vector is all zeros, so its cosine distance is undefined; use metric='euclidean'."
        )
    sil = silhouette_score(
        x, y, metric=metric, sample_size=min(silhouette_size, len(x)), random_state=seed
    )
    return float(scores.mean()), float(scores.std()), float(sil)


def _top_components(a: np.ndarray, b: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    both = np.concatenate([a, b]).astype(np.float64)
    if not 1 <= k <= min(both.shape):
        raise ValueError(f"n_pca must lie in [1, {min(both.shape)}], got {k}.")
    centred = both - both.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    z = centred @ vt[:k].T
    return z[: len(a)], z[len(a) :]


def _layer_vectors(states: ComponentStates, i: int, unit: bool) -> np.ndarray:
    """State ``i``'s vectors as ``[n d_model]`` float32 rows, unit length if asked."""
    v = states.activations[i].reshape(-1, states.d_model).float()
    return (unit_length(v) if unit else v).numpy()


def _sample_pair(
    pair: list[np.ndarray],
    layer: int,
    components: tuple[str, str],
    n_folds: int,
    max_points: int,
    n_pca: int | None,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """The same number of rows (at most ``max_points``) from each component, checked."""
    n = min(len(pair[0]), len(pair[1]))
    if n < n_folds:
        raise ValueError(
            f"Block {layer} has {n} vectors per component, fewer than n_folds={n_folds}. "
            "Capture more positions or windows, or lower n_folds."
        )
    take = min(n, max_points)
    pick = [rng.choice(len(p), size=take, replace=False) for p in pair]
    a, b = pair[0][pick[0]], pair[1][pick[1]]
    if n_pca is not None:
        a, b = _top_components(a, b, n_pca)
    if np.ptp(np.concatenate([a, b]), axis=0).max() == 0:
        raise ValueError(f"Block {layer}'s {components} outputs are constant: nothing to separate.")
    return a, b


def component_separation(
    model_or_states: Any,
    tokens: TextOrTokens | None = None,
    *,
    components: tuple[str, str] = ("attn_out", "mlp_out"),
    layers: Sequence[int] | None = None,
    drop_first: bool = True,
    unit: bool = False,
    max_points: int = 1000,
    n_folds: int = 5,
    metric: str = "cosine",
    silhouette_size: int = 2000,
    n_pca: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> SeparationResult:
    """Per block, the linear separability and silhouette of two components' outputs.

    Args:
        model_or_states: A model (or ``ActivationCache``) with ``tokens``, or a ``ComponentStates``
            holding both components for the blocks to score.
        tokens: Text or ``[batch pos]`` windows (with a model).
        components: The two components to compare (default attention vs MLP outputs).
        layers: Blocks to score (default all captured).
        drop_first: Leave out position 0 (the reference does; its norm spike is an outlier).
        unit: Scale vectors to unit length first (the reference's second PCA variant).
        max_points: At most this many vectors per component and block (a random draw).
        n_folds: Cross-validation folds.
        metric: Silhouette distance, ``"cosine"`` (as the reference's UMAP) or ``"euclidean"``.
        silhouette_size: Points drawn for the silhouette (it is quadratic in the points).
        n_pca: Score in each block's top ``n_pca`` principal components (fitted with centring on
            both components' vectors of that block) instead of the full space: ``n_pca=2`` asks
            whether the separation shows in a 2-D PCA picture like the paper's.

    Raises:
        ValueError: fewer vectors than folds, a component missing from the states, or a
            constant layer.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> res = component_separation(tiny_model(n_layers=2), "hello there, general", n_folds=2)
        >>> res.layers, res.accuracy.shape
        ((0, 1), torch.Size([2]))
    """
    if len(components) != 2 or components[0] == components[1]:
        raise ValueError(f"components must name two different components, got {components}.")
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}.")
    if metric not in ("cosine", "euclidean"):
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}.")
    if isinstance(model_or_states, ComponentStates):
        states = model_or_states
        if layers is not None:
            states = states.select(layers=layers)
        if drop_first and states.positions is not None and bool((states.positions == 0).any()):
            states = states.drop_first()
    else:
        states = capture_components(
            model_or_states,
            tokens,
            components=components,
            layers=layers,
            drop_first=drop_first,
            batch_size=batch_size,
            progress=progress,
        )
    rng = np.random.default_rng(seed)
    index = {(c, lay): i for i, (c, lay) in enumerate(zip(states.components, states.layers))}
    score_layers = sorted(
        {
            lay
            for c, lay in index
            if c == components[0] and (components[1], lay) in index and lay is not None
        }
    )
    if not score_layers:
        raise ValueError(
            f"The states hold no block with both {components[0]!r} and {components[1]!r}; capture "
            f"them with capture_components(..., components={components})."
        )
    acc, acc_std, sil, counts = [], [], [], []
    for layer in score_layers:
        pair = [_layer_vectors(states, index[(comp, layer)], unit) for comp in components]
        a, b = _sample_pair(pair, layer, components, n_folds, max_points, n_pca, rng)
        take = len(a)
        m, s, h = _score_layer(a, b, n_folds, metric, silhouette_size, seed)
        acc.append(m)
        acc_std.append(s)
        sil.append(h)
        counts.append(take)
    prov = states.provenance or Provenance(
        model="unknown", model_class="", weights_processed=False, transformer_lens=""
    )
    return SeparationResult(
        layers=tuple(score_layers),
        accuracy=torch.tensor(acc),
        accuracy_std=torch.tensor(acc_std),
        silhouette=torch.tensor(sil),
        n_points=torch.tensor(counts),
        components=(components[0], components[1]),
        chance=0.5,
        provenance=prov.with_settings(
            separation=dict(
                classifier="standardised logistic regression",
                n_folds=n_folds,
                metric=metric,
                unit=unit,
                drop_first=drop_first,
                max_points=max_points,
                n_pca=n_pca,
                seed=seed,
            )
        ),
    )
