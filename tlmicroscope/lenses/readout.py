"""The shared readout: final norm recomputed from h, then the unembedding.

``ln_final.hook_normalized`` fires before the norm's weight is applied and the model's own
``hook_scale`` belongs to the last layer's residual, so the readout takes the norm's parameters
and recomputes its statistics from each h it is given (the TransformerLens #1076 trap). The norm
weight (and bias) are folded into the unembedding once, so a readout is one normalisation and
one matrix product.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float

from tlmicroscope.models import _compat

__all__ = ["Readout", "ReadoutIdentityError", "check_readout_identity"]


class ReadoutIdentityError(ValueError):
    """The readout of the last residual does not reproduce the model's logits."""


class Readout:
    """``readout(h) = W_U · final_norm(h) + b_U`` as plain tensors, differentiable in ``h``.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> logits, cache = model.run_with_cache(model.to_tokens("hello"))
        >>> readout = Readout(model)
        >>> torch.allclose(readout(cache["blocks.1.hook_resid_post"]), logits, atol=1e-4)
        True
    """

    def __init__(self, model: Any):
        norm = _compat.final_norm(model)
        W_U, b_U = _compat.unembed_weights(model)
        W_U = W_U.detach()
        self.kind = norm.kind
        self.eps = norm.eps
        self.d_model, self.d_vocab = W_U.shape
        self.W_raw = W_U
        self.b_raw = None if b_U is None else b_U.detach()
        W, b = W_U, self.b_raw
        if norm.weight is not None:
            W = norm.weight.detach()[:, None] * W_U
        if norm.bias is not None:
            nb = norm.bias.detach() @ W_U
            b = nb if b is None else b + nb
        self.W = W.contiguous()
        self.b = b

    def normalize(self, h: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """The final norm without its affine part (that is folded into ``W``)."""
        if self.kind is None:
            return h
        if self.kind == "LN":
            h = h - h.mean(-1, keepdim=True)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def __call__(
        self, h: Float[torch.Tensor, "... d_model"], *, final_norm: bool = True
    ) -> Float[torch.Tensor, "... d_vocab"]:
        if h.shape[-1] != self.d_model:
            raise ValueError(f"Expected vectors of width d_model={self.d_model}, got {h.shape[-1]}.")
        if final_norm:
            out = self.normalize(h) @ self.W
            return out if self.b is None else out + self.b
        out = h @ self.W_raw
        return out if self.b_raw is None else out + self.b_raw


def check_readout_identity(
    readout: Readout,
    h_final: Float[torch.Tensor, "n d_model"],
    logits: Float[torch.Tensor, "n d_vocab"],
    *,
    atol: float = 2e-3,
) -> float:
    """Check that the readout of the last ``resid_post`` gives the model's log-probabilities.

    Log-probabilities are compared, so a constant per-row shift of the logits (``center_unembed``)
    does not count as a mismatch.

    Returns:
        The largest absolute log-probability difference.

    Raises:
        ReadoutIdentityError: the difference exceeds ``atol``; the model computes something after
            the final norm that a lens cannot see (a soft cap, an extra head), or its norm differs.
    """
    with torch.no_grad():
        ours = torch.log_softmax(readout(h_final).float(), -1)
        theirs = torch.log_softmax(logits.float(), -1)
        diff = float((ours - theirs).abs().max())
    if not diff <= atol:
        raise ReadoutIdentityError(
            f"The lens readout of the last block's hook_resid_post differs from the model's own "
            f"log-probabilities by up to {diff:.3g} (tolerance {atol}). The model's output is not "
            "final_norm -> unembed of its last residual (an output soft-cap, an extra head, or a norm "
            "tlmicroscope cannot rebuild), so lens readouts would be wrong for it."
        )
    return diff
