"""Gradients over depth and over time: vanishing or exploding from the output layers to the input layers, and
geometric growth of the total norm.

Depth is judged on the per-layer norms of sampled steps (:class:`GradientLayers`), in forward order when the
activation sample of the step shows it, within each optimizer's own layers. Growth is judged on the total
norm of every optimizer step (:class:`GradientTotals`), one series per optimizer (a GAN's two optimizers
differ in scale by orders of magnitude), over a window whose minimum is the reference: a healthy run starts
high and falls, so the step-0 norm is none. A growth is reported once the next ``growth_fallback_steps`` steps
confirm it (they stay high, or the norm turns non-finite, or training raises): a growth that falls back
within them was a burst of bad batches and is only info (``gradient_spikes`` names the batches), and a burst in
the last steps of a fit, with no steps after it, is not settled as an explosion.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Context
    >>> from lightning_normcheck.diagnosis.findings import FindingLog
    >>> from lightning_normcheck.diagnosis.thresholds import Thresholds
    >>> rules = GradientRules(Context(Thresholds()), FindingLog())
    >>> climb = tuple(2.0 * 2.5**s for s in range(11))  # x2.5 per step: 610x by step 7, and on
    >>> rules.observe(Flush(10, (GradientTotals(steps=tuple(range(11)), totals=climb, optimizers=(0,) * 11),)))
    >>> f = rules.log.get("exploding_gradients")
    >>> f.severity, f.step, f.since, round(f.value), "2.50x per step" in f.message
    ('warning', 10, 0, 610, True)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.nonfinite import has_data_cause, has_nonfinite_finding, step_totals
from lightning_normcheck.diagnosis.records import (
    ROOT_LABEL,
    ActivationSample,
    GradientLayers,
    GradientTotals,
    LossSeries,
    TrainingError,
)
from lightning_normcheck.diagnosis.registry import CLIP_FIX, Severity, compose
from lightning_normcheck.diagnosis.thresholds import GradientThresholds

#: The depth ratio compares the median of the input-side third of the layers with the output-side third's.
_THIRDS = 3
#: Layers shown at each end of the per-layer list in a message.
_SHOWN = 3
#: The key of the depth history when one optimizer owns all the layers.
_ALL = "all"


def _fmt(v: float) -> str:
    return f"{v:.3g}"


# -- depth -------------------------------------------------------------------------------------------------
def execution_order(layers: Sequence[str], sample: ActivationSample | None) -> list[str]:
    """``layers`` in forward order when the activation sample covers them all (modules can be registered in
    another order than they run; the root's own parameters go first), else in registration order."""
    if sample is None:
        return list(layers)
    pos = {n: i for i, n in enumerate(sample.order)}
    if layers and all(n in pos for n in layers if n != ROOT_LABEL):
        return sorted(layers, key=lambda n: pos.get(n, -1))
    return list(layers)


def depth_chain(order: Iterable[str], norms: dict[str, float]) -> list[tuple[str, float]]:
    """The layers of ``order`` with a finite, non-zero gradient norm, input side first."""
    return [(n, norms[n]) for n in order if n in norms and math.isfinite(norms[n]) and norms[n] > 0]


def depth_ratio(chain: Sequence[tuple[str, float]]) -> float:
    """Median gradient norm of the input-side third of ``chain`` over the output-side third's."""
    k = max(1, len(chain) // _THIRDS)
    return statistics.median(v for _, v in chain[:k]) / statistics.median(v for _, v in chain[-k:])


def _shown(chain: Sequence[tuple[str, float]]) -> str:
    """The per-layer norms: all of them, or the input-side and output-side ends of a long chain."""
    ends = [chain] if len(chain) <= 2 * _SHOWN else [chain[:_SHOWN], chain[-_SHOWN:]]
    return " ... ".join(", ".join(f"{n} {_fmt(v)}" for n, v in part) for part in ends)


def depth_verdict(recent: Sequence[float], th: GradientThresholds) -> str:
    """``"vanishing"``, ``"exploding"`` or ``""`` for the latest depth ratios (all must agree)."""
    if len(recent) < th.grad_depth_samples:
        return ""
    if all(r <= th.grad_depth_ratio for r in recent):
        return "vanishing"
    if all(r >= 1.0 / th.grad_depth_ratio for r in recent):
        return "exploding"
    return ""


# -- growth over time ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Growth:
    """A geometric growth of the total norm over a window: from ``low`` at ``low_step`` to ``high``."""

    low: float
    low_step: int
    high: float
    high_step: int
    rises: int  # step-to-step increases from the low on
    changes: int  # step-to-step changes from the low on

    @property
    def factor(self) -> float:
        return self.high / self.low

    @property
    def per_step(self) -> float:
        return self.factor ** (1.0 / max(1, self.high_step - self.low_step))


def judged_series(series: Sequence[tuple[int, float]]) -> tuple[list[tuple[int, float]], bool]:
    """The steps before the first non-finite total, without zero totals (a step without gradients), and
    whether the whole series was finite."""
    bad = next((i for i, (_, v) in enumerate(series) if not math.isfinite(v)), len(series))
    return [(s, v) for s, v in series[:bad] if v > 0], bad == len(series)


def find_growth(series: Sequence[tuple[int, float]], th: GradientThresholds, scale: float = 0.0) -> Growth | None:
    """A growth of the total norm by ``grad_growth`` over the last ``grad_window`` steps that persists, rises
    on most steps and passes the run's start and ``scale``, the highest running median the run has shown
    (``series``: finite, positive totals in step order)."""
    window = series[-th.grad_window :]
    if len(window) < th.grad_min_steps:
        return None
    vals = [v for _, v in window]
    lo_i = min(range(len(vals)), key=lambda i: vals[i])
    lo = vals[lo_i]
    # the growth must persist: one high newest value (one bad batch) falls back and is a spike
    if lo <= 0 or lo_i >= len(vals) - th.grad_growth_persist:
        return None
    if any(v / lo < th.grad_growth for v in vals[-th.grad_growth_persist :]):
        return None
    tail = vals[lo_i:]
    rises = sum(1 for a, b in zip(tail, tail[1:]) if b > a)
    if rises < th.grad_growth_monotone * (len(tail) - 1):
        return None
    # against the early steps: a healthy run falls from a high start; only growth past it counts
    start_max = max(v for _, v in series[: th.grad_start_steps])
    hi = vals[-1]
    if hi < th.grad_start_factor * start_max and hi / lo < th.grad_growth * th.grad_start_factor:
        return None
    # against the scale the run has shown: a converged model's norm can jump 1000x from a collapsed level and
    # still stay below the level it had while it learned (a transformer classifier at 100% accuracy: 4e-4 ->
    # 0.5, its highest running median ~1); an explosion passes every level the run has had
    if hi < scale:
        return None
    return Growth(lo, window[lo_i][0], hi, window[-1][0], rises, len(tail) - 1)


def fell_back(series: Sequence[tuple[int, float]], since: int, low: float, th: GradientThresholds) -> float | None:
    """The latest total when the ``growth_fallback_steps`` finite steps after ``since`` have a median back
    within sqrt(grad_growth) of the growth's ``low`` (a burst, not a divergence), else ``None``."""
    after = [v for s, v in series if s > since]
    if len(after) < th.growth_fallback_steps or low <= 0:
        return None
    recent = after[-th.growth_fallback_steps :]
    if statistics.median(recent) >= math.sqrt(th.grad_growth) * low:
        return None
    return recent[-1]


def confirm_growth(raw: Sequence[tuple[int, float]], g: Growth, th: GradientThresholds) -> tuple[str, int]:
    """``("confirmed", step)`` when the ``growth_fallback_steps`` steps after the growth's peak stay high (their
    median at least sqrt(grad_growth) x the growth's low) or a later total is non-finite; ``("fell back",
    step)`` when they came back down; ``("", -1)`` while those steps are still to come (``raw``: the totals of
    one optimizer in step order, zero totals and non-finite ones included)."""
    after = [(s, v) for s, v in raw if s > g.high_step and v != 0.0]
    bad = next((s for s, v in after if not math.isfinite(v)), None)
    finite = [(s, v) for s, v in after if math.isfinite(v)][: th.growth_fallback_steps]
    if bad is not None and (len(finite) < th.growth_fallback_steps or bad <= finite[-1][0]):
        return "confirmed", bad
    if len(finite) < th.growth_fallback_steps:
        return "", -1
    high = statistics.median(v for _, v in finite) >= math.sqrt(th.grad_growth) * g.low
    return ("confirmed" if high else "fell back"), finite[-1][0]


def largest_layer(norms: dict[str, float]) -> str | None:
    """The layer with the largest finite gradient norm."""
    finite = {n: v for n, v in norms.items() if math.isfinite(v)}
    return max(finite, key=lambda n: finite[n]) if finite else None


# -- the rules ---------------------------------------------------------------------------------------------
class GradientRules(Rules):
    """Exploding/vanishing gradients over depth (sampled steps) and over time (every step, per optimizer)."""

    name = "gradients"
    VERSION = 1

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self._totals: dict[int, deque[tuple[int, float]]] = {}  # optimizer -> (step, total)
        self._depth: dict[str, deque[tuple[int, float]]] = {}  # layer group -> (step, depth ratio)
        self._groups: dict[int, list[str]] = {}  # optimizer -> the layers its gradients were seen in
        self._growth: dict[str, Any] = {}  # the reported growth: optimizer, low, step
        self._pending: dict[int, Growth] = {}  # optimizer -> a growth awaiting the steps that confirm it
        self._judged: dict[int, int] = {}  # optimizer -> the last step judged for a growth
        self._recent: dict[int, deque[float]] = {}  # optimizer -> its latest finite totals
        self._scale: dict[int, float] = {}  # optimizer -> the highest running median of its totals so far
        self._loss_start: float | None = None  # the lowest loss of the run's first steps
        self._loss_seen = 0
        self._losses: dict[int, float] = {}  # step -> loss, the latest grad_history steps

    @property
    def th(self) -> GradientThresholds:
        return self.ctx.thresholds.gradients

    def start(self) -> None:
        self._groups = {}  # optimizer indices are per fit

    def observe(self, flush: Flush) -> None:
        stepped: set[int] = set()
        for k, s, v in step_totals(flush.of(GradientTotals)):
            self._series(k).append((s, v))
            self._track_scale(k, v)
            stepped.add(k)
        for losses in flush.of(LossSeries):
            self._track_losses(losses)
        layers = flush.of(GradientLayers)
        self._remember_groups(layers)
        sample = flush.first(ActivationSample)
        for step in sorted({r.step for r in layers}):
            norms: dict[str, float] = {}
            for r in layers:
                if r.step == step:
                    norms.update(r.as_dict())
            self._judge_depth(step, norms, sample)
        latest = max((r.step for r in layers), default=flush.step)
        norms = {n: v for r in layers if r.step == latest for n, v in r.as_dict().items()}
        for k in sorted(stepped) or [0]:
            self._judge_growth(k, norms, latest)

    def _track_losses(self, losses: LossSeries) -> None:
        """The lowest loss of the run's first steps (where a divergence must climb back above), and the latest
        losses by step."""
        th = self.th
        for step, v in zip(losses.steps, losses.values):
            if self._loss_seen < th.grad_start_steps:
                self._loss_seen += 1
                if math.isfinite(v):
                    self._loss_start = v if self._loss_start is None else min(self._loss_start, v)
            self._losses[step] = v
        for step in sorted(self._losses)[: max(0, len(self._losses) - th.grad_history)]:
            del self._losses[step]

    def _diverging(self, g: Growth, at: int) -> bool:
        """Whether the loss during the growth says the run diverges: it climbed back to the level the run started
        at (``growth_loss_rise`` x its lowest first loss) or went non-finite. Without losses, the norms decide."""
        during = [v for s, v in self._losses.items() if g.low_step <= s <= at]
        if self._loss_start is None or not during:
            return True
        return any(not math.isfinite(v) or v >= self.th.growth_loss_rise * self._loss_start for v in during)

    def _track_scale(self, k: int, v: float) -> None:
        """The highest running median of optimizer ``k``'s totals over the whole run (the level it has shown)."""
        th = self.th
        recent = self._recent.setdefault(k, deque(maxlen=th.spike_window))
        if math.isfinite(v) and v > 0:
            recent.append(v)
        if len(recent) >= th.spike_min_history:
            self._scale[k] = max(self._scale.get(k, 0.0), statistics.median(recent))

    def _series(self, k: int) -> deque[tuple[int, float]]:
        return self._totals.setdefault(k, deque(maxlen=self.th.grad_history))

    def _remember_groups(self, records: Sequence[GradientLayers]) -> None:
        for r in records:
            group = self._groups.setdefault(r.optimizer, [])
            group.extend(n for n in r.layers if n not in group)

    # -- depth -------------------------------------------------------------------------------------------------
    def _judge_depth(self, step: int, norms: dict[str, float], sample: ActivationSample | None) -> None:
        known = list(self.ctx.run.layers) or [n for g in self._groups.values() for n in g]
        order = execution_order(list(dict.fromkeys(known)), sample)
        groups = {k: g for k, g in self._groups.items() if g}
        if len(groups) <= 1:
            self._depth_of(_ALL, step, depth_chain(order, norms))
            return
        for k, group in sorted(groups.items()):
            members = set(group)
            self._depth_of(str(k), step, depth_chain((n for n in order if n in members), norms))

    def _depth_of(self, key: str, step: int, chain: list[tuple[str, float]]) -> None:
        th = self.th
        if len(chain) < th.grad_depth_min_layers:
            return
        ratio = depth_ratio(chain)
        hist = self._depth.setdefault(key, deque(maxlen=th.grad_depth_samples))
        hist.append((step, ratio))
        verdict = depth_verdict([r for _, r in hist], th)
        if verdict == "vanishing":
            self._report_vanishing(chain, ratio, step, since=hist[0][0])
        elif verdict == "exploding" and not has_data_cause(self.log):
            self._report_depth_explosion(chain, ratio, step, since=hist[0][0])

    def _depth_seen(self, chain: Sequence[tuple[str, float]], ratio: float, threshold: str, healthy: str) -> str:
        return (
            f"the input-side layers' gradient norms are {_fmt(ratio)}x the output-side layers' (median of each"
            f" third of {len(chain)} layers; threshold {threshold}{healthy}) on {self.th.grad_depth_samples} sampled"
            f" steps in a row; per layer: {_shown(chain)}"
        )

    def _report_vanishing(self, chain: list[tuple[str, float]], ratio: float, step: int, since: int) -> None:
        th = self.th
        weakest = min(chain[: max(1, len(chain) // _THIRDS)], key=lambda x: x[1])[0]
        seen = "gradients vanish from the output layers to the input layers: " + self._depth_seen(
            chain, ratio, _fmt(th.grad_depth_ratio), ", healthy deep nets stay above ~0.05"
        )
        message = compose("vanishing_gradients", seen, where=f"`{weakest}` barely learns")
        severity: Severity = "error" if ratio <= th.grad_depth_ratio**2 else "warning"
        self.log.report("vanishing_gradients", severity, step, weakest, message, value=ratio, since=since)

    def _report_depth_explosion(self, chain: list[tuple[str, float]], ratio: float, step: int, since: int) -> None:
        th = self.th
        strongest = max(chain[: max(1, len(chain) // _THIRDS)], key=lambda x: x[1])[0]
        seen = "gradients explode from the output layers to the input layers: " + self._depth_seen(
            chain, ratio, _fmt(1 / th.grad_depth_ratio), ""
        )
        message = compose(
            "exploding_gradients",
            seen,
            where=f"The largest input-side gradient is in `{strongest}`",
            causes=(
                "init std too large (each layer multiplies the backward signal)",
                "depth without residual connections",
                "missing normalization",
                "no gradient clipping",
            ),
            fixes=(
                "init with std sqrt(2/fan_in) (ReLU) or 1/sqrt(fan_in)",
                "pre-norm residual blocks",
                CLIP_FIX,
            ),
        )
        severity: Severity = "error" if ratio >= th.grad_depth_ratio**-2 else "warning"
        self.log.report("exploding_gradients", severity, step, strongest, message, value=ratio, since=since)

    # -- growth ------------------------------------------------------------------------------------------------
    def _judge_growth(self, k: int, norms: dict[str, float], layers_step: int) -> None:
        raw = list(self._totals.get(k, ()))
        series, finite = judged_series(raw)
        known = self.log.get("exploding_gradients")
        if known is not None and known.severity != "info":
            if finite and self._growth.get("optimizer") == k:
                self._judge_fallback(series)
            return
        if has_data_cause(self.log):
            self._pending.pop(k, None)
            return
        growth = self._pending.get(k) or self._first_growth(k, series)
        if growth is None:
            return
        self._pending[k] = growth
        verdict, at = confirm_growth(raw, growth, self.th)
        if verdict:
            del self._pending[k]
            self._judged[k] = max(self._judged.get(k, -1), at)  # the steps up to here belong to this growth
        if verdict == "confirmed" and not self._diverging(growth, at):
            verdict = "fell back"  # the norm stayed up a few steps, but the loss stayed below where the run began
        if verdict == "confirmed":
            self._report_growth(k, growth, norms if growth.low_step <= layers_step <= at else {}, layers_step, at)
            if finite:
                self._judge_fallback(series)  # the steps after the confirming ones may show it fell back
        elif verdict == "fell back":
            self._report_burst(growth, at, series)

    def _first_growth(self, k: int, series: list[tuple[int, float]]) -> Growth | None:
        """The growth as of the first step since the last judgement at which it shows (the steps after it are
        then the ones that confirm it, even when a long logging interval delivers them all at once)."""
        done = self._judged.get(k, -1)
        self._judged[k] = series[-1][0] if series else done
        for i, (s, _) in enumerate(series):
            if s > done:
                growth = find_growth(series[: i + 1], self.th, self._scale.get(k, 0.0))
                if growth is not None:
                    return growth
        return None

    def explain(self, error: TrainingError) -> None:
        """Training raised while a growth awaited its confirming steps: the exception confirms it."""
        for k, growth in sorted(self._pending.items()):
            known = self.log.get("exploding_gradients")
            if (known is None or known.severity == "info") and not has_data_cause(self.log):
                self._report_growth(k, growth, {}, growth.high_step, known_at=error.step)
                if not has_nonfinite_finding(self.log):  # else the first non-finite value carries the exception
                    text = f"{error.type_name}: {error.text}" if error.text else error.type_name
                    sentence = (
                        f"Training then raised {text} at step {error.step}: most likely a consequence of this"
                        f" exploding gradients (seen from step {growth.low_step})."
                    )
                    self.log.annotate("exploding_gradients", None, "exception", sentence, exception=text)
        self._pending = {}

    def _report_burst(self, g: Growth, at: int, series: list[tuple[int, float]]) -> None:
        latest = next((v for s, v in reversed(series) if s <= at), g.high)
        seen = (
            f"the total gradient norm grew {_fmt(g.factor)}x (from {_fmt(g.low)} at step {g.low_step}) up to step"
            f" {g.high_step} and then fell back to {_fmt(latest)} within {self.th.growth_fallback_steps} steps:"
            " a burst, not a sustained explosion"
        )
        message = compose(
            "exploding_gradients",
            seen,
            causes=("a few bad batches in a row that knocked the weights (see gradient_spikes for the batches)",),
            fixes=("check those batches (gradient_spikes lists them)",),
        )
        self.log.report("exploding_gradients", "info", at, None, message, value=g.factor, since=g.low_step)

    def _report_growth(
        self, k: int, g: Growth, norms: dict[str, float], layers_step: int, known_at: int | None = None
    ) -> None:
        th = self.th
        which = f" of optimizer {k}" if len(self._totals) > 1 else ""
        seen = (
            f"the total gradient norm{which} grows geometrically: {_fmt(g.low)} at step {g.low_step} to"
            f" {_fmt(g.high)} at step {g.high_step} ({_fmt(g.factor)}x, about {g.per_step:.2f}x per step, rising on"
            f" {g.rises} of {g.changes} steps; threshold {_fmt(th.grad_growth)}x within {th.grad_window} steps):"
            " training is diverging"
        )
        top = largest_layer(norms)
        where = f"The largest per-layer gradient at step {layers_step} is in `{top}`" if top else ""
        message = compose("exploding_gradients", seen, where=where)
        severity: Severity = "error" if g.factor >= th.grad_growth**2 else "warning"
        self._growth = {"optimizer": k, "low": g.low, "step": g.high_step}
        self.log.report(
            "exploding_gradients",
            severity,
            g.high_step if known_at is None else known_at,
            None,
            message,
            value=g.factor,
            since=g.low_step,
            growth_from=g.low,
            growth_step=g.high_step,
            optimizer=k,
        )

    def _judge_fallback(self, series: list[tuple[int, float]]) -> None:
        """A reported growth whose norm came back down was a burst (a few bad batches in a row knock the
        weights and the next gradients are large too), not a divergence: the finding becomes info. A later
        real explosion escalates it again."""
        low, peak_step = float(self._growth.get("low", 0.0)), int(self._growth.get("step", -1))
        latest = fell_back(series, peak_step, low, self.th)
        f = self.log.get("exploding_gradients")
        if latest is None or f is None or has_nonfinite_finding(self.log):
            return
        seen = (
            f"the total gradient norm grew {_fmt(f.value or 0.0)}x (from {_fmt(low)}) up to step {peak_step} and then"
            f" fell back to {_fmt(latest)}: a burst, not a sustained explosion"
        )
        message = compose(
            "exploding_gradients",
            seen,
            causes=("a few bad batches in a row that knocked the weights (see gradient_spikes for the batches)",),
            fixes=("check those batches (gradient_spikes lists them)",),
            note=f"Earlier report: {f.message}",
        )
        self.log.downgrade("exploding_gradients", None, "info", message)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "totals": {str(k): [[s, v] for s, v in h] for k, h in self._totals.items()},
            "depth": {key: [[s, r] for s, r in h] for key, h in self._depth.items()},
            "groups": {str(k): list(g) for k, g in self._groups.items()},
            "growth": dict(self._growth),
            "judged": {str(k): s for k, s in self._judged.items()},
            "recent": {str(k): list(r) for k, r in self._recent.items()},
            "scale": {str(k): v for k, v in self._scale.items()},
            "loss_start": self._loss_start,
            "loss_seen": self._loss_seen,
            "losses": {str(s): v for s, v in self._losses.items()},
            "pending": {
                str(k): [g.low, g.low_step, g.high, g.high_step, g.rises, g.changes] for k, g in self._pending.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        th = self.th
        self._totals = {
            int(k): deque(((int(s), float(v)) for s, v in h), maxlen=th.grad_history)
            for k, h in state.get("totals", {}).items()
        }
        self._depth = {
            str(key): deque(((int(s), float(r)) for s, r in h), maxlen=th.grad_depth_samples)
            for key, h in state.get("depth", {}).items()
        }
        self._groups = {int(k): [str(n) for n in g] for k, g in state.get("groups", {}).items()}
        self._growth = dict(state.get("growth", {}))
        self._judged = {int(k): int(s) for k, s in state.get("judged", {}).items()}
        self._recent = {
            int(k): deque((float(v) for v in r), maxlen=th.spike_window) for k, r in state.get("recent", {}).items()
        }
        self._scale = {int(k): float(v) for k, v in state.get("scale", {}).items()}
        start = state.get("loss_start")
        self._loss_start = float(start) if start is not None else None
        self._loss_seen = int(state.get("loss_seen", 0))
        self._losses = {int(s): float(v) for s, v in state.get("losses", {}).items()}
        self._pending = {
            int(k): Growth(float(a), int(b), float(c), int(d), int(e), int(f))
            for k, (a, b, c, d, e, f) in state.get("pending", {}).items()
        }


__all__ = [
    "GradientRules",
    "Growth",
    "depth_chain",
    "depth_ratio",
    "depth_verdict",
    "confirm_growth",
    "execution_order",
    "fell_back",
    "find_growth",
    "judged_series",
    "largest_layer",
]
