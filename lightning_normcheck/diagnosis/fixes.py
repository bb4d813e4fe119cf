"""Fixes a user can apply: values taken from the run itself, and the LightningCLI overrides that set them.

The registry words the clip fixes once (:data:`~lightning_normcheck.diagnosis.registry.CLIP_FIX`,
:data:`~lightning_normcheck.diagnosis.registry.RAISE_CLIP_FIX`). After each logging step, :class:`Overrides`
replaces them in every message that has them with a clip value from this run's pre-clip total gradient norms
(the 90th percentile of the recent window, named in the message) and gives the finding the override that sets
it (``Finding.overrides``, e.g. ``--trainer.gradient_clip_val=2.3``); a ``learning_rate_too_high`` finding gets
``--model.<name>=<lr>`` when the model's hyperparameters hold the learning rate under ``<name>``.

Why the 90th percentile: a threshold there clips about one step in ten of the window it was taken from, so it
bounds the rare large steps (spikes, the start of a blow-up) and leaves the typical update alone; below the
median it would rescale most updates (the ``high_clip_rate`` pattern).

Example:
    >>> from lightning_normcheck.diagnosis.records import GradientTotals
    >>> o = Overrides()
    >>> o.observe([GradientTotals(steps=tuple(range(20)), totals=tuple(float(s) for s in range(20)), optimizers=(0,) * 20)])
    >>> v = o.clip_value()
    >>> round(v.value, 2), v.first, v.last, v.count
    (17.1, 0, 19, 20)
    >>> o.clip_value(before=5) is None  # too few steps before the problem to take a quantile from
    True
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lightning_normcheck.diagnosis.findings import Finding, FindingLog
from lightning_normcheck.diagnosis.records import GradientTotals, Record, RunInfo
from lightning_normcheck.diagnosis.registry import CLIP_FIX, RAISE_CLIP_FIX

#: The quantile of the recent pre-clip norms a suggested clip value is taken at (see the module docstring).
QUANTILE = 0.9
#: Finite totals kept (the recent window; the first ones are kept apart for problems that grow).
WINDOW = 200
#: Fewest steps a quantile is taken from: with fewer, the suggestion falls back to the common 1.0.
MIN_STEPS = 8
#: Codes whose own evidence is in the recent window and rare (spikes) or is the clip rate itself: their clip
#: value comes from the recent window; for the others (a blow-up) from the steps before the problem began.
_FROM_RECENT = frozenset({"gradient_spikes", "high_clip_rate"})


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear between order statistics, as ``numpy.quantile``'s default)."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass(frozen=True)
class ClipValue:
    """A clip value from the run's pre-clip total norms: ``value``, taken over ``count`` steps ``first``-``last``."""

    value: float
    first: int
    last: int
    count: int

    @property
    def rounded(self) -> float:
        """Two significant digits: a value to type, not a measurement."""
        return float(f"{self.value:.2g}")

    def source(self) -> str:
        return (
            f"the {QUANTILE:.0%} quantile of the pre-clip total gradient norm over the {self.count} steps "
            f"{self.first}-{self.last}"
        )


class Overrides:
    """Keeps the run's finite pre-clip totals and puts concrete fixes into the findings."""

    def __init__(self) -> None:
        self.recent: deque[tuple[int, float]] = deque(maxlen=WINDOW)
        self.first: list[tuple[int, float]] = []  # the first WINDOW finite totals of the run

    def observe(self, records: Iterable[Record]) -> None:
        for r in records:
            if isinstance(r, GradientTotals):
                for step, v in r.series():
                    if math.isfinite(v):
                        self.recent.append((step, v))
                        if len(self.first) < WINDOW:
                            self.first.append((step, v))

    def clip_value(self, before: int | None = None) -> ClipValue | None:
        """The suggested clip value: over the recent window, or (``before``) over the steps before that one."""
        if before is None:
            pool = list(self.recent)
        else:  # the recent steps before it, else the run's first steps before it
            pool = [(s, v) for s, v in self.recent if s < before]
            if len(pool) < MIN_STEPS:
                pool = [(s, v) for s, v in self.first if s < before]
        if len(pool) < MIN_STEPS:
            return None
        return ClipValue(quantile([v for _, v in pool], QUANTILE), pool[0][0], pool[-1][0], len(pool))

    def apply(self, log: FindingLog, run: RunInfo) -> None:
        """Put concrete values and overrides into the findings that name a fix with an argument."""
        for f in log.findings:
            self._apply(log, run, f)

    def _apply(self, log: FindingLog, run: RunInfo, f: Finding) -> None:
        message, overrides = f.message, list(f.overrides)
        if CLIP_FIX in message or (RAISE_CLIP_FIX in message and run.clip_val and run.clip_algorithm == "norm"):
            clip = self.clip_value(before=None if f.code in _FROM_RECENT else f.since)
            value = clip.rounded if clip is not None else 1.0
            override = f"--trainer.gradient_clip_val={value:g}"
            if clip is None:
                why = f"a common default: fewer than {MIN_STEPS} steps before the problem to take a quantile from"
            else:
                why = clip.source()
            message = message.replace(CLIP_FIX, f"clip gradients at {value:g} ({why}; `{override}`)")
            message = message.replace(
                RAISE_CLIP_FIX,
                f"raise the clip value to {value:g} ({why}, so it clips about one step in ten; `{override}`)",
            )
            overrides = _with(overrides, override)
        lr = f.extra.get("lr")
        if f.code == "learning_rate_too_high" and run.lr_arg and isinstance(lr, (int, float)) and lr > 0:
            override = f"--model.{run.lr_arg}={lr:.1g}"
            if override not in overrides:
                message = f"{message} As a LightningCLI override: `{override}`."
                overrides = _with(overrides, override)
        if message != f.message or overrides != f.overrides:
            log.advise(f.code, f.layer, message, overrides)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": [[s, v] for s, v in self.recent], "first": [[s, v] for s, v in self.first]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.recent = deque(((int(s), float(v)) for s, v in state.get("recent", [])), maxlen=WINDOW)
        self.first = [(int(s), float(v)) for s, v in state.get("first", [])]


def _with(overrides: list[str], override: str) -> list[str]:
    """``overrides`` with ``override`` in place of one that sets the same argument."""
    arg = override.split("=", 1)[0]
    return [o for o in overrides if o.split("=", 1)[0] != arg] + [override]


__all__ = ["QUANTILE", "ClipValue", "Overrides", "quantile"]
