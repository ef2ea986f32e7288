"""``lens_bench``: every lens compared on the same held-out tokens, the same metrics, the same
model.

For each lens (the logit lens, a tuned lens, a Jacobian lens, any ``Lens``) it gathers, from the
toolkit's own analyses run on one set of held-out windows:

* per layer, ``KL(final || lens)``, the next-token cross-entropy and the bias (KL between the
  corpus-marginal distributions), in nats and bits per byte (``evaluate_lens``);
* the prediction depth of every token (``causal.prediction_depth``): the first layer from which
  the lens's top-1 agrees with the model's output at every later layer;
* causal fidelity of the lens's own causal basis (``causal.extract_causal_basis`` then
  ``causal.causal_fidelity``): Spearman's rho between each direction's influence on the lens and
  on the model, at the chosen layers;
* stimulus-response alignment (``causal.stimulus_response_alignment``) at every chosen layer.

The result is a ``LensBench``: numbers only, with a summary ``table()`` and an atomic JSON file.
Its page and figures live in ``tlmicroscope.viz.bench``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from tlmicroscope.corpus import CorpusSource
from tlmicroscope.deprecation import looks_like_lens, renamed_arguments
from tlmicroscope.io import atomic_write_text
from tlmicroscope.layers import residual_label, residual_labels
from tlmicroscope.lenses.base import resolve_lens
from tlmicroscope.results import Provenance

__all__ = ["METRICS", "LensBench", "lens_bench"]

#: Per-layer metrics of a bench (each ``[lens layer]``), in the order the page shows them.
METRICS = ("kl", "cross_entropy", "bias_kl", "depth_fraction", "fidelity_rho", "sra")


@dataclass(frozen=True)
class LensBench:
    """The lenses' scores on one model and one set of held-out tokens.

    Attributes:
        lens_names: The lenses, in the order of every ``[lens ...]`` axis.
        layer_labels: ``"h0"``..``"h{n_layers}"`` (``tlmicroscope.layers``) for the evaluation rows
            (``kl`` etc.).
        kl, cross_entropy, entropy, bias_kl: ``[lens layer]`` means over the held-out tokens, nats
            (the last row is the model's own output).
        nats_to_bpb: Multiply nats per token by this for bits per byte.
        depth: ``[lens]`` mean prediction depth (residual index; n_layers = only at the output).
        depth_fraction: ``[lens layer]`` fraction of tokens whose prediction depth is each residual
            index.
        cbe_layers: Layers where each lens's causal basis was extracted and its fidelity measured.
        fidelity_rho, fidelity_p: ``[lens cbe_layer]`` Spearman's rho (lens vs model influence) and
            its p-value.
        fidelity_ci: ``[lens cbe_layer 2]`` confidence interval of rho where ``causal_fidelity``
            gives one, else NaN.
        sra_layers: Layers of the stimulus-response alignment.
        sra: ``[lens sra_layer]`` mean Aitchison alignment; ``sra_std`` its standard deviation over
            samples;
            ``sra_ci`` ``[lens sra_layer 2]`` its 95% bootstrap interval (where the result offers
            one).
        n_tokens, n_bytes: Held-out tokens evaluated and the bytes they decode to.
        notes: ``{lens or metric: note}``, e.g. the Jacobian lens's identity at the embeddings.
        provenance: Model and settings.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> bench = lens_bench(model, ["some words to read " * 40], lenses=["logit"], n_tokens=64,
        ...                    seq_len=32, holdout=0.5, cbe_k=2, cbe_max_iter=3, sra_n_samples=4,
        ...                    progress=False)
        >>> bench.lens_names, tuple(bench.kl.shape), bench.layer_labels
        (('logit',), (1, 3), ('h0', 'h1', 'h2'))
        >>> list(bench.table().columns[:3])
        ['lens', 'kl_nats', 'kl_bpb']
    """

    lens_names: tuple[str, ...]
    layer_labels: tuple[str, ...]
    kl: Float[torch.Tensor, "lens layer"]
    cross_entropy: Float[torch.Tensor, "lens layer"]
    entropy: Float[torch.Tensor, "lens layer"]
    bias_kl: Float[torch.Tensor, "lens layer"]
    nats_to_bpb: float
    depth: Float[torch.Tensor, " lens"]
    depth_fraction: Float[torch.Tensor, "lens layer"]
    cbe_layers: tuple[int, ...]
    fidelity_rho: Float[torch.Tensor, "lens cbe_layer"]
    fidelity_p: Float[torch.Tensor, "lens cbe_layer"]
    fidelity_ci: Float[torch.Tensor, "lens cbe_layer 2"]
    sra_layers: tuple[int, ...]
    sra: Float[torch.Tensor, "lens sra_layer"]
    sra_std: Float[torch.Tensor, "lens sra_layer"]
    n_tokens: int
    n_bytes: int
    provenance: Provenance
    notes: dict[str, str] = field(default_factory=dict)
    sra_ci: Float[torch.Tensor, "lens sra_layer 2"] | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layer_labels) - 1

    def table(self):
        """One row per lens: each metric averaged over the lensed layers (the output row
        excluded).
        """
        import pandas as pd

        rows = []
        for i, name in enumerate(self.lens_names):
            kl = float(self.kl[i, :-1].mean())
            ce = float(self.cross_entropy[i, :-1].mean())
            rows.append(
                {
                    "lens": name,
                    "kl_nats": kl,
                    "kl_bpb": kl * self.nats_to_bpb,
                    "ce_nats": ce,
                    "ce_bpb": ce * self.nats_to_bpb,
                    "bias_nats": float(self.bias_kl[i, :-1].mean()),
                    "prediction_depth": float(self.depth[i]),
                    "fidelity_rho": float(self.fidelity_rho[i].nanmean())
                    if self.cbe_layers
                    else math.nan,
                    "sra": float(self.sra[i].nanmean()) if self.sra_layers else math.nan,
                }
            )
        return pd.DataFrame(rows)

    def to_markdown(self, digits: int = 3) -> str:
        """The summary table as a Markdown table (what the README shows)."""
        df = self.table()
        head = (
            "| lens | KL (nats) | KL (bits/byte) | CE (nats) | CE (bits/byte) | bias (nats) "
            "| prediction depth | fidelity ρ | SRA |"
        )
        lines = [head, "|" + " --- |" * 9]
        for _, r in df.iterrows():
            cells = [r["lens"]] + [f"{r[c]:.{digits}f}" for c in df.columns[1:]]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Every number as plain JSON types (NaN kept as ``NaN``)."""
        out: dict[str, Any] = {
            "lens_names": list(self.lens_names),
            "layer_labels": list(self.layer_labels),
            "cbe_layers": list(self.cbe_layers),
            "sra_layers": list(self.sra_layers),
            "nats_to_bpb": self.nats_to_bpb,
            "n_tokens": self.n_tokens,
            "n_bytes": self.n_bytes,
            "notes": dict(self.notes),
            "provenance": self.provenance.to_dict(),
            "table": self.table().to_dict(orient="records"),
        }
        for name in (
            "kl",
            "cross_entropy",
            "entropy",
            "bias_kl",
            "depth",
            "depth_fraction",
            "fidelity_rho",
            "fidelity_p",
            "fidelity_ci",
            "sra",
            "sra_std",
        ):
            out[name] = getattr(self, name).double().tolist()
        if self.sra_ci is not None:
            out["sra_ci"] = self.sra_ci.double().tolist()
        return out

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


def _named_lenses(lenses: Any) -> list[tuple[str, Any]]:
    if lenses is None or isinstance(lenses, str) or not isinstance(lenses, (Sequence, Mapping)):
        lenses = [lenses]
    items = list(lenses.items()) if isinstance(lenses, Mapping) else [(None, x) for x in lenses]
    out = []
    for label, x in items:
        lens = resolve_lens(x)
        out.append((str(label) if label is not None else str(lens.name), lens))
    names = [n for n, _ in out]
    if not out:
        raise ValueError("Pass at least one lens (e.g. ['logit', tuned_lens, jacobian_lens]).")
    if len(set(names)) != len(names):
        raise ValueError(
            f"The lenses' names repeat ({names}); pass a mapping {{label: lens}} to tell them "
            "apart."
        )
    return out


def _getattr_float(obj: Any, *names: str) -> float:
    for n in names:
        v = getattr(obj, n, None)
        if v is not None:
            return float(v)
    return math.nan


def _lenses_first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``lens_bench(model, lenses, ...)``: the old order, recognised by lenses in second place."""
    if len(args) < 2 or "lenses" in kwargs:
        return False
    x = args[1]
    if isinstance(x, Mapping):
        return bool(x) and all(looks_like_lens(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return bool(x) and all(looks_like_lens(v) for v in x)
    return looks_like_lens(x)


@renamed_arguments(
    renamed={
        "tokens": "n_tokens",
        "depth_tokens": "depth_n_tokens",
        "cbe_tokens": "cbe_n_tokens",
        "fidelity_tokens": "fidelity_n_tokens",
        "sra_samples": "sra_n_samples",
    },
    old_positional=("model", "lenses", "corpus"),
    old_order_if=_lenses_first,
)
def lens_bench(
    model: Any,
    corpus: CorpusSource = None,
    *,
    lenses: Any = ("logit",),
    n_tokens: int = 2048,
    seq_len: int = 128,
    holdout: float = 0.1,
    depth_n_tokens: int = 512,
    cbe_layers: Sequence[int] | None = None,
    cbe_k: int = 4,
    cbe_n_tokens: int = 256,
    cbe_max_iter: int = 30,
    fidelity_n_tokens: int = 256,
    sra_layers: Sequence[int] | None = None,
    sra_n_samples: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> LensBench:
    """Compare lenses on the same held-out tokens of ``corpus``.

    Args:
        model: A TransformerLens model.
        corpus: ``None``/``"embedded"``, a text file or folder, or an iterable of strings; the
            held-out tail (``holdout``) is read, which lens training and J-lens fits never see.
        lenses: Lenses (``"logit"``, a ``TunedLens``, a ``JacobianLens``, any ``Lens``), or a
            mapping ``{label: lens}``.
        n_tokens, seq_len: Held-out tokens for KL, CE and bias (whole windows of ``seq_len``).
        depth_n_tokens: Of these, how many go into the prediction depth (the first windows).
        cbe_layers: Residual indices where each lens's causal basis is extracted and its fidelity
            measured (default: the middle layer; ``[]`` skips it).
        cbe_k, cbe_n_tokens, cbe_max_iter: Directions per basis, hidden-state rows, L-BFGS budget.
        fidelity_n_tokens: Tokens (the first windows) on which lens and model influences are
            measured.
        sra_layers: Layers of the stimulus-response alignment (default all; ``[]`` skips it).
        sra_n_samples: Treated positions per layer.

    The old spellings (``lens_bench(model, lenses, corpus)``, ``tokens=``, ``depth_tokens=``,
    ``cbe_tokens=``, ``fidelity_tokens=``, ``sra_samples=``) still work for one release, with a
    ``DeprecationWarning``.

    Raises:
        ValueError: no lens, repeated lens names, a lens for another model, a corpus too small.
    """
    from tlmicroscope.inputs import ensure_eval
    from tlmicroscope.lenses.evaluate import evaluate_lens

    ensure_eval(model)
    named = _checked_lenses(lenses, model)
    L = int(model.cfg.n_layers)
    cbe_list, sra_list = _bench_layers(cbe_layers, sra_layers, L)
    settings = dict(
        seq_len=seq_len, holdout=holdout, split="heldout", cbe_k=cbe_k, cbe_tokens=cbe_n_tokens,
        cbe_max_iter=cbe_max_iter, sra_samples=sra_n_samples, seed=seed,
    )  # fmt: skip
    windows = _heldout_windows(model, corpus, n_tokens, seq_len, holdout)
    n_win = windows.shape[0]
    first = functools.partial(_first_windows, windows, seq_len)

    n = len(named)
    kl, ce, ent, bias = (torch.full((n, L + 1), math.nan) for _ in range(4))
    depth = torch.full((n,), math.nan)
    depth_fraction = torch.zeros(n, L + 1)
    rho, pval = torch.full((n, len(cbe_list)), math.nan), torch.full((n, len(cbe_list)), math.nan)
    ci = torch.full((n, len(cbe_list), 2), math.nan)
    n_tok, n_bytes, factor = 0, 0, math.nan
    notes: dict[str, str] = {}
    for i, (name, lens) in enumerate(named):
        ev = evaluate_lens(
            model, lens=lens, corpus=corpus, n_tokens=n_win * seq_len, seq_len=seq_len,
            split="heldout", holdout=holdout, baseline=False, bias=True, progress=progress,
        )  # fmt: skip
        kl[i], ce[i], ent[i], bias[i] = ev.kl, ev.cross_entropy, ev.entropy, ev.bias_kl
        n_tok, n_bytes, factor = ev.n_tokens, ev.n_bytes, ev.nats_to_bpb
        depth[i], depth_fraction[i] = _depth(model, lens, first(depth_n_tokens))
        for j, layer in enumerate(cbe_list):
            rho[i, j], pval[i, j], ci[i, j] = _fidelity_at(
                model,
                lens,
                layer,
                cbe_tokens=first(cbe_n_tokens),
                fidelity_tokens=first(fidelity_n_tokens),
                cbe=dict(k=cbe_k, n_tokens=cbe_n_tokens, seq_len=seq_len, max_iter=cbe_max_iter),
                seed=seed,
                progress=progress,
            )
        identity = getattr(lens, "identity_layers", ())
        if identity:
            where = ", ".join(residual_label(x) for x in identity)
            notes[name] = f"no fitted matrix at {where}: read with the identity there (logit lens)"
    sra, sra_std, sra_ci = _stimulus_response(
        model, named, first(n_tokens), sra_list, sra_n_samples, seed, progress, notes
    )
    return LensBench(
        lens_names=tuple(name for name, _ in named),
        layer_labels=residual_labels(L),
        kl=kl,
        cross_entropy=ce,
        entropy=ent,
        bias_kl=bias,
        nats_to_bpb=factor,
        depth=depth,
        depth_fraction=depth_fraction,
        cbe_layers=tuple(cbe_list),
        fidelity_rho=rho,
        fidelity_p=pval,
        fidelity_ci=ci,
        sra_layers=tuple(sra_list),
        sra=sra,
        sra_std=sra_std,
        n_tokens=n_tok,
        n_bytes=n_bytes,
        notes=notes,
        sra_ci=sra_ci,
        provenance=Provenance.from_model(
            model,
            lens=",".join(name for name, _ in named),
            tokens=n_tok,
            depth_tokens=int(first(depth_n_tokens).numel()),
            fidelity_tokens=int(first(fidelity_n_tokens).numel()),
            **settings,
        ),
    )


def _checked_lenses(lenses: Any, model: Any) -> list[tuple[str, Any]]:
    """``_named_lenses(lenses)``, each checked against ``model``."""
    named = _named_lenses(lenses)
    for _, lens in named:
        lens.check_model(model)
    return named


def _heldout_windows(
    model: Any, corpus: Any, n_tokens: int, seq_len: int, holdout: float
) -> torch.Tensor:
    """The first ``ceil(n_tokens / seq_len)`` held-out windows (at least one)."""
    from tlmicroscope.lenses._tuned_data import lens_token_windows

    windows = lens_token_windows(model, corpus, seq_len=seq_len, split="heldout", holdout=holdout)
    return windows[: max(1, min(windows.shape[0], -(-int(n_tokens) // seq_len)))]


def _depth(model: Any, lens: Any, windows: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Mean prediction depth of ``lens`` over ``windows`` and the fraction of tokens at each."""
    from tlmicroscope.causal.prediction_depth import prediction_depth
    from tlmicroscope.lenses.trajectory import prediction_trajectory

    L = int(model.cfg.n_layers)
    traj = prediction_trajectory(model, windows, lens=lens, top_k=1)
    d = prediction_depth(traj).depth.reshape(-1)
    return float(d.double().mean()), torch.bincount(d.long(), minlength=L + 1)[
        : L + 1
    ].double() / d.numel()


def _first_windows(windows: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """The first windows holding ``n`` tokens (at least one)."""
    return windows[: max(1, min(windows.shape[0], -(-int(n) // seq_len)))]


def _bench_layers(
    cbe_layers: Sequence[int] | None, sra_layers: Sequence[int] | None, n_layers: int
) -> tuple[list[int], list[int]]:
    """The CBE layers (default the middle one) and stimulus-response layers (default all)."""
    cbe_list = [n_layers // 2] if cbe_layers is None else [int(x) for x in cbe_layers]
    sra_list = list(range(n_layers)) if sra_layers is None else [int(x) for x in sra_layers]
    _check_bench_layers((*cbe_list, *sra_list), n_layers)
    return cbe_list, sra_list


def _check_bench_layers(chosen: Sequence[int], n_layers: int) -> None:
    for x in chosen:
        if not 0 <= x < n_layers:
            raise ValueError(
                f"Bench layers are residual indices 0..{n_layers - 1} (h0..h{n_layers - 1}; the "
                f"output has no lens); got {x}."
            )


def _fidelity_at(
    model: Any,
    lens: Any,
    layer: int,
    *,
    cbe_tokens: torch.Tensor,
    fidelity_tokens: torch.Tensor,
    cbe: dict[str, Any],
    seed: int,
    progress: bool,
) -> tuple[float, float, torch.Tensor]:
    """Causal fidelity of ``lens`` at ``layer``: Spearman rho, its p-value and its interval
    (NaN when the result has none), from a causal basis extracted on ``cbe_tokens``."""
    from tlmicroscope.causal.basis import extract_causal_basis
    from tlmicroscope.causal.fidelity import causal_fidelity

    basis = extract_causal_basis(
        model,
        lens=lens,
        corpus=cbe_tokens,
        layer=layer,
        seed=seed,
        progress=progress,
        on_nonconvergence="ignore",
        **cbe,
    )
    fid = causal_fidelity(
        model,
        lens=lens,
        basis=basis,
        layer=layer,
        tokens=fidelity_tokens,
        seed=seed,
        progress=progress,
    )
    ci = torch.full((2,), math.nan)
    lo_hi = getattr(fid, "spearman_ci", None) or getattr(fid, "ci", None)
    if lo_hi is not None:
        ci = torch.as_tensor([float(lo_hi[0]), float(lo_hi[1])])
    return float(fid.spearman), float(fid.p_value), ci


def _stimulus_response(
    model: Any,
    named: list[tuple[str, Any]],
    windows: torch.Tensor,
    sra_list: list[int],
    n_samples: int,
    seed: int,
    progress: bool,
    notes: dict[str, str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Stimulus-response alignment of every lens at ``sra_list``: mean, spread and interval."""
    from tlmicroscope.causal.stimulus_response import stimulus_response_alignment

    n = len(named)
    if not sra_list:
        return torch.full((n, 0), math.nan), torch.full((n, 0), math.nan), None
    # The reference's donors (same position, another sequence) need two sequences; a bench on
    # one window falls back to donors anywhere in it and says so.
    donors = "same_position" if windows.shape[0] >= 2 else "any"
    if donors == "any":
        notes["stimulus-response"] = (
            "one held-out window only: donors drawn from any position of it "
            "(pass n_tokens >= 2 * seq_len for the reference's same-position donors)"
        )
    res = stimulus_response_alignment(
        model,
        lens=[lens for _, lens in named],
        tokens=windows,
        layer=sra_list,
        n_samples=n_samples,
        seed=seed,
        progress=progress,
        donors=donors,
    )
    a = res.alignment
    valid = (~a.isnan()).sum(-1)
    mean = a.nanmean(-1, keepdim=True)
    sra_std = torch.sqrt(((a - mean) ** 2).nansum(-1) / (valid - 1).clamp_min(1))
    sra_ci = None
    if callable(getattr(res, "confidence_intervals", None)):
        lo, hi = res.confidence_intervals(seed=seed)
        sra_ci = torch.stack([torch.as_tensor(lo), torch.as_tensor(hi)], -1).float()
    return a.nanmean(-1), sra_std, sra_ci
