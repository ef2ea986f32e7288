"""Causal directions: subspace ablation hooks, causal basis extraction, causal fidelity,
stimulus-response alignment, prompt-injection detection and prediction depth (Belrose et al.)."""

from tlmicroscope.causal.ablation import (
    ABLATION_MODES,
    ablate_rows,
    ablate_subspace,
    as_orthonormal_basis,
    derangement,
    subspace_ablation_hooks,
)
from tlmicroscope.causal.basis import (
    CausalBasis,
    CBEConvergenceError,
    CBEConvergenceWarning,
    default_cbe_dir,
    extract_causal_basis,
)
from tlmicroscope.causal.detector import InjectionDetector, MahalanobisDetector
from tlmicroscope.causal.fidelity import CausalFidelityResult, causal_fidelity
from tlmicroscope.causal.injection import (
    INJECTION_TEMPLATE,
    PAPER_AUROC,
    InjectionFeatures,
    InjectionPrompts,
    InjectionResult,
    inject,
    injection_by_task,
    injection_experiment,
    injection_features,
    injection_prompts,
    order_choices,
    paper_features,
    split_auroc,
    task_type,
)
from tlmicroscope.causal.prediction_depth import PredictionDepthResult, prediction_depth
from tlmicroscope.causal.stimulus_response import (
    StimulusResponseResult,
    aitchison_similarity,
    stimulus_response_alignment,
)

__all__ = [
    "ABLATION_MODES",
    "INJECTION_TEMPLATE",
    "PAPER_AUROC",
    "CBEConvergenceError",
    "CBEConvergenceWarning",
    "CausalBasis",
    "CausalFidelityResult",
    "InjectionDetector",
    "InjectionFeatures",
    "InjectionPrompts",
    "InjectionResult",
    "MahalanobisDetector",
    "PredictionDepthResult",
    "StimulusResponseResult",
    "ablate_rows",
    "ablate_subspace",
    "aitchison_similarity",
    "as_orthonormal_basis",
    "causal_fidelity",
    "default_cbe_dir",
    "derangement",
    "extract_causal_basis",
    "inject",
    "injection_by_task",
    "injection_experiment",
    "injection_features",
    "injection_prompts",
    "order_choices",
    "paper_features",
    "prediction_depth",
    "split_auroc",
    "stimulus_response_alignment",
    "subspace_ablation_hooks",
    "task_type",
]
