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

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

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

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``, kind
    ``"injection-detector"``): ``fit(model, items)`` builds few-shot prompts from multiple-choice
    items (default: the shipped task set), reads their answer log-likelihoods at every layer
    through ``lens`` (``injection_features``) and fits on them; ``fit(X_clean)`` fits on features
    you computed. ``save()`` puts a model-fitted detector in the artifact store, and
    ``prompt_features`` turns new prompts into the rows ``score`` takes.

    Args:
        method: ``"lof"`` (``LocalOutlierFactor(novelty=True)``, the reference's default) or
            ``"isolation_forest"``.
        n_neighbors: LOF neighbourhood size (capped at the number of training prompts - 1).
        n_estimators: Trees of the isolation forest.
        standardize: Scale each feature to zero mean and unit variance on the training set first.
        random_state: Seed of the isolation forest (``fit(..., seed=)`` sets it).
        lens: The lens whose trajectories are the features when fitting on a model (a name;
            ``fit(..., lens=obj)`` passes a lens object).
        n_items: Clean prompts drawn from the items when fitting on a model.
        n_shots: Solved examples in each prompt.
        choice_order: ``"model"`` or ``"given"`` (see ``injection.order_choices``).
        batch_size: Prompts per forward pass.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> det = InjectionDetector().fit(rng.normal(size=(60, 4)))
        >>> scores = det.score(np.vstack([rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) + 6]))
        >>> bool(scores[5:].min() > scores[:5].max())
        True
    """

    kind: ClassVar[str] = "injection-detector"
    _KIND = "injection_detector"
    #: Settings ``fit(..., quick=True)`` uses.
    QUICK: ClassVar[dict[str, Any]] = {"n_items": 40, "n_shots": 1}

    def __init__(
        self,
        method: Literal["lof", "isolation_forest"] = "lof",
        *,
        n_neighbors: int = 20,
        n_estimators: int = 200,
        standardize: bool = True,
        random_state: int = 0,
        lens: str = "logit",
        n_items: int = 200,
        n_shots: int = 3,
        choice_order: str = "model",
        batch_size: int = 8,
    ):
        if method not in ("lof", "isolation_forest"):
            raise ValueError(f"method must be 'lof' or 'isolation_forest', got {method!r}.")
        self.method = method
        self.n_neighbors = int(n_neighbors)
        self.n_estimators = int(n_estimators)
        self.standardize = bool(standardize)
        self.random_state = int(random_state)
        self.lens = str(lens)
        self.n_items = int(n_items)
        self.n_shots = int(n_shots)
        self.choice_order = choice_order
        self.batch_size = int(batch_size)
        self.quick = False
        self.model_: dict[str, Any] | None = None

    def get_params(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_neighbors": self.n_neighbors,
            "n_estimators": self.n_estimators,
            "standardize": self.standardize,
            "random_state": self.random_state,
            "lens": self.lens,
            "n_items": self.n_items,
            "n_shots": self.n_shots,
            "choice_order": self.choice_order,
            "batch_size": self.batch_size,
        }

    def fit(
        self,
        X_clean: Any,
        corpus: Any = None,
        *,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
        lens: Any = None,
    ) -> InjectionDetector:
        """Fit on clean prompts' features ``[n_prompts ...]`` (flattened per prompt), or, when
        ``X_clean`` is a model, on the features of clean few-shot prompts built from ``corpus``
        (multiple-choice items; default: the shipped task set).

        ``batch_size`` (prompts per forward pass) and ``seed`` override the settings (``seed`` is
        ``random_state`` and the item sample's seed; the count here is ``n_items``, prompts, not
        tokens); ``quick=True`` applies ``QUICK`` first and records the fit as quick.
        """
        self.quick = bool(quick)
        if seed is not None:
            self.random_state = int(seed)
        if batch_size is not None:
            self.batch_size = int(batch_size)
        if not hasattr(X_clean, "cfg"):
            self.model_ = None
            return self._fit_features(X_clean)
        from tlmicroscope.io import model_fingerprint

        if quick:
            for name, value in self.QUICK.items():
                setattr(self, name, value)
        lens_obj = lens if lens is not None else self.lens
        features = self._model_features(X_clean, corpus, lens_obj, progress)
        self.lens = str(getattr(lens_obj, "name", lens_obj))
        self._fit_features(features)
        self.model_ = model_fingerprint(X_clean)
        return self

    def _model_features(self, model: Any, items: Any, lens: Any, progress: bool) -> np.ndarray:
        import random

        from tlmicroscope.causal.injection import injection_prompts
        from tlmicroscope.tasks import continuations, load_tasks

        pool = list(items) if items is not None else load_tasks()
        if not pool:
            raise ValueError("No multiple-choice items to build clean prompts from.")
        n_choices = len(pool[0].choices)
        pool = [it for it in pool if len(it.choices) == n_choices]  # one feature width
        chosen = pool
        if self.n_items < len(pool):
            chosen = random.Random(self.random_state).sample(pool, self.n_items)
        prompts = injection_prompts(chosen, n_shots=self.n_shots, seed=self.random_state, pool=pool)
        conts = [continuations(it) for it in chosen]
        return self.prompt_features(model, prompts.clean, conts, lens=lens, progress=progress)

    def prompt_features(
        self,
        model: Any,
        prompts: Sequence[str],
        choices: Sequence[Sequence[str]],
        *,
        lens: Any = None,
        progress: bool = False,
    ) -> np.ndarray:
        """The rows this detector scores: each prompt's answer log-likelihoods at every layer,
        through ``lens`` (default: the detector's), choices in ``choice_order``, flattened.

        Examples:
            >>> from tlmicroscope.models import tiny_model
            >>> det = InjectionDetector()
            >>> X = det.prompt_features(tiny_model(n_layers=2), ["Q: 1+1? A:"], [[" 2", " 3"]])
            >>> X.shape  # one prompt, (2 layers + the output) x 2 choices
            (1, 6)
        """
        from tlmicroscope.causal.injection import injection_features, order_choices
        from tlmicroscope.lenses.base import resolve_lens

        ln = resolve_lens(lens if lens is not None else self.lens)
        feats = injection_features(
            model,
            prompts,
            choices=choices,
            lenses=[ln],
            batch_size=self.batch_size,
            progress=progress,
        )
        ll = order_choices(feats.loglik[ln.name], self.choice_order)
        return ll.reshape(len(prompts), -1).numpy()

    def _fit_features(self, X_clean: Any) -> InjectionDetector:
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
                "This InjectionDetector is not fitted yet; call fit(clean_features) or "
                "fit(model) first."
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

    def save(self, path: str | Path | None = None, model: Any = None) -> Path:
        """Save the settings and training features (safetensors + JSON, atomically), tied to the
        model it was fitted on (or ``model``); ``path=None`` saves to the artifact store."""
        from tlmicroscope.artifacts import save_path
        from tlmicroscope.io import model_fingerprint, save_fitted

        self._check_fitted()
        fp = model_fingerprint(model) if model is not None else self.model_
        return save_fitted(
            save_path(self.kind, path, fp),
            {"train_features": torch.from_numpy(self.train_features_)},
            kind=self._KIND,
            config={**self.get_params(), "quick": bool(self.quick)},
            fingerprint=fp,
        )

    @classmethod
    def load(cls, path: str | Path | None = None, model: Any = None) -> InjectionDetector:
        """Load and refit (exactly reproducing the saved detector); refuses another model's.
        ``path=None`` reads the artifact store's detector for ``model``."""
        from tlmicroscope.artifacts import load_path
        from tlmicroscope.io import FittedFileError, config_bool, load_fitted

        path = load_path(cls.kind, path, model)
        tensors, meta = load_fitted(path, kind=cls._KIND, model=model)
        if "train_features" not in tensors:
            raise FittedFileError(f"{path} lacks the training features; the file is corrupt.")
        cfg = dict(meta["config"])
        quick = config_bool(cfg, "quick", path, default=False)
        cfg.pop("quick", None)
        det = cls(**cfg)._fit_features(tensors["train_features"])
        det.quick, det.model_ = quick, meta.get("model")
        return det


class MahalanobisDetector:
    """Hidden-state baseline: per-layer Ledoit-Wolf Mahalanobis distance, standardised, averaged.

    Args:
        layers: Which layers (indices into the second axis of the hidden states) to use;
            default all.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> det = MahalanobisDetector().fit(rng.normal(size=(80, 2, 5)))
        >>> clean, odd = rng.normal(size=(4, 2, 5)), rng.normal(size=(4, 2, 5)) + 4
        >>> s = det.score(np.concatenate([clean, odd]))
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
