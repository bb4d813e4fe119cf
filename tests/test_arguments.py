"""Bad constructor arguments fail at construction, naming the argument, the value and what is allowed."""

from __future__ import annotations

from typing import Any

import pytest

from lightning_normcheck import (
    ActivationNormMonitor,
    ClipRateTracker,
    GradientNormMonitor,
    NormCheck,
    TrainingBugDetector,
    WeightDriftMonitor,
)

CASES: list[tuple[Any, str, Any, type[Exception], str]] = [
    (NormCheck, "log_every_n_steps", 0, ValueError, "int >= 1"),
    (NormCheck, "log_every_n_steps", 2.5, ValueError, "int >= 1"),
    (NormCheck, "log_every_n_steps", True, ValueError, "int >= 1"),
    (NormCheck, "gradients", "yes", TypeError, "True or False"),
    (NormCheck, "norm_type", -1.0, ValueError, "a number in"),
    (NormCheck, "norm_type", float("nan"), ValueError, "a number in"),
    (NormCheck, "saturation_threshold", 1.5, ValueError, "(0"),
    (NormCheck, "saturation_threshold", 1.0, ValueError, "(0, 1)"),
    (NormCheck, "activation_window", 0, ValueError, "int >= 1"),
    (NormCheck, "include_types", "Linear", TypeError, "list of strings"),
    (NormCheck, "exclude_names", [1, 2], TypeError, "list of strings"),
    (NormCheck, "clip_threshold", 0.0, ValueError, "a number in"),
    (NormCheck, "clip_algorithm", "clamp", ValueError, "one of ('norm', 'value')"),
    (NormCheck, "clip_window", -3, ValueError, "int >= 1"),
    (NormCheck, "high_clip_rate", 2.0, ValueError, "a number in"),
    (NormCheck, "print_summary", None, TypeError, "True or False"),
    (GradientNormMonitor, "norm_type", 0, ValueError, "a number in"),
    (GradientNormMonitor, "per_parameter", 1, TypeError, "True or False"),
    (ActivationNormMonitor, "saturation_threshold", -0.1, ValueError, "a number in"),
    (ActivationNormMonitor, "activation_window", 0, ValueError, "int >= 1"),
    (WeightDriftMonitor, "track_drift", "no", TypeError, "True or False"),
    (ClipRateTracker, "clip_threshold", -1.0, ValueError, "a number in"),
    (ClipRateTracker, "clip_window", 0, ValueError, "int >= 1"),
    (TrainingBugDetector, "log_every_n_steps", -1, ValueError, "int >= 1"),
]


@pytest.mark.parametrize(
    "cls, arg, value, error, allowed", CASES, ids=[f"{c[0].__name__}-{c[1]}-{c[2]!r}" for c in CASES]
)
def test_bad_argument_is_named(cls: Any, arg: str, value: Any, error: type[Exception], allowed: str) -> None:
    with pytest.raises(error) as exc:
        cls(**{arg: value})
    message = str(exc.value)
    assert cls.__name__ in message
    assert f"`{arg}`" in message
    assert repr(value) in message
    assert allowed in message


def test_good_arguments_are_accepted() -> None:
    cb = NormCheck(
        log_every_n_steps=3,
        activations=False,
        norm_type=float("inf"),
        include_types=["Linear"],
        clip_threshold=1.0,
        clip_algorithm="value",
        clip_window=10,
        high_clip_rate=0.9,
    )
    assert cb.log_every_n_steps == 3
    assert [m.name for m in cb._monitors if m.name == "activation_norm"] == []
