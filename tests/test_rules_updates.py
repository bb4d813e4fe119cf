"""UpdateRules on hand-built records: ``zero_gradients`` (a run of exactly-zero totals per optimizer) and
``learning_rate_too_high`` (a high update-to-weight ratio together with its damage), the helpers behind them,
the state across a checkpoint and thresholds changed through ``Thresholds(...)``. Numbers by hand."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import pytest

from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import (
    GradientTotals,
    LossSeries,
    Record,
    RunInfo,
    UpdateSample,
    WeightSample,
)
from lightning_normcheck.diagnosis.thresholds import GradientThresholds, Thresholds, UpdateThresholds
from lightning_normcheck.diagnosis.updates import UpdateRules, loss_rise, lr_to_try, median_growth

INF, NAN = math.inf, math.nan
LAYERS = ("net.0", "net.1", "net.2")


def make(
    th: UpdateThresholds | None = None, run: RunInfo | None = None, grads: GradientThresholds | None = None
) -> UpdateRules:
    thresholds = Thresholds(updates=th or UpdateThresholds(), gradients=grads or GradientThresholds())
    rules = UpdateRules(Context(thresholds), FindingLog())
    if run is not None:
        rules.ctx.run = run
    return rules


def feed(rules: UpdateRules, step: int, *records: Record) -> None:
    rules.observe(Flush(step, tuple(records)))


def totals(values: Sequence[float], start: int = 0, optimizers: Sequence[int] | None = None) -> GradientTotals:
    steps = tuple(range(start, start + len(values)))
    return GradientTotals(steps, tuple(values), tuple(optimizers) if optimizers is not None else (0,) * len(values))


def losses(values: Sequence[float], start: int = 0) -> LossSeries:
    return LossSeries(tuple(range(start, start + len(values))), tuple(values))


def update(
    step: int, ratios: Sequence[float], lr: float = 1.0, optimizer: int = 0, name: str = "AdamW"
) -> UpdateSample:
    return UpdateSample(step, optimizer, name, lr, False, LAYERS[: len(ratios)], tuple(ratios))


def weights(step: int, growth: Sequence[float]) -> WeightSample:
    """Weight norms ``growth`` x a start norm of 2.0 per layer."""
    return WeightSample(step, LAYERS[: len(growth)], tuple(2.0 * g for g in growth), (2.0,) * len(growth))


# ---------------------------------------------------------------------------------------------------------
# zero_gradients
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("zeros", "fires"), [(7, False), (8, True), (12, True)])
def test_zero_grad_steps_in_a_row_boundary(zeros: int, fires: bool) -> None:
    r = make(run=RunInfo(optimizers=("SGD",)))
    feed(r, zeros - 1, totals([0.0] * zeros))
    f = r.log.get("zero_gradients")
    assert (f is not None) == fires
    if f is not None:  # known at the 8th zero step (step 7), evidence from the first (step 0), reported once
        assert (f.severity, f.layer, f.step, f.since, f.count, f.value) == ("error", None, 7, 0, 1, 0.0)
        assert "optimizer 0 (SGD) stepped 8 times in a row (steps 0-7)" in f.message
        assert "Likely causes, most likely first: `opt.zero_grad()` called between `backward` and `step`" in f.message


def test_zero_run_counts_across_flushes() -> None:
    r = make()
    feed(r, 4, totals([1.0] + [0.0] * 4))  # steps 1-4: 4 zeros
    assert not r.log.findings
    feed(r, 8, totals([0.0] * 4, start=5))  # steps 5-8: the 8th zero at step 8
    f = r.log.get("zero_gradients")
    assert f is not None and (f.step, f.since) == (8, 1)
    assert "optimizer 0 stepped 8 times in a row (steps 1-8)" in f.message  # no RunInfo: no class name


def test_one_nonzero_total_resets_the_run() -> None:
    r = make()
    feed(r, 14, totals([0.0] * 7 + [1e-3] + [0.0] * 7))  # 7 zeros, a real step, 7 zeros
    assert not r.log.findings
    feed(r, 15, totals([0.0], start=15))  # the 8th zero of the second run
    f = r.log.get("zero_gradients")
    assert f is not None and (f.step, f.since) == (15, 8)


def test_nonfinite_total_is_not_zero() -> None:
    r = make()  # a NaN gradient is a gradient (nonfinite_gradients' business): it breaks the run of zeros
    feed(r, 14, totals([0.0] * 7 + [NAN] + [0.0] * 7))
    assert not r.log.findings


def test_skipped_batches_stay_silent_forever() -> None:
    # training_step returning None on every other batch: single zero steps between real ones, for 1000 steps
    r = make()
    for start in range(0, 1000, 50):
        feed(r, start + 49, totals([0.0 if s % 2 else 1.0 for s in range(start, start + 50)], start=start))
    assert not r.log.findings
    r = make()  # two skipped batches in a row are no run of 8 either
    feed(r, 299, totals([0.0 if s % 3 else 1.0 for s in range(300)]))
    assert not r.log.findings


def test_frozen_parameters_leave_a_nonzero_total() -> None:
    # frozen parameters (grad None) are not in the total at all: a small finite total is a working optimizer
    r = make()
    feed(r, 99, totals([1e-30] * 100))
    assert not r.log.findings


def test_two_optimizers_are_counted_separately() -> None:
    # a GAN: optimizer 0 at even steps, fine; optimizer 1 at odd steps, every total zero
    run = RunInfo(optimizers=("Adam", "SGD"))
    r = make(run=run)
    values = [1.0 if s % 2 == 0 else 0.0 for s in range(20)]
    feed(r, 19, totals(values, optimizers=[s % 2 for s in range(20)]))
    f = r.log.get("zero_gradients")
    # optimizer 1's zeros are at 1, 3, ..., 15: its 8th at step 15; optimizer 0's real steps do not reset it
    assert f is not None and (f.step, f.since) == (15, 1) and len(r.log) == 1
    assert "optimizer 1 (SGD) stepped 8 times in a row (steps 1-15)" in f.message
    assert "optimizer 0" not in f.message
    r = make(run=run)  # the same totals, optimizer indices swapped: optimizer 0 is named
    feed(r, 19, totals([1.0 if s % 2 else 0.0 for s in range(20)], optimizers=[s % 2 for s in range(20)]))
    f = r.log.get("zero_gradients")
    assert f is not None and (f.step, f.since) == (14, 0) and "optimizer 0 (Adam)" in f.message


def test_optimizer_beyond_the_run_info_is_named_by_index() -> None:
    r = make(run=RunInfo(optimizers=("Adam",)))
    feed(r, 7, totals([0.0] * 8, optimizers=[2] * 8))
    f = r.log.get("zero_gradients")
    assert f is not None and "optimizer 2 stepped 8 times" in f.message and "optimizer 2 (" not in f.message


def test_a_second_run_of_zeros_counts_again() -> None:
    r = make()
    feed(r, 20, totals([0.0] * 10 + [1.0] + [0.0] * 10))  # 8th zeros at steps 7 and 18
    f = r.log.get("zero_gradients")
    assert f is not None and len(r.log) == 1 and (f.step, f.since, f.count, f.last_step) == (7, 0, 2, 18)


def test_start_of_a_new_fit_resets_the_run() -> None:
    r = make()
    feed(r, 4, totals([0.0] * 5))
    r.start()
    feed(r, 7, totals([0.0] * 3, start=5))
    assert not r.log.findings


@pytest.mark.parametrize(("need", "fires"), [(3, True), (4, False)])
def test_zero_grad_steps_threshold_moves_the_verdict(need: int, fires: bool) -> None:
    r = make(UpdateThresholds(zero_grad_steps=need))
    feed(r, 4, totals([1.0, 0.0, 0.0, 0.0, 1.0]))
    f = r.log.get("zero_gradients")
    assert (f is not None) == fires
    if f is not None:
        assert (f.step, f.since) == (3, 1) and "stepped 3 times in a row (steps 1-3)" in f.message


def test_zero_run_survives_a_checkpoint() -> None:
    r = make()
    feed(r, 4, totals([0.0] * 5))
    state = json.loads(json.dumps(r.state_dict()))
    assert state["version"] == 1 and state["zero_run"] == {"0": [0, 5]}
    resumed = make()
    resumed.load_state_dict(state)
    feed(resumed, 7, totals([0.0] * 3, start=5))
    f = resumed.log.get("zero_gradients")
    assert f is not None and (f.step, f.since) == (7, 0)
    fresh = make()
    fresh.load_state_dict({})  # missing keys: defaults
    feed(fresh, 7, totals([0.0] * 3, start=5))
    assert not fresh.log.findings


# ---------------------------------------------------------------------------------------------------------
# the helpers
# ---------------------------------------------------------------------------------------------------------
def test_lr_to_try() -> None:
    assert lr_to_try(1.0, 0.99, 1e-3) == pytest.approx(1e-3 / 0.99)
    assert lr_to_try(0.3, 0.6, 1e-3) == pytest.approx(5e-4)  # the ratio scales with the LR: 0.6 -> 1e-3 is /600
    assert lr_to_try(0.1, 0.0, 1e-3) == 0.1  # no ratio: the LR as it is


def test_loss_rise() -> None:
    # the smallest of the latest 3 (8) over the smallest of the first 3 (4)
    assert loss_rise([4.0, 5.0, 6.0, 7.0], [9.0, 10.0, 8.0], 3) == 2.0
    assert loss_rise([6.0, 4.0, 5.0, 1.0], [1.0, 8.0, 9.0, 10.0], 3) == 2.0  # only the first 3 / last 3 count
    assert loss_rise([4.0, 4.0], [8.0, 8.0, 8.0], 3) is None  # too few first losses
    assert loss_rise([4.0, 4.0, 4.0], [8.0, 8.0], 3) is None  # too few latest ones
    assert loss_rise([0.0, 1.0, 1.0], [8.0, 8.0, 8.0], 3) is None  # a start of 0 gives no ratio
    assert loss_rise([INF, INF, INF], [8.0, 8.0, 8.0], 3) is None  # nor a non-finite start
    # non-finite latest losses count as inf: all of them -> inf; one among finite ones -> the finite minimum
    assert loss_rise([4.0, 4.0, 4.0], [NAN, INF, NAN], 3) == INF
    assert loss_rise([4.0, 4.0, 4.0], [NAN, 10.0, 12.0], 3) == 2.5


def test_median_growth() -> None:
    assert median_growth(weights(0, (1.0, 20.0, 3.0))) == 3.0
    assert median_growth(WeightSample(0, LAYERS[:2], (4.0, 9.0), None)) is None  # no start norms
    # a zero start norm is skipped: (30/3, 8/2) -> median of 10 and 4 is 7
    assert median_growth(WeightSample(0, LAYERS, (5.0, 30.0, 8.0), (0.0, 3.0, 2.0))) == 7.0
    assert median_growth(WeightSample(0, LAYERS[:1], (5.0,), (0.0,))) is None  # nothing left
    assert median_growth(WeightSample(0, LAYERS, (NAN, INF, 4.0), (1.0, 1.0, 2.0))) == INF  # non-finite: inf


# ---------------------------------------------------------------------------------------------------------
# learning_rate_too_high
# ---------------------------------------------------------------------------------------------------------
RISE_65 = (4.2, 4.0, 4.1, 26.0, 50.0, 100.0)  # min of the first 3: 4.0, of the latest 3: 26 -> 6.5x
RISE_225 = (4.2, 4.0, 4.1, 9.0, 10.0, 12.0)  # 9 / 4 = 2.25x


def test_high_ratio_with_a_loss_rise_is_reported() -> None:
    r = make()
    feed(r, 5, losses(RISE_225), update(5, (0.9, 1.0, 0.99), lr=1.0))  # median ratio 0.99
    f = r.log.get("learning_rate_too_high")
    assert f is not None and (f.severity, f.layer, f.step, f.since) == ("warning", None, 5, 5)
    assert f.value == 0.99 and f.extra["lr"] == pytest.approx(1e-3 / 0.99)
    assert "AdamW at lr=1 moved the median layer by up to 0.99 of its weight norm in one step" in f.message
    assert "threshold 0.5" in f.message and "the loss of the latest 3 steps is 2.25x that of the first ones" in (
        f.message
    )
    assert f"lower the learning rate to about {1e-3 / 0.99:.1g} (it brings the ratio to ~0.001)" in f.message
    assert "about 0.001 " in f.message
    assert "add a linear warm-up" in f.message and "clip gradients" in f.message  # the registry's other fixes
    assert "weight norm grew" not in f.message


def test_lr_to_try_scales_with_the_lr() -> None:
    r = make()
    feed(r, 5, losses(RISE_225), update(5, (0.6,), lr=0.3, name="SGD"))
    f = r.log.get("learning_rate_too_high")
    # 0.3 x 1e-3 / 0.6 = 5e-4
    assert f is not None and f.extra["lr"] == pytest.approx(5e-4) and f.value == 0.6
    assert "SGD at lr=0.3 moved the median layer by up to 0.6" in f.message
    assert f"about {5e-4:.1g} " in f.message and "about 0.0005 " in f.message


def test_no_damage_stays_silent() -> None:
    r = make()
    falling = (4.2, 4.0, 4.1, 3.0, 2.5, 2.0)  # a run that learns
    feed(r, 5, losses(falling), weights(5, (1.5, 2.0, 3.0)), update(5, (0.9, 1.0, 0.99)))
    assert not r.log.findings
    r = make()  # no loss and no weights at all
    feed(r, 5, update(5, (0.9, 1.0, 0.99)))
    assert not r.log.findings


def test_damage_with_low_ratios_stays_silent() -> None:
    r = make()
    feed(r, 5, losses(RISE_65), weights(5, (200.0,) * 3), update(5, (0.3, 0.4, 0.45)))  # median 0.4
    assert not r.log.findings


@pytest.mark.parametrize(("ratios", "fires"), [((0.4, 0.5, 0.6), True), ((0.4, 0.49, 0.6), False)])
def test_update_ratio_boundary(ratios: tuple[float, ...], fires: bool) -> None:
    r = make()
    feed(r, 5, losses(RISE_225), update(5, ratios))
    assert (r.log.get("learning_rate_too_high") is not None) == fires


@pytest.mark.parametrize(
    ("latest", "severity"),
    [
        ((7.96, 9.0, 9.0), None),  # 7.96 / 4 = 1.99: no damage
        ((8.0, 9.0, 9.0), "warning"),  # 2.0: lr_loss_rise
        ((20.0, 8.0, 30.0), "warning"),  # the smallest of the latest counts: 2.0
        ((15.9, 20.0, 20.0), "warning"),  # 3.975
        ((16.0, 20.0, 20.0), "error"),  # 4.0 = lr_loss_rise**2
    ],
)
def test_loss_rise_boundaries_and_severity(latest: tuple[float, ...], severity: str | None) -> None:
    r = make()
    feed(r, 5, losses((4.2, 4.0, 4.1, *latest)), update(5, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert (f.severity if f else None) == severity


def test_one_bad_batch_is_no_loss_damage() -> None:
    r = make()  # the latest 3 must all be high: one 100x loss among falling ones is not
    feed(r, 5, losses((4.2, 4.0, 4.1, 3.0, 400.0, 2.9)), update(5, (1.0,)))
    assert not r.log.findings


def test_nonfinite_latest_loss_counts_as_a_rise() -> None:
    r = make()
    feed(r, 5, losses((4.2, 4.0, 4.1, NAN, INF, NAN)), update(5, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and f.severity == "error"  # inf >= lr_loss_rise**2
    assert "the loss of the latest 3 steps is infx" in f.message


@pytest.mark.parametrize(
    ("growth", "severity"),
    [
        ((9.9, 9.9, 9.9), None),
        ((1.0, 10.0, 500.0), "warning"),  # median 10 = lr_weight_growth
        ((99.0, 99.0, 99.0), "warning"),
        ((100.0, 100.0, 100.0), "error"),  # lr_weight_growth**2
        ((NAN, INF, 1.0), "error"),  # non-finite norms grow infinitely
    ],
)
def test_weight_growth_is_damage_too(growth: tuple[float, ...], severity: str | None) -> None:
    r = make()
    feed(r, 5, weights(5, growth), update(5, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert (f.severity if f else None) == severity
    if f is not None:
        assert "the median layer's weight norm grew" in f.message and "the loss of the latest" not in f.message


def test_weights_without_a_start_are_no_evidence() -> None:
    r = make()
    feed(r, 5, WeightSample(5, LAYERS, (1e3, 1e3, 1e3), None), update(5, (1.0,)))
    assert not r.log.findings


def test_both_damages_are_named_and_either_makes_it_an_error() -> None:
    r = make()  # loss 2.25x (warning level) with weights 100x (error level)
    feed(r, 5, losses(RISE_225), weights(5, (100.0,) * 3), update(5, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and f.severity == "error"
    assert "the loss of the latest 3 steps is 2.25x that of the first ones; the median layer's weight norm grew" in (
        f.message
    )
    assert "grew 100x since the start of fit" in f.message


def test_a_high_ratio_remembered_until_the_damage_shows() -> None:
    r = make()
    feed(r, 2, losses((4.2, 4.0, 4.1)), update(0, (0.99,)), update(2, (0.8,)))  # no damage yet
    assert not r.log.findings
    feed(r, 10, losses((9.0, 9.0, 9.0), start=8), update(10, (0.01,)))  # damage, a low ratio now
    f = r.log.get("learning_rate_too_high")
    # since = the first high sample, ratio = the worst one remembered, the LR to try from it
    assert f is not None and (f.step, f.since, f.value) == (10, 0, 0.99)
    assert "sampled steps from step 0 on" in f.message and f.extra["lr"] == pytest.approx(1e-3 / 0.99)


def test_damage_needs_a_sample_to_be_judged() -> None:
    r = make()
    feed(r, 0, update(0, (0.99,)))
    feed(r, 5, losses(RISE_65))  # no UpdateSample in this flush: nothing judged yet
    assert not r.log.findings
    feed(r, 6, update(6, (0.2,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and (f.step, f.since, f.severity) == (6, 0, "error")


# --- a spike is no evidence --------------------------------------------------------------------------------------
SPIKE_RUN = [1.0] * 8 + [20.0, 1.0]  # step 8 is 20x the median 1 of 8 totals before it


def test_high_ratio_at_a_spike_step_is_no_evidence() -> None:
    r = make()
    feed(r, 9, totals(SPIKE_RUN), losses(RISE_225), update(8, (1.0,)))
    assert not r.log.findings
    r = make()  # the same ratio one step later, after the spike: evidence
    feed(r, 9, totals(SPIKE_RUN), losses(RISE_225), update(9, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and (f.step, f.since) == (9, 9)


def test_a_spike_of_an_earlier_flush_is_remembered() -> None:
    r = make()
    feed(r, 9, totals(SPIKE_RUN))
    feed(r, 12, losses(RISE_225), update(8, (1.0,)))
    assert not r.log.findings


def test_a_spike_is_judged_per_optimizer() -> None:
    r = make()  # optimizer 1 spiked at step 8; optimizer 0's sample at step 8 is still evidence
    feed(r, 9, totals(SPIKE_RUN, optimizers=[1] * 10), totals([1.0] * 10), losses(RISE_225), update(8, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and f.step == 8


@pytest.mark.parametrize(
    ("values", "spike"),
    [
        ([1.0] * 8 + [10.0], False),  # exactly spike_factor x the median: no spike
        ([1.0] * 8 + [10.01], True),
        ([1.0] * 7 + [100.0], False),  # 7 totals before it: too little history to call it a spike
        ([1.0] * 4 + [0.0] * 4 + [100.0], False),  # zero totals are no history
    ],
)
def test_spike_boundaries(values: list[float], spike: bool) -> None:
    r = make()
    step = len(values) - 1
    feed(r, step, totals(values), losses(RISE_225), update(step, (1.0,)))
    assert (r.log.get("learning_rate_too_high") is None) == spike


def test_spike_thresholds_come_from_the_gradient_thresholds() -> None:
    r = make(grads=GradientThresholds(spike_factor=50.0))  # 20x is no spike now: evidence
    feed(r, 9, totals(SPIKE_RUN), losses(RISE_225), update(8, (1.0,)))
    assert r.log.get("learning_rate_too_high") is not None


# --- thresholds and state ----------------------------------------------------------------------------------------
def test_thresholds_change_the_verdict() -> None:
    r = make(UpdateThresholds(lr_update_ratio=0.2))
    feed(r, 5, losses(RISE_225), update(5, (0.3,)))
    assert r.log.get("learning_rate_too_high") is not None
    r = make(UpdateThresholds(lr_loss_rise=3.0))  # 2.25x is no damage now; 6.5x is a warning (< 9)
    feed(r, 5, losses(RISE_225), update(5, (1.0,)))
    assert not r.log.findings
    feed(r, 11, losses((26.0, 50.0, 100.0), start=6), update(11, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and f.severity == "warning"
    r = make(UpdateThresholds(lr_loss_steps=2))  # first 2: min 4.0; latest 2 of (9, 8, 4.5): 4.5 -> 1.125x
    feed(r, 5, losses((4.2, 4.0, 4.1, 9.0, 8.0, 4.5)), update(5, (1.0,)))
    assert not r.log.findings
    r = make(UpdateThresholds(lr_weight_growth=5.0))  # 6x is damage now, 25x an error
    feed(r, 5, weights(5, (6.0,) * 3), update(5, (1.0,)))
    f = r.log.get("learning_rate_too_high")
    assert f is not None and f.severity == "warning"
    r = make(UpdateThresholds(lr_target_ratio=1e-2))  # the LR to try aims at 1e-2: 1.0 x 1e-2 / 0.5
    feed(r, 5, losses(RISE_225), update(5, (0.5,)))
    f = r.log.get("learning_rate_too_high")
    assert (
        f is not None
        and f.extra["lr"] == pytest.approx(0.02)
        and "about 0.02 (it brings the ratio to ~0.01)" in (f.message)
    )


@pytest.mark.parametrize(("samples", "fires"), [(2, False), (1, True)])
def test_lr_samples_threshold(samples: int, fires: bool) -> None:
    r = make(UpdateThresholds(lr_samples=samples))
    feed(r, 5, losses(RISE_225), update(5, (1.0,)))
    assert (r.log.get("learning_rate_too_high") is not None) == fires


def test_lr_samples_two_counts_the_high_samples_only() -> None:
    r = make(UpdateThresholds(lr_samples=2))
    feed(r, 5, losses(RISE_225), update(3, (1.0,)), update(4, (0.1,)))  # one high sample
    assert not r.log.findings
    feed(r, 8, update(8, (0.7,)))  # the second high one
    f = r.log.get("learning_rate_too_high")
    assert f is not None and (f.step, f.since, f.value) == (8, 3, 1.0)


def test_state_round_trip_keeps_losses_growth_and_high_samples() -> None:
    r = make()
    feed(r, 3, losses((4.2, 4.0, 4.1, 3.9)), weights(3, (20.0,) * 3), update(2, (0.3,)), update(3, (0.99,)))
    f = r.log.get("learning_rate_too_high")  # the weights grew 20x: damage
    assert f is not None and (f.step, f.since) == (3, 3)
    state = json.loads(json.dumps(r.state_dict()))
    assert state["first_losses"] == state["latest_losses"] == [4.2, 4.0, 4.1, 3.9]
    assert state["growth"] == 20.0 and state["high"] == {"0": [[3, 0.99]]} and state["zero_run"] == {}


def test_state_round_trip_continues_the_judgement() -> None:
    r = make()
    feed(r, 3, losses((4.2, 4.0, 4.1, 3.9)), update(2, (0.99,)))  # a high ratio, no damage yet
    assert not r.log.findings
    state = json.loads(json.dumps(r.state_dict()))
    assert state["version"] == 1 and state["high"] == {"0": [[2, 0.99]]} and state["growth"] is None
    resumed = make()
    resumed.load_state_dict(state)
    feed(resumed, 7, losses((9.0, 9.5, 10.0), start=5), update(7, (0.1,)))
    f = resumed.log.get("learning_rate_too_high")
    # the first losses were kept (4.0 is their smallest), the latest 3 are 9-10: 2.25x
    assert f is not None and (f.step, f.since, f.value, f.severity) == (7, 2, 0.99, "warning")
    fresh = make()
    fresh.load_state_dict({})  # missing keys: defaults, nothing remembered
    feed(fresh, 7, losses((9.0, 9.5, 10.0), start=5), update(7, (0.1,)))
    assert not fresh.log.findings


def test_state_round_trip_keeps_the_weight_growth() -> None:
    r = make()
    feed(r, 3, weights(3, (20.0,) * 3), update(3, (0.1,)))
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(r.state_dict())))
    feed(resumed, 5, update(5, (0.9,)))
    f = resumed.log.get("learning_rate_too_high")
    assert f is not None and f.severity == "warning" and "grew 20x" in f.message


def test_state_round_trip_keeps_every_high_sample() -> None:
    def run(resume: bool) -> tuple[int, int, float | None]:
        r = make()
        feed(r, 3, losses((4.2, 4.0, 4.1, 3.9)), update(0, (0.99,)), update(2, (0.6,)))  # two high, no damage
        if resume:
            resumed = make()
            resumed.load_state_dict(json.loads(json.dumps(r.state_dict())))
            r = resumed
        feed(r, 7, losses((9.0, 9.5, 10.0), start=5), update(7, (0.1,)))
        f = r.log.get("learning_rate_too_high")
        assert f is not None
        return f.step, f.since, f.value

    assert run(resume=False) == (7, 0, 0.99)
    assert run(resume=True) == run(resume=False)


def test_state_round_trip_keeps_the_spike_memory() -> None:
    def run(resume: bool) -> bool:
        r = make()
        feed(r, 9, totals(SPIKE_RUN))
        if resume:
            resumed = make()
            resumed.load_state_dict(json.loads(json.dumps(r.state_dict())))
            r = resumed
        feed(r, 12, losses(RISE_225), update(8, (1.0,)))
        return r.log.get("learning_rate_too_high") is None

    assert run(resume=False)
    assert run(resume=True)
