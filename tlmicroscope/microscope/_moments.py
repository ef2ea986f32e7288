"""Float64 moments of residual states and the affine solves built on them (shared by the linearity
scores and the non-linearity reference), plus the reference's own SVD pseudo-inverse."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float

__all__ = [
    "DEFAULT_RTOL",
    "PairFit",
    "ResidualMoments",
    "fit_pair",
    "paper_fit",
    "paper_pair_score",
]

#: Eigenvalues of the centred Gram below ``DEFAULT_RTOL × λ_max`` count as zero: the rank is
#: reported without them and the solve ignores them (a truncated pseudo-inverse). Activations come
#: in float32, whose resolution puts genuine directions far above 1e-12 of the largest eigenvalue.
DEFAULT_RTOL = 1e-12


class ResidualMoments:
    """Float64 running moments of residual states and of adjacent pairs.

    Each state is shifted by the mean of its first batch before accumulating, so the centred
    Gram ``Σ(x−μ)(x−μ)ᵀ = Σ(x−c)(x−c)ᵀ − N(μ−c)(μ−c)ᵀ`` never subtracts two large numbers
    (SmolLM2's residual stream has a few coordinates in the hundreds).
    """

    def __init__(self, states: Sequence[int], pairs: Sequence[int], d_model: int):
        self.states = sorted(set(states))
        self.pairs = sorted(set(pairs))
        self.d = d_model
        self.n = 0
        self.shift: dict[int, torch.Tensor] = {}
        self.s1 = {layer: torch.zeros(d_model, dtype=torch.float64) for layer in self.states}
        self.s2 = {
            layer: torch.zeros(d_model, d_model, dtype=torch.float64) for layer in self.states
        }
        self.cross = {
            layer: torch.zeros(d_model, d_model, dtype=torch.float64) for layer in self.pairs
        }
        self._prev: tuple[int, torch.Tensor] | None = None

    def add(self, layer: int, rows: Float[torch.Tensor, "n d_model"]) -> None:
        """Add one batch of rows of state ``layer``; states of a batch must come in layer order."""
        x = rows.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError(
                f"The residual state h^{layer} holds NaN or inf values; linearity needs finite "
                "activations (check the model's dtype and inputs)."
            )
        if layer == self.states[0]:
            self.n += x.shape[0]
        if layer not in self.shift:
            self.shift[layer] = x.mean(0)
        x = x - self.shift[layer]
        self.s1[layer] += x.sum(0)
        self.s2[layer] += x.T @ x
        if self._prev is not None and self._prev[0] == layer - 1 and layer - 1 in self.cross:
            self.cross[layer - 1] += self._prev[1].T @ x
        self._prev = (layer, x) if layer in self.cross else None

    def mean(self, layer: int) -> torch.Tensor:
        return self.shift[layer] + self.s1[layer] / self.n

    def gram(self, layer: int) -> torch.Tensor:
        """Centred ``Σ(x−μ)(x−μ)ᵀ``."""
        m = self.s1[layer] / self.n
        return self.s2[layer] - self.n * torch.outer(m, m)

    def cross_moment(self, layer: int) -> torch.Tensor:
        """Centred ``Σ(x−μ_x)(y−μ_y)ᵀ`` for x = h^layer, y = h^{layer+1}."""
        mx, my = self.s1[layer] / self.n, self.s1[layer + 1] / self.n
        return self.cross[layer] - self.n * torch.outer(mx, my)


@dataclass(frozen=True)
class PairFit:
    """The solve of one pair from its centred moments (raw units, not Frobenius-normalised)."""

    score: float
    score_without_residual: float
    rank: int
    A: torch.Tensor | None  # maps centred x to centred y: y_c ≈ x_c @ A


def fit_pair(
    gxx: torch.Tensor,
    gyy_trace: float,
    cxy: torch.Tensor,
    *,
    rtol: float = DEFAULT_RTOL,
    ridge: float = 0.0,
    want_map: bool = False,
) -> PairFit:
    """Scores (and optionally the map) of the affine regression of y on x from centred moments.

    In the eigenbasis ``Gxx = V Λ Vᵀ`` (directions with ``λ ≤ rtol·λ_max`` dropped), with
    ``B = VᵀCxy`` and weights ``w = 1/(λ + α)`` (α = ``ridge`` × the mean eigenvalue), the
    residual sum of squares is ``tr Gyy − 2Σ w‖B_k‖² + Σ w²λ‖B_k‖²``; for α = 0 this is the
    projection formula ``tr Gyy − tr(CᵀG⁺C)``. The update y − x has ``C' = C − Gxx``, so
    ``B' = B − ΛVᵀ``, and ``tr G'yy = tr Gyy − 2 tr C + tr Gxx``.
    """
    lam, V = torch.linalg.eigh(gxx)
    lam_max = float(lam[-1]) if lam.numel() else 0.0
    if lam_max <= 0:
        nan = float("nan")
        return PairFit(nan, nan, 0, torch.zeros_like(cxy) if want_map else None)
    keep = lam > rtol * lam_max
    lam_k, V_k = lam[keep], V[:, keep]
    alpha = ridge * float(lam.clamp_min(0).mean())
    w = 1.0 / (lam_k + alpha)
    B = V_k.T @ cxy
    B_wo = B - lam_k[:, None] * V_k.T

    def score_of(Bm: torch.Tensor, tyy: float) -> float:
        b2 = (Bm * Bm).sum(1)
        explained = 2 * float((w * b2).sum()) - float((w * w * lam_k * b2).sum())
        return explained / tyy if tyy > 0 else float("nan")

    tyy_wo = gyy_trace - 2 * float(torch.trace(cxy)) + float(torch.trace(gxx))
    A = V_k @ (w[:, None] * B) if want_map else None
    return PairFit(score_of(B, gyy_trace), score_of(B_wo, tyy_wo), int(keep.sum()), A)


def paper_fit(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's fit of one pair, operation for operation (unguarded SVD pseudo-inverse).

    Centre, divide by the Frobenius norm, ``U S Vᵀ = X``, ``A = (V·S⁻¹)Uᵀ Y``, in the dtype of the
    inputs. Returns the prediction ``XA``, the normalised target ``Y`` and the singular values.
    """
    X = x - x.mean(dim=0, keepdim=True)
    Y = y - y.mean(dim=0, keepdim=True)
    X = X / X.norm()
    Y = Y / Y.norm()
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    A = Vh.T * (1 / S)[None, ...] @ U.T @ Y
    return X @ A, Y, S


def paper_pair_score(x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
    """The reference's score ``1 − ‖XA − Y‖²`` of one pair, and the numerical rank of X (singular
    values above ``max(N, d)·eps·σ_max``, numpy's convention)."""
    pred, Y, S = paper_fit(x, y)
    err = (pred - Y).square().sum()
    tol = S.max() * max(x.shape) * torch.finfo(S.dtype).eps
    return float(1 - err), torch.count_nonzero(tol < S)
