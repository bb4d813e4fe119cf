"""The first non-finite value of the run (loss, gradient or activation), reported once, and the exception that
training raised, tied to what was found before it.

A NaN or inf spreads: after the first one every later loss, gradient and activation is non-finite too, so
only the first says where it came from. Its step and place decide the likely causes: a loss that is
non-finite at step 0 had no time to diverge (a log or division in the loss), a module whose output is the
first non-finite one is where the value overflowed, a gradient that goes non-finite under a finite loss
points to an op with an infinite derivative.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Context, Flush
    >>> from lightning_normcheck.diagnosis.findings import FindingLog
    >>> from lightning_normcheck.diagnosis.thresholds import Thresholds
    >>> rules = NonfiniteRules(Context(Thresholds()), FindingLog())
    >>> nan = float("nan")
    >>> rules.observe(Flush(3, (GradientTotals(steps=(2, 3), totals=(1.0, nan), optimizers=(0, 0)),)))
    >>> [(f.code, f.step, f.since) for f in rules.log.findings]
    [('nonfinite_gradients', 3, 3)]
    >>> rules.explain(TrainingError(step=4, type_name="ValueError", text="loss is nan"))
    >>> "Training then raised ValueError: loss is nan at step 4" in rules.log.findings[0].message
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import Finding, FindingLog
from lightning_normcheck.diagnosis.records import (
    INPUT_LABEL,
    ActivationSample,
    GradientLayers,
    GradientTotals,
    LossCheck,
    TrainingError,
)
from lightning_normcheck.diagnosis.registry import CLIP_FIX, compose

#: The codes of the first non-finite value (an ``exploding_activations`` finding with ``extra["nonfinite"]``
#: is the third kind: a module output).
NONFINITE_CODES = ("nonfinite_loss", "nonfinite_gradients")
#: Codes that explain a large gradient by the data (then no exploding_gradients).
DATA_CAUSES = ("label_scale", "input_scale")
#: Layers named in a message (the rest are counted).
_LISTED = 6
#: Characters of the exception's first line quoted in a message.
_TEXT_CHARS = 200
_NONFINITE_RE = re.compile(r"\b(nan|inf|infinity|non-?finite|not finite|overflow)\b", re.IGNORECASE)

_DIVERGED = "learning rate too high (the run diverged: look for growing gradient norms before it)"
_IN_LOSS = "a log/sqrt/division of a value that reached 0 or below in the loss, or bad labels"
#: Where the first non-finite loss was computed, by what the activation sample of its step shows.
_LOSS_SITES = {
    "input": "The model input itself is already non-finite: check the data (NaN in features, division by a zero std).",
    "loss": "Every module output was finite at that step: the NaN/inf arose in the loss computation itself"
    " (log/sqrt/division of the prediction, or non-finite labels).",
    "unsampled": "Activations were not sampled at that step, so the module that produced it is not known.",
}


def _fmt(v: float) -> str:
    return f"{v:.3g}"


def has_nonfinite_finding(log: FindingLog) -> bool:
    """Whether the first non-finite value of the run was already reported (loss, gradient or activation). Steps an
    AMP GradScaler skipped (an info ``nonfinite_gradients``) are not one: it recovered from them."""
    return log.has(*NONFINITE_CODES, at_least="warning") or any(
        f.extra.get("nonfinite") for f in log.of("exploding_activations")
    )


def has_data_cause(log: FindingLog) -> bool:
    """Whether the inputs or the labels explain large gradients (a warning or worse about their scale)."""
    return log.has(*DATA_CAUSES, at_least="warning")


def step_totals(records: Sequence[GradientTotals]) -> list[tuple[int, int, float]]:
    """``(optimizer, step, total)`` of every optimizer step of a flush, in step order.

    One optimizer stepping twice at one step counts once, with the norm of both (their hypot); the same
    step of the same optimizer in a later record (a second monitor measured it too) is not counted again.
    """
    merged: dict[tuple[int, int], float] = {}
    for r in records:
        mine: dict[tuple[int, int], float] = {}
        for s, v, k in zip(r.steps, r.totals, r.optimizers):
            mine[(k, s)] = math.hypot(mine[(k, s)], v) if (k, s) in mine else v
        for key, v in mine.items():
            merged.setdefault(key, v)
    return sorted(((k, s, v) for (k, s), v in merged.items()), key=lambda t: t[1])


def first_loss(flush: Flush) -> LossCheck | None:
    """The earliest non-finite loss the flush's records know of (``None``: every loss so far was finite)."""
    seen = [r for r in flush.of(LossCheck) if r.step >= 0]
    return min(seen, key=lambda r: r.step) if seen else None


@dataclass(frozen=True)
class FirstGradient:
    """The first non-finite total gradient norm: known at ``step``, its run of ``count`` non-finite steps in a
    row from ``since``."""

    step: int
    since: int
    value: float
    count: int = 1


@dataclass(frozen=True)
class FirstActivation:
    """What the activation sample of one step says about non-finite outputs."""

    module: str | None  # the first module in execution order with a non-finite output
    input_bad: bool  # the model input is non-finite
    measured: bool  # the sample holds any output (else nothing is known about the modules)


def first_activation(sample: ActivationSample) -> FirstActivation:
    bad = [m.name for m in sample.modules if not math.isfinite(m.rms) and m.name != INPUT_LABEL]
    input_bad = sample.input_rms is not None and not math.isfinite(sample.input_rms)
    measured = bool(sample.modules) or sample.input_rms is not None
    return FirstActivation(bad[0] if bad else None, input_bad, measured)


def _loss_causes(site: str, layer: str | None, step: int) -> tuple[str, ...] | None:
    """The causes of a non-finite loss in the order its site and step suggest (``None``: the registry's)."""
    if layer is not None:
        return (
            f"an overflow in `{layer}` (its weights or inputs too large: init std or learning rate)",
            "a division by ~0 or log of 0 inside it",
            "fp16 range",
            _DIVERGED,
        )
    if step == 0 or site == "loss":  # nothing had time to diverge
        return (_IN_LOSS, "init std too large", "fp16 overflow", _DIVERGED)
    return None


def exception_text(error: TrainingError) -> str:
    """``"ValueError: loss is nan"``: the exception's class and the start of its first line."""
    text = error.text.strip()[:_TEXT_CHARS]
    return f"{error.type_name}: {text}" if text else error.type_name


class NonfiniteRules(Rules):
    """The first non-finite loss, gradient or activation of the run, once; the exception that followed it.

    Under an AMP GradScaler (fp16) non-finite gradient steps are skipped by design: only a run of
    ``amp_nonfinite_steps`` of them in a row is an error (counted across logging steps), once the loss scale has
    fallen to ``amp_scale_floor`` (when the records carry the scale). Shorter runs, once a
    finite step ends them, are counted in one info finding that says how many steps the scaler skipped and the
    loss scale it backed off to (when the records carry the scale the gradient monitor read).
    """

    name = "nonfinite"

    def __init__(self, ctx: Context, log: FindingLog) -> None:
        super().__init__(ctx, log)
        self._run = 0  # non-finite gradient steps in a row, up to the last one seen
        self._run_since = -1  # the first of them
        self._run_last = -1  # the last of them
        self._skipped = 0  # AMP: non-finite steps in runs that a finite step ended (the GradScaler skipped them)
        self._skipped_first = -1  # the first of them
        self._skipped_last = -1  # the last of them
        self._scale_now: float | None = None  # AMP: the loss scale read at the logging step being judged

    # -- observe ---------------------------------------------------------------------------------------------
    def observe(self, flush: Flush) -> None:
        if has_nonfinite_finding(self.log):
            return
        skipped = self._skipped
        scales = [r.scale for r in flush.of(GradientTotals) if r.scale is not None]
        self._scale_now = scales[-1] if scales else None
        grad = self._first_gradient(step_totals(flush.of(GradientTotals)), self._scale_now)
        loss = first_loss(flush)
        sample = flush.first(ActivationSample)
        if loss is not None and (grad is None or loss.step <= grad.since):
            self._report_loss(loss, sample)
        elif grad is not None:
            self._report_gradient(grad, flush.of(GradientLayers))
        elif sample is not None:
            self._report_activation(sample)
        if self._skipped > skipped and scales and not has_nonfinite_finding(self.log):
            self._report_skipped(flush.step, scales[-1])

    def _first_gradient(self, totals: list[tuple[int, int, float]], scale: float | None) -> FirstGradient | None:
        """The first non-finite total norm; with a GradScaler, the step that completes a long enough run, once the
        loss scale read at this logging step (``scale``; None: not known) is at most ``amp_scale_floor``."""
        th = self.ctx.thresholds.gradients
        need = th.amp_nonfinite_steps if self.ctx.run.amp_scaler else 1
        scaled = need > 1 and scale is not None and scale > th.amp_scale_floor  # the scaler may still be calibrating
        for _, s, v in totals:
            if math.isfinite(v):
                if self._run and need > 1:  # the scaler skipped that run and recovered
                    self._skipped += self._run
                    self._skipped_first = self._run_since if self._skipped_first < 0 else self._skipped_first
                    self._skipped_last = self._run_last
                self._run = 0
                continue
            if self._run == 0:
                self._run_since = s
            self._run += 1
            self._run_last = s
            if self._run >= need and not scaled:
                return FirstGradient(step=s, since=self._run_since, value=v, count=self._run)
        return None

    def _report_loss(self, loss: LossCheck, sample: ActivationSample | None) -> None:
        acts = first_activation(sample) if sample is not None and sample.step == loss.step else None
        layer = None
        if acts is None or not acts.measured:
            site = "unsampled"
        elif acts.input_bad:
            site = "input"
        elif acts.module is not None:
            site, layer = "module", acts.module
        else:
            site = "loss"
        where = (
            f"The first module whose output is non-finite (in execution order) is `{layer}`: that is where the value"
            " overflowed or a NaN was produced."
            if layer is not None
            else _LOSS_SITES[site]
        )
        seen = (
            f"the loss became {_fmt(loss.value)} at step {loss.step} (the first non-finite value of the run; later"
            " steps are not reported again)"
        )
        message = compose("nonfinite_loss", seen, where=where, causes=_loss_causes(site, layer, loss.step))
        self.log.report("nonfinite_loss", None, loss.step, layer, message, value=loss.value, module=layer)

    def _report_gradient(self, grad: FirstGradient, records: list[GradientLayers]) -> None:
        scale = self._scale_now
        layers: dict[str, float] = {}
        for r in records:
            if r.step == grad.since:
                layers.update(r.as_dict())
        bad = [n for n, v in layers.items() if not math.isfinite(v)]
        layer = None
        if bad and len(bad) < len(layers):
            layer = bad[-1]  # backward reaches the output-side layers first
            where = f"Non-finite in {len(bad)} of {len(layers)} layers: {', '.join(bad[:_LISTED])}."
        elif bad:
            where = (
                "Every layer's gradient is non-finite: the NaN/inf starts in the backward of the loss or of the output"
                " layer."
            )
        else:
            where = ""
        amp = (
            (
                " (the AMP GradScaler skipped these steps"
                + (f" and backed its loss scale off to {scale:.6g}" if scale is not None else "")
                + ", but the overflow did not stop)"
            )
            if self.ctx.run.amp_scaler
            else ""
        )
        run = f" on {grad.count} steps in a row from step {grad.since}" if grad.count > 1 else ""
        seen = (
            f"the total gradient norm became {_fmt(grad.value)} at step {grad.step}{run} while the loss was still"
            f" finite{amp} (the first non-finite value of the run; later steps are not reported again)"
        )
        message = compose("nonfinite_gradients", seen, where=where)
        self.log.report("nonfinite_gradients", None, grad.step, layer, message, value=grad.value, since=grad.since)

    def _report_skipped(self, step: int, scale: float) -> None:
        """Info: the GradScaler skipped steps whose gradients overflowed, backed off its scale and went on. Only
        with the scale the monitor read (records without one, e.g. rebuilt from logs, say nothing of skips)."""
        n, need = self._skipped, self.ctx.thresholds.gradients.amp_nonfinite_steps
        span = (
            f"step {self._skipped_first}" if n == 1 else f"between steps {self._skipped_first} and {self._skipped_last}"
        )
        seen = (
            f"the AMP GradScaler skipped {n} optimizer step{'s' if n != 1 else ''} ({span}) whose gradients were"
            f" inf/NaN after unscaling and backed off its loss scale (now {scale:.6g}, read at step {step}); no run of"
            f" skipped steps reached amp_nonfinite_steps={need} in a row"
        )
        message = compose(
            "nonfinite_gradients",
            seen,
            causes=("the loss scale was too large for fp16 (the scaler starts high and backs off by design)",),
            fixes=(),
            note=(
                "Nothing to fix: skipping and backing off is how the GradScaler finds its scale; a run of"
                f" {need} skipped steps in a row still going when the scale is at most"
                f" {self.ctx.thresholds.gradients.amp_scale_floor:g} would be an error."
            ),
        )
        extra = {"skipped": n, "scale": scale}
        if self.log.get("nonfinite_gradients") is None:
            self.log.report("nonfinite_gradients", "info", step, None, message, scale, self._skipped_first, **extra)
        self.log.revise("nonfinite_gradients", None, message, step=step, count=n, value=scale, **extra)

    def _report_activation(self, sample: ActivationSample) -> None:
        acts = first_activation(sample)
        if acts.module is None and not acts.input_bad:
            return
        name = INPUT_LABEL if acts.input_bad else acts.module
        seen = (
            f"the output of `{name}` is non-finite at step {sample.step} (the first module in execution order with an"
            " inf/NaN output) while the loss is still finite"
        )
        message = compose(
            "exploding_activations",
            seen,
            causes=(
                "an overflow in that module (weights or inputs too large)",
                "a division by ~0 or log of 0 inside it",
                "fp16 range",
            ),
            fixes=("lower the LR", "check that layer's init", "add normalization before it", "add an eps"),
        )
        layer = None if acts.input_bad else name
        self.log.report("exploding_activations", "error", sample.step, layer, message, value=math.inf, nonfinite=True)

    # -- explain ---------------------------------------------------------------------------------------------
    def explain(self, error: TrainingError) -> None:
        """Tie the exception to the first non-finite finding (else to an explosion); when nothing was found and
        the exception names a non-finite value, report it as one."""
        text = exception_text(error)
        culprit = self._culprit()
        if culprit is not None:
            sentence = (
                f"Training then raised {text} at step {error.step}: most likely a consequence of this"
                f" {culprit.code.replace('_', ' ')} (seen from step {culprit.since})."
            )
            self.log.annotate(culprit.code, culprit.layer, "exception", sentence, exception=text)
            return
        if _NONFINITE_RE.search(text) is None:
            return
        if "backward" in text.lower():  # Trainer(detect_anomaly=True): "Function 'SqrtBackward0' returned nan"
            self._report_anomaly(text, error.step)
            return
        seen = f"training raised {text} at step {error.step}, which points to a non-finite value (NaN/inf)"
        where = (
            "No non-finite loss, gradient or activation had been measured before (the exception came before"
            " backward, or on a step that was not sampled)."
        )
        message = compose("nonfinite_loss", seen, where=where)
        self.log.report("nonfinite_loss", None, error.step, None, message, exception=text)

    def _culprit(self) -> Finding | None:
        """The finding that most likely explains an exception: the first non-finite value, else an explosion."""
        ranked = [f for f in self.log.of(*NONFINITE_CODES) if f.severity != "info"]  # info: skipped AMP steps
        ranked += [f for f in self.log.of("exploding_activations") if f.extra.get("nonfinite")]
        explosions = self.log.of("exploding_gradients", "exploding_activations", "weight_norm_growth")
        ranked += [f for f in explosions if f.severity != "info"]
        return ranked[0] if ranked else None

    def _report_anomaly(self, text: str, step: int) -> None:
        seen = (
            f"training raised {text} at step {step}: the backward pass produced a non-finite gradient (the op is named"
            " in the exception) before the optimizer step"
        )
        message = compose(
            "nonfinite_gradients",
            seen,
            fixes=(
                "add an eps (torch.sqrt(x + 1e-12))",
                "clamp before log/division",
                "lower the LR",
                CLIP_FIX,
            ),
        )
        self.log.report("nonfinite_gradients", None, step, None, message, exception=text)

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2,
            "run": self._run,
            "run_since": self._run_since,
            "run_last": self._run_last,
            "skipped": self._skipped,
            "skipped_first": self._skipped_first,
            "skipped_last": self._skipped_last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._run = int(state.get("run", 0))
        self._run_since = int(state.get("run_since", -1))
        self._run_last = int(state.get("run_last", self._run_since + self._run - 1))
        self._skipped = int(state.get("skipped", 0))
        self._skipped_first = int(state.get("skipped_first", -1))
        self._skipped_last = int(state.get("skipped_last", -1))


__all__ = [
    "DATA_CAUSES",
    "NONFINITE_CODES",
    "FirstActivation",
    "FirstGradient",
    "NonfiniteRules",
    "exception_text",
    "first_activation",
    "first_loss",
    "has_data_cause",
    "has_nonfinite_finding",
    "step_totals",
]
