"""SpikeRules on hand-built records: what is a spike (factor, history, fall-back), what is not (a climb, a new
plateau, skipped steps), batches and optimizers named, causes ranked by the task, one finding summed up over
flushes, the state across a checkpoint, thresholds changed through ``Thresholds(...)``. Numbers by hand."""

from __future__ import annotations

import json
import math

import pytest

from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.records import BatchSample, GradientTotals, RunInfo, StepBatches
from lightning_normcheck.diagnosis.spikes import MAX_STEPS_PER_BATCH, SpikeRules
from lightning_normcheck.diagnosis.thresholds import GradientThresholds, Thresholds


def make(run: RunInfo | None = None, th: GradientThresholds | None = None) -> SpikeRules:
    return SpikeRules(Context(Thresholds(gradients=th or GradientThresholds()), run=run or RunInfo()), FindingLog())


def feed(rules: SpikeRules, values: dict[int, float], *extra: object, optimizers: dict[int, int] | None = None) -> None:
    """One flush of ``step -> total`` (optimizer 0 unless given), at the last step."""
    steps = sorted(values)
    opts = tuple((optimizers or {}).get(s, 0) for s in steps)
    rec = GradientTotals(steps=tuple(steps), totals=tuple(values[s] for s in steps), optimizers=opts)
    rules.observe(Flush(steps[-1], (rec, *extra)))  # type: ignore[arg-type]


def flat(n: int, spikes: dict[int, float] | None = None, start: int = 0) -> dict[int, float]:
    """Totals of 1.0 with ``spikes`` planted."""
    return {s: (spikes or {}).get(s, 1.0) for s in range(start, start + n)}


# --- what is a spike ---------------------------------------------------------------------------------------------
def test_spike_that_falls_back_is_found_when_it_falls_back() -> None:
    r = make()
    feed(r, flat(30, {20: 100.0}))
    f = r.log.get("gradient_spikes")
    assert f is not None and (f.severity, f.layer, f.since, f.step, f.count) == ("warning", None, 20, 21, 1)
    assert f.value == 100.0 and f.extra["steps"] == [20] and f.extra["factors"] == [100.0]
    assert "spiked 1 time(s) to 10x+ its running median" in f.message
    assert "worst 100x at step 20, norm 100 vs median 1; a clean run stays within 3x): step 20 (100x, norm 100)" in (
        f.message
    )


def test_baseline_is_the_larger_of_the_window_and_recent_medians() -> None:
    # 1.0, 1.1, 1.2 repeating over steps 0-19: the 20-value median is 1.1 (7x 1.0, 7x 1.1, 6x 1.2) and the
    # last 8 (steps 12-19: 1.0 1.1 1.2 1.0 1.1 1.2 1.0 1.1) also 1.1: factor 100 / 1.1
    r = make()
    feed(r, {s: 100.0 if s == 20 else 1.0 + 0.1 * (s % 3) for s in range(25)})
    f = r.log.get("gradient_spikes")
    assert f is not None and f.value == pytest.approx(100.0 / 1.1) and f.extra["factors"] == [90.91]
    # a recent rise lifts the baseline: 40 steps at 1, then 8 at 4 -> medians 1 and 4: 35 is 8.75x, no spike
    r = make()
    values = {s: 1.0 if s < 40 else 4.0 for s in range(48)}
    feed(r, {**values, 48: 35.0, 49: 4.0})
    assert r.log.get("gradient_spikes") is None


@pytest.mark.parametrize(("peak", "fires"), [(10.0, False), (10.01, True)])
def test_spike_factor_boundary(peak: float, fires: bool) -> None:
    r = make()
    feed(r, flat(30, {20: peak}))
    assert (r.log.get("gradient_spikes") is not None) == fires


@pytest.mark.parametrize(("step", "fires"), [(7, False), (8, True)])
def test_history_needed_before_judging(step: int, fires: bool) -> None:
    r = make()  # spike_min_history = 8 values before the step
    feed(r, flat(20, {step: 100.0}))
    assert (r.log.get("gradient_spikes") is not None) == fires


@pytest.mark.parametrize(("after", "fires"), [(20.0, True), (20.5, False), (3.0, True)])
def test_fall_back_boundary(after: float, fires: bool) -> None:
    # falls back to max(3 x median 1, peak 100 / 5) = 20 or below
    r = make()
    feed(r, {**flat(20), 20: 100.0, 21: after, 22: after, 23: after})
    assert (r.log.get("gradient_spikes") is not None) == fires


@pytest.mark.parametrize(("high_steps", "fires"), [(2, True), (3, False)])
def test_fall_back_within_three_steps(high_steps: int, fires: bool) -> None:
    # a 12x spike at 20, then `high_steps` steps at 5 (above its fall-back level max(3 x 1, 12 / 5) = 3, below a
    # spike's 10 x 1), then 1: back on the 3rd step after it, not on the 4th
    r = make()
    values = {**flat(20), 20: 12.0, **{21 + i: 5.0 for i in range(high_steps)}}
    values[21 + high_steps] = 1.0
    feed(r, values)
    f = r.log.get("gradient_spikes")
    assert (f is not None) == fires
    if f is not None:
        assert (f.since, f.step) == (20, 23)


def test_a_climb_or_a_new_plateau_is_no_spike() -> None:
    r = make()
    feed(r, {s: 1.3**s for s in range(60)})
    r2 = make()
    feed(r2, {s: 0.01 if s < 12 else 1.0 + 0.05 * (s % 2) for s in range(40)})
    assert not r.log.findings and not r2.log.findings


def test_zero_totals_are_no_samples_and_nonfinite_drops_pending() -> None:
    r = make()  # every other step has no gradient: the median stays 1, the spike is still 100x
    feed(r, {s: 0.0 if s % 2 else (100.0 if s == 30 else 1.0) for s in range(34)})
    f = r.log.get("gradient_spikes")
    assert f is not None and f.value == 100.0 and (f.since, f.step) == (30, 32)
    r = make()  # a NaN right after the spike: the spike is not confirmed
    feed(r, {**flat(20), 20: 100.0, 21: math.nan, 22: 1.0})
    assert not r.log.findings


# --- where, how many, why ----------------------------------------------------------------------------------------
def test_batches_are_named_looking_back_to_the_batch_start() -> None:
    r = make()
    batches = StepBatches({17: "epoch 0, batch 17", 30: "epoch 1, batch 3"})
    feed(r, flat(40, {17: 50.0, 31: 60.0}), batches)
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["batches"] == ["epoch 0, batch 17", "epoch 1, batch 3"]
    assert "step 17 (epoch 0, batch 17, 50x, norm 50); step 31 (epoch 1, batch 3, 60x, norm 60)" in f.message


@pytest.mark.parametrize(("gap", "named"), [(MAX_STEPS_PER_BATCH, True), (MAX_STEPS_PER_BATCH + 1, False)])
def test_batch_lookback_is_bounded(gap: int, named: bool) -> None:
    r = make()
    feed(r, flat(40, {30: 50.0}), StepBatches({30 - gap: "epoch 0, batch 2"}))
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["batches"] == (["epoch 0, batch 2"] if named else [""])


def test_batch_of_an_earlier_flush_is_remembered_for_the_lookback() -> None:
    r = make()
    feed(r, flat(20), StepBatches({19: "epoch 0, batch 19"}))
    feed(r, {20: 100.0, 21: 1.0})
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["batches"] == ["epoch 0, batch 19"]


def test_each_optimizer_is_judged_on_its_own_scale_and_named() -> None:
    # two optimizers step once each per batch: optimizer 0 at even steps (~1), optimizer 1 at odd steps (~1e4)
    run = RunInfo(optimizers=("Adam", "SGD"))
    values = {s: (1.0 if s % 2 == 0 else 1e4) for s in range(60)}
    opts = {s: s % 2 for s in range(60)}
    batches = StepBatches({s: f"epoch 0, batch {s // 2}" for s in range(0, 60, 2)})
    r = make(run)
    feed(r, values, batches, optimizers=opts)
    assert not r.log.findings  # mixed into one series, every odd step would be 1e4x
    r = make(run)
    feed(r, {**values, 41: 2e5}, batches, optimizers=opts)  # optimizer 1 at batch 20: 20x its own median
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["steps"] == [41] and f.value == 20.0
    assert f.extra["batches"] == ["epoch 0, batch 20, optimizer 1 (SGD)"]
    assert "step 41 (epoch 0, batch 20, optimizer 1 (SGD), 20x, norm 2e+05)" in f.message


def test_one_optimizer_is_not_named() -> None:
    r = make(RunInfo(optimizers=("Adam",)))
    feed(r, flat(30, {20: 100.0}), StepBatches({20: "epoch 0, batch 20"}))
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["batches"] == ["epoch 0, batch 20"]


@pytest.mark.parametrize(
    ("task", "first"),
    [
        ("classification", "a rare class the model keeps getting wrong"),
        ("regression", "a corrupted target"),
        ("", "a corrupted or mislabeled example"),
    ],
)
def test_causes_are_ranked_by_the_latest_task(task: str, first: str) -> None:
    r = make()
    feed(r, flat(10), BatchSample(step=0, task="regression" if task == "classification" else "classification"))
    feed(r, flat(20, {15: 100.0}, start=10), BatchSample(step=10, task=task))
    f = r.log.get("gradient_spikes")
    expected = first if task else "a rare class"  # "": unknown, the task seen before stays
    assert f is not None and f"Likely causes, most likely first: {expected}" in f.message
    assert "class weights (CrossEntropyLoss(weight=...))" in f.message and "log the sample indices" in f.message


def test_clipping_is_described() -> None:
    r = make(RunInfo(clip_val=20.0, clip_algorithm="norm"))
    feed(r, flat(30, {20: 100.0}))
    f = r.log.get("gradient_spikes")
    assert f is not None and "Clipping is on (gradient_clip_val=20, gradient_clip_algorithm='norm')" in f.message
    assert "Nothing clips" not in f.message
    r = make(RunInfo(clip_val=None))
    feed(r, flat(30, {20: 100.0}))
    f = r.log.get("gradient_spikes")
    assert f is not None and "Nothing clips the gradients: clip gradients (gradient_clip_val=1.0)" in f.message


def test_one_finding_revised_over_flushes() -> None:
    r = make()
    feed(r, flat(30, {20: 100.0}))
    feed(r, flat(20, {40: 50.0}, start=30))
    f = r.log.get("gradient_spikes")
    assert f is not None and len(r.log) == 1
    assert (f.since, f.step, f.last_step, f.count) == (20, 21, 41, 2)
    assert f.extra["steps"] == [20, 40] and f.extra["factors"] == [100.0, 50.0] and f.value == 100.0
    assert "spiked 2 time(s)" in f.message and "step 20 (100x, norm 100); step 40 (50x, norm 50)" in f.message


def test_listed_spikes_are_bounded_and_the_message_names_ten() -> None:
    spikes = {20 + 3 * i: 100.0 for i in range(12)}  # every third step, falling back in between
    r = make(th=GradientThresholds(spike_max_listed=11))
    feed(r, flat(60, spikes))
    f = r.log.get("gradient_spikes")
    assert f is not None and f.count == 12 and len(f.extra["steps"]) == 11
    assert "spiked 12 time(s)" in f.message and "step 47 (100x" in f.message and "step 50 (" not in f.message
    assert "and 2 more" in f.message


def test_steps_already_seen_are_skipped() -> None:
    r = make()
    feed(r, flat(30, {20: 100.0}))
    feed(r, flat(30, {20: 100.0}))  # the same steps again (a replayed flush): nothing new
    f = r.log.get("gradient_spikes")
    assert f is not None and f.count == 1


# --- state and thresholds ----------------------------------------------------------------------------------------
def test_state_round_trip_keeps_the_window_and_a_pending_spike() -> None:
    run = RunInfo(optimizers=("Adam", "Adam"))
    r = make(run)
    feed(r, flat(20), StepBatches({19: "epoch 0, batch 19"}), BatchSample(step=19, task="regression"))
    feed(r, {20: 500.0, 21: 3.0}, optimizers={20: 0, 21: 1})  # optimizer 0's spike at 20 is pending
    state = json.loads(json.dumps(r.state_dict()))  # plain types only
    r2 = make(run)
    r2.load_state_dict(state)
    assert r2.task == "regression" and r2.batches[19] == "epoch 0, batch 19" and set(r2.windows) == {0, 1}
    feed(r2, {22: 1.0})
    f = r2.log.get("gradient_spikes")
    assert f is not None and (f.since, f.step) == (20, 22) and f.value == 500.0
    assert f.extra["batches"] == ["epoch 0, batch 19, optimizer 0 (Adam)"] and "a corrupted target" in f.message
    assert list(r2.windows[0].window)[-1] == 1.0 and len(r2.windows[0].window) == 22


def test_state_loads_from_nothing() -> None:
    r = make()
    r.load_state_dict({})
    assert r.windows == {} and r.batches == {} and r.task == ""
    feed(r, flat(30, {20: 100.0}))
    assert r.log.get("gradient_spikes") is not None


def test_window_is_bounded() -> None:
    r = make(th=GradientThresholds(spike_window=20))
    feed(r, flat(100))
    assert len(r.windows[0].window) == 20


def test_thresholds_change_the_verdict() -> None:
    r = make(th=GradientThresholds(spike_factor=200.0))
    feed(r, flat(30, {20: 100.0}))
    assert not r.log.findings
    r = make(th=GradientThresholds(spike_min_history=25))
    feed(r, flat(30, {20: 100.0}))
    assert not r.log.findings
    r = make(th=GradientThresholds(fallback_band=0.5, fallback_drop=1.01))  # 100 -> 50: back to 100/1.01
    feed(r, flat(30, {20: 100.0, 21: 50.0}))
    assert r.log.get("gradient_spikes") is not None
    spike = flat(30, {20: 12.0, 21: 5.0})  # back at step 22 (see test_fall_back_within_three_steps)
    r = make()
    feed(r, spike)
    assert r.log.get("gradient_spikes") is not None
    r = make(th=GradientThresholds(spike_fallback_steps=1))  # must fall back on the very next step
    feed(r, spike)
    assert not r.log.findings
