"""Mean cosine similarity between the tokens of a cloud, with and without the diagonal.

The Geometry of Tokens reports the mean of the full N x N cosine matrix, diagonal (all ones)
included, which adds about (1 - c_off) / N. Both are computed here from one pass: with unit rows
u_i, sum_ij cos_ij = |sum_i u_i|^2 and sum_ij cos_ij^2 = |U^T U|_F^2, so no N x N matrix is built.
Zero rows have cosine 0 with everything, themselves included (scikit-learn's convention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tlmicroscope.geometry._neighbour_search import gram_block
from tlmicroscope.geometry.neighbours import as_points

__all__ = ["CosineSimilarity", "cosine_similarity"]


@dataclass(frozen=True)
class CosineSimilarity:
    """Mean and standard deviation of the pairwise cosine similarities of one cloud.

    Attributes:
        mean: Mean over the N (N - 1) pairs i != j (the default, unbiased by the diagonal).
        std: Their standard deviation.
        mean_with_diagonal: Mean over all N^2 entries, the paper's number.
        std_with_diagonal: Their standard deviation.
        n_points: N.
    """

    mean: float
    std: float
    mean_with_diagonal: float
    std_with_diagonal: float
    n_points: int

    def value(self, include_diagonal: bool = False) -> float:
        return self.mean_with_diagonal if include_diagonal else self.mean


def cosine_similarity(points) -> CosineSimilarity:
    """Mean pairwise cosine similarity of a ``[n d]`` cloud (both conventions).

    Raises:
        ValueError: fewer than two points, or NaN values.

    Examples:
        >>> c = cosine_similarity(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        >>> round(c.mean, 6), round(c.mean_with_diagonal, 6)
        (0.471405, 0.647603)
    """
    x = as_points(points)
    n, d = x.shape
    if n < 2:
        raise ValueError(f"Cosine similarity between tokens needs at least 2 points, got {n}.")
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    u = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    self_sim = torch.linalg.vecdot(u, u)  # 1, or 0 for a zero row
    s = u.sum(0)
    total = float(s @ s)
    diag = float(self_sim.sum())
    gram = gram_block(u.T, u.T) if d <= n else gram_block(u, u)
    total_sq = float((gram * gram).sum())
    diag_sq = float((self_sim * self_sim).sum())
    n_all, n_off = n * n, n * (n - 1)
    mean_all, mean_off = total / n_all, (total - diag) / n_off
    var_all = max(0.0, total_sq / n_all - mean_all**2)
    var_off = max(0.0, (total_sq - diag_sq) / n_off - mean_off**2)
    return CosineSimilarity(mean_off, math.sqrt(var_off), mean_all, math.sqrt(var_all), n)
