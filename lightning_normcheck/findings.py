"""Findings and the finding codes (the public names; they live in :mod:`lightning_normcheck.diagnosis`).

Example:
    >>> from lightning_normcheck.findings import CODES
    >>> "dead_units" in CODES
    True
"""

from lightning_normcheck.diagnosis.findings import Finding, FindingLog, log
from lightning_normcheck.diagnosis.registry import CODES, REGISTRY, SEVERITIES, CodeSpec, Severity

__all__ = ["CODES", "REGISTRY", "SEVERITIES", "CodeSpec", "Finding", "FindingLog", "Severity", "log"]
