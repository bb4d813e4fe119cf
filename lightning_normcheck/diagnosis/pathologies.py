"""Norm pathologies: exploding/vanishing activations and gradients, non-finite values, dead and
saturated units, clipping on most steps, runaway weights.

Every check judges a *window* (several steps or several layers), never one number alone, and keeps
one finding per ``(code, layer)``: a repeat updates the finding, a worse one escalates it. Thresholds
live in :data:`THRESHOLDS` (a :class:`Thresholds`); change them there, e.g.
``lightning_normcheck.diagnosis.pathologies.THRESHOLDS.dead_fraction = 0.7``.

Example:
    >>> from lightning_normcheck.findings import FindingLog
    >>> log, hist = FindingLog(), GradientHistory()
    >>> diagnose_gradients(log, hist, [(0, 1.0), (1, float("nan"))], {}, 1, [])
    >>> [(f.code, f.step) for f in log.findings]
    [('nonfinite_gradients', 1)]
"""

from __future__ import annotations

import math
import re
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_normcheck.diagnosis.init import init_message, is_weight_layer, layer_init_advice
from lightning_normcheck.findings import SEVERITIES, FindingLog, Severity

INPUT_LABEL = "<input>"
NONFINITE_CODES = ("nonfinite_loss", "nonfinite_gradients")
#: Codes of helper diagnoses that explain a large gradient by the data: then no exploding_gradients.
DATA_CAUSES = ("label_scale", "input_scale")
#: Finite steps after a reported growth whose median must be back within sqrt(grad_growth) = 10x of the
#: growth's start for the finding to become info (a burst of bad batches, measured 200 -> 684 -> 4).
GROWTH_FALLBACK_STEPS = 3


@dataclass
class Thresholds:
    """Every threshold of the pathology checks, with where its default comes from."""

    # -- activations (judged over Linear/Conv outputs in execution order, plus the model input) ------
    #: Mean layer-to-layer RMS ratio of a geometric trend (the RMS must also never reverse along it).
    #: Kaiming-initialized nets measure 0.8-1.25 per layer; 1.3 compounds to 14x over 10 layers.
    act_step_ratio: float = 1.3
    #: Layers of one trend needed (3 ratios): one odd layer (a projection, the output head) is no trend.
    act_min_layers: int = 4
    #: Total RMS change along the trend: 50x, 5x beyond the ~10x that a default-init (gain 0.58) ReLU MLP
    #: with biases settles at, and far beyond the ~3x of healthy nets; a gain 1.8x too high over 6 layers.
    act_total_ratio: float = 50.0
    #: A layer's RMS vs its own first sample, with the input RMS steady: 100x over training is a drift,
    #: not learning (the healthy scenario runs measured at most 15x, a default-init MLP over 200 steps).
    act_time_ratio: float = 100.0

    # -- gradients ---------------------------------------------------------------------------------------
    #: Median grad norm of the input-side third of the layers vs the output-side third. Healthy pre-norm
    #: transformers differ by 20x (ratio ~0.06), the healthy scenario runs measured >= 0.03 (a CNN without
    #: BatchNorm); 1e-3 (three orders) is 30x beyond that.
    grad_depth_ratio: float = 1e-3
    #: Consecutive sampled steps the depth ratio must hold (a window, not one batch).
    grad_depth_samples: int = 2
    #: Steps of per-step total norms over which growth is judged (at most), and at least.
    grad_window: int = 10
    grad_min_steps: int = 4
    #: Total-norm growth over that window: 100x. Healthy runs start high (up to ~80) and fall; the
    #: step-0 norm is no reference, the window's minimum is.
    grad_growth: float = 100.0
    #: Fraction of the window's step-to-step changes that must be increases (geometric, not one spike).
    grad_growth_monotone: float = 0.7
    #: Total gradient norm at init that is reported as exploding, when activations also explode with depth
    #: from initialization: healthy runs start at up to ~80 and fall; 1e3 is 10x beyond.
    init_grad_norm: float = 1e3
    #: Non-finite gradient steps in a row before an AMP GradScaler run is flagged (it skips such steps
    #: and halves the scale; a few are normal, a run of them is not).
    amp_nonfinite_steps: int = 5

    # -- dead / saturated units ------------------------------------------------------------------------
    #: Fraction of a ReLU's units that never fired over the whole window (5 sampled batches by default).
    #: SageMaker's DeadRelu uses 50%; healthy Kaiming MLPs measure under 0.25 over 10 batches (0.37 in one
    #: batch) and a default-init CNN without BatchNorm 0.44 over 5, so 60%. Planted cases measure 90-100%.
    dead_fraction: float = 0.6
    #: Dead fraction that makes the finding an error: the layer has almost no capacity left.
    dead_error: float = 0.9
    #: Mean fraction of a tanh/sigmoid's outputs at its bounds over the window. Xavier-initialized tanh
    #: nets measure ~1% (a confident sigmoid output head 19%, and heads are exempt); half the outputs
    #: pinned means half the units pass no gradient.
    saturated_fraction: float = 0.5
    saturated_error: float = 0.9

    # -- clipping ----------------------------------------------------------------------------------------
    #: Minimum optimizer steps in the clip window before judging: 16 fits the dense early sampling
    #: (flushes up to step 18) and is past the ~10 steps a healthy step-0 gradient peak takes to fall.
    clip_min_steps: int = 16
    #: Mean pre-clip norm / threshold on clipped steps below which frequent clipping is only info: a
    #: clip value just under the typical norm is a mild LR change (a healthy Adam classifier clipped at 1.0
    #: measured 1.7-2.0x over 240 steps); 3x shrinks every SGD update to a third.
    clip_warn_excess: float = 3.0
    #: Mean pre-clip norm / threshold that makes a high clip rate an error (updates shrunk 10x).
    clip_error_excess: float = 10.0

    # -- weights -----------------------------------------------------------------------------------------
    #: A layer's weight-norm growth (now / start) vs the median layer's: about 5x is suspicious (a CNN
    #: head may grow 2.3x early in a healthy run while the others stay flat; healthy scenario runs <= 2.2x).
    weight_relative_growth: float = 5.0
    #: ...and the layer itself must have grown at least this much (not a tiny layer moving a little).
    weight_min_growth: float = 3.0
    #: Layers with a start norm below this fraction of the median start norm are skipped (zero-init).
    weight_min_start: float = 0.05


THRESHOLDS = Thresholds()

_LIKELY_CAUSES = (
    "learning rate too high",
    "init std too large/small",
    "no gradient clipping",
    "depth without residual connections",
    "missing or misplaced normalization",
    "loss or label scale",
    "long sequences",
)


class _History:
    """A bounded history of host floats; saved with checkpoints."""

    maxlen = 200

    def __init__(self) -> None:
        self.values: dict[str, deque[tuple[int, float]]] = {}

    def add(self, key: str, step: int, value: float) -> None:
        self.values.setdefault(key, deque(maxlen=self.maxlen)).append((step, value))

    def get(self, key: str) -> list[tuple[int, float]]:
        return list(self.values.get(key, ()))

    def state_dict(self) -> dict[str, Any]:
        return {k: list(v) for k, v in self.values.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = {k: deque([tuple(x) for x in v], maxlen=self.maxlen) for k, v in state.items()}  # type: ignore[misc]


class GradientHistory(_History):
    """Per-step total gradient norms and per-sample depth ratios."""


class ActivationHistory(_History):
    """Per-sample activation RMS, dead and saturated fractions."""


class WeightHistory(_History):
    """Per-sample weight growth per layer."""


class ClipHistory(_History):
    """Per-flush clip rates."""


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def _has_nonfinite_finding(findings: FindingLog) -> bool:
    return any(f.code in NONFINITE_CODES for f in findings.findings) or any(
        f.code == "exploding_activations" and f.extra.get("nonfinite") for f in findings.findings
    )


def _has_data_cause(findings: FindingLog) -> bool:
    return any(f.code in DATA_CAUSES and f.severity != "info" for f in findings.findings)


# ---------------------------------------------------------------------------------------------------------
# non-finite values
# ---------------------------------------------------------------------------------------------------------
def diagnose_nonfinite(
    findings: FindingLog,
    history: GradientHistory,
    totals: list[tuple[int, float]],
    values: dict[str, float],
    step: int,
    amp_scaler: bool = False,
    th: Thresholds | None = None,
) -> None:
    """Report the FIRST non-finite value of the run (loss, gradient or activation), once.

    Args:
        findings: the log.
        history: the gradient history (for AMP runs: the run of non-finite steps).
        totals: ``(step, total gradient norm)`` of every optimizer step of this flush.
        values: the flushed host values; ``_nonfinite_loss_step`` (first step whose loss was not
            finite, or -1), ``_nonfinite_loss_value`` and ``normcheck/act_rms/<module>`` in execution order.
        step: the flush step.
        amp_scaler: a GradScaler is active (fp16): it skips non-finite steps by design.
        th: thresholds (default :data:`THRESHOLDS`).
    """
    th = th or THRESHOLDS
    if _has_nonfinite_finding(findings):
        return
    loss_step = int(values.get("_nonfinite_loss_step", -1.0))
    loss_value = values.get("_nonfinite_loss_value", math.nan)
    grad_step, grad_value = -1, math.nan
    run = 0
    for s, v in totals:
        if math.isfinite(v):
            run = 0
            continue
        run += 1
        if amp_scaler and run < th.amp_nonfinite_steps:
            continue
        grad_step, grad_value = (s - run + 1 if amp_scaler else s), v
        break
    act_rms = [(k[len("normcheck/act_rms/") :], v) for k, v in values.items() if k.startswith("normcheck/act_rms/")]
    bad_acts = [name for name, v in act_rms if not math.isfinite(v)]
    # the activation sample belongs to the flush step (hooks run on the sampled step only)
    first_act = next((n for n in bad_acts if n != INPUT_LABEL), None)
    input_bad = INPUT_LABEL in bad_acts

    if loss_step >= 0 and (grad_step < 0 or loss_step <= grad_step):
        where = ""
        layer = None
        if input_bad and loss_step == step:
            where = " The model input itself is already non-finite: check the data (NaN in features, division by a zero std)."
        elif first_act is not None and loss_step == step:
            layer = first_act
            where = (
                f" The first module whose output is non-finite (in execution order) is `{first_act}`:"
                " that is where the value overflowed or a NaN was produced."
            )
        elif loss_step == step and act_rms:
            where = (
                " Every module output was finite at that step: the NaN/inf arose in the loss computation itself"
                " (log/sqrt/division of the prediction, or non-finite labels)."
            )
        else:
            where = " Activations were not sampled at that step, so the module that produced it is not known."
        diverged = "learning rate too high (the run diverged: look for growing gradient norms before it)"
        in_loss = "a log/sqrt/division of a value that reached 0 or below in the loss, or bad labels"
        if layer is not None:
            causes = (
                f"an overflow in `{layer}` (its weights or inputs too large: init std or learning rate), a division"
                f" by ~0 or log of 0 inside it, fp16 range, {diverged}"
            )
        elif loss_step == 0 or "loss computation" in where:  # nothing had time to diverge
            causes = f"{in_loss}, init std too large, fp16 overflow, {diverged}"
        else:
            causes = f"{diverged}, init std too large, {in_loss}, fp16 overflow"
        findings.report(
            "nonfinite_loss",
            "error",
            loss_step,
            layer,
            f"the loss became {_fmt(loss_value)} at step {loss_step} (the first non-finite value of the run;"
            f" later steps are not reported again).{where} Likely causes, most likely first: {causes}. What to"
            " try: lower the LR or add warmup, clip gradients (gradient_clip_val=1.0), add an eps to log/sqrt/"
            "divisions, and run with Trainer(detect_anomaly=True) to find the op.",
            value=loss_value,
            module=layer,
        )
        return
    if grad_step >= 0:
        layer_vals = {
            k[len("normcheck/grad_norm/") :]: v
            for k, v in values.items()
            if k.startswith("normcheck/grad_norm/") and k != "normcheck/grad_norm/total"
        }
        bad_layers = [n for n, v in layer_vals.items() if not math.isfinite(v)] if grad_step == step else []
        layer = None
        if bad_layers and len(bad_layers) < len(layer_vals):
            layer = bad_layers[-1]  # backward reaches the output-side layers first
            where = f" Non-finite in {len(bad_layers)} of {len(layer_vals)} layers: {', '.join(bad_layers[:6])}."
        elif bad_layers:
            where = (
                " Every layer's gradient is non-finite: the NaN/inf starts in the backward of the loss or of the"
                " output layer."
            )
        else:
            where = ""
        amp = " (the AMP GradScaler skipped these steps but the overflow did not stop)" if amp_scaler else ""
        findings.report(
            "nonfinite_gradients",
            "error",
            grad_step,
            layer,
            f"the total gradient norm became {_fmt(grad_value)} at step {grad_step} while the loss was still"
            f" finite{amp} (the first non-finite value of the run; later steps are not reported again).{where}"
            " Likely causes, most likely first: an op whose derivative is infinite at the point it is used"
            " (sqrt or norm of 0, log of 0, pow with a fractional exponent of 0, division by ~0), gradient"
            " overflow after exploding gradients (learning rate too high, no clipping), fp16 overflow. What to"
            " try: add an eps (torch.sqrt(x + 1e-12)), clamp before log/division, clip gradients"
            " (gradient_clip_val=1.0), and run Trainer(detect_anomaly=True) to name the op.",
            value=grad_value,
        )
        return
    if first_act is not None or input_bad:
        name = INPUT_LABEL if input_bad else first_act
        findings.report(
            "exploding_activations",
            "error",
            step,
            None if input_bad else name,
            f"the output of `{name}` is non-finite at step {step} (the first module in execution order with"
            " an inf/NaN output) while the loss is still finite. Likely causes: an overflow in that module"
            " (weights or inputs too large), a division by ~0 or log of 0 inside it, fp16 range. What to try:"
            " lower the LR, check that layer's init, add normalization before it, add an eps.",
            value=math.inf,
            nonfinite=True,
        )


# ---------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------
def diagnose_gradients(
    findings: FindingLog,
    history: GradientHistory,
    totals: list[tuple[int, float]],
    layers: dict[str, float],
    step: int,
    layer_names: list[str],
    values: dict[str, float] | None = None,
    amp_scaler: bool = False,
    th: Thresholds | None = None,
    optimizer_of_step: dict[int, int] | None = None,
    layer_groups: list[list[str]] | None = None,
) -> None:
    """Exploding/vanishing gradients (over depth and over time) and the first non-finite value.

    Args:
        findings: the log.
        history: the gradient history.
        totals: ``(step, total norm)`` of every optimizer step since the last flush.
        layers: per-layer gradient norms of the flush step (layer label to norm).
        step: the flush step.
        layer_names: the model's layers in parameter-registration order (``""`` is the root).
        values: every flushed host value (for the loss and activation checks).
        amp_scaler: a GradScaler is active.
        th: thresholds (default :data:`THRESHOLDS`).
        optimizer_of_step: which optimizer (0, 1, ...) stepped at each step (several optimizers, e.g. a
            GAN: each gets its own series, growth is never judged across them).
        layer_groups: the layers of each optimizer (depth trends are judged within one group).
    """
    th = th or THRESHOLDS
    diagnose_nonfinite(findings, history, totals, values if values is not None else {}, step, amp_scaler, th)
    of_step = optimizer_of_step or {}
    merged: dict[tuple[int, int], float] = {}
    for s, v in totals:  # one series per optimizer; same step and optimizer twice: one norm of both
        key = (of_step.get(s, 0), s)
        merged[key] = math.hypot(merged[key], v) if key in merged else v
    keys = set()
    for (k, s), v in merged.items():
        keys.add(k)
        history.add("total" if k == 0 else f"total/{k}", s, v)
    order = _execution_order(layer_names, values or {})
    groups = [g for g in (layer_groups or []) if g]
    if len(groups) <= 1:
        _gradient_depth(findings, history, layers, step, order, th)
    else:
        for gi, group in enumerate(groups):
            members = set(group)
            sub = [n for n in order if (n or "<root>") in members]
            _gradient_depth(findings, history, layers, step, sub, th, key=f"depth_ratio/{gi}")
    for k in sorted(keys) or [0]:
        _gradient_growth(findings, history, layers, step, th, key="total" if k == 0 else f"total/{k}")


def _execution_order(layer_names: list[str], values: dict[str, float]) -> list[str]:
    """Layers in forward order when the activation sample of this step covers them all (modules can be
    registered in another order than they run), else in registration order."""
    prefix = "normcheck/act_rms/"
    pos = {k[len(prefix) :]: i for i, k in enumerate(k for k in values if k.startswith(prefix))}
    if layer_names and all(n in pos for n in layer_names if n):
        return sorted(layer_names, key=lambda n: pos.get(n, -1))
    return layer_names


def _gradient_depth(
    findings: FindingLog,
    history: GradientHistory,
    layers: dict[str, float],
    step: int,
    layer_names: list[str],
    th: Thresholds,
    key: str = "depth_ratio",
) -> None:
    order = [n or "<root>" for n in layer_names]
    chain = [(n, layers[n]) for n in order if n in layers and math.isfinite(layers[n]) and layers[n] > 0]
    if len(chain) < 4:
        return
    k = max(1, len(chain) // 3)
    first = statistics.median(v for _, v in chain[:k])
    last = statistics.median(v for _, v in chain[-k:])
    ratio = first / last
    history.add(key, step, ratio)
    recent = [r for _, r in history.get(key)[-th.grad_depth_samples :]]
    if len(recent) < th.grad_depth_samples:
        return
    shown = (
        ", ".join(f"{n} {_fmt(v)}" for n, v in chain[:3]) + " ... " + ", ".join(f"{n} {_fmt(v)}" for n, v in chain[-3:])
    )
    if all(r <= th.grad_depth_ratio for r in recent):
        weakest = min(chain[:k], key=lambda x: x[1])
        findings.report(
            "vanishing_gradients",
            "error" if ratio <= th.grad_depth_ratio**2 else "warning",
            step,
            weakest[0],
            f"gradients vanish from the output layers to the input layers: the input-side layers' gradient"
            f" norms are {_fmt(ratio)}x the output-side layers' (median of each third of {len(chain)} layers;"
            f" threshold {_fmt(th.grad_depth_ratio)}, healthy deep nets stay above ~0.05) on"
            f" {len(recent)} sampled steps in a row; per layer: {shown}. `{weakest[0]}` barely learns."
            " Likely causes, most likely first: saturating activations (sigmoid/tanh) in a deep stack, depth"
            " without residual connections, init std too small, missing normalization. What to try: ReLU/GELU"
            " with Kaiming init (std sqrt(2/fan_in)), add residual connections and pre-norm LayerNorm/"
            "BatchNorm, or fewer layers.",
            value=ratio,
        )
    elif all(r >= 1.0 / th.grad_depth_ratio for r in recent) and not _has_data_cause(findings):
        strongest = max(chain[:k], key=lambda x: x[1])
        findings.report(
            "exploding_gradients",
            "error" if ratio >= th.grad_depth_ratio**-2 else "warning",
            step,
            strongest[0],
            f"gradients explode from the output layers to the input layers: the input-side layers' gradient"
            f" norms are {_fmt(ratio)}x the output-side layers' (median of each third of {len(chain)} layers;"
            f" threshold {_fmt(1 / th.grad_depth_ratio)}) on {len(recent)} sampled steps in a row; per layer:"
            f" {shown}. Likely causes, most likely first: init std too large (each layer multiplies the"
            " backward signal), depth without residual connections, missing normalization, no gradient"
            " clipping. What to try: init with std sqrt(2/fan_in) (ReLU) or 1/sqrt(fan_in), pre-norm residual"
            " blocks, clip gradients at 1.0.",
            value=ratio,
        )


def _gradient_growth(
    findings: FindingLog,
    history: GradientHistory,
    layers: dict[str, float],
    step: int,
    th: Thresholds,
    key: str = "total",
) -> None:
    series = history.get(key)
    bad = next((i for i, (_, v) in enumerate(series) if not math.isfinite(v)), len(series))
    finite = bad == len(series)
    series = series[:bad]  # judge the steps before the first non-finite value
    series = [(s, v) for s, v in series if v > 0]  # a zero total is a step without gradients (skipped batch)
    window = series[-th.grad_window :]
    known = findings.get("exploding_gradients")
    if known is not None and known.severity != "info":
        if finite and known.extra.get("growth_key") == key:
            _growth_fell_back(findings, known, series, th)
        return
    if len(window) < th.grad_min_steps or _has_data_cause(findings):
        return
    vals = [v for _, v in window]
    lo_i = min(range(len(vals)), key=lambda i: vals[i])
    lo, hi = vals[lo_i], vals[-1]
    if lo <= 0 or hi / lo < th.grad_growth or lo_i >= len(vals) - 2:
        return
    # the growth must persist: the step before the last is past the threshold too. A single high newest
    # value (one bad batch) falls back on the next step and is a gradient spike, not an explosion; a real
    # geometric explosion is only one step later past it.
    if vals[-2] / lo < th.grad_growth:
        return
    tail = vals[lo_i:]
    ups = sum(1 for a, b in zip(tail, tail[1:]) if b > a)
    if ups < th.grad_growth_monotone * (len(tail) - 1):
        return
    # against the early steps: a healthy run falls from a high start; only growth past it counts
    start_max = max(v for _, v in series[:3])
    if hi < 10.0 * start_max and hi / lo < th.grad_growth * 10:
        return
    s_lo, s_hi = window[lo_i][0], window[-1][0]
    per_step = (hi / lo) ** (1.0 / max(1, s_hi - s_lo))
    top = max(layers.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else -1.0)[0] if layers else None
    where = f" The largest per-layer gradient at step {step} is in `{top}`." if top else ""
    findings.report(
        "exploding_gradients",
        "error" if hi / lo >= th.grad_growth**2 else "warning",
        s_lo,
        None,
        f"the total gradient norm grows geometrically: {_fmt(lo)} at step {s_lo} to {_fmt(hi)} at step {s_hi}"
        f" ({_fmt(hi / lo)}x, about {per_step:.2f}x per step, rising on {ups} of {len(tail) - 1} steps;"
        f" threshold {_fmt(th.grad_growth)}x within {th.grad_window} steps).{where} Training is diverging."
        " Likely causes, most likely first: learning rate too high, no gradient clipping, no warmup, loss or"
        " label scale, init std too large. What to try: lower the LR (e.g. 10x) or add warmup, clip"
        " gradients (gradient_clip_val=1.0), normalize the targets.",
        value=hi / lo,
        growth_key=key,
        growth_from=lo,
        growth_step=s_hi,
    )


def _growth_fell_back(findings: FindingLog, f: Any, series: list[tuple[int, float]], th: Thresholds) -> None:
    """A growth finding whose norm came back down (finite, within 10x of where it grew from) on the next
    :data:`GROWTH_FALLBACK_STEPS` steps was a burst (a few bad batches in a row knock the weights and the
    next steps' gradients are large too), not a divergence: the finding becomes info; gradient_spikes
    tells the story. A later real explosion escalates it again."""
    after = [v for s, v in series if s > f.extra.get("growth_step", math.inf)]
    lo = float(f.extra.get("growth_from", 0.0))
    if len(after) < GROWTH_FALLBACK_STEPS or lo <= 0 or _has_nonfinite_finding(findings):
        return
    recent = after[-GROWTH_FALLBACK_STEPS:]
    if statistics.median(recent) >= math.sqrt(th.grad_growth) * lo:
        return
    f.severity = "info"
    f.message = (
        f"the total gradient norm grew {_fmt(f.value or 0.0)}x (from {_fmt(lo)}) up to step"
        f" {f.extra.get('growth_step')} and then fell back to {_fmt(recent[-1])}: a burst, not a sustained"
        f" explosion (see gradient_spikes for the batches). Earlier report: {f.message}"
    )


# ---------------------------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------------------------
def _trend_segments(chain: list[tuple[str, float]], th: Thresholds) -> tuple[str, int, int, float] | None:
    """The strongest geometric trend along ``chain``: a run of 4+ layers whose RMS never reverses, changes
    by at least ``act_step_ratio`` per layer on average and by ``act_total_ratio`` in all."""
    logs = [math.log(v) for _, v in chain]
    best: tuple[str, int, int, float] | None = None
    n = len(chain)
    min_span = th.act_min_layers - 1
    step_log = math.log(th.act_step_ratio)
    total_log = math.log(th.act_total_ratio)
    for direction, sign in (("up", 1.0), ("down", -1.0)):
        i = 0
        while i < n - 1:
            j = i  # extend while the RMS does not reverse direction
            while j < n - 1 and sign * (logs[j + 1] - logs[j]) >= 0.0:
                j += 1
            # the strongest sub-run of [i, j] that is steep enough on average
            for a in range(i, j - min_span + 1):
                for b in range(j, a + min_span - 1, -1):
                    change = sign * (logs[b] - logs[a])
                    if change < total_log or change < step_log * (b - a):
                        continue
                    if best is None or change > abs(math.log(best[3])):
                        best = (direction, a, b, math.exp(sign * change))
                    break
            i = max(j, i + 1)
    return best


def diagnose_activations(
    findings: FindingLog,
    history: ActivationHistory,
    values: dict[str, float],
    order: list[str],
    modules: dict[str, nn.Module],
    step: int,
    window: int = 5,
    th: Thresholds | None = None,
) -> None:
    """Depth trends of activation RMS (with init advice at step 0), drift over time, dead and saturated units.

    Args:
        findings: the log.
        history: the activation history.
        values: flushed host values (``normcheck/act_rms/*``, ``_dead_window/*``, ``_window_samples``,
            ``normcheck/saturated_frac/*``).
        order: hooked module names in execution order.
        modules: hooked module name to module.
        step: the flush (and sampled) step.
        window: sampled steps over which dead and saturated units are judged.
        th: thresholds (default :data:`THRESHOLDS`).
    """
    th = th or THRESHOLDS
    rms = {n: values[f"normcheck/act_rms/{n}"] for n in order if f"normcheck/act_rms/{n}" in values}
    if any(not math.isfinite(v) for v in rms.values()):
        # normally the gradient monitor already reported the first non-finite value; alone, say it here
        diagnose_nonfinite(findings, GradientHistory(), [], values, step, th=th)
    if rms:
        _activation_depth(findings, history, rms, values, order, modules, step, th)
    _dead_units(findings, history, values, order, modules, step, window, th)
    _saturation(findings, history, values, order, step, window, th, modules)


def _activation_depth(
    findings: FindingLog,
    history: ActivationHistory,
    rms: dict[str, float],
    values: dict[str, float],
    order: list[str],
    modules: dict[str, nn.Module],
    step: int,
    th: Thresholds,
) -> None:
    x_rms = values.get(f"normcheck/act_rms/{INPUT_LABEL}")
    chain = [(n, rms[n]) for n in order if n in rms and is_weight_layer(modules[n])]
    # the last weight layer is the head: its output is the prediction, scaled by the targets, not by depth
    chain = chain[:-1]
    if not chain or not all(math.isfinite(v) for _, v in chain):
        return
    input_ok = x_rms is not None and math.isfinite(x_rms) and x_rms > 0
    # raw, unscaled inputs (an input_scale warning) are a data problem reported by itself: a first layer
    # that maps an input RMS of 1e3 to ~1 is no vanishing signal, so the chain starts at the first layer
    raw_input = any(f.code == "input_scale" and f.severity != "info" for f in findings.findings)
    if input_ok and not raw_input:
        chain = [(INPUT_LABEL, float(x_rms))] + chain  # type: ignore[arg-type]
    chain = [(n, max(v, 1e-30)) for n, v in chain]
    first_sample = "act_first_step" not in history.values
    if first_sample:
        history.add("act_first_step", step, float(step))
    for n, v in chain:
        history.add(f"rms/{n}", step, v)

    trend = _trend_segments(chain, th)
    if trend is not None:
        direction, i, j, total = trend
        code = "exploding_activations" if direction == "up" else "vanishing_activations"
        layer = chain[j][0]
        # one finding per depth trend: later samples update the first one (its end layer may wander)
        known = history.get(f"trend_layer/{code}")
        if known:
            layer = chain[int(known[0][1])][0] if int(known[0][1]) < len(chain) else layer
        else:
            history.add(f"trend_layer/{code}", step, float(j))
        per_layer = total ** (1.0 / (j - i))
        shown = " -> ".join(f"{n} {_fmt(v)}" for n, v in chain[i : j + 1][:10])
        init = ""
        reported = findings.get(code, layer)
        at_init = step == 0 or first_sample or bool(reported is not None and reported.extra.get("at_init"))
        if at_init:
            init = init_message(layer_init_advice(modules, order), "high" if direction == "up" else "low")
        grow = "grows" if direction == "up" else "shrinks"
        sev: Severity = "error" if abs(math.log10(total)) >= 2 * math.log10(th.act_total_ratio) else "warning"
        where = "from the first forward pass (so from initialization)" if at_init else f"at step {step}"
        if at_init and reported is not None:
            where += f" and still at step {step}"
        if direction == "up" and not at_init:  # it appeared during training: the weights grew
            causes = (
                "learning rate too high (the weights grew: see weight_norm_growth and the gradient norms), no"
                " gradient clipping, depth without normalization or residuals, init std too large"
            )
            fix = "lower the LR or add warmup, clip gradients (gradient_clip_val=1.0), add LayerNorm/BatchNorm"
        elif direction == "up":
            causes = (
                "init std too large for the activation that follows (weight std x sqrt(fan_in) above its"
                " Kaiming/Xavier value), depth without normalization or residuals, learning rate too high"
                " (weights grew)"
            )
            fix = "re-initialize (std sqrt(2/fan_in) for ReLU/GELU, Xavier for tanh/sigmoid), add LayerNorm/BatchNorm"
        else:
            causes = (
                "init std too small for the activation that follows (weight std x sqrt(fan_in) below its"
                " Kaiming/Xavier value), depth without normalization or residuals, dead ReLUs"
            )
            fix = "re-initialize (std sqrt(2/fan_in) for ReLU/GELU, Xavier for tanh/sigmoid), add LayerNorm/BatchNorm or residual connections"
        findings.report(
            code,
            sev,
            step,
            layer,
            f"activation RMS {grow} geometrically with depth {where}: {shown} ({_fmt(total)}x over"
            f" {j - i} layer-to-layer steps, about {per_layer:.2f}x per step; threshold {_fmt(th.act_total_ratio)}x over"
            f" {th.act_min_layers}+ layers at {th.act_step_ratio}x+ per layer). Largest change ends at"
            f" `{layer}`.{init} Likely causes, most likely first: {causes}. What to try: {fix}.",
            value=total,
            at_init=at_init,
        )
        if direction == "up" and at_init:
            _init_gradients(findings, values, step, layer, init, th)
        return
    if first_sample:
        return
    # drift over time: a layer's RMS vs its own first sample, the input steady
    x_hist = history.get(f"rms/{INPUT_LABEL}")
    input_drift = x_hist[-1][1] / x_hist[0][1] if len(x_hist) >= 2 and x_hist[0][1] > 0 else 1.0
    if not 0.1 < input_drift < 10.0:
        return
    worst: tuple[str, float, int, float, float] | None = None
    for n, _ in chain:
        if n == INPUT_LABEL:
            continue
        h = history.get(f"rms/{n}")
        if len(h) < 3:
            continue
        s0, v0 = h[0]
        recent = [v / v0 for _, v in h[-2:]]
        vs_input = h[-1][1] / x_hist[-1][1] if x_hist and x_hist[-1][1] > 0 else 1.0
        # grown 100x AND now 10x the input (not a recovery from a vanished start), or the mirror image
        up = all(r >= th.act_time_ratio for r in recent) and vs_input >= 10.0
        down = all(r <= 1.0 / th.act_time_ratio for r in recent) and vs_input <= 0.01
        if up or down:
            if worst is None or abs(math.log(recent[-1])) > abs(math.log(worst[1])):
                worst = (n, recent[-1], s0, v0, h[-1][1])
    if worst is None:
        return
    n, r, s0, v0, v1 = worst
    up = r > 1
    existing = [f for f in findings.findings if f.code == ("exploding_activations" if up else "vanishing_activations")]
    if any(f.layer != n for f in existing):
        return  # already reported (a depth trend or another layer): one story per code, not one per layer
    findings.report(
        "exploding_activations" if up else "vanishing_activations",
        "warning",
        step,
        n,
        f"the output RMS of `{n}` {'grew' if up else 'shrank'} from {_fmt(v0)} at step {s0} to {_fmt(v1)} at"
        f" step {step} ({_fmt(r)}x, on 2 sampled steps in a row; threshold {_fmt(th.act_time_ratio)}x) while"
        f" the input RMS changed {input_drift:.2f}x. Likely causes, most likely first: "
        + (
            "learning rate too high (weights of this or earlier layers grow), no weight decay, missing"
            " normalization. What to try: lower the LR or add warmup, add weight decay, add LayerNorm before"
            " this layer, clip gradients at 1.0."
            if up
            else "dead ReLUs upstream, learning rate too high knocked units off, weight decay too strong."
            " What to try: lower the LR, LeakyReLU/GELU, add normalization before this layer."
        ),
        value=r,
    )


def _init_gradients(
    findings: FindingLog, values: dict[str, float], step: int, layer: str, init: str, th: Thresholds
) -> None:
    """Activations that explode from init make the first gradients explode too: say so when they are huge."""
    prefix = "normcheck/grad_norm/"
    layers = [v for k, v in values.items() if k.startswith(prefix) and k != prefix + "total" and math.isfinite(v)]
    total = math.sqrt(sum(v * v for v in layers)) if layers else 0.0
    if total < th.init_grad_norm or findings.get("exploding_gradients") or _has_data_cause(findings):
        return
    findings.report(
        "exploding_gradients",
        "error" if total >= th.init_grad_norm**2 else "warning",
        step,
        None,
        f"the total gradient norm is {_fmt(total)} at step {step} (threshold {_fmt(th.init_grad_norm)} together with"
        f" activations exploding with depth from initialization, ending at `{layer}`; healthy runs start at up to"
        f" ~80 and fall). The first updates will be huge.{init} Likely causes, most likely first: init std too large,"
        " depth without normalization, no gradient clipping. What to try: re-initialize (std sqrt(2/fan_in) for"
        " ReLU/GELU, Xavier for tanh/sigmoid), add LayerNorm/BatchNorm, clip gradients (gradient_clip_val=1.0).",
        value=total,
        at_init=True,
    )


def _dead_units(
    findings: FindingLog,
    history: ActivationHistory,
    values: dict[str, float],
    order: list[str],
    modules: dict[str, nn.Module],
    step: int,
    window: int,
    th: Thresholds,
) -> None:
    samples = values.get("_window_samples", 0.0)
    if samples < window:
        return  # judged on full windows only: one batch is not a window
    for n in order:
        v = values.get(f"_dead_window/{n}")
        if v is None or not math.isfinite(v):
            continue
        history.add(f"dead/{n}", step, v)
        if v < th.dead_fraction:
            continue
        prev = next(
            (p for p in reversed(order[: order.index(n)]) if is_weight_layer(modules.get(p, nn.Identity()))), None
        )
        src = f" (fed by `{prev}`)" if prev else ""
        findings.report(
            "dead_units",
            "error" if v >= th.dead_error else "warning",
            step,
            n,
            f"{v:.0%} of the units of `{n}`{src} never fired (output exactly 0 for every example) over a window"
            f" of {int(samples)} sampled batches up to step {step} (threshold {th.dead_fraction:.0%}; healthy"
            " Kaiming ReLU nets stay under 25%). Dead ReLUs get no gradient and do not recover. Likely causes,"
            " most likely first: learning rate too high (a large update pushed the pre-activations negative),"
            " a negative bias or bad init of the layer before it, inputs not normalized, missing"
            " normalization. What to try: lower the LR or add warmup, init the layer before with Kaiming"
            " (std sqrt(2/fan_in)) and zero bias, use LeakyReLU/GELU, add BatchNorm/LayerNorm before the ReLU.",
            value=v,
        )


def _saturation(
    findings: FindingLog,
    history: ActivationHistory,
    values: dict[str, float],
    order: list[str],
    step: int,
    window: int,
    th: Thresholds,
    modules: dict[str, nn.Module] | None = None,
) -> None:
    present = [n for n in order if f"normcheck/saturated_frac/{n}" in values]
    if not present:
        return
    last_module = order[-1] if order else None
    for n in present:
        v = values[f"normcheck/saturated_frac/{n}"]
        if not math.isfinite(v):
            continue
        history.add(f"sat/{n}", step, v)
        h = [x for _, x in history.get(f"sat/{n}")[-window:]]
        if len(h) < window:
            continue
        mean = sum(h) / len(h)
        if mean < th.saturated_fraction or min(h) < th.saturated_fraction / 2:
            continue
        output = n == last_module  # a sigmoid/tanh output head saturates when it is confident: expected
        sev: Severity = "info" if output else ("error" if mean >= th.saturated_error else "warning")
        known = findings.get("saturated_activations", n)
        init = ""
        if not output and modules and (known is None or SEVERITIES.index(sev) > SEVERITIES.index(known.severity)):
            init = _init_before(n, order, modules)  # only when the message is (re)written: it reads the weights
        findings.report(
            "saturated_activations",
            sev,
            step,
            n,
            f"{mean:.0%} of the outputs of `{n}` sit at its bounds (within 1% of the range) on average over"
            f" {len(h)} sampled steps up to step {step} (threshold {th.saturated_fraction:.0%}; Xavier-initialized"
            " nets measure ~1%)."
            + (
                " It is the model's output layer, where confident predictions saturate: fine if intended."
                if output
                else ""
            )
            + " Saturated units pass almost no gradient (derivative ~0). Likely causes, most likely first: init"
            " std too large for tanh/sigmoid (pre-activations far from 0), inputs not normalized, learning rate"
            " too high, missing normalization. What to try: Xavier init (std sqrt(2/(fan_in+fan_out))), normalize"
            " the inputs, add LayerNorm before the activation, lower the LR, or switch to ReLU/GELU." + init,
            value=mean,
        )


def _init_before(name: str, order: list[str], modules: dict[str, nn.Module]) -> str:
    """The init advice for the weight layer that feeds activation ``name`` when its gain is too high, else ""."""
    if name not in order:
        return ""
    end = order.index(name)
    start = next(
        (i for i in range(end - 1, -1, -1) if order[i] in modules and is_weight_layer(modules[order[i]])), None
    )
    if start is None:
        return ""
    return init_message(layer_init_advice(modules, order[start : end + 1]), "high")


# ---------------------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------------------
def diagnose_weights(
    findings: FindingLog, history: WeightHistory, values: dict[str, float], step: int, th: Thresholds | None = None
) -> None:
    """One layer's weight norm growing far beyond the other layers' (judged on 2 sampled steps in a row).

    Args:
        findings: the log.
        history: the weight history.
        values: flushed host values: ``normcheck/weight_norm/<layer>`` and ``_weight_ref/<layer>`` (the
            start-of-fit norm).
        step: the flush step.
        th: thresholds (default :data:`THRESHOLDS`).
    """
    th = th or THRESHOLDS
    prefix = "normcheck/weight_norm/"
    now = {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}
    ref = {k[len("_weight_ref/") :]: v for k, v in values.items() if k.startswith("_weight_ref/")}
    for n, v in now.items():  # without a start-of-fit reference (track_drift=False): the first sample
        if not history.get(f"start/{n}"):
            history.add(f"start/{n}", step, v)
        ref.setdefault(n, history.get(f"start/{n}")[0][1])
    pairs = {n: (now[n], ref[n]) for n in now if n in ref and math.isfinite(now[n]) and math.isfinite(ref[n])}
    if len(pairs) < 3:
        return
    med_start = statistics.median(r for _, r in pairs.values())
    growth = {n: w / r for n, (w, r) in pairs.items() if r > th.weight_min_start * med_start and r > 0}
    if len(growth) < 3:
        return
    med = statistics.median(growth.values())
    for n, g in growth.items():
        rel = g / med if med > 0 else math.inf
        history.add(f"rel/{n}", step, rel)
        recent = [x for _, x in history.get(f"rel/{n}")[-2:]]
        if len(recent) < 2 or g < th.weight_min_growth or not all(x >= th.weight_relative_growth for x in recent):
            continue
        w, r = pairs[n]
        findings.report(
            "weight_norm_growth",
            "error" if rel >= th.weight_relative_growth**2 else "warning",
            step,
            n,
            f"the weight norm of `{n}` grew {_fmt(g)}x since the start of fit ({_fmt(r)} -> {_fmt(w)}) while the"
            f" median layer grew {_fmt(med)}x: {_fmt(rel)}x the median (threshold {_fmt(th.weight_relative_growth)}x"
            " relative, on 2 sampled steps in a row). Likely causes, most likely first: a learning rate too high"
            " for this layer (its own param group or LR multiplier), no weight decay with Adam, an accumulation or"
            " double-step bug scaling its updates, no gradient clipping. What to try: lower this layer's LR, add"
            " weight decay (AdamW, e.g. 0.01), clip gradients at 1.0, add a normalization after this layer.",
            value=rel,
        )


# ---------------------------------------------------------------------------------------------------------
# clipping
# ---------------------------------------------------------------------------------------------------------
def diagnose_clipping(
    findings: FindingLog,
    history: ClipHistory,
    values: dict[str, float],
    step: int,
    threshold: float | None,
    algorithm: str,
    high_rate: float,
    window: int,
    th: Thresholds | None = None,
) -> None:
    """Clipping active on most steps of a window, and still active on the latest steps.

    Args:
        findings: the log.
        history: the clip history.
        values: ``normcheck/clip/rate``, ``normcheck/clip/mean_excess``, ``_clip_window_steps`` and
            ``_clip_recent`` (fraction of the last few steps clipped).
        step: the flush step.
        threshold: the clipping threshold (``None``: nothing to judge).
        algorithm: ``"norm"`` or ``"value"``.
        high_rate: the rate above which clipping is "most steps".
        window: the clip window in optimizer steps.
        th: thresholds (default :data:`THRESHOLDS`).
    """
    th = th or THRESHOLDS
    rate = values.get("normcheck/clip/rate")
    if threshold is None or rate is None or not math.isfinite(rate):
        return
    n = int(values.get("_clip_window_steps", 0.0))
    excess = values.get("normcheck/clip/mean_excess", math.nan)
    recent = values.get("_clip_recent", rate)
    history.add("rate", step, rate)
    if n < min(window, th.clip_min_steps) or rate <= high_rate or recent < 0.8:
        return
    measure = "max |gradient entry|" if algorithm == "value" else "total gradient norm"
    sev: Severity
    if not math.isfinite(excess) or excess < th.clip_warn_excess:
        sev = "info"
    elif rate >= 0.95 and excess >= th.clip_error_excess:
        sev = "error"
    else:
        sev = "warning"
    findings.report(
        "high_clip_rate",
        sev,
        step,
        None,
        f"gradients were clipped on {rate:.0%} of the last {n} optimizer steps (threshold {high_rate:.0%} over a"
        f" window of up to {window}) and still on {recent:.0%} of the latest steps; the pre-clip {measure} was on"
        f" average {_fmt(excess)}x the clip value {_fmt(threshold)} on clipped steps (~{_fmt(excess * threshold)})."
        " Clipping on most steps is no longer a safety net: it rescales every update (with SGD the effective"
        f" LR is about {_fmt(1 / excess) if excess > 0 else '?'}x the one you set; with Adam-like optimizers a"
        " constant rescale changes little, so the clip value is doing nothing useful). Likely causes, most likely"
        " first:"
        " learning rate too high, a clip value far below the typical gradient norm, loss or label scale, init"
        " std too large. What to try: lower the LR (or add warmup), set the clip value near the median"
        " pre-clip norm of a healthy run, normalize targets; if this is a deliberate choice, ignore.",
        value=rate,
    )


# ---------------------------------------------------------------------------------------------------------
# exceptions
# ---------------------------------------------------------------------------------------------------------
_NONFINITE_RE = re.compile(r"\b(nan|inf|infinity|non-?finite|not finite|overflow)\b", re.IGNORECASE)


def explain_exception(findings: FindingLog, exception: BaseException, step: int) -> None:
    """When training raised, tie the exception to the pathology found before it (or note it).

    The finding that most likely explains the exception (the first non-finite value, else exploding
    gradients/activations) gets a sentence naming the exception; when the exception mentions a
    non-finite value and nothing was measured before, a ``nonfinite_loss`` error says so.

    Args:
        findings: the log.
        exception: what training raised.
        step: the global step at which it raised.
    """
    text = (
        f"{type(exception).__name__}: {str(exception).strip().splitlines()[0][:200] if str(exception).strip() else ''}"
    )
    mentions_nonfinite = _NONFINITE_RE.search(text) is not None
    ranked = [f for f in findings.findings if f.code in NONFINITE_CODES]
    ranked += [f for f in findings.findings if f.code == "exploding_activations" and f.extra.get("nonfinite")]
    ranked += [
        f
        for f in findings.findings
        if f.code in ("exploding_gradients", "exploding_activations", "weight_norm_growth") and f.severity != "info"
    ]
    if ranked:
        f = ranked[0]  # the first non-finite value if any, else the earliest-listed explosion
        if "exception" not in f.extra:
            f.extra["exception"] = text
            f.message += (
                f" Training then raised {text} at step {step}: most likely a consequence of this"
                f" {f.code.replace('_', ' ')} (seen from step {f.step})."
            )
        return
    if mentions_nonfinite and "backward" in text.lower():
        # e.g. Trainer(detect_anomaly=True): "Function 'SqrtBackward0' returned nan values in its 0th output."
        findings.report(
            "nonfinite_gradients",
            "error",
            step,
            None,
            f"training raised {text} at step {step}: the backward pass produced a non-finite gradient (the op"
            " is named in the exception) before the optimizer step. Likely causes, most likely first: an op whose"
            " derivative is infinite where it is used (sqrt or norm of 0, log of 0, pow with a fractional exponent"
            " of 0, division by ~0), overflow after exploding activations, fp16 range. What to try: add an eps"
            " (torch.sqrt(x + 1e-12)), clamp before log/division, lower the LR, clip gradients"
            " (gradient_clip_val=1.0).",
            exception=text,
        )
        return
    if mentions_nonfinite:
        findings.report(
            "nonfinite_loss",
            "error",
            step,
            None,
            f"training raised {text} at step {step}, which points to a non-finite value (NaN/inf). No"
            " non-finite loss, gradient or activation had been measured before (the exception came before"
            " backward, or on a step that was not sampled). Likely causes, most likely first: learning rate too"
            " high, init std too large, a log/sqrt/division of 0 in the loss, fp16 overflow. What to try: lower"
            " the LR or add warmup, clip gradients (gradient_clip_val=1.0), add an eps, and run with"
            " Trainer(detect_anomaly=True) to find the op.",
            exception=text,
        )
