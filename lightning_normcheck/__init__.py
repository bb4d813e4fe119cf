"""lightning_normcheck: Lightning callbacks that watch the norms of a network while it trains and say,
in plain words, what is wrong, where, and what to try.

Example:
    >>> from lightning_normcheck import NormCheck
    >>> cb = NormCheck()
    >>> cb.findings
    []
"""

from lightning_normcheck.callbacks import (
    ActivationNormMonitor,
    ClipRateTracker,
    GradientNormMonitor,
    NormCheck,
    TrainingBugDetector,
    WeightDriftMonitor,
)
from lightning_normcheck.findings import CODES, Finding

__version__ = "0.1.0"

__all__ = [
    "ActivationNormMonitor",
    "CODES",
    "ClipRateTracker",
    "Finding",
    "GradientNormMonitor",
    "NormCheck",
    "TrainingBugDetector",
    "WeightDriftMonitor",
]
