"""The run-scale gate on hand-built records: a spike against a running median that collapsed as the loss went to
zero is reported only when it also reaches ``spike_run_scale`` x the highest running median the run has shown,
or when its batch holds a label rare in the data seen (``rare_label_fraction``); a geometric growth whose high
stays below that scale is no ``exploding_gradients``. Numbers by hand."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.gradients import GradientRules, find_growth
from lightning_normcheck.diagnosis.records import GradientTotals, Record, StepBatches
from lightning_normcheck.diagnosis.spikes import Spike, SpikeRules, SpikeWindow
from lightning_normcheck.diagnosis.thresholds import GradientThresholds, Thresholds


def context(th: GradientThresholds | None = None) -> Context:
    return Context(Thresholds(gradients=th or GradientThresholds()))


def spikes(th: GradientThresholds | None = None) -> SpikeRules:
    return SpikeRules(context(th), FindingLog())


def gradients(th: GradientThresholds | None = None) -> GradientRules:
    return GradientRules(context(th), FindingLog())


def totals(values: dict[int, float]) -> GradientTotals:
    steps = sorted(values)
    return GradientTotals(tuple(steps), tuple(values[s] for s in steps), (0,) * len(steps))


def feed(rules: SpikeRules | GradientRules, values: dict[int, float], *extra: Record) -> None:
    """One flush of ``step -> total`` (optimizer 0), at the last step."""
    rules.observe(Flush(max(values), (totals(values), *extra)))


def phases(*levels: tuple[int, float]) -> dict[int, float]:
    """Consecutive phases of ``(steps, total)`` from step 0."""
    out: dict[int, float] = {}
    for n, v in levels:
        out.update({len(out) + i: v for i in range(n)})
    return out


# A converged classifier: 60 steps at 1.0 while it learns, then 60 steps at 0.001 once its loss nears 0. The
# running median collapses to 0.001; the highest running median the run has shown stays 1.0.
CONVERGED = phases((60, 1.0), (60, 0.001))
# A run that never had a higher level.
LOW = phases((120, 0.001))


def spike_at_120(base: dict[int, float], peak: float) -> dict[int, float]:
    """``base`` with a spike at step 120 that falls back on step 121."""
    return {**base, 120: peak, 121: 0.001}


def labels(steps: Sequence[int], rare_at: dict[int, int] | None = None) -> StepBatches:
    """A classification batch of 10 labels per step: label 0, except ``rare_at[step]`` of them that are label 1."""
    rare_at = rare_at or {}
    counts: dict[int, tuple[tuple[int, int], ...]] = {
        s: ((0, 10 - rare_at[s]), (1, rare_at[s])) if s in rare_at else ((0, 10),) for s in steps
    }
    return StepBatches({s: f"epoch 0, batch {s}" for s in steps}, task="classification", labels=counts)


# ---------------------------------------------------------------------------------------------------------
# spikes against the run's scale
# ---------------------------------------------------------------------------------------------------------
def test_the_run_scale_is_the_highest_running_median() -> None:
    r = spikes()
    feed(r, CONVERGED)
    w = r.windows[0]
    assert w.peak == 1.0 and list(w.window) == [0.001] * 50  # the window's median has collapsed to 0.001
    r = spikes()
    feed(r, LOW)
    assert r.windows[0].peak == 0.001


def test_a_spike_below_the_run_scale_is_not_reported() -> None:
    # 0.05 is 50x the collapsed median 0.001 (a spike by spike_factor) but 0.05x the run's peak median 1.0
    r = spikes()
    feed(r, spike_at_120(CONVERGED, 0.05))
    assert not r.log.findings
    w = r.windows[0]
    assert w.count == 0 and w.spikes == [] and w.pending == []  # fell back, dropped: not a spike of this run


def test_the_same_spike_in_a_run_that_never_had_a_higher_level_is_reported() -> None:
    r = spikes()
    feed(r, spike_at_120(LOW, 0.05))
    f = r.log.get("gradient_spikes")
    # 0.05 / 0.001 = 50x the median, and 50x the run's peak 0.001
    assert f is not None and (f.since, f.step, f.count) == (120, 121, 1)
    assert f.value == pytest.approx(50.0) and f.extra["steps"] == [120]


@pytest.mark.parametrize(("peak", "reported"), [(9.99, False), (10.0, True), (100.0, True)])
def test_a_spike_at_the_run_scale_is_reported(peak: float, reported: bool) -> None:
    # the run's peak median is 1.0: spike_run_scale = 10 x 1.0 = 10
    r = spikes()
    feed(r, spike_at_120(CONVERGED, peak))
    f = r.log.get("gradient_spikes")
    assert (f is not None) == reported
    if f is not None:
        assert (f.since, f.step) == (120, 121) and f.value == pytest.approx(peak / 0.001)


def test_the_run_scale_counts_levels_of_earlier_flushes() -> None:
    r = spikes()
    feed(r, phases((60, 1.0)))
    feed(r, {60 + i: 0.001 for i in range(60)})
    feed(r, {120: 0.05, 121: 0.001})
    assert not r.log.findings


def test_a_spike_confirmed_in_a_later_flush_is_gated_too() -> None:
    r = spikes()
    feed(r, {**CONVERGED, 120: 0.05})  # pending: not yet back
    assert r.windows[0].pending and not r.log.findings
    feed(r, {121: 0.001})
    assert not r.log.findings and not r.windows[0].pending


@pytest.mark.parametrize(("scale", "reported"), [(0.05, True), (0.06, False)])
def test_spike_run_scale_threshold_moves_the_verdict(scale: float, reported: bool) -> None:
    # the 0.05 spike is 0.05 x the run's peak median 1.0
    r = spikes(GradientThresholds(spike_run_scale=scale))
    feed(r, spike_at_120(CONVERGED, 0.05))
    assert (r.log.get("gradient_spikes") is not None) == reported


def test_a_high_spike_is_still_reported_when_a_low_one_is_not() -> None:
    r = spikes()
    feed(r, {**spike_at_120(CONVERGED, 0.05), **{122 + i: 0.001 for i in range(8)}, 130: 20.0, 131: 0.001})
    f = r.log.get("gradient_spikes")
    assert f is not None and f.extra["steps"] == [130] and f.count == 1 and "spiked 1 time(s)" in f.message


def test_spike_over_run_scale() -> None:
    assert Spike(120, 0.05, 0.001, "", peak=1.0).over_run_scale == pytest.approx(0.05)
    assert Spike(120, 0.05, 0.001, "").over_run_scale == float("inf")  # no median seen before: no scale to pass


def test_the_peak_survives_a_checkpoint() -> None:
    r = spikes()
    feed(r, CONVERGED)
    state = json.loads(json.dumps(r.state_dict()))
    assert state["history"]["peak"] == 1.0
    resumed = spikes()
    resumed.load_state_dict(state)
    assert resumed.windows[0].peak == 1.0
    feed(resumed, {120: 0.05, 121: 0.001})
    assert not resumed.log.findings
    w = SpikeWindow.from_state({k: v for k, v in state["history"].items() if k != "peak"}, GradientThresholds())
    assert w.peak == 0.0  # an older checkpoint without it: no scale known yet


# ---------------------------------------------------------------------------------------------------------
# the rare-label exception
# ---------------------------------------------------------------------------------------------------------
# 122 steps of 10 labels = 1220 labels; a label is rare below 5% of them: fewer than 61
def test_a_spike_below_the_run_scale_holding_a_rare_label_is_reported() -> None:
    r = spikes()
    feed(r, spike_at_120(CONVERGED, 0.05), labels(range(122), {120: 1}))
    f = r.log.get("gradient_spikes")
    assert f is not None and (f.since, f.step) == (120, 121) and f.extra["batches"] == ["epoch 0, batch 120"]
    assert r.rare_labels(120) == {1}
    assert "Likely causes, most likely first: a rare class the model keeps getting wrong" in f.message


def test_the_same_spike_with_common_labels_only_is_not_reported() -> None:
    r = spikes()
    feed(r, spike_at_120(CONVERGED, 0.05), labels(range(122)))
    assert not r.log.findings and r.rare_labels(120) == set()


@pytest.mark.parametrize(("count", "reported"), [(60, True), (61, False)])
def test_rare_label_fraction_boundary(count: int, reported: bool) -> None:
    # label 1: once in the spike's batch and count - 1 times in earlier batches; count < 0.05 x 1220 = 61 is rare
    rare_at = {120: 1, **{s: 1 for s in range(count - 1)}}
    r = spikes()
    feed(r, spike_at_120(CONVERGED, 0.05), labels(range(122), rare_at))
    assert (r.log.get("gradient_spikes") is not None) == reported


@pytest.mark.parametrize(("fraction", "reported"), [(0.05, False), (0.06, True)])
def test_rare_label_fraction_threshold_moves_the_verdict(fraction: float, reported: bool) -> None:
    # label 1 is 61 of 1220 labels (5%): rare below 6%, not below 5%
    rare_at = {120: 1, **{s: 1 for s in range(60)}}
    r = spikes(GradientThresholds(rare_label_fraction=fraction))
    feed(r, spike_at_120(CONVERGED, 0.05), labels(range(122), rare_at))
    assert (r.log.get("gradient_spikes") is not None) == reported


def test_a_rare_label_in_another_batch_does_not_excuse_the_spike() -> None:
    r = spikes()
    feed(r, spike_at_120(CONVERGED, 0.05), labels(range(122), {100: 1}))
    assert not r.log.findings and r.label_counts == {0: 1219, 1: 1} and r.rare_labels(120) == set()


def test_labels_and_a_pending_spike_across_flushes_and_a_checkpoint() -> None:
    r = spikes()
    feed(r, CONVERGED, labels(range(120)))
    feed(r, {120: 0.05}, labels([120], {120: 1}))  # the spike is pending: its labels are kept for it
    state = json.loads(json.dumps(r.state_dict()))
    assert state["label_counts"] == {"0": 1209, "1": 1} and state["step_labels"]["120"] == [0, 1]
    resumed = spikes()
    resumed.load_state_dict(state)
    feed(resumed, {121: 0.001}, labels([121]))
    f = resumed.log.get("gradient_spikes")
    assert f is not None and (f.since, f.step) == (120, 121)
    assert "most likely first: a rare class" in f.message


# ---------------------------------------------------------------------------------------------------------
# growth against the run's scale
# ---------------------------------------------------------------------------------------------------------
def converged_then(jump: Sequence[float]) -> dict[int, float]:
    """60 steps at 1.0, 60 steps falling slowly to 1e-4 (the smallest at step 119), then ``jump`` from step 120."""
    low = {60 + i: 1e-4 * (1.0 + 0.01 * (59 - i)) for i in range(60)}
    return {**phases((60, 1.0)), **low, **{120 + i: v for i, v in enumerate(jump)}}


# 1000x the low (0.1 / 1e-4), rising on each step after it, then staying there for the 3 steps that confirm it
SMALL_JUMP = (0.1, 0.11, 0.11, 0.11, 0.11)
BIG_JUMP = (100.0, 110.0, 110.0, 110.0, 110.0)


def test_gradient_rules_track_the_run_scale() -> None:
    g = gradients()
    feed(g, converged_then(SMALL_JUMP))
    assert g._scale == {0: 1.0}  # the highest running median: the 60 steps at 1.0
    g = gradients()
    feed(g, {s: 0.0 if s % 2 else 2.0 for s in range(14)})  # zero totals are no sample: 7 of 8 needed
    assert g._scale == {}
    feed(g, {14: 2.0, 15: float("nan")})
    assert g._scale == {0: 2.0}


def test_find_growth_below_the_scale_is_none() -> None:
    th = GradientThresholds()
    series = sorted(converged_then(SMALL_JUMP[:2]).items())  # up to step 121: low 1e-4 at 119, high 0.11
    g = find_growth(series, th)
    assert g is not None and (g.low_step, g.high_step, g.high) == (119, 121, 0.11)
    assert g.low == pytest.approx(1e-4) and g.factor == pytest.approx(1100.0)
    assert find_growth(series, th, scale=0.11) is not None  # at the scale: passes
    assert find_growth(series, th, scale=1.0) is None  # the run's scale: below it


def test_a_growth_below_the_run_scale_is_no_explosion() -> None:
    g = gradients()
    feed(g, converged_then(SMALL_JUMP))
    assert not g.log.findings and not g._pending


def test_the_same_growth_above_the_run_scale_is_reported_once_confirmed() -> None:
    g = gradients()
    feed(g, converged_then(BIG_JUMP[:4]))  # found at step 121, only 2 of the 3 confirming steps yet
    assert not g.log.findings and g._pending[0].high_step == 121
    feed(g, {124: 110.0})  # the 3rd: their median 110 >= sqrt(100) x 1e-4
    f = g.log.get("exploding_gradients")
    assert f is not None and (f.step, f.since) == (124, 119) and f.value == pytest.approx(1.1e6)
    # 1.1e6x is past grad_growth**2 = 1e4: an error (a warning needs a growth below 1e4x)
    assert f.severity == "error"
    assert "0.0001 at step 119 to 110 at step 121 (1.1e+06x" in f.message


def test_a_growth_above_the_run_scale_below_grad_growth_squared_is_a_warning() -> None:
    # low 1e-3 (the same slow fall, 10x higher), jump to 2.0 and 2.2: 2200x (>= the start check's 1000x, < 1e4x),
    # 2.2 >= the run's scale 1.0
    low = {60 + i: 1e-3 * (1.0 + 0.01 * (59 - i)) for i in range(60)}
    g = gradients()
    feed(g, {**phases((60, 1.0)), **low, 120: 2.0, 121: 2.2, 122: 2.2, 123: 2.2, 124: 2.2})
    f = g.log.get("exploding_gradients")
    assert f is not None and (f.severity, f.step, f.since) == ("warning", 124, 119)
    assert f.value == pytest.approx(2200.0)
    g = gradients()  # the same jump to 0.5 and 0.55: 550x, below the start check's 1000x and the run's scale
    feed(g, {**phases((60, 1.0)), **low, 120: 0.5, 121: 0.55, 122: 0.55, 123: 0.55, 124: 0.55})
    assert not g.log.findings


def test_the_scale_survives_a_checkpoint() -> None:
    g = gradients()
    feed(g, converged_then(()))
    state = json.loads(json.dumps(g.state_dict()))
    assert state["scale"] == {"0": 1.0} and len(state["recent"]["0"]) == 50
    resumed = gradients()
    resumed.load_state_dict(state)
    feed(resumed, {120 + i: v for i, v in enumerate(SMALL_JUMP)})
    assert not resumed.log.findings
    older = gradients()  # a checkpoint without the scale: 5 totals are too few for a median, nothing gates it
    older.load_state_dict({k: v for k, v in state.items() if k not in ("scale", "recent")})
    feed(older, {120 + i: v for i, v in enumerate(SMALL_JUMP)})
    f = older.log.get("exploding_gradients")
    assert f is not None and (f.step, f.since) == (124, 119) and f.value == pytest.approx(1100.0)
