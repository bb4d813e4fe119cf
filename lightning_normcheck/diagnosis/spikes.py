"""Rules: spikes (being ported from the string-keyed diagnosis)."""

from __future__ import annotations

from lightning_normcheck.diagnosis.engine import Rules


class SpikeRules(Rules):
    name = "spikes"
