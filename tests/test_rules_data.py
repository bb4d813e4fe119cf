"""DataRules on hand-built records: input_scale and label_scale, fire and stay-silent cases, the boundaries of
each threshold, and thresholds changed through ``Thresholds(...)``. Expected numbers are worked out by hand."""

from __future__ import annotations

import math

import pytest

from lightning_normcheck.diagnosis.data import DataRules
from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import (
    BatchSample,
    FeatureStat,
    GradientTotals,
    InputScale,
    RunInfo,
    TargetScale,
)
from lightning_normcheck.diagnosis.thresholds import DataThresholds, Thresholds


def make(run: RunInfo | None = None, data: DataThresholds | None = None) -> DataRules:
    return DataRules(Context(Thresholds(data=data or DataThresholds()), run=run or RunInfo()), FindingLog())


def feature(max_abs: float, index: int = 2, mean: float = 4000.0, std: float = 1500.0, near_zero: float = 0.0):
    return FeatureStat(index=index, max_abs=max_abs, mean=mean, std=std, min=-max_abs, max=max_abs, near_zero=near_zero)


def table(*top: FeatureStat, n_above: int = 1, nonfinite: int = 0, ndim: int = 2, low: float = -1.0) -> InputScale:
    return InputScale("batch[0]", "column", 8, top, n_above, nonfinite, low, ndim, max_abs=top[0].max_abs if top else 0)


def images(max_abs: float, low: float = 0.0, ndim: int = 4) -> InputScale:
    top = FeatureStat(index=1, max_abs=max_abs, mean=100.0, std=50.0, min=low, max=max_abs, near_zero=0.1)
    return InputScale("batch[0]", "channel", 3, (top,), 0, 0, low, ndim, max_abs=max_abs)


def observe(rules: DataRules, *samples: BatchSample, totals: GradientTotals | None = None, step: int = 9) -> None:
    rules.observe(Flush(step, (*samples, *([totals] if totals else []))))


# --- input_scale -------------------------------------------------------------------------------------------------
def test_raw_feature_is_a_warning_with_its_numbers() -> None:
    r = make()
    observe(r, BatchSample(step=3, inputs=(table(feature(8000.0)),)))
    f = r.log.get("input_scale")
    assert f is not None and (f.severity, f.step, f.since, f.layer, f.value) == ("warning", 3, 3, None, 8000.0)
    assert "column 2 of batch[0] reaches max |x| = 8e+03 at step 3 (mean 4e+03, std 1.5e+03" in f.message
    assert "range [-8e+03, 8e+03]" in f.message and "Its values sit far from 0 on their own scale" in f.message
    assert "Likely causes, most likely first: a raw, unscaled feature" in f.message
    assert "What to try: standardize it with training-set statistics" in f.message and "log1p" in f.message
    assert f.extra == {"tensor": "batch[0]", "feature": 2}


@pytest.mark.parametrize(("max_abs", "fires"), [(1000.0, False), (1000.5, True)])
def test_input_scale_boundary(max_abs: float, fires: bool) -> None:
    r = make()
    observe(r, BatchSample(step=0, inputs=(table(feature(max_abs)),)))
    assert (r.log.get("input_scale") is not None) == fires


def test_input_scale_threshold_is_configurable() -> None:
    r = make(data=DataThresholds(input_scale=1e4))
    observe(r, BatchSample(step=0, inputs=(table(feature(8000.0)),)))
    assert not r.log.findings
    r = make(data=DataThresholds(input_scale=10.0))
    observe(r, BatchSample(step=0, inputs=(table(feature(80.0)),)))
    assert r.log.get("input_scale") is not None


@pytest.mark.parametrize(("std", "constant"), [(0.0, True), (2.5e-3, True), (2.6e-3, False)])
def test_constant_column_boundary(std: float, constant: bool) -> None:
    # constant when std <= 1e-6 * max_abs = 2.5e-3 for max_abs 2500
    r = make()
    observe(r, BatchSample(step=0, inputs=(table(feature(2500.0, mean=2500.0, std=std)),)))
    f = r.log.get("input_scale")
    assert f is not None
    assert ("It is constant at 2.5e+03 in this batch" in f.message) == constant
    assert ("a constant column left unscaled" in f.message) == constant


@pytest.mark.parametrize(("near_zero", "sparse"), [(0.5, True), (0.49, False)])
def test_near_zero_feature_boundary(near_zero: float, sparse: bool) -> None:
    r = make()
    observe(r, BatchSample(step=0, inputs=(table(feature(3e4, mean=30.0, std=900.0, near_zero=near_zero)),)))
    f = r.log.get("input_scale")
    assert f is not None and f.severity == "warning"
    assert (f"{100 * near_zero:.0f}% of its values are near 0 and a few are huge" in f.message) == sparse
    assert ("a nearly constant column divided by a tiny std" in f.message) == sparse
    assert ("std.clamp_min(1e-3)" in f.message) and ("a raw, unscaled feature" in f.message) != sparse


def test_other_large_features_are_counted_and_listed() -> None:
    r = make()
    top = (feature(5e4, index=7), feature(2e3, index=1), feature(500.0, index=4))
    observe(r, BatchSample(step=0, inputs=(table(*top, n_above=2),)))
    f = r.log.get("input_scale")
    assert f is not None and "column 7 of batch[0]" in f.message
    assert "2 of 8 columns exceed 1e+03 (also 1 (2e+03))." in f.message and "4 (500)" not in f.message


def test_first_layer_batchnorm_makes_a_large_input_info() -> None:
    r = make(RunInfo(normalized_by="bn (BatchNorm1d)"))
    observe(r, BatchSample(step=0, inputs=(table(feature(8000.0)),)))
    f = r.log.get("input_scale")
    assert f is not None and f.severity == "info"
    assert "The model's first layer bn (BatchNorm1d) is a BatchNorm that re-normalizes each feature." in f.message


@pytest.mark.parametrize("case", ["nonfinite count", "inf max"])
def test_nonfinite_input_is_an_error(case: str) -> None:
    r = make()
    inp = table(feature(3.0), nonfinite=2) if case == "nonfinite count" else table(feature(math.inf), nonfinite=0)
    observe(r, BatchSample(step=5, inputs=(inp,)))
    f = r.log.get("input_scale")
    assert f is not None and f.severity == "error" and f.step == 5
    n = 2 if case == "nonfinite count" else 0
    assert f"batch[0] has NaN/inf values in {n} column(s) at step 5 (first: column 2 of batch[0]" in f.message
    assert "missing values left as NaN" in f.message and "impute missing values" in f.message


@pytest.mark.parametrize(
    ("max_abs", "low", "ndim", "fires"),
    [(255.0, 0.0, 4, True), (2.0, 0.0, 5, True), (1.0, 0.0, 4, False), (256.0, 0.0, 4, False), (255.0, -1.0, 4, False)]
    + [(255.0, 0.0, 3, False)],
)
def test_raw_pixels_are_info(max_abs: float, low: float, ndim: int, fires: bool) -> None:
    r = make()
    observe(r, BatchSample(step=0, inputs=(images(max_abs, low, ndim),)))
    f = r.log.get("input_scale")
    assert (f is not None) == fires
    if f is not None:
        assert f.severity == "info" and "looks like raw 0-255 pixels (channel 1 reaches" in f.message
        assert "divide by 255" in f.message


def test_pixel_info_does_not_follow_another_input_scale_finding() -> None:
    r = make()
    observe(r, BatchSample(step=0, inputs=(table(feature(8000.0)), images(255.0))))
    f = r.log.get("input_scale")
    assert f is not None and f.severity == "warning" and "pixels" not in f.message and f.count == 1


def test_empty_or_small_inputs_are_silent() -> None:
    r = make()
    observe(r, BatchSample(step=0, inputs=(table(), table(feature(3.0)))), BatchSample(step=1))
    assert not r.log.findings


# --- label_scale -------------------------------------------------------------------------------------------------
def target(median_abs: float = 1e4) -> TargetScale:
    return TargetScale("batch[1]", median_abs, 1.2e4, 9e3, 5e3, 4e4, "a float tensor with 1 column", label="1")


def totals(step: int, norm: float) -> GradientTotals:
    return GradientTotals(steps=(step - 1, step), totals=(1.0, norm), optimizers=(0, 0))


def test_large_targets_without_a_loss_are_info() -> None:
    r = make()
    observe(r, BatchSample(step=3, target=target()))
    f = r.log.get("label_scale")
    assert f is not None and (f.severity, f.step, f.value) == ("info", 3, 1e4)
    assert "The regression target batch[1] (a float tensor with 1 column) has typical magnitude 1e+04 at step 3" in (
        f.message
    )
    assert "mean 9e+03, std 5e+03, max |y| 4e+04" in f.message and "if the loss is an MSE" in f.message


def test_loss_on_the_targets_squared_scale_is_a_warning_named_with_the_gradient() -> None:
    r = make()
    observe(r, BatchSample(step=3, inputs=(table(feature(3.0)),), target=target(), loss=1e8), totals=totals(3, 5e3))
    f = r.log.get("label_scale")
    assert f is not None and (f.severity, f.step, f.value) == ("warning", 3, 1e4) and f.extra["loss"] == 1e8
    assert "the loss of that batch is 1e+08 and the total gradient norm 5e+03" in f.message
    assert "The inputs look standardized (max |x| 3)" in f.message
    assert "come from the labels, not from the network (not exploding gradients)" in f.message
    assert "normalize the targets" in f.message and "for metrics and inference" in f.message


@pytest.mark.parametrize(("loss", "fires"), [(1e6, True), (9.99e5, False), (math.nan, True), (math.inf, True)])
def test_loss_scale_boundary(loss: float, fires: bool) -> None:
    # on the targets' squared scale: loss >= 1e-2 * (1e4)^2 = 1e6 (or non-finite)
    r = make()
    observe(r, BatchSample(step=0, target=target(), loss=loss))
    assert (r.log.get("label_scale") is not None) == fires


@pytest.mark.parametrize(("median_abs", "fires"), [(300.0, False), (300.5, True), (math.nan, False)])
def test_label_scale_boundary(median_abs: float, fires: bool) -> None:
    r = make()
    observe(r, BatchSample(step=0, target=target(median_abs)))
    assert (r.log.get("label_scale") is not None) == fires


def test_label_thresholds_are_configurable() -> None:
    r = make(data=DataThresholds(label_scale=2e4))
    observe(r, BatchSample(step=0, target=target(), loss=1e8))
    assert not r.log.findings
    r = make(data=DataThresholds(loss_on_target_scale=2.0))  # needs loss >= 2e8
    observe(r, BatchSample(step=0, target=target(), loss=1e8))
    assert not r.log.findings


@pytest.mark.parametrize("inputs", ["large", "nonfinite", "none"])
def test_inputs_not_standardized_or_unknown_say_so(inputs: str) -> None:
    given = {
        "large": (table(feature(5e3)),),
        "nonfinite": (table(feature(3.0), nonfinite=1),),
        "none": (),
    }[inputs]
    r = make()
    observe(r, BatchSample(step=0, inputs=given, target=target(), loss=1e8))
    f = r.log.get("label_scale")
    assert f is not None and "look standardized" not in f.message
    assert "scale. So the huge loss and gradients come from the labels" in f.message
    assert "total gradient norm" not in f.message  # no GradientTotals for the step


def test_gradient_total_of_another_step_is_not_used() -> None:
    r = make()
    observe(r, BatchSample(step=3, target=target(), loss=1e8), totals=totals(7, 5e3))
    f = r.log.get("label_scale")
    assert f is not None and "total gradient norm" not in f.message


def test_data_rules_have_no_state() -> None:
    r = make()
    assert r.state_dict() == {}
    r.load_state_dict({})
