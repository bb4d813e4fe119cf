"""The overhead budget: NormCheck clocks its own time and stretches the per-layer sampling cadence to fit.

What is clocked (``time.perf_counter``, host time, no device sync): every Lightning hook of the callback (the
monitors' hooks through ``_call``, the logging-step flush) and every hook it places in the user's code (forward,
tensor-gradient and optimizer-step hooks, through ``_guard``), outermost call only. The step time is the wall time
between decisions (validation left out). Each batch's own time goes to one of two buckets: batches of sampled
steps and the others. The others give the cost NormCheck has on every step (the fused total-norm pass that
``normcheck/grad_norm/total`` needs, a few hook calls): it cannot be stretched and is not counted against the
budget. What a sampled batch costs beyond that is the per-layer part; the budget bounds its share of the step
time, averaged over steps.

On CUDA the clock sees the host side of the hooks (Python and kernel launches) and not the device time of their
kernels; the wait inside the one transfer per logging step (it also waits for the user's queued kernels) is left
out.

Decisions are made right after the flush of a sampled step, at points that follow from the schedule alone (never from a measured
value), so every rank reaches them together; under several processes rank zero's decision is broadcast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from lightning_normcheck.callbacks._run import EARLY_STEPS, _Run

#: Fewest batches a decision looks at (at ``log_every_n_steps=1`` the first comes at step 20 + 10).
MIN_WINDOW = 10
#: The longest stretched cadence, in optimizer steps (or the asked cadence when it is longer): per-layer
#: measurements at least this often, whatever they cost.
MAX_CADENCE = 1000
#: A stretch aims at this fraction of the budget, and the cadence comes back down only when the share falls
#: below ``LOWER_AT`` of the budget and the new cadence is at most half the current one: no oscillation.
AIM = 0.8
LOWER_AT = 0.4


class _Budget:
    """The clock and the cadence decisions of one fit of one callback."""

    __slots__ = (
        "limit",
        "clock",
        "host_only",
        "depth",
        "spent",
        "due",
        "batches",
        "by_due",
        "started",
        "window_start",
        "paused",
        "paused_at",
        "said",
        "last_share",
    )

    def __init__(self, limit: float, clock: Callable[[], float] = time.perf_counter, host_only: bool = False) -> None:
        self.limit = float(limit)
        self.clock = clock
        self.host_only = host_only  # CUDA: leave the transfer's wait out
        self.depth = 0  # > 0 while a clocked call runs (nested calls are counted by the outermost)
        self.spent = 0.0  # seconds inside the callback since the batch began
        self.due = False  # whether the current batch belongs to a sampled step
        self.batches = [0, 0]  # batches in the window: [others, sampled]
        self.by_due = [0.0, 0.0]  # seconds inside the callback in the window: [others, sampled]
        self.started = False
        self.window_start = 0.0
        self.paused = 0.0
        self.paused_at: float | None = None
        self.said = False
        self.last_share = 0.0

    # the clock -------------------------------------------------------------------------------------------------
    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, its time added to the batch's (when outermost)."""
        if self.depth:
            return fn(*args)
        self.depth = 1
        t0 = self.clock()
        try:
            return fn(*args)
        finally:
            self.spent += self.clock() - t0
            self.depth = 0

    def begin_batch(self, run: _Run) -> None:
        """At each ``on_train_batch_start``: close the last batch's time into its bucket, open this one's."""
        self.by_due[self.due] += self.spent
        self.spent = 0.0
        step = run.step
        if not self.started:
            if step < EARLY_STEPS:
                return
            self._open_window()
        self.due = run.is_due(step)
        self.batches[self.due] += 1

    def _open_window(self) -> None:
        self.started = True
        self.window_start = self.clock()
        self.batches = [0, 0]
        self.by_due = [0.0, 0.0]
        self.spent = 0.0
        self.paused = 0.0
        self.paused_at = None

    def pause(self) -> None:
        """Validation starts: its time is no training step's."""
        if self.started and self.paused_at is None:
            self.paused_at = self.clock()

    def resume(self) -> None:
        if self.paused_at is not None:
            self.paused += self.clock() - self.paused_at
            self.paused_at = None

    # decisions -------------------------------------------------------------------------------------------------
    def ready(self, run: _Run) -> bool:
        """Whether the flush just done is a decision point: the window is long enough and began under the current
        cadence. Follows from the schedule only, so every rank answers the same."""
        return (
            self.started
            and run.flush_step >= run.cadence_from
            and run.is_due(run.flush_step)
            and sum(self.batches) >= MIN_WINDOW
        )

    def proposal(self, run: _Run) -> int:
        """The cadence this window's times call for (the current one when they call for no change)."""
        self.by_due[self.due] += self.spent  # the flush just done belongs to this window
        self.spent = 0.0
        elapsed = self.clock() - self.window_start - self.paused
        (n_off, n_on), (s_off, s_on) = self.batches, self.by_due
        self._open_window()
        current, base = run.every, run.base_every
        if n_on == 0 or elapsed <= 0:
            return current
        every_step = s_off / n_off if n_off else 0.0  # all batches sampled: count all of it as the per-layer part
        extra = max(0.0, s_on / n_on - every_step)  # what a sampled batch costs beyond every batch's part
        share = extra * n_on / elapsed
        self.last_share = share
        rest = (elapsed - extra * n_on) / (n_on + n_off)  # a batch without the per-layer part
        if extra <= 0.0 or rest <= 0.0:
            return current
        # at a cadence of e steps the per-layer part costs extra / e per batch; its share of the step is at most
        # a = AIM * limit when extra / e <= a / (1 - a) * rest
        aim = AIM * self.limit
        needed = extra * (1.0 - aim) / (aim * rest)
        cap = max(base, MAX_CADENCE // base * base)
        target = min(cap, max(base, base * math.ceil(needed / base - 1e-9)))
        if share > self.limit and target > current:
            return target
        if share < LOWER_AT * self.limit and current > base and target <= current // 2:
            return target
        return current

    def state_dict(self, run: _Run | None) -> dict[str, Any]:
        return {"every": run.every, "base": run.base_every} if run is not None else {}
