"""Anisotropy of a point cloud (LLM-Microscope): the share of variance on the top principal axis.

anisotropy = lambda_max / sum(lambda) of the centred covariance = sigma_1^2 / |E_c|_F^2, where E_c
is the centred ``[n d]`` matrix. 1 means every point lies on one line through the mean; 1/d means
isotropic. The reference computes a full SVD in the input dtype (or 100 power iterations); here the
top eigenvalue of the smaller Gram matrix (``n x n`` or ``d x d``) is computed in float64, which is
exact to rounding and cheaper than the SVD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tlmicroscope.geometry._neighbour_search import gram_block
from tlmicroscope.geometry.neighbours import as_points

__all__ = ["AnisotropyResult", "anisotropy"]


@dataclass(frozen=True)
class AnisotropyResult:
    """Anisotropy of one cloud.

    Attributes:
        estimate: lambda_max / sum(lambda), in [1/min(n-1, d), 1].
        top_eigenvalue: lambda_max of the covariance (divided by n - 1).
        total_variance: sum(lambda), the trace of the covariance.
        n_points: Points in the cloud.
        dim: Their dimension d.
    """

    estimate: float
    top_eigenvalue: float
    total_variance: float
    n_points: int
    dim: int


def anisotropy(points) -> AnisotropyResult:
    """The LLM-Microscope anisotropy of a ``[n d]`` cloud.

    Raises:
        ValueError: fewer than two points, NaN values, or all points identical (no variance).

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> line = torch.randn(100, 1, generator=g) * torch.tensor([[3.0, 4.0]])
        >>> round(anisotropy(line).estimate, 6)
        1.0
        >>> cigar = torch.randn(20000, 4, generator=g) * torch.tensor([3.0, 1, 1, 1])
        >>> round(anisotropy(cigar).estimate, 2)  # 9 / (9 + 1 + 1 + 1)
        0.75
    """
    x = as_points(points)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"Anisotropy needs at least 2 points, got {n}.")
    e = x - x.mean(0, keepdim=True)
    total = float(torch.linalg.vecdot(e, e).sum())
    if total == 0:
        raise ValueError(
            f"All {n} points are identical: the cloud has no variance, so anisotropy is undefined."
        )
    gram = gram_block(e, e) if n <= d else gram_block(e.T, e.T)
    top = float(torch.linalg.eigvalsh(gram)[-1])
    return AnisotropyResult(
        estimate=top / total,
        top_eigenvalue=top / (n - 1),
        total_variance=total / (n - 1),
        n_points=n,
        dim=d,
    )
