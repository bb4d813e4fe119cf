"""Rules: data causes, judged on the sampled batches (``input_scale``, ``label_scale``).

A gradient that is large because the inputs or the regression targets are large is no explosion of the
network: these rules run first, so the gradient rules can tell the two apart. They read
:class:`~lightning_normcheck.diagnosis.records.BatchSample` records (the scale of a sampled batch's float
inputs, of its regression target and its loss) and, for the label verdict, the total gradient norm of the
batch's step from the flush's :class:`~lightning_normcheck.diagnosis.records.GradientTotals`.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Diagnosis
    >>> from lightning_normcheck.diagnosis.records import BatchSample, FeatureStat, InputScale
    >>> col = FeatureStat(index=3, max_abs=2.0e4, mean=150.0, std=1.9e3, min=0.0, max=2.0e4, near_zero=0.99)
    >>> inp = InputScale("batch[0]", "column", 8, (col,), n_above=1, nonfinite=0, min=0.0, ndim=2)
    >>> d = Diagnosis()
    >>> d.observe(0, [BatchSample(step=0, inputs=(inp,))])
    >>> f = d.log.get("input_scale")
    >>> f.severity, "column 3 of batch[0]" in f.message, f.value
    ('warning', True, 20000.0)
"""

from __future__ import annotations

import math

from lightning_normcheck.diagnosis.engine import Flush, Rules
from lightning_normcheck.diagnosis.records import BatchSample, FeatureStat, GradientTotals, InputScale, TargetScale
from lightning_normcheck.diagnosis.registry import REGISTRY, Severity, compose

#: Dimensions of an image batch (N, C, H, W) or more: only such tensors can hold raw pixels.
_IMAGE_NDIM = 4

_STANDARDIZE = "standardize it with training-set statistics and a clamped std, (x - mean) / std.clamp_min(1e-3)"


class DataRules(Rules):
    """``input_scale`` (a float input feature of extreme magnitude) and ``label_scale`` (regression targets
    whose scale drives the loss and the gradients), one verdict per sampled batch."""

    name = "data"

    def observe(self, flush: Flush) -> None:
        samples = flush.of(BatchSample)
        if not samples:
            return
        totals: dict[int, float] = {}
        for rec in flush.of(GradientTotals):
            for step, total in rec.series():
                totals.setdefault(step, total)  # the first optimizer's total of a step, as logged first
        for sample in samples:
            for inp in sample.inputs:
                self._input_scale(sample.step, inp)
            if sample.target is not None:
                self._label_scale(sample, sample.target, totals.get(sample.step))

    # -- input_scale ---------------------------------------------------------------------------------------
    def _input_scale(self, step: int, inp: InputScale) -> None:
        """One float input tensor: NaN/inf (error), a feature above ``input_scale`` (warning, info behind a
        first-layer BatchNorm) or raw 0-255 pixels (info)."""
        if not inp.top:
            return
        th = self.ctx.thresholds.data
        top = inp.top[0]
        if inp.nonfinite > 0 or not math.isfinite(top.max_abs):
            self._report_nonfinite_input(step, inp, top)
        elif top.max_abs > th.input_scale:
            self._report_large_input(step, inp, top)
        elif _raw_pixels(inp, top, th.pixel_low, th.pixel_max) and self.log.get("input_scale") is None:
            seen = (
                f"{inp.tensor} looks like raw 0-255 pixels ({inp.axis} {top.index} reaches {top.max_abs:.3g}, "
                f"min {inp.min:.3g}). They train, but the first layer sees ~100x larger inputs than with [0, 1] or "
                "standardized pixels"
            )
            message = compose("input_scale", seen, causes=[], fixes=["divide by 255 (or standardize per channel)"])
            self.log.report(
                "input_scale", "info", step, None, message, value=top.max_abs, tensor=inp.tensor, feature=top.index
            )

    def _report_nonfinite_input(self, step: int, inp: InputScale, top: FeatureStat) -> None:
        seen = (
            f"{inp.tensor} has NaN/inf values in {inp.nonfinite} {inp.axis}(s) at step {step} (first: "
            f"{_where(inp, top)}, max |x| {top.max_abs:.3g})"
        )
        message = compose(
            "input_scale",
            seen,
            causes=["missing values left as NaN", "a division by a zero std during standardization", "a log of zero"],
            fixes=[
                "impute missing values",
                "standardize with a clamped std (std.clamp_min(1e-6)) or drop the constant column",
            ],
        )
        self.log.report(
            "input_scale", "error", step, None, message, value=top.max_abs, tensor=inp.tensor, feature=top.index
        )

    def _report_large_input(self, step: int, inp: InputScale, top: FeatureStat) -> None:
        th = self.ctx.thresholds.data
        seen = (
            f"{_where(inp, top)} reaches max |x| = {top.max_abs:.3g} at step {step} (mean {top.mean:.3g}, std "
            f"{top.std:.3g}, range [{top.min:.3g}, {top.max:.3g}]; standardized features stay within ~5)."
        )
        if inp.n_above > 1:
            rest = ", ".join(f"{f.index} ({f.max_abs:.3g})" for f in inp.top[1:] if f.max_abs > th.input_scale)
            seen += f" {inp.n_above} of {inp.n_features} {inp.axis}s exceed {th.input_scale:.3g}"
            seen += f" (also {rest})." if rest else "."
        kind, causes, fixes = self._large_input_kind(top)
        severity: Severity = "warning"
        note = "Large inputs make the first layer's activations and gradients as large."
        normalized_by = self.ctx.run.normalized_by
        if normalized_by is not None:
            severity = "info"
            note += f" The model's first layer {normalized_by} is a BatchNorm that re-normalizes each feature."
        message = compose("input_scale", f"{seen} {kind}", causes=causes, fixes=fixes, note=note)
        self.log.report(
            "input_scale", severity, step, None, message, value=top.max_abs, tensor=inp.tensor, feature=top.index
        )

    def _large_input_kind(self, top: FeatureStat) -> tuple[str, list[str], list[str]]:
        """What the large feature looks like (a sentence), its likely causes and fixes, most likely first."""
        th = self.ctx.thresholds.data
        if top.std <= th.constant_std * top.max_abs:
            return (
                f"It is constant at {top.mean:.3g} in this batch",
                ["a constant column left unscaled (an ID, a year, a flag times a unit)"],
                ["drop the column if it is constant in the data set", "else " + _STANDARDIZE],
            )
        if top.near_zero >= th.near_zero_fraction:
            return (
                f"{100 * top.near_zero:.0f}% of its values are near 0 and a few are huge",
                [
                    "a nearly constant column divided by a tiny std (the std was ~0 where it was computed)",
                    "a raw sparse count (less often)",
                ],
                [
                    "compute the std with a floor, std.clamp_min(1e-3), or drop the constant column",
                    "then check that the loss and gradient norms fall to normal values",
                ],
            )
        return (
            "Its values sit far from 0 on their own scale",
            ["a raw, unscaled feature (prices, counts, timestamps)"],
            [_STANDARDIZE + " (or drop the column if it is constant)", "for heavy-tailed positives use log1p first"],
        )

    # -- label_scale ---------------------------------------------------------------------------------------
    def _label_scale(self, sample: BatchSample, target: TargetScale, grad_norm: float | None) -> None:
        """Targets of typical magnitude (median |y|) above ``label_scale`` with the batch's loss on their squared
        scale (or non-finite): the loss and gradients come from the labels. Without a loss: info only."""
        th = self.ctx.thresholds.data
        scale = target.median_abs
        if not math.isfinite(scale) or scale <= th.label_scale:
            return
        step, loss = sample.step, sample.loss
        seen = (
            f"The regression target {target.tensor} ({target.why}) has typical magnitude {scale:.3g} at step {step} "
            f"(median |y|; mean {target.mean:.3g}, std {target.std:.3g}, max |y| {target.max_abs:.3g}; healthy "
            "targets are O(1)-O(10))"
        )
        fix = REGISTRY["label_scale"].fix
        if loss is None:
            message = compose("label_scale", seen, fixes=[f"if the loss is an MSE on these raw values, {fix}"])
            self.log.report("label_scale", "info", step, None, message, value=scale, tensor=target.tensor)
            return
        if math.isfinite(loss) and loss < th.loss_on_target_scale * scale * scale:
            return  # the model already handles the scale (log targets, an output de-normalization)
        grad = f" and the total gradient norm {grad_norm:.3g}" if grad_norm is not None else ""
        seen += f", and the loss of that batch is {loss:.3g}{grad}: MSE and its gradient grow with the squared target"
        seen += " scale."
        input_max = _input_max(sample)
        if input_max is not None and math.isfinite(input_max) and input_max <= th.input_scale:
            seen += f" The inputs look standardized (max |x| {input_max:.3g}), so"
        else:
            seen += " So"
        seen += " the huge loss and gradients come from the labels, not from the network (not exploding gradients)"
        message = compose("label_scale", seen)
        self.log.report("label_scale", "warning", step, None, message, value=scale, tensor=target.tensor, loss=loss)


def _where(inp: InputScale, top: FeatureStat) -> str:
    return f"{inp.axis} {top.index} of {inp.tensor}"


def _raw_pixels(inp: InputScale, top: FeatureStat, low: float, high: float) -> bool:
    """An image batch, non-negative, whose largest value is above [0, 1] and within the uint8 range."""
    return inp.ndim >= _IMAGE_NDIM and inp.min >= 0.0 and low < top.max_abs <= high


def _input_max(sample: BatchSample) -> float | None:
    """The largest |x| over the batch's float inputs (inf when one holds NaN/inf), ``None`` when unknown."""
    known = [inp.max_abs for inp in sample.inputs if not math.isnan(inp.max_abs)]
    if any(inp.nonfinite > 0 for inp in sample.inputs):
        return math.inf
    return max(known) if known else None


__all__ = ["DataRules"]
