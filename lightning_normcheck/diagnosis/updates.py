"""Optimizer steps that change nothing or far too much: ``zero_gradients`` and ``learning_rate_too_high``.

- ``zero_gradients`` (error): one optimizer steps ``zero_grad_steps`` times in a row while the total norm of its
  parameters' gradients is exactly 0 (every gradient zero or None): its weights never change. A skipped batch
  gives a single zero step between real ones; frozen parameters (grad None) are not in the total at all.
- ``learning_rate_too_high`` (warning, error when the damage is large): the median layer's update-to-weight
  ratio is far above what healthy runs show on ``lr_samples`` sampled steps (the first steps show it best: the
  ratio falls as the weights grow), together with the damage it does: the loss of the latest steps well above
  the first steps', or every layer's weights grown together. Named with the ratio, the LR and an LR to try.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Context
    >>> from lightning_normcheck.diagnosis.findings import FindingLog
    >>> from lightning_normcheck.diagnosis.records import GradientTotals
    >>> from lightning_normcheck.diagnosis.thresholds import Thresholds
    >>> rules = UpdateRules(Context(Thresholds()), FindingLog())
    >>> rules.observe(Flush(9, (GradientTotals(tuple(range(10)), (0.0,) * 10, (0,) * 10),)))
    >>> f = rules.log.get("zero_gradients")
    >>> f.severity, f.step, f.since
    ('error', 7, 0)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import GradientTotals, LossSeries, UpdateSample, WeightSample
from lightning_normcheck.diagnosis.registry import REGISTRY, Severity, compose
from lightning_normcheck.diagnosis.thresholds import UpdateThresholds

#: The loss steps kept for the damage check: the first ones of the fit and the latest ones.
_LOSS_KEPT = 64
#: Sampled steps with a high update ratio kept per optimizer (for the message).
_HIGH_KEPT = 16
#: Steps back for which a spike is remembered (a flush holds at most a logging interval of steps).
_SPIKES_KEPT = 1000


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def lr_to_try(lr: float, ratio: float, target: float) -> float:
    """An LR that brings the median update-to-weight ratio to ``target`` (the ratio scales with the LR)."""
    return lr * target / ratio if ratio > 0 else lr


def loss_rise(first: list[float], latest: list[float], steps: int) -> float | None:
    """The smallest of the latest ``steps`` losses over the smallest of the first ``steps`` (non-finite: inf; a
    too-high LR can already hurt the second step), or ``None`` while either end has fewer losses."""
    if len(first) < steps or len(latest) < steps:
        return None
    start = min(first[:steps])
    if not math.isfinite(start) or start <= 0:
        return None
    recent = [v if math.isfinite(v) else math.inf for v in latest[-steps:]]
    return min(recent) / start


def median_growth(sample: WeightSample) -> float | None:
    """The median over layers of the weight norm now over at the start of fit (``None`` without a start)."""
    if sample.start_norms is None:
        return None
    growth = [n / s if math.isfinite(n) else math.inf for n, s in zip(sample.norms, sample.start_norms) if s > 0]
    return statistics.median(growth) if growth else None


class UpdateRules(Rules):
    """Zero gradients on every step of a window; an update-to-weight ratio far too high, with its damage."""

    name = "updates"
    VERSION = 1

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self._zero_run: dict[int, list[int]] = {}  # optimizer -> [first zero step, steps in a row]
        self._first_losses: list[float] = []
        self._latest_losses: deque[float] = deque(maxlen=_LOSS_KEPT)
        self._high: dict[int, deque[tuple[int, float]]] = {}  # optimizer -> (step, median ratio) of samples
        self._growth: float | None = None
        self._recent: dict[int, deque[float]] = {}  # optimizer -> its latest total norms
        self._spikes: set[tuple[int, int]] = set()  # (optimizer, step) of recent steps whose total was a spike

    @property
    def th(self) -> UpdateThresholds:
        return self.ctx.thresholds.updates

    def start(self) -> None:
        self._zero_run = {}

    def observe(self, flush: Flush) -> None:
        for totals in flush.of(GradientTotals):
            for step, total, k in zip(totals.steps, totals.totals, totals.optimizers):
                self._zero_step(k, step, total)
                self._spike_step(k, step, total)
        for losses in flush.of(LossSeries):
            for v in losses.values:
                if len(self._first_losses) < _LOSS_KEPT:
                    self._first_losses.append(v)
                self._latest_losses.append(v)
        growth = [g for g in (median_growth(w) for w in flush.of(WeightSample)) if g is not None]
        self._growth = growth[-1] if growth else self._growth
        for u in flush.of(UpdateSample):
            self._judge_lr(u)

    # -- zero gradients ----------------------------------------------------------------------------------------
    def _zero_step(self, k: int, step: int, total: float) -> None:
        if total != 0.0:
            self._zero_run.pop(k, None)
            return
        run = self._zero_run.setdefault(k, [step, 0])
        run[1] += 1
        if run[1] == self.th.zero_grad_steps:
            self._report_zero(k, run[0], step)

    def _report_zero(self, k: int, first: int, step: int) -> None:
        names = self.ctx.run.optimizers
        which = f"optimizer {k} ({names[k]})" if k < len(names) else f"optimizer {k}"
        seen = (
            f"{which} stepped {self.th.zero_grad_steps} times in a row (steps {first}-{step}) while the total norm of"
            " its parameters' gradients was exactly 0 (every gradient zero or None): those steps change no weight"
            " (weight decay and momentum aside), so nothing learns"
        )
        self.log.report("zero_gradients", "error", step, None, compose("zero_gradients", seen), value=0.0, since=first)

    # -- learning rate too high ----------------------------------------------------------------------------
    def _spike_step(self, k: int, step: int, total: float) -> None:
        """Remember whether ``step``'s total norm was a spike against the previous ones (a bad batch makes a
        large update at any learning rate: that is gradient_spikes' story, not this one)."""
        g = self.ctx.thresholds.gradients
        recent = self._recent.setdefault(k, deque(maxlen=g.spike_window))
        if math.isfinite(total) and total > 0:
            if len(recent) >= g.spike_min_history and total > g.spike_factor * statistics.median(recent):
                self._spikes.add((k, step))
            recent.append(total)
        self._spikes = {(o, s) for o, s in self._spikes if s > step - _SPIKES_KEPT or o != k}

    def _judge_lr(self, u: UpdateSample) -> None:
        th = self.th
        ratios = [v for v in u.ratios if math.isfinite(v)]
        if not ratios or (u.optimizer, u.step) in self._spikes:
            return
        hist = self._high.setdefault(u.optimizer, deque(maxlen=_HIGH_KEPT))
        median = statistics.median(ratios)
        if median >= th.lr_update_ratio:
            hist.append((u.step, median))
        if len(hist) < th.lr_samples:
            return
        rise = loss_rise(self._first_losses, list(self._latest_losses), th.lr_loss_steps)
        grew = self._growth
        loss_damage = rise is not None and rise >= th.lr_loss_rise
        weight_damage = grew is not None and grew >= th.lr_weight_growth
        if loss_damage or weight_damage:
            worst = max(r for _, r in hist)
            self._report_lr(u, hist[0][0], worst, rise if loss_damage else None, grew if weight_damage else None)

    def _report_lr(self, u: UpdateSample, since: int, ratio: float, rise: float | None, grew: float | None) -> None:
        th = self.th
        damage = []
        if rise is not None:
            damage.append(f"the loss of the latest {th.lr_loss_steps} steps is {_fmt(rise)}x that of the first ones")
        if grew is not None:
            damage.append(f"the median layer's weight norm grew {_fmt(grew)}x since the start of fit")
        seen = (
            f"{u.optimizer_name} at lr={_fmt(u.lr)} moved the median layer by up to {_fmt(ratio)} of its weight norm in"
            f" one step (sampled steps from step {since} on; threshold {_fmt(th.lr_update_ratio)}, healthy runs stay"
            " below ~0.26 and ~1e-3 is the usual rule of thumb; the ratio falls as the weights grow), and it does"
            " damage: " + "; ".join(damage)
        )
        to_try = lr_to_try(u.lr, ratio, th.lr_target_ratio)
        fixes = (f"lower the learning rate to about {to_try:.1g} (it brings the ratio to ~{th.lr_target_ratio:g})",)
        message = compose("learning_rate_too_high", seen, fixes=fixes + REGISTRY["learning_rate_too_high"].fixes[1:])
        severe = (rise is not None and rise >= th.lr_loss_rise**2) or (
            grew is not None and grew >= th.lr_weight_growth**2
        )
        severity: Severity = "error" if severe else "warning"
        self.log.report("learning_rate_too_high", severity, u.step, None, message, value=ratio, since=since, lr=to_try)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "zero_run": {str(k): list(v) for k, v in self._zero_run.items()},
            "first_losses": list(self._first_losses),
            "latest_losses": list(self._latest_losses),
            "high": {str(k): [[s, r] for s, r in h] for k, h in self._high.items()},
            "growth": self._growth,
            "recent": {str(k): list(r) for k, r in self._recent.items()},
            "spikes": [[k, s] for k, s in sorted(self._spikes)],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._zero_run = {int(k): [int(a), int(b)] for k, (a, b) in state.get("zero_run", {}).items()}
        self._first_losses = [float(v) for v in state.get("first_losses", [])]
        self._latest_losses = deque((float(v) for v in state.get("latest_losses", [])), maxlen=_LOSS_KEPT)
        self._high = {
            int(k): deque(((int(s), float(r)) for s, r in h), maxlen=_HIGH_KEPT)
            for k, h in state.get("high", {}).items()
        }
        growth = state.get("growth")
        self._growth = float(growth) if growth is not None else None
        window = self.ctx.thresholds.gradients.spike_window
        self._recent = {int(k): deque((float(v) for v in r), maxlen=window) for k, r in state.get("recent", {}).items()}
        self._spikes = {(int(k), int(s)) for k, s in state.get("spikes", [])}


__all__ = ["UpdateRules", "loss_rise", "lr_to_try", "median_growth"]
