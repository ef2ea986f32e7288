"""Unsupervised anomaly detectors fitted on clean prompts only (scikit-learn under the hood).

``InjectionDetector`` scores lens features (per-layer answer log-likelihoods) with a
LocalOutlierFactor (novelty mode) or an IsolationForest; ``MahalanobisDetector`` is the
hidden-state baseline: a Ledoit-Wolf Gaussian per layer, the distances standardised on the clean
training set and averaged over layers. Both follow scikit-learn's contract (settings in
``__init__``, state from ``fit``) and save to safetensors + JSON; the saved training features are
refitted on load, which reproduces the fitted detector exactly (both estimators are
deterministic given their ``random_state``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

__all__ = ["InjectionDetector", "MahalanobisDetector"]


def _as_2d(X: Any, what: str) -> np.ndarray:
    arr = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    arr = arr.reshape(arr.shape[0], -1).astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(
            f"The {what} hold NaN or infinite values; the detector needs finite features."
        )
    return arr


class InjectionDetector:
    """An anomaly detector for prompt features, fitted on clean prompts only.

    Args:
        method: ``"lof"`` (``LocalOutlierFactor(novelty=True)``, the reference's default) or
            ``"isolation_forest"``.
        n_neighbors: LOF neighbourhood size (capped at the number of training prompts - 1).
        n_estimators: Trees of the isolation forest.
        standardize: Scale each feature to zero mean and unit variance on the training set first.
        random_state: Seed of the isolation forest.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> det = InjectionDetector().fit(rng.normal(size=(60, 4)))
        >>> scores = det.score(np.vstack([rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) + 6]))
        >>> bool(scores[5:].min() > scores[:5].max())
        True
    """

    _KIND = "injection_detector"

    def __init__(
        self,
        method: Literal["lof", "isolation_forest"] = "lof",
        *,
        n_neighbors: int = 20,
        n_estimators: int = 200,
        standardize: bool = True,
        random_state: int = 0,
    ):
        if method not in ("lof", "isolation_forest"):
            raise ValueError(f"method must be 'lof' or 'isolation_forest', got {method!r}.")
        self.method = method
        self.n_neighbors = int(n_neighbors)
        self.n_estimators = int(n_estimators)
        self.standardize = bool(standardize)
        self.random_state = int(random_state)

    def get_params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_neighbors": self.n_neighbors,
            "n_estimators": self.n_estimators,
            "standardize": self.standardize,
            "random_state": self.random_state,
        }

    def fit(self, X_clean: Any) -> InjectionDetector:
        """Fit on clean prompts' features ``[n_prompts ...]`` (flattened per prompt)."""
        from sklearn.ensemble import IsolationForest
        from sklearn.neighbors import LocalOutlierFactor

        X = _as_2d(X_clean, "training features")
        if X.shape[0] < 3:
            raise ValueError(
                f"The detector needs at least 3 clean prompts to fit, got {X.shape[0]}."
            )
        self.train_features_ = X
        self.mean_ = X.mean(0) if self.standardize else np.zeros(X.shape[1])
        std = X.std(0) if self.standardize else np.ones(X.shape[1])
        self.scale_ = np.where(std > 1e-12, std, 1.0)
        Z = (X - self.mean_) / self.scale_
        if self.method == "lof":
            self.estimator_ = LocalOutlierFactor(
                n_neighbors=min(self.n_neighbors, X.shape[0] - 1), novelty=True
            )
        else:
            self.estimator_ = IsolationForest(
                n_estimators=self.n_estimators, random_state=self.random_state
            )
        self.estimator_.fit(Z)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "estimator_"):
            raise ValueError(
                "This InjectionDetector is not fitted yet; call fit(clean_features) first."
            )

    def score(self, X: Any) -> np.ndarray:
        """Anomaly scores, higher = more unusual than the clean training prompts."""
        self._check_fitted()
        Z = _as_2d(X, "features")
        if Z.shape[1] != self.train_features_.shape[1]:
            raise ValueError(
                f"Expected {self.train_features_.shape[1]} features per prompt, got {Z.shape[1]}."
            )
        return -self.estimator_.score_samples((Z - self.mean_) / self.scale_)

    def predict(self, X: Any) -> np.ndarray:
        """True where a prompt looks injected (the estimator's own outlier threshold)."""
        self._check_fitted()
        Z = (_as_2d(X, "features") - self.mean_) / self.scale_
        return self.estimator_.predict(Z) == -1

    def save(self, path: str | Path, model: Any = None) -> Path:
        """Save the settings and training features (safetensors + JSON, atomically)."""
        from tlmicroscope.io import save_fitted

        self._check_fitted()
        return save_fitted(
            path,
            {"train_features": torch.from_numpy(self.train_features_)},
            kind=self._KIND,
            config=self.get_params(),
            model=model,
        )

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> InjectionDetector:
        """Load and refit (exactly reproducing the saved detector); refuses another model's."""
        from tlmicroscope.io import FittedFileError, load_fitted

        tensors, meta = load_fitted(path, kind=cls._KIND, model=model)
        if "train_features" not in tensors:
            raise FittedFileError(f"{path} lacks the training features; the file is corrupt.")
        return cls(**meta["config"]).fit(tensors["train_features"])


class MahalanobisDetector:
    """Hidden-state baseline: per-layer Ledoit-Wolf Mahalanobis distance, standardised, averaged.

    Args:
        layers: Which layers (indices into the second axis of the hidden states) to use; default all.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> det = MahalanobisDetector().fit(rng.normal(size=(80, 2, 5)))
        >>> s = det.score(np.concatenate([rng.normal(size=(4, 2, 5)), rng.normal(size=(4, 2, 5)) + 4]))
        >>> bool(s[4:].min() > s[:4].max())
        True
    """

    def __init__(self, layers: Any = None):
        self.layers = layers

    def fit(self, H_clean: Any) -> MahalanobisDetector:
        """Fit on clean hidden states ``[n_prompts layer d_model]``."""
        from sklearn.covariance import LedoitWolf

        H = (
            H_clean.detach().cpu().numpy()
            if isinstance(H_clean, torch.Tensor)
            else np.asarray(H_clean)
        )
        if H.ndim != 3:
            raise ValueError(
                f"Hidden states must be [n_prompts layer d_model], got shape {H.shape}."
            )
        if H.shape[0] < 3:
            raise ValueError(f"The baseline needs at least 3 clean prompts, got {H.shape[0]}.")
        self.layers_ = list(range(H.shape[1])) if self.layers is None else list(self.layers)
        self.models_, self.center_, self.spread_ = [], [], []
        for layer in self.layers_:
            X = H[:, layer].astype(np.float64)
            lw = LedoitWolf().fit(X)
            d = np.sqrt(lw.mahalanobis(X))
            self.models_.append(lw)
            self.center_.append(d.mean())
            self.spread_.append(d.std() if d.std() > 1e-12 else 1.0)
        return self

    def score(self, H: Any) -> np.ndarray:
        """Mean over layers of the standardised distance; higher = more unusual."""
        if not hasattr(self, "models_"):
            raise ValueError(
                "This MahalanobisDetector is not fitted yet; call fit(clean_hidden) first."
            )
        H = H.detach().cpu().numpy() if isinstance(H, torch.Tensor) else np.asarray(H)
        out = np.zeros(H.shape[0])
        for layer, lw, c, s in zip(self.layers_, self.models_, self.center_, self.spread_):
            out += (np.sqrt(lw.mahalanobis(H[:, layer].astype(np.float64))) - c) / s
        return out / len(self.layers_)
