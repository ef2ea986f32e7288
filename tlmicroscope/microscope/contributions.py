"""Layer contributions to the next-token prediction, and the direct logit attribution of components.

``layer_contributions`` is LLM-Microscope's §3.3 heatmap:
``E_i^l = −log softmax(readout(h_i^l))[w_{i+1}]``, the next-token loss each layer would have if the
model stopped there, read through the logit lens (the paper's choice) or any ``Lens`` (a tuned
lens, for instance). It is computed by the foundation's ``prediction_trajectory``, so the
readout, its identity check and its memory bounds are shared. The per-block drop
``E^l − E^{l+1}`` is added as an extension (the paper shows only E).

``component_attribution`` splits the final prediction into what each block's attention and MLP
wrote, using TransformerLens's residual decomposition (``ActivationCache.decompose_resid``): the
final residual is the sum of the embeddings and every ``attn_out``/``mlp_out``, so with the final
norm's scale frozen at its value for the whole residual, each piece's logit is exact and the pieces
plus the unembedding bias add up to the model's logit (checked at run time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int

from tlmicroscope.inputs import TextOrTokens, resolve_input
from tlmicroscope.layers import as_str_tokens
from tlmicroscope.lenses import PredictionTrajectory, Readout, prediction_trajectory
from tlmicroscope.microscope._forward import str_tokens_of
from tlmicroscope.results import Provenance
from tlmicroscope.vocab import token_strings

__all__ = [
    "ComponentAttribution",
    "LayerContributions",
    "component_attribution",
    "layer_contributions",
]


@dataclass(frozen=True)
class LayerContributions:
    """Per-layer next-token loss through a lens.

    Attributes:
        layers, layer_labels: Residual indices 0..n_layers (``"h{n_layers}"`` is what the model
            itself reads out).
        loss: ``−log q_l(w_{i+1})`` in nats ``[layer batch pos]``; NaN at the last position.
        delta: ``loss[l] − loss[l+1]`` ``[layer−1 batch pos]``: how much block l lowered the loss
            (an extension of the paper's figure).
        trajectory: The underlying ``PredictionTrajectory`` (top tokens, ranks, entropies, KL).
    """

    layers: tuple[int, ...]
    layer_labels: tuple[str, ...]
    loss: Float[torch.Tensor, "layer batch pos"]
    delta: Float[torch.Tensor, "layer_minus_1 batch pos"]
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    trajectory: PredictionTrajectory
    provenance: Provenance

    @classmethod
    def from_trajectory(cls, traj: PredictionTrajectory) -> LayerContributions:
        """The contributions read off a ``PredictionTrajectory`` already computed (no forward)."""
        loss = traj.cross_entropy
        prov = traj.provenance.with_settings(quantity="next-token cross-entropy per layer")
        return cls(
            layers=traj.layers,
            layer_labels=traj.layer_labels,
            loss=loss,
            delta=loss[:-1] - loss[1:],
            tokens=traj.tokens,
            str_tokens=as_str_tokens(traj.str_tokens),
            trajectory=traj,
            provenance=prov,
        )

    def mean_loss(self) -> Float[torch.Tensor, " layer"]:
        """Mean next-token loss per layer over positions that have a next token."""
        return torch.nanmean(self.loss.flatten(1), dim=1)


def layer_contributions(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    lens: Any = None,
    top_k: int = 5,
    prepend_bos: bool | None = None,
    truncate: bool = False,
) -> LayerContributions:
    """The layer × token next-token loss through the logit lens (default) or any ``Lens``.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` with the residual hooks and its tokens.
        tokens: Text or token ids.
        lens: ``None``/``"logit"`` (final norm recomputed per layer), ``"logit-paper"`` (no final
            norm, as LLM-Microscope's code), or any ``Lens`` such as a ``TunedLens``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> lc = layer_contributions(tiny_model(n_layers=2), "hello")
        >>> lc.layer_labels, tuple(lc.loss.shape), tuple(lc.delta.shape)
        (('h0', 'h1', 'h2'), (3, 1, 5), (2, 1, 5))
    """
    traj = prediction_trajectory(
        model_or_cache, tokens, lens=lens, top_k=top_k, prepend_bos=prepend_bos, truncate=truncate
    )
    return LayerContributions.from_trajectory(traj)


@dataclass(frozen=True)
class ComponentAttribution:
    """Direct logit attribution of the embeddings and of each block's attention and MLP output.

    Attributes:
        labels: ``"embed"``, (``"pos_embed"``), ``"0_attn_out"``, ``"0_mlp_out"``, ...
            (TransformerLens's).
        attribution: Each component's contribution to the target's logit ``[component batch pos]``.
        bias: The unembedding (and final-norm) bias's share ``[batch pos]``.
        logit: The target's logit from the model ``[batch pos]``; ``attribution.sum(0) + bias``
            equals it.
        target_tokens: The token each position's attribution is for; -1 where there is none.
        target_strings: Their text.
        target: ``"predicted"``, ``"next"`` or ``"given"``.
        centered: Whether logits are measured relative to the mean logit over the vocabulary.
        max_identity_error: ``max |Σ attribution + bias − logit|`` (checked at run time).
    """

    labels: tuple[str, ...]
    attribution: Float[torch.Tensor, "component batch pos"]
    bias: Float[torch.Tensor, "batch pos"]
    logit: Float[torch.Tensor, "batch pos"]
    target_tokens: Int[torch.Tensor, "batch pos"]
    target_strings: np.ndarray
    tokens: Int[torch.Tensor, "batch pos"]
    str_tokens: tuple[tuple[str, ...], ...]
    target: str
    centered: bool
    max_identity_error: float
    provenance: Provenance

    def block_totals(self) -> Float[torch.Tensor, "layer batch pos"]:
        """Attention + MLP of each block (embeddings left out)."""
        blocks = [i for i, lab in enumerate(self.labels) if lab.split("_")[0].isdigit()]
        return self.attribution[blocks].reshape(-1, 2, *self.attribution.shape[1:]).sum(1)


def _needed_hooks(model: Any) -> list[str]:
    n = int(model.cfg.n_layers)
    names = ["hook_embed", f"blocks.{n - 1}.hook_resid_post"]
    if getattr(model.cfg, "positional_embedding_type", "standard") == "standard":
        names.append("hook_pos_embed")
    for layer in range(n):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    return names


def component_attribution(
    model_or_cache: Any,
    tokens: TextOrTokens | None = None,
    *,
    target: str | Any = "predicted",
    center: bool = True,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    atol: float = 1e-3,
) -> ComponentAttribution:
    """Direct logit attribution of every block's attention and MLP output, at every position.

    Args:
        model_or_cache: A model, or an ``ActivationCache`` holding ``hook_embed``
            (``hook_pos_embed`` for learned positions), every ``hook_attn_out`` and
            ``hook_mlp_out``, and the last ``hook_resid_post``, with its tokens.
        target: ``"predicted"`` (the model's top-1 token at each position), ``"next"`` (the true
            next token; none at the last position) or token ids ``[batch pos]``.
        center: Measure each logit relative to the mean logit over the vocabulary (softmax ignores
            a constant, so this removes a shared offset that is not about the target).
        atol: Tolerance of the run-time check that the pieces add up to the model's logit.

    Raises:
        ValueError: a cache missing a hook, targets of the wrong shape, or pieces that do not sum
            to the logit (the model computes something the decomposition cannot see).

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> attr = component_attribution(tiny_model(n_layers=2), "hello")
        >>> attr.labels
        ('embed', '0_attn_out', '0_mlp_out', '1_attn_out', '1_mlp_out')
        >>> bool(torch.allclose(attr.attribution.sum(0) + attr.bias, attr.logit, atol=1e-4))
        True
    """
    resolved = resolve_input(model_or_cache, tokens, prepend_bos=prepend_bos, truncate=truncate)
    model, toks = resolved.model, resolved.tokens
    cache = _attribution_cache(model, resolved.cache, toks)
    with torch.inference_mode():
        stack, labels = cache.decompose_resid(
            layer=-1, mode="all", apply_ln=False, incl_embeds=True, return_labels=True
        )
        # Half-precision activations round each piece: widen the check by the dtype's precision.
        act_dtype = stack.dtype
        if act_dtype in (torch.float16, torch.bfloat16):
            atol = max(atol, 4.0 * torch.finfo(act_dtype).eps)
        h_final = cache[f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post"].float()
        if tuple(stack.shape[1:]) != tuple(h_final.shape):
            raise ValueError(
                f"Cache activations {tuple(h_final.shape)} do not match the tokens "
                f"{tuple(toks.shape)}."
            )
        kind, tgt, attribution, bias, logit = _direct_attribution(
            Readout.for_model(model), stack.float(), h_final, toks, target, center
        )
        err = (
            float((attribution.sum(0) + bias - logit)[tgt >= 0].abs().max())
            if (tgt >= 0).any()
            else 0.0
        )
    if not err <= atol * max(1.0, float(logit.abs().max())):
        raise ValueError(
            f"The attributed pieces miss the model's logit by up to {err:.3g}: the final residual "
            "is not the sum of the embeddings and every attn_out/mlp_out for this model (parallel "
            "blocks or an extra residual term), so direct logit attribution does not apply as is."
        )
    invalid = tgt < 0
    attribution = attribution.masked_fill(invalid, float("nan"))
    prov = Provenance.from_model(
        model, target=kind, center=center, final_norm="frozen scale of the final residual"
    )
    str_tokens = str_tokens_of(model, toks)
    return ComponentAttribution(
        labels=tuple(labels),
        attribution=attribution.cpu(),
        bias=bias.masked_fill(invalid, float("nan")).cpu(),
        logit=logit.masked_fill(invalid, float("nan")).cpu(),
        target_tokens=tgt.cpu(),
        target_strings=token_strings(model, tgt.clamp_min(0).cpu()),
        tokens=toks.cpu(),
        str_tokens=as_str_tokens(str_tokens),
        target=kind,
        centered=center,
        max_identity_error=err,
        provenance=prov,
    )


def _attribution_cache(model: Any, cache: Any, toks: torch.Tensor) -> Any:
    """The cache of the pieces: ``cache`` checked for every hook, or a run of ``toks``."""
    names = _needed_hooks(model)
    if cache is None:
        with torch.inference_mode():
            _, cache = model.run_with_cache(toks, names_filter=names)
        return cache
    lacking = [n for n in names if n not in cache]
    if lacking:
        raise ValueError(
            f"The ActivationCache lacks {lacking[:3]} (and {max(0, len(lacking) - 3)} more); "
            f"run model.run_with_cache(tokens, names_filter={names[:3]}...) with all of them, "
            "or pass the model."
        )
    return cache


def _direct_attribution(
    readout: Readout,
    stack: torch.Tensor,
    h_final: torch.Tensor,
    toks: torch.Tensor,
    target: Any,
    center: bool,
) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(kind, targets, attribution [piece batch pos], bias, logit)`` of the target logits.

    The attribution is linear, so it explains the logits before any soft cap (a logit scale is
    folded into W); the cap is monotone, so the ranking of targets is the same. Only the target's
    column of W and W's mean over the vocabulary are needed: the full ``[batch pos d_vocab]``
    logits are computed (in row chunks) only for ``target="predicted"``.
    """
    final_norm = readout.kind is not None
    W, b = readout.weights(final_norm)
    x = readout.normalize(h_final) if final_norm else h_final
    kind, tgt = _targets(
        target, toks, lambda: _argmax_logits(readout, x, final_norm), int(W.shape[1])
    )
    batch, n_pos = toks.shape
    safe = tgt.clamp_min(0)
    # Frozen final norm: the statistics of the whole residual applied to every (linear) piece.
    if readout.kind == "LN":
        stack = stack - stack.mean(-1, keepdim=True)
        h_c = h_final - h_final.mean(-1, keepdim=True)
    else:
        h_c = h_final
    scale = (
        torch.rsqrt(h_c.pow(2).mean(-1, keepdim=True) + readout.eps)
        if readout.kind
        else torch.ones_like(h_c[..., :1])
    )
    w_t = W[:, safe.reshape(-1)].T.reshape(batch, n_pos, -1).float()  # [batch pos d_model]
    b_t = b[safe].float() if b is not None else torch.zeros(batch, n_pos, device=x.device)
    if center:
        w_mean = W.float().mean(1) if W.dtype != torch.float32 else W.mean(1)
        b_mean = b.float().mean() if b is not None else 0.0
        w_t = w_t - w_mean
        b_t = b_t - b_mean
    attribution = ((stack * scale) * w_t).sum(-1)
    logit = (x.float() * w_t).sum(-1) + b_t
    return kind, tgt, attribution, b_t, logit


def _argmax_logits(
    readout: Readout, x: torch.Tensor, final_norm: bool, rows: int = 256
) -> torch.Tensor:
    """The top-1 token of the readout of already-normalised rows ``x``, a few rows at a time."""
    W, b = readout.weights(final_norm)
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=x.device)
    for i in range(0, flat.shape[0], rows):
        z = flat[i : i + rows].to(W.dtype) @ W
        out[i : i + rows] = (z if b is None else z + b.to(z.dtype)).argmax(-1)
    return out.reshape(x.shape[:-1])


def _targets(
    target: Any, toks: torch.Tensor, predicted: Callable[[], torch.Tensor], d_vocab: int
) -> tuple[str, torch.Tensor]:
    if isinstance(target, str):
        if target == "predicted":
            return "predicted", predicted()
        if target == "next":
            tgt = torch.full_like(toks, -1)
            tgt[:, :-1] = toks[:, 1:]
            return "next", tgt
        raise ValueError(f"target must be 'predicted', 'next' or token ids, got {target!r}.")
    tgt = torch.as_tensor(target, dtype=torch.long, device=toks.device)
    if tgt.ndim == 0:
        tgt = tgt.expand_as(toks).clone()
    if tgt.ndim == 1 and toks.shape[0] == 1:
        tgt = tgt.unsqueeze(0)
    if tuple(tgt.shape) != tuple(toks.shape):
        raise ValueError(
            f"target ids must have the tokens' shape {tuple(toks.shape)}, got {tuple(tgt.shape)}."
        )
    if (tgt >= d_vocab).any():
        raise ValueError(f"target ids must be below d_vocab={d_vocab}.")
    return "given", tgt
