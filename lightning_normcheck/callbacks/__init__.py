"""The lightning_normcheck callbacks, one per file."""

from lightning_normcheck.callbacks.activation_norm_monitor import ActivationNormMonitor
from lightning_normcheck.callbacks.clip_rate_tracker import ClipRateTracker
from lightning_normcheck.callbacks.gradient_norm_monitor import GradientNormMonitor
from lightning_normcheck.callbacks.norm_check import NormCheck
from lightning_normcheck.callbacks.training_bug_detector import TrainingBugDetector
from lightning_normcheck.callbacks.weight_drift_monitor import WeightDriftMonitor

__all__ = [
    "ActivationNormMonitor",
    "ClipRateTracker",
    "GradientNormMonitor",
    "NormCheck",
    "TrainingBugDetector",
    "WeightDriftMonitor",
]
