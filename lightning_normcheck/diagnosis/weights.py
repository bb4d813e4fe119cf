"""Rules: one layer's weights running away (``weight_norm_growth``), and large early updates with Adam.

* Growth: from :class:`~lightning_normcheck.diagnosis.records.WeightSample` records, each layer's weight norm
  now over its norm at the start of fit (the sample's ``start_norms``; without them, the layer's first
  sample), compared with the median layer's growth. A layer that grew ``weight_min_growth`` x or more and
  ``weight_relative_growth`` x the median's, on ``weight_samples`` sampled steps in a row, is reported
  (an error at the square of that relative threshold). Layers whose start norm is below ``weight_min_start``
  of the median start norm (zero-init) are left out; at least ``weight_min_layers`` layers are needed for a
  median to mean anything.
* Warm-up hint (info): from the first optimizer's :class:`~lightning_normcheck.diagnosis.records.UpdateSample`
  of the first ``early_steps`` steps: Adam/AdamW at its full LR (not warming up) whose median layer moves
  ``adam_update_ratio`` of its weight norm in one step. A finding of its own (layer ``None``) when none is there,
  else a sentence added once to it.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Diagnosis
    >>> from lightning_normcheck.diagnosis.records import WeightSample
    >>> d = Diagnosis()
    >>> for step, head in enumerate([3.0, 12.0, 30.0, 36.0]):
    ...     d.observe(step, [WeightSample(step, ("a", "b", "c", "head"), (3.0, 3.1, 2.9, head))])
    >>> f = d.log.get("weight_norm_growth", "head")
    >>> f.severity, f.step, f.since, round(f.value, 2)
    ('warning', 3, 2, 12.0)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import UpdateSample, WeightSample
from lightning_normcheck.diagnosis.registry import Severity, compose

#: The key of the warm-up hint in the finding's notes (added once).
WARMUP_KEY = "warmup"


class WeightRules(Rules):
    """``weight_norm_growth`` per layer from :class:`WeightSample`, the warm-up hint from :class:`UpdateSample`."""

    name = "weights"

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self.start_norms: dict[str, float] = {}  # layer -> its first sampled norm (the reference without start norms)
        self.relative: dict[str, deque[tuple[int, float]]] = {}  # layer -> (step, growth / median growth)

    def observe(self, flush: Flush) -> None:
        for sample in flush.of(WeightSample):
            self._growth(sample)
        for update in flush.of(UpdateSample):
            if update.optimizer == 0:
                self._warmup(update)

    # -- weight_norm_growth --------------------------------------------------------------------------------
    def _pairs(self, sample: WeightSample) -> dict[str, tuple[float, float]]:
        """layer -> (norm now, norm at the start), for the layers where both are finite."""
        now = dict(zip(sample.layers, sample.norms))
        for layer, norm in now.items():
            self.start_norms.setdefault(layer, norm)
        ref = dict(self.start_norms)
        if sample.start_norms is not None:
            ref.update(zip(sample.layers, sample.start_norms))
        return {n: (w, ref[n]) for n, w in now.items() if n in ref and math.isfinite(w) and math.isfinite(ref[n])}

    def _growth(self, sample: WeightSample) -> None:
        th = self.ctx.thresholds.weights
        pairs = self._pairs(sample)
        if len(pairs) < th.weight_min_layers:
            return
        med_start = statistics.median(r for _, r in pairs.values())
        growth = {n: w / r for n, (w, r) in pairs.items() if r > th.weight_min_start * med_start and r > 0}
        if len(growth) < th.weight_min_layers:
            return
        med = statistics.median(growth.values())
        for n, g in growth.items():
            rel = g / med if med > 0 else math.inf
            history = self.relative.setdefault(n, deque(maxlen=th.weight_samples))
            history.append((sample.step, rel))
            if len(history) < th.weight_samples or g < th.weight_min_growth:
                continue
            if all(x >= th.weight_relative_growth for _, x in history):
                self._report_growth(sample.step, history[0][0], n, pairs[n], g, med, rel)

    def _report_growth(
        self, step: int, since: int, layer: str, pair: tuple[float, float], g: float, med: float, rel: float
    ) -> None:
        th = self.ctx.thresholds.weights
        w, r = pair
        seen = (
            f"the weight norm of `{layer}` grew {g:.3g}x since the start of fit ({r:.3g} -> {w:.3g}) while the median"
            f" layer grew {med:.3g}x: {rel:.3g}x the median (threshold {th.weight_relative_growth:.3g}x relative, on"
            f" {th.weight_samples} sampled steps in a row)"
        )
        severity: Severity = "error" if rel >= th.weight_relative_growth**2 else "warning"
        self.log.report(
            "weight_norm_growth", severity, step, layer, compose("weight_norm_growth", seen), value=rel, since=since
        )

    # -- warm-up hint --------------------------------------------------------------------------------------
    def _warmup(self, u: UpdateSample) -> None:
        """Adam/AdamW at full LR from step 0 with large early updates: add a warm-up (info)."""
        th = self.ctx.thresholds.weights
        if u.step >= th.early_steps or u.warming_up or "adam" not in u.optimizer_name.lower():
            return
        finite = {n: v for n, v in u.as_dict().items() if math.isfinite(v)}
        if not finite:
            return
        median = statistics.median(finite.values())
        if median < th.adam_update_ratio:
            return
        layer, worst = max(finite.items(), key=lambda kv: kv[1])
        seen = (
            f"{u.optimizer_name} runs at its full LR ({u.lr:.3g}) from step 0 and the early updates are large: at "
            f"step {u.step} the median layer moves {median:.3g} of its weight norm in one step (largest {layer}: "
            f"{worst:.3g}; ~1e-3 is typical)"
        )
        message = compose(
            "weight_norm_growth",
            seen,
            causes=["Adam's first steps move every weight by ~lr before its variance estimates settle"],
            fixes=["add a linear LR warm-up over the first few hundred steps", "or lower the LR"],
        )
        if self.log.get("weight_norm_growth") is None:
            self.log.report("weight_norm_growth", "info", u.step, None, message, value=median, notes=[WARMUP_KEY])
        else:
            self.log.annotate("weight_norm_growth", None, WARMUP_KEY, message)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "start_norms": dict(self.start_norms),
            "relative": {n: [[s, v] for s, v in h] for n, h in self.relative.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        samples = self.ctx.thresholds.weights.weight_samples
        self.start_norms = {str(n): float(v) for n, v in state.get("start_norms", {}).items()}
        self.relative = {
            str(n): deque(((int(s), float(v)) for s, v in h), maxlen=samples)
            for n, h in state.get("relative", {}).items()
        }


__all__ = ["WARMUP_KEY", "WeightRules"]
