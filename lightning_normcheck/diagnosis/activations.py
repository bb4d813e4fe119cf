"""Rules: activation RMS over depth (with init advice from initialization) and over time, dead ReLUs,
saturated tanh/sigmoid units.

The rules read :class:`~lightning_normcheck.diagnosis.records.ActivationSample` records: the hooked modules'
output RMS in execution order, the model input's RMS, the dead and saturated fractions. A depth trend is
judged on the weight layers' outputs (the last one, the head, excluded: its scale is the targets'), led by
the input when its scale is sane; a drift compares a layer with its own oldest kept sample while the input
stays steady; dead and saturated units are judged over the monitor's window of sampled batches.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Context, Flush
    >>> from lightning_normcheck.diagnosis.findings import FindingLog
    >>> from lightning_normcheck.diagnosis.records import ActivationSample, ModuleStat
    >>> from lightning_normcheck.diagnosis.thresholds import Thresholds
    >>> mods = []
    >>> for i in range(6):  # every Linear multiplies the RMS by 3; the last one is the head
    ...     mods += [ModuleStat(f"l{i}", "Linear", "weight", 3.0 ** (i + 1)), ModuleStat(f"a{i}", "ReLU", "relu", 1.0)]
    >>> rules = ActivationRules(Context(Thresholds()), FindingLog())
    >>> rules.observe(Flush(0, (ActivationSample(0, tuple(mods), input_rms=1.0),)))
    >>> [(f.code, f.layer, f.severity, round(f.value)) for f in rules.log.findings]  # 3**5 over 5 steps
    [('exploding_activations', 'l4', 'warning', 243)]
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.init import init_message, layer_init_advice
from lightning_normcheck.diagnosis.records import INPUT_LABEL, ActivationSample, GradientLayers, ModuleStat
from lightning_normcheck.diagnosis.registry import CLIP_FIX, Severity, compose
from lightning_normcheck.diagnosis.thresholds import ActivationThresholds

Chain = list[tuple[str, float]]

#: Ranked causes and fixes of activations that explode with depth only after training started: the weights grew.
_GREW_CAUSES = (
    "learning rate too high (the weights grew: see weight_norm_growth and the gradient norms)",
    "no gradient clipping",
    "depth without normalization or residuals",
    "init std too large",
)
_GREW_FIXES = ("lower the LR or add warmup", CLIP_FIX, "add LayerNorm/BatchNorm")
_INIT_GRAD_CAUSES = ("init std too large", "depth without normalization", "no gradient clipping")
_INIT_GRAD_FIXES = (
    "re-initialize (std sqrt(2/fan_in) for ReLU/GELU, Xavier for tanh/sigmoid)",
    "add LayerNorm/BatchNorm",
    CLIP_FIX,
)
_DRIFT_UP = (
    ("learning rate too high (weights of this or earlier layers grow)", "no weight decay", "missing normalization"),
    ("lower the LR or add warmup", "add weight decay", "add LayerNorm before this layer", CLIP_FIX),
)
_DRIFT_DOWN = (
    ("dead ReLUs upstream", "learning rate too high knocked units off", "weight decay too strong"),
    ("lower the LR", "LeakyReLU/GELU", "add normalization before this layer"),
)


_DIRECTIONS: tuple[tuple[Literal["up", "down"], float], ...] = (("up", 1.0), ("down", -1.0))


def _g(v: float) -> str:
    return f"{v:.3g}"


# -- depth trend ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trend:
    """A geometric trend of RMS along a chain of layers.

    Attributes:
        direction: ``"up"`` (grows with depth) or ``"down"`` (shrinks).
        start: the chain index where it starts.
        end: the chain index where it ends.
        total: RMS at ``end`` over RMS at ``start``.
    """

    direction: Literal["up", "down"]
    start: int
    end: int
    total: float

    @property
    def per_layer(self) -> float:
        return self.total ** (1.0 / (self.end - self.start))


def weight_chain(sample: ActivationSample) -> Chain:
    """``(name, rms)`` of the weight layers' outputs in execution order, the last one (the head) left out: its
    output is the prediction, scaled by the targets, not by depth."""
    return [(m.name, m.rms) for m in sample.modules if m.kind == "weight"][:-1]


def _monotone_runs(logs: Sequence[float], sign: float) -> list[tuple[int, int]]:
    """The maximal runs ``(i, j)`` along which ``sign * log RMS`` never decreases."""
    runs, i, n = [], 0, len(logs)
    while i < n - 1:
        j = i
        while j < n - 1 and sign * (logs[j + 1] - logs[j]) >= 0.0:
            j += 1
        runs.append((i, j))
        i = max(j, i + 1)
    return runs


def _steepest(
    logs: Sequence[float], i: int, j: int, sign: float, th: ActivationThresholds
) -> tuple[int, int, float] | None:
    """The sub-run of ``[i, j]`` with the largest change that is steep enough on average and in all:
    ``(start, end, change)`` (the first one on a tie), or ``None``."""
    min_span = th.act_min_layers - 1
    step_log, total_log = math.log(th.act_step_ratio), math.log(th.act_total_ratio)
    best: tuple[int, int, float] | None = None
    for a in range(i, j - min_span + 1):
        for b in range(j, a + min_span - 1, -1):  # the longest first: the first that passes is the largest
            change = sign * (logs[b] - logs[a])
            if change < total_log or change < step_log * (b - a):
                continue
            if best is None or change > best[2]:
                best = (a, b, change)
            break
    return best


def depth_trend(chain: Sequence[tuple[str, float]], th: ActivationThresholds) -> Trend | None:
    """The strongest geometric trend along ``chain`` (RMS > 0): a run of ``act_min_layers``+ layers whose RMS
    never reverses, changes by at least ``act_step_ratio`` per layer on average and by ``act_total_ratio``
    in all; ``None`` when there is none. Growth is looked for first and wins a tie."""
    logs = [math.log(v) for _, v in chain]
    best: Trend | None = None
    for direction, sign in _DIRECTIONS:
        for i, j in _monotone_runs(logs, sign):
            found = _steepest(logs, i, j, sign, th)
            if found is not None and (best is None or found[2] > abs(math.log(best.total))):
                best = Trend(direction, found[0], found[1], math.exp(sign * found[2]))
    return best


def _trend_message(
    code: str, chain: Chain, trend: Trend, layer: str, when: str, init: str, grew: bool, th: ActivationThresholds
) -> str:
    """``grew``: the RMS explodes only since training started (the weights grew), not from initialization."""
    up = trend.direction == "up"
    shown = " -> ".join(f"{n} {_g(v)}" for n, v in chain[trend.start : trend.end + 1][:10])
    seen = (
        f"activation RMS {'grows' if up else 'shrinks'} geometrically with depth {when}: {shown} ({_g(trend.total)}x"
        f" over {trend.end - trend.start} layer-to-layer steps, about {trend.per_layer:.2f}x per step; threshold"
        f" {_g(th.act_total_ratio)}x over {th.act_min_layers}+ layers at {th.act_step_ratio}x+ per layer)"
    )
    where = f"Largest change ends at `{layer}`. {init}"
    return compose(code, seen, where=where, causes=_GREW_CAUSES if grew else None, fixes=_GREW_FIXES if grew else None)


# -- drift over time -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Drift:
    """A layer whose RMS moved far from its oldest kept sample.

    Attributes:
        layer: the layer.
        ratio: its RMS now over its RMS then.
        since: the step of that oldest sample.
        start: its RMS then.
        now: its RMS now.
    """

    layer: str
    ratio: float
    since: int
    start: float
    now: float


def layer_drift(
    name: str, history: Sequence[tuple[int, float]], input_now: float | None, th: ActivationThresholds
) -> Drift | None:
    """The drift of one layer from its ``(step, rms)`` history (oldest first), or ``None``: the latest
    ``act_time_samples`` samples all ``act_time_ratio``x from the oldest one (up or down), and the layer now
    ``act_time_vs_input``x the input RMS (up) or below ``act_time_below_input``x it (down)."""
    if len(history) < th.act_time_samples + 1:
        return None
    s0, v0 = history[0]
    recent = [v / v0 for _, v in history[-th.act_time_samples :]]
    vs_input = history[-1][1] / input_now if input_now is not None and input_now > 0 else 1.0
    up = all(r >= th.act_time_ratio for r in recent) and vs_input >= th.act_time_vs_input
    down = all(r <= 1.0 / th.act_time_ratio for r in recent) and vs_input <= th.act_time_below_input
    if not (up or down):
        return None
    return Drift(name, recent[-1], s0, v0, history[-1][1])


def _drift_message(code: str, d: Drift, step: int, input_drift: float, th: ActivationThresholds) -> str:
    up = d.ratio > 1
    causes, fixes = _DRIFT_UP if up else _DRIFT_DOWN
    seen = (
        f"the output RMS of `{d.layer}` {'grew' if up else 'shrank'} from {_g(d.start)} at step {d.since} to"
        f" {_g(d.now)} at step {step} ({_g(d.ratio)}x, on {th.act_time_samples} sampled steps in a row; threshold"
        f" {_g(th.act_time_ratio)}x) while the input RMS changed {input_drift:.2f}x"
    )
    return compose(code, seen, causes=causes, fixes=fixes)


# -- dead and saturated units --------------------------------------------------------------------------------
def feeder(modules: Sequence[ModuleStat], index: int) -> int | None:
    """The index of the weight layer nearest before ``modules[index]`` (the one that feeds it), if any."""
    return next((i for i in range(index - 1, -1, -1) if modules[i].kind == "weight"), None)


def saturation_severity(window: Sequence[float], head: bool, th: ActivationThresholds) -> Severity | None:
    """The verdict on a full window of saturated fractions: ``None`` when the mean is below
    ``saturated_fraction`` or one step is below ``saturated_floor`` of it; ``"info"`` for the output head
    (confident predictions saturate); else ``"error"`` from ``saturated_error`` on, ``"warning"`` below."""
    mean = sum(window) / len(window)
    if mean < th.saturated_fraction or min(window) < th.saturated_fraction * th.saturated_floor:
        return None
    if head:
        return "info"
    return "error" if mean >= th.saturated_error else "warning"


def _dead_message(m: ModuleStat, fed_by: str | None, samples: int, step: int, th: ActivationThresholds) -> str:
    src = f" (fed by `{fed_by}`)" if fed_by else ""
    seen = (
        f"{m.dead_window:.0%} of the units of `{m.name}`{src} never fired (output exactly 0 for every example) over"
        f" a window of {samples} sampled batches up to step {step} (threshold {th.dead_fraction:.0%}; healthy"
        " Kaiming ReLU nets stay under 25%). Dead ReLUs get no gradient and do not recover"
    )
    return compose("dead_units", seen)


def _saturation_message(
    name: str, mean: float, n: int, step: int, head: bool, init: str, th: ActivationThresholds
) -> str:
    seen = (
        f"{mean:.0%} of the outputs of `{name}` sit at its bounds (within 1% of the range) on average over {n}"
        f" sampled steps up to step {step} (threshold {th.saturated_fraction:.0%}; Xavier-initialized nets"
        " measure ~1%). Saturated units pass almost no gradient (derivative ~0)"
    )
    note = "It is the model's output layer, where confident predictions saturate: fine if intended." if head else ""
    return compose("saturated_activations", seen, where=init, note=note)


# -- the rules -----------------------------------------------------------------------------------------------
class ActivationRules(Rules):
    """Depth trends of activation RMS (with init advice from initialization), drift over time, dead ReLUs,
    saturated tanh/sigmoid units; and huge first gradients when activations explode from init."""

    name = "activations"
    VERSION = 1

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self._first_step = -1  # the step of the first judged sample (-1: none yet)
        self._rms: dict[str, deque[tuple[int, float]]] = {}  # per chain member, oldest first
        self._trend_end: dict[str, int] = {}  # code -> chain index where its first depth trend ended
        self._saturated: dict[str, list[tuple[int, float]]] = {}  # per bounded module, the last window
        self._sample_steps: list[int] = []  # the steps of the last sampled batches (the dead-unit window)

    @property
    def th(self) -> ActivationThresholds:
        return self.ctx.thresholds.activations

    def start(self) -> None:
        self._sample_steps = []  # the monitor's dead-unit window restarts with the fit

    def observe(self, flush: Flush) -> None:
        for sample in flush.of(ActivationSample):
            self._sample_steps = (self._sample_steps + [sample.step])[-max(1, sample.window) :]
            self._depth_and_drift(sample, flush)
            self._dead_units(sample)
            self._saturation(sample)

    # -- depth and drift ---------------------------------------------------------------------------------
    def _chain(self, sample: ActivationSample) -> Chain | None:
        """The chain a depth trend is judged on, or ``None`` when an RMS of it is not finite. Raw inputs
        (an input_scale warning) are a data problem reported by itself: a first layer that maps an input RMS
        of 1e3 to ~1 is no vanishing signal, so the chain then starts at the first layer."""
        chain = weight_chain(sample)
        if not chain or not all(math.isfinite(v) for _, v in chain):
            return None
        x = sample.input_rms
        if x is not None and math.isfinite(x) and x > 0 and not self.log.has("input_scale", at_least="warning"):
            chain = [(INPUT_LABEL, x), *chain]
        return [(n, max(v, self.th.rms_floor)) for n, v in chain]

    def _depth_and_drift(self, sample: ActivationSample, flush: Flush) -> None:
        chain = self._chain(sample)
        if chain is None:
            return
        first = self._first_step < 0
        if first:
            self._first_step = sample.step
        for n, v in chain:
            self._rms.setdefault(n, deque(maxlen=self.th.act_time_history)).append((sample.step, v))
        trend = depth_trend(chain, self.th)
        if trend is not None:
            self._report_trend(sample, flush, chain, trend, first)
        elif not first:
            self._drift(sample, chain)

    def _trend_layer(self, code: str, chain: Chain, end: int) -> str:
        """One finding per depth trend: later samples report to the layer where the first one ended (the end
        layer of a trend may wander from sample to sample)."""
        known = self._trend_end.setdefault(code, end)
        return chain[known][0] if known < len(chain) else chain[end][0]

    def _report_trend(self, sample: ActivationSample, flush: Flush, chain: Chain, trend: Trend, first: bool) -> None:
        up = trend.direction == "up"
        code = "exploding_activations" if up else "vanishing_activations"
        layer = self._trend_layer(code, chain, trend.end)
        reported = self.log.get(code, layer)
        at_init = sample.step == 0 or first or bool(reported is not None and reported.extra.get("at_init"))
        init = self._init_advice(sample.modules, "high" if up else "low") if at_init else ""
        when = "from the first forward pass (so from initialization)" if at_init else f"at step {sample.step}"
        if at_init and reported is not None:
            when += f" and still at step {sample.step}"
        error = abs(math.log10(trend.total)) >= 2 * math.log10(self.th.act_total_ratio)  # the threshold squared
        message = _trend_message(code, chain, trend, layer, when, init, up and not at_init, self.th)
        self.log.report(
            code, "error" if error else "warning", sample.step, layer, message, trend.total, at_init=at_init
        )
        if up and at_init:
            self._init_gradients(sample.step, flush, layer, init)

    def _drift(self, sample: ActivationSample, chain: Chain) -> None:
        """A layer's RMS vs its own oldest kept sample, with the input RMS steady; one story per code."""
        x_hist = self._rms.get(INPUT_LABEL, deque())
        input_drift = x_hist[-1][1] / x_hist[0][1] if len(x_hist) >= 2 and x_hist[0][1] > 0 else 1.0
        if not 1.0 / self.th.act_input_steady < input_drift < self.th.act_input_steady:
            return
        x_now = x_hist[-1][1] if x_hist else None
        worst: Drift | None = None
        for n, _ in chain:
            d = layer_drift(n, list(self._rms[n]), x_now, self.th) if n != INPUT_LABEL else None
            if d is not None and (worst is None or abs(math.log(d.ratio)) > abs(math.log(worst.ratio))):
                worst = d
        if worst is None:
            return
        code = "exploding_activations" if worst.ratio > 1 else "vanishing_activations"
        if any(f.layer != worst.layer for f in self.log.of(code)):
            return  # already reported (a depth trend or another layer): one story per code, not one per layer
        message = _drift_message(code, worst, sample.step, input_drift, self.th)
        self.log.report(code, "warning", sample.step, worst.layer, message, worst.ratio, since=worst.since)

    # -- init ----------------------------------------------------------------------------------------------
    def _init_advice(self, modules: Sequence[ModuleStat], direction: Literal["high", "low"]) -> str:
        """The init sentence for the weight layers of ``modules`` off in ``direction``, or ``""``."""
        if self.ctx.init is None:
            return ""
        return init_message(layer_init_advice(self.ctx.init, modules), direction, self.ctx.thresholds.init)

    def _init_gradients(self, step: int, flush: Flush, layer: str, init: str) -> None:
        """Activations that explode from init make the first gradients explode too: say so when they are huge
        (and neither a growth finding nor a data cause explains them already)."""
        th = self.ctx.thresholds.gradients
        total = flush_gradient_total(flush)
        if total < th.init_grad_norm or self.log.get("exploding_gradients") is not None:
            return
        if self.log.has("label_scale", "input_scale", at_least="warning"):
            return
        seen = (
            f"the total gradient norm is {_g(total)} at step {step} (threshold {_g(th.init_grad_norm)} together with"
            f" activations exploding with depth from initialization, ending at `{layer}`; healthy runs start at up"
            " to ~80 and fall). The first updates will be huge"
        )
        message = compose("exploding_gradients", seen, where=init, causes=_INIT_GRAD_CAUSES, fixes=_INIT_GRAD_FIXES)
        error = total >= th.init_grad_norm**2  # the threshold squared
        self.log.report(
            "exploding_gradients", "error" if error else "warning", step, None, message, total, at_init=True
        )

    # -- dead and saturated units ----------------------------------------------------------------------------
    def _dead_units(self, sample: ActivationSample) -> None:
        """ReLU units that never fired over a full window of sampled batches (one batch is not a window)."""
        if sample.window_samples < sample.window:
            return
        th, n = self.th, int(sample.window_samples)
        since = self._sample_steps[-n] if len(self._sample_steps) >= n else sample.step
        for i, m in enumerate(sample.modules):
            v = m.dead_window
            if v is None or not math.isfinite(v) or v < th.dead_fraction:
                continue
            src = feeder(sample.modules, i)
            message = _dead_message(m, sample.modules[src].name if src is not None else None, n, sample.step, th)
            sev: Severity = "error" if v >= th.dead_error else "warning"
            self.log.report("dead_units", sev, sample.step, m.name, message, v, since=since)

    def _saturation(self, sample: ActivationSample) -> None:
        """The mean saturated fraction over a full window of sampled steps; the output head only as info."""
        window = max(1, sample.window)
        last = sample.modules[-1].name if sample.modules else None
        for i, m in enumerate(sample.modules):
            if m.saturated is None or not math.isfinite(m.saturated):
                continue
            kept = self._saturated.setdefault(m.name, [])
            kept.append((sample.step, m.saturated))
            del kept[:-window]
            if len(kept) < window:
                continue
            values = [v for _, v in kept]
            head = m.name == last
            sev = saturation_severity(values, head, self.th)
            if sev is None:
                continue
            init = "" if head else self._init_before(sample.modules, i)
            mean = sum(values) / len(values)
            message = _saturation_message(m.name, mean, len(values), sample.step, head, init, self.th)
            self.log.report("saturated_activations", sev, sample.step, m.name, message, mean, since=kept[0][0])

    def _init_before(self, modules: Sequence[ModuleStat], index: int) -> str:
        """The init advice for the weight layer that feeds ``modules[index]`` when its gain is too high."""
        src = feeder(modules, index)
        return "" if src is None else self._init_advice(modules[src : index + 1], "high")

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "first_step": self._first_step,
            "rms": {n: [[s, v] for s, v in h] for n, h in self._rms.items()},
            "trend_end": dict(self._trend_end),
            "saturated": {n: [[s, v] for s, v in h] for n, h in self._saturated.items()},
            "sample_steps": list(self._sample_steps),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        maxlen = self.th.act_time_history
        self._first_step = int(state.get("first_step", self._first_step))
        rms = state.get("rms", {})
        self._rms = {n: deque(((int(s), float(v)) for s, v in h), maxlen=maxlen) for n, h in rms.items()}
        self._trend_end = {str(k): int(v) for k, v in state.get("trend_end", {}).items()}
        saturated = state.get("saturated", {})
        self._saturated = {n: [(int(s), float(v)) for s, v in h] for n, h in saturated.items()}
        self._sample_steps = [int(s) for s in state.get("sample_steps", [])]


def flush_gradient_total(flush: Flush) -> float:
    """The total gradient norm of the flush step, ``sqrt(sum of squares)`` over the finite per-layer norms of
    its :class:`GradientLayers` records (every optimizer's); the latest step's when none is of the flush step."""
    records = flush.of(GradientLayers)
    if not records:
        return 0.0
    steps = {r.step for r in records}
    step = flush.step if flush.step in steps else max(steps)
    norms: dict[str, float] = {}
    for r in records:
        if r.step == step:
            norms.update(r.as_dict())
    return math.sqrt(sum(v * v for v in norms.values() if math.isfinite(v)))


__all__ = [
    "ActivationRules",
    "Drift",
    "Trend",
    "depth_trend",
    "feeder",
    "flush_gradient_total",
    "layer_drift",
    "saturation_severity",
    "weight_chain",
]
