"""Data and first-step causes: inputs of extreme scale, regression targets of large scale, intermittent
gradient spikes, and info-level training hygiene hints.

Everything here works on host floats handed over at a flush (no hooks, no Lightning, no torch).
The monitors that measure live in :mod:`lightning_normcheck.callbacks._signals`.

Example:
    >>> from lightning_normcheck.findings import FindingLog
    >>> log = FindingLog()
    >>> col = FeatureStat(index=3, max_abs=2.0e4, mean=150.0, std=1.9e3, min=0.0, max=2.0e4, near_zero=0.99)
    >>> diagnose_inputs(log, 0, [InputScale("batch[0]", "column", 8, [col], 1, 0, 0.0, 2)])
    >>> f = log.get("input_scale")
    >>> f.severity, "column 3" in f.message
    ('warning', True)
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_normcheck.findings import Finding, FindingLog, Severity

# --- thresholds ---------------------------------------------------------------------------------------------
#: Standardized features sit within ~5 (Gaussian) and rarely pass ~100 (heavy tails); a column truly
#: standardized over N rows has |z| <= sqrt(N - 1) (Samuelson), so 1e3 needs 1e6+ rows and one value
#: carrying all the variance. The issue's raw features are "in the thousands and up" and a tiny-std
#: column gives ~1e4+: 1e3 splits the two.
INPUT_SCALE = 1e3
#: A feature is "mostly near zero" when this fraction of its entries is within 1% of its max |x|:
#: a nearly constant column divided by a tiny std is ~0 except for rare huge values.
NEAR_ZERO_FRACTION = 0.5
#: Raw 0-255 pixels: above 1 (so not [0, 1]) and at most 255 (uint8 range); reported as info only, see
#: :func:`diagnose_inputs`.
PIXEL_MAX = 255.0
#: Typical target magnitude (median |y|) above which regression targets drive MSE and its gradients:
#: healthy labels "in the tens" stay below 1e2 (3x margin); zero-mean targets scaled by 1e3 have a median
#: |y| of ~0.67e3 and the issue's prices "in the tens of thousands" ~1e4: both must be reported.
LABEL_SCALE = 300.0
#: The loss is "on the targets' squared scale" when it is at least this fraction of median|y|^2: MSE of
#: an untrained model is ~E[y^2]; a model that already handles the scale (log targets, an output
#: de-normalization) has a loss orders of magnitude smaller.
LOSS_ON_TARGET_SCALE = 1e-2
#: Spike: total gradient norm above this multiple of its running median. Measured: a clean run stays
#: within 3x at batch sizes 2-32; a corrupted label gives 60-80x, a 1% rare class at batch size 8 15-30x.
SPIKE_FACTOR = 10.0
#: Steps of history before a spike can be judged (a median of fewer values is too noisy).
SPIKE_MIN_HISTORY = 8
#: Length of the running-median window, in optimizer steps.
SPIKE_WINDOW = 50
#: The baseline is the larger of that median and the median of the last SPIKE_RECENT steps: the norm of a
#: healthy run can rise 5-10x within 50 steps (LR warm-up: OneCycleLR measured 0.2 -> 13 by step 27, with
#: 36-45 steps 3.5x its recent median but 15-18x the 50-step one); a bad batch in a steady run gives both.
SPIKE_RECENT = 8
#: A spike must fall back within this many steps, to within FALLBACK_BAND x the median it broke from or
#: to FALLBACK_DROP x below its own peak: a steady climb (exploding_gradients) or a rise to a new plateau
#: never falls back. "Within 3x" is the clean-run band above; the drop covers a bad batch that knocked
#: the weights (measured: 160 -> 7.6 with a median of 2, no clipping, then slowly back).
SPIKE_FALLBACK_STEPS = 3
FALLBACK_BAND = 3.0
FALLBACK_DROP = 5.0
#: Spike steps kept for the message and the finding's ``extra`` (bounded memory).
MAX_LISTED = 50
#: "Clipping on most steps": the blog's "almost always above the clip threshold"; 0.5 is also the
#: ClipRateTracker default ``high_clip_rate``. Judged over at least CLIP_MIN_STEPS steps.
CLIP_MOST = 0.5
CLIP_MIN_STEPS = 20
#: Adam's first step moves every weight by ~lr, so the update-to-weight ratio is ~lr / rms(w). The usual
#: rule of thumb is ~1e-3 per step; a median layer moving 5% of its norm per step is 50x that.
ADAM_UPDATE_RATIO = 0.05
#: Only the first steps say whether the run started at full LR (dense sampling covers them).
EARLY_STEPS = 20


def _g(x: float) -> str:
    """A short number: 3 significant digits."""
    if not math.isfinite(x):
        return str(x)
    return f"{x:.3g}"


# --- input_scale ------------------------------------------------------------------------------------------------
@dataclass
class FeatureStat:
    """Statistics of one feature (column/channel) of a float batch tensor, over one batch."""

    index: int
    max_abs: float
    mean: float
    std: float
    min: float
    max: float
    near_zero: float  # fraction of entries with |x| <= 1% of max_abs


@dataclass
class InputScale:
    """The largest features of one float input tensor of a sampled batch.

    Attributes:
        tensor: where it sits in the batch (``batch[0]``, ``batch['x']``).
        axis: what a feature is: ``column`` (2-D), ``feature`` (last dim of 3-D), ``channel`` (4-D+).
        n_features: how many features the tensor has.
        top: the features with the largest max |x|, largest first.
        n_above: how many features exceed :data:`INPUT_SCALE`.
        nonfinite: how many features hold a NaN or inf.
        min: the smallest value of the whole tensor.
        ndim: the tensor's number of dimensions.
    """

    tensor: str
    axis: str
    n_features: int
    top: list[FeatureStat]
    n_above: int
    nonfinite: int
    min: float
    ndim: int


def diagnose_inputs(
    findings: FindingLog, step: int, inputs: Sequence[InputScale], normalized_by: str | None = None
) -> None:
    """Report float input features of extreme magnitude (``input_scale``).

    Raw 0-255 pixels (4-D+, non-negative, max in (1, 255]) are a real scale problem but a common and
    usually trainable one, and the issue lists only values "in the thousands and up" as the bug: they
    get an *info* finding (divide by 255), never a warning.

    Args:
        findings: the log to report to.
        step: the optimizer step whose batch was measured.
        inputs: one entry per float input tensor (targets excluded).
        normalized_by: name of a BatchNorm layer that is the model's first layer, if any: it
            re-normalizes each feature, so large raw features are only worth an info there.
    """
    for inp in inputs:
        if not inp.top:
            continue
        top = inp.top[0]
        where = f"{inp.axis} {top.index} of {inp.tensor}"
        if inp.nonfinite > 0 or not math.isfinite(top.max_abs):
            findings.report(
                "input_scale",
                "error",
                step,
                None,
                f"{inp.tensor} has NaN/inf values in {inp.nonfinite} {inp.axis}(s) at step {step} (first: {where}, "
                f"max |x| {_g(top.max_abs)}). Likely causes: missing values left as NaN, a division by a zero std "
                "during standardization, a log of zero. Fix: impute missing values, standardize with a "
                "clamped std (std.clamp_min(1e-6)) or drop the constant column.",
                value=top.max_abs,
                tensor=inp.tensor,
                feature=top.index,
            )
            continue
        if top.max_abs > INPUT_SCALE:
            _report_large_input(findings, step, inp, top, where, normalized_by)
        elif (
            inp.ndim >= 4 and inp.min >= 0.0 and 1.0 < top.max_abs <= PIXEL_MAX and findings.get("input_scale") is None
        ):
            findings.report(
                "input_scale",
                "info",
                step,
                None,
                f"{inp.tensor} looks like raw 0-255 pixels ({inp.axis} {top.index} reaches {_g(top.max_abs)}, "
                f"min {_g(inp.min)}). They train, but the first layer sees ~100x larger inputs than with "
                "[0, 1] or standardized pixels: divide by 255 (or standardize per channel).",
                value=top.max_abs,
                tensor=inp.tensor,
                feature=top.index,
            )


def _report_large_input(
    findings: FindingLog, step: int, inp: InputScale, top: FeatureStat, where: str, normalized_by: str | None
) -> None:
    others = ""
    if inp.n_above > 1:
        rest = ", ".join(f"{f.index} ({_g(f.max_abs)})" for f in inp.top[1:] if f.max_abs > INPUT_SCALE)
        others = f" {inp.n_above} of {inp.n_features} {inp.axis}s exceed {_g(INPUT_SCALE)}" + (
            f" (also {rest})." if rest else "."
        )
    seen = (
        f"{where} reaches max |x| = {_g(top.max_abs)} at step {step} (mean {_g(top.mean)}, std {_g(top.std)}, "
        f"range [{_g(top.min)}, {_g(top.max)}]; standardized features stay within ~5).{others}"
    )
    fix_std = (
        "standardize it with training-set statistics and a clamped std, (x - mean) / std.clamp_min(1e-3) "
        "(or drop the column if it is constant)"
    )
    if top.std <= 1e-6 * top.max_abs:
        cause = (
            f"It is constant at {_g(top.mean)} in this batch: a constant column left unscaled (an ID, a year, "
            "a flag times a unit). Likely fix: drop the column if it is constant in the data set, else " + fix_std + "."
        )
    elif top.near_zero >= NEAR_ZERO_FRACTION:
        cause = (
            f"{100 * top.near_zero:.0f}% of its values are near 0 and a few are huge: typical of a nearly "
            "constant column divided by a tiny std (the std was ~0 where it was computed), less often a raw "
            "sparse count. Fix: compute the std with a floor, std.clamp_min(1e-3), or drop the constant "
            "column; then check that the loss and gradient norms fall to normal values."
        )
    else:
        cause = (
            "Its values sit far from 0 on their own scale: a raw, unscaled feature (prices, counts, "
            "timestamps). Fix: " + fix_std + "; for heavy-tailed positives use log1p first."
        )
    severity: Severity = "warning"
    tail = ""
    if normalized_by is not None:
        severity = "info"
        tail = f" The model's first layer {normalized_by} is a BatchNorm that re-normalizes each feature."
    findings.report(
        "input_scale",
        severity,
        step,
        None,
        f"{seen} {cause} Large inputs make the first layer's activations and gradients as large.{tail}",
        value=top.max_abs,
        tensor=inp.tensor,
        feature=top.index,
    )


# --- label_scale ------------------------------------------------------------------------------------------------
@dataclass
class TargetScale:
    """Scale of the tensor that looked like the regression target, over one batch."""

    tensor: str
    median_abs: float
    rms: float
    mean: float
    std: float
    max_abs: float
    why: str  # why this tensor was taken as the target


def diagnose_labels(
    findings: FindingLog,
    step: int,
    target: TargetScale | None,
    loss: float | None,
    grad_norm: float | None,
    input_max_abs: float | None,
) -> None:
    """Report regression targets whose scale drives the loss and the gradients (``label_scale``).

    Reported when the target's typical magnitude (median |y|) exceeds :data:`LABEL_SCALE` *and* the loss
    of that batch is on the targets' squared scale (or non-finite): then the large loss and gradients come
    from the labels, not from the network. Without a loss to check, only an info finding is given.

    Args:
        findings: the log to report to.
        step: the optimizer step whose batch was measured.
        target: the tensor taken as the target (or ``None``).
        loss: the training loss of that batch (scaled back for gradient accumulation), if seen.
        grad_norm: the total gradient norm of that step, if measured.
        input_max_abs: the largest |x| of the float inputs of that batch, if any.
    """
    if target is None or not math.isfinite(target.median_abs) or target.median_abs <= LABEL_SCALE:
        return
    scale = target.median_abs
    seen = (
        f"the regression target {target.tensor} ({target.why}) has typical magnitude {_g(scale)} at step {step} "
        f"(median |y|; mean {_g(target.mean)}, std {_g(target.std)}, max |y| {_g(target.max_abs)}; healthy "
        "targets are O(1)-O(10))"
    )
    if loss is None:
        findings.report(
            "label_scale",
            "info",
            step,
            None,
            f"{seen[0].upper() + seen[1:]}. If the loss is an MSE on these raw values, normalize the targets, "
            "(y - mean) / std with training-set statistics, and un-normalize predictions (pred * std + mean).",
            value=scale,
            tensor=target.tensor,
        )
        return
    on_scale = not math.isfinite(loss) or loss >= LOSS_ON_TARGET_SCALE * scale * scale
    if not on_scale:
        return
    grad = f" and the total gradient norm {_g(grad_norm)}" if grad_norm is not None else ""
    inputs = ""
    if input_max_abs is not None and math.isfinite(input_max_abs) and input_max_abs <= INPUT_SCALE:
        inputs = f" The inputs look standardized (max |x| {_g(input_max_abs)}),"
    else:
        inputs = " So"
    findings.report(
        "label_scale",
        "warning",
        step,
        None,
        f"{seen[0].upper() + seen[1:]}, and the loss of that batch is {_g(loss)}{grad}: MSE and its gradient grow with "
        f"the squared target scale.{inputs} the huge loss and gradients come from the labels, not from "
        "the network (not exploding gradients). Fix: normalize the targets, (y - mean) / std with "
        "training-set statistics (or predict log1p(y)), and un-normalize predictions (pred * std + mean) "
        "for metrics and inference.",
        value=scale,
        tensor=target.tensor,
        loss=loss,
    )


# --- gradient_spikes -------------------------------------------------------------------------------------------
@dataclass
class Spike:
    """One intermittent spike of the total gradient norm."""

    step: int
    norm: float
    median: float
    batch: str  # "epoch 0, batch 17" or "" when unknown

    @property
    def factor(self) -> float:
        return self.norm / self.median


@dataclass
class SpikeHistory:
    """Running-median window of the total gradient norm, spikes awaiting fall-back, confirmed spikes.

    Bounded: the window holds :data:`SPIKE_WINDOW` values, the listed spikes :data:`MAX_LISTED`.
    Saved with checkpoints so a resumed run keeps its baseline.
    """

    window: deque[float] = field(default_factory=lambda: deque(maxlen=SPIKE_WINDOW))
    pending: list[tuple[Spike, int]] = field(default_factory=list)  # (spike, steps seen since)
    spikes: list[Spike] = field(default_factory=list)
    count: int = 0
    max_factor: float = 0.0
    last_step: int = -1

    def update(
        self, totals: Sequence[tuple[int, float]], batch_of: Callable[[int], str], factor: float = SPIKE_FACTOR
    ) -> list[Spike]:
        """Feed per-step totals (in step order); return the spikes confirmed by this call."""
        confirmed: list[Spike] = []
        for step, value in totals:
            if step <= self.last_step:
                continue  # already seen (e.g. after a resume)
            self.last_step = step
            if not math.isfinite(value):
                self.pending = []  # non-finite: a different problem (nonfinite_gradients); drop the pending
                continue
            if value == 0.0:
                continue  # no gradient at all (a skipped batch: training_step returned None): not a sample
            still: list[tuple[Spike, int]] = []
            for spike, age in self.pending:
                if value <= max(FALLBACK_BAND * spike.median, spike.norm / FALLBACK_DROP):
                    confirmed.append(spike)
                elif age + 1 < SPIKE_FALLBACK_STEPS:
                    still.append((spike, age + 1))
            self.pending = still
            if len(self.window) >= SPIKE_MIN_HISTORY:
                recent = list(self.window)[-SPIKE_RECENT:]
                median = max(statistics.median(self.window), statistics.median(recent))
                if median > 0 and value > factor * median:
                    self.pending.append((Spike(step, value, median, batch_of(step)), 0))
            self.window.append(value)
        for spike in confirmed:
            self.count += 1
            self.max_factor = max(self.max_factor, spike.factor)
            if len(self.spikes) < MAX_LISTED:
                self.spikes.append(spike)
        return confirmed

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "window": list(self.window),
            "pending": [(vars(s).copy(), age) for s, age in self.pending],
            "spikes": [vars(s).copy() for s in self.spikes],
            "count": self.count,
            "max_factor": self.max_factor,
            "last_step": self.last_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = deque((float(v) for v in state.get("window", [])), maxlen=SPIKE_WINDOW)
        self.pending = [(Spike(**s), int(a)) for s, a in state.get("pending", [])]
        self.spikes = [Spike(**s) for s in state.get("spikes", [])]
        self.count = int(state.get("count", 0))
        self.max_factor = float(state.get("max_factor", 0.0))
        self.last_step = int(state.get("last_step", -1))


_SPIKE_CAUSES = {
    "": "a corrupted or mislabeled example in those batches, a rare class the model keeps getting wrong, an "
    "occasional bad batch (outliers, a different scale)",
    "classification": "a rare class the model keeps getting wrong (its examples carry a large loss), a "
    "mislabeled example in those batches, an occasional bad batch (outliers, a different scale)",
    "regression": "a corrupted target (an outlier label far from the others) in those batches, an occasional "
    "bad batch (outlier inputs, a different scale), a rare regime of the data the model keeps getting wrong",
}


def diagnose_spikes(
    findings: FindingLog,
    history: SpikeHistory,
    totals: Sequence[tuple[int, float]],
    batch_of: Callable[[int], str],
    clipping: str | None,
    factor: float = SPIKE_FACTOR,
    task: str | None = None,
) -> None:
    """Report intermittent spikes of the total gradient norm (``gradient_spikes``), one finding in all.

    A spike is a total norm above ``factor`` x the running median of the last :data:`SPIKE_WINDOW` steps
    (or of the last :data:`SPIKE_RECENT`, whichever is larger; after :data:`SPIKE_MIN_HISTORY` steps) that falls back within :data:`SPIKE_FALLBACK_STEPS` steps (to
    within :data:`FALLBACK_BAND` x that median, or :data:`FALLBACK_DROP` x below its peak); a steady climb
    or a rise to a new level never falls back and is left to ``exploding_gradients``.

    Args:
        findings: the log to report to.
        history: the running state (updated here).
        totals: ``(step, total gradient norm)`` of every optimizer step since the last call, in order.
        batch_of: step -> a description of its batch (``"epoch 0, batch 17"``) or ``""``.
        clipping: a description of the clipping in use (``"gradient_clip_val=1.0"``), ``None`` if none.
        factor: the spike factor.
        task: ``"classification"`` (integer targets), ``"regression"`` (float targets) or ``None``:
            orders the likely causes.
    """
    report_spikes(findings, history, history.update(totals, batch_of, factor), clipping, factor, task)


def merged_history(histories: Sequence[SpikeHistory]) -> SpikeHistory:
    """One view of several optimizers' spike histories (each judged on its own scale), for the report."""
    spikes = sorted((s for h in histories for s in h.spikes), key=lambda s: s.step)[:MAX_LISTED]
    return SpikeHistory(
        spikes=spikes,
        count=sum(h.count for h in histories),
        max_factor=max((h.max_factor for h in histories), default=0.0),
        last_step=max((h.last_step for h in histories), default=-1),
    )


def report_spikes(
    findings: FindingLog,
    history: SpikeHistory,
    new: Sequence[Spike],
    clipping: str | None,
    factor: float = SPIKE_FACTOR,
    task: str | None = None,
) -> None:
    """Report the spikes listed in ``history`` when ``new`` ones were confirmed (see :func:`diagnose_spikes`)."""
    if not new:
        return
    listed = history.spikes
    worst = max(listed, key=lambda s: s.factor)
    items = "; ".join(
        f"step {s.step} ({s.batch + ', ' if s.batch else ''}{_g(s.factor)}x, norm {_g(s.norm)})" for s in listed[:10]
    )
    more = f" and {history.count - 10} more" if history.count > 10 else ""
    clip = (
        f"Clipping is on ({clipping}), so the updates were bounded; the spikes still point at those batches."
        if clipping
        else "Nothing clips the gradients: clip them, gradient_clip_val=1.0 in the Trainer."
    )
    message = (
        f"the total gradient norm spiked {history.count} time(s) to {_g(factor)}x+ its running median and fell "
        f"back right after (worst {_g(worst.factor)}x at step {worst.step}, norm {_g(worst.norm)} vs median "
        f"{_g(worst.median)}; a clean run stays within 3x): {items}{more}. Likely causes, most likely first: "
        f"{_SPIKE_CAUSES.get(task or '', _SPIKE_CAUSES[''])}. {clip} Check those batches (with shuffle=True "
        "the batch index does not identify the samples: log the sample indices), fix or drop bad labels, "
        "and for a rare class use class weights (CrossEntropyLoss(weight=...)) or a WeightedRandomSampler."
    )
    first = listed[0]
    f = findings.get("gradient_spikes")
    if f is None:
        f = findings.report("gradient_spikes", "warning", first.step, None, message, value=worst.factor)
    else:
        findings.report("gradient_spikes", "warning", new[-1].step, None, message, value=worst.factor)
    if f is not None:
        f.message = message
        f.count = history.count
        f.value = worst.factor
        f.last_step = max(f.last_step, new[-1].step)
        f.extra.update(
            steps=[s.step for s in listed],
            factors=[round(s.factor, 2) for s in listed],
            batches=[s.batch for s in listed],
            max_factor=worst.factor,
        )


# --- hygiene ------------------------------------------------------------------------------------------------------
def add_hint(findings: FindingLog, code: str, key: str, step: int, text: str) -> Finding | None:
    """Add an info-level hint under ``code`` (layer None): a new info finding, or its text joined to the
    finding of that code already there (one per (code, layer)); a later warning of the code replaces it."""
    f = findings.get(code)
    if f is None:
        return findings.report(code, "info", step, None, text, hints=[key])
    hints = f.extra.setdefault("hints", [])
    if key in hints:
        return None
    hints.append(key)
    f.message = f"{f.message} | {text}"
    f.count += 1
    return f


def diagnose_clipping_hygiene(findings: FindingLog, step: int, totals: Sequence[float], clip_val: float | None) -> None:
    """Hint (info) when norm clipping acts on most of the recent steps: lower the LR instead."""
    if not clip_val or len(totals) < CLIP_MIN_STEPS:
        return
    finite = [v for v in totals if math.isfinite(v)]
    if len(finite) < CLIP_MIN_STEPS:
        return
    rate = sum(v > clip_val for v in finite) / len(finite)
    if rate >= CLIP_MOST:
        add_hint(
            findings,
            "high_clip_rate",
            "clipping_most",
            step,
            f"Gradient clipping at {_g(clip_val)} acts on {100 * rate:.0f}% of the last {len(finite)} steps "
            f"(median pre-clip norm {_g(statistics.median(finite))}): clipping that often is a too-high "
            "learning rate in disguise; lower the LR (or add warmup) rather than keep clipping.",
        )


def diagnose_warmup(
    findings: FindingLog,
    step: int,
    optimizer: str,
    lr: float,
    warming_up: bool,
    update_ratios: dict[str, float],
) -> None:
    """Hint (info) when Adam/AdamW runs at full LR from step 0 and early updates are large.

    Args:
        findings: the log to report to.
        step: the sampled step (only steps below :data:`EARLY_STEPS` are judged).
        optimizer: the optimizer's class name.
        lr: its learning rate at that step.
        warming_up: whether the LR at that step is below the scheduler's base LR (a warm-up).
        update_ratios: ``layer -> ||w_after - w_before|| / ||w_after||`` at that step.
    """
    if step >= EARLY_STEPS or warming_up or "adam" not in optimizer.lower():
        return
    ratios = [v for v in update_ratios.values() if math.isfinite(v)]
    if not ratios:
        return
    median = statistics.median(ratios)
    if median < ADAM_UPDATE_RATIO:
        return
    layer, worst = max(update_ratios.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else -1.0)
    add_hint(
        findings,
        "weight_norm_growth",  # weights moving a large fraction of their norm per step
        "warmup",
        step,
        f"{optimizer} runs at its full LR ({_g(lr)}) from step 0 and the early updates are large: at step {step} "
        f"the median layer moves {_g(median)} of its weight norm in one step (largest {layer}: {_g(worst)}; "
        "~1e-3 is typical). Adam's first steps move every weight by ~lr before its variance estimates settle: "
        "add a linear LR warm-up over the first few hundred steps (or lower the LR).",
    )


__all__ = [
    "FeatureStat",
    "InputScale",
    "Spike",
    "SpikeHistory",
    "TargetScale",
    "add_hint",
    "diagnose_clipping_hygiene",
    "diagnose_inputs",
    "diagnose_labels",
    "diagnose_spikes",
    "diagnose_warmup",
]


from lightning_normcheck.diagnosis.engine import Rules  # noqa: E402


class DataRules(Rules):
    name = "data"
