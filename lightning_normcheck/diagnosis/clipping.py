"""Rules: clipping on most steps (``high_clip_rate``).

Two verdicts, both under ``high_clip_rate``:

* from :class:`~lightning_normcheck.diagnosis.records.ClipWindow` (the clip tracker's window): clipped on more
  than ``high_rate`` of at least ``clip_min_steps`` steps and still on ``clip_recent`` of the latest ones.
  Info while the clipped norms sit within ``clip_warn_excess`` x the clip value (a mild LR change), an error
  when nearly every step is clipped (``clip_error_rate``) by ``clip_error_excess`` x or more, else a warning.
* a hint (info), from the total gradient norms of the first optimizer against the Trainer's norm clipping
  (``gradient_clip_val``, ``gradient_clip_algorithm="norm"``) over the last ``spike_window`` steps: clipping
  at least ``high_rate`` of them is a too-high learning rate in disguise. It is a finding of its own when
  none is there yet, else a sentence added once to the one there.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Diagnosis
    >>> from lightning_normcheck.diagnosis.records import ClipWindow
    >>> d = Diagnosis()
    >>> w = ClipWindow(step=29, threshold=1.0, algorithm="norm", rate=1.0, mean_excess=40.0, steps=30, recent=1.0,
    ...                window=50)
    >>> d.observe(29, [w])
    >>> f = d.log.get("high_clip_rate")
    >>> f.severity, f.step, f.since, "100%" in f.message
    ('error', 29, 0, True)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import ClipWindow, GradientTotals
from lightning_normcheck.diagnosis.registry import Severity, compose

#: The key of the hint in the finding's notes (added once).
HINT_KEY = "clipping_most"


class ClipRules(Rules):
    """``high_clip_rate`` from :class:`ClipWindow` records, and the clipping hint from :class:`GradientTotals`."""

    name = "clipping"

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self.recent: deque[tuple[int, float]] = deque()  # (step, total) of optimizer 0, the last spike_window

    def observe(self, flush: Flush) -> None:
        for window in flush.of(ClipWindow):
            self._clip_rate(window)
        totals = [pair for rec in flush.of(GradientTotals) for pair in rec.series(0)]
        if totals:
            maxlen = self.ctx.thresholds.gradients.spike_window
            self.recent = deque([*self.recent, *totals], maxlen=maxlen)
            self._hint(flush.step)

    # -- the clip tracker's window -------------------------------------------------------------------------
    def _clip_rate(self, w: ClipWindow) -> None:
        th = self.ctx.thresholds.clipping
        if not math.isfinite(w.rate):
            return
        if w.steps < min(w.window, th.clip_min_steps) or w.rate <= th.high_rate or w.recent < th.clip_recent:
            return
        self.log.report(
            "high_clip_rate", self._severity(w), w.step, None, self._message(w), value=w.rate, since=_start(w)
        )

    def _severity(self, w: ClipWindow) -> Severity:
        """Info while the clipped norms are near the clip value, an error when nearly every update is shrunk
        many times, else a warning."""
        th = self.ctx.thresholds.clipping
        excess = w.mean_excess
        if not math.isfinite(excess) or excess < th.clip_warn_excess:
            return "info"
        if w.rate >= th.clip_error_rate and excess >= th.clip_error_excess:
            return "error"
        return "warning"

    def _message(self, w: ClipWindow) -> str:
        th = self.ctx.thresholds.clipping
        measure = "max |gradient entry|" if w.algorithm == "value" else "total gradient norm"
        excess = w.mean_excess
        sgd = f"{1 / excess:.3g}" if excess > 0 else "?"
        seen = (
            f"gradients were clipped on {w.rate:.0%} of the last {w.steps} optimizer steps (threshold "
            f"{th.high_rate:.0%} over a window of up to {w.window}) and still on {w.recent:.0%} of the latest steps; "
            f"the pre-clip {measure} was on average {excess:.3g}x the clip value {w.threshold:.3g} on clipped steps "
            f"(~{excess * w.threshold:.3g}). Clipping on most steps is no longer a safety net: it rescales every "
            f"update (with SGD the effective LR is about {sgd}x the one you set; with Adam-like optimizers a "
            "constant rescale changes little, so the clip value is doing nothing useful)"
        )
        return compose("high_clip_rate", seen)

    # -- the hint from the gradient totals -----------------------------------------------------------------
    def _hint(self, step: int) -> None:
        """Norm clipping acts on most of the recent steps: lower the LR instead (info, or a sentence added)."""
        run, th = self.ctx.run, self.ctx.thresholds.clipping
        clip = run.clip_val
        if not clip or run.clip_algorithm != "norm" or len(self.recent) < th.clip_min_steps:
            return
        finite = [v for _, v in self.recent if math.isfinite(v)]
        if len(finite) < th.clip_min_steps:
            return
        rate = sum(v > clip for v in finite) / len(finite)
        if rate < th.high_rate:
            return
        seen = (
            f"Gradient clipping at {clip:.3g} acts on {100 * rate:.0f}% of the last {len(finite)} steps (median "
            f"pre-clip norm {statistics.median(finite):.3g}): clipping that often is a too-high learning rate in "
            "disguise"
        )
        fixes = ["lower the LR (or add warmup) rather than keep clipping"]
        message = compose("high_clip_rate", seen, causes=[], fixes=fixes)
        if self.log.get("high_clip_rate") is None:
            since = self.recent[0][0]
            self.log.report("high_clip_rate", "info", step, None, message, value=rate, since=since, notes=[HINT_KEY])
        else:
            self.log.annotate("high_clip_rate", None, HINT_KEY, message)

    def state_dict(self) -> dict[str, Any]:
        return {"version": 1, "recent": [[s, v] for s, v in self.recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        maxlen = self.ctx.thresholds.gradients.spike_window
        self.recent = deque(((int(s), float(v)) for s, v in state.get("recent", [])), maxlen=maxlen)


def _start(w: ClipWindow) -> int:
    """The first step of the window (the window ends at its logging step)."""
    return max(0, w.step - w.steps + 1)


__all__ = ["HINT_KEY", "ClipRules"]
