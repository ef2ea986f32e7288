"""LLM-Microscope (Razzhigaev et al.): linearity, token-wise non-linearity, layer contributions,
contextualization by prefix decoding, token classes, anisotropy and filler-token removal."""

from tlmicroscope.microscope.contextualization import (
    Contextualization,
    ContextualizationProbe,
    contextualization,
)
from tlmicroscope.microscope.contributions import (
    ComponentAttribution,
    LayerContributions,
    component_attribution,
    layer_contributions,
)
from tlmicroscope.microscope.linearity import LinearityResult, linearity_score, linearity_scores
from tlmicroscope.microscope.nonlinearity import (
    NonlinearityReference,
    TokenNonlinearity,
    token_nonlinearity,
)
from tlmicroscope.microscope.profiles import LayerProfiles, layer_profiles
from tlmicroscope.microscope.removal import (
    REMOVALS,
    FillerRemovalResult,
    filler_removal_experiment,
    remove_filler,
)
from tlmicroscope.microscope.token_classes import (
    ARTICLES,
    STOP_WORDS,
    TOKEN_CLASSES,
    CorrelationResult,
    TokenClassSummary,
    classify_tokens,
    contextuality_nonlinearity_correlation,
    token_class_summary,
    token_table,
)

__all__ = [
    "ARTICLES",
    "REMOVALS",
    "STOP_WORDS",
    "TOKEN_CLASSES",
    "ComponentAttribution",
    "Contextualization",
    "ContextualizationProbe",
    "CorrelationResult",
    "FillerRemovalResult",
    "LayerContributions",
    "LayerProfiles",
    "LinearityResult",
    "NonlinearityReference",
    "TokenClassSummary",
    "TokenNonlinearity",
    "classify_tokens",
    "component_attribution",
    "contextuality_nonlinearity_correlation",
    "contextualization",
    "filler_removal_experiment",
    "layer_contributions",
    "layer_profiles",
    "linearity_score",
    "linearity_scores",
    "remove_filler",
    "token_class_summary",
    "token_nonlinearity",
    "token_table",
]
