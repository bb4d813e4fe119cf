"""Rules: gradients (being ported from the string-keyed diagnosis)."""

from __future__ import annotations

from lightning_normcheck.diagnosis.engine import Rules


class GradientRules(Rules):
    name = "gradients"
