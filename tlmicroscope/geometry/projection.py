"""``project``: PCA or UMAP of captured activations, reusable across plots.

PCA follows the reference (Vainateya/Feature_Geometry_Visualization): it is *fitted* with centring
but *applied* without it (``X @ components.T``), so the origin of the residual space stays the
origin of the plot. UMAP comes from ``umap-learn`` (the optional ``umap`` extra), with the
reference's cosine metric, 15 neighbours and min_dist 0.1; it is fitted on a random subset and
transforms the rest, as the reference does for large captures.

``LatentPCA`` computes its moments chunk by chunk instead of calling scikit-learn's PCA: that one
needs every vector in one float32 matrix (a copy of a float16 or strided capture), whereas
streaming the mean and scatter matrix keeps memory at one chunk whatever the capture's size. Its
result equals scikit-learn's up to the sign of each component (tested).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from jaxtyping import Float

from tlmicroscope.results import Provenance

__all__ = ["UMAP_DEFAULTS", "UMAP_INSTALL", "LatentPCA", "Projection", "project"]

UMAP_INSTALL = "pip install 'tlmicroscope[umap]'   (or: pip install umap-learn)"
#: The reference's UMAP settings (n_neighbors and min_dist are umap-learn's defaults there).
UMAP_DEFAULTS = {"metric": "cosine", "n_neighbors": 15, "min_dist": 0.1}

_CHUNK = 32768


def _as_2d_float(x: Any, what: str = "activations") -> torch.Tensor:
    """A ``[n d]`` tensor (no copy for a contiguous float tensor)."""
    if hasattr(x, "flat") and hasattr(x, "point_fields"):
        x = x.flat()
    t = torch.as_tensor(x) if not isinstance(x, torch.Tensor) else x.detach()
    if not t.is_floating_point():
        raise TypeError(f"{what} must be floating point, got {t.dtype}.")
    if t.ndim < 2:
        raise ValueError(
            f"{what} must be [..., d_model] with at least two axes, got shape {tuple(t.shape)}."
        )
    return t.reshape(-1, t.shape[-1]).cpu()


def _chunks(x: torch.Tensor, size: int = _CHUNK) -> Iterable[torch.Tensor]:
    for start in range(0, x.shape[0], size):
        yield x[start : start + size].float()


class LatentPCA:
    """PCA fitted with centring and applied without it, from streamed moments.

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``): settings in
    ``__init__``, fitted state (attributes ending in ``_``) from ``fit``. Fit it on activations you
    have (``fit(X)``), or on a model's residual stream h^0..h^L over a corpus
    (``fit(model, corpus)``, e.g. one shared basis for token trajectories); then ``save()`` puts
    it in the artifact store as ``"latent-pca"``. Signs follow scikit-learn's convention (each
    component's largest-magnitude loading is positive).

    Args:
        n_components: Number of components kept.
        center: Subtract the fitted mean in ``transform`` (scikit-learn's behaviour). The
            reference's default, and ours, is ``False``: ``transform(X) = X @ components_.T``.
        n_tokens: Corpus tokens read when fitting on a model (every layer of each is a row).
        seq_len: Window length of those tokens.
        batch_size: Windows per forward pass.
        seed: Which windows are drawn.

    Attributes:
        components_: ``[n_components d_model]``, float32.
        mean_: ``[d_model]``, float64.
        explained_variance_, explained_variance_ratio_: Per component (ratio of the total variance).
        n_samples_seen_: Vectors fitted on.

    Examples:
        >>> x = torch.randn(200, 8) * torch.arange(1.0, 9.0)
        >>> pca = LatentPCA(2).fit(x)
        >>> ratio = pca.explained_variance_ratio_
        >>> pca.components_.shape, bool(ratio[0] > ratio[1])
        (torch.Size([2, 8]), True)
        >>> torch.allclose(pca.transform(x), x @ pca.components_.T)
        True
        >>> from tlmicroscope.models import tiny_model
        >>> pca = LatentPCA(2).fit(tiny_model(n_layers=2), ["some text " * 40], progress=False)
        >>> pca.n_samples_seen_  # h^0, h^1, h^2 of 384 tokens (the 400-token text in windows of 64)
        1152
    """

    kind: ClassVar[str] = "latent-pca"
    #: Settings ``fit(..., quick=True)`` uses (a rough basis in seconds).
    QUICK: ClassVar[dict[str, Any]] = {"n_tokens": 1024}

    def __init__(
        self,
        n_components: int = 2,
        *,
        center: bool = False,
        n_tokens: int = 8192,
        seq_len: int = 64,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        self.n_components = n_components
        self.center = center
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.quick = False
        self.model_: dict[str, Any] | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "n_components": self.n_components,
            "center": self.center,
            "n_tokens": self.n_tokens,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "seed": self.seed,
        }

    def fit(
        self,
        X: Any,
        corpus: Any = None,
        *,
        n_tokens: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
    ) -> LatentPCA:
        """Fit on ``X`` (``[..., d_model]`` tensor or array, or a ``ComponentStates``), or, when
        ``X`` is a model, on its residual stream h^0..h^L over ``corpus`` (default: embedded).

        ``n_tokens``, ``batch_size`` and ``seed`` override the settings of the same names for
        this fit (and are saved); ``quick=True`` takes ``QUICK`` for those not given and records
        the fit as quick.
        """
        self.quick = bool(quick)
        if not hasattr(X, "cfg"):
            self.model_ = None
            return self._fit_rows(_as_2d_float(X))
        from tlmicroscope.io import model_fingerprint

        for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size), ("seed", seed)):
            if value is not None:
                setattr(self, name, value)
            elif quick and name in self.QUICK:
                setattr(self, name, self.QUICK[name])
        self._check_n_components(int(X.cfg.d_model))
        self._fit_model(X, corpus, progress)
        self.model_ = model_fingerprint(X)
        return self

    def _fit_model(self, model: Any, corpus: Any, progress: bool) -> None:
        from tqdm.auto import tqdm

        from tlmicroscope.capture import capture
        from tlmicroscope.corpus import token_windows
        from tlmicroscope.inputs import ensure_eval

        ensure_eval(model)
        seq_len = int(min(self.seq_len, model.cfg.n_ctx))
        windows = token_windows(model, corpus, seq_len=seq_len, shuffle=True, seed=self.seed)
        windows = windows[: max(1, -(-int(self.n_tokens) // seq_len))]
        moments = _Moments(int(model.cfg.d_model))
        dev = model.W_U.device
        for start in tqdm(
            range(0, windows.shape[0], int(self.batch_size)),
            desc="latent PCA",
            unit="batch",
            disable=not progress,
        ):
            batch = windows[start : start + int(self.batch_size)].to(dev)
            resid = capture(model, batch, sites=("resid",), prepend_bos=False)["resid"]
            moments.add(resid.reshape(-1, resid.shape[-1]).detach().float().cpu())
        self._finish(moments)

    def _check_n_components(self, d: int) -> None:
        if not isinstance(self.n_components, int) or self.n_components < 1:
            raise ValueError(f"n_components must be a positive integer, got {self.n_components!r}.")
        if self.n_components > d:
            raise ValueError(
                f"n_components={self.n_components} exceeds the {d} dimensions of the data."
            )

    def _fit_rows(self, x: torch.Tensor) -> LatentPCA:
        n, d = x.shape
        self._check_n_components(d)
        if n < max(2, self.n_components):
            raise ValueError(
                f"PCA with {self.n_components} components needs at least "
                f"{max(2, self.n_components)} vectors, got {n}. Capture more positions or samples "
                "(or average over fewer axes), or ask for fewer components."
            )
        moments = _Moments(d)
        moments.add(x)
        self._finish(moments)
        return self

    def _finish(self, moments: _Moments) -> None:
        count, mean = moments.count, moments.mean
        if count < max(2, self.n_components):
            raise ValueError(
                f"PCA with {self.n_components} components needs at least "
                f"{max(2, self.n_components)} vectors, got {count}."
            )
        cov = moments.scatter / (count - 1)
        total_var = float(torch.trace(cov))
        scale = float(mean.pow(2).sum()) + 1.0
        if not total_var > 1e-12 * scale:
            raise ValueError(
                "The activations are constant (zero variance): every vector is the same, so there "
                "is no direction to project on. Check the capture (e.g. unit length of all-zero "
                "vectors, or averaging over every axis)."
            )
        evals, evecs = torch.linalg.eigh(cov)
        order = torch.argsort(evals, descending=True)[: self.n_components]
        comps = evecs[:, order].T
        signs = torch.sign(comps[torch.arange(comps.shape[0]), comps.abs().argmax(1)])
        comps = comps * torch.where(signs == 0, 1.0, signs).unsqueeze(1).double()
        ev = evals[order].clamp_min(0)
        self.components_ = comps.float()
        self.mean_ = mean
        self.explained_variance_ = ev
        self.explained_variance_ratio_ = ev / total_var
        self.n_samples_seen_ = count
        self.n_features_in_ = int(mean.shape[0])

    def _check_fitted(self) -> None:
        if not hasattr(self, "components_"):
            raise ValueError("This LatentPCA is not fitted yet; call fit(X) first.")

    def transform(self, X: Any) -> Float[torch.Tensor, "point component"]:
        """``X @ components_.T`` (minus the projected mean when ``center=True``), in float32."""
        self._check_fitted()
        x = _as_2d_float(X)
        if x.shape[1] != self.n_features_in_:
            raise ValueError(
                f"Expected {self.n_features_in_} features (d_model), got {x.shape[1]}."
            )
        w = self.components_.T
        out = torch.cat([c @ w for c in _chunks(x)]) if x.shape[0] else torch.zeros(0, w.shape[1])
        if self.center:
            out -= self.mean_.float() @ w
        return out

    def fit_transform(self, X: Any) -> torch.Tensor:
        return self.fit(X).transform(X)

    def save(self, path: Any = None, *, model: Any = None) -> Path:
        """Save with ``tlmicroscope.io.save_fitted``, tied to the model it was fitted on (or to
        ``model`` when given); ``path=None`` saves to the artifact store."""
        from tlmicroscope.artifacts import save_path
        from tlmicroscope.io import model_fingerprint, save_fitted

        self._check_fitted()
        fp = model_fingerprint(model) if model is not None else self.model_
        return save_fitted(
            save_path(self.kind, path, fp),
            {
                "components": self.components_,
                "mean": self.mean_,
                "explained_variance": self.explained_variance_,
                "explained_variance_ratio": self.explained_variance_ratio_,
            },
            kind="latent_pca",
            config={
                **self.settings(),
                "n_samples_seen": int(self.n_samples_seen_),
                "quick": bool(self.quick),
            },
            fingerprint=fp,
        )

    @classmethod
    def load(cls, path: Any = None, model: Any = None) -> LatentPCA:
        """Load what ``save`` wrote (``path=None``: from the artifact store for ``model``);
        refuses a file saved for another model."""
        from tlmicroscope.artifacts import load_path
        from tlmicroscope.io import config_bool, config_int, load_fitted

        path = load_path(cls.kind, path, model)
        tensors, meta = load_fitted(path, kind="latent_pca", model=model)
        cfg = meta["config"]
        extra = {k: cfg[k] for k in ("n_tokens", "seq_len", "batch_size", "seed") if k in cfg}
        pca = cls(
            config_int(cfg, "n_components", path),
            center=config_bool(cfg, "center", path, default=False),
            **extra,
        )
        pca.quick = config_bool(cfg, "quick", path, default=False)
        pca.model_ = meta.get("model")
        pca.components_ = tensors["components"]
        pca.mean_ = tensors["mean"]
        pca.explained_variance_ = tensors["explained_variance"]
        pca.explained_variance_ratio_ = tensors["explained_variance_ratio"]
        pca.n_samples_seen_ = int(cfg["n_samples_seen"])
        pca.n_features_in_ = int(pca.components_.shape[1])
        return pca


class _Moments:
    """Count, mean and scatter matrix of rows added chunk by chunk (float64 sums)."""

    def __init__(self, d: int) -> None:
        self.count = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.scatter = torch.zeros(d, d, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        n, d = x.shape
        if not n:
            return
        # One reused float32 buffer for the centred chunk: fresh large allocations page-fault.
        scratch = torch.empty(min(_CHUNK, n), d)
        for start in range(0, n, _CHUNK):
            chunk = x[start : start + _CHUNK]
            m = chunk.shape[0]
            c_mean32 = chunk.float().mean(0) if chunk.dtype != torch.float32 else chunk.mean(0)
            if not torch.isfinite(c_mean32).all():  # any NaN or inf in the chunk reaches its mean
                raise ValueError(
                    "The activations contain NaN or infinite values; PCA cannot fit them."
                )
            centred = torch.sub(chunk, c_mean32, out=scratch[:m])
            # The float32 mean is slightly off for large offsets; take what it missed from the
            # (now small) centred values and move the scatter to the exact chunk mean.
            missed = centred.mean(0).double()
            c_mean = c_mean32.double() + missed
            c_scatter = torch.mm(centred.T, centred).double() - m * torch.outer(missed, missed)
            # Chan et al.'s pairwise update: combines centred moments without cancellation.
            delta = c_mean - self.mean
            total = self.count + m
            self.scatter += c_scatter + torch.outer(delta, delta) * (self.count * m / total)
            self.mean += delta * (m / total)
            self.count = total


def _import_umap() -> Any:
    try:
        import umap
    except ImportError as exc:
        raise ImportError(
            f"method='umap' needs the optional umap-learn package, which is not installed. Install "
            f"it with:\n    {UMAP_INSTALL}\nor use method='pca'."
        ) from exc
    return umap


@dataclass(frozen=True)
class Projection:
    """Low-dimensional coordinates of activations, with the fitted reducer and per-point labels.

    Attributes:
        coords: ``[point component]`` coordinates.
        method: ``"pca"`` or ``"umap"``.
        reducer: The fitted ``LatentPCA`` or ``umap.UMAP``; ``transform`` reuses it.
        fields: Per-point labels (``component``, ``layer``, ``layer_label``, ``position``,
            ``sample``, ``token``, ``state``) where the input had them.
        explained_variance_ratio: Per PCA component (``None`` for UMAP).
        provenance: Where the activations came from and the reducer's settings.
    """

    coords: Float[torch.Tensor, "point component"]
    method: str
    reducer: Any
    fields: Mapping[str, np.ndarray] = field(default_factory=dict)
    explained_variance_ratio: torch.Tensor | None = None
    n_layers: int | None = None
    provenance: Provenance | None = None

    @property
    def n_components(self) -> int:
        return int(self.coords.shape[1])

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def field(self, name: str) -> np.ndarray:
        """One per-point label array; a clear error names the fields this projection has."""
        if name not in self.fields:
            raise ValueError(
                f"This projection has no {name!r} field; it has {sorted(self.fields) or 'none'}. "
                "Project a ComponentStates (which carries component, layer, position and token "
                "labels), or pass fields= to project()."
            )
        return self.fields[name]

    def axis_titles(self) -> list[str]:
        if self.method == "pca" and self.explained_variance_ratio is not None:
            return [
                f"PC{i + 1} ({100 * float(r):.1f}%)"
                for i, r in enumerate(self.explained_variance_ratio)
            ]
        return [f"{self.method.upper()} {i + 1}" for i in range(self.n_components)]

    def transform(self, activations: Any, *, fields: Mapping[str, Any] | None = None) -> Projection:
        """Project other activations with this fitted reducer (e.g. fit on all states, then show
        the sample means)."""
        x = _as_2d_float(activations)
        coords = _apply(self.method, self.reducer, x)
        return Projection(
            coords=coords,
            method=self.method,
            reducer=self.reducer,
            fields=_collect_fields(activations, fields, x.shape[0]),
            explained_variance_ratio=self.explained_variance_ratio,
            n_layers=getattr(activations, "n_layers", self.n_layers),
            provenance=getattr(activations, "provenance", None) or self.provenance,
        )

    def to_dataframe(self):
        """One row per point: the coordinates and every label."""
        import pandas as pd

        data = {f"dim{i + 1}": self.coords[:, i].numpy() for i in range(self.n_components)}
        data.update({k: np.asarray(v) for k, v in self.fields.items()})
        return pd.DataFrame(data)


def _apply(method: str, reducer: Any, x: torch.Tensor) -> torch.Tensor:
    if method == "pca":
        return reducer.transform(x)
    out = [reducer.transform(c.numpy()) for c in _chunks(x)]
    return torch.as_tensor(np.concatenate(out), dtype=torch.float32)


def _collect_fields(source: Any, fields: Mapping[str, Any] | None, n: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    if hasattr(source, "point_fields"):
        out.update(source.point_fields())
    for k, v in (fields or {}).items():
        arr = np.asarray(v)
        if arr.shape[:1] != (n,):
            raise ValueError(f"Field {k!r} has {arr.shape[:1]} entries for {n} points.")
        out[k] = arr
    return out


def project(
    activations: Any,
    method: str = "pca",
    *,
    n_components: int = 2,
    fit_on: Any = None,
    fields: Mapping[str, Sequence[Any] | np.ndarray] | None = None,
    center: bool = False,
    n_neighbors: int = UMAP_DEFAULTS["n_neighbors"],
    min_dist: float = UMAP_DEFAULTS["min_dist"],
    metric: str = UMAP_DEFAULTS["metric"],
    n_epochs: int | None = None,
    fit_size: int = 100_000,
    seed: int = 0,
    reducer: Any = None,
) -> Projection:
    """Project activations to ``n_components`` dimensions with PCA or UMAP.

    Args:
        activations: A ``ComponentStates`` (its labels travel with the points), or any
            ``[..., d_model]`` tensor or array.
        method: ``"pca"`` (fitted centred, applied uncentred) or ``"umap"`` (needs umap-learn).
        n_components: Output dimensions.
        fit_on: Fit on these activations instead and apply the result to ``activations``
            (e.g. fit on every state, project the sample means).
        fields: Extra per-point labels for plain tensors, e.g. ``{"layer": [...]}``.
        center: PCA only: subtract the mean when applying (scikit-learn's convention).
        n_neighbors, min_dist, metric, n_epochs: UMAP settings (the reference's by default).
        fit_size: UMAP is fitted on at most this many random points (the reference uses 100k)
            and transforms the rest.
        seed: UMAP's ``random_state`` and the fit subset's draw.
        reducer: An already fitted ``LatentPCA`` (e.g. from ``LatentPCA.load``) or ``umap.UMAP``
            to apply instead of fitting one.

    Raises:
        ImportError: UMAP requested without umap-learn (the message gives the install command).
        ValueError: too few points for ``n_components``, constant activations, NaNs, an
            unknown method.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.geometry import capture_components
        >>> comps = ("attn_out", "mlp_out")
        >>> st = capture_components(tiny_model(n_layers=2), "hello world", components=comps)
        >>> proj = project(st, n_components=3)
        >>> tuple(proj.coords.shape), sorted(set(proj.field("component")))
        ((44, 3), ['attn_out', 'mlp_out'])
    """
    if method not in ("pca", "umap"):
        raise ValueError(f"method must be 'pca' or 'umap', got {method!r}.")
    x = _as_2d_float(activations)
    x_fit = x if fit_on is None else _as_2d_float(fit_on, "fit_on")
    if x_fit.shape[1] != x.shape[1]:
        raise ValueError(f"fit_on has {x_fit.shape[1]} features but activations have {x.shape[1]}.")
    settings: dict[str, Any] = {"method": method, "n_components": n_components}
    if reducer is not None:
        method = "pca" if isinstance(reducer, LatentPCA) else "umap"
        if method == "pca":
            reducer._check_fitted()
        coords = _apply(method, reducer, x)
        evr = reducer.explained_variance_ratio_.float() if method == "pca" else None
        settings.update(method=method, n_components=int(coords.shape[1]), reused=True)
    elif method == "pca":
        reducer = LatentPCA(n_components, center=center).fit(x_fit)
        coords = reducer.transform(x)
        evr = reducer.explained_variance_ratio_.float()
        settings["centered_transform"] = center
    else:
        coords, reducer = _fit_umap(
            x,
            x_fit,
            fit_on is None,
            n_components=n_components,
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            metric=metric,
            n_epochs=n_epochs,
            fit_size=fit_size,
            seed=seed,
        )
        evr = None
        settings.update(
            n_neighbors=n_neighbors,
            min_dist=min_dist,
            metric=metric,
            n_epochs=n_epochs,
            fit_size=fit_size,
            seed=seed,
        )
    prov = getattr(activations, "provenance", None)
    return Projection(
        coords=coords,
        method=method,
        reducer=reducer,
        fields=_collect_fields(activations, fields, x.shape[0]),
        explained_variance_ratio=evr,
        n_layers=getattr(activations, "n_layers", None),
        provenance=prov.with_settings(projection=settings) if prov is not None else None,
    )


def _fit_umap(
    x: torch.Tensor,
    x_fit: torch.Tensor,
    same: bool,
    *,
    n_components: int,
    n_neighbors: int,
    min_dist: float,
    metric: str,
    n_epochs: int | None,
    fit_size: int,
    seed: int,
) -> tuple[torch.Tensor, Any]:
    umap = _import_umap()
    n_fit_total = x_fit.shape[0]
    if n_fit_total <= max(n_components + 1, 2):
        raise ValueError(
            f"UMAP with {n_components} components needs more than {n_components + 1} points, got "
            f"{n_fit_total}. Capture more positions or samples."
        )
    if not torch.isfinite(x_fit).all():
        raise ValueError("The activations contain NaN or infinite values; UMAP cannot fit them.")
    if float(x_fit.float().std(0).max()) == 0.0:
        raise ValueError("The activations are constant (zero variance): UMAP has nothing to embed.")
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n_fit_total, size=min(fit_size, n_fit_total), replace=False))
    reducer = umap.UMAP(
        n_components=n_components,
        n_neighbors=min(n_neighbors, len(fit_idx) - 1),
        min_dist=min_dist,
        metric=metric,
        n_epochs=n_epochs,
        random_state=seed,
    )
    data = x_fit[torch.as_tensor(fit_idx)].float().numpy()
    with warnings.catch_warnings():  # a seed makes umap-learn single-threaded, and it says so
        warnings.filterwarnings("ignore", message="n_jobs value", category=UserWarning)
        embedding = reducer.fit_transform(data)
    if not same:
        return _apply("umap", reducer, x), reducer
    coords = torch.empty(x.shape[0], n_components)
    coords[torch.as_tensor(fit_idx)] = torch.as_tensor(embedding, dtype=torch.float32)
    if len(fit_idx) < x.shape[0]:
        rest = np.setdiff1d(np.arange(x.shape[0]), fit_idx)
        coords[torch.as_tensor(rest)] = _apply("umap", reducer, x[torch.as_tensor(rest)])
    return coords, reducer
