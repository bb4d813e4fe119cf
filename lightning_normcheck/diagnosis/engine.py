"""The diagnosis engine: records in, findings out.

:class:`Diagnosis` holds the finding log, the thresholds and one rule family per module
(:mod:`~lightning_normcheck.diagnosis.data`, :mod:`~lightning_normcheck.diagnosis.spikes`,
:mod:`~lightning_normcheck.diagnosis.nonfinite`, :mod:`~lightning_normcheck.diagnosis.gradients`,
:mod:`~lightning_normcheck.diagnosis.activations`, :mod:`~lightning_normcheck.diagnosis.weights`,
:mod:`~lightning_normcheck.diagnosis.updates`,
:mod:`~lightning_normcheck.diagnosis.clipping`, :mod:`~lightning_normcheck.diagnosis.bugs`). The callbacks
feed it the records of each logging step (and, at once, the records of a bug seen inside a hook); the
``lightning-normcheck`` report feeds it records built from logged scalars. Families run in a fixed order:
data causes first (a large gradient explained by the labels is not an explosion), then the first
non-finite value, then the trends.

Example:
    >>> from lightning_normcheck.diagnosis.records import GradientTotals
    >>> d = Diagnosis()
    >>> d.observe(1, [GradientTotals(steps=(0, 1), totals=(1.0, float("nan")), optimizers=(0, 0))])
    >>> [(f.code, f.step) for f in d.log.findings]
    [('nonfinite_gradients', 1)]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.fixes import Overrides
from lightning_normcheck.diagnosis.records import InitStats, Record, RunInfo, TrainingError
from lightning_normcheck.diagnosis.thresholds import Thresholds

R = TypeVar("R")


@dataclass(frozen=True)
class Flush:
    """The records of one logging step (or of one event seen inside a hook)."""

    step: int
    records: tuple[Record, ...]

    def of(self, kind: type[R]) -> list[R]:
        """The records of one type, in the order they were given."""
        return [r for r in self.records if isinstance(r, kind)]

    def first(self, kind: type[R]) -> R | None:
        return next((r for r in self.records if isinstance(r, kind)), None)


@dataclass
class Context:
    """What every rule may read besides the records: the run, the init statistics, the thresholds."""

    thresholds: Thresholds
    run: RunInfo = field(default_factory=RunInfo)
    init: InitStats | None = None


class Rules:
    """One family of rules. Subclasses read the records they know from each :class:`Flush` and report to
    the log; their memory across logging steps is plain host data saved by :meth:`state_dict`."""

    name = "rules"

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        self.ctx = ctx
        self.log = log

    def start(self) -> None:
        """A new fit starts (the context's run info is set)."""

    def observe(self, flush: Flush) -> None:
        """Judge the records of one logging step."""

    def explain(self, error: TrainingError) -> None:
        """Training raised: tie the exception to what was found before it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (missing keys keep their defaults)."""


def _families() -> list[type[Rules]]:
    from lightning_normcheck.diagnosis import (
        activations,
        bugs,
        clipping,
        data,
        gradients,
        nonfinite,
        spikes,
        updates,
        weights,
    )

    return [
        data.DataRules,
        spikes.SpikeRules,
        nonfinite.NonfiniteRules,
        gradients.GradientRules,
        activations.ActivationRules,
        weights.WeightRules,
        updates.UpdateRules,
        clipping.ClipRules,
        bugs.BugRules,
    ]


class Diagnosis:
    """Records in, findings out.

    Args:
        thresholds: the thresholds of every family (default: the documented defaults).
        log: the finding log to report to (default: a new one).
        on_error: when given, a family that raises is switched off and ``on_error(family, error)`` is called
            (the callbacks warn once); without it the error propagates.
    """

    VERSION = 1

    def __init__(
        self,
        thresholds: Thresholds | None = None,
        log: FindingLog | None = None,
        on_error: Callable[[Rules, Exception], None] | None = None,
    ) -> None:
        self.ctx = Context(thresholds or Thresholds())
        self.log = log if log is not None else FindingLog()
        self.rules: list[Rules] = [cls(self.ctx, self.log) for cls in _families()]
        self.on_error = on_error
        self.disabled: list[str] = []
        self.overrides = Overrides()

    def _each(self, method: str, *args: Any) -> None:
        for r in list(self.rules):
            if self.on_error is None:
                getattr(r, method)(*args)
                continue
            try:
                getattr(r, method)(*args)
            except Exception as err:  # noqa: BLE001 - one family's failure must not end the others
                self.rules.remove(r)
                self.disabled.append(r.name)
                self.on_error(r, err)

    @property
    def thresholds(self) -> Thresholds:
        return self.ctx.thresholds

    def start(self, run: RunInfo, init: InitStats | None = None) -> None:
        """A fit starts: what the rules need to know about the run."""
        self.ctx.run = run
        self.ctx.init = init
        self._each("start")

    def observe(self, step: int, records: Iterable[Record]) -> None:
        """Judge the records of one logging step (``step``: the step they were flushed at)."""
        flush = Flush(int(step), tuple(records))
        if not flush.records:
            return
        self.overrides.observe(flush.records)
        self._each("observe", flush)
        self._advise()

    def explain(self, error: TrainingError) -> None:
        """Training raised: each family ties the exception to what it found before."""
        self._each("explain", error)
        self._advise()

    def _advise(self) -> None:
        """Concrete values and LightningCLI overrides into the fixes (never a reason for diagnosis to fail)."""
        try:
            self.overrides.apply(self.log, self.ctx.run)
        except Exception as err:  # noqa: BLE001
            if self.on_error is None:
                raise
            self.on_error(Rules(self.ctx, self.log), err)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "rules": {r.name: r.state_dict() for r in self.rules},
            "overrides": self.overrides.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.overrides.load_state_dict(state.get("overrides", {}))
        saved = state.get("rules", {})
        for r in self.rules:
            if r.name in saved:
                r.load_state_dict(saved[r.name])


def run_rules(records: Sequence[tuple[int, Sequence[Record]]], thresholds: Thresholds | None = None) -> FindingLog:
    """Run the rules over ``(step, records)`` pairs in order (a whole run read back from logs) and return
    the findings."""
    d = Diagnosis(thresholds)
    for step, recs in records:
        d.observe(step, recs)
    return d.log


__all__ = ["Context", "Diagnosis", "Flush", "Rules", "run_rules"]
