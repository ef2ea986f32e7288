"""The pieces of contextualization by prefix decoding: the encoder (layer pooling + MLP), the prefix
examples, and the decoder pass that reads a soft embedding in place of its first input token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tlmicroscope.capture import capture

__all__ = [
    "PrefixEncoder",
    "copy_model",
    "decoder_blocks",
    "examined_states",
    "prefix_examples",
    "prefix_token_loss",
]


class PrefixEncoder(nn.Module):
    """``e_i = g(f([h_i^1..h_i^L]))``: a learned linear pooling over layers, then a 2-layer MLP.

    Each layer's vector is first divided by its RMS (the residual stream's norm grows by orders of
    magnitude with depth, and a few "massive" tokens would otherwise swamp the pooling weights).
    ``f`` is ``Σ_l w_l ĥ^l + b`` with one weight per layer; ``g`` is Linear → GELU → Linear. The
    output is scaled to the RMS of the decoder's token embeddings, so the soft embedding starts in
    the range the decoder expects for its input.
    """

    def __init__(self, n_states: int, d_model: int, hidden: int, emb_scale: float):
        super().__init__()
        self.pool = nn.Parameter(torch.full((n_states,), 1.0 / n_states))
        self.pool_bias = nn.Parameter(torch.zeros(d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
        self.register_buffer("emb_scale", torch.tensor(float(emb_scale)))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        """``[n layer d_model]`` residual states of n tokens -> ``[n d_model]`` soft embeddings."""
        normed = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
        pooled = torch.einsum("l,nld->nd", self.pool, normed) + self.pool_bias
        return self.mlp(pooled) * self.emb_scale


def copy_model(model: Any) -> Any:
    """A deep copy of a TransformerLens model, for a decoder that trains apart from it.

    ``TransformerBridge`` components keep activations of their last forward pass as plain tensor
    attributes (e.g. ``_captured_pre_ln_residual``); after a pass with gradients those are graph
    tensors, which ``copy.deepcopy`` refuses. They are handed over detached instead."""
    import copy

    owned = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Tensor) and id(value) not in owned and not value.is_leaf:
                memo[id(value)] = value.detach()
    return copy.deepcopy(model, memo)


def examined_states(model: Any, windows: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """Residual states ``[batch pos layer d_model]`` of the examined model (no gradient, a normal
    tensor that autograd may save)."""
    cap = capture(model, windows, sites=("resid",), layers=list(layers))
    return cap["resid"].permute(1, 2, 0, 3).clone()


def prefix_examples(
    windows: torch.Tensor,
    batch_idx: torch.Tensor,
    positions: torch.Tensor,
    prefix_length: int,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decoder inputs and targets for reconstructing the prefix of token ``positions`` of
    ``windows``.

    The prefix of token i is the ``m = min(i, P)`` tokens right before it, ``w_{i−m}..w_{i−1}``.
    The decoder reads ``[e_i, w_{i−m}, .., w_{i−2}]`` (slot 0 is overwritten by the soft embedding)
    and must predict ``w_{i−m}..w_{i−1}``, teacher-forced. Rows are right-padded to P; causal
    attention keeps the padding from touching real positions, and the mask drops it from the loss.

    Returns:
        ``(inputs [n P], targets [n P], mask [n P])``.
    """
    n, P = batch_idx.numel(), int(prefix_length)
    inputs = torch.full((n, P), pad_id, dtype=torch.long)
    targets = torch.zeros((n, P), dtype=torch.long)
    mask = torch.zeros((n, P), dtype=torch.bool)
    for k, (b, i) in enumerate(zip(batch_idx.tolist(), positions.tolist())):
        m = min(i, P)
        prefix = windows[b, i - m : i]
        targets[k, :m] = prefix
        inputs[k, 1:m] = prefix[:-1]
        mask[k, :m] = True
    return inputs, targets, mask


def prefix_token_loss(
    decoder: Any,
    inputs: torch.Tensor,
    soft: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of every prefix token ``[n P]`` (0 where masked), with ``soft`` in slot 0."""
    device = getattr(decoder.cfg, "device", None) or soft.device

    def put_soft(act: torch.Tensor, hook: Any) -> torch.Tensor:
        return torch.cat([soft[:, None].to(act.dtype), act[:, 1:]], dim=1)

    logits = decoder.run_with_hooks(inputs.to(device), fwd_hooks=[("hook_embed", put_soft)])
    ce = F.cross_entropy(
        logits.float().transpose(1, 2), targets.to(logits.device), reduction="none"
    )
    return ce * mask.to(ce.device)


def decoder_blocks(
    decoder: Any, mode: str, trainable_blocks: int
) -> list[tuple[str, nn.Parameter]]:
    """The decoder's parameters that train under ``mode`` (named as in ``named_parameters``)."""
    if mode == "frozen":
        return []
    named = list(decoder.named_parameters())
    if mode == "full":
        return named
    n = len(decoder.blocks)
    wanted = {
        id(p) for block in list(decoder.blocks)[n - trainable_blocks :] for p in block.parameters()
    }
    return [(name, p) for name, p in named if id(p) in wanted]
