"""Training a tuned lens: the reference KL objective, recipes, least-squares init, DDP, checkpoints.

Each step reads ``tokens_per_step`` tokens of fixed-length windows, runs the frozen model once
under ``torch.inference_mode`` (caching only the ``hook_resid_pre`` of each block and the logits),
and for each layer ``l`` minimises ``KL(p_final || readout(translator_l(h_l)))`` at the same
position, averaged over tokens. Gradients are written out by hand one vocabulary chunk at a time
(``_tuned_kl``), so only one ``[chunk d_vocab]`` buffer is alive at a time. The KL recorded
for each step is measured before that step's update on windows never seen before (one pass over
the data), so the history is a held-out learning curve at no extra cost.

Under ``torchrun`` each rank reads its own share of each step's windows; gradients are summed
across ranks (one all-reduce, as DDP does) and divided by the global token count, so N processes
give the same lens as one process with the same global batch. Data order depends only on the seed
and the step, so ``resume=True`` continues from the last checkpoint to the same result.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int

from tlmicroscope.corpus import CorpusSource
from tlmicroscope.deprecation import renamed_arguments
from tlmicroscope.distributed import DistContext, dist_context
from tlmicroscope.io import atomic_write_text, recover_dir
from tlmicroscope.lenses._tuned_checkpoint import (
    CHECKPOINT_DIR,
    _finish_lens_move,
    _load_checkpoint,
    _save_checkpoint,
    _save_lens_into,
    _train_settings,
    default_lens_dir,
)
from tlmicroscope.lenses._tuned_data import (
    _data_signature,
    _forward,
    _micro_batches,
    _step_windows,
    _window_order,
    lens_token_windows,
)
from tlmicroscope.lenses._tuned_kl import FinalDistribution, LensObjective, resolve_compute_dtype
from tlmicroscope.lenses._tuned_optim import RECIPES, make_optimizers
from tlmicroscope.lenses.readout import Readout, check_readout_identity
from tlmicroscope.lenses.tuned import TunedLens
from tlmicroscope.results import Provenance

__all__ = [
    "CHECKPOINT_DIR",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "default_lens_dir",
    "lens_token_windows",
    "train_tuned_lens",
]

_log = logging.getLogger(__name__)


class TrainingDivergedError(FloatingPointError):
    """The loss or the gradients became NaN or infinite; the last good checkpoint is kept."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a tuned-lens training run (defaults: the fast recipe, sized for 2 CPU cores).

    Attributes:
        steps: Optimizer steps. The learning rate decays linearly to zero over them.
        tokens_per_step: Global batch in tokens (a multiple of ``seq_len``; the reference uses
            2^18).
        seq_len: Tokens per window (at most the model's ``n_ctx``; the reference uses 2048).
        recipe: ``"muon"`` (Muon on matrices, AdamW on biases), ``"sgd"`` (the reference's
            SGD-Nesterov recipe, exactly) or ``"adam"``.
        lr, bias_lr, weight_decay, momentum: ``None`` takes the recipe's value (``RECIPES``).
        warmup_steps: Linear warmup before the decay (the reference uses none).
        clip_grad_norm: Global gradient-norm clip over the lens (reference: 1.0); ``None``
            disables it.
        init: ``"zero"`` (the logit lens) or ``"lstsq"`` (each translator fitted in closed form to
            the normalised last residual, Din et al.'s linear shortcut, then fine-tuned with KL).
        init_tokens: Tokens (forward passes only) for the least-squares fit.
        ridge: Ridge penalty of the least-squares fit, relative to the mean input variance.
        precision: ``"auto"`` (bfloat16 vocabulary GEMMs where the hardware is fast at them),
            ``"bf16"`` or ``"fp32"``. The model and the translators stay float32.
        micro_batch_tokens: Tokens per forward pass (bounds memory; does not change the result
            beyond floating-point summation order).
        chunk_rows: Rows per ``[rows d_vocab]`` buffer of the objective.
        holdout: Fraction of the corpus's tokens (its tail) kept out of training for evaluation.
        seed: Seeds the window order.
        bias: Learn the translators' biases.
        out_dir: Folder for the lens, ``checkpoint/`` and ``training.json`` (``None``: keep in
            memory).
        checkpoint_every: Steps between checkpoints (and at the end).
        resume: Continue from ``out_dir/checkpoint`` (same settings required). A folder without a
            checkpoint starts from step 0 with a ``UserWarning`` (and a log line naming it); one
            that holds a trained lens but lost its checkpoint is refused.
        stop_after: Stop after this many steps in this call (a checkpoint is written); resume later.
        max_seconds: Stop (with a checkpoint) after the first step that ends past this wall time.
        progress: Show a tqdm bar with the loss.
        text_field: Field of JSONL rows and dataset records holding the text.
    """

    steps: int = 40
    tokens_per_step: int = 512
    seq_len: int = 256
    recipe: Literal["muon", "sgd", "adam"] = "muon"
    lr: float | None = None
    bias_lr: float | None = None
    weight_decay: float | None = None
    momentum: float | None = None
    warmup_steps: int = 0
    clip_grad_norm: float | None = 1.0
    init: Literal["zero", "lstsq"] = "lstsq"
    init_tokens: int = 8192
    ridge: float = 1e-3
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    micro_batch_tokens: int = 512
    chunk_rows: int = 256
    holdout: float = 0.1
    seed: int = 0
    bias: bool = True
    out_dir: str | None = None
    checkpoint_every: int = 10
    resume: bool = False
    stop_after: int | None = None
    max_seconds: float | None = None
    progress: bool = True
    text_field: str = "text"

    def resolved(self) -> TrainConfig:
        """A copy with the recipe's defaults filled in, after checking every setting."""
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {self.recipe!r}.")
        if self.init not in ("zero", "lstsq"):
            raise ValueError(f"init must be 'zero' or 'lstsq', got {self.init!r}.")
        for name in (
            "steps",
            "tokens_per_step",
            "seq_len",
            "micro_batch_tokens",
            "chunk_rows",
            "checkpoint_every",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.tokens_per_step % self.seq_len:
            raise ValueError(
                f"tokens_per_step={self.tokens_per_step} is not a multiple of "
                f"seq_len={self.seq_len}; "
                f"use e.g. {max(1, round(self.tokens_per_step / self.seq_len)) * self.seq_len}."
            )
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}.")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps must be in 0..steps-1, got {self.warmup_steps}.")
        r = RECIPES[self.recipe]
        return dataclasses.replace(
            self,
            lr=float(self.lr if self.lr is not None else r.lr),
            bias_lr=float(self.bias_lr if self.bias_lr is not None else r.bias_lr),
            weight_decay=float(
                self.weight_decay if self.weight_decay is not None else r.weight_decay
            ),
            momentum=float(self.momentum if self.momentum is not None else r.momentum),
        )

    def lr_factor(self, step: int) -> float:
        """Linear warmup, then linear decay to zero at ``steps`` (the reference's schedule)."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.steps - step) / (self.steps - self.warmup_steps))


@dataclass(frozen=True)
class TrainResult:
    """A trained lens and its learning curve.

    Attributes:
        lens: The trained ``TunedLens``.
        tokens_seen: Tokens consumed before each recorded step, ``[step]``.
        kl: Mean KL(final || lens) per layer on each step's batch, before its update, nats
            ``[step layer]``; the batches are unseen, so this is a held-out learning curve.
        lr: Learning rate used at each step; ``grad_norm``: gradient norm before clipping.
        seconds: Wall time of each step.
        init_seconds: Wall time of the least-squares initialisation (0 for ``init="zero"``).
        tokens_per_second: Training throughput (tokens through all layers per second).
        config: The resolved settings. ``provenance``: model, lens, settings.
    """

    lens: TunedLens
    tokens_seen: Int[torch.Tensor, " step"]
    kl: Float[torch.Tensor, "step layer"]
    lr: Float[torch.Tensor, " step"]
    grad_norm: Float[torch.Tensor, " step"]
    seconds: Float[torch.Tensor, " step"]
    init_seconds: float
    tokens_per_second: float
    config: TrainConfig
    provenance: Provenance

    def to_dataframe(self):
        """One row per (step, layer): tokens seen, KL (nats), lr."""
        import pandas as pd

        rows = []
        for i in range(self.kl.shape[0]):
            for layer in range(self.kl.shape[1]):
                rows.append(
                    {
                        "step": i,
                        "tokens_seen": int(self.tokens_seen[i]),
                        "layer": layer,
                        "kl": float(self.kl[i, layer]),
                        "lr": float(self.lr[i]),
                    }
                )
        return pd.DataFrame(rows)


# ---------------------------------------------------------------------------- initialisation
def lstsq_init(
    model: Any,
    lens: TunedLens,
    windows: torch.Tensor,
    ids: list[int],
    *,
    micro: int,
    ridge: float,
    ctx: DistContext,
) -> None:
    """Fit each translator in closed form so ``translator_l(h_l)`` points along the final residual.

    Minimises ``sum_n ||(A h_n + b) / s_n - norm(h_L,n)||^2`` with ``s_n`` the RMS of ``h_n``: the
    readout is scale-invariant, so each row counts by direction, and high-norm rows (the
    attention-sink position) do not dominate. Normal equations in float64, summed over ranks.
    """
    readout = Readout.for_model(model)
    L, d = lens.n_layers, lens.d_model
    dev = readout.W.device  # the sums live where the activations are (a CUDA model's GPU)
    G = torch.zeros(L, d + 1, d + 1, dtype=torch.float64, device=dev)
    C = torch.zeros(L, d + 1, d, dtype=torch.float64, device=dev)
    for batch in _micro_batches(ids, micro):
        resid, _ = _forward(model, windows[batch], list(range(L + 1)), logits=False)
        with torch.inference_mode():
            resid = resid.reshape(L + 1, -1, d).float()
            target = readout.normalize(resid[L])
            for layer in range(L):
                x = resid[layer]
                w = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-12)
                xa = torch.cat(
                    [x * w, w], 1
                ).double()  # float64 products: the solve amplifies rounding
                G[layer] += xa.T @ xa
                C[layer] += xa.T @ target.double()
    flat = ctx.all_reduce_sum(torch.cat([G.flatten(), C.flatten()]))
    G, C = flat[: G.numel()].view_as(G), flat[G.numel() :].view_as(C)
    eye = torch.eye(d, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for layer in range(L):
            g = G[layer].clone()
            g[:d, :d] += ridge * torch.diagonal(g[:d, :d]).mean() * eye
            B = torch.linalg.solve(g, C[layer])  # [d+1 d]: y = x B[:d] + B[d]
            lens.weight[layer] = (B[:d] - eye).T.to(lens.weight)
            if lens.has_bias:
                lens.bias[layer] = B[d].to(lens.bias)


# ---------------------------------------------------------------------------------- training
def _empty_history() -> dict[str, list]:
    return {
        "tokens_seen": [],
        "kl": [],
        "lr": [],
        "grad_norm": [],
        "seconds": [],
        "init_seconds": 0.0,
    }


@renamed_arguments(old_positional=("model", "corpus", "config"))
def train_tuned_lens(
    model: Any,
    corpus: CorpusSource = None,
    *,
    config: TrainConfig | None = None,
    lens: TunedLens | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a tuned lens for ``model`` on ``corpus`` with the KL objective.

    Args:
        model: A TransformerLens model (kept frozen; run under ``torch.inference_mode``).
        corpus: ``None``/``"embedded"``, a .txt/.jsonl file or folder, or an iterable of strings.
        config: A ``TrainConfig``; keyword ``overrides`` replace its fields. Keyword-only (passing
            it third by position still works for one release, with a ``DeprecationWarning``).
        lens: A lens to keep training (default: a new zero lens for ``model``).

    Returns:
        A ``TrainResult`` with the lens and its held-out learning curve. With ``out_dir`` the lens
        is also saved there (``load_lens(out_dir, model)`` reads it).

    Raises:
        ValueError: bad settings, ``seq_len`` over ``n_ctx``, a corpus too small for one step, a
            checkpoint from other settings or another model.
        TrainingDivergedError: the loss became NaN or infinite (the last checkpoint is kept).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> text = ["The tuned lens reads each layer. " * 40]
        >>> res = train_tuned_lens(model, text, steps=3, tokens_per_step=64, seq_len=32,
        ...                        init_tokens=128, progress=False, precision="fp32")
        >>> tuple(res.kl.shape), int(res.tokens_seen[-1])
        ((3, 2), 128)
    """
    cfg = dataclasses.replace(config or TrainConfig(), **overrides).resolved()
    run = _prepare_run(model, corpus, cfg, lens)
    start, history = _start_state(model, run, cfg)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=cfg.steps,
        initial=start,
        desc="tuned lens",
        unit="step",
        disable=not (cfg.progress and run.ctx.is_main),
    )
    t_run = time.perf_counter()
    step = start
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            kl_mean, grad_norm = _step_gradients(model, run, cfg, step)
            _check_finite_loss(run, step, kl_mean, grad_norm)
            factor = _apply_update(run, cfg, step, grad_norm)
            step += 1
            history["tokens_seen"].append((step - 1) * run.n_global)
            history["kl"].append([float(v) for v in kl_mean])
            history["lr"].append(cfg.lr * factor)
            history["grad_norm"].append(grad_norm)
            history["seconds"].append(time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(kl=f"{float(kl_mean.mean()):.3f}", lr=f"{cfg.lr * factor:.2g}")
            done = step >= cfg.steps
            stopping = (cfg.stop_after is not None and step - start >= cfg.stop_after) or (
                cfg.max_seconds is not None and time.perf_counter() - t_run > cfg.max_seconds
            )
            if run.out is not None and (done or stopping or step % cfg.checkpoint_every == 0):
                _write_checkpoint(run, cfg, history, step)
            if stopping:
                break
    finally:
        bar.close()
    _record(run.lens, cfg, history, run.ctx, step)
    return _result(model, run.lens, cfg, history)


@dataclass
class _Run:
    """What a training run holds between steps (built once by ``_prepare_run``)."""

    lens: TunedLens
    ctx: DistContext
    readout: Readout
    objective: LensObjective
    windows: torch.Tensor
    per_step: int
    micro: int
    n_global: int
    data_sig: dict
    optimizers: dict
    base_lrs: dict
    out: Path | None
    weight_grad: torch.Tensor
    bias_grad: torch.Tensor
    order_cache: dict = dataclasses.field(default_factory=dict)
    identity_checked: bool = False


def _prepare_run(
    model: Any, corpus: CorpusSource, cfg: TrainConfig, lens: TunedLens | None
) -> _Run:
    """Check the model and the lens, cut the corpus into windows, build the optimizers."""
    ctx = dist_context(model.W_U.device)
    from tlmicroscope.inputs import ensure_eval

    ensure_eval(model)
    lens = lens if lens is not None else TunedLens.for_model(model, bias=cfg.bias)
    lens.check_model(model)
    if lens.model_info is None:
        from tlmicroscope.io import model_fingerprint

        lens.model_info = model_fingerprint(model)
    readout = Readout.for_model(model)
    compute_dtype = resolve_compute_dtype(cfg.precision, model.W_U.device)
    objective = LensObjective(readout, compute_dtype=compute_dtype, chunk_rows=cfg.chunk_rows)
    windows = lens_token_windows(
        model,
        corpus,
        seq_len=cfg.seq_len,
        split="train",
        holdout=cfg.holdout,
        text_field=cfg.text_field,
    )
    per_step = cfg.tokens_per_step // cfg.seq_len
    if windows.shape[0] < per_step:
        raise ValueError(
            f"The training split has {windows.shape[0]} windows of {cfg.seq_len} tokens, fewer "
            f"than one step of {per_step} ({cfg.tokens_per_step} tokens). Use a larger corpus, or "
            "a smaller tokens_per_step or seq_len."
        )
    optimizers = make_optimizers(
        cfg.recipe,
        lens.weight,
        lens.bias if lens.has_bias else None,
        lr=cfg.lr,
        bias_lr=cfg.bias_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        # bfloat16 Newton-Schulz only where bfloat16 products are fast: on a
        # CPU without bf16 instructions they run ~50x slower than float32
        # (80 s against under 2 s a step for SmolLM2's 30 translators)
        ns_dtype=compute_dtype,
    )
    return _Run(
        lens=lens,
        ctx=ctx,
        readout=readout,
        objective=objective,
        windows=windows,
        per_step=per_step,
        micro=max(1, cfg.micro_batch_tokens // cfg.seq_len),
        n_global=per_step * cfg.seq_len,
        data_sig=_data_signature(corpus, windows),
        optimizers=optimizers,
        base_lrs={name: [g["lr"] for g in opt.param_groups] for name, opt in optimizers.items()},
        out=Path(cfg.out_dir) if cfg.out_dir else None,
        weight_grad=torch.zeros_like(lens.weight),
        bias_grad=torch.zeros_like(lens.bias),
    )


def _start_state(model: Any, run: _Run, cfg: TrainConfig) -> tuple[int, dict]:
    """The step to start from and the history so far: a checkpoint's, or a fresh run's (after
    the least-squares initialisation when ``init="lstsq"``)."""
    out, ctx, windows = run.out, run.ctx, run.windows
    start, history = 0, _empty_history()
    if out is not None:
        # a checkpoint save killed half-way: put the previous one back
        recover_dir(out / CHECKPOINT_DIR)
        _finish_lens_move(out)  # and a lens save stopped between its two files: finish it
        if cfg.resume and not (out / CHECKPOINT_DIR).exists():
            _no_checkpoint_to_resume(out, ctx)
    if out is not None and (out / CHECKPOINT_DIR).exists():
        if not cfg.resume:
            raise ValueError(
                f"{out} already holds a training checkpoint. Pass resume=True (--resume) to "
                "continue it, or choose another output folder."
            )
        return _load_checkpoint(out, model, run.lens, run.optimizers, cfg, run.data_sig)
    if cfg.init == "lstsq":
        t0 = time.perf_counter()
        n_init = max(1, min(windows.shape[0], cfg.init_tokens // cfg.seq_len))
        order = _window_order(windows.shape[0], cfg.seed, -1)[:n_init].tolist()
        lstsq_init(
            model,
            run.lens,
            windows,
            order[ctx.rank :: ctx.world_size],
            micro=run.micro,
            ridge=cfg.ridge,
            ctx=ctx,
        )
        history["init_seconds"] = time.perf_counter() - t0
    return start, history


def _step_gradients(
    model: Any, run: _Run, cfg: TrainConfig, step: int
) -> tuple[torch.Tensor, float]:
    """One step's translator gradients (summed over ranks into ``run.weight_grad`` and
    ``run.bias_grad``), its per-layer mean KL before the update, and the gradient norm."""
    ctx, lens, L = run.ctx, run.lens, run.lens.n_layers
    d = lens.d_model
    ids = _step_windows(run.windows.shape[0], run.per_step, step, cfg.seed, run.order_cache)
    weight_grad, bias_grad = run.weight_grad, run.bias_grad
    weight_grad.zero_()
    bias_grad.zero_()
    kl_sum = torch.zeros(L, dtype=torch.float64, device=lens.weight.device)
    W, b = lens.weight.detach(), lens.bias.detach()
    for batch in _micro_batches(ids[ctx.rank :: ctx.world_size], run.micro):
        layers = list(range(L + (not run.identity_checked)))
        resid, logits = _forward(model, run.windows[batch], layers, logits=True)
        with torch.inference_mode():
            logits = logits.reshape(-1, logits.shape[-1])
            if not run.identity_checked:
                # The readout of the last residual must give the model's own logits.
                check_readout_identity(run.readout, resid[L].reshape(-1, d)[-8:], logits[-8:])
                run.identity_checked = True
            final = FinalDistribution.from_logits(logits)
            del logits
            for layer in range(L):
                kl, gW, gb = run.objective.layer_loss_and_grads(
                    resid[layer].reshape(-1, d),
                    W[layer],
                    b[layer],
                    final,
                    grad_scale=1.0 / run.n_global,
                )
                kl_sum[layer] += float(kl)
                weight_grad[layer] += gW
                bias_grad[layer] += gb
        del resid, final
    flat = ctx.all_reduce_sum(
        torch.cat([weight_grad.flatten(), bias_grad.flatten(), kl_sum.float()])
    )
    n_w, n_b = weight_grad.numel(), bias_grad.numel()
    weight_grad.copy_(flat[:n_w].view_as(weight_grad))
    bias_grad.copy_(flat[n_w : n_w + n_b].view_as(bias_grad))
    if not lens.has_bias:
        bias_grad.zero_()
    grad_norm = float(torch.sqrt(weight_grad.pow(2).sum() + bias_grad.pow(2).sum()))
    return flat[-L:].double() / run.n_global, grad_norm


def _kept_checkpoint(run: _Run) -> str:
    return f"; the last good checkpoint in {run.out / CHECKPOINT_DIR} is kept" if run.out else ""


def _check_finite_loss(run: _Run, step: int, kl_mean: torch.Tensor, grad_norm: float) -> None:
    if torch.isfinite(kl_mean).all() and math.isfinite(grad_norm):
        return
    bad = [i for i in range(len(kl_mean)) if not math.isfinite(float(kl_mean[i]))]
    raise TrainingDivergedError(
        f"Step {step}: the KL loss or its gradient is NaN or infinite"
        + (f" (layers {bad[:8]})" if bad else "")
        + ". Training stopped before applying the update"
        + _kept_checkpoint(run)
        + ". Lower the learning rate (lr=...), or check the model's activations for NaN."
    )


def _apply_update(run: _Run, cfg: TrainConfig, step: int, grad_norm: float) -> float:
    """Clip, then step every optimizer at this step's learning rate; returns the lr factor."""
    lens, weight_grad, bias_grad = run.lens, run.weight_grad, run.bias_grad
    if cfg.clip_grad_norm is not None and grad_norm > cfg.clip_grad_norm:
        scale = cfg.clip_grad_norm / (grad_norm + 1e-6)
        weight_grad.mul_(scale)
        bias_grad.mul_(scale)
    lens.weight.grad = weight_grad
    lens.bias.grad = bias_grad if lens.has_bias else None
    factor = cfg.lr_factor(step)
    for name, opt in run.optimizers.items():
        for group, base in zip(opt.param_groups, run.base_lrs[name]):
            group["lr"] = base * factor
        opt.step()
    lens.weight.grad = lens.bias.grad = None
    if not (torch.isfinite(lens.weight).all() and torch.isfinite(lens.bias).all()):
        raise TrainingDivergedError(
            f"Step {step}: the update made the translators NaN or infinite. Lower the "
            "learning rate" + (_kept_checkpoint(run) + "." if run.out else ".")
        )
    return factor


def _write_checkpoint(run: _Run, cfg: TrainConfig, history: dict, step: int) -> None:
    """Checkpoint, lens and learning curve into ``run.out`` (by the main rank), then a barrier."""
    _record(run.lens, cfg, history, run.ctx, step)
    if run.ctx.is_main:
        out = run.out
        _save_checkpoint(out, run.lens, run.optimizers, step, history, cfg, run.data_sig)
        _save_lens_into(out, run.lens)
        atomic_write_text(
            out / "training.json",
            json.dumps(
                {"settings": _train_settings(cfg), "step": step, "history": history},
                indent=1,
            ),
        )
    run.ctx.barrier()


def _no_checkpoint_to_resume(out: Path, ctx: DistContext) -> None:
    """``resume=True`` but ``out`` has no checkpoint: refuse where a lens was trained, else warn.

    A folder holding a trained lens or a learning curve but no ``checkpoint/`` lost its checkpoint
    (deleted, or moved by hand); starting over would overwrite that lens, so it is refused. A new
    or empty folder starts from step 0 with a warning and a log line, not an error: scripts that
    always pass ``--resume`` (so that a rerun after a kill continues) must work on their first
    run, and the warning makes a mistyped ``--out`` visible.
    """
    trained = [name for name in ("training.json", "tensors.safetensors") if (out / name).is_file()]
    if trained:
        raise ValueError(
            f"Cannot resume in {out}: it holds a trained lens ({', '.join(trained)}) but no "
            f"{CHECKPOINT_DIR}/ folder to continue from. Pass resume=False (no --resume) to train "
            "it "
            "again from step 0, overwriting that lens, or choose another output folder."
        )
    if ctx.is_main:
        message = (
            f"resume=True, but {out.resolve()} holds no checkpoint ({CHECKPOINT_DIR}/): training "
            "starts "
            "from step 0. If you meant to continue an earlier run, check the output folder (--out)."
        )
        _log.warning(message)
        warnings.warn(message, UserWarning, stacklevel=3)


def _record(lens: TunedLens, cfg: TrainConfig, history: dict, ctx: DistContext, step: int) -> None:
    seen = (history["tokens_seen"][-1] + cfg.tokens_per_step) if history["tokens_seen"] else 0
    lens.settings = {
        "recipe": cfg.recipe,
        "init": cfg.init,
        "steps": step,
        "tokens_seen": seen,
        "seq_len": cfg.seq_len,
        "tokens_per_step": cfg.tokens_per_step,
        "lr": cfg.lr,
        "precision": cfg.precision,
        "seed": cfg.seed,
        "world_size": ctx.world_size,
        "final_train_kl": history["kl"][-1] if history["kl"] else None,
    }


def _result(model: Any, lens: TunedLens, cfg: TrainConfig, history: dict) -> TrainResult:
    n = len(history["kl"])
    secs = torch.tensor(history["seconds"], dtype=torch.float64)
    tps = (
        (n * cfg.tokens_per_step / float(secs.sum()))
        if n and float(secs.sum()) > 0
        else float("nan")
    )
    return TrainResult(
        lens=lens,
        tokens_seen=torch.tensor(history["tokens_seen"], dtype=torch.long),
        kl=torch.tensor(history["kl"], dtype=torch.float64).reshape(n, lens.n_layers),
        lr=torch.tensor(history["lr"], dtype=torch.float64),
        grad_norm=torch.tensor(history["grad_norm"], dtype=torch.float64),
        seconds=secs,
        init_seconds=float(history.get("init_seconds", 0.0)),
        tokens_per_second=tps,
        config=cfg,
        provenance=Provenance.from_model(model, lens=lens, **_train_settings(cfg)),
    )
