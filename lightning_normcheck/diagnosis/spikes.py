"""Rules: intermittent spikes of the total gradient norm (``gradient_spikes``), one finding in all.

A spike is a total norm above ``spike_factor`` x its running median (the larger of the medians of the last
``spike_window`` and of the last ``spike_recent`` steps, once ``spike_min_history`` steps were seen) that falls
back within ``spike_fallback_steps`` steps: to within ``fallback_band`` x that median, or ``fallback_drop`` x
below its own peak. A steady climb or a rise to a new level never falls back and is left to
``exploding_gradients``. With several optimizers (a GAN's generator and discriminator) each optimizer's totals
are on their own scale and are judged in their own window. A step with a total of exactly 0 had no gradient
(``training_step`` returned ``None``) and is no sample; a non-finite total is another finding's business and
drops the spikes awaiting their fall-back.

A spike must also stand out against the scale the run has shown, not only against a median that shrinks as
the loss goes to zero: its norm at least ``spike_run_scale`` x the highest running median seen so far. A
converged classifier's gradient norms are heavy-tailed (easy batches tiny, a batch with one hard example
100x their median but below the norms the run had while it learned), and that is not a problem. The one
exception: with integer labels, spikes whose batches share a label that is rare in the data seen so far
(below ``rare_label_fraction`` of the labels) are a rare class the model keeps getting wrong, whatever the
run's scale.

The finding is known at the step whose total confirmed the fall-back of its first spike (``since``: that
spike's step) and is revised with every later spike: their steps, factors and batches are in its ``extra``.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Diagnosis
    >>> from lightning_normcheck.diagnosis.records import GradientTotals, StepBatches
    >>> norms = tuple(100.0 if s == 20 else 1.0 for s in range(22))
    >>> totals = GradientTotals(steps=tuple(range(22)), totals=norms, optimizers=(0,) * 22)
    >>> d = Diagnosis()
    >>> d.observe(21, [totals, StepBatches({20: "epoch 0, batch 20"})])
    >>> f = d.log.get("gradient_spikes")
    >>> f.since, f.step, f.value, f.extra["batches"]
    (20, 21, 100.0, ['epoch 0, batch 20'])
"""

from __future__ import annotations

import functools
import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import BatchSample, GradientTotals, StepBatches
from lightning_normcheck.diagnosis.registry import CLIP_FIX, compose
from lightning_normcheck.diagnosis.thresholds import GradientThresholds

#: A step missing from the batch map was made in the batch of an earlier step (several optimizer steps per
#: batch: two optimizers, or manual optimization): look back up to this many steps for it.
MAX_STEPS_PER_BATCH = 16
#: Spikes named in the message (all of the listed ones are in the finding's ``extra``).
_IN_MESSAGE = 10

#: The likely causes by task, most likely first: with integer labels a rare class is the usual suspect, with
#: a float target a corrupted (outlier) label.
_CAUSES: dict[str, tuple[str, ...]] = {
    "classification": (
        "a rare class the model keeps getting wrong (its examples carry a large loss)",
        "a mislabeled example in those batches",
        "an occasional bad batch (outliers, a different scale)",
    ),
    "regression": (
        "a corrupted target (an outlier label far from the others) in those batches",
        "an occasional bad batch (outlier inputs, a different scale)",
        "a rare regime of the data the model keeps getting wrong",
    ),
}


@dataclass
class Spike:
    """One intermittent spike of the total gradient norm.

    Attributes:
        step: the optimizer step of the spike.
        norm: its total gradient norm.
        median: the running median it broke from.
        batch: where it came from (``"epoch 0, batch 17"``, with the optimizer when there are several), or ``""``.
        confirmed: the step whose total fell back (-1 while pending).
    """

    step: int
    norm: float
    median: float
    batch: str
    confirmed: int = -1
    peak: float = 0.0  # the highest running median of the run before this spike

    @property
    def factor(self) -> float:
        return self.norm / self.median

    @property
    def over_run_scale(self) -> float:
        """The spike's norm over the highest running median the run had shown before it."""
        return self.norm / self.peak if self.peak > 0 else math.inf


@dataclass
class SpikeWindow:
    """One optimizer's running-median window, spikes awaiting their fall-back, and the confirmed spikes.

    Bounded: the window holds ``spike_window`` totals, the listed spikes ``spike_max_listed``.
    """

    window: deque[float] = field(default_factory=deque)
    pending: list[tuple[Spike, int]] = field(default_factory=list)  # (spike, steps seen since)
    spikes: list[Spike] = field(default_factory=list)
    count: int = 0
    max_factor: float = 0.0
    last_step: int = -1
    peak: float = 0.0  # the highest running median so far (the scale the run has shown)

    def update(
        self,
        totals: Sequence[tuple[int, float]],
        batch_of: Callable[[int], str],
        th: GradientThresholds,
        keep: Callable[[Spike], bool] = lambda spike: True,
    ) -> list[Spike]:
        """Feed ``(step, total)`` pairs in step order; return the spikes whose fall-back they confirmed and that
        ``keep`` keeps (the others fell back too, but are not spikes of this run)."""
        if self.window.maxlen != th.spike_window:
            self.window = deque(self.window, maxlen=th.spike_window)
        confirmed: list[Spike] = []
        for step, value in totals:
            if step <= self.last_step:
                continue  # already seen (e.g. after a resume)
            self.last_step = step
            if not math.isfinite(value):
                self.pending = []  # non-finite: a different problem (nonfinite_gradients)
                continue
            if value == 0.0:
                continue  # no gradient at all (a skipped batch): not a sample
            confirmed += self._fall_back(step, value, th)
            median = self._baseline(th)
            if median is not None and median > 0 and value > th.spike_factor * median:
                self.pending.append((Spike(step, value, median, batch_of(step), peak=self.peak), 0))
            if median is not None:
                self.peak = max(self.peak, median)
            self.window.append(value)
        confirmed = [spike for spike in confirmed if keep(spike)]
        for spike in confirmed:
            self.count += 1
            self.max_factor = max(self.max_factor, spike.factor)
            if len(self.spikes) < th.spike_max_listed:
                self.spikes.append(spike)
        return confirmed

    def _fall_back(self, step: int, value: float, th: GradientThresholds) -> list[Spike]:
        """The pending spikes that ``value`` falls back from; the others age by one step (or expire)."""
        confirmed, still = [], []
        for spike, age in self.pending:
            if value <= max(th.fallback_band * spike.median, spike.norm / th.fallback_drop):
                spike.confirmed = step
                confirmed.append(spike)
            elif age + 1 < th.spike_fallback_steps:
                still.append((spike, age + 1))
        self.pending = still
        return confirmed

    def _baseline(self, th: GradientThresholds) -> float | None:
        """The larger of the window's median and the recent median (``None`` before enough history)."""
        if len(self.window) < th.spike_min_history:
            return None
        recent = list(self.window)[-th.spike_recent :]
        return max(statistics.median(self.window), statistics.median(recent))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "window": list(self.window),
            "pending": [[vars(s).copy(), age] for s, age in self.pending],
            "spikes": [vars(s).copy() for s in self.spikes],
            "count": self.count,
            "max_factor": self.max_factor,
            "last_step": self.last_step,
            "peak": self.peak,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], th: GradientThresholds) -> SpikeWindow:
        return cls(
            window=deque((float(v) for v in state.get("window", [])), maxlen=th.spike_window),
            pending=[(Spike(**s), int(a)) for s, a in state.get("pending", [])],
            spikes=[Spike(**s) for s in state.get("spikes", [])],
            count=int(state.get("count", 0)),
            max_factor=float(state.get("max_factor", 0.0)),
            last_step=int(state.get("last_step", -1)),
            peak=float(state.get("peak", 0.0)),
        )


class SpikeRules(Rules):
    """``gradient_spikes`` from :class:`GradientTotals` (one window per optimizer), named by the batches of
    :class:`StepBatches`, causes ranked by the task of the latest :class:`BatchSample` or :class:`StepBatches`."""

    name = "spikes"

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self.windows: dict[int, SpikeWindow] = {}  # optimizer index -> its running-median window
        self.batches: dict[int, str] = {}  # step -> "epoch 0, batch 17", the last MAX_STEPS_PER_BATCH steps
        self.task = ""  # "classification", "regression" or "" (unknown): the latest batch's
        self.label_counts: dict[int, int] = {}  # label -> how often it was seen in training batches
        self.step_labels: dict[int, set[int]] = {}  # step -> the labels of its batch (recent steps only)

    def observe(self, flush: Flush) -> None:
        for sample in flush.of(BatchSample):
            self.task = sample.task or self.task
        for rec in flush.of(StepBatches):
            self.batches.update(rec.batches)
            self.task = rec.task or self.task
            self._count_labels(rec.labels)
        records = flush.of(GradientTotals)
        if records:
            self._judge(records)
        if self.batches:  # only the steps a later step may still look back to
            latest = max(self.batches)
            self.batches = {s: b for s, b in self.batches.items() if s >= latest - MAX_STEPS_PER_BATCH}
        pending = min((sp.step for w in self.windows.values() for sp, _ in w.pending), default=None)
        last = max(self.step_labels, default=0)
        oldest = min(pending if pending is not None else last, last - MAX_STEPS_PER_BATCH)
        self.step_labels = {s: v for s, v in self.step_labels.items() if s >= oldest}

    def _count_labels(self, labels: dict[int, tuple[tuple[int, int], ...]]) -> None:
        for step, counts in labels.items():
            self.step_labels.setdefault(step, set()).update(label for label, _ in counts)
            for label, n in counts:
                self.label_counts[label] = self.label_counts.get(label, 0) + n

    def rare_labels(self, step: int) -> set[int]:
        """The labels of ``step``'s batch that are rare among all labels seen so far."""
        th = self.ctx.thresholds.gradients
        total = sum(self.label_counts.values())
        labels = self.step_labels.get(step, set())
        return {label for label in labels if total and self.label_counts.get(label, 0) < th.rare_label_fraction * total}

    def _keep(self, spike: Spike) -> bool:
        """A spike of this run: above the run's scale, or (integer labels) in a batch holding a rare label."""
        th = self.ctx.thresholds.gradients
        return spike.over_run_scale >= th.spike_run_scale or bool(self.rare_labels(spike.step))

    def _judge(self, records: list[GradientTotals]) -> None:
        th = self.ctx.thresholds.gradients
        per_opt: dict[int, list[tuple[int, float]]] = {}
        for rec in records:
            for step, total, k in zip(rec.steps, rec.totals, rec.optimizers):
                per_opt.setdefault(k, []).append((step, total))
        several = len(self.ctx.run.optimizers) > 1 or len(set(per_opt) | set(self.windows)) > 1
        new: list[Spike] = []
        for k, series in sorted(per_opt.items()):
            name = self._optimizer_name(k) if several else ""
            window = self.windows.setdefault(k, SpikeWindow(window=deque(maxlen=th.spike_window)))
            new += window.update(sorted(series), functools.partial(self._where, optimizer=name), th, self._keep)
        if new:
            self._report(new)

    def _where(self, step: int, optimizer: str) -> str:
        """Where a spike of ``step`` came from: its batch, and the optimizer when there are several."""
        return ", ".join(filter(None, (self.batch_of(step), optimizer)))

    def batch_of(self, step: int) -> str:
        """The batch of ``step`` (``"epoch 0, batch 17"``), looking back to the step that started its batch."""
        for earlier in range(step, max(step - MAX_STEPS_PER_BATCH - 1, -1), -1):
            if earlier in self.batches:
                return self.batches[earlier]
        return ""

    def _optimizer_name(self, k: int) -> str:
        names = self.ctx.run.optimizers
        return f"optimizer {k} ({names[k]})" if k < len(names) else f"optimizer {k}"

    def _report(self, new: list[Spike]) -> None:
        """Report (first spike) or revise the one ``gradient_spikes`` finding over every optimizer's spikes."""
        th = self.ctx.thresholds.gradients
        listed = sorted((s for w in self.windows.values() for s in w.spikes), key=lambda s: s.step)
        listed = listed[: th.spike_max_listed]
        count = sum(w.count for w in self.windows.values())
        worst = max(listed, key=lambda s: s.factor)
        message = self._message(listed, count, worst)
        details = {
            "steps": [s.step for s in listed],
            "factors": [round(s.factor, 2) for s in listed],
            "batches": [s.batch for s in listed],
            "max_factor": worst.factor,
        }
        if self.log.get("gradient_spikes") is None:  # known when the first spike's fall-back was seen
            known = min(s.confirmed for s in new)
            self.log.report(
                "gradient_spikes", "warning", known, None, message, value=worst.factor, since=listed[0].step, **details
            )
        last = max(s.confirmed for s in new)
        self.log.revise("gradient_spikes", None, message, step=last, count=count, value=worst.factor, **details)

    def _message(self, listed: list[Spike], count: int, worst: Spike) -> str:
        th = self.ctx.thresholds.gradients
        items = "; ".join(
            f"step {s.step} ({s.batch + ', ' if s.batch else ''}{s.factor:.3g}x, norm {s.norm:.3g})"
            for s in listed[:_IN_MESSAGE]
        )
        more = f" and {count - _IN_MESSAGE} more" if count > _IN_MESSAGE else ""
        seen = (
            f"the total gradient norm spiked {count} time(s) to {th.spike_factor:.3g}x+ its running median and fell "
            f"back right after (worst {worst.factor:.3g}x at step {worst.step}, norm {worst.norm:.3g} vs median "
            f"{worst.median:.3g}; a clean run stays within {th.fallback_band:.3g}x): {items}{more}"
        )
        run = self.ctx.run
        if run.clip_val:
            clip = f"gradient_clip_val={run.clip_val:g}, gradient_clip_algorithm={run.clip_algorithm!r}"
            note = f"Clipping is on ({clip}), so the updates were bounded; the spikes still point at those batches."
        else:
            note = f"Nothing clips the gradients: {CLIP_FIX}."
        return compose("gradient_spikes", seen, causes=_CAUSES.get(self.task), note=note)

    def state_dict(self) -> dict[str, Any]:
        first = self.windows.get(0)
        others = {str(k): w.state_dict() for k, w in self.windows.items() if k != 0}
        return {
            "version": 1,
            "history": first.state_dict() if first is not None else {},
            "others": others,
            "batches": {str(s): b for s, b in self.batches.items()},
            "task": self.task,
            "label_counts": {str(k): n for k, n in self.label_counts.items()},
            "step_labels": {str(s): sorted(v) for s, v in self.step_labels.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        th = self.ctx.thresholds.gradients
        self.windows = {}
        if state.get("history"):
            self.windows[0] = SpikeWindow.from_state(state["history"], th)
        for k, w in state.get("others", {}).items():
            self.windows[int(k)] = SpikeWindow.from_state(w, th)
        self.batches = {int(s): str(b) for s, b in state.get("batches", {}).items()}
        self.task = str(state.get("task", ""))
        self.label_counts = {int(k): int(n) for k, n in state.get("label_counts", {}).items()}
        self.step_labels = {int(s): {int(x) for x in v} for s, v in state.get("step_labels", {}).items()}


__all__ = ["MAX_STEPS_PER_BATCH", "Spike", "SpikeRules", "SpikeWindow"]
