"""Lenses: the shared readout, the lens protocol, the logit lens, and prediction trajectories."""

from tlmicroscope.lenses.base import (
    Lens,
    LogitLens,
    lens_features,
    lens_logits,
    load_lens,
    resolve_lens,
)
from tlmicroscope.lenses.bench import LensBench, lens_bench
from tlmicroscope.lenses.components import ComponentLens, component_lens
from tlmicroscope.lenses.evaluate import LensEvaluation, evaluate_lens
from tlmicroscope.lenses.jacobian import JacobianLens, fit_jacobian_lens
from tlmicroscope.lenses.readout import Readout, ReadoutIdentityError, check_readout_identity
from tlmicroscope.lenses.targets import TARGET_STATISTICS, TargetTrajectories, target_trajectories
from tlmicroscope.lenses.train import TrainConfig, TrainResult, train_tuned_lens
from tlmicroscope.lenses.trajectory import (
    STATISTICS,
    PredictionTrajectory,
    layer_label,
    prediction_trajectory,
)
from tlmicroscope.lenses.tuned import TunedLens

__all__ = [
    "STATISTICS",
    "TARGET_STATISTICS",
    "ComponentLens",
    "JacobianLens",
    "Lens",
    "LensBench",
    "LensEvaluation",
    "LogitLens",
    "PredictionTrajectory",
    "Readout",
    "ReadoutIdentityError",
    "TargetTrajectories",
    "TrainConfig",
    "TrainResult",
    "TunedLens",
    "check_readout_identity",
    "component_lens",
    "evaluate_lens",
    "fit_jacobian_lens",
    "layer_label",
    "lens_bench",
    "lens_features",
    "lens_logits",
    "load_lens",
    "prediction_trajectory",
    "resolve_lens",
    "target_trajectories",
    "train_tuned_lens",
]
