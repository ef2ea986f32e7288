"""Reading lenses saved by the reference ``tuned-lens`` package (AlignmentResearch/tuned-lens).

Its ``TunedLens.save(folder)`` writes two files:

* ``params.pt``: the translators' state dict, keys ``"{i}.weight"`` ``[d_model d_model]`` and
  ``"{i}.bias"`` ``[d_model]`` for ``i = 0..L-1`` (``nn.Linear`` convention, the same as ours);
* ``config.json``: ``base_model_name_or_path``, ``d_model``, ``num_hidden_layers``, ``bias``,
  ``lens_type`` (``"linear_tuned_lens"``) and ``unembed_hash``.

``params.pt`` is read with ``torch.load(weights_only=True)`` only, which cannot run code from the
file. Translator ``i`` reads ``hidden_states[i]`` of the Hugging Face model, which is
``blocks.{i}.hook_resid_pre`` in TransformerLens terms, so the tensors map one to one. The
reference hashes its unembedding with ``np.array_str(W.float(), precision=1)`` (a summary of the
matrix's corners, which changed between its versions); a differing hash is therefore only a
warning, while a differing ``d_model`` or layer count is refused.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.io import (
    FittedFileError,
    ModelMismatchError,
    config_bool,
    config_int,
    json_type,
)

__all__ = [
    "is_reference_folder",
    "read_reference_lens",
    "reference_lens_state",
    "reference_unembed_hash",
]

_PARAMS = "params.pt"
_CONFIG = "config.json"
_KEY = re.compile(r"^(?:layer_translators\.)?(\d+)\.(weight|bias)$")


def is_reference_folder(path: str | Path) -> bool:
    """True for a folder holding the reference package's ``params.pt`` (and no tlmicroscope
    tensors)."""
    path = Path(path)
    return (path / _PARAMS).is_file() and not (path / "tensors.safetensors").is_file()


def reference_unembed_hash(model: Any) -> str:
    """The reference's ``unembed_hash`` of ``model``: sha256 of ``np.array_str(W, precision=1)``.

    ``W`` is the unembedding in ``nn.Linear`` layout ``[d_vocab d_model]`` (``W_U.T``), as the
    reference reads it from a Hugging Face model's output embedding.
    """
    import numpy as np

    W = model.W_U.detach().to("cpu", torch.float32).T.contiguous().numpy()
    return hashlib.sha256(np.array_str(W, precision=1).encode()).hexdigest()


def _read_config(path: Path, model: Any) -> tuple[dict[str, Any], int, int, bool]:
    """The folder's ``config.json``, every field checked for type and value (and against
    ``model``)."""
    cfg_path = path / _CONFIG
    if not cfg_path.is_file():
        raise FittedFileError(
            f"{path} has {_PARAMS} but no {_CONFIG}; a reference lens folder needs both."
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise FittedFileError(
            f"{cfg_path} is not valid JSON ({exc}); the file is corrupt."
        ) from exc
    if not isinstance(cfg, dict):
        raise FittedFileError(
            f"{cfg_path} holds a JSON {json_type(cfg)}, not an object; a reference lens config is "
            "an object with d_model, num_hidden_layers, bias, ..."
        )
    lens_type = cfg.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise FittedFileError(
            f"{path} holds a {lens_type!r}; only 'linear_tuned_lens' can be read."
        )
    for key in ("base_model_name_or_path", "unembed_hash"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise FittedFileError(
                f"{cfg_path}: field {key!r} must be a string, got {json_type(cfg[key])}."
            )
    d_model = config_int(cfg, "d_model", cfg_path)
    n_layers = config_int(cfg, "num_hidden_layers", cfg_path)
    has_bias = config_bool(cfg, "bias", cfg_path, default=True)
    if model is not None:  # before reading params.pt or allocating anything
        for field, ours, theirs in (
            ("d_model", d_model, int(model.cfg.d_model)),
            ("num_hidden_layers", n_layers, int(model.cfg.n_layers)),
        ):
            if ours != theirs:
                raise ModelMismatchError(
                    f"The reference lens at {path} was saved for another model: field {field!r} is "
                    f"{ours} in {cfg_path} but {theirs} for this model "
                    f"({cfg.get('base_model_name_or_path')!r}; load the lens with the model it was "
                    "trained for)."
                )
    return cfg, d_model, n_layers, has_bias


def read_reference_lens(
    path: str | Path, model: Any = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Read a reference folder into stacked ``weight [L d d]``, ``bias [L d]`` and its config.

    ``config.json`` is checked first (field types and values, and ``d_model`` and the layer count
    against ``model`` when given); nothing is allocated beyond what ``params.pt`` holds.

    Raises:
        FittedFileError: a missing, truncated or corrupt file; a config field of the wrong type or
            value (the message names the file and the field); a pickle that holds code or anything
            but tensors; missing or misshapen translators.
        ModelMismatchError: ``model`` has another ``d_model`` or layer count than ``config.json``.

    Examples:
        >>> import json, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> params = {"0.weight": torch.zeros(4, 4), "0.bias": torch.ones(4)}
        >>> torch.save(params, folder / "params.pt")
        >>> config = json.dumps({"d_model": 4, "num_hidden_layers": 1})
        >>> _ = (folder / "config.json").write_text(config)
        >>> weight, bias, cfg = read_reference_lens(folder)
        >>> tuple(weight.shape), bias.tolist()
        ((1, 4, 4), [[1.0, 1.0, 1.0, 1.0]])
    """
    path = Path(path)
    params = path / _PARAMS
    cfg, d_model, n_layers, has_bias = _read_config(path, model)
    try:
        # weights_only=True: only tensors and plain containers, never code from the file.
        state = torch.load(params, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise FittedFileError(
            f"{params} holds more than tensors (weights_only loading refused it: {exc}). "
            "tlmicroscope never unpickles code; re-save the lens's state dict with plain tensors."
        ) from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise FittedFileError(f"{params} is truncated or corrupt: {exc}") from exc
    if not isinstance(state, dict):
        raise FittedFileError(f"{params} holds a {type(state).__name__}, not a state dict.")

    found: dict[tuple[int, str], torch.Tensor] = {}
    for key, value in state.items():
        m = _KEY.match(str(key))
        if m is None or not isinstance(value, torch.Tensor):
            raise FittedFileError(
                f"{params} has an entry {key!r} that is not a translator '{{i}}.weight' or "
                "'{i}.bias'; this lens type (low-rank, extra layers, ...) is not supported."
            )
        i, what = int(m.group(1)), m.group(2)
        want = (d_model, d_model) if what == "weight" else (d_model,)
        if not 0 <= i < n_layers or tuple(value.shape) != want:
            raise FittedFileError(
                f"{params}: {key} has shape {tuple(value.shape)} (layer {i}); expected {want} for "
                f"layers 0..{n_layers - 1} as config.json says (d_model={d_model}, "
                f"num_hidden_layers={n_layers})."
            )
        found[(i, what)] = value
    missing = [i for i in range(n_layers) if (i, "weight") not in found]
    if missing:
        raise FittedFileError(
            f"{params} has no weight for layers {missing}; the file is incomplete."
        )
    if has_bias and any((i, "bias") not in found for i in range(n_layers)):
        raise FittedFileError(f"{params} lacks some biases although config.json says bias=true.")
    if not has_bias and any(what == "bias" for _, what in found):
        raise FittedFileError(
            f"{params} holds biases although config.json says bias=false; the two files do not "
            "belong together (the reference package refuses this folder too)."
        )
    # Every layer's weight is in the file with the config's shape, so this is the file's own size.
    weight = torch.stack([found[(i, "weight")].float() for i in range(n_layers)])
    zero = torch.zeros(d_model)
    bias = torch.stack([found.get((i, "bias"), zero).float() for i in range(n_layers)])
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise FittedFileError(f"{params} holds NaN or infinite values; it is corrupt.")
    return weight, bias, cfg


def reference_lens_state(
    path: str | Path, model: Any = None
) -> tuple[torch.Tensor, torch.Tensor, bool, dict[str, Any]]:
    """What a ``TunedLens`` is built from: ``(weight, bias, has_bias, settings)`` of a reference
    folder, checked against ``model`` when given (``TunedLens.load`` builds the lens; this module
    never imports the class, so the two do not import each other).

    Raises:
        FittedFileError: see ``read_reference_lens``.
        ModelMismatchError: the lens's ``d_model`` or layer count differs from the model's.

    Examples:
        >>> import tempfile
        >>> from tlmicroscope.io import FittedFileError
        >>> try:
        ...     reference_lens_state(tempfile.mkdtemp())
        ... except FittedFileError as exc:
        ...     print("needs both" in str(exc))
        True
    """
    path = Path(path)
    weight, bias, cfg = read_reference_lens(path, model)
    if model is not None:
        saved_hash = cfg.get("unembed_hash")
        if saved_hash and saved_hash != reference_unembed_hash(model):
            warnings.warn(
                f"The reference lens at {path} records another unembedding hash than this model's. "
                "The reference's hash changed between its versions, so this may be harmless; "
                f"check that the lens was trained for {cfg.get('base_model_name_or_path')!r} "
                "without weight processing (load the model with process_weights=False).",
                UserWarning,
                stacklevel=3,
            )
    settings = {
        "source": "tuned-lens reference format",
        "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        "unembed_hash": cfg.get("unembed_hash"),
    }
    return weight, bias, config_bool(cfg, "bias", path / _CONFIG, default=True), settings
