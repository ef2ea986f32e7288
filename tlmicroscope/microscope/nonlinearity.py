"""Token-wise non-linearity: how far each token's step from layer l to l+1 is from one affine map.

LLM-Microscope's heatmap shows ``E_i^l = ‖A*_l h̃_i^l − h̃_i^{l+1}‖₂`` for every token i and layer
pair l, on centred and normalised states. Fitting A*_l on the prompt itself (the paper's reading)
is exact whenever the prompt has fewer tokens than d_model, so the errors are 0 or noise. The
sound version fits A*_l once per model on a corpus with N ≫ d (``NonlinearityReference.fit``),
stores it with the corpus means and scales, and applies it to any prompt
(``token_nonlinearity``). The per-prompt fit stays available as ``mode="paper"``.

Units: states are standardised as ``z = (h − μ)/σ`` with ``σ = ‖H − μ‖_F/√N`` over the fitting
tokens, so E is in "RMS token" units: its mean square over the fitting tokens is
``1 − linearity score``, whatever N. The paper's unscaled row norms are ``E/√N``
(``TokenNonlinearity.paper_scale()``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int

from tlmicroscope import io
from tlmicroscope.capture import residual_stream_names, stream
from tlmicroscope.corpus import CorpusSource
from tlmicroscope.inputs import TextOrTokens, check_layers, ensure_eval, resolve_input
from tlmicroscope.layers import as_str_tokens
from tlmicroscope.microscope._forward import corpus_windows, str_tokens_of, stream_residual
from tlmicroscope.microscope._moments import DEFAULT_RTOL, ResidualMoments, fit_pair, paper_fit
from tlmicroscope.microscope.linearity import (
    LinearityResult,
    _check_token_count,
    _result,
    pair_label,
)
from tlmicroscope.results import Provenance

__all__ = ["NonlinearityReference", "TokenNonlinearity", "token_nonlinearity"]

KIND = "nonlinearity_reference"


class NonlinearityReference:
    """Per-pair affine maps A*_l fitted once on a corpus, applied to any prompt.

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``, kind
    ``"nonlinearity-reference"``): settings in ``__init__``, learned state (trailing ``_``) set by
    ``fit``. Saved as safetensors + JSON tied to its model (``save()`` puts it in the artifact
    store); loading it for another model is refused, naming the field that differs.

    Args:
        n_tokens: Corpus token rows to fit on (default ``max(8192, 32·d_model)``); must exceed
            d_model.
        seq_len: Window length when cutting the corpus.
        batch_size: Windows per forward pass.
        skip_positions: Drop the first positions of each window from the fit.
        rtol: Relative eigenvalue cut-off defining each layer's rank.
        ridge: Tikhonov term as a fraction of the mean eigenvalue (0 = truncated pseudo-inverse).
        seed: Which windows of the corpus are drawn.

    Attributes:
        maps_: ``[pair d_model d_model]`` float32, ``z^{l+1} ≈ z^l @ maps_[l]``.
        mean_, scale_: Per-state corpus mean ``[state d_model]`` and RMS scale ``[state]``
            (float64).
        pairs_: First residual index of each fitted pair.
        linearity_: The corpus's ``LinearityResult`` (both scores, rank, chance floor, N, d).
        n_tokens_: N, the rows the maps were fitted on.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> TEXT = ("The quick brown fox jumps over the lazy dog; "
        ...         "PACK MY BOX WITH FIVE DOZEN JUGS! 0123456789 ") * 6
        >>> ref = NonlinearityReference(n_tokens=512, seq_len=64).fit(model, [TEXT], progress=False)
        >>> tuple(ref.maps_.shape), ref.n_tokens_
        ((2, 32, 32), 512)
    """

    kind: ClassVar[str] = "nonlinearity-reference"
    #: Settings ``fit(..., quick=True)`` uses (about 7 tokens per dimension on SmolLM2).
    QUICK: ClassVar[dict[str, Any]] = {"n_tokens": 4096}

    def __init__(
        self,
        *,
        n_tokens: int | None = None,
        seq_len: int = 256,
        batch_size: int = 8,
        skip_positions: int = 0,
        rtol: float = DEFAULT_RTOL,
        ridge: float = 0.0,
        seed: int = 0,
    ):
        self.n_tokens = n_tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.skip_positions = skip_positions
        self.rtol = rtol
        self.ridge = ridge
        self.seed = seed
        self.quick = False

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self,
        model: Any,
        corpus: CorpusSource | torch.Tensor = None,
        *,
        n_tokens: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
        layers: Sequence[int] | None = None,
    ) -> NonlinearityReference:
        """Fit A*_l for each pair on ``corpus`` (default: the embedded corpus) in one streamed pass.

        ``model`` may also be residual states you already have, a ``[state N d_model]`` tensor of
        h^0..h^S rows; the reference is then tied to no model. ``n_tokens``, ``batch_size`` and
        ``seed`` override the settings of the same names (and are saved); ``quick=True`` takes
        ``QUICK`` for those not given and records the fit as quick.

        Raises:
            ValueError: the corpus gives no more token rows than d_model (every fit would be exact).
        """
        self.quick = bool(quick)
        for name, value in (("n_tokens", n_tokens), ("batch_size", batch_size), ("seed", seed)):
            if value is not None:
                setattr(self, name, value)
            elif quick and name in self.QUICK:
                setattr(self, name, self.QUICK[name])
        if isinstance(model, torch.Tensor):
            return self._fit_states(model, layers)
        ensure_eval(model)
        n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
        pairs = check_layers(layers, n_layers, "pair")
        states = sorted(set(pairs) | {p + 1 for p in pairs})
        n_tokens = int(self.n_tokens or max(8192, 32 * d))
        windows = corpus_windows(
            model,
            corpus,
            n_tokens=n_tokens,
            seq_len=self.seq_len,
            seed=self.seed,
            what="NonlinearityReference.fit",
            min_tokens=d + 2,
        )
        skip = int(self.skip_positions)
        if skip >= windows.shape[1]:
            raise ValueError(
                f"skip_positions={skip} drops every position of {windows.shape[1]}-token windows."
            )
        _check_token_count(windows.shape[0] * (windows.shape[1] - skip), d, False, "lstsq")
        moments = ResidualMoments(states, pairs, d)
        stream_residual(
            model,
            windows,
            lambda layer, h: moments.add(layer, h[:, skip:].reshape(-1, d)),
            layers=states,
            batch_size=self.batch_size,
            progress=progress,
            desc="non-linearity reference",
        )
        prov = Provenance.from_model(
            model,
            mode="lstsq",
            n_tokens=moments.n,
            seq_len=int(windows.shape[1]),
            skip_positions=skip,
            rtol=self.rtol,
            ridge=self.ridge,
            seed=self.seed,
        )
        self._solve(moments, pairs, prov)
        self.model_ = io.model_fingerprint(model)
        self.model_class_ = type(model).__name__
        self.corpus_ = _describe_corpus(corpus)
        return self

    def _fit_states(
        self, states_t: torch.Tensor, layers: Sequence[int] | None
    ) -> NonlinearityReference:
        if states_t.ndim != 3 or states_t.shape[0] < 2:
            raise ValueError(
                "Residual states must be [state N d_model] with at least 2 states, got "
                f"{tuple(states_t.shape)}."
            )
        n_states, n, d = states_t.shape
        pairs = check_layers(layers, n_states - 1, "pair")
        _check_token_count(n, d, False, "lstsq")
        states = sorted(set(pairs) | {p + 1 for p in pairs})
        moments = ResidualMoments(states, pairs, d)
        for s in states:
            moments.add(s, states_t[s])
        self._solve(
            moments,
            pairs,
            Provenance(
                "states", "Tensor", False, "", settings={"rtol": self.rtol, "ridge": self.ridge}
            ),
        )
        self.model_, self.model_class_, self.corpus_ = (
            None,
            "states",
            f"states {tuple(states_t.shape)}",
        )
        return self

    def _solve(self, moments: ResidualMoments, pairs: list[int], prov: Provenance) -> None:
        n, d = moments.n, moments.d
        states = moments.states
        scale = {s: math.sqrt(float(torch.trace(moments.gram(s))) / n) for s in states}
        maps, scores, scores_wo, ranks = [], [], [], []
        for layer in pairs:
            fit = fit_pair(
                moments.gram(layer),
                float(torch.trace(moments.gram(layer + 1))),
                moments.cross_moment(layer),
                rtol=self.rtol,
                ridge=self.ridge,
                want_map=True,
            )
            maps.append((fit.A * (scale[layer] / max(scale[layer + 1], 1e-300))).float())
            scores.append(fit.score)
            scores_wo.append(fit.score_without_residual)
            ranks.append(fit.rank)
        self.pairs_ = tuple(pairs)
        self.maps_ = torch.stack(maps)
        self.states_ = tuple(states)
        self.mean_ = torch.stack([moments.mean(s) for s in states])
        self.scale_ = torch.tensor([scale[s] for s in states], dtype=torch.float64)
        self.n_tokens_ = int(n)
        self.d_model_ = d
        self.linearity_ = _result(pairs, scores, scores_wo, ranks, n, d, "lstsq", prov)

    def _check_fitted(self) -> None:
        if not hasattr(self, "maps_"):
            raise ValueError(
                "This NonlinearityReference is not fitted: call .fit(model, corpus) or load one."
            )

    def check_model(self, model: Any) -> None:
        """Refuse another model than the one the maps were fitted on (naming the field)."""
        self._check_fitted()
        if self.model_ is not None:
            io.check_fingerprint(self.model_, model, what="This non-linearity reference")
        elif int(model.cfg.d_model) != self.d_model_:
            raise io.ModelMismatchError(
                f"This non-linearity reference maps d_model={self.d_model_} states; the "
                f"model has d_model={model.cfg.d_model}."
            )

    def state_index(self, layer: int) -> int:
        return self.states_.index(layer)

    def standardize(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """``(h − μ_l)/σ_l`` with the corpus statistics of residual state ``layer``."""
        i = self.state_index(layer)
        mean = self.mean_[i].to(h.device, torch.float32)
        return (h.float() - mean) / float(self.scale_[i])

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | Path | None = None) -> Path:
        """Write ``path/tensors.safetensors`` and ``path/config.json`` atomically (``path=None``:
        the artifact store's place for its model)."""
        from tlmicroscope.artifacts import save_path

        self._check_fitted()
        path = save_path(self.kind, path, self.model_)
        lin = self.linearity_
        tensors = {
            "maps": self.maps_,
            "mean": self.mean_,
            "scale": self.scale_,
            "score": lin.score,
            "score_without_residual": lin.score_without_residual,
            "rank": lin.rank,
        }
        config = {
            "settings": {
                k: getattr(self, k)
                for k in (
                    "n_tokens",
                    "seq_len",
                    "batch_size",
                    "skip_positions",
                    "rtol",
                    "ridge",
                    "seed",
                )
            },
            "pairs": list(self.pairs_),
            "states": list(self.states_),
            "n_tokens_fitted": self.n_tokens_,
            "d_model": self.d_model_,
            "model_class": self.model_class_,
            "corpus": self.corpus_,
            "provenance": lin.provenance.to_dict(),
            "quick": bool(self.quick),
        }
        return io.save_fitted(path, tensors, kind=KIND, config=config, fingerprint=self.model_)

    @classmethod
    def load(
        cls, path: str | Path | None = None, model: Any | None = None
    ) -> NonlinearityReference:
        """Load a saved reference (``path=None``: the artifact store's for ``model``); with
        ``model``, refuse it if it was fitted for another model."""
        from tlmicroscope.artifacts import load_path

        path = load_path(cls.kind, path, model)
        tensors, meta = io.load_fitted(path, kind=KIND, model=model)
        cfg = meta["config"]
        ref = cls(**cfg["settings"])
        ref.quick = io.config_bool(cfg, "quick", path, default=False)
        ref.pairs_ = tuple(cfg["pairs"])
        ref.states_ = tuple(cfg["states"])
        ref.maps_ = tensors["maps"]
        ref.mean_ = tensors["mean"]
        ref.scale_ = tensors["scale"]
        ref.n_tokens_ = io.config_int(cfg, "n_tokens_fitted", path)
        ref.d_model_ = io.config_int(cfg, "d_model", path)
        ref.model_ = meta["model"]
        ref.model_class_ = cfg.get("model_class", "")
        ref.corpus_ = cfg.get("corpus", "")
        p = cfg.get("provenance", {})
        prov = Provenance(
            p.get("model", ""),
            p.get("model_class", ""),
            bool(p.get("weights_processed")),
            p.get("transformer_lens", ""),
            None,
            p.get("settings", {}),
        )
        ref.linearity_ = LinearityResult(
            pairs=ref.pairs_,
            pair_labels=tuple(pair_label(x) for x in ref.pairs_),
            score=tensors["score"],
            score_without_residual=tensors["score_without_residual"],
            rank=tensors["rank"],
            chance_floor=tensors["rank"].double() / max(ref.n_tokens_ - 1, 1),
            n_tokens=ref.n_tokens_,
            d_model=ref.d_model_,
            mode="lstsq",
            provenance=prov,
        )
        if tuple(ref.maps_.shape) != (len(ref.pairs_), ref.d_model_, ref.d_model_):
            raise io.FittedFileError(
                f"{path}: maps have shape {tuple(ref.maps_.shape)}, which does not match its "
                "config."
            )
        return ref

    def __repr__(self) -> str:
        if not hasattr(self, "maps_"):
            return "NonlinearityReference(unfitted)"
        return (
            f"NonlinearityReference({len(self.pairs_)} pairs, d_model={self.d_model_}, "
            f"fitted on N={self.n_tokens_} tokens of {self.corpus_})"
        )


def _describe_corpus(corpus: Any) -> str:
    if corpus is None or (isinstance(corpus, str) and corpus == "embedded"):
        return "embedded (pydoc_data.topics)"
    if isinstance(corpus, torch.Tensor):
        return f"token ids {tuple(corpus.shape)}"
    if isinstance(corpus, (str, Path)):
        return str(corpus)
    return type(corpus).__name__


@dataclass(frozen=True)
class TokenNonlinearity:
    """The layer × token non-linearity map of one prompt (or batch).

    Attributes:
        pairs, pair_labels: The pairs (h^l, h^{l+1}) of each row.
        error: ``E_i^l`` in RMS-token units ``[pair batch pos]`` (see the module docstring).
        relative_error: ``E_i^l / ‖z_i^{l+1}‖``, the error as a fraction of the target's size.
        n_fit: Tokens the maps were fitted on (the reference corpus, or the prompt in paper mode).
        mode: ``"reference"`` or ``"paper"``.
    """

    pairs: tuple[int, ...]
    pair_labels: tuple[str, ...]
    error: Float[torch.Tensor, "pair batch pos"]
    relative_error: Float[torch.Tensor, "pair batch pos"]
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    n_fit: int
    mode: str
    provenance: Provenance

    def paper_scale(self) -> torch.Tensor:
        """The paper's unscaled row norms, ``E/√N`` (they shrink with the number of fit tokens)."""
        return self.error / math.sqrt(self.n_fit)

    def token_mean(self) -> Float[torch.Tensor, "batch pos"]:
        """Layer-averaged non-linearity per token (the quantity the paper correlates with C)."""
        return self.error.mean(0)

    def layer_mean(self) -> Float[torch.Tensor, " pair"]:
        """Mean error per pair over the prompt's tokens."""
        return self.error.mean((1, 2))

    def to_dataframe(self, batch: int = 0):
        import pandas as pd

        rows = [
            {
                "pair": self.pair_labels[i],
                "layer": layer,
                "position": p,
                "token": self.str_tokens[batch][p],
                "error": float(self.error[i, batch, p]),
                "relative_error": float(self.relative_error[i, batch, p]),
            }
            for i, layer in enumerate(self.pairs)
            for p in range(self.error.shape[2])
        ]
        return pd.DataFrame(rows)


def token_nonlinearity(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    reference: NonlinearityReference | str | Path | None = None,
    mode: Literal["reference", "paper"] = "reference",
    layers: Sequence[int] | None = None,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> TokenNonlinearity:
    """The LLM-Microscope non-linearity map of a prompt, computed pair by pair as the forward runs.

    Only the previous residual state is held at any time, so a long prompt never keeps every
    layer in memory.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` holding the residual hooks
            (``blocks.{l}.hook_resid_pre`` and the last ``hook_resid_post``) with its tokens.
        tokens: Text or token ids.
        reference: A fitted ``NonlinearityReference`` or the folder of a saved one
            (``mode="reference"``).
        mode: ``"reference"`` applies the corpus-fitted maps; ``"paper"`` fits each pair on the
            prompt's own tokens with the reference's unguarded SVD pseudo-inverse. With fewer
            tokens than d_model that fit is exact and the errors are noise (a warning says so).
        layers: Pair indices to compute (default all the reference has, or all).

    Raises:
        ValueError: no reference in reference mode, a reference for another model, a pair the
            reference lacks, a cache missing a hook.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> TEXT = (
        ...     "The quick brown fox jumps over the lazy dog; PACK MY BOX WITH FIVE DOZEN JUGS! "
        ...     "0123456789 "
        ... ) * 6
        >>> ref = NonlinearityReference(n_tokens=512, seq_len=64).fit(model, [TEXT], progress=False)
        >>> res = token_nonlinearity(model, "plain text", reference=ref)
        >>> res.pair_labels, tuple(res.error.shape)
        (('h0→h1', 'h1→h2'), (2, 1, 10))
    """
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    reference, pairs, n_fit = _nonlinearity_plan(model, toks, reference, mode, layers)
    error, rel = _pair_errors(model, cache, toks, reference, mode, pairs)
    if mode == "paper":  # report RMS-token units like the reference mode: multiply row norms by √N
        error *= math.sqrt(n_fit)
    str_tokens = str_tokens_of(model, toks)
    prov = Provenance.from_model(
        model, mode=mode, n_fit=n_fit, reference=None if mode == "paper" else repr(reference)
    )
    return TokenNonlinearity(
        pairs=tuple(pairs),
        pair_labels=tuple(pair_label(p) for p in pairs),
        error=error,
        relative_error=rel,
        tokens=toks.detach().cpu(),
        str_tokens=as_str_tokens(str_tokens),
        n_fit=n_fit,
        mode=mode,
        provenance=prov,
    )


def _nonlinearity_plan(
    model: Any,
    toks: torch.Tensor,
    reference: Any,
    mode: str,
    layers: Sequence[int] | None,
) -> tuple[NonlinearityReference | None, list[int], int]:
    """``(reference, pairs, n_fit)``: the loaded reference (reference mode), the pairs to compute
    and the number of tokens each pair's map was fitted on."""
    n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    if mode == "reference":
        if reference is None:
            raise ValueError(
                "mode='reference' needs a fitted NonlinearityReference: "
                "NonlinearityReference().fit(model) (or its saved folder), or pass mode='paper' "
                "for the per-prompt fit (exact, hence noise, when the prompt is shorter than "
                "d_model)."
            )
        if not isinstance(reference, NonlinearityReference):
            reference = NonlinearityReference.load(reference, model)
        reference.check_model(model)
        pairs = list(reference.pairs_) if layers is None else check_layers(layers, n_layers, "pair")
        missing = [p for p in pairs if p not in reference.pairs_]
        if missing:
            raise ValueError(
                f"The reference has no map for pairs {missing}; it was fitted on "
                f"{list(reference.pairs_)}."
            )
        return reference, pairs, reference.n_tokens_
    if mode == "paper":
        n_fit = int(toks.numel())
        if n_fit <= d + 1:
            warnings.warn(
                f"Paper mode fits each pair on this prompt's {n_fit} tokens, no more than "
                f"d_model={d}: the fit is exact, so the errors are numerical noise. Fit a "
                "NonlinearityReference on a corpus and use mode='reference' for meaningful values.",
                UserWarning,
                stacklevel=3,  # token_nonlinearity's caller
            )
        return None, check_layers(layers, n_layers, "pair"), n_fit
    raise ValueError(f"mode must be 'reference' or 'paper', got {mode!r}.")


def _pair_errors(
    model: Any,
    cache: Any,
    toks: torch.Tensor,
    reference: NonlinearityReference | None,
    mode: str,
    pairs: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(error, relative_error)`` ``[pair batch pos]``, one residual state held at a time."""
    n_layers, d = int(model.cfg.n_layers), int(model.cfg.d_model)
    states = sorted(set(pairs) | {p + 1 for p in pairs})
    batch, n_pos = toks.shape
    row = {p: i for i, p in enumerate(pairs)}
    error = torch.full((len(pairs), batch, n_pos), float("nan"))
    rel = torch.full_like(error, float("nan"))
    prev: dict[str, Any] = {}

    def on_state(layer: int, h: torch.Tensor) -> None:
        if mode == "reference":
            z = reference.standardize(layer, h) if layer in reference.states_ else None
        else:
            z = h.detach().float()
        if layer - 1 in row and prev.get("layer") == layer - 1:
            if mode == "reference":
                i = reference.pairs_.index(layer - 1)
                pred = prev["z"] @ reference.maps_[i].to(h.device)
                target = z
            else:
                pred, target, _ = paper_fit(prev["z"].reshape(-1, d), z.reshape(-1, d))
                pred, target = pred.reshape(z.shape), target.reshape(z.shape)
            e = (pred - target).norm(dim=-1)
            error[row[layer - 1]] = e.cpu()
            rel[row[layer - 1]] = (e / target.norm(dim=-1).clamp_min(1e-12)).cpu()
        prev["layer"], prev["z"] = layer, z

    if cache is not None:
        names = residual_stream_names(n_layers)
        lacking = [names[s] for s in states if names[s] not in cache]
        if lacking:
            raise ValueError(
                f"The ActivationCache lacks {lacking[:3]}; run run_with_cache with the residual "
                "hooks (blocks.{l}.hook_resid_pre and the last hook_resid_post), or pass the model."
            )
        for s in states:
            on_state(s, cache[names[s]])
    else:
        stream(
            model,
            toks,
            lambda site, layer, act: on_state(int(layer), act),
            sites=("resid",),
            layers=states,
            return_logits=False,
        )
    return error, rel
