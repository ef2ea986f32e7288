"""Geometry of the token cloud and of the latent space.

Token geometry (Viswanathan et al.): intrinsic dimension, neighbourhood overlap, cosine
similarity, shuffling, ID-loss correlation. Latent-space geometry (Ning and Rangaraju): component
capture, PCA/UMAP projections, attention-vs-MLP separation, norms, positions, trajectories.
"""

__all__: list[str] = []
