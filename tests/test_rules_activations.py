"""Activation rules and init advice on hand-built records: depth trends, drift over time, dead and saturated
units, huge first gradients at init, the state round trip. Expected numbers are computed by hand in the
comments, never by the package."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from lightning_normcheck.diagnosis.activations import (
    ActivationRules,
    depth_trend,
    feeder,
    flush_gradient_total,
    layer_drift,
    saturation_severity,
    weight_chain,
)
from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.init import following_activation, init_message, layer_init_advice
from lightning_normcheck.diagnosis.records import (
    ActivationSample,
    GradientLayers,
    InitStats,
    LayerInitStat,
    ModuleStat,
)
from lightning_normcheck.diagnosis.thresholds import ActivationThresholds, InitThresholds, Thresholds

TH = ActivationThresholds()
_KIND = {"ReLU": "relu", "Tanh": "bounded", "Sigmoid": "bounded", "Linear": "weight"}


# -- builders ------------------------------------------------------------------------------------------------
def lin(name: str, rms: float) -> ModuleStat:
    return ModuleStat(name, "Linear", "weight", rms)


def act(name: str, rms: float, type_name: str = "ReLU", **kw: float) -> ModuleStat:
    return ModuleStat(name, type_name, _KIND.get(type_name, ""), rms, **kw)  # type: ignore[arg-type]


def chain_sample(
    step: int, layers: list[float], input_rms: float | None = 1.0, act_name: str = "ReLU", head: float = 1.0
) -> ActivationSample:
    """Linear "0", act "1", Linear "2", ... with the given weight-layer RMS, then a head Linear and its act."""
    mods: list[ModuleStat] = []
    for i, r in enumerate([*layers, head]):
        mods += [lin(str(2 * i), r), act(str(2 * i + 1), r, act_name)]
    return ActivationSample(step, tuple(mods), input_rms=input_rms)


def geometric(per_layer: float, depth: int = 6) -> list[float]:
    """The RMS of the first depth-1 Linears (the last is the head) when each multiplies it by per_layer."""
    return [per_layer ** (i + 1) for i in range(depth - 1)]


def make(thresholds: Thresholds | None = None, init: InitStats | None = None) -> ActivationRules:
    return ActivationRules(Context(thresholds or Thresholds(), init=init), FindingLog())


def feed(rules: ActivationRules, *samples: ActivationSample, grads: tuple[GradientLayers, ...] = ()) -> None:
    for s in samples:
        rules.observe(Flush(s.step, (s, *grads)))


def uniform_init(depth: int, gain: float, fan: int = 32) -> InitStats:
    """Linears "0", "2", ... of fan_in = fan_out = fan with std = gain / sqrt(fan), i.e. that gain."""
    return InitStats(tuple(LayerInitStat(str(2 * i), fan, fan, gain / math.sqrt(fan)) for i in range(depth)))


def codes(rules: ActivationRules) -> list[tuple[str, str | None, str]]:
    return [(f.code, f.layer, f.severity) for f in rules.log.findings]


# -- the layer's contract ------------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["activations.py", "init.py"])
def test_no_torch_or_lightning_in_the_rules(module: str) -> None:
    path = Path(__file__).parents[1] / "lightning_normcheck" / "diagnosis" / module
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"torch", "lightning", "pytorch_lightning"}


# -- depth_trend, pure ---------------------------------------------------------------------------------------
def _c(values: list[float]) -> list[tuple[str, float]]:
    return [(f"l{i}", v) for i, v in enumerate(values)]


def test_depth_trend_exactly_at_the_total_ratio_fires_just_below_does_not() -> None:
    t = depth_trend(_c([1.0, 2.0, 5.0, 10.0, 25.0, 50.0]), TH)  # 50x over 5 steps, >= 1.3x each on average
    assert t is not None and (t.direction, t.start, t.end) == ("up", 0, 5) and t.total == pytest.approx(50.0)
    assert depth_trend(_c([1.0, 2.0, 5.0, 10.0, 25.0, 49.9]), TH) is None


def test_depth_trend_needs_four_layers() -> None:
    assert depth_trend(_c([1.0, 100.0, 1e4]), TH) is None  # 1e4x but 3 layers: one odd layer is no trend
    t = depth_trend(_c([1.0, 10.0, 100.0, 1000.0]), TH)
    assert t is not None and t.total == pytest.approx(1000.0) and t.per_layer == pytest.approx(10.0)


def test_depth_trend_needs_the_per_layer_ratio() -> None:
    # 1.299 per layer over 16 steps: 1.299**16 = e**(16 * 0.26160) = 65.7 >= 50, but 1.299 < 1.3 on every sub-run
    assert depth_trend(_c([1.299**i for i in range(17)]), TH) is None
    t = depth_trend(_c([1.31**i for i in range(16)]), TH)  # 1.31**15 = e**(15 * 0.27003) = 57.4
    assert t is not None and t.total == pytest.approx(57.4, rel=1e-2)


def test_depth_trend_must_not_reverse() -> None:
    assert depth_trend(_c([1.0, 3.0, 9.0, 8.0, 27.0, 81.0]), TH) is None  # 81x, but broken at 9 -> 8


def test_depth_trend_down_and_the_strongest_wins() -> None:
    t = depth_trend(_c([1.0, 0.1, 0.01, 0.001, 0.0001]), TH)
    assert t is not None and t.direction == "down" and t.total == pytest.approx(1e-4)
    # a 60x rise over 4 layers, then a 1000x fall over 4: the fall is the stronger one
    t = depth_trend(_c([1.0, 4.0, 16.0, 60.0, 6.0, 0.6, 0.06]), TH)
    assert t is not None and (t.direction, t.start, t.end) == ("down", 3, 6) and t.total == pytest.approx(1e-3)


def test_depth_trend_flat_runs_do_not_reverse_it() -> None:
    t = depth_trend(_c([1.0, 1.0, 10.0, 10.0, 100.0]), TH)  # non-decreasing: one run of 5 layers
    assert t is not None and (t.start, t.end) == (0, 4) and t.total == pytest.approx(100.0)


def test_weight_chain_leaves_out_the_head_and_non_weight_modules() -> None:
    s = chain_sample(0, [2.0, 4.0], head=99.0)
    assert weight_chain(s) == [("0", 2.0), ("2", 4.0)]


# -- depth trends through the rules --------------------------------------------------------------------------
def test_exploding_at_step0_names_the_layers_and_the_std() -> None:
    rules = make(init=uniform_init(6, gain=3.0))
    feed(rules, chain_sample(0, geometric(2.5)))  # 1 -> 2.5 -> ... -> 2.5**5 = 97.66 at "8"; the head "10" aside
    (f,) = rules.log.findings
    assert (f.code, f.layer, f.severity, f.step, f.since) == ("exploding_activations", "8", "warning", 0, 0)
    assert f.value == pytest.approx(2.5**5) and f.extra["at_init"] is True
    assert "from initialization" in f.message and "about 2.50x per step" in f.message
    assert "97.7x over 5 layer-to-layer steps" in f.message and "Largest change ends at `8`" in f.message
    # gain 3 where ReLU needs sqrt(2) = 1.41: std 3/sqrt(32) = 0.53, Kaiming std sqrt(2/32) = 0.25
    assert "0: std 0.53 x sqrt(fan_in=32) = 3, but ReLU needs 1.41 (Kaiming: std 0.25)" in f.message
    assert "(and 2 more)" in f.message  # 6 layers off, 4 named
    assert "kaiming_normal_" in f.message
    assert "Likely causes, most likely first: init std too large" in f.message and "What to try:" in f.message


def test_error_from_the_total_ratio_squared() -> None:
    # 50**2 = 2500: 2400x is a warning, 2600x an error (input 1 and 5 Linears, flat after the first)
    for top, sev in ((2400.0, "warning"), (2600.0, "error")):
        rules = make()
        feed(rules, chain_sample(0, [top ** (k / 5) for k in range(1, 6)]))
        assert codes(rules) == [("exploding_activations", "8", sev)]


def test_vanishing_with_depth() -> None:
    rules = make(init=uniform_init(6, gain=0.2))
    feed(rules, chain_sample(0, geometric(0.3)))  # 0.3**5 = 2.43e-3: |log10| 2.61 < 2 * log10(50) = 3.40
    (f,) = rules.log.findings
    assert (f.code, f.layer, f.severity) == ("vanishing_activations", "8", "warning")
    assert "shrinks geometrically" in f.message and "0.00243x" in f.message
    assert "Init is off" in f.message and "std 0.25" in f.message  # gain 0.2 < 0.8: too low for ReLU
    rules = make()
    feed(rules, chain_sample(0, geometric(0.2)))  # 0.2**5 = 3.2e-4: |log10| 3.49 >= 3.40
    assert codes(rules) == [("vanishing_activations", "8", "error")]


def test_one_trend_finding_even_when_its_end_layer_moves() -> None:
    rules = make()
    feed(rules, chain_sample(0, geometric(0.15)), chain_sample(1, geometric(0.2)))
    last = [0.25, 0.25**2, 0.25**3, 0.25**4, 0.01]  # the trend now ends at "6": "8" rises again
    feed(rules, chain_sample(2, last))
    (f,) = rules.log.findings
    assert (f.code, f.layer, f.count, f.step, f.last_step) == ("vanishing_activations", "8", 3, 0, 2)


def test_flat_or_noisy_profile_is_silent() -> None:
    rules = make()
    feed(rules, chain_sample(0, [1.0, 0.8, 1.3, 0.9, 1.2, 0.85, 1.1]))
    assert not rules.log.findings


def test_non_finite_chain_is_not_judged() -> None:
    rules = make()
    feed(rules, chain_sample(0, [2.5, math.nan, 15.6, 39.1, 97.7]))
    assert not rules.log.findings and rules.state_dict()["first_step"] == -1
    feed(rules, chain_sample(1, geometric(2.5), head=math.inf))  # the head is not in the chain
    assert codes(rules) == [("exploding_activations", "8", "warning")]


def test_input_of_raw_scale_leaves_the_chain() -> None:
    layers = [1.0, 1.0, 1.0, 1.0, 1.0]  # input 1e3 -> 1 and flat: a 1000x fall over 5 layers
    rules = make()
    feed(rules, chain_sample(0, layers, input_rms=1e3))
    assert codes(rules) == [("vanishing_activations", "8", "warning")]
    for severity, fires in (("info", True), ("warning", False)):
        rules = make()
        rules.log.report("input_scale", severity, 0, None, "raw features")  # type: ignore[arg-type]
        feed(rules, chain_sample(0, layers, input_rms=1e3))
        assert bool(rules.log.of("vanishing_activations")) is fires
    for bad in (None, 0.0, math.nan):  # no usable input RMS: the chain starts at the first layer
        rules = make()
        feed(rules, chain_sample(0, layers, input_rms=bad))
        assert not rules.log.findings


def test_a_zero_rms_is_floored_not_a_crash() -> None:
    rules = make()
    feed(rules, chain_sample(0, [1.0, 0.1, 0.01, 0.0, 0.0]))
    (f,) = rules.log.findings
    assert (f.code, f.severity) == ("vanishing_activations", "error") and f.value == pytest.approx(TH.rms_floor)


def test_trend_appearing_during_training_blames_the_learning_rate() -> None:
    rules = make(init=uniform_init(6, gain=3.0))
    grads = (GradientLayers(100, 0, ("0",), (1e5,)),)
    feed(rules, chain_sample(0, [1.0] * 5))
    feed(rules, chain_sample(100, geometric(2.5)), grads=grads)
    (f,) = rules.log.findings  # and no exploding_gradients: not from init
    assert (f.code, f.step, f.extra["at_init"]) == ("exploding_activations", 100, False)
    assert "with depth at step 100" in f.message and "Init is off" not in f.message
    assert "Likely causes, most likely first: learning rate too high (the weights grew" in f.message


def test_at_init_sticks_to_the_finding() -> None:
    rules = make()
    feed(rules, chain_sample(0, geometric(2.5)), chain_sample(50, geometric(2.5 * 5)))
    (f,) = rules.log.findings  # 12.5**5 > 2500: escalated, still from initialization
    assert f.severity == "error" and f.count == 2 and f.extra["at_init"] is True
    assert "from initialization) and still at step 50" in f.message


def test_first_sample_after_step0_counts_as_init() -> None:
    rules = make()
    feed(rules, chain_sample(7, geometric(2.5)))
    assert "from initialization" in rules.log.findings[0].message


# -- huge first gradients ------------------------------------------------------------------------------------
def _grads(step: int, *norms: float, layers: tuple[str, ...] = ("0", "2"), opt: int = 0) -> GradientLayers:
    return GradientLayers(step, opt, layers, norms)


def test_exploding_init_also_flags_huge_first_gradients() -> None:
    rules = make(init=uniform_init(6, gain=3.0))
    feed(rules, chain_sample(0, geometric(2.5)), grads=(_grads(0, 3e3, 4e3),))  # sqrt(9e6 + 16e6) = 5e3
    f = rules.log.get("exploding_gradients")
    assert f is not None and (f.severity, f.step, f.layer) == ("warning", 0, None)
    assert f.value == pytest.approx(5e3) and f.extra["at_init"] is True
    assert "5e+03 at step 0 (threshold 1e+03" in f.message and "ending at `8`" in f.message
    assert "std 0.25" in f.message  # Kaiming for fan_in 32: sqrt(2/32)


def test_huge_first_gradients_need_exploding_activations() -> None:
    rules = make()
    feed(rules, chain_sample(0, [1.0] * 5), grads=(_grads(0, 3e3, 4e3),))
    assert not rules.log.findings  # a large first gradient alone is no finding


@pytest.mark.parametrize(
    ("norms", "severity"),
    [
        ((600.0, 800.0), "warning"),  # sqrt(3.6e5 + 6.4e5) = 1e3: at the threshold
        ((599.0, 800.0), None),  # 999.4: just below
        ((6e5, 8e5), "error"),  # 1e6: the threshold squared
        ((3e3, math.nan), "warning"),  # the NaN layer is left out: 3e3
    ],
)
def test_first_gradient_thresholds(norms: tuple[float, float], severity: str | None) -> None:
    rules = make()
    feed(rules, chain_sample(0, geometric(2.5)), grads=(_grads(0, *norms),))
    f = rules.log.get("exploding_gradients")
    assert (f.severity if f else None) == severity


def test_first_gradients_not_reported_over_a_data_cause_or_twice() -> None:
    for code in ("label_scale", "input_scale"):
        rules = make()
        rules.log.report(code, "warning", 0, None, "scale")
        feed(rules, chain_sample(0, geometric(2.5)), grads=(_grads(0, 3e3, 4e3),))
        assert rules.log.get("exploding_gradients") is None
    rules = make()
    rules.log.report("exploding_gradients", "warning", 0, None, "growth")
    feed(rules, chain_sample(0, geometric(2.5)), grads=(_grads(0, 3e3, 4e3),))
    assert rules.log.get("exploding_gradients").message == "growth"  # type: ignore[union-attr]


def test_flush_gradient_total_of_the_flush_step() -> None:
    s = chain_sample(5, [1.0])
    both = Flush(5, (s, _grads(5, 3.0, layers=("a",)), _grads(5, 4.0, layers=("b",), opt=1), _grads(4, 1e9)))
    assert flush_gradient_total(both) == pytest.approx(5.0)  # both optimizers, step 4 left out
    assert flush_gradient_total(Flush(5, (s, _grads(4, 6.0, 8.0)))) == pytest.approx(10.0)  # the latest step
    assert flush_gradient_total(Flush(5, (s,))) == 0.0


# -- drift over time -----------------------------------------------------------------------------------------
BASE = [0.5, 1.0, 0.5, 1.5]  # reverses at every layer: never a depth trend


def drift_sample(step: int, last: float, input_rms: float = 1.0) -> ActivationSample:
    return chain_sample(step, [*BASE[:3], last], input_rms=input_rms)


def test_drift_up_over_time() -> None:
    rules = make()
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 150.0))
    assert not rules.log.findings  # the first sample and one more: 2 in a row are needed
    feed(rules, drift_sample(100, 200.0))
    (f,) = rules.log.findings  # 150 / 1.5 = 100 and 200 / 1.5 = 133: both >= 100; 200x the input
    assert (f.code, f.layer, f.severity, f.step, f.since) == ("exploding_activations", "6", "warning", 100, 0)
    assert f.value == pytest.approx(200.0 / 1.5)
    assert "grew from 1.5 at step 0 to 200 at step 100 (133x, on 2 sampled steps in a row" in f.message
    assert "input RMS changed 1.00x" in f.message and "What to try: lower the LR" in f.message


def test_drift_needs_every_recent_sample_past_the_ratio() -> None:
    rules = make()
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 148.5), drift_sample(100, 300.0))  # 99x then 200x
    assert not rules.log.findings
    feed(rules, drift_sample(150, 300.0))
    assert codes(rules) == [("exploding_activations", "6", "warning")]


def test_drift_needs_a_steady_input() -> None:
    rules = make()  # input 1 -> 10: changed 10x, not within (1/10, 10)
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 300.0, 10.0), drift_sample(100, 300.0, 10.0))
    assert not rules.log.findings
    rules = make()  # 9.9x: judged; 300 / 9.9 = 30x the input
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 300.0, 9.9), drift_sample(100, 300.0, 9.9))
    assert "input RMS changed 9.90x" in rules.log.findings[0].message


def test_drift_up_must_end_far_above_the_input() -> None:
    # 0.05 -> 6: 120x its start, but only 6x the input (a recovery from a vanished start)
    samples = [drift_sample(0, 0.05), drift_sample(50, 6.0), drift_sample(100, 6.0)]
    rules = make()
    feed(rules, *samples)
    assert not rules.log.findings
    rules = make(Thresholds(activations=ActivationThresholds(act_time_vs_input=5.0)))
    feed(rules, *samples)
    assert codes(rules) == [("exploding_activations", "6", "warning")]


def test_drift_down_uses_its_own_input_bound() -> None:
    rules = make()  # 1.5 -> 0.01: 1/150 <= 1/100 and 0.01x the input <= 0.01
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 0.01), drift_sample(100, 0.01))
    (f,) = rules.log.findings
    assert (f.code, f.layer) == ("vanishing_activations", "6") and f.value == pytest.approx(0.01 / 1.5)
    assert "shrank from 1.5 at step 0 to 0.01 at step 100" in f.message and "dead ReLUs upstream" in f.message
    rules = make()  # 0.012: 1/125 of its start, but 0.012x the input > 0.01
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 0.012), drift_sample(100, 0.012))
    assert not rules.log.findings


def test_drift_is_one_story_per_code() -> None:
    rules = make()
    rules.log.report("exploding_activations", "warning", 0, "2", "a depth trend ending elsewhere")
    feed(rules, drift_sample(0, 1.5), drift_sample(50, 200.0), drift_sample(100, 200.0))
    assert [f.layer for f in rules.log.findings] == ["2"]


def test_drift_reference_is_the_oldest_kept_sample() -> None:
    samples = [drift_sample(0, 1.5), drift_sample(50, 1.5), drift_sample(100, 200.0), drift_sample(150, 200.0)]
    rules = make(Thresholds(activations=ActivationThresholds(act_time_history=3)))
    feed(rules, *samples)
    assert rules.log.findings[0].since == 50  # step 0 slid out of the 3 kept samples
    rules = make()
    feed(rules, *samples)
    assert rules.log.findings[0].since == 0


def test_layer_drift_pure() -> None:
    h = [(0, 2.0), (10, 200.0), (20, 400.0)]
    d = layer_drift("x", h, 1.0, TH)
    assert d is not None and (d.ratio, d.since, d.start, d.now) == (200.0, 0, 2.0, 400.0)
    assert layer_drift("x", h[:2], 1.0, TH) is None  # the reference and 1 sample
    assert layer_drift("x", h, None, TH) is None  # no input: taken as 1x the input, never 10x
    three = ActivationThresholds(act_time_samples=3)
    assert layer_drift("x", h, 1.0, three) is None


# -- dead units ----------------------------------------------------------------------------------------------
def dead_sample(step: int, dead1: float | None, dead3: float | None, samples: int = 5) -> ActivationSample:
    mods = (lin("0", 1.0), act("1", 1.0, dead_window=dead1), lin("2", 1.0), act("3", 1.0, dead_window=dead3))
    return ActivationSample(step, mods, input_rms=1.0, window_samples=samples, window=5)


def test_dead_units_judged_on_full_windows_only() -> None:
    rules = make()
    feed(rules, dead_sample(2, 0.9, None, samples=3))
    assert not rules.log.findings
    feed(rules, dead_sample(4, 0.44, 0.65))
    (f,) = rules.log.findings
    assert (f.code, f.layer, f.severity, f.step) == ("dead_units", "3", "warning", 4)
    assert "65% of the units of `3` (fed by `2`)" in f.message and "window of 5 sampled batches" in f.message
    assert "What to try: lower the LR" in f.message


@pytest.mark.parametrize(
    ("value", "severity"), [(0.5999, None), (0.6, "warning"), (0.8999, "warning"), (0.9, "error"), (math.nan, None)]
)
def test_dead_units_boundaries(value: float, severity: str | None) -> None:
    rules = make()
    feed(rules, dead_sample(4, value, None))
    assert codes(rules) == ([("dead_units", "1", severity)] if severity else [])


def test_dead_units_threshold_is_configurable() -> None:
    rules = make(Thresholds(activations=ActivationThresholds(dead_fraction=0.7)))
    feed(rules, dead_sample(4, 0.65, None))
    assert not rules.log.findings


def test_dead_units_since_is_the_window_start() -> None:
    rules = make()
    for k, step in enumerate(range(0, 50, 10)):
        feed(rules, dead_sample(step, 0.3, 0.95, samples=k + 1))
    f = rules.log.get("dead_units", "3")
    assert f is not None and (f.step, f.since, f.severity) == (40, 0, "error")
    rules2 = make()
    for step in range(0, 60, 10):
        feed(rules2, dead_sample(step, 0.3, 0.95 if step == 50 else 0.1, samples=min(step // 10 + 1, 5)))
    f = rules2.log.get("dead_units", "3")
    assert f is not None and (f.step, f.since) == (50, 10)  # the window slid past step 0


def test_feeder_is_the_nearest_weight_layer_before() -> None:
    mods = (act("a", 1.0), lin("l", 1.0), ModuleStat("n", "LayerNorm", "", 1.0), act("r", 1.0))
    assert feeder(mods, 3) == 1 and feeder(mods, 0) is None and feeder(mods, 1) is None


# -- saturation ----------------------------------------------------------------------------------------------
def tanh_sample(step: int, sat1: float, sat3: float, window: int = 5) -> ActivationSample:
    mods = (
        lin("0", 1.0),
        act("1", 1.0, "Tanh", saturated=sat1),
        lin("2", 1.0),
        act("3", 1.0, "Tanh", saturated=sat3),
    )
    return ActivationSample(step, mods, input_rms=1.0, window=window)


def test_saturation_needs_a_window_and_spares_the_output_head() -> None:
    # "0" has std 6/sqrt(32): gain 6 where Xavier's is sqrt(2 * 32 / 64) = 1, std 1/sqrt(32) = 0.177
    rules = make(init=InitStats((LayerInitStat("0", 32, 32, 6 / math.sqrt(32)), LayerInitStat("2", 32, 32, 0.1))))
    for step in range(5):
        feed(rules, tanh_sample(step, 0.7, 0.95))
        if step < 4:
            assert not rules.log.findings
    by_layer = {f.layer: f for f in rules.log.findings}
    f1, f3 = by_layer["1"], by_layer["3"]
    assert (f1.severity, f1.step, f1.since, f1.value) == ("warning", 4, 0, pytest.approx(0.7))
    assert "70% of the outputs of `1`" in f1.message and "over 5 sampled steps up to step 4" in f1.message
    assert "Init is off for the activation that follows: 0: std" in f1.message and "Xavier: std 0.177" in f1.message
    assert f3.severity == "info" and "It is the model's output layer" in f3.message  # a confident output head
    assert "Init is off" not in f3.message


@pytest.mark.parametrize(
    ("window", "severity"),
    [
        ([0.5] * 5, "warning"),  # mean exactly 0.5
        ([0.49] * 5, None),
        ([0.9, 0.9, 0.9, 0.9, 0.25], "warning"),  # mean 0.76, min at 0.5 * 0.5 = 0.25
        ([0.9, 0.9, 0.9, 0.9, 0.24], None),  # one step below the floor
        ([0.95] * 5, "error"),
    ],
)
def test_saturation_boundaries(window: list[float], severity: str | None) -> None:
    assert saturation_severity(window, False, TH) == severity
    assert saturation_severity(window, True, TH) == ("info" if severity else None)


def test_saturation_window_slides() -> None:
    rules = make()
    for step in range(5):
        feed(rules, tanh_sample(step, 0.1, 0.0))
    for step in range(5, 9):
        feed(rules, tanh_sample(step, 0.8, 0.0))
    assert not rules.log.findings  # (0.1 + 4 * 0.8) / 5 = 0.66, but 0.1 < 0.25
    feed(rules, tanh_sample(9, 0.8, 0.0))
    f = rules.log.get("saturated_activations", "1")
    assert f is not None and (f.step, f.since) == (9, 5) and "Init is off" not in f.message  # no init stats


def test_saturation_threshold_is_configurable() -> None:
    rules = make(Thresholds(activations=ActivationThresholds(saturated_fraction=0.8)))
    for step in range(5):
        feed(rules, tanh_sample(step, 0.7, 0.0))
    assert not rules.log.findings


# -- state ---------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_continues_the_run() -> None:
    first = [drift_sample(0, 1.5), drift_sample(50, 200.0), tanh_sample(60, 0.7, 0.0, window=2)]
    rest = [drift_sample(100, 200.0), tanh_sample(110, 0.7, 0.0, window=2)]
    whole = make()
    feed(whole, *first, *rest)
    a = make()
    feed(a, *first)
    state = json.loads(json.dumps(a.state_dict()))  # plain types only
    b = make()
    b.load_state_dict(state)
    feed(b, *rest)
    assert (
        codes(b)
        == codes(whole)
        == [
            ("exploding_activations", "6", "warning"),
            ("saturated_activations", "1", "warning"),
        ]
    )
    assert [(f.step, f.since) for f in b.log.findings] == [(100, 0), (110, 60)]


def test_state_keeps_the_trend_layer_and_tolerates_missing_keys() -> None:
    a = make()
    feed(a, chain_sample(0, geometric(0.15)))
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    feed(b, chain_sample(1, [0.25, 0.25**2, 0.25**3, 0.25**4, 0.01]))  # ends at "6" now
    assert [f.layer for f in b.log.findings] == ["8"]
    c = make()
    c.load_state_dict({})
    feed(c, chain_sample(0, geometric(2.5)))
    assert codes(c) == [("exploding_activations", "8", "warning")]


def test_a_threshold_change_changes_the_verdict() -> None:
    sample = chain_sample(0, geometric(2.5))  # 97.7x
    rules = make(Thresholds(activations=ActivationThresholds(act_total_ratio=200.0)))
    feed(rules, sample)
    assert not rules.log.findings
    rules = make(Thresholds(activations=ActivationThresholds(act_min_layers=7)))
    feed(rules, sample)  # 6 layers with the input
    assert not rules.log.findings


# -- init advice ---------------------------------------------------------------------------------------------
def test_init_advice_matches_hand_computation() -> None:
    mods = [
        lin("0", 1.0),
        act("1", 1.0, "Tanh"),
        lin("2", 1.0),
        act("3", 1.0, "SELU"),
        lin("4", 1.0),
        act("5", 1.0, "GELU"),
        lin("6", 1.0),
    ]
    gain = 1 / math.sqrt(3)  # PyTorch's default Linear init: std 1/sqrt(3 fan_in)
    fans = {"0": (16, 64), "2": (64, 32), "4": (32, 8), "6": (8, 1)}
    init = InitStats(tuple(LayerInitStat(n, i, o, gain / math.sqrt(i)) for n, (i, o) in fans.items()))
    advice = {a.name: a for a in layer_init_advice(init, mods)}
    assert advice["0"].scheme == "Xavier" and advice["0"].recommended_std == pytest.approx(math.sqrt(2 / (16 + 64)))
    assert advice["0"].expected_gain == pytest.approx(math.sqrt(0.4))
    assert advice["2"].scheme == "LeCun" and advice["2"].recommended_std == pytest.approx(1 / math.sqrt(64))
    assert advice["4"].scheme == "Kaiming" and advice["4"].recommended_std == pytest.approx(math.sqrt(2 / 32))
    assert advice["6"].activation == "none" and advice["6"].expected_gain == 1.0
    assert advice["2"].gain == pytest.approx(gain)
    # gain 0.58 is too low for SELU, GELU and none (ratios 0.58, 0.41, 0.58 < 0.8), not for Xavier's tanh
    # (0.58 / sqrt(0.4) = 0.91)
    low = init_message(list(advice.values()), "low", InitThresholds())
    assert low.startswith("Init is off for the activation that follows: 2: std") and "0: std" not in low
    assert "Re-initialize with nn.init.normal_(w, std=1/sqrt(fan_in)) (LeCun)" in low
    assert init_message(list(advice.values()), "high", InitThresholds()) == ""


@pytest.mark.parametrize(("std", "off"), [(0.625, False), (0.63, True)])
def test_init_gain_high_boundary(std: float, off: bool) -> None:
    # fan_in 4, no activation (LeCun, gain 1): std 0.625 x 2 = 1.25 exactly, not above gain_high
    advice = layer_init_advice(InitStats((LayerInitStat("l", 4, 4, std),)), [lin("l", 1.0)])
    assert bool(init_message(advice, "high", InitThresholds())) is off
    assert init_message(advice, "high", InitThresholds(gain_high=1.3)) == ""


@pytest.mark.parametrize(("std", "off"), [(0.4, False), (0.395, True)])
def test_init_gain_low_boundary(std: float, off: bool) -> None:
    advice = layer_init_advice(InitStats((LayerInitStat("l", 4, 4, std),)), [lin("l", 1.0)])  # gain 0.8 / 0.79
    assert bool(init_message(advice, "low", InitThresholds())) is off


def test_following_activation_by_class_name() -> None:
    seq = [lin("a", 1.0), ModuleStat("d", "Dropout", "", 1.0), lin("b", 1.0), ModuleStat("n", "BatchNorm1d", "", 1.0)]
    seq += [act("r", 1.0), lin("c", 1.0), ModuleStat("m", "MyReLU", "relu", 1.0)]
    assert following_activation(seq, 0) is None  # the next weight layer comes first
    assert following_activation(seq, 2) == "ReLU"  # past the BatchNorm
    assert following_activation(seq, 5) is None  # class names only: a subclass is not recognised


def test_layers_without_usable_init_stats_are_skipped() -> None:
    init = InitStats((LayerInitStat("a", 0, 4, 0.1), LayerInitStat("b", 4, 4, math.nan), LayerInitStat("c", 4, 4, 0.5)))
    mods = [lin("a", 1.0), lin("b", 1.0), lin("c", 1.0), lin("d", 1.0), act("r", 1.0)]
    assert [a.name for a in layer_init_advice(init, mods)] == ["c"]
    assert layer_init_advice(InitStats(()), mods) == []
