"""``geometry_sweep``: token geometry of many prompts at several shuffle levels, resumable.

For every prompt, shuffle level S and seed, the prompt is block-shuffled (``shuffle_tokens``;
S = 0 is the original text and is run once), run through the model once, and its
``layer_geometry`` (ID per layer and scale, overlap, cosine, loss on the shuffled sequence, logits
ID, contextual entropy) is appended to a JSONL file as one line. The first line is a header with
the settings, a hash of the prompts and the model's fingerprint; an interrupted sweep started
again with the same settings skips the finished lines (a torn last line is dropped), and one
started with other settings is refused, naming what differs.

Under ``torchrun`` each rank takes every ``world_size``-th work item and appends to its own part
file ``OUT.rank{r}``; at the end rank 0 merges the main file and all parts into ``OUT`` (sorted,
atomically) and removes the parts. Shuffles are seeded by ``(seed, prompt, S)``, so the result
does not depend on the number of processes or on where a run was interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tlmicroscope.corpus import token_windows
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.distributed import dist_context
from tlmicroscope.geometry.layer_geometry import layer_geometry
from tlmicroscope.geometry.shuffle import max_shuffle_level, shuffle_tokens
from tlmicroscope.io import atomic_write_text, check_fingerprint, model_fingerprint
from tlmicroscope.layers import residual_labels

__all__ = ["SWEEP_FORMAT", "GeometrySweep", "geometry_sweep", "load_geometry_sweep"]

SWEEP_FORMAT = "tlmicroscope.geometry_sweep/1"


@dataclass(frozen=True)
class GeometrySweep:
    """The records of a sweep, one per (prompt, shuffle level, seed), sorted.

    Attributes:
        header: Settings, prompt hash and model fingerprint.
        records: Each has ``prompt``, ``shuffle``, ``seed`` and the fields of
            ``LayerGeometry.to_record()`` (``gride`` is ``[layer][scale]``, ``overlap`` is
            ``[layer_pair][k]``).
        path: The JSONL file it was read from or written to.
    """

    header: dict[str, Any]
    records: list[dict[str, Any]]
    path: Path | None = None

    @property
    def shuffle_levels(self) -> tuple[int, ...]:
        return tuple(sorted({r["shuffle"] for r in self.records}))

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.records[0]["layers"]) if self.records else ()

    @property
    def gride_scales(self) -> tuple[int, ...]:
        return tuple(self.records[0]["gride_scales"]) if self.records else ()

    @property
    def overlap_k(self) -> tuple[int, ...]:
        return tuple(self.records[0]["overlap_k"]) if self.records else ()

    @property
    def layer_labels(self) -> tuple[str, ...]:
        """``"h0"``..``"hL"`` (``"hL·norm"`` when the final norm was applied), one per layer."""
        n = len(self.layers) - 1
        norm = self.header.get("settings", {}).get("final_norm", True)
        return residual_labels(n, final_norm=bool(norm), indices=self.layers)

    def select(self, shuffle: int = 0) -> list[dict[str, Any]]:
        """The records at one shuffle level (all seeds), in prompt order."""
        rows = [r for r in self.records if r["shuffle"] == shuffle]
        if not rows:
            raise ValueError(
                f"No records at shuffle level {shuffle}; levels are {self.shuffle_levels}."
            )
        return rows

    def metric(self, name: str, shuffle: int = 0, *, scale: int = 2, k: int = 2) -> np.ndarray:
        """A per-layer metric ``[record layer]`` at one shuffle level.

        ``name`` is ``"gride"`` (at ``scale``), ``"gride_error"``, ``"twonn"``, ``"overlap"`` (at
        ``k``; one column per layer pair), ``"cosine"``, ``"cosine_with_diagonal"`` or
        ``"n_unique"``.
        """
        rows = self.select(shuffle)
        if name in ("gride", "gride_error"):
            j = self._index(self.gride_scales, scale, "scale")
            return np.array([[v[j] for v in r[name]] for r in rows], dtype=float)
        if name == "overlap":
            j = self._index(self.overlap_k, k, "k")
            return np.array([[v[j] for v in r["overlap"]] for r in rows], dtype=float)
        if name in ("twonn", "cosine", "cosine_with_diagonal", "n_unique"):
            return np.array([r[name] for r in rows], dtype=float)
        raise ValueError(f"Unknown metric {name!r}.")

    def scalar(self, name: str, shuffle: int = 0) -> np.ndarray:
        """A per-record number (``"loss"``, ``"contextual_entropy"``) at one shuffle level."""
        return np.array([r[name] for r in self.select(shuffle)], dtype=float)

    def logits_id(self, shuffle: int = 0, *, scale: int = 2) -> np.ndarray:
        j = self._index(self.gride_scales, scale, "scale")
        return np.array([r["logits_gride"][j] for r in self.select(shuffle)], dtype=float)

    @staticmethod
    def _index(values: Sequence[int], v: int, what: str) -> int:
        if v not in values:
            raise ValueError(f"{what}={v} was not computed; available: {tuple(values)}.")
        return list(values).index(v)

    def to_dataframe(self):
        """Long format: one row per (prompt, shuffle, seed, layer) with every per-layer metric."""
        import pandas as pd

        rows = []
        for r in self.records:
            for li, layer in enumerate(r["layers"]):
                row = {
                    "prompt": r["prompt"],
                    "shuffle": r["shuffle"],
                    "seed": r["seed"],
                    "layer": layer,
                    "loss": r["loss"],
                    "contextual_entropy": r["contextual_entropy"],
                }
                row.update(
                    {f"gride_{s}": r["gride"][li][j] for j, s in enumerate(r["gride_scales"])}
                )
                row["twonn"] = r["twonn"][li]
                for j, k in enumerate(r["overlap_k"]):
                    row[f"overlap_{k}"] = (
                        r["overlap"][li][j] if li < len(r["overlap"]) else float("nan")
                    )
                row["cosine"] = r["cosine"][li]
                row["cosine_with_diagonal"] = r["cosine_with_diagonal"][li]
                rows.append(row)
        return pd.DataFrame(rows)


def _key(rec: dict[str, Any]) -> tuple[int, int, int]:
    return (int(rec["prompt"]), int(rec["shuffle"]), int(rec["seed"]))


def _read_jsonl(path: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]], int]:
    """Header, records, and the byte length of the intact prefix (a torn last line is dropped)."""
    if not path.is_file():
        return None, [], 0
    data = path.read_bytes()
    header, records, good = None, [], 0
    pos = 0
    for line in data.splitlines(keepends=True):
        end = pos + len(line)
        if not line.endswith(b"\n"):
            break  # torn final line of an interrupted write
        try:
            obj = json.loads(line)
        except ValueError:
            if end == len(data):
                break
            raise ValueError(
                f"{path} is corrupt at byte {pos}: a line is not JSON. Move it away to start over."
            ) from None
        if header is None:
            if obj.get("format") != SWEEP_FORMAT:
                raise ValueError(
                    f"{path} is not a tlmicroscope geometry sweep (no {SWEEP_FORMAT!r} header)."
                )
            header = obj
        else:
            records.append(obj)
        pos = good = end
    return header, records, good


def load_geometry_sweep(path: str | os.PathLike) -> GeometrySweep:
    """Read a sweep file (and any unmerged rank part files next to it)."""
    path = Path(path)
    header, records, _ = _read_jsonl(path)
    for part in sorted(path.parent.glob(path.name + ".rank*")):
        h, recs, _ = _read_jsonl(part)
        header = header or h
        records += recs
    if header is None:
        raise FileNotFoundError(f"No geometry sweep at {path}.")
    unique = {_key(r): r for r in records}
    return GeometrySweep(header, [unique[k] for k in sorted(unique)], path)


def _prompt_hash(prompts: torch.Tensor) -> str:
    return hashlib.sha256(prompts.to(torch.int64).cpu().contiguous().numpy().tobytes()).hexdigest()


def _prompts(
    model: Any, prompts: Any, seq_len: int, n_windows: int, window_seed: int
) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        t = prompts if prompts.ndim == 2 else prompts.unsqueeze(0)
    elif isinstance(prompts, np.ndarray):
        t = torch.as_tensor(prompts)
    elif isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], torch.Tensor):
        lengths = {len(p.reshape(-1)) for p in prompts}
        if len(lengths) > 1:
            raise ValueError(
                f"Token prompts must have equal lengths for a sweep, got {sorted(lengths)}."
            )
        t = torch.stack([p.reshape(-1) for p in prompts])
    else:
        t = token_windows(
            model, prompts, seq_len=seq_len, n_windows=n_windows, shuffle=True, seed=window_seed
        )
    if t.is_floating_point():
        raise ValueError("Prompts must be token ids (integers) or a corpus source.")
    return t.long().cpu()


def _work(
    n_prompts: int, levels: Sequence[int], seeds: Sequence[int]
) -> list[tuple[int, int, int]]:
    """(prompt, S, seed); S = 0 is the unshuffled prompt and runs once (with the first seed)."""
    return [
        (p, s, seed)
        for p in range(n_prompts)
        for s in levels
        for seed in (seeds[:1] if s == 0 else seeds)
    ]


def _append(path: Path, obj: dict[str, Any]) -> None:
    line = (json.dumps(obj, allow_nan=True) + "\n").encode()
    with open(path, "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


def _levels_and_seeds(
    shuffle_levels: Sequence[int] | None, seeds: Sequence[int], n_pos: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shuffle levels (default all for ``n_pos`` tokens) and seeds, checked."""
    top = max_shuffle_level(n_pos)
    levels = (
        tuple(range(top + 1)) if shuffle_levels is None else tuple(int(s) for s in shuffle_levels)
    )
    if not levels or min(levels) < 0 or max(levels) > top:
        raise ValueError(
            f"Shuffle levels must lie in 0..{top} for {n_pos}-token prompts, got {levels}."
        )
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("Pass at least one shuffle seed.")
    return levels, seeds


def _check_resumable(
    existing: GeometrySweep, out: Path, settings: dict[str, Any], model: Any, resume: bool
) -> None:
    """Refuse to append to ``out`` unless resuming it with the same settings and model."""
    if not resume:
        raise ValueError(f"{out} already exists; pass resume=True to continue it, or another path.")
    old = existing.header.get("settings", {})
    for key, val in settings.items():
        if old.get(key) != val:
            raise ValueError(
                f"{out} was written with {key}={old.get(key)!r}, not {val!r}; a resumed sweep "
                "must use the same settings. Pass another --out path to start a new sweep."
            )
    check_fingerprint(existing.header.get("model", {}), model, what=f"The sweep {out}")


@renamed_arguments(renamed={"prompts": "corpus"})
def geometry_sweep(
    model: Any,
    corpus: Any = None,
    *,
    out: str | os.PathLike,
    seq_len: int = 1024,
    n_windows: int = 50,
    window_seed: int = 0,
    shuffle_levels: Iterable[int] | None = None,
    seeds: Sequence[int] = (0,),
    max_scale: int | None = None,
    overlap_k: Sequence[int] = (1, 2, 3, 4, 5, 6),
    twonn_variant: str = "base",
    final_norm: bool = True,
    resume: bool = True,
    progress: bool = True,
) -> GeometrySweep:
    """Token geometry of a corpus of prompts at several shuffle levels, written as it goes.

    Args:
        model: A TransformerLens model.
        corpus: A corpus source for ``token_windows`` (``None`` = the embedded corpus), cut into
            ``n_windows`` windows of ``seq_len`` tokens chosen with ``window_seed``; or the prompts
            themselves, token ids ``[n pos]`` (or a list of equal-length id tensors). The old
            keyword ``prompts=`` still works for one release, with a ``DeprecationWarning``.
        out: The JSONL file (created, or resumed).
        seq_len: Window length; the paper uses 1024 and notes IDs need about 500 tokens or more.
        shuffle_levels: Shuffle indices S (default 0..the largest with 4^S <= seq_len).
        seeds: Shuffle seeds; each S > 0 runs once per seed.
        max_scale, overlap_k, twonn_variant, final_norm: Passed to ``layer_geometry``.
        resume: Continue an existing file with the same settings (``False``: refuse to touch it).
        progress: Show a tqdm progress bar (rank 0).

    Raises:
        ValueError: ``out`` exists with other settings, another model or other prompts (the
            message names the field), or ``resume=False`` and ``out`` exists.

    Examples:
        >>> import tempfile, os
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> prompts = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
        >>> path = os.path.join(tempfile.mkdtemp(), "sweep.jsonl")
        >>> sweep = geometry_sweep(model, prompts, out=path, shuffle_levels=(0, 3), progress=False)
        >>> len(sweep.records), sweep.metric("gride", 3).shape
        (4, (2, 3))
    """
    out = Path(out)
    ctx = dist_context()
    toks = _prompts(model, corpus, seq_len, n_windows, window_seed)
    n_pos = toks.shape[1]
    levels, seeds = _levels_and_seeds(shuffle_levels, seeds, n_pos)
    settings = {
        "n_prompts": int(toks.shape[0]),
        "seq_len": int(n_pos),
        "shuffle_levels": list(levels),
        "seeds": list(seeds),
        "max_scale": max_scale,
        "overlap_k": [int(k) for k in overlap_k],
        "twonn_variant": twonn_variant,
        "final_norm": final_norm,
        "prompts_sha256": _prompt_hash(toks),
    }
    header = {"format": SWEEP_FORMAT, "settings": settings, "model": model_fingerprint(model)}
    existing = (
        load_geometry_sweep(out)
        if (out.exists() or any(out.parent.glob(out.name + ".rank*")))
        else None
    )
    if existing is not None:
        _check_resumable(existing, out, settings, model, resume)
    done = {_key(r) for r in existing.records} if existing is not None else set()
    todo = [w for w in _work(int(toks.shape[0]), levels, seeds) if w not in done]
    mine = todo[ctx.rank :: ctx.world_size]
    target = out if ctx.world_size == 1 else out.with_name(f"{out.name}.rank{ctx.rank}")
    if ctx.is_main and not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(header) + "\n")
    ctx.barrier()
    good = _read_jsonl(target)[2] if target.exists() else 0
    if good and target.stat().st_size > good:  # drop a torn last line before appending
        with open(target, "r+b") as f:
            f.truncate(good)
    elif not good:
        atomic_write_text(target, json.dumps(header) + "\n")
    from tqdm.auto import tqdm

    bar = tqdm(mine, desc="geometry sweep", unit="prompt", disable=not (progress and ctx.is_main))
    for prompt, level, seed in bar:
        ids = toks[prompt]
        if level:
            ids = shuffle_tokens(ids, level, np.random.default_rng([seed, prompt, level]))
        geo = layer_geometry(
            model,
            ids,
            max_scale=max_scale,
            overlap_k=overlap_k,
            twonn_variant=twonn_variant,
            final_norm=final_norm,
        )
        _append(target, {"prompt": prompt, "shuffle": level, "seed": seed, **geo.to_record()})
        bar.set_postfix(S=level, loss=f"{geo.loss:.2f}", peak=geo.peak_layer())
    ctx.barrier()
    if ctx.is_main:
        merged = load_geometry_sweep(out)
        text = (
            json.dumps(merged.header)
            + "\n"
            + "".join(json.dumps(r, allow_nan=True) + "\n" for r in merged.records)
        )
        atomic_write_text(out, text)
        for part in out.parent.glob(out.name + ".rank*"):
            part.unlink()
    ctx.barrier()
    return load_geometry_sweep(out)
