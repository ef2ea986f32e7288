"""Lenses: the shared readout, the lens protocol, the logit lens, and prediction trajectories."""

from tlmicroscope.lenses.base import Lens, LogitLens, lens_logits, load_lens, resolve_lens
from tlmicroscope.lenses.readout import Readout, ReadoutIdentityError, check_readout_identity
from tlmicroscope.lenses.trajectory import (
    STATISTICS,
    PredictionTrajectory,
    layer_label,
    prediction_trajectory,
)
from tlmicroscope.lenses.components import ComponentLens, component_lens
from tlmicroscope.lenses.targets import TARGET_STATISTICS, TargetTrajectories, target_trajectories
from tlmicroscope.lenses.tuned import TunedLens
from tlmicroscope.lenses.train import TrainConfig, TrainResult, train_tuned_lens
from tlmicroscope.lenses.evaluate import LensEvaluation, evaluate_lens
from tlmicroscope.lenses.jacobian import JacobianLens, fit_jacobian_lens
from tlmicroscope.lenses.bench import LensBench, lens_bench

__all__ = [
    "Lens",
    "LogitLens",
    "Readout",
    "ReadoutIdentityError",
    "check_readout_identity",
    "lens_logits",
    "load_lens",
    "resolve_lens",
    "prediction_trajectory",
    "PredictionTrajectory",
    "STATISTICS",
    "layer_label",
    "target_trajectories",
    "component_lens",
    "ComponentLens",
    "TargetTrajectories",
    "TARGET_STATISTICS",
    "TunedLens",
    "TrainConfig",
    "TrainResult",
    "train_tuned_lens",
    "LensEvaluation",
    "evaluate_lens",
    "JacobianLens",
    "fit_jacobian_lens",
    "LensBench",
    "lens_bench",
]
