"""Diagnosis: turning measured numbers (host floats) into findings. No hooks, no Lightning here.

Each monitor keeps a small ``*History`` (bounded windows, saved with checkpoints) and calls the
matching ``diagnose_*`` function at every flush with the values it just moved to the host.
"""

from lightning_normcheck.diagnosis.pathologies import (
    ActivationHistory,
    ClipHistory,
    GradientHistory,
    WeightHistory,
    diagnose_activations,
    diagnose_clipping,
    diagnose_gradients,
    diagnose_weights,
    explain_exception,
)

__all__ = [
    "ActivationHistory",
    "ClipHistory",
    "GradientHistory",
    "WeightHistory",
    "diagnose_activations",
    "diagnose_clipping",
    "diagnose_gradients",
    "diagnose_weights",
    "explain_exception",
]
