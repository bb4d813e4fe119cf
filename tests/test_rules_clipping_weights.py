"""ClipRules and WeightRules on hand-built records: high_clip_rate from the clip window and the clipping hint from
the gradient totals; weight_norm_growth relative to the median layer and the Adam warm-up hint. Fire and
stay-silent cases, the boundaries of each threshold, the state across a checkpoint, thresholds changed through
``Thresholds(...)``. Expected numbers are worked out by hand."""

from __future__ import annotations

import json
import math

import pytest

from lightning_normcheck.diagnosis.clipping import HINT_KEY, ClipRules
from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import ClipWindow, GradientTotals, RunInfo, UpdateSample, WeightSample
from lightning_normcheck.diagnosis.thresholds import ClipThresholds, GradientThresholds, Thresholds, WeightThresholds
from lightning_normcheck.diagnosis.weights import WARMUP_KEY, WeightRules


# --- high_clip_rate from the clip window -------------------------------------------------------------------------
def clip_rules(run: RunInfo | None = None, th: Thresholds | None = None) -> ClipRules:
    return ClipRules(Context(th or Thresholds(), run=run or RunInfo()), FindingLog())


def window(steps: int = 30, rate: float = 1.0, excess: float = 40.0, recent: float = 1.0, **kw: object) -> ClipWindow:
    args: dict = {"step": steps - 1, "threshold": 1.0, "algorithm": "norm", "window": 50}
    args.update(kw)
    return ClipWindow(rate=rate, mean_excess=excess, steps=steps, recent=recent, **args)


def judge(rules: ClipRules, *records: object, step: int = 29) -> None:
    rules.observe(Flush(step, tuple(records)))  # type: ignore[arg-type]


def test_clipping_on_every_step_far_above_is_an_error_with_its_numbers() -> None:
    r = clip_rules()
    judge(r, window(30, 1.0, 40.0, 1.0))
    f = r.log.get("high_clip_rate")
    assert f is not None and (f.severity, f.step, f.since, f.value) == ("error", 29, 0, 1.0)
    assert (
        "gradients were clipped on 100% of the last 30 optimizer steps (threshold 50% over a window of up to 50)"
        in (f.message)
    )
    assert (
        "still on 100% of the latest steps; the pre-clip total gradient norm was on average 40x the clip value 1"
        in (f.message)
    )
    assert "(~40)" in f.message and "effective LR is about 0.025x the one you set" in f.message
    assert "Likely causes, most likely first: learning rate too high" in f.message and "What to try: lower the LR" in (
        f.message
    )


def test_value_clipping_names_the_max_entry() -> None:
    r = clip_rules()
    judge(r, window(algorithm="value", threshold=0.5, excess=4.0))
    f = r.log.get("high_clip_rate")
    assert f is not None and "max |gradient entry|" in f.message and "total gradient norm" not in f.message
    assert "4x the clip value 0.5 on clipped steps (~2)" in f.message


@pytest.mark.parametrize(
    ("steps", "win", "fires"),
    [(15, 50, False), (16, 50, True), (10, 10, True), (9, 10, False)],  # at least min(window, clip_min_steps=16)
)
def test_clip_window_steps_boundary(steps: int, win: int, fires: bool) -> None:
    r = clip_rules()
    judge(r, window(steps, window=win))
    assert (r.log.get("high_clip_rate") is not None) == fires


@pytest.mark.parametrize(
    ("rate", "recent", "fires"), [(0.5, 1.0, False), (0.51, 1.0, True), (0.9, 0.79, False), (0.9, 0.8, True)]
)
def test_clip_rate_and_recent_boundary(rate: float, recent: float, fires: bool) -> None:
    r = clip_rules()  # rate above high_rate 0.5, and still on at least clip_recent 0.8 of the latest steps
    judge(r, window(rate=rate, recent=recent))
    assert (r.log.get("high_clip_rate") is not None) == fires


@pytest.mark.parametrize(
    ("rate", "excess", "severity"),
    [
        (0.85, 1.6, "info"),  # updates shrunk by under 3x: a mild LR change
        (0.85, math.nan, "info"),
        (0.85, 3.0, "warning"),
        (0.94, 40.0, "warning"),  # not nearly every step
        (0.95, 9.9, "warning"),
        (0.95, 10.0, "error"),
    ],
)
def test_clip_severity_boundaries(rate: float, excess: float, severity: str) -> None:
    r = clip_rules()
    judge(r, window(rate=rate, excess=excess))
    f = r.log.get("high_clip_rate")
    assert f is not None and f.severity == severity


def test_clip_finding_escalates_and_silent_cases() -> None:
    r = clip_rules()
    judge(r, window(12, 1.0, 50.0), window(30, 0.9, 50.0, 0.2), window(30, math.nan))  # too few, stopped, unknown
    assert not r.log.findings
    judge(r, window(30, 0.85, 1.6))
    judge(r, window(40, 1.0, 40.0), step=39)
    (f,) = r.log.findings
    assert (f.severity, f.step, f.count) == ("error", 39, 2) and "100%" in f.message and "40x" in f.message


def test_clip_thresholds_change_the_verdict() -> None:
    w = window(30, 0.9, 5.0, 1.0)
    r = clip_rules(th=Thresholds(clipping=ClipThresholds(clip_min_steps=40)))
    judge(r, w)
    assert not r.log.findings
    r = clip_rules(th=Thresholds(clipping=ClipThresholds(clip_min_steps=10)))
    judge(r, w)
    assert r.log.findings[0].severity == "warning"
    r = clip_rules(th=Thresholds(clipping=ClipThresholds(high_rate=0.95)))
    judge(r, w)
    assert not r.log.findings
    r = clip_rules(th=Thresholds(clipping=ClipThresholds(clip_warn_excess=6.0)))
    judge(r, w)
    assert r.log.findings[0].severity == "info"


# --- the clipping hint from the gradient totals ------------------------------------------------------------------
NORM_CLIP = RunInfo(optimizers=("SGD",), clip_val=1.0, clip_algorithm="norm")


def totals(values: list[float], start: int = 0, optimizer: int = 0) -> GradientTotals:
    n = len(values)
    return GradientTotals(steps=tuple(range(start, start + n)), totals=tuple(values), optimizers=(optimizer,) * n)


def test_hint_when_norm_clipping_acts_on_most_steps() -> None:
    r = clip_rules(NORM_CLIP)
    judge(r, totals([2.0] * 15 + [0.5] * 5), step=19)  # 15 of 20 above the clip value 1: 75%, median 2
    f = r.log.get("high_clip_rate")
    assert f is not None and (f.severity, f.step, f.since, f.value) == ("info", 19, 0, 0.75)
    assert "Gradient clipping at 1 acts on 75% of the last 20 steps (median pre-clip norm 2)" in f.message
    assert "a too-high learning rate in disguise" in f.message and "lower the LR (or add warmup)" in f.message
    assert f.extra["notes"] == [HINT_KEY]


@pytest.mark.parametrize(("n", "fires"), [(15, False), (16, True)])
def test_hint_needs_clip_min_steps(n: int, fires: bool) -> None:
    r = clip_rules(NORM_CLIP)
    judge(r, totals([2.0] * n))
    assert (r.log.get("high_clip_rate") is not None) == fires


@pytest.mark.parametrize(("above", "fires"), [(10, True), (9, False)])  # of 20: at least high_rate 0.5
def test_hint_rate_boundary(above: int, fires: bool) -> None:
    r = clip_rules(NORM_CLIP)
    judge(r, totals([2.0] * above + [0.5] * (20 - above)))
    assert (r.log.get("high_clip_rate") is not None) == fires


def test_hint_is_silent_without_norm_clipping_or_enough_finite_totals() -> None:
    for run in (RunInfo(clip_val=None), RunInfo(clip_val=1.0, clip_algorithm="value")):
        r = clip_rules(run)
        judge(r, totals([2.0] * 30))
        assert not r.log.findings
    r = clip_rules(NORM_CLIP)
    judge(r, totals([2.0] * 15 + [math.nan]))  # 16 totals, 15 finite
    assert not r.log.findings
    r = clip_rules(NORM_CLIP)
    judge(r, totals([2.0] * 30, optimizer=1))  # another optimizer's totals: not against this clip value
    assert not r.log.findings


def test_hint_is_a_sentence_added_once_to_a_finding_there() -> None:
    r = clip_rules(NORM_CLIP)
    judge(r, window(30, 1.0, 40.0), totals([40.0] * 30))
    (f,) = r.log.findings
    assert f.severity == "error" and "Gradient clipping at 1 acts on 100% of the last 30 steps" in f.message
    text = f.message
    judge(r, totals([40.0] * 5, start=30), step=34)
    assert f.message == text and f.extra["notes"] == [HINT_KEY] and text.count("acts on") == 1


def test_hint_window_is_bounded_and_survives_a_checkpoint() -> None:
    th = Thresholds(gradients=GradientThresholds(spike_window=20))
    r = clip_rules(NORM_CLIP, th)
    judge(r, totals([0.5] * 30 + [2.0] * 5), step=34)  # the last 20: 15 below, 5 above
    assert not r.log.findings and len(r.recent) == 20
    r2 = clip_rules(NORM_CLIP, th)
    r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
    judge(r2, totals([2.0] * 6, start=35), step=40)  # the last 20: 9 below, 11 above
    f = r2.log.get("high_clip_rate")
    assert f is not None and "acts on 55% of the last 20 steps" in f.message and f.since == 21
    r3 = clip_rules(NORM_CLIP)
    r3.load_state_dict({})
    assert len(r3.recent) == 0


# --- weight_norm_growth ------------------------------------------------------------------------------------------
def weight_rules(th: WeightThresholds | None = None) -> WeightRules:
    return WeightRules(Context(Thresholds(weights=th or WeightThresholds())), FindingLog())


def sample(rules: WeightRules, step: int, growth: dict[str, float], start: float = 3.0) -> None:
    """Layers at ``growth`` x a start norm of ``start`` (given as the sample's start norms)."""
    names = tuple(growth)
    rules.observe(
        Flush(step, (WeightSample(step, names, tuple(start * g for g in growth.values()), (start,) * len(names)),))
    )


def test_weight_growth_relative_to_the_median_layer() -> None:
    r = weight_rules()
    for s in range(4):  # a CNN head growing 2.3x while the rest is flat: healthy
        sample(r, s, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 2.3})
    assert not r.log.findings
    sample(r, 4, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 8.0})
    assert not r.log.findings  # one sample is not a window
    sample(r, 5, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 9.0})
    (f,) = r.log.findings
    # median growth (1.05 + 1.1) / 2 = 1.075: 9 / 1.075 = 8.37x the median
    assert (f.code, f.layer, f.severity, f.step, f.since) == ("weight_norm_growth", "head", "warning", 5, 4)
    assert f.value == pytest.approx(9.0 / 1.075)
    assert "the weight norm of `head` grew 9x since the start of fit (3 -> 27) while the median layer grew 1.0" in (
        f.message
    )  # 1.075 in binary rounds to either side of 1.07/1.08
    assert "8.37x the median (threshold 5x relative, on 2 sampled steps in a row)" in f.message
    assert "Likely causes, most likely first: a learning rate too high for this layer" in f.message
    assert "What to try: lower this layer's LR" in f.message


def test_weight_growth_without_a_reference_uses_the_first_sample() -> None:
    r = weight_rules()
    for s, head in enumerate([3.0, 12.0, 30.0, 36.0]):
        r.observe(Flush(s, (WeightSample(s, ("a", "b", "c", "head"), (3.0, 3.1, 2.9, head)),)))
    (f,) = r.log.findings
    # growths a, b, c = 1 and head 10x then 12x (median 1): 2 in a row at steps 2 and 3
    assert (f.code, f.layer, f.step, f.since, f.value) == ("weight_norm_growth", "head", 3, 2, 12.0)


@pytest.mark.parametrize(("head", "severity"), [(24.9, "warning"), (25.0, "error")])
def test_weight_growth_error_at_the_square_of_the_threshold(head: float, severity: str) -> None:
    r = weight_rules()
    for s in range(2):
        sample(r, s, {"a": 1.0, "b": 1.0, "c": 1.0, "head": head})
    f = r.log.get("weight_norm_growth", "head")
    assert f is not None and f.severity == severity


@pytest.mark.parametrize(("head", "fires"), [(2.99, False), (3.0, True)])
def test_weight_min_growth_boundary(head: float, fires: bool) -> None:
    r = weight_rules()  # the others shrank to 0.5: the head is 6x the median but must itself grow 3x
    for s in range(2):
        sample(r, s, {"a": 0.5, "b": 0.5, "c": 0.5, "head": head})
    assert (r.log.get("weight_norm_growth", "head") is not None) == fires


@pytest.mark.parametrize(("rel", "fires"), [(4.99, False), (5.0, True)])
def test_weight_relative_growth_boundary(rel: float, fires: bool) -> None:
    r = weight_rules()
    for s in range(2):
        sample(r, s, {"a": 1.0, "b": 1.0, "c": 1.0, "head": rel})
    assert (r.log.get("weight_norm_growth", "head") is not None) == fires


def test_zero_init_and_nonfinite_layers_are_left_out() -> None:
    r = weight_rules()
    for s in range(2):  # "tiny" starts at 0.1 < 0.05 x median start 3 = 0.15: left out, so only 2 layers are left
        names = ("a", "b", "tiny", "nan")
        r.observe(Flush(s, (WeightSample(s, names, (3.0, 30.0, 5.0, math.nan), (3.0, 3.0, 0.1, 3.0)),)))
    assert not r.log.findings


def test_weight_thresholds_change_the_verdict() -> None:
    r = weight_rules(WeightThresholds(weight_samples=3))
    for s in range(2):
        sample(r, s, {"a": 1.0, "b": 1.0, "c": 1.0, "head": 8.0})
    assert not r.log.findings
    sample(r, 2, {"a": 1.0, "b": 1.0, "c": 1.0, "head": 8.0})
    f = r.log.get("weight_norm_growth", "head")
    assert f is not None and (f.step, f.since) == (2, 0) and "on 3 sampled steps in a row" in f.message
    r = weight_rules(WeightThresholds(weight_relative_growth=10.0))
    for s in range(2):
        sample(r, s, {"a": 1.0, "b": 1.0, "c": 1.0, "head": 8.0})
    assert not r.log.findings


def test_weight_state_round_trip() -> None:
    r = weight_rules()
    r.observe(Flush(0, (WeightSample(0, ("a", "b", "c", "head"), (3.0, 3.0, 3.0, 3.0)),)))
    r.observe(Flush(1, (WeightSample(1, ("a", "b", "c", "head"), (3.0, 3.0, 3.0, 30.0)),)))
    r2 = weight_rules()
    r2.load_state_dict(json.loads(json.dumps(r.state_dict())))
    assert r2.start_norms == {"a": 3.0, "b": 3.0, "c": 3.0, "head": 3.0}
    r2.observe(Flush(2, (WeightSample(2, ("a", "b", "c", "head"), (3.0, 3.0, 3.0, 33.0)),)))
    f = r2.log.get("weight_norm_growth", "head")
    assert f is not None and (f.step, f.since, f.value) == (2, 1, 11.0)
    r3 = weight_rules()
    r3.load_state_dict({})
    assert r3.start_norms == {} and r3.relative == {}


# --- the Adam warm-up hint ---------------------------------------------------------------------------------------
def update(step: int = 0, ratios: tuple[float, ...] = (0.1, 0.2, 0.05), **kw: object) -> UpdateSample:
    args: dict = {"optimizer": 0, "optimizer_name": "AdamW", "lr": 0.05, "warming_up": False}
    args.update(kw)
    return UpdateSample(step=step, layers=("net.0", "net.2", "net.4"), ratios=ratios, **args)


def test_warmup_hint_for_adam_at_full_lr_with_large_early_updates() -> None:
    r = weight_rules()
    r.observe(Flush(0, (update(),)))
    f = r.log.get("weight_norm_growth")
    assert f is not None and (f.severity, f.step, f.layer, f.value) == ("info", 0, None, 0.1)
    assert "AdamW runs at its full LR (0.05) from step 0 and the early updates are large" in f.message
    assert "at step 0 the median layer moves 0.1 of its weight norm in one step (largest net.2: 0.2" in f.message
    assert "add a linear LR warm-up over the first few hundred steps" in f.message
    assert f.extra["notes"] == [WARMUP_KEY]
    r.observe(Flush(1, (update(1),)))
    assert r.log.get("weight_norm_growth").message.count("runs at its full LR") == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("kw", "fires"),
    [
        ({"ratios": (0.05, 0.05, 0.05)}, True),
        ({"ratios": (0.0499, 0.0499, 0.2)}, False),
        ({"ratios": (0.1, math.nan, 0.1)}, True),
        ({"ratios": (math.nan,) * 3}, False),
        ({"step": 19}, True),
        ({"step": 20}, False),
        ({"warming_up": True}, False),
        ({"optimizer_name": "SGD"}, False),
        ({"optimizer": 1}, False),
    ],
)
def test_warmup_hint_boundaries(kw: dict, fires: bool) -> None:
    r = weight_rules()
    r.observe(Flush(0, (update(**kw),)))
    assert (r.log.get("weight_norm_growth") is not None) == fires


def test_warmup_thresholds_change_the_verdict() -> None:
    r = weight_rules(WeightThresholds(adam_update_ratio=0.5))
    r.observe(Flush(0, (update(),)))
    assert not r.log.findings
    r = weight_rules(WeightThresholds(early_steps=50))
    r.observe(Flush(30, (update(30),)))
    assert r.log.findings


def test_weight_min_layers_is_configurable() -> None:
    r = weight_rules()  # two layers: no median layer to compare with
    for s in range(2):
        sample(r, s, {"a": 1.0, "head": 30.0})
    assert not r.log.findings
    r = weight_rules(WeightThresholds(weight_min_layers=2))  # median of 1 and 30 is 15.5: 30 / 15.5 < 5
    for s in range(2):
        sample(r, s, {"a": 1.0, "head": 30.0})
    assert not r.log.findings
    r = weight_rules(WeightThresholds(weight_min_layers=2, weight_relative_growth=1.5))  # 30 / 15.5 = 1.94
    for s in range(2):
        sample(r, s, {"a": 1.0, "head": 30.0})
    f = r.log.get("weight_norm_growth", "head")
    assert f is not None and f.value == pytest.approx(30.0 / 15.5)
