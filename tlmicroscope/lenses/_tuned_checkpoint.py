"""Checkpoints of tuned-lens training and the output folder's layout.

``out_dir/`` holds the lens itself (``tensors.safetensors`` + ``config.json``, so
``load_lens(out_dir)`` works), ``out_dir/checkpoint/`` the training state (lens, optimizer state,
step, history, the settings and a signature of the data) and ``out_dir/training.json`` the learning
curve. Everything goes through ``tlmicroscope.io``: written atomically, so an interrupted or failed
save leaves the previous checkpoint whole, and read back without pickle.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tlmicroscope.io import load_fitted, save_fitted
from tlmicroscope.lenses._tuned_optim import flatten_state, unflatten_state

__all__ = ["CHECKPOINT_DIR", "default_lens_dir"]

CHECKPOINT_DIR = "checkpoint"
_CKPT_KIND = "tuned_lens_checkpoint"
# Settings that change the result: a checkpoint resumes only under the same values.
_RESUME_KEYS = (
    "steps",
    "tokens_per_step",
    "seq_len",
    "recipe",
    "lr",
    "bias_lr",
    "weight_decay",
    "momentum",
    "warmup_steps",
    "clip_grad_norm",
    "init",
    "init_tokens",
    "precision",
    "holdout",
    "seed",
    "bias",
)


def _train_settings(cfg: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in dataclasses.asdict(cfg).items()
        if k not in ("out_dir", "resume", "progress", "stop_after", "max_seconds")
    }


_STAGING = ".lens-staging"
_LENS_FILES = ("tensors.safetensors", "config.json")


def _finish_lens_move(out: Path) -> None:
    """Complete a ``_save_lens_into`` that was stopped between moving its two files.

    ``.lens-staging`` is written whole (an atomic folder) before any file leaves it, and the files
    leave in a fixed order, so what is still in it belongs in ``out``: moving it finishes the save
    and puts back a config that matches the tensors.
    """
    staging = out / _STAGING
    if not staging.is_dir():
        return
    if not (staging / _LENS_FILES[0]).exists():  # the tensors went in: the config follows them
        for name in _LENS_FILES[1:]:
            if (staging / name).is_file():
                os.replace(staging / name, out / name)
    # else nothing was moved yet and ``out`` still holds the previous, matching pair
    shutil.rmtree(staging, ignore_errors=True)


def _save_lens_into(out: Path, lens: Any) -> None:
    """Write the lens's two files into ``out`` (which also holds the checkpoint), each atomically.

    A kill between the two moves leaves the config in ``.lens-staging``; the next save or resume
    moves it in first (``_finish_lens_move``).
    """
    _finish_lens_move(out)
    staging = out / _STAGING
    lens.save(staging)  # an atomic folder; then move its files in, tensors before config
    for name in _LENS_FILES:
        os.replace(staging / name, out / name)
    staging.rmdir()


def _save_checkpoint(
    out: Path, lens, optimizers, step: int, history: dict, cfg: Any, data_sig: dict
) -> None:
    tensors, opt_meta = flatten_state(optimizers)
    tensors = {"lens.weight": lens.weight.detach(), "lens.bias": lens.bias.detach(), **tensors}
    config = {
        "step": step,
        "settings": _train_settings(cfg),
        "optimizers": opt_meta,
        "history": history,
        "data": data_sig,
    }
    save_fitted(
        out / CHECKPOINT_DIR, tensors, kind=_CKPT_KIND, config=config, fingerprint=lens.model_info
    )


def _load_checkpoint(out: Path, model: Any, lens, optimizers, cfg: Any, data_sig: dict):
    tensors, meta = load_fitted(out / CHECKPOINT_DIR, kind=_CKPT_KIND, model=model)
    saved = meta["config"]
    now = _train_settings(cfg)
    for key in _RESUME_KEYS:
        if saved["settings"].get(key) != now.get(key):
            raise ValueError(
                f"Cannot resume from {out / CHECKPOINT_DIR}: it was trained with {key}="
                f"{saved['settings'].get(key)!r}, this run asks for {now.get(key)!r}. Use the same "
                "settings, or a new output folder."
            )
    for key in ("corpus", "n_windows", "sha256"):
        if saved["data"].get(key) != data_sig.get(key):
            raise ValueError(
                f"Cannot resume from {out / CHECKPOINT_DIR}: the training data differ ({key}: "
                f"{saved['data'].get(key)!r} then, {data_sig.get(key)!r} now). Pass the same "
                "corpus."
            )
    with torch.no_grad():
        lens.weight.copy_(tensors["lens.weight"])
        lens.bias.copy_(tensors["lens.bias"])
    unflatten_state(optimizers, tensors, saved["optimizers"])
    return int(saved["step"]), saved["history"]


def default_lens_dir(
    model_or_name: Any, root: str | os.PathLike | None = None, *, processed: bool | None = None
) -> Path:
    """Where ``train-lens`` writes by default, and ``tlmicroscope demo`` and ``report`` look: the
    artifact store's ``tuned-lens`` folder for the model (``artifacts.artifact_path("tuned-lens",
    model)``: ``smollm2-135m`` and ``gemma3-270m`` for the two embedded models, whichever of their
    names or hub labels is given, ``-processed`` for processed weights: a loaded model says, for a
    name pass ``processed``). With ``root``, the layout of earlier versions:
    ``root/tuned-lens-<model>/`` (e.g. ``root="out"``).

    Examples:
        >>> default_lens_dir("HuggingFaceTB/SmolLM2-135M-Instruct").parts[-2:]
        ('smollm2-135m', 'tuned-lens')
        >>> default_lens_dir("gemma-3-270m", root="out").as_posix()
        'out/tuned-lens-gemma3-270m'
    """
    from tlmicroscope.artifacts import artifact_path, model_key

    if root is None:
        return artifact_path("tuned-lens", model_or_name, processed=processed)
    slug = model_key(model_or_name, processed=False)  # the store's naming, without the suffix
    return Path(root) / f"tuned-lens-{slug}"
