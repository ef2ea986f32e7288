"""The shared readout: final norm recomputed from h, the unembedding, then the model's output
transform.

``ln_final.hook_normalized`` fires before the norm's weight is applied and the model's own
``hook_scale`` belongs to the last layer's residual, so the readout takes the norm's parameters
and recomputes its statistics from each h it is given (the TransformerLens #1076 trap). The norm
weight (and bias) are folded into the unembedding once, so a readout is one normalisation and
one matrix product, followed by what the model does after its unembedding:

* a logit scale (Cohere multiplies by ``logit_scale``, Granite divides by ``logits_scaling``),
  folded into the same matrix and bias;
* a final-logit soft cap (Gemma 2: ``cap * tanh(z / cap)``), applied elementwise by ``finish``.

Everything after the matrix product is float32, whatever the model's dtype, so a bfloat16 or
float16 model gets its lens statistics without overflow. ``Readout.for_model(model)`` keeps one
readout per model and rebuilds it only when the weights it was folded from change.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from jaxtyping import Float

from tlmicroscope.models import access

__all__ = ["Readout", "ReadoutIdentityError", "check_readout_identity", "identity_tolerance"]


class ReadoutIdentityError(ValueError):
    """The readout of the last residual does not reproduce the model's logits."""


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tensor_key(t: torch.Tensor | None) -> tuple:
    if t is None:
        return (None,)
    try:
        version = t._version
    except RuntimeError:  # an inference tensor keeps no version counter
        version = -1
    return (t.data_ptr(), version, tuple(t.shape), t.dtype, str(t.device))


class Readout:
    """``readout(h) = transform(W_U · final_norm(h) + b_U)`` as plain tensors, differentiable in
    ``h``.

    Attributes:
        W, b: The unembedding with the final norm's weight and bias and the logit scale folded in
            (``[d_model d_vocab]``, ``[d_vocab]`` or ``None``).
        W_raw, b_raw: The unembedding with only the logit scale folded in, for lenses that skip
            the final norm (LLM-Microscope's paper mode).
        softcap: The final-logit soft cap, or ``None``; ``finish`` applies it.
        transform: The model's whole output transform (``access.OutputTransform``).
        family: The model's architecture name, for messages.
        dtype: The matrices' dtype: the model's on a GPU, float32 on the CPU (where half-precision
            products are slow). Logits come out in float32 either way.

    Examples:
        >>> from tlmicroscope.models import tiny_model
        >>> model = tiny_model(n_layers=2)
        >>> logits, cache = model.run_with_cache(model.to_tokens("hello"))
        >>> readout = Readout.for_model(model)
        >>> torch.allclose(readout(cache["blocks.1.hook_resid_post"]), logits, atol=1e-4)
        True
        >>> Readout.for_model(model) is readout  # cached until the weights change
        True
    """

    def __init__(self, model: Any):
        # Built outside inference mode, so a readout first made under torch.inference_mode()
        # still serves autograd later (lens training, CBE).
        with torch.inference_mode(False), torch.no_grad():
            self._build(model)

    def _build(self, model: Any) -> None:
        norm = access.final_norm(model)
        W_U, b_U = access.unembed_weights(model)
        transform = access.output_transform(model)
        self.transform = transform
        self.family = access.model_family(model)
        self.kind = norm.kind
        self.eps = norm.eps
        self.softcap = transform.softcap
        self.scale = transform.scale
        self.model_dtype = W_U.dtype
        self.dtype = W_U.dtype if (W_U.is_cuda or W_U.dtype == torch.float64) else torch.float32
        self.d_model, self.d_vocab = W_U.shape
        self._W_U = W_U.detach()
        self._W_raw: torch.Tensor | None = None
        # One [d_model d_vocab] buffer, filled (cast and transposed) in one pass and folded in
        # place: a 262k-token vocabulary makes every extra copy hundreds of megabytes.
        work = torch.float64 if self.dtype == torch.float64 else torch.float32
        W = torch.empty((self.d_model, self.d_vocab), dtype=work, device=W_U.device)
        W.copy_(self._W_U)
        b = b_raw = None if b_U is None else b_U.detach().to(work)
        if norm.bias is not None:
            nb = norm.bias.detach().to(work) @ W  # the norm's bias meets W_U before the gain
            b = nb if b is None else b + nb
        if norm.weight is not None:
            W.mul_(norm.weight.detach().to(work)[:, None])
        if self.scale != 1.0:
            W.mul_(self.scale)
            b = None if b is None else b * self.scale
            b_raw = None if b_raw is None else b_raw * self.scale
        self.W = W if W.dtype == self.dtype else W.to(self.dtype)
        self.b = b
        self.b_raw = b_raw

    @property
    def W_raw(self) -> torch.Tensor:
        """The unembedding times the logit scale, in ``dtype`` (made on first use)."""
        if self._W_raw is None:
            with torch.inference_mode(False), torch.no_grad():
                W = self._W_U.float() * self.scale if self.scale != 1.0 else self._W_U
                self._W_raw = W.to(self.dtype)
        return self._W_raw

    @classmethod
    def for_model(cls, model: Any) -> Readout:
        """The model's readout, built once and reused until the weights it folds change.

        The cache is keyed weakly on the model and checks the final norm's, the unembedding's
        parameters (their storage and in-place version counters) and the output transform on
        every call, so ``model.to(...)``, loading new weights or editing them in place all
        rebuild it.

        Examples:
            >>> from tlmicroscope.models import tiny_model
            >>> model = tiny_model(n_layers=1)
            >>> r = Readout.for_model(model)
            >>> with torch.no_grad():
            ...     _ = model.W_U.mul_(2)
            >>> Readout.for_model(model) is r
            False
        """
        key = cls._key(model)
        try:
            hit = _CACHE.get(model)
        except TypeError:  # a model that cannot be weakly referenced
            return cls(model)
        if hit is not None and hit[0] == key:
            return hit[1]
        readout = cls(model)
        _CACHE[model] = (key, readout)
        return readout

    @staticmethod
    def _key(model: Any) -> tuple:
        W_U, b_U = access.unembed_weights(model)
        ln_final = getattr(model, "ln_final", None)
        params = list(ln_final.parameters()) if isinstance(ln_final, torch.nn.Module) else []
        return (
            _tensor_key(W_U),
            _tensor_key(b_U),
            tuple(_tensor_key(p) for p in params),
            access.output_transform(model),
            str(getattr(model.cfg, "normalization_type", None)),
        )

    # ----------------------------------------------------------------------------- pieces
    def normalize(
        self, h: Float[torch.Tensor, "... d_model"]
    ) -> Float[torch.Tensor, "... d_model"]:
        """The final norm without its affine part (that is folded into ``W``).

        Statistics are computed in float32 at least; the result keeps float32/float64 input and
        is float32 for half-precision input.
        """
        if h.dtype not in (torch.float32, torch.float64):
            h = h.float()
        if self.kind is None:
            return h
        if self.kind == "LN":
            h = h - h.mean(-1, keepdim=True)
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)

    def weights(self, final_norm: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` such that ``finish(x @ W + b)`` are the logits, ``x`` the normalised h
        (``final_norm=True``) or h itself."""
        return (self.W, self.b) if final_norm else (self.W_raw, self.b_raw)

    def finish(self, z: Float[torch.Tensor, "... d_vocab"]) -> Float[torch.Tensor, "... d_vocab"]:
        """The output transform's non-linear part (the soft cap) on float32 pre-cap logits ``z``.

        Modifies ``z`` in place when it needs no gradient; otherwise returns a new tensor.
        """
        if self.softcap is None:
            return z
        if z.requires_grad:
            return self.softcap * torch.tanh(z / self.softcap)
        return z.div_(self.softcap).tanh_().mul_(self.softcap)

    def finish_derivative(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``d logits / d z`` from the finished logits (``1 - (logits/cap)^2``), ``None`` without a
        cap.
        """
        if self.softcap is None:
            return None
        return 1.0 - (logits / self.softcap).pow(2)

    def linear(
        self, h: Float[torch.Tensor, "... d_model"], *, final_norm: bool = True
    ) -> Float[torch.Tensor, "... d_vocab"]:
        """The logits before the soft cap (scale included), float32."""
        if h.shape[-1] != self.d_model:
            raise ValueError(
                f"Expected vectors of width d_model={self.d_model}, got {h.shape[-1]}."
            )
        W, b = self.weights(final_norm)
        x = self.normalize(h) if final_norm else h
        out = x.to(W.dtype) @ W
        if out.dtype != torch.float32 and out.dtype != torch.float64:
            out = out.float()
        return out if b is None else out + b.to(out.dtype)

    def __call__(
        self, h: Float[torch.Tensor, "... d_model"], *, final_norm: bool = True
    ) -> Float[torch.Tensor, "... d_vocab"]:
        return self.finish(self.linear(h, final_norm=final_norm))

    def describe(self) -> str:
        norm = {"RMS": "RMSNorm", "LN": "LayerNorm", None: "no final norm"}[self.kind]
        return f"{self.family}: {norm} -> W_U -> output transform: {self.transform.describe()}"


def identity_tolerance(dtype: torch.dtype, logit_scale: float = 0.0) -> float:
    """Log-probability tolerance of the readout identity for logits computed in ``dtype``.

    ``2e-3`` plus eight units of ``dtype``'s rounding times the largest logit magnitude: a
    float32 model is held to about ``2e-3``, a bfloat16 one with logits around 30 to about 2 nats
    (each of the two logit roundings and the ``W`` rounding shift a log-probability by a few
    units of 2^-8 of the logit). Dropping a soft cap, a logit scale or Gemma's ``1 + w`` moves
    log-probabilities by far more than that.

    Examples:
        >>> identity_tolerance(torch.float32, 30.0)
        0.002
        >>> round(identity_tolerance(torch.bfloat16, 30.0), 3)
        1.877
    """
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    if dtype in (torch.float32, torch.float64):
        eps = 0.0
    return 2e-3 + 8.0 * eps * max(1.0, float(logit_scale))


def check_readout_identity(
    readout: Readout,
    h_final: Float[torch.Tensor, "n d_model"],
    logits: Float[torch.Tensor, "n d_vocab"],
    *,
    atol: float | None = None,
) -> float:
    """Check that the readout of the last ``resid_post`` gives the model's log-probabilities.

    Log-probabilities are compared, so a constant per-row shift of the logits (``center_unembed``)
    does not count as a mismatch.

    Args:
        readout: The model's readout.
        h_final: ``blocks.{L-1}.hook_resid_post`` rows.
        logits: The model's logits for the same rows.
        atol: Tolerance on log-probabilities; default ``identity_tolerance`` of the coarser of
            the logits' and the model's dtype.

    Returns:
        The largest absolute log-probability difference.

    Raises:
        ReadoutIdentityError: the difference exceeds the tolerance. The message names the
            model's family, the readout it rebuilt and where the two disagree most.
    """
    with torch.no_grad():
        z = readout(h_final)
        ours = torch.log_softmax(z.float(), -1)
        theirs = torch.log_softmax(logits.float(), -1)
        gap = (ours - theirs).abs()
        diff = float(gap.max()) if gap.numel() else 0.0
        if atol is None:
            coarse = max(
                (logits.dtype, readout.model_dtype),
                key=lambda d: torch.finfo(d).eps if d.is_floating_point else 0.0,
            )
            atol = identity_tolerance(
                coarse, float(logits.float().abs().max()) if logits.numel() else 0.0
            )
    if not diff <= atol:
        flat = int(gap.reshape(-1, gap.shape[-1]).max(-1).values.argmax()) if gap.numel() else 0
        row_ours = z.detach().float().reshape(-1, z.shape[-1])[flat]
        row_theirs = logits.detach().float().reshape(-1, logits.shape[-1])[flat]
        raise ReadoutIdentityError(
            f"For this {readout.family} model, the lens readout of the last block's "
            "hook_resid_post "
            f"differs from the model's own log-probabilities by up to {diff:.3g} (tolerance "
            f"{atol:.3g}). "
            f"tlmicroscope rebuilt {readout.describe()}; on the worst row its logits span "
            f"[{float(row_ours.min()):.3g}, {float(row_ours.max()):.3g}] and the model's "
            f"[{float(row_theirs.min()):.3g}, {float(row_theirs.max()):.3g}]. The model computes "
            "something after the final norm that this readout lacks (an output transform, an extra "
            "head, or a norm tlmicroscope cannot rebuild), so lens readouts would be wrong for it."
        )
    return diff
