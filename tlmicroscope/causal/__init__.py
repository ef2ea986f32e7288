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
    "ablate_rows",
    "ablate_subspace",
    "as_orthonormal_basis",
    "derangement",
    "subspace_ablation_hooks",
    "CausalBasis",
    "CBEConvergenceError",
    "CBEConvergenceWarning",
    "extract_causal_basis",
    "default_cbe_dir",
    "CausalFidelityResult",
    "causal_fidelity",
    "StimulusResponseResult",
    "aitchison_similarity",
    "stimulus_response_alignment",
    "INJECTION_TEMPLATE",
    "InjectionDetector",
    "MahalanobisDetector",
    "InjectionFeatures",
    "InjectionPrompts",
    "InjectionResult",
    "inject",
    "injection_experiment",
    "injection_features",
    "injection_prompts",
    "order_choices",
    "split_auroc",
    "PAPER_AUROC",
    "paper_features",
    "task_type",
    "injection_by_task",
    "PredictionDepthResult",
    "prediction_depth",
]
