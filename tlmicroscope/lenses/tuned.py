"""The tuned lens: one learned affine translator per block input, read through the shared readout.

``TunedLens_l(h) = readout(h + h @ weight[l].T + bias[l])`` for the residual entering block ``l``
(``blocks.{l}.hook_resid_pre``), ``l = 0..n_layers-1``. The translator is added residually and
starts at zero, so an untrained tuned lens *is* the logit lens, exactly; weight decay then pulls it
towards the identity rather than towards zero. The model's own output (residual index
``n_layers``) is never lensed. Training lives in ``tlmicroscope.lenses.train``, evaluation in
``tlmicroscope.lenses.evaluate``; the reference package's ``params.pt`` folders load through
``tlmicroscope.lenses.reference_format``.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float

from tlmicroscope.io import (
    FittedFileError,
    check_fingerprint,
    check_model_shape,
    config_bool,
    config_int,
    load_fitted,
    model_fingerprint,
    save_fitted,
)
from tlmicroscope.lenses import reference_format

__all__ = ["KIND", "TunedLens"]

#: The ``kind`` recorded in a saved tuned lens's ``config.json``.
KIND = "tuned_lens"


class TunedLens(torch.nn.Module):
    """Per-layer affine translators ``h -> h + h @ weight[l].T + bias[l]`` (``nn.Linear`` style).

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``, kind ``"tuned-lens"``):
    ``TunedLens(**settings).fit(model, corpus)`` takes its shapes from the model and trains (the
    settings are ``TrainConfig``'s fields, e.g. ``steps``, ``recipe``); ``save()`` puts it in the
    artifact store and ``TunedLens.load(None, model)`` reads it back. ``TunedLens.for_model(model)``
    builds a zero lens (the logit lens) tied to a model; ``TunedLens(n_layers, d_model)`` one of
    given shapes. Use it wherever a lens is accepted (``prediction_trajectory``, the views, the
    CLI's ``--lens DIR``).

    Args:
        n_layers: Number of translators, one per block input (``None``: from the model at ``fit``).
        d_model: Width of the residual stream (``None``: from the model at ``fit``).
        bias: Learn the bias vectors (``False`` keeps them at zero, as the reference's
            ``bias=False``).
        model_info: The fingerprint (``tlmicroscope.io.model_fingerprint``) of the model the lens
            belongs to; ``check_model`` compares against it.
        settings: Free-form record of how the lens was made (training settings, source format).
        **train: Training settings for ``fit``: fields of ``tlmicroscope.lenses.train.TrainConfig``.

    Attributes:
        weight: ``[n_layers d_model d_model]`` translator matrices (zero = identity translator).
        bias: ``[n_layers d_model]`` translator biases.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> from tlmicroscope.lenses import prediction_trajectory
        >>> model = tiny_model(n_layers=2)
        >>> lens = TunedLens.for_model(model)
        >>> tuple(lens.weight.shape), tuple(lens.bias.shape)
        ((2, 32, 32), (2, 32))
        >>> h = torch.randn(4, 32)
        >>> torch.equal(lens.transform(h, 1), h)  # untrained: exactly the logit lens
        True
        >>> tuned = prediction_trajectory(model, "hello", lens=lens)
        >>> logit = prediction_trajectory(model, "hello")
        >>> torch.equal(tuned.kl, logit.kl), tuned.provenance.lens
        (True, 'tuned')
    """

    name = "tuned"
    final_norm = True
    kind: ClassVar[str] = "tuned-lens"
    #: Training settings ``fit(..., quick=True)`` uses for those not given (the demo's quick
    #: lens; the full one is ``tlmicroscope train-lens``): least squares on 2048 tokens, then two
    #: Muon steps of 512. Measured on SmolLM2-135M (README, "The demo"): after one step the
    #: held-out KL is 4.91 / 2.76 / 0.21 nats at layers 0 / 15 / 29, near the full lens's
    #: 3.59 / 2.18 / 0.15 and far below the logit lens's 106 / 17.1 / 2.55; 8 steps of 128-token
    #: windows took 11.6 min there under load.
    QUICK: ClassVar[dict[str, Any]] = {
        "init_tokens": 2048,
        "steps": 2,
        "seq_len": 256,
        "tokens_per_step": 512,
        "checkpoint_every": 2,
    }

    def __init__(
        self,
        n_layers: int | None = None,
        d_model: int | None = None,
        *,
        bias: bool = True,
        model_info: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
        **train: Any,
    ):
        super().__init__()
        self.train_settings: dict[str, Any] = _check_train_settings(train)
        self.has_bias = bool(bias)
        self.quick = False
        self.model_info: dict[str, Any] | None = dict(model_info) if model_info else None
        self.settings: dict[str, Any] = dict(settings or {})
        self._checked: tuple | None = None
        if (n_layers is None) != (d_model is None):
            raise ValueError(
                "Give both n_layers and d_model, or neither (then fit takes them from the model)."
            )
        self.n_layers, self.d_model = 0, 0
        self.weight = torch.nn.Parameter(torch.zeros(0, 0, 0, dtype=dtype, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(0, 0, dtype=dtype, device=device))
        if n_layers is not None:
            self._allocate(n_layers, d_model, dtype=dtype, device=device)

    def _allocate(self, n_layers: Any, d_model: Any, *, dtype: Any, device: Any) -> None:
        """Zero translators of the given shapes (an untrained lens is the logit lens)."""
        if int(n_layers) <= 0 or int(d_model) <= 0:
            raise ValueError(
                f"n_layers and d_model must be positive, got {n_layers} and {d_model}."
            )
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.weight = torch.nn.Parameter(
            torch.zeros(self.n_layers, self.d_model, self.d_model, dtype=dtype, device=device)
        )
        self.bias = torch.nn.Parameter(
            torch.zeros(self.n_layers, self.d_model, dtype=dtype, device=device),
            requires_grad=self.has_bias,
        )

    # ----------------------------------------------------------------------------- construction
    @classmethod
    def for_model(cls, model: Any, *, bias: bool = True) -> TunedLens:
        """A zero-initialised lens (equal to the logit lens) shaped for ``model`` and tied to it."""
        W_U = model.W_U
        return cls(
            int(model.cfg.n_layers),
            int(model.cfg.d_model),
            bias=bias,
            model_info=model_fingerprint(model),
            device=W_U.device,
        )

    # ---------------------------------------------------------------------------- the protocol
    def _check_layer(self, layer: int) -> int:
        if isinstance(layer, bool):
            raise TypeError("layer must be an int, got bool.")
        try:
            layer = operator.index(layer)
        except TypeError:
            raise TypeError(f"layer must be an int, got {type(layer).__name__}.") from None
        if layer == self.n_layers:
            raise ValueError(
                f"Layer {layer} is the model's output (residual index n_layers={self.n_layers}); "
                "it is read without a translator. Tuned-lens layers are 0..n_layers-1."
            )
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be in 0..{self.n_layers - 1}, got {layer}.")
        return layer

    def transform(
        self, h: Float[torch.Tensor, "... d_model"], layer: int
    ) -> Float[torch.Tensor, "... d_model"]:
        """Translate the residual entering block ``layer``: ``h + h @ W[layer].T + b[layer]``.

        Differentiable in ``h`` and in the parameters. The parameters follow ``h``'s dtype and
        device.
        """
        layer = self._check_layer(layer)
        if h.shape[-1] != self.d_model:
            raise ValueError(
                f"Expected vectors of width d_model={self.d_model}, got {h.shape[-1]}."
            )
        W, b = self.weight[layer], self.bias[layer]
        if W.dtype != h.dtype or W.device != h.device:
            W, b = W.to(h.device, h.dtype), b.to(h.device, h.dtype)
        return h + torch.nn.functional.linear(h, W, b)

    def forward(self, h: torch.Tensor, layer: int) -> torch.Tensor:  # nn.Module entry point
        return self.transform(h, layer)

    def check_model(self, model: Any) -> None:
        """Raise ``ModelMismatchError`` (a ``ValueError``) naming the field that differs."""
        if not self.n_layers:
            raise ValueError(
                "This TunedLens has no translators yet: call .fit(model, corpus), "
                "TunedLens.for_model(model) or TunedLens.load(path, model)."
            )
        check_model_shape(
            model,
            "tuned lens",
            "use the model it was trained for, or train a new lens",
            d_model=self.d_model,
            n_layers=self.n_layers,
        )
        if not self.model_info:
            return
        W_U = model.W_U
        key = (id(model), W_U.data_ptr(), getattr(W_U, "_version", 0))
        if self._checked == key:  # hashing W_U costs ~0.1 s on a real model; check once
            return
        check_fingerprint(self.model_info, model, what="This tuned lens")
        self._checked = key

    # ------------------------------------------------------------------------------- training
    def fit(
        self,
        model: Any,
        corpus: Any = None,
        *,
        n_tokens: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
        **settings: Any,
    ) -> TunedLens:
        """Train this lens on ``corpus`` (default: the embedded corpus) in place with the KL
        objective; returns ``self``. An unshaped lens (``TunedLens()``) takes its shapes from
        ``model``.

        Keyword ``settings`` are fields of ``tlmicroscope.lenses.train.TrainConfig`` (``steps``,
        ``recipe``, ``init``, ``out_dir``, ``resume``, ...) and override those given to
        ``__init__``. The shared names: ``n_tokens`` (training tokens: sets ``steps`` to
        ``n_tokens // tokens_per_step``), ``batch_size`` (windows per forward pass: sets
        ``micro_batch_tokens``), ``seed``, ``progress``; ``quick=True`` takes ``QUICK`` for the
        settings given neither to ``__init__`` nor to ``fit`` (its window shortened to a model's
        shorter context) and records the lens as quick. See ``train_tuned_lens``.

        Examples:
            >>> from tlmicroscope.models import tiny_model
            >>> model = tiny_model(n_layers=2)
            >>> lens = TunedLens(steps=2, tokens_per_step=64, seq_len=32, init_tokens=64,
            ...                  precision="fp32")
            >>> lens = lens.fit(model, ["The tuned lens reads each layer. " * 40], progress=False)
            >>> tuple(lens.weight.shape), lens.settings["steps"]
            ((2, 32, 32), 2)
        """
        from tlmicroscope.lenses.train import TrainConfig, train_tuned_lens

        cfg = {**(self._quick_for(model) if quick else {}), **self.train_settings}
        cfg.update(_check_train_settings(settings))
        cfg["progress"] = bool(progress)
        if seed is not None:
            cfg["seed"] = int(seed)
        seq_len = int(cfg.get("seq_len", TrainConfig.seq_len))
        if batch_size is not None:
            cfg["micro_batch_tokens"] = int(batch_size) * seq_len
        if n_tokens is not None:
            per_step = int(cfg.get("tokens_per_step", TrainConfig.tokens_per_step))
            cfg["steps"] = max(1, int(n_tokens) // per_step)
        if not self.n_layers:
            self.has_bias = bool(cfg.get("bias", self.has_bias))
            self._allocate(
                model.cfg.n_layers,
                model.cfg.d_model,
                dtype=self.weight.dtype,
                device=model.W_U.device,
            )
        self.quick = bool(quick)
        train_tuned_lens(model, corpus, config=TrainConfig(**cfg), lens=self)
        return self

    def _quick_for(self, model: Any) -> dict[str, Any]:
        """``QUICK`` for ``model``: the window no longer than its context, two windows a step."""
        quick = dict(self.QUICK)
        n_ctx = int(getattr(model.cfg, "n_ctx", quick["seq_len"]) or quick["seq_len"])
        if n_ctx < quick["seq_len"]:
            quick["seq_len"] = n_ctx
            quick["tokens_per_step"] = 2 * n_ctx
        return quick

    # ---------------------------------------------------------------------------------- files
    def config(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "bias": self.has_bias,
            "parametrization": "h + h @ weight[l].T + bias[l], readout with the final norm",
            "hook": "blocks.{l}.hook_resid_pre",
            "settings": self.settings,
            "quick": bool(self.quick),
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Save as ``path/tensors.safetensors`` + ``path/config.json`` (atomically); ``path=None``
        saves to the artifact store's place for its model (``artifacts.artifact_path``)."""
        from tlmicroscope.artifacts import save_path

        if not self.n_layers:
            raise ValueError("This TunedLens has no translators yet: call .fit(model) first.")
        tensors = {"weight": self.weight.detach().float(), "bias": self.bias.detach().float()}
        return save_fitted(
            save_path(self.kind, path, self.model_info),
            tensors,
            kind=KIND,
            config=self.config(),
            fingerprint=self.model_info,
        )

    @classmethod
    def _from_reference(cls, path: Path, model: Any) -> TunedLens:
        """A lens from the reference package's ``params.pt`` folder (read by ``TunedLens.load``)."""
        weight, bias, has_bias, settings = reference_format.reference_lens_state(path, model)
        n_layers, d_model = weight.shape[0], weight.shape[1]
        lens = cls(
            n_layers,
            d_model,
            bias=has_bias,
            model_info={"d_model": d_model, "n_layers": n_layers},
            settings=settings,
            device=model.W_U.device if model is not None else None,
        )
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
        return lens

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, model: Any = None) -> TunedLens:
        """Load a saved lens (ours, or the reference package's ``params.pt`` folder);
        ``path=None`` reads the artifact store's lens for ``model``.

        Raises:
            FittedFileError: a missing, truncated or corrupt file, or tensors of the wrong shape.
            ModelMismatchError: ``model`` is not the model the lens was saved for (names the field).
            tlmicroscope.artifacts.MissingArtifactError: ``path=None`` and the store has none.
        """
        from tlmicroscope.artifacts import load_path

        path = load_path(cls.kind, path, model)
        if reference_format.is_reference_folder(path):
            return cls._from_reference(path, model)
        from tlmicroscope.lenses._tuned_checkpoint import _finish_lens_move

        try:  # a training run killed between writing the lens's two files: finish the move
            _finish_lens_move(path)
        except OSError:  # read-only: the pair is still loadable, its config one save behind
            pass
        device = model.W_U.device if model is not None else None
        tensors, meta = load_fitted(path, kind=KIND, model=model, device=device)
        cfg = meta.get("config") or {}
        cfg_file = path / "config.json"  # load_fitted made sure the config is an object
        n_layers, d_model = (
            config_int(cfg, "n_layers", cfg_file),
            config_int(cfg, "d_model", cfg_file),
        )
        has_bias = config_bool(cfg, "bias", cfg_file, default=True)
        settings = cfg.get("settings") or {}
        if not isinstance(settings, dict):
            raise FittedFileError(
                f"{cfg_file}: field 'settings' must be an object, got {type(settings).__name__}."
            )
        weight, bias = tensors.get("weight"), tensors.get("bias")
        if weight is None or bias is None:
            raise FittedFileError(
                f"{path} holds tensors {sorted(tensors)}, expected 'weight' and 'bias'."
            )
        if tuple(weight.shape) != (n_layers, d_model, d_model) or tuple(bias.shape) != (
            n_layers,
            d_model,
        ):
            raise FittedFileError(
                f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match "
                f"the config (n_layers={n_layers}, d_model={d_model}); the file is corrupt."
            )
        if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
            raise FittedFileError(f"{path} holds NaN or infinite translator values; it is corrupt.")
        lens = cls(
            n_layers,
            d_model,
            bias=has_bias,
            model_info=meta.get("model"),
            settings=settings,
            device=device,
        )
        lens.quick = config_bool(cfg, "quick", cfg_file, default=False)
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
        if model is not None:
            lens.check_model(model)
        return lens

    # ------------------------------------------------------------------------------- display
    def extra_repr(self) -> str:
        model = (self.model_info or {}).get("name")
        return (
            f"n_layers={self.n_layers}, d_model={self.d_model}, bias={self.has_bias}, "
            f"model={model!r}"
        )

    def __len__(self) -> int:
        return self.n_layers

    def describe(self) -> str:
        """One line: the model, and how the lens was trained (from ``settings``)."""
        s = self.settings
        parts = [f"tuned lens for {(self.model_info or {}).get('name', '?')}"]
        for key in ("recipe", "init", "steps", "tokens_seen", "source"):
            if key in s:
                parts.append(f"{key}={s[key]}")
        return ", ".join(parts)


def _check_train_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` if every name is a ``TrainConfig`` field, else a ``TypeError`` listing them."""
    import dataclasses

    from tlmicroscope.lenses.train import TrainConfig

    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(settings) - valid)
    if unknown:
        raise TypeError(
            f"Unknown tuned-lens training setting(s) {unknown}; the settings are the fields of "
            f"TrainConfig: {', '.join(sorted(valid))}."
        )
    return dict(settings)
