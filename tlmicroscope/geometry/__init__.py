"""Geometry of the token cloud and of the latent space.

Token geometry (Viswanathan et al.): intrinsic dimension, neighbourhood overlap, cosine
similarity, shuffling, ID-loss correlation. Latent-space geometry (Ning and Rangaraju): component
capture, PCA/UMAP projections, attention-vs-MLP separation, norms, positions, trajectories.
"""

from tlmicroscope.geometry.anisotropy import AnisotropyResult, anisotropy
from tlmicroscope.geometry.components import (
    COMPONENTS,
    ComponentStates,
    capture_components,
    intermediate_layers,
)
from tlmicroscope.geometry.correlation import (
    IdLossCorrelation,
    LogitsEntropyCorrelation,
    id_loss_correlation,
    logits_entropy_correlation,
)
from tlmicroscope.geometry.cosine import CosineSimilarity, cosine_similarity
from tlmicroscope.geometry.intrinsic_dimension import (
    IntrinsicDimensionResult,
    gride_scales,
    intrinsic_dimension,
    remove_duplicates,
)
from tlmicroscope.geometry.layer_geometry import LayerGeometry, layer_geometry
from tlmicroscope.geometry.neighbours import (
    NearestNeighbours,
    NeighbourhoodOverlap,
    nearest_neighbours,
    neighbourhood_overlap,
)
from tlmicroscope.geometry.norms import NormProfile, norm_profile
from tlmicroscope.geometry.positions import PositionalGeometry, positional_geometry
from tlmicroscope.geometry.projection import LatentPCA, Projection, project
from tlmicroscope.geometry.separation import SeparationResult, component_separation
from tlmicroscope.geometry.shuffle import block_permutation, shuffle_tokens
from tlmicroscope.geometry.special_inputs import (
    VocabularyNorms,
    repeated_token_sequence,
    single_token_inputs,
    vocabulary_norms,
    vocabulary_states,
)
from tlmicroscope.geometry.sweep import GeometrySweep, geometry_sweep, load_geometry_sweep
from tlmicroscope.geometry.trajectories import TokenTrajectories, token_trajectories

__all__: list[str] = []
__all__ += [  # latent-space geometry
    "COMPONENTS",
    "ComponentStates",
    "LatentPCA",
    "NormProfile",
    "PositionalGeometry",
    "Projection",
    "SeparationResult",
    "TokenTrajectories",
    "VocabularyNorms",
    "capture_components",
    "component_separation",
    "intermediate_layers",
    "norm_profile",
    "positional_geometry",
    "project",
    "repeated_token_sequence",
    "single_token_inputs",
    "token_trajectories",
    "vocabulary_norms",
    "vocabulary_states",
]
__all__ += [  # token geometry
    "AnisotropyResult",
    "CosineSimilarity",
    "GeometrySweep",
    "IdLossCorrelation",
    "IntrinsicDimensionResult",
    "LayerGeometry",
    "LogitsEntropyCorrelation",
    "NearestNeighbours",
    "NeighbourhoodOverlap",
    "anisotropy",
    "block_permutation",
    "cosine_similarity",
    "geometry_sweep",
    "gride_scales",
    "id_loss_correlation",
    "intrinsic_dimension",
    "layer_geometry",
    "load_geometry_sweep",
    "logits_entropy_correlation",
    "nearest_neighbours",
    "neighbourhood_overlap",
    "remove_duplicates",
    "shuffle_tokens",
]
