"""The CBE objective: expected KL between a lens's clean and direction-ablated predictions.

For a unit direction v, ablation changes every row h of the hidden states by a multiple of v:
``h' = h + c v`` with ``c = (t - h)·v`` and t the ablation target (0, the mean μ, or a donor row).
An affine lens maps ``h`` to ``x = h M + b₀`` (``M = Aᵀ``), so ``x' = x + c w`` with ``w = v M``;
after centring (LayerNorm only) the logits are

    z' = r' (Zc + c u) + b,   Zc = x̃ W,  u = w̃ W,  r' = 1/sqrt(mean((x̃ + c w̃)²) + eps).

``Zc`` (``[N V]``) and the clean probabilities P are computed once, so each evaluation of the
energy ``E(v) = mean_i KL(P_i || softmax(z'_i))`` costs a few elementwise passes over ``[N V]``
instead of the ``[N d] @ [d V]`` product, and its backward pass, that the reference implementation
pays for at every L-BFGS evaluation (a factor of about d fewer multiply-adds). The ``[N V]``
part and its gradient with respect to (u, c, r) are written by hand in ``_AblatedKL``; the cheap
``v -> (u, c, r)`` part is left to autograd. Lenses that are not affine fall back to autograd
through ``lens.transform`` and the readout.
"""

from __future__ import annotations

from typing import Any

import torch

from tlmicroscope.lenses.base import lens_logits
from tlmicroscope.lenses.readout import Readout

__all__ = ["LensAblationObjective", "affine_map"]

# The two [rows d_vocab] work buffers share this budget. Large blocks are faster on the CPU (each
# elementwise pass is one big parallel kernel); 256 MiB is about 650 rows of a 49k vocabulary.
_BUFFER_BYTES = 256 * 2**20


def affine_map(
    lens: Any, layer: int, d_model: int, probe: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(M, b0)`` with ``lens.transform(h, layer) == h @ M + b0``, or ``None`` if it is not affine.

    ``M`` is read off the basis vectors, ``M = transform(I) - transform(0)``, and checked on
    ``probe`` rows.
    """
    with torch.no_grad():
        eye = torch.eye(d_model, dtype=probe.dtype, device=probe.device)
        zero = torch.zeros(1, d_model, dtype=probe.dtype, device=probe.device)
        b0 = lens.transform(zero, layer)[0]
        M = lens.transform(eye, layer) - b0
        expect = lens.transform(probe, layer)
        got = probe @ M + b0
        scale = float(expect.abs().max()) + 1e-6
        if not torch.allclose(got, expect, atol=1e-4 * scale, rtol=1e-4):
            return None
    return M, b0


class _AblatedKL(torch.autograd.Function):
    """mean_i KL(P_i || softmax(z_i)), z_i = r_i (Zc_i + c_i u) + b, u = w̃ W; gradient in (w̃, c,
    r).

    The gradient is accumulated during the forward pass (every L-BFGS evaluation wants both), a
    block of rows at a time in two preallocated buffers. With t = z - max(z),
    e = exp(t), s = sum(e) and q = e / s, only one exponential per logit is needed:

    * KL_i = sum(P log P) - P·z + max + log s, where P·z = r (P·Zc + c P·u) + P·b is cheap;
    * dKL/du = sum_i r_i c_i (q_i - P_i); its P-part reaches w̃ as -(P Wᵀ)ᵀ (r c), precomputed;
    * dKL/dc_i = r_i (q_i - P_i)·u;
    * dKL/dr_i = (q_i - P_i)·(Zc_i + c_i u) = ((q_i - P_i)·z_i - (q_i - P_i)·b) / r_i, with
      q·z = (e·t) / s + max.

    With a final-logit soft cap (Gemma 2) the logits are ``cap tanh(y / cap)`` of the pre-cap
    ``y = r (Zc + c u) + b``; the P-terms are no longer linear in u, so ``_capped_block`` makes
    one more pass per block with ``G = (q - P)(1 - (z / cap)^2)`` in place of ``q - P``.
    """

    @staticmethod
    def forward(ctx, wc, c, r, obj: LensAblationObjective):  # type: ignore[override]
        n = obj.n
        u = wc @ obj.W
        # The P-terms need no [N V] pass: P u = (P Wᵀ) w̃, and Wᵀ's share of dKL/dw̃ is -(P Wᵀ)ᵀ (r
        # c).
        Pu = obj.PW @ wc
        pz = r * (obj.pz + c * Pu) + obj.pb  # P·z for every row
        rc = r * c
        g_u = torch.zeros_like(u)  # the q-part of dKL/du; the P-part is added in d dimensions below
        g_c = torch.empty_like(c)
        g_r = torch.empty_like(r)
        total = torch.zeros((), dtype=torch.float64, device=u.device)
        for lo in range(0, n, obj.chunk):
            hi = min(lo + obj.chunk, n)
            t, e = obj.buffers(hi - lo)
            if obj.softcap is not None:
                total += _capped_block(obj, lo, hi, t, e, u, c, r, rc, g_u, g_c, g_r)
                continue
            torch.mul(obj.Zc[lo:hi], r[lo:hi, None], out=t)
            t.addr_(rc[lo:hi], u)
            if obj.b is not None:
                t += obj.b
            m = t.amax(-1)
            t -= m[:, None]
            torch.exp(t, out=e)
            s = e.sum(-1)
            inv_s = 1.0 / s
            qu = (e @ u) * inv_s
            qb_minus_pb = 0.0 if obj.b is None else (e @ obj.b) * inv_s - obj.pb[lo:hi]
            g_u.addmv_(e.T, rc[lo:hi] * inv_s)
            et = t.mul_(e).sum(-1)  # rowwise e·t, reusing t's buffer
            lse = m + torch.log(s)
            total += (obj.neg_h[lo:hi] - pz[lo:hi] + lse).double().sum()
            g_c[lo:hi] = r[lo:hi] * (qu - Pu[lo:hi])
            g_r[lo:hi] = (et * inv_s + m - pz[lo:hi] - qb_minus_pb) / r[lo:hi]
        g_wc = obj.W @ g_u if obj.softcap is not None else obj.W @ g_u - obj.PW.T @ rc
        ctx.save_for_backward(g_wc / n, g_c / n, g_r / n)
        return (total / n).to(wc.dtype)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        g_wc, g_c, g_r = ctx.saved_tensors
        return grad_out * g_wc, grad_out * g_c, grad_out * g_r, None


def _capped_block(
    obj: LensAblationObjective,
    lo: int,
    hi: int,
    t: torch.Tensor,
    e: torch.Tensor,
    u: torch.Tensor,
    c: torch.Tensor,
    r: torch.Tensor,
    rc: torch.Tensor,
    g_u: torch.Tensor,
    g_c: torch.Tensor,
    g_r: torch.Tensor,
) -> torch.Tensor:
    """Rows lo:hi of the energy through a soft cap; accumulates the gradients, returns the KL
    sum.
    """
    cap = obj.softcap
    d = obj.cap_buffer(hi - lo)
    P = obj.P[lo:hi]
    torch.mul(obj.Zc[lo:hi], r[lo:hi, None], out=t)
    t.addr_(rc[lo:hi], u)
    if obj.b is not None:
        t += obj.b  # y, the pre-cap logits
    torch.div(t, cap, out=e).tanh_()
    torch.mul(e, e, out=d).neg_().add_(1.0)  # dz/dy = 1 - tanh^2
    e.mul_(cap)  # z
    pz = torch.linalg.vecdot(P, e)
    m = e.amax(-1)
    e.sub_(m[:, None]).exp_()
    s = e.sum(-1)
    e.div_(s[:, None]).sub_(P).mul_(d)  # G = (q - P) dz/dy = dKL/dy
    g_u.addmv_(e.T, rc[lo:hi])
    g_c[lo:hi] = r[lo:hi] * (e @ u)
    gy = torch.linalg.vecdot(e, t)
    if obj.b is not None:
        gy = gy - e @ obj.b
    g_r[lo:hi] = gy / r[lo:hi]
    return (obj.neg_h[lo:hi] - pz + m + torch.log(s)).double().sum()


class LensAblationObjective:
    """The energy of ablating a direction at one layer, through one lens, on fixed hidden states.

    Args:
        readout: The model's readout.
        lens: The lens whose predictions are compared.
        layer: Residual index the hidden states come from (the lens translator used).
        h: Hidden states ``[N d_model]`` (float32).
        mode: ``"mean"``, ``"zero"`` or ``"resample"``.
        mean: μ for mean ablation (default: the mean of ``h``).
        donors: Row indices of the donors for resample ablation (a derangement of ``range(N)``).
        chunk: Rows per ``[chunk V]`` work buffer (default: two buffers within 256 MiB).
    """

    def __init__(
        self,
        readout: Readout,
        lens: Any,
        layer: int,
        h: torch.Tensor,
        mode: str,
        *,
        mean: torch.Tensor | None = None,
        donors: torch.Tensor | None = None,
        chunk: int | None = None,
    ):
        h = h.detach().float()
        self.n, self.d = h.shape
        self.chunk = chunk or max(16, _BUFFER_BYTES // (2 * 4 * readout.W.shape[1]))
        self.lens, self.layer, self.readout = lens, layer, readout
        self.mode = mode
        self.mean = h.mean(0) if mean is None else mean.to(h)
        if mode == "zero":
            target = torch.zeros_like(h)
        elif mode == "mean":
            target = self.mean.expand_as(h)
        else:
            if donors is None:
                raise ValueError("Resample ablation needs the donor rows.")
            target = h[donors]
        self.delta = target - h  # c = delta @ v
        self.final_norm = bool(getattr(lens, "final_norm", True))
        self.norm_kind = readout.kind if self.final_norm else None
        self.eps = readout.eps
        self.softcap = readout.softcap
        W, b = readout.weights(self.final_norm)
        self.W = W.to(h.device, torch.float32)
        self.b = None if b is None else b.to(h.device, torch.float32)
        self.h = h
        affine = affine_map(lens, layer, self.d, h[: min(64, self.n)])
        self.affine = affine is not None
        if affine is not None:
            self.M, b0 = affine
            self._precompute(h @ self.M + b0)

    def buffers(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reusable ``[rows d_vocab]`` work buffers (allocating them per call costs page
        faults).
        """
        buf = getattr(self, "_buf", None)
        if buf is None or buf.shape[1] < rows:
            buf = self._buf = torch.empty(
                2,
                min(self.chunk, self.n),
                self.Zc.shape[1],
                dtype=self.Zc.dtype,
                device=self.Zc.device,
            )
        return buf[0, :rows], buf[1, :rows]

    def cap_buffer(self, rows: int) -> torch.Tensor:
        """A third ``[rows d_vocab]`` work buffer, for the soft cap's derivative."""
        buf = getattr(self, "_cap_buf", None)
        if buf is None or buf.shape[0] < rows:
            buf = self._cap_buf = torch.empty(
                min(self.chunk, self.n),
                self.Zc.shape[1],
                dtype=self.Zc.dtype,
                device=self.Zc.device,
            )
        return buf[:rows]

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(-1, keepdim=True) if self.norm_kind == "LN" else x

    @torch.no_grad()
    def _precompute(self, x: torch.Tensor) -> None:
        xc = self._center(x)
        self.xc = xc
        self.s0 = xc.pow(2).mean(-1)
        self.Zc = xc @ self.W
        dev = self.Zc.device
        r0 = torch.rsqrt(self.s0 + self.eps) if self.norm_kind else torch.ones(self.n, device=dev)
        self.P = torch.empty_like(self.Zc)
        self.neg_h = torch.empty(self.n, device=dev)
        for lo in range(0, self.n, self.chunk):
            hi = min(lo + self.chunk, self.n)
            z = self.Zc[lo:hi] * r0[lo:hi, None]
            if self.b is not None:
                z += self.b
            if self.softcap is not None:
                z = self.readout.finish(z)
            logp = torch.log_softmax(z, -1)
            self.P[lo:hi] = logp.exp()
            self.neg_h[lo:hi] = torch.linalg.vecdot(self.P[lo:hi], logp)
        self.pz = torch.linalg.vecdot(self.P, self.Zc)
        self.PW = self.P @ self.W.T  # [N d]: the clean distributions pulled back to the residual
        self.pb = self.P @ self.b if self.b is not None else torch.zeros(self.n, device=dev)

    def energy(self, v: torch.Tensor) -> torch.Tensor:
        """E(v) in nats, differentiable in ``v`` (a unit vector ``[d_model]``)."""
        c = self.delta @ v
        if not self.affine:
            return self._energy_autograd(v, c)
        w = v @ self.M
        wc = self._center(w)
        if self.norm_kind:
            var = self.s0 + 2 * c * (self.xc @ wc) / self.d + c * c * wc.pow(2).mean()
            r = torch.rsqrt(var + self.eps)
        else:
            r = torch.ones_like(c)
        return _AblatedKL.apply(wc, c, r, self)

    def _energy_autograd(self, v: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The generic path: the lens and the readout under autograd, ``[chunk V]`` at a time."""
        total = 0.0
        with torch.no_grad():
            if not hasattr(self, "_clean_logp"):
                self._clean_logp = torch.cat(
                    [
                        lens_logits(
                            self.lens,
                            self.readout,
                            self.h[lo : lo + self.chunk],
                            self.layer,
                            log_probs=True,
                        )
                        for lo in range(0, self.n, self.chunk)
                    ]
                )
        for lo in range(0, self.n, self.chunk):
            hi = min(lo + self.chunk, self.n)
            h2 = self.h[lo:hi] + c[lo:hi, None] * v
            logq = lens_logits(self.lens, self.readout, h2, self.layer, log_probs=True)
            logp = self._clean_logp[lo:hi]
            total = total + (logp.exp() * (logp - logq)).sum()
        return total / self.n
