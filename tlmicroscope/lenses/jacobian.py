"""The Jacobian lens (Gurnee et al. 2026) as a tlmicroscope lens, wrapping TransformerLens's own.

TransformerLens 4.3 ships ``transformer_lens.tools.analysis.JacobianLens``: one ``d_model x
d_model`` matrix ``J_k`` per block output ``k`` (``blocks.{k}.hook_out``), the corpus average of
the Jacobian of the last block's output with respect to that residual, read through the model's
own final norm and unembedding. Its estimator, its ``merge`` and its file format (Anthropic's
reference format, a ``.pt`` holding ``J``, ``n_prompts``, ``source_layers`` and ``d_model``) are
used as they are; this module only adapts the lens to tlmicroscope's protocol:

* **Layers.** tlmicroscope indexes the residual *entering* block ``l`` (``hook_resid_pre``), which
  is the output of block ``l - 1``; so ``transform(h, l) = h @ J_{l-1}.T`` for
  ``l = 1..n_layers-1``.
  The embeddings (``l = 0``) have no fitted matrix in TransformerLens's convention and are read
  with the identity, i.e. as the logit lens reads them (``identity_layers`` says so).
* **Readout.** Through tlmicroscope's ``Readout`` (final norm, unembedding, soft caps, logit
  scales), as every lens is, so the J-lens plugs in wherever a lens is accepted.
* **Files.** A folder holding ``jacobian_lens.pt`` (the reference format, unchanged, loadable by
  TransformerLens and the reference package) and ``config.json`` (its kind and the fingerprint of
  the model it belongs to, so ``load_lens`` finds it and another model is refused). A bare ``.pt``
  (e.g. a published artifact) loads too, checked by TransformerLens's own ``validate_model``.

The fit (``fit_jacobian_lens``) runs over prompt slices, saves each slice atomically and merges
them with ``JacobianLens.merge``, so an interrupted fit resumes where it stopped. On TransformerLens
3.x every entry point raises ``TransformerLensVersionError``: the estimator only exists in 4.x.
"""

from __future__ import annotations

import hashlib
import io
import json
import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float

from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.io import (
    FittedFileError,
    ModelMismatchError,
    atomic_write_bytes,
    atomic_write_text,
    check_fingerprint,
    check_model_shape,
    model_fingerprint,
)
from tlmicroscope.models import access

__all__ = [
    "ARTIFACT",
    "KIND",
    "JacobianLens",
    "TransformerLensVersionError",
    "default_jlens_dir",
    "fit_jacobian_lens",
    "load_slices",
    "prompt_curve",
    "require_jacobian_lens",
]

#: The ``kind`` recorded in a saved Jacobian lens's ``config.json``.
KIND = "jacobian_lens"
#: The reference-format artifact inside a saved lens folder.
ARTIFACT = "jacobian_lens.pt"
_STATE = "fit-state.json"
_SLICES = "slices"
# Where our fingerprint travels inside the reference artifact's additive ``metadata`` dict.
_FP_KEY = "tlmicroscope_model"


class TransformerLensVersionError(ImportError):
    """The Jacobian lens needs TransformerLens 4.x, which ships ``JacobianLens``."""


def require_jacobian_lens(what: str = "The Jacobian lens") -> Any:
    """TransformerLens's ``JacobianLens`` class, or a ``TransformerLensVersionError`` with the fix.

    Examples:
        >>> require_jacobian_lens().__name__
        'JacobianLens'
    """
    try:
        if (
            access.TL_MAJOR < 4
        ):  # 3.9 has a JacobianLens too, but only for a bridge we do not load there
            raise ImportError
        from transformer_lens.tools.analysis import JacobianLens as _TLJacobianLens
    except ImportError:
        raise TransformerLensVersionError(
            f"{what} needs TransformerLens 4.x (4.3 or newer ships "
            f"transformer_lens.tools.analysis.JacobianLens); this environment has TransformerLens "
            f"{access.TL_VERSION}. Install it with: pip install 'transformer-lens>=4.3'."
        ) from None
    return _TLJacobianLens


def default_jlens_dir(
    model_or_name: Any, root: str | os.PathLike | None = None, *, processed: bool | None = None
) -> Path:
    """Where ``fit-jlens`` writes by default: the artifact store's ``jacobian-lens`` folder for the
    model (``artifacts.artifact_path("jacobian-lens", model)``; ``processed`` as for
    ``default_lens_dir``); with ``root``, the older layout ``root/jacobian-lens-<model>/``.

    Examples:
        >>> default_jlens_dir("SmolLM2-135M-Instruct").parts[-2:]
        ('smollm2-135m', 'jacobian-lens')
        >>> default_jlens_dir("SmolLM2-135M-Instruct", root="out").as_posix()
        'out/jacobian-lens-smollm2-135m'
    """
    from tlmicroscope.lenses._tuned_checkpoint import default_lens_dir

    if root is None:
        from tlmicroscope.artifacts import artifact_path

        return artifact_path("jacobian-lens", model_or_name, processed=processed)

    slug = default_lens_dir(model_or_name, root=root).name.removeprefix("tuned-lens-")
    return Path(root) / f"jacobian-lens-{slug}"


class _InstanceOrClassMethod:
    """``obj.name(...)`` calls ``on_instance(obj, ...)``; ``Cls.name(...)`` calls
    ``on_class(Cls, ...)`` (one name, two call forms that users rely on)."""

    def __init__(self, on_instance: Any, on_class: Any) -> None:
        self.on_instance, self.on_class = on_instance, on_class
        self.__doc__ = on_instance.__doc__

    def __get__(self, obj: Any, cls: Any = None) -> Any:
        import types

        if obj is None:
            return types.MethodType(self.on_class, cls)
        return types.MethodType(self.on_instance, obj)


class JacobianLens(torch.nn.Module):
    """A fitted Jacobian lens, read through tlmicroscope's shared readout.

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``, kind
    ``"jacobian-lens"``): ``JacobianLens(**settings).fit(model, corpus)`` fits on corpus windows
    (resumable, over prompt slices, with ``out_dir``), ``save()`` puts it in the artifact store and
    ``JacobianLens.load(None, model)`` reads it back. ``JacobianLens.fit(model, prompts)`` called on
    the class still fits one shot on given prompts, and ``fit_jacobian_lens`` is the resumable fit.
    The TransformerLens object is kept as ``inner`` (for its interventions: ``lens_vectors``,
    ``steering_hooks``, ``swap_hooks``, ...).

    Args:
        inner: A ``transformer_lens.tools.analysis.JacobianLens`` (``None``: an unfitted lens
            holding only settings).
        n_layers: The model's number of blocks.
        model_info: The fingerprint (``tlmicroscope.io.model_fingerprint``) of its model.
        n_prompts, prompt_tokens, skip_first_positions, dim_batch, slice_size, holdout: Settings
            of ``fit`` (see ``fit_jacobian_lens``).

    Attributes:
        jacobians: ``[n_layers d_model d_model]``: row ``l`` maps the residual entering block ``l``
            to the last block's output (the identity at ``l = 0`` and for unfitted layers).
        identity_layers: Residual indices read with the identity (no fitted matrix).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import prediction_trajectory
        >>> model = tiny_model(n_layers=3)
        >>> lens = JacobianLens.fit(model, ["a short prompt to fit on"], skip_first_positions=2,
        ...                         progress=False)
        >>> lens.name, lens.identity_layers, tuple(lens.jacobians.shape)
        ('jacobian', (0,), (3, 32, 32))
        >>> h = torch.randn(4, 32)
        >>> torch.allclose(lens.transform(h, 2), h @ lens.inner.jacobians[1].T)
        True
        >>> prediction_trajectory(model, "hello", lens=lens).provenance.lens
        'jacobian'
    """

    name = "jacobian"
    final_norm = True
    kind: ClassVar[str] = "jacobian-lens"
    #: Settings ``fit(..., quick=True)`` uses: 4 prompts of 24 tokens (each costs about 45
    #: CPU-seconds on SmolLM2, one forward and d_model/dim_batch backward passes).
    QUICK: ClassVar[dict[str, Any]] = {"n_prompts": 4, "prompt_tokens": 24, "slice_size": 4}

    def __init__(
        self,
        inner: Any = None,
        n_layers: int | None = None,
        *,
        model_info: Mapping[str, Any] | None = None,
        n_prompts: int = 32,
        prompt_tokens: int = 32,
        skip_first_positions: int = 4,
        dim_batch: int = 32,
        slice_size: int = 4,
        holdout: float = 0.1,
    ):
        super().__init__()
        self.n_prompts_setting = int(n_prompts)
        self.prompt_tokens = int(prompt_tokens)
        self.skip_first_positions = int(skip_first_positions)
        self.dim_batch = int(dim_batch)
        self.slice_size = int(slice_size)
        self.holdout = float(holdout)
        self.quick = False
        self.inner = None
        self.n_layers, self.d_model = 0, 0
        self.identity_layers: tuple[int, ...] = ()
        self.model_info: dict[str, Any] | None = dict(model_info) if model_info else None
        self._checked: tuple | None = None
        if inner is not None:
            if n_layers is None:
                raise ValueError("Give n_layers with inner (the model's number of blocks).")
            self._adopt(inner, n_layers, model_info)

    def settings(self) -> dict[str, Any]:
        """The fit settings (``JacobianLens(**lens.settings())`` makes an unfitted copy)."""
        return {
            "n_prompts": self.n_prompts_setting,
            "prompt_tokens": self.prompt_tokens,
            "skip_first_positions": self.skip_first_positions,
            "dim_batch": self.dim_batch,
            "slice_size": self.slice_size,
            "holdout": self.holdout,
        }

    def _adopt(self, inner: Any, n_layers: int, model_info: Mapping[str, Any] | None) -> None:
        """Hold ``inner`` (a TransformerLens lens) as this lens's fitted state."""
        require_jacobian_lens()
        n_layers = int(n_layers)
        d = int(inner.d_model)
        bad = [k for k in inner.source_layers if not 0 <= k < n_layers - 1]
        if bad:
            raise ModelMismatchError(
                f"This Jacobian lens has matrices for block outputs {bad}, outside "
                f"0..{n_layers - 2} of a "
                f"{n_layers}-layer model: it belongs to another model (fit one for this model)."
            )
        stack = torch.eye(d).repeat(n_layers, 1, 1)
        for k, J in inner.jacobians.items():
            stack[k + 1] = J.float()
        self.register_buffer("jacobians", stack)  # replaces a previous fit's
        self.inner = inner
        self.n_layers = n_layers
        self.d_model = d
        self.identity_layers = tuple(
            i for i in range(n_layers) if i == 0 or (i - 1) not in inner.jacobians
        )
        self.model_info: dict[str, Any] | None = dict(model_info) if model_info else None
        self._checked: tuple | None = None

    @property
    def n_prompts(self) -> int:
        """Prompts the lens was fitted on (the ``n_prompts`` setting until it is fitted)."""
        return int(self.inner.n_prompts) if self.inner is not None else self.n_prompts_setting

    # ---------------------------------------------------------------------------- the protocol
    def transform(
        self, h: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_model"]:
        """Carry the residual entering block ``layer`` to the last block's output: ``h @ J.T``."""
        if isinstance(layer, bool):
            raise TypeError("layer must be an int, got bool.")
        layer = operator.index(layer)
        if layer == self.n_layers:
            raise ValueError(
                f"Layer {layer} is the model's output (residual index n_layers={self.n_layers}); "
                "it is read without a lens. Jacobian-lens layers are 0..n_layers-1."
            )
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer}.")
        if h.shape[-1] != self.d_model:
            raise ValueError(
                f"Expected vectors of width d_model={self.d_model}, got {h.shape[-1]}."
            )
        J = self.jacobians[layer]
        if J.dtype != h.dtype or J.device != h.device:
            J = J.to(h.device, h.dtype)
        return h @ J.T

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:
        return self.transform(h, layer)

    def check_model(self, model: Any) -> None:
        """Raise ``ModelMismatchError`` (a ``ValueError``) naming how ``model`` differs."""
        self._check_fitted()
        check_model_shape(
            model,
            "Jacobian lens",
            "use the model it was fitted for, or fit one with `tlmicroscope fit-jlens`",
            d_model=self.d_model,
            n_layers=self.n_layers,
        )
        W_U = model.W_U
        key = (id(model), W_U.data_ptr(), getattr(W_U, "_version", 0))
        if self._checked == key:
            return
        if self.model_info:
            check_fingerprint(self.model_info, model, what="This Jacobian lens")
        elif access.is_bridge(model):
            try:  # a published artifact: TransformerLens's own provenance check
                self.inner.validate_model(model)
            except (TypeError, ValueError) as exc:
                raise ModelMismatchError(
                    f"This Jacobian lens does not fit this model: {exc} (fit one for it with "
                    "`tlmicroscope fit-jlens`)."
                ) from None
        self._checked = key

    def _check_fitted(self) -> None:
        if self.inner is None:
            raise ValueError(
                "This JacobianLens is not fitted: call .fit(model, corpus) or "
                "JacobianLens.load(path, model)."
            )

    # ----------------------------------------------------------------------------- fitting
    def _fit(
        self,
        model: Any,
        corpus: Any = None,
        *,
        n_tokens: int | None = None,
        progress: bool = True,
        quick: bool = False,
        prompts: Sequence[str] | None = None,
        out_dir: str | os.PathLike | None = None,
        resume: bool = True,
    ) -> JacobianLens:
        """Fit on ``corpus`` (default: the embedded corpus): the first ``n_prompts`` windows of
        ``prompt_tokens`` tokens of its training split, or ``prompts``; returns ``self``.

        ``n_tokens`` sets ``n_prompts`` to ``n_tokens // prompt_tokens``; ``quick=True`` takes
        ``QUICK`` for what is not given and records the fit as quick. With ``out_dir`` the fit is
        resumable over prompt slices (``fit_jacobian_lens``); the lens is not saved otherwise
        (``save()`` puts it in the artifact store).

        Examples:
            >>> from tlmicroscope.models import tiny_model
            >>> model = tiny_model(n_layers=2)
            >>> lens = JacobianLens(prompt_tokens=16, skip_first_positions=2)
            >>> lens = lens.fit(model, ["some text to fit on " * 20], n_tokens=48, progress=False)
            >>> lens.n_prompts, tuple(lens.jacobians.shape)
            (3, (2, 32, 32))
        """
        if quick:
            for name, value in self.QUICK.items():
                setattr(self, "n_prompts_setting" if name == "n_prompts" else name, value)
        if n_tokens is not None:
            self.n_prompts_setting = max(1, int(n_tokens) // self.prompt_tokens)
        self.quick = bool(quick)
        kwargs = self.settings()
        if out_dir is not None:
            got = fit_jacobian_lens(
                model,
                corpus,
                out_dir=out_dir,
                prompts=prompts,
                resume=resume,
                progress=progress,
                **kwargs,
            )
        else:
            texts = _fit_texts(model, corpus, prompts, kwargs)
            got = JacobianLens._fit_once(
                model,
                texts,
                corpus=_corpus_id(corpus, prompts, self.prompt_tokens),
                max_seq_len=self.prompt_tokens if prompts is None else 128,
                skip_first_positions=self.skip_first_positions,
                dim_batch=self.dim_batch,
                progress=progress,
            )
        self._adopt(got.inner, got.n_layers, got.model_info)
        return self

    @classmethod
    def _fit_once(
        cls,
        model: Any,
        prompts: Sequence[str],
        *,
        corpus: str = "prompts",
        max_seq_len: int = 128,
        skip_first_positions: int = 16,
        dim_batch: int = 8,
        source_layers: Sequence[int] | None = None,
        progress: bool = True,
    ) -> JacobianLens:
        """Fit on ``prompts`` with TransformerLens's estimator (one forward and
        ``d_model/dim_batch`` backward passes per prompt) and tie the lens to ``model``'s
        fingerprint.

        ``source_layers`` are block outputs (TransformerLens's indices, default all but the last);
        fitting only late ones is much cheaper (the backward passes start there), and the residual
        indices without a matrix are read with the identity (``identity_layers``)."""
        tl_cls = require_jacobian_lens("JacobianLens.fit")
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of texts, not one string.")
        fp = model_fingerprint(model)
        inner = tl_cls.fit(
            model,
            list(prompts),
            corpus=corpus,
            max_seq_len=int(max_seq_len),
            skip_first_positions=int(skip_first_positions),
            dim_batch=int(dim_batch),
            show_progress=progress,
            metadata={_FP_KEY: fp},
            source_layers=None if source_layers is None else [int(x) for x in source_layers],
        )
        return cls(inner, int(model.cfg.n_layers), model_info=fp)

    #: ``lens.fit(model, corpus, ...)`` on an instance (the contract); ``JacobianLens.fit(model,
    #: prompts, ...)`` on the class, the one-shot fit on given prompts (kept for old callers).
    fit = _InstanceOrClassMethod(_fit, _fit_once.__func__)

    # ------------------------------------------------------------------------------- files
    def save(
        self, path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32
    ) -> Path:
        """Save as ``path/jacobian_lens.pt`` (reference format) + ``path/config.json``, each
        atomically; ``path=None`` saves to the artifact store's place for its model.

        ``dtype`` is the storage dtype of the matrices; float32 (the default) keeps merges exact,
        float16 is the reference's choice for published artifacts.
        """
        from tlmicroscope.artifacts import save_path

        self._check_fitted()
        path = save_path(self.kind, path, self.model_info)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path / ARTIFACT, _artifact_bytes(self.inner, dtype))
        meta = {
            "kind": KIND,
            "format_version": 1,
            "model": self.model_info,
            "config": {
                "artifact": ARTIFACT,
                "n_layers": self.n_layers,
                "d_model": self.d_model,
                "n_prompts": self.n_prompts,
                "source_layers": list(self.inner.source_layers),
                "layer_convention": (
                    "transform(h, l) = h @ J[l-1].T for hook_resid_pre l >= 1; identity at l = 0"
                ),
                "fit": {k: v for k, v in self.inner.metadata.items() if k != _FP_KEY},
                "settings": self.settings(),
                "quick": bool(self.quick),
            },
        }
        atomic_write_text(path / "config.json", json.dumps(meta, indent=2, sort_keys=True))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, model: Any = None) -> JacobianLens:
        """Load a folder saved by ``save``/``fit-jlens``, or a bare reference-format ``.pt``;
        ``path=None`` reads the artifact store's lens for ``model``.

        Raises:
            TransformerLensVersionError: on TransformerLens 3.x.
            FittedFileError: a missing or corrupt file.
            ModelMismatchError: ``model`` is not the model the lens was fitted for.
        """
        from tlmicroscope.artifacts import load_path

        require_jacobian_lens("JacobianLens.load")
        path = load_path(cls.kind, path, model)
        artifact = path / ARTIFACT if path.is_dir() else path
        model_info, cfg = None, {}
        if path.is_dir() and (path / "config.json").is_file():
            try:
                meta = json.loads((path / "config.json").read_text())
            except ValueError as exc:
                raise FittedFileError(
                    f"{path / 'config.json'} is not valid JSON ({exc}); the file is corrupt."
                ) from exc
            if meta.get("kind") != KIND:
                raise FittedFileError(f"{path} holds a {meta.get('kind')!r}, not a {KIND!r}.")
            model_info = meta.get("model")
            cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
        inner = _load_inner(artifact)
        model_info = model_info or inner.metadata.get(_FP_KEY)
        if model is not None:
            n_layers = int(model.cfg.n_layers)
        elif model_info:
            n_layers = int(model_info["n_layers"])
        else:
            n_layers = max(inner.source_layers) + 2
        if model is not None and int(model.cfg.d_model) != int(inner.d_model):
            raise ModelMismatchError(
                f"The Jacobian lens at {path} was fitted for d_model={inner.d_model}, but this "
                f"model has d_model={model.cfg.d_model}: it belongs to another model (fit one "
                "with `tlmicroscope fit-jlens`)."
            )
        settings = cfg.get("settings") if isinstance(cfg.get("settings"), dict) else {}
        lens = cls(inner, n_layers, model_info=model_info, **settings)
        lens.quick = cfg.get("quick") is True
        if model is not None:
            lens.check_model(model)
        return lens

    def extra_repr(self) -> str:
        name = (self.model_info or {}).get("name") or self.inner.metadata.get("model_name")
        return (
            f"n_layers={self.n_layers}, d_model={self.d_model}, n_prompts={self.n_prompts}, "
            f"model={name!r}"
        )

    def describe(self) -> str:
        """One line: the model and how the lens was fitted."""
        m = self.inner.metadata
        parts = [
            f"Jacobian lens for {(self.model_info or {}).get('name', m.get('model_name', '?'))}",
            f"n_prompts={self.n_prompts}",
        ]
        for key in ("max_seq_len", "skip_first_positions", "corpus"):
            if key in m:
                parts.append(f"{key}={m[key]}")
        return ", ".join(parts)


def _artifact_bytes(inner: Any, dtype: torch.dtype) -> bytes:
    buf = io.BytesIO()
    inner.save(buf, dtype=dtype)  # TransformerLens's writer: torch.save accepts a file object
    return buf.getvalue()


def _load_inner(artifact: Path) -> Any:
    tl_cls = require_jacobian_lens()
    if not artifact.is_file():
        raise FittedFileError(
            f"No Jacobian lens at {artifact} (fit one with `tlmicroscope fit-jlens`)."
        )
    try:
        return tl_cls.load(str(artifact))
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as exc:
        raise FittedFileError(
            f"{artifact} is not a readable Jacobian-lens artifact ({exc}); it is corrupt."
        ) from exc


# ------------------------------------------------------------------------- the resumable fit
def _prompt_windows(
    model: Any, corpus: Any, n_prompts: int, prompt_tokens: int, holdout: float
) -> list[str]:
    from tlmicroscope.lenses._tuned_data import lens_token_windows

    windows = lens_token_windows(
        model, corpus, seq_len=prompt_tokens, split="train", holdout=holdout
    )
    if windows.shape[0] < n_prompts:
        raise ValueError(
            f"The training split has {windows.shape[0]} windows of {prompt_tokens} tokens, "
            "fewer than "
            f"n_prompts={n_prompts}; use a larger corpus, fewer prompts or shorter prompts."
        )
    tok = model.tokenizer
    return [tok.decode(w.tolist(), skip_special_tokens=True) for w in windows[:n_prompts]]


def load_slices(out_dir: str | os.PathLike) -> list[Any]:
    """The TransformerLens lenses of each saved prompt slice of a fit, in prompt order."""
    require_jacobian_lens("load_slices")
    folder = Path(out_dir) / _SLICES
    return [_load_inner(p) for p in sorted(folder.glob("slice-*.pt"))]


@renamed_arguments(renamed={"prompt_tokens": "seq_len", "dim_batch": "chunk_size"})
def fit_jacobian_lens(
    model: Any,
    corpus: Any = None,
    *,
    out_dir: str | os.PathLike | None = None,
    prompts: Sequence[str] | None = None,
    n_prompts: int = 32,
    seq_len: int = 32,
    skip_first_positions: int = 4,
    chunk_size: int = 32,
    slice_size: int = 4,
    holdout: float = 0.1,
    resume: bool = True,
    progress: bool = True,
) -> JacobianLens:
    """Fit a Jacobian lens slice by slice, saving each slice, and merge them (resumable).

    Prompts are the first ``n_prompts`` windows of ``seq_len`` tokens of the corpus's training
    split (the held-out tail that ``evaluate_lens`` reads is never used), unless ``prompts`` are
    given. Every ``slice_size`` prompts are fitted with TransformerLens's ``JacobianLens.fit`` and
    saved to ``out_dir/slices/``; the merged lens (``JacobianLens.merge``, weighted by prompts) is
    saved to ``out_dir`` after each slice, so ``load_lens(out_dir)`` always reads the latest merge.
    With ``resume=True`` slices already on disk for the same prompts and settings are not refitted.

    Args:
        model: A raw TransformerBridge (TransformerLens 4.x).
        corpus: ``None``/``"embedded"``, a text file or folder, or an iterable of strings.
        out_dir: Folder for the lens and its slices (default ``default_jlens_dir(model)``).
        skip_first_positions: Leading positions left out of the source average (the reference
            uses 16 with 128-token prompts; short prompts need fewer).
        chunk_size: Output dimensions per backward pass (memory vs. speed; same result).

    The old keywords ``prompt_tokens=`` (now ``seq_len=``) and ``dim_batch=`` (now
    ``chunk_size=``) still work for one release, with a ``DeprecationWarning``.

    Raises:
        TransformerLensVersionError: on TransformerLens 3.x.
        ValueError: ``out_dir`` holds a fit with other prompts or settings (pass ``resume=False``
            or another folder); prompts too short for ``skip_first_positions``.

    Examples:
        >>> import tempfile
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> texts = ["one prompt of text", "another prompt here", "and a third one"]
        >>> with tempfile.TemporaryDirectory() as d:
        ...     lens = fit_jacobian_lens(model, prompts=texts, out_dir=d, slice_size=2,
        ...                              skip_first_positions=2, progress=False)
        ...     (lens.n_prompts, len(load_slices(d)))
        (3, 2)
    """
    require_jacobian_lens("fit_jacobian_lens")
    prompt_tokens = seq_len  # the name the saved fit settings use
    settings_in = {
        "n_prompts": n_prompts,
        "prompt_tokens": prompt_tokens,
        "skip_first_positions": skip_first_positions,
        "slice_size": slice_size,
        "holdout": holdout,
    }
    texts = _fit_texts(model, corpus, prompts, settings_in)
    out = Path(out_dir) if out_dir is not None else default_jlens_dir(model)
    fp = model_fingerprint(model)
    corpus_id = _corpus_id(corpus, prompts, prompt_tokens)
    settings = {
        "model": fp,
        "corpus": corpus_id,
        "max_seq_len": int(prompt_tokens) if prompts is None else 128,
        "skip_first_positions": int(skip_first_positions),
        "slice_size": int(slice_size),
    }
    slices = [texts[i : i + slice_size] for i in range(0, len(texts), slice_size)]
    done = _slices_done(out, settings, slices, resume)
    return _fit_slices(
        model, out, slices, done, settings, dim_batch=int(chunk_size), progress=progress
    )


def _corpus_id(corpus: Any, prompts: Sequence[str] | None, prompt_tokens: int) -> str:
    """What a fit's prompts came from, as its saved settings record it."""
    if prompts is not None:
        return "explicit prompts"
    label = (
        corpus
        if isinstance(corpus, (str, os.PathLike))
        else ("embedded" if corpus is None else "texts")
    )
    return f"{os.fspath(label)}:train:{prompt_tokens}"


def _fit_texts(
    model: Any, corpus: Any, prompts: Sequence[str] | None, settings: Mapping[str, Any]
) -> list[str]:
    """The prompts of a fit: ``prompts``, or the corpus's first ``n_prompts`` training windows."""
    n_prompts, prompt_tokens = int(settings["n_prompts"]), int(settings["prompt_tokens"])
    skip, slice_size = int(settings["skip_first_positions"]), int(settings["slice_size"])
    if slice_size < 1 or n_prompts < 1:
        raise ValueError(
            f"slice_size and n_prompts must be positive, got {slice_size} and {n_prompts}."
        )
    if skip + 2 > prompt_tokens and prompts is None:
        raise ValueError(
            f"seq_len={prompt_tokens} leaves no position after skip_first_positions="
            f"{skip} and the last one; use longer prompts or a smaller skip."
        )
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of texts, not one string.")
    texts = (
        list(prompts)
        if prompts is not None
        else _prompt_windows(model, corpus, n_prompts, prompt_tokens, float(settings["holdout"]))
    )
    if not texts:
        raise ValueError("No prompts to fit on; pass a corpus or a non-empty list of prompts.")
    return texts


def _slices_done(
    out: Path, settings: Mapping[str, Any], slices: list[list[str]], resume: bool
) -> list[str]:
    """Digests of the slices already fitted in ``out`` for these prompts and settings."""
    digests = [hashlib.sha256("\x00".join(s).encode()).hexdigest()[:16] for s in slices]
    state_path = out / _STATE
    done: list[str] = []
    if resume and state_path.is_file():
        state = json.loads(state_path.read_text())
        if state.get("settings") != settings:
            raise ValueError(
                f"{out} holds a Jacobian-lens fit with other settings or another model; pass "
                "resume=False (--fresh) to start over, or choose another out_dir."
            )
        done = [d for d, want in zip(state.get("slices", []), digests) if d == want]
    elif not resume and (out / _SLICES).is_dir():
        for p in (out / _SLICES).glob("slice-*.pt"):
            p.unlink()
    return done


def _fit_slices(
    model: Any,
    out: Path,
    slices: list[list[str]],
    done: list[str],
    settings: Mapping[str, Any],
    *,
    dim_batch: int,
    progress: bool,
) -> JacobianLens:
    """Fit the slices not ``done``, saving each and the merge so far; return the merged lens."""
    from tqdm.auto import tqdm

    tl_cls = require_jacobian_lens("fit_jacobian_lens")
    fp, n_layers = settings["model"], int(model.cfg.n_layers)
    digests = [hashlib.sha256("\x00".join(s).encode()).hexdigest()[:16] for s in slices]
    (out / _SLICES).mkdir(parents=True, exist_ok=True)
    total = sum(len(s) for s in slices)
    bar = tqdm(total=total, desc="fitting Jacobian lens", unit="prompt", disable=not progress)
    bar.update(sum(len(s) for s in slices[: len(done)]))
    lens = None
    try:
        for i in range(len(done), len(slices)):
            part = tl_cls.fit(
                model,
                slices[i],
                corpus=settings["corpus"],
                max_seq_len=settings["max_seq_len"],
                skip_first_positions=int(settings["skip_first_positions"]),
                dim_batch=dim_batch,
                show_progress=False,
                metadata={_FP_KEY: fp},
            )
            atomic_write_bytes(
                out / _SLICES / f"slice-{i:04d}.pt", _artifact_bytes(part, torch.float32)
            )
            done.append(digests[i])
            atomic_write_text(
                out / _STATE, json.dumps({"settings": settings, "slices": done}, indent=2)
            )
            bar.update(len(slices[i]))
            lens = _save_merged(out, n_slices=len(done), n_layers=n_layers, fp=fp)
    finally:
        bar.close()
    if lens is None:  # everything was already fitted
        lens = _save_merged(out, n_slices=len(done), n_layers=n_layers, fp=fp)
    return lens


def _save_merged(out: Path, *, n_slices: int, n_layers: int, fp: Mapping[str, Any]) -> JacobianLens:
    tl_cls = require_jacobian_lens()
    parts = load_slices(out)[:n_slices]
    merged = tl_cls.merge(parts) if len(parts) > 1 else parts[0]
    lens = JacobianLens(merged, n_layers, model_info=fp)
    lens.save(out)
    return lens


def prompt_curve(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    corpus: Any = None,
    tokens: int = 512,
    seq_len: int = 128,
    holdout: float = 0.1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Held-out KL of the merge of a fit's first 1, 2, ... slices: how the lens improves with
    prompts.

    Each row has ``n_slices``, ``n_prompts``, ``mean_kl`` (nats, over the lensed layers the Jacobian
    transports, i.e. without the embeddings and the output) and ``kl`` (per residual index).

    Examples:
        >>> import tempfile
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = fit_jacobian_lens(model, prompts=["first prompt", "second prompt"], out_dir=d,
        ...                           slice_size=1, skip_first_positions=2, progress=False)
        ...     rows = prompt_curve(model, d, corpus=["text to read " * 30], tokens=32, seq_len=16,
        ...                         holdout=0.5, progress=False)
        >>> [r["n_prompts"] for r in rows]
        [1, 2]
    """
    from tlmicroscope.lenses.evaluate import evaluate_lens

    tl_cls = require_jacobian_lens("prompt_curve")
    parts = load_slices(out_dir)
    if not parts:
        raise FittedFileError(
            f"No fitted slices under {Path(out_dir) / _SLICES}; run `tlmicroscope fit-jlens` first."
        )
    L = int(model.cfg.n_layers)
    rows = []
    for i in range(1, len(parts) + 1):
        merged = tl_cls.merge(parts[:i]) if i > 1 else parts[0]
        lens = JacobianLens(merged, L, model_info=merged.metadata.get(_FP_KEY))
        ev = evaluate_lens(
            model,
            lens=lens,
            corpus=corpus,
            n_tokens=tokens,
            seq_len=seq_len,
            holdout=holdout,
            baseline=False,
            progress=progress,
        )
        kl = ev.kl.double()
        fitted = [x for x in range(L) if x not in lens.identity_layers]
        rows.append(
            {
                "n_slices": i,
                "n_prompts": lens.n_prompts,
                "mean_kl": float(kl[fitted].mean()) if fitted else float("nan"),
                "kl": kl.tolist(),
                "n_tokens": ev.n_tokens,
            }
        )
    return rows
