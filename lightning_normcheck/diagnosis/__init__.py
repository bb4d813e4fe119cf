"""Diagnosis: typed records in, findings out. No hooks, no Lightning, no torch here.

The path: a monitor measures and builds :mod:`~lightning_normcheck.diagnosis.records`; the
:class:`~lightning_normcheck.diagnosis.engine.Diagnosis` runs one rule family per module over them
(thresholds from :mod:`~lightning_normcheck.diagnosis.thresholds`); findings are recorded in a
:class:`~lightning_normcheck.diagnosis.findings.FindingLog`, worded through the code registry
(:mod:`~lightning_normcheck.diagnosis.registry`).
"""

from lightning_normcheck.diagnosis.engine import Diagnosis, Flush, Rules, run_rules
from lightning_normcheck.diagnosis.findings import Finding, FindingLog
from lightning_normcheck.diagnosis.registry import CODES, REGISTRY, CodeSpec, compose
from lightning_normcheck.diagnosis.thresholds import Thresholds

__all__ = [
    "CODES",
    "REGISTRY",
    "CodeSpec",
    "Diagnosis",
    "Finding",
    "FindingLog",
    "Flush",
    "Rules",
    "Thresholds",
    "compose",
    "run_rules",
]
