"""Contextualization by prefix decoding: how much of its context a token's hidden states keep.

LLM-Microscope §3.2 (no public code). For token i, a learned linear pooling over layers and a
2-layer MLP turn ``[h_i^1..h_i^L]`` into one soft embedding e_i. A decoder, a copy of the model,
reads e_i as its first input embedding and must reproduce the prefix before token i under
teacher forcing. ``C_i = −log P(prefix | e_i)``, by default the mean per prefix token: lower C
means the token's states carry more of the context.

Choices the paper leaves open, all settings of ``ContextualizationProbe`` and recorded in the
saved probe:

* the prefix is the ``prefix_length`` tokens right before token i (fewer near the start);
* layers pooled: the outputs of every block, h^1..h^L (``hook_resid_post``; no embedding layer);
* the decoder is the model itself frozen (``"frozen"``), a copy whose last ``trainable_blocks``
  blocks train (``"last_k"``, the default), or a fully trainable copy (``"full"``);
* position 0 has no prefix: its C is NaN (nothing to reconstruct), and summaries skip it.

Training is seeded and deterministic in the step number, so ``fit`` can checkpoint and resume.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from tlmicroscope import io
from tlmicroscope.capture import residual_stream_names
from tlmicroscope.corpus import CorpusSource, token_stream
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.inputs import TextOrTokens, ensure_eval, resolve_input
from tlmicroscope.layers import as_str_tokens
from tlmicroscope.microscope._forward import str_tokens_of
from tlmicroscope.microscope._prefix_decoding import (
    PrefixEncoder,
    copy_model,
    decoder_blocks,
    examined_states,
    prefix_examples,
    prefix_token_loss,
)
from tlmicroscope.results import Provenance

__all__ = ["Contextualization", "ContextualizationProbe", "contextualization"]

KIND = "contextualization_probe"
CHECKPOINT_KIND = "contextualization_checkpoint"
_SETTINGS = (
    "prefix_length",
    "mlp_hidden",
    "decoder",
    "trainable_blocks",
    "steps",
    "windows_per_step",
    "positions_per_window",
    "window_length",
    "lr",
    "decoder_lr",
    "warmup",
    "seed",
)


class ContextualizationProbe:
    """The trainable adapter (encoder + decoder choice) that measures contextualization.

    Args:
        prefix_length: P, how many prefix tokens the decoder reconstructs.
        mlp_hidden: Width of the 2-layer MLP.
        decoder: ``"frozen"`` (the model itself, untouched), ``"last_k"`` (a copy whose last
            ``trainable_blocks`` blocks train) or ``"full"`` (a fully trainable copy).
        trainable_blocks: k for ``"last_k"``.
        steps: Optimisation steps.
        windows_per_step, positions_per_window: Corpus windows drawn per step, and tokens of each
            whose prefix is decoded (their product is the batch of prefixes).
        window_length: Length of those windows (the context the examined model sees).
        lr, decoder_lr: AdamW learning rates of the encoder and of the decoder's trainable blocks.
        warmup: Linear warm-up steps; the rate then follows a cosine to 10 %.
        seed: Seeds the encoder's initialisation and the data order.

    Follows the fitted-object contract (``tlmicroscope.artifacts.Fitted``, kind
    ``"contextualization-probe"``): ``fit(model, corpus)``, then ``save()`` puts it in the artifact
    store and ``ContextualizationProbe.load(None, model)`` reads it back.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> probe = ContextualizationProbe(prefix_length=4, mlp_hidden=16, decoder="frozen",
        ...                                steps=2, window_length=16)
        >>> probe = probe.fit(model, ["a small corpus of text " * 20], progress=False)
        >>> ctx = contextualization(model, "hello world", probe=probe)
        >>> tuple(ctx.C.shape), bool(ctx.C[0, 0].isnan()), bool(ctx.C[0, 1:].isfinite().all())
        ((1, 11), True, True)
    """

    def __init__(
        self,
        *,
        prefix_length: int = 16,
        mlp_hidden: int = 1024,
        decoder: Literal["frozen", "last_k", "full"] = "last_k",
        trainable_blocks: int = 2,
        steps: int = 400,
        windows_per_step: int = 4,
        positions_per_window: int = 4,
        window_length: int = 64,
        lr: float = 1e-3,
        decoder_lr: float = 5e-5,
        warmup: int = 20,
        seed: int = 0,
    ):
        self.quick = False
        self.prefix_length = prefix_length
        self.mlp_hidden = mlp_hidden
        self.decoder = decoder
        self.trainable_blocks = trainable_blocks
        self.steps = steps
        self.windows_per_step = windows_per_step
        self.positions_per_window = positions_per_window
        self.window_length = window_length
        self.lr = lr
        self.decoder_lr = decoder_lr
        self.warmup = warmup
        self.seed = seed

    kind: ClassVar[str] = "contextualization-probe"
    #: Settings ``fit(..., quick=True)`` uses for those left at their defaults: 40 steps instead
    #: of 400, the demo's probe (429 s on SmolLM2-135M under load; its prefix loss falls from 5.33
    #: to 5.00 nats, a rough probe; README, "The demo").
    QUICK: ClassVar[dict[str, Any]] = {"steps": 40, "warmup": 4}

    def settings(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SETTINGS}

    def _validate(self, model: Any) -> None:
        if self.decoder not in ("frozen", "last_k", "full"):
            raise ValueError(f"decoder must be 'frozen', 'last_k' or 'full', got {self.decoder!r}.")
        n_layers = int(model.cfg.n_layers)
        if self.decoder == "last_k" and not 1 <= self.trainable_blocks <= n_layers:
            raise ValueError(
                f"trainable_blocks must be in 1..{n_layers} for decoder='last_k', got "
                f"{self.trainable_blocks}."
            )
        if self.prefix_length < 1 or self.window_length < 2:
            raise ValueError("prefix_length must be ≥ 1 and window_length ≥ 2.")
        if self.window_length > model.cfg.n_ctx or self.prefix_length > model.cfg.n_ctx:
            raise ValueError(
                "window_length and prefix_length must fit the model's context of "
                f"{model.cfg.n_ctx}."
            )

    # -- building ------------------------------------------------------------------------------
    def _build(self, model: Any) -> None:
        d = int(model.cfg.d_model)
        torch.manual_seed(self.seed)
        W_E = model.W_E.detach().float()
        self.encoder_ = PrefixEncoder(
            int(model.cfg.n_layers), d, int(self.mlp_hidden), float(W_E.pow(2).mean().sqrt())
        )
        if self.decoder == "frozen":
            self.decoder_ = None
        else:
            dec = copy_model(model).eval()
            for p in dec.parameters():
                p.requires_grad_(False)
            for _, p in decoder_blocks(dec, self.decoder, int(self.trainable_blocks)):
                p.requires_grad_(True)
            self.decoder_ = dec
        self.model_ = io.model_fingerprint(model)
        self.model_class_ = type(model).__name__

    def _decoder(self, model: Any) -> Any:
        return model if self.decoder_ is None else self.decoder_

    def _trained_decoder_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        if self.decoder_ is None:
            return []
        return decoder_blocks(self.decoder_, self.decoder, int(self.trainable_blocks))

    def _lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / max(1, self.warmup)
        frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    # -- fitting -------------------------------------------------------------------------------
    def fit(
        self,
        model: Any,
        corpus: CorpusSource = None,
        *,
        n_tokens: int | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        progress: bool = True,
        quick: bool = False,
        checkpoint_dir: str | Path | None = None,
        checkpoint_every: int = 50,
        resume: bool = True,
    ) -> ContextualizationProbe:
        """Train the encoder (and the decoder's trainable blocks) on ``corpus`` (default: embedded).

        With ``checkpoint_dir``, the state is saved every ``checkpoint_every`` steps and at the end;
        calling ``fit`` again with the same settings resumes from the last checkpoint.
        ``batch_size`` (windows per step) and ``seed`` override ``windows_per_step`` and ``seed``;
        ``n_tokens`` sets ``steps`` so that about that many window tokens are read; ``quick=True``
        takes ``QUICK`` for what is not given and records the fit as quick.

        Raises:
            ValueError: bad settings, a corpus shorter than one window, or a checkpoint made with
                other settings or for another model.
        """
        self._apply_fit_settings(n_tokens, batch_size, seed, quick)
        ensure_eval(model)
        self._validate(model)
        stream = token_stream(model, corpus)
        T = int(self.window_length)
        if stream.numel() < T + 1:
            raise ValueError(
                f"The corpus has {stream.numel()} tokens, fewer than one window of {T}; "
                "use a larger corpus or a smaller window_length."
            )
        self._build(model)
        self.corpus_ = (
            "embedded (pydoc_data.topics)" if corpus in (None, "embedded") else str(corpus)[:200]
        )
        groups = [{"params": list(self.encoder_.parameters()), "lr": self.lr, "base_lr": self.lr}]
        dec_params = [p for _, p in self._trained_decoder_params()]
        if dec_params:
            groups.append({"params": dec_params, "lr": self.decoder_lr, "base_lr": self.decoder_lr})
        opt = torch.optim.AdamW(groups, weight_decay=0.0)
        self.history_: list[float] = []
        start, elapsed = 0, 0.0
        ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
        if ckpt is not None and resume and (ckpt / "config.json").is_file():
            start, elapsed = self._load_checkpoint(ckpt, model, opt)
        decoder = self._decoder(model)
        params = [p for g in groups for p in g["params"]]
        states = list(range(1, int(model.cfg.n_layers) + 1))
        bar = tqdm(
            range(start, self.steps),
            desc="contextualization probe",
            disable=not progress,
            initial=start,
            total=self.steps,
        )
        t0 = time.perf_counter()
        for step in bar:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
            starts = torch.randint(0, stream.numel() - T + 1, (self.windows_per_step,), generator=g)
            windows = torch.stack([stream[s : s + T] for s in starts.tolist()])
            b_idx = torch.arange(self.windows_per_step).repeat_interleave(self.positions_per_window)
            pos = torch.randint(1, T, (b_idx.numel(),), generator=g)
            with _no_weight_grads(decoder if self.decoder_ is None else None):
                loss = self._batch_loss(model, decoder, windows, b_idx, pos, states)
                # A bridge over fused-QKV models (GPT-2, GPT-NeoX, Phi-3) keeps the fused weight
                # beside the split q/k/v it computes with; the unused copy gets no gradient.
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, gr in zip(params, grads):
                p.grad = gr
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * self._lr_factor(step)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.history_.append(float(loss.detach()))
            bar.set_postfix(loss=f"{self.history_[-1]:.3f}")
            if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == self.steps):
                self._save_checkpoint(ckpt, opt, step + 1, elapsed + time.perf_counter() - t0)
        bar.close()
        self.steps_done_ = int(self.steps)
        self.train_seconds_ = elapsed + time.perf_counter() - t0
        return self

    def _apply_fit_settings(
        self, n_tokens: int | None, batch_size: int | None, seed: int | None, quick: bool
    ) -> None:
        self.quick = bool(quick)
        if quick:  # QUICK for the settings left at their defaults (those given win)
            defaults = inspect.signature(type(self).__init__).parameters
            for name, value in self.QUICK.items():
                if getattr(self, name) == defaults[name].default:
                    setattr(self, name, value)
        if batch_size is not None:
            self.windows_per_step = int(batch_size)
        if seed is not None:
            self.seed = int(seed)
        if n_tokens is not None:
            per_step = int(self.windows_per_step) * int(self.window_length)
            self.steps = max(1, -(-int(n_tokens) // per_step))
            self.warmup = min(int(self.warmup), max(0, self.steps - 1))

    def _batch_loss(self, model, decoder, windows, b_idx, pos, states) -> torch.Tensor:
        H = examined_states(model, windows, states)[b_idx, pos]  # [n layer d]
        soft = self.encoder_(H)
        pad = int(windows[0, 0])
        inputs, targets, mask = prefix_examples(windows, b_idx, pos, self.prefix_length, pad)
        ce = prefix_token_loss(decoder, inputs, soft, targets, mask)
        return (ce.sum(1) / mask.sum(1)).mean()

    # -- persistence ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {f"encoder.{k}": v for k, v in self.encoder_.state_dict().items()}
        out.update({f"decoder.{name}": p.detach() for name, p in self._trained_decoder_params()})
        return out

    def _config(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "layers_pooled": "resid_post of every block (h^1..h^L)",
            "position_0": "NaN (no prefix)",
            "model_class": self.model_class_,
            "decoder_parameters": [name for name, _ in self._trained_decoder_params()],
            "corpus": getattr(self, "corpus_", ""),
            "history": list(getattr(self, "history_", [])),
            "steps_done": int(getattr(self, "steps_done_", 0)),
            "train_seconds": float(getattr(self, "train_seconds_", 0.0)),
            "quick": bool(self.quick),
        }

    def save(self, path: str | Path | None = None) -> Path:
        """Save the encoder, the decoder's trained parameters and every setting, tied to the model
        (``path=None``: the artifact store's place for that model)."""
        from tlmicroscope.artifacts import save_path

        if not hasattr(self, "encoder_"):
            raise ValueError("This probe is not fitted: call .fit(model, corpus) first.")
        return io.save_fitted(
            save_path(self.kind, path, self.model_),
            self._tensors(),
            kind=KIND,
            config=self._config(),
            fingerprint=self.model_,
        )

    @classmethod
    def load(cls, path: str | Path | None, model: Any) -> ContextualizationProbe:
        """Load a saved probe for ``model`` (refused for another model or model class);
        ``path=None`` reads the artifact store's probe for ``model``."""
        from tlmicroscope.artifacts import load_path

        path = load_path(cls.kind, path, model)
        tensors, meta = io.load_fitted(path, kind=KIND, model=model)
        probe = cls(**meta["config"]["settings"])
        probe.quick = io.config_bool(meta["config"], "quick", path, default=False)
        probe._restore(tensors, meta["config"], model, path)
        probe.history_ = list(meta["config"].get("history", []))
        probe.steps_done_ = io.config_int(meta["config"], "steps_done", path, minimum=0, default=0)
        probe.train_seconds_ = float(meta["config"].get("train_seconds", 0.0))
        probe.corpus_ = meta["config"].get("corpus", "")
        return probe

    def _restore(
        self,
        tensors: dict[str, torch.Tensor],
        config: dict[str, Any],
        model: Any,
        path: Any,
        *,
        build: bool = True,
    ) -> None:
        saved_class = config.get("model_class")
        if self.decoder != "frozen" and saved_class and saved_class != type(model).__name__:
            raise io.ModelMismatchError(
                f"The probe at {path} trained decoder blocks of a {saved_class}; this model is a "
                f"{type(model).__name__}, whose parameters are named differently. Load the model "
                "with the same kind."
            )
        if build:
            self._validate(model)
            self._build(model)
        enc = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
        try:
            self.encoder_.load_state_dict(enc)
        except RuntimeError as exc:
            raise io.FittedFileError(
                f"{path}: the encoder weights do not match its settings ({exc})."
            ) from exc
        named = dict(self._trained_decoder_params())
        saved = {k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")}
        if set(saved) != set(named):
            raise io.FittedFileError(
                f"{path}: the saved decoder parameters do not match this model's "
                f"{self.decoder!r} blocks ({len(saved)} saved, {len(named)} expected)."
            )
        with torch.no_grad():
            for name, p in named.items():
                p.copy_(saved[name])

    def _save_checkpoint(
        self, path: Path, opt: torch.optim.Optimizer, step: int, seconds: float
    ) -> None:
        tensors = self._tensors()
        state = opt.state_dict()
        for i, st in state["state"].items():
            for key, value in st.items():
                tensors[f"optim.{i}.{key}"] = torch.as_tensor(value)
        cfg = self._config()
        cfg.update(
            step=step,
            train_seconds=seconds,
            history=self.history_,
            optim_groups=[
                {k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]
            ],
        )
        io.save_fitted(path, tensors, kind=CHECKPOINT_KIND, config=cfg, fingerprint=self.model_)

    def _load_checkpoint(
        self, path: Path, model: Any, opt: torch.optim.Optimizer
    ) -> tuple[int, float]:
        tensors, meta = io.load_fitted(path, kind=CHECKPOINT_KIND, model=model)
        cfg = meta["config"]
        for key, value in cfg["settings"].items():
            if getattr(self, key) != value:
                raise ValueError(
                    f"The checkpoint at {path} was made with {key}={value!r}, but this probe has "
                    f"{key}={getattr(self, key)!r}. Use the same settings, another checkpoint_dir, "
                    "or resume=False."
                )
        self._restore(tensors, cfg, model, path, build=False)
        state = opt.state_dict()
        for i in state["state"].keys() | {
            int(k.split(".")[1]) for k in tensors if k.startswith("optim.")
        }:
            keys = [k for k in tensors if k.startswith(f"optim.{i}.")]
            state["state"][i] = {k.split(".", 2)[2]: tensors[k] for k in keys}
        for group, saved in zip(state["param_groups"], cfg["optim_groups"]):
            group.update(saved)
        opt.load_state_dict(state)
        self.history_ = list(cfg.get("history", []))
        return int(cfg["step"]), float(cfg.get("train_seconds", 0.0))

    def __repr__(self) -> str:
        state = f"fitted {self.steps_done_} steps" if hasattr(self, "steps_done_") else "unfitted"
        return (
            f"ContextualizationProbe(prefix_length={self.prefix_length}, "
            f"mlp_hidden={self.mlp_hidden}, "
            f"decoder={self.decoder!r}, trainable_blocks={self.trainable_blocks}; {state})"
        )


@contextmanager
def _no_weight_grads(model: Any):
    """Switch off ``requires_grad`` on a frozen decoder's weights for one step, then restore it.

    Gradients must flow through the decoder to the soft embedding, but building weight-gradient
    nodes for 100M frozen parameters makes each step several times slower."""
    if model is None:
        yield
        return
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


@dataclass(frozen=True)
class Contextualization:
    """Per-token contextualization C of one prompt (or batch).

    Attributes:
        C: ``−log P(prefix | e_i)`` per token ``[batch pos]``, mean (or sum) over the prefix tokens,
            in nats; NaN at position 0, which has no prefix.
        prefix_length: How many prefix tokens each C covers (``min(i, P)``).
        reduction: ``"mean"`` or ``"sum"``.
    """

    C: Float[torch.Tensor, "batch pos"]
    prefix_length: Int[torch.Tensor, "batch pos"]
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    reduction: str
    provenance: Provenance

    def to_dataframe(self, batch: int = 0):
        import pandas as pd

        return pd.DataFrame(
            {
                "position": range(self.C.shape[1]),
                "token": self.str_tokens[batch],
                "C": self.C[batch].tolist(),
                "prefix_length": self.prefix_length[batch].tolist(),
            }
        )


@renamed_arguments(old_positional=("model_or_cache", "tokens", "probe"))
def contextualization(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    probe: ContextualizationProbe | str | Path | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    positions: slice | Sequence[int] | None = None,
    batch_size: int = 64,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> Contextualization:
    """C_i for every token of a prompt with a fitted probe (or the folder of a saved one).

    With an ``ActivationCache`` holding the residual stream (h^1..h^L, as ``run_with_cache`` or
    the report's shared capture gives), the examined states come from the cache; the decoder
    still runs the model on each prefix (one short forward pass per decoded token).

    Args:
        model_or_cache: A TransformerLens model, or an ``ActivationCache`` of one.
        tokens: Text or token ids ``[batch pos]``.
        probe: A fitted ``ContextualizationProbe`` or the folder of a saved one (keyword-only;
            passing it third by position still works for one release, with a
            ``DeprecationWarning``).
        positions: Decode only these positions (a slice or indices; default every position ≥ 1);
            C is NaN elsewhere. Decoding costs about ``P`` tokens of forward pass per position,
            so a long text is cheaper on a window of it.

    Raises:
        ValueError: no probe, a probe for another model, an unknown reduction, positions out of
            range.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> probe = ContextualizationProbe(
        ...     prefix_length=3, mlp_hidden=8, decoder="frozen", steps=1, window_length=8
        ... ).fit(model, ["some text to train on " * 5], progress=False)
        >>> ctx = contextualization(model, "abcde", probe=probe, reduction="sum")
        >>> ctx.prefix_length.tolist()
        [[0, 1, 2, 3, 3]]
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, cache, toks = resolved.model, resolved.cache, resolved.tokens
    ensure_eval(model)
    if probe is None:
        raise ValueError(
            "Pass a fitted ContextualizationProbe (or the folder of a saved one); train one with "
            "ContextualizationProbe().fit(model) or `tlmicroscope microscope-train-probe`."
        )
    if not isinstance(probe, ContextualizationProbe):
        probe = ContextualizationProbe.load(probe, model)
    if not hasattr(probe, "encoder_"):
        raise ValueError("This probe is not fitted: call .fit(model, corpus) or load a saved one.")
    io.check_fingerprint(probe.model_, model, what="This contextualization probe")
    batch, n_pos = toks.shape
    wanted = _positions(positions, n_pos)
    C = torch.full((batch, n_pos), float("nan"))
    plen = torch.clamp(torch.arange(n_pos), max=probe.prefix_length).expand(batch, n_pos).clone()
    cpu_toks = toks.cpu()
    states = list(range(1, int(model.cfg.n_layers) + 1))
    with torch.inference_mode():
        H = (
            examined_states(model, toks, states)
            if cache is None
            else _cached_states(cache, model, states, toks)
        )
        pairs = [(b, i) for b in range(batch) for i in wanted]
        decoder = probe._decoder(model)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            b_idx = torch.tensor([b for b, _ in chunk])
            pos = torch.tensor([i for _, i in chunk])
            soft = probe.encoder_(H[b_idx, pos].to(next(probe.encoder_.parameters()).device))
            inputs, targets, mask = prefix_examples(
                cpu_toks, b_idx, pos, probe.prefix_length, int(cpu_toks[0, 0])
            )
            ce = prefix_token_loss(decoder, inputs, soft, targets, mask).sum(1).cpu()
            C[b_idx, pos] = ce / mask.sum(1) if reduction == "mean" else ce
    plen[:, 0] = 0
    str_tokens = str_tokens_of(model, toks)
    decoded = (
        "all"
        if positions is None
        else f"{len(wanted)} of {n_pos} ({wanted[0]}..{wanted[-1]})"
        if wanted
        else f"0 of {n_pos} (-..-)"
    )
    prov = Provenance.from_model(
        model, reduction=reduction, probe=repr(probe), positions=decoded, **probe.settings()
    )
    return Contextualization(
        C=C,
        prefix_length=plen,
        tokens=cpu_toks,
        str_tokens=as_str_tokens(str_tokens),
        reduction=reduction,
        provenance=prov,
    )


def _positions(positions: slice | Sequence[int] | None, n_pos: int) -> list[int]:
    """The positions to decode (≥ 1, sorted, unique); position 0 has no prefix and is skipped."""
    if positions is None:
        return list(range(1, n_pos))
    if isinstance(positions, slice):
        idx = list(range(n_pos))[positions]
    else:
        idx = [int(i) for i in torch.as_tensor(positions).reshape(-1).tolist()]
        bad = [i for i in idx if not -n_pos <= i < n_pos]
        if bad:
            raise ValueError(f"positions {bad[:3]} are outside the {n_pos} tokens of the text.")
        idx = [i % n_pos for i in idx]
    return sorted({i for i in idx if i >= 1})


def _cached_states(cache: Any, model: Any, states: list[int], toks: torch.Tensor) -> torch.Tensor:
    """h^1..h^L ``[batch pos layer d_model]`` from an ``ActivationCache`` of the residual stream."""
    names = residual_stream_names(int(model.cfg.n_layers))
    lacking = [names[s] for s in states if names[s] not in cache]
    if lacking:
        raise ValueError(
            f"The ActivationCache lacks {lacking[:3]}; cache the residual stream "
            "(blocks.{l}.hook_resid_pre and the last hook_resid_post), or pass the model."
        )
    H = torch.stack([cache[names[s]] for s in states], dim=2)
    if tuple(H.shape[:2]) != tuple(toks.shape):
        raise ValueError(
            f"Cache activations {tuple(H.shape[:2])} do not match the tokens {tuple(toks.shape)}."
        )
    return H
