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
from typing import Any

import torch
from jaxtyping import Float

from tlmicroscope.io import (
    FittedFileError,
    _config_bool,
    _config_int,
    check_fingerprint,
    check_model_shape,
    load_fitted,
    model_fingerprint,
    save_fitted,
)

__all__ = ["KIND", "TunedLens"]

#: The ``kind`` recorded in a saved tuned lens's ``config.json``.
KIND = "tuned_lens"


class TunedLens(torch.nn.Module):
    """Per-layer affine translators ``h -> h + h @ weight[l].T + bias[l]`` (``nn.Linear`` convention).

    Build one for a model with ``TunedLens.for_model(model)`` (zero translators: the logit lens),
    train it with ``fit`` (or ``tlmicroscope.lenses.train.train_tuned_lens``), and use it wherever
    a lens is accepted (``prediction_trajectory``, the views, the CLI's ``--lens DIR``).

    Args:
        n_layers: Number of translators, one per block input.
        d_model: Width of the residual stream.
        bias: Learn the bias vectors (``False`` keeps them at zero, as the reference's ``bias=False``).
        model_info: The fingerprint (``tlmicroscope.io.model_fingerprint``) of the model the lens
            belongs to; ``check_model`` compares against it.
        settings: Free-form record of how the lens was made (training settings, source format).

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

    def __init__(
        self,
        n_layers: int,
        d_model: int,
        *,
        bias: bool = True,
        model_info: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
        device: Any = None,
    ):
        super().__init__()
        if int(n_layers) <= 0 or int(d_model) <= 0:
            raise ValueError(
                f"n_layers and d_model must be positive, got {n_layers} and {d_model}."
            )
        self.n_layers = int(n_layers)
        self.d_model = int(d_model)
        self.has_bias = bool(bias)
        self.weight = torch.nn.Parameter(
            torch.zeros(self.n_layers, self.d_model, self.d_model, dtype=dtype, device=device)
        )
        self.bias = torch.nn.Parameter(
            torch.zeros(self.n_layers, self.d_model, dtype=dtype, device=device),
            requires_grad=self.has_bias,
        )
        self.model_info: dict[str, Any] | None = dict(model_info) if model_info else None
        self.settings: dict[str, Any] = dict(settings or {})
        self._checked: tuple | None = None

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
        """Translate the residual entering block ``layer``: ``h + h @ weight[layer].T + bias[layer]``.

        Differentiable in ``h`` and in the parameters. The parameters follow ``h``'s dtype and device.
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
        """Raise ``ModelMismatchError`` (a ``ValueError``) naming the field where ``model`` differs."""
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
    def fit(self, model: Any, corpus: Any = None, **settings: Any) -> TunedLens:
        """Train this lens on ``corpus`` in place with the KL objective; returns ``self``.

        Keyword arguments are the fields of ``tlmicroscope.lenses.train.TrainConfig`` (``steps``,
        ``recipe``, ``init``, ``out_dir``, ``resume``, ...). See ``train_tuned_lens``.
        """
        from tlmicroscope.lenses.train import TrainConfig, train_tuned_lens

        train_tuned_lens(model, corpus, TrainConfig(**settings), lens=self)
        return self

    # ---------------------------------------------------------------------------------- files
    def config(self) -> dict[str, Any]:
        return {
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "bias": self.has_bias,
            "parametrization": "h + h @ weight[l].T + bias[l], readout with the final norm",
            "hook": "blocks.{l}.hook_resid_pre",
            "settings": self.settings,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Save as ``path/tensors.safetensors`` + ``path/config.json`` (atomically)."""
        tensors = {"weight": self.weight.detach().float(), "bias": self.bias.detach().float()}
        return save_fitted(
            path, tensors, kind=KIND, config=self.config(), fingerprint=self.model_info
        )

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> TunedLens:
        """Load a saved lens (ours, or the reference package's ``params.pt`` folder).

        Raises:
            FittedFileError: a missing, truncated or corrupt file, or tensors of the wrong shape.
            ModelMismatchError: ``model`` is not the model the lens was saved for (names the field).
        """
        from tlmicroscope.lenses import reference_format

        path = Path(path)
        if reference_format.is_reference_folder(path):
            return reference_format.load_reference_lens(path, model)
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
            _config_int(cfg, "n_layers", cfg_file),
            _config_int(cfg, "d_model", cfg_file),
        )
        has_bias = _config_bool(cfg, "bias", cfg_file, default=True)
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
                f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match the "
                f"config (n_layers={n_layers}, d_model={d_model}); the file is corrupt."
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
        with torch.no_grad():
            lens.weight.copy_(weight)
            lens.bias.copy_(bias)
        if model is not None:
            lens.check_model(model)
        return lens

    # ------------------------------------------------------------------------------- display
    def extra_repr(self) -> str:
        model = (self.model_info or {}).get("name")
        return f"n_layers={self.n_layers}, d_model={self.d_model}, bias={self.has_bias}, model={model!r}"

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
