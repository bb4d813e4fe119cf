"""The gradient rules and the first non-finite value, on hand-built records (no model, no Trainer).

Every expected number is computed by hand in the test; thresholds come from :class:`Thresholds` defaults
unless a test changes one to show that it moves the verdict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import pytest

from lightning_normcheck.diagnosis.engine import Context, Flush, Rules
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.gradients import GradientRules, execution_order, find_growth
from lightning_normcheck.diagnosis.nonfinite import NonfiniteRules, step_totals
from lightning_normcheck.diagnosis.records import (
    ActivationSample,
    GradientLayers,
    GradientTotals,
    LossCheck,
    ModuleStat,
    Record,
    RunInfo,
    TrainingError,
)
from lightning_normcheck.diagnosis.registry import Severity
from lightning_normcheck.diagnosis.thresholds import GradientThresholds, Thresholds

INF, NAN = math.inf, math.nan
REMEDY_WORDS = ("lower the lr", "init", "clip", "normaliz", "layernorm", "batchnorm", "eps", "warmup", "residual")


def has_remedy(message: str) -> bool:
    low = message.lower()
    return "likely causes, most likely first" in low and "what to try" in low and any(w in low for w in REMEDY_WORDS)


class Rig:
    """The non-finite and gradient families over one log, fed like the engine feeds them."""

    def __init__(self, th: GradientThresholds | None = None, run: RunInfo | None = None) -> None:
        self.ctx = Context(Thresholds(gradients=th or GradientThresholds()), run or RunInfo())
        self.log = FindingLog()
        self.nonfinite = NonfiniteRules(self.ctx, self.log)
        self.gradients = GradientRules(self.ctx, self.log)

    @property
    def rules(self) -> list[Rules]:
        return [self.nonfinite, self.gradients]

    def feed(self, step: int, *records: Record) -> None:
        flush = Flush(step, tuple(records))
        for r in self.rules:
            r.observe(flush)

    def feed_totals(self, pairs: Sequence[tuple[int, float]], optimizer: int = 0, **kw: Any) -> None:
        """One flush with these ``(step, total)`` pairs, at the last step."""
        self.feed(pairs[-1][0], totals(pairs, optimizer), *kw.get("extra", ()))

    def codes(self) -> list[tuple[str, str, int, str | None]]:
        return [(f.code, f.severity, f.step, f.layer) for f in self.log.findings]


def totals(pairs: Sequence[tuple[int, float]], optimizer: int = 0) -> GradientTotals:
    return GradientTotals(
        steps=tuple(s for s, _ in pairs), totals=tuple(v for _, v in pairs), optimizers=(optimizer,) * len(pairs)
    )


def layers(step: int, norms: dict[str, float], optimizer: int = 0) -> GradientLayers:
    return GradientLayers(step=step, optimizer=optimizer, layers=tuple(norms), norms=tuple(norms.values()))


def sample(step: int, rms: dict[str, float], input_rms: float | None = 1.0) -> ActivationSample:
    return ActivationSample(step, tuple(ModuleStat(n, "Linear", "weight", v) for n, v in rms.items()), input_rms)


def net(norms: list[float], prefix: str = "net.") -> dict[str, float]:
    return {f"{prefix}{i}": v for i, v in enumerate(norms)}


# ---------------------------------------------------------------------------------------------------------
# the first non-finite value
# ---------------------------------------------------------------------------------------------------------
def test_first_nonfinite_gradient_is_reported_once_at_its_own_step() -> None:
    rig = Rig()
    rig.feed_totals([(0, 2.0), (1, 3.0), (2, INF), (3, NAN)])
    rig.feed(5, totals([(4, NAN), (5, NAN)]), LossCheck(3, NAN))  # the loss follows: not reported again
    assert rig.codes() == [("nonfinite_gradients", "error", 2, None)]
    (f,) = rig.log.findings
    assert f.since == 2 and f.value == INF
    assert "became inf at step 2" in f.message and "while the loss was still finite" in f.message
    assert has_remedy(f.message)


def test_loss_before_gradient_wins_and_names_the_first_nonfinite_module() -> None:
    rig = Rig()
    acts = sample(4, {"net.0": 2.0, "net.1": INF, "net.2": NAN})
    rig.feed(4, totals([(3, 1.0), (4, NAN)]), LossCheck(4, INF), acts)
    assert rig.codes() == [("nonfinite_loss", "error", 4, "net.1")]
    f = rig.log.findings[0]
    assert "the loss became inf at step 4" in f.message and "`net.1`" in f.message
    assert "Likely causes, most likely first: an overflow in `net.1`" in f.message
    assert f.extra["module"] == "net.1" and f.value == INF


@pytest.mark.parametrize(
    ("loss_step", "code"), [(3, "nonfinite_loss"), (4, "nonfinite_loss"), (5, "nonfinite_gradients")]
)
def test_loss_and_gradient_tie_goes_to_the_loss(loss_step: int, code: str) -> None:
    """The loss of a step is computed before its gradient: the same step is the loss's."""
    rig = Rig()
    rig.feed(5, totals([(3, 1.0), (4, INF), (5, INF)]), LossCheck(loss_step, NAN))
    assert [f.code for f in rig.log.findings] == [code]


def test_where_the_nonfinite_loss_arose_orders_the_causes() -> None:
    rig = Rig()  # every output finite at that step: the loss computation itself
    rig.feed(7, LossCheck(7, NAN), sample(7, {"net.0": 1.0, "net.1": 2.0}))
    f = rig.log.findings[0]
    assert f.layer is None and "loss computation itself" in f.message
    assert "most likely first: a log/sqrt/division" in f.message
    rig = Rig()  # the input is already non-finite
    rig.feed(7, LossCheck(7, NAN), sample(7, {"net.0": NAN}, input_rms=NAN))
    f = rig.log.findings[0]
    assert f.layer is None and "model input itself is already non-finite" in f.message
    rig = Rig()  # the sample is of another step: nothing known of the modules; later in the run: divergence first
    rig.feed(7, LossCheck(6, INF), sample(7, {"net.0": INF}))
    f = rig.log.findings[0]
    assert (f.step, f.layer) == (6, None) and "not sampled at that step" in f.message
    assert "most likely first: learning rate too high (the run diverged" in f.message
    rig = Rig()  # ... at step 0 nothing had time to diverge
    rig.feed(0, LossCheck(0, NAN))
    assert "most likely first: a log/sqrt/division" in rig.log.findings[0].message


def test_the_earliest_loss_check_of_several_monitors_counts() -> None:
    rig = Rig()
    rig.feed(9, LossCheck(-1, 0.0), LossCheck(8, NAN), LossCheck(6, INF))
    assert rig.codes() == [("nonfinite_loss", "error", 6, None)]


def test_nonfinite_gradient_names_the_output_side_bad_layer() -> None:
    rig = Rig()
    norms = {"net.0": 1.0, "net.1": NAN, "net.2": INF, "net.3": 2.0}
    rig.feed(3, totals([(2, 1.0), (3, NAN)]), layers(3, norms))
    (f,) = rig.log.findings
    assert f.layer == "net.2" and "Non-finite in 2 of 4 layers: net.1, net.2." in f.message
    rig = Rig()
    rig.feed(3, totals([(3, NAN)]), layers(3, {"net.0": NAN, "net.1": NAN}))
    (f,) = rig.log.findings
    assert f.layer is None and "Every layer's gradient is non-finite" in f.message
    rig = Rig()  # per-layer norms of another step say nothing about this one
    rig.feed(4, totals([(3, NAN), (4, NAN)]), layers(4, norms))
    (f,) = rig.log.findings
    assert f.layer is None and "Non-finite in" not in f.message and "Every layer" not in f.message


def test_amp_scaler_needs_a_run_of_nonfinite_steps() -> None:
    rig = Rig(run=RunInfo(amp_scaler=True))
    rig.feed_totals([(0, 1.0), (1, INF), (2, 1.0), (3, INF), (4, INF), (5, 1.0)])
    assert not rig.log.findings  # skipped steps, as the GradScaler does by design
    rig.feed_totals([(s, INF) for s in range(6, 12)])
    assert rig.codes() == [("nonfinite_gradients", "error", 10, None)]  # the 5th in a row: 6, 7, 8, 9, 10
    f = rig.log.findings[0]
    assert f.since == 6 and "on 5 steps in a row from step 6" in f.message and "GradScaler" in f.message


def test_amp_run_counts_across_logging_steps_and_survives_a_checkpoint() -> None:
    rig = Rig(run=RunInfo(amp_scaler=True))
    rig.feed_totals([(0, 1.0), (1, INF), (2, INF), (3, INF)])
    assert not rig.log.findings
    resumed = Rig(run=RunInfo(amp_scaler=True))
    resumed.nonfinite.load_state_dict(json.loads(json.dumps(rig.nonfinite.state_dict())))
    resumed.feed_totals([(4, INF), (5, NAN)])
    assert [(f.code, f.step, f.since) for f in resumed.log.findings] == [("nonfinite_gradients", 5, 1)]
    fresh = Rig(run=RunInfo(amp_scaler=True))
    fresh.nonfinite.load_state_dict({})  # missing keys: defaults
    fresh.feed_totals([(4, INF), (5, NAN)])
    assert not fresh.log.findings


@pytest.mark.parametrize(("need", "found"), [(2, True), (3, False)])
def test_amp_nonfinite_steps_threshold_moves_the_verdict(need: int, found: bool) -> None:
    rig = Rig(GradientThresholds(amp_nonfinite_steps=need), RunInfo(amp_scaler=True))
    rig.feed_totals([(0, 1.0), (1, INF), (2, INF), (3, 1.0)])
    assert bool(rig.log.findings) == found


def test_activation_sample_alone_names_the_first_nonfinite_module() -> None:
    rig = Rig()
    rig.feed(0, sample(0, {"net.0": 1.0, "net.1": 3.0, "net.2": INF, "net.3": NAN}))
    assert rig.codes() == [("exploding_activations", "error", 0, "net.2")]
    f = rig.log.findings[0]
    assert f.extra["nonfinite"] is True and "`net.2` is non-finite at step 0" in f.message and has_remedy(f.message)
    rig.feed(1, totals([(1, NAN)]))  # the first non-finite value is said: no second one
    assert len(rig.log) == 1
    rig = Rig()
    rig.feed(0, sample(0, {"net.0": NAN}, input_rms=INF))
    assert rig.codes() == [("exploding_activations", "error", 0, None)] and "`<input>`" in rig.log.findings[0].message
    rig = Rig()
    rig.feed(0, sample(0, {"net.0": 1e30, "net.1": 0.0}, input_rms=None))
    assert not rig.log.findings  # large is not non-finite


def test_step_totals_merge_one_optimizer_twice_and_ignore_a_second_monitor() -> None:
    a = GradientTotals(steps=(1, 1, 2), totals=(3.0, 4.0, 1.0), optimizers=(0, 0, 0))
    b = GradientTotals(steps=(0, 1, 2), totals=(7.0, 9.0, 2.0), optimizers=(0, 0, 1))
    # (0, 1): hypot(3, 4) = 5 from the first record; (0, 0) and (1, 2) only in the second
    assert step_totals([a, b]) == [(0, 0, 7.0), (0, 1, 5.0), (0, 2, 1.0), (1, 2, 2.0)]
    assert math.isnan(step_totals([totals([(0, 1.0), (0, NAN)])])[0][2])


# ---------------------------------------------------------------------------------------------------------
# an exception, tied to what was found before it
# ---------------------------------------------------------------------------------------------------------
def test_exception_attaches_to_the_first_nonfinite_finding_once() -> None:
    rig = Rig()
    rig.log.report("exploding_gradients", "warning", 2, None, "grew.")
    rig.log.report("nonfinite_loss", "error", 5, None, "the loss became nan.")
    error = TrainingError(step=6, type_name="ValueError", text="loss is nan")
    rig.nonfinite.explain(error)
    rig.nonfinite.explain(error)
    f = rig.log.get("nonfinite_loss")
    assert f is not None and f.extra["exception"] == "ValueError: loss is nan"
    assert f.message.count("Training then raised ValueError: loss is nan at step 6") == 1
    assert "consequence of this nonfinite loss (seen from step 5)" in f.message
    assert rig.log.get("exploding_gradients").message == "grew."  # type: ignore[union-attr]


def test_exception_attaches_to_an_explosion_from_its_first_step() -> None:
    rig = Rig()
    rig.log.report("exploding_gradients", "info", 1, None, "a burst.")
    rig.log.report("weight_norm_growth", "warning", 8, "head", "grew.", since=4)
    rig.nonfinite.explain(TrainingError(step=9, type_name="RuntimeError", text="CUDA error"))
    assert "(seen from step 4)" in rig.log.get("weight_norm_growth", "head").message  # type: ignore[union-attr]
    assert rig.log.get("exploding_gradients").message == "a burst."  # type: ignore[union-attr]


def test_exception_alone_is_reported_only_when_it_names_a_nonfinite_value() -> None:
    rig = Rig()
    rig.nonfinite.explain(TrainingError(0, "RuntimeError", "modified by an inplace operation. Hint: enable anomaly"))
    assert not rig.log.findings  # not about a non-finite value: nothing to claim
    rig.nonfinite.explain(TrainingError(3, "RuntimeError", "Function 'SqrtBackward0' returned nan values in its 0th"))
    assert rig.codes() == [("nonfinite_gradients", "error", 3, None)]
    assert "SqrtBackward0" in rig.log.findings[0].extra["exception"] and has_remedy(rig.log.findings[0].message)
    rig = Rig()
    rig.nonfinite.explain(TrainingError(0, "FloatingPointError", "loss is inf"))
    assert rig.codes() == [("nonfinite_loss", "error", 0, None)]
    assert "FloatingPointError: loss is inf" in rig.log.findings[0].message


# ---------------------------------------------------------------------------------------------------------
# gradients over depth
# ---------------------------------------------------------------------------------------------------------
def test_vanishing_gradients_over_depth_needs_two_samples() -> None:
    rig = Rig()
    norms = net([1e-9, 1e-8, 1e-7, 1e-6, 1e-4, 1e-2, 1.0])
    rig.feed(0, layers(0, norms))
    assert not rig.log.findings  # one sample is not a window
    rig.feed(1, layers(1, norms))
    (f,) = rig.log.findings
    assert (f.code, f.layer, f.severity, f.step, f.since) == ("vanishing_gradients", "net.0", "error", 1, 0)
    # 7 layers: thirds of 2; median(1e-9, 1e-8) / median(1e-2, 1.0)
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-2 + 1.0) / 2))
    assert "`net.0` barely learns" in f.message and "on 2 sampled steps in a row" in f.message
    assert "net.0 1e-09, net.1 1e-08, net.2 1e-07 ... net.4 0.0001, net.5 0.01, net.6 1" in f.message
    assert has_remedy(f.message)


@pytest.mark.parametrize(
    ("first", "verdict"), [(1e-3, "warning"), (1.1e-3, None), (1e-6, "error"), (1.1e-6, "warning")]
)
def test_depth_ratio_boundaries(first: float, verdict: str | None) -> None:
    rig = Rig()  # 4 layers: thirds of one layer, ratio = first / last
    for s in range(2):
        rig.feed(s, layers(s, net([first, 1.0, 1.0, 1.0])))
    assert [f.severity for f in rig.log.findings] == ([verdict] if verdict else [])


def test_depth_ratio_must_hold_on_consecutive_samples() -> None:
    rig = Rig()
    for s, first in enumerate([1e-6, 1.0, 1e-6, 1.0]):
        rig.feed(s, layers(s, net([first, 1.0, 1.0, 1.0])))
    assert not rig.log.findings
    rig = Rig(GradientThresholds(grad_depth_samples=1))
    rig.feed(0, layers(0, net([1e-6, 1.0, 1.0, 1.0])))
    assert [(f.code, f.step, f.since) for f in rig.log.findings] == [("vanishing_gradients", 0, 0)]


def test_depth_needs_enough_layers_with_a_finite_nonzero_gradient() -> None:
    rig = Rig()
    for s in range(2):
        rig.feed(s, layers(s, net([1e-9, 1.0, NAN, 0.0, 1.0])))  # 3 usable layers
    assert not rig.log.findings
    rig = Rig(GradientThresholds(grad_depth_min_layers=3))
    for s in range(2):
        rig.feed(s, layers(s, net([1e-9, 1.0, NAN, 0.0, 1.0])))
    (f,) = rig.log.findings
    assert f.value == pytest.approx(1e-9)  # thirds of one layer: net.0 / net.4


def test_prenorm_like_20x_spread_is_silent() -> None:
    rig = Rig()
    norms = net([0.05, 0.9, 0.3, 1.0, 0.06, 0.5, 1.2, 0.4])  # a 20x spread without a trend
    for s in range(5):
        rig.feed(s, totals([(s, 80.0 / (s + 1))]), layers(s, norms))
    assert not rig.log.findings


def test_exploding_gradients_over_depth_unless_the_data_explains_them() -> None:
    rig = Rig()
    for s in range(2):
        rig.feed(s, layers(s, net([1e4, 3e3, 1.0, 1.0, 1.0])))  # thirds of one layer: 1e4 / 1
    (f,) = rig.log.findings
    assert (f.code, f.severity, f.layer, f.step) == ("exploding_gradients", "warning", "net.0", 1)
    assert f.value == pytest.approx(1e4) and "`net.0`" in f.message and "threshold 1e+03" in f.message
    assert "per layer: net.0 1e+04, net.1 3e+03, net.2 1, net.3 1, net.4 1." in f.message  # 5 layers: all shown
    assert has_remedy(f.message)
    cases: tuple[tuple[Severity, bool], ...] = (("warning", False), ("info", True))
    for severity, found in cases:
        rig = Rig()
        rig.log.report("label_scale", severity, 0, None, "targets of std 1e4")
        for s in range(2):
            rig.feed(s, layers(s, net([1e4, 3e3, 1.0, 1.0, 1.0])))
        assert (rig.log.get("exploding_gradients", "net.0") is not None) == found


def test_gradient_depth_follows_the_forward_order_not_registration() -> None:
    names = ("head", "l0", "l1", "l2", "l3", "l4")  # the head registered first, run last
    grads = {"head": 1.0, "l0": 1e-9, "l1": 1e-8, "l2": 1e-6, "l3": 1e-3, "l4": 1e-1}
    forward = sample(0, dict.fromkeys(["l0", "l1", "l2", "l3", "l4", "head"], 1.0))
    rig = Rig(run=RunInfo(layers=names))
    for s in range(2):
        rig.feed(s, layers(s, grads), forward)
    (f,) = rig.log.findings
    assert (f.code, f.layer) == ("vanishing_gradients", "l0")
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-1 + 1.0) / 2))
    rig = Rig(run=RunInfo(layers=names))  # a sample that misses a layer: registration order, no trend
    partial = sample(0, dict.fromkeys(["l0", "l1", "l2", "l3", "head"], 1.0))
    for s in range(2):
        rig.feed(s, layers(s, grads), partial)
    assert not rig.log.findings  # median(1, 1e-9) / median(1e-3, 1e-1) = 0.5 / 0.0505, about 9.9


def test_execution_order_puts_the_root_first() -> None:
    forward = sample(0, dict.fromkeys(["b", "a"], 1.0))
    assert execution_order(["<root>", "a", "b"], forward) == ["<root>", "b", "a"]
    assert execution_order(["a", "b", "c"], forward) == ["a", "b", "c"]
    assert execution_order(["a", "b"], None) == ["a", "b"]


def test_two_optimizers_are_judged_each_within_its_own_layers() -> None:
    """A generator whose gradients are all 1e-6 and a discriminator whose are all 1: one chain of both would
    read as vanishing (1e-6); each optimizer's own layers are flat."""
    rig = Rig(run=RunInfo(layers=tuple(f"g{i}" for i in range(4)) + tuple(f"d{i}" for i in range(4))))
    for s in range(3):
        rig.feed(s, layers(s, net([1e-6] * 4, "g"), 0), layers(s, net([1.0] * 4, "d"), 1))
    assert not rig.log.findings
    one = Rig()
    for s in range(2):
        one.feed(s, layers(s, net([1e-6] * 4, "g") | net([1.0] * 4, "d")))
    assert [f.code for f in one.log.findings] == ["vanishing_gradients"]


# ---------------------------------------------------------------------------------------------------------
# gradients over time: a growth is reported once the growth_fallback_steps (3) finite, non-zero totals after
# its peak confirm it (their median >= sqrt(100) = 10x its low), a later total is non-finite, or training
# raises; .step is the step that confirmed it, .since the growth's low
# ---------------------------------------------------------------------------------------------------------
def test_geometric_growth_over_time_is_exploding() -> None:
    rig = Rig()
    climb = [(s, 2.0 * 2.5**s) for s in range(8)]  # x2.5 per step: 2 -> 1220.7
    rig.feed(7, totals(climb), layers(7, {"net.0": 5.0, "net.2": 9.0}))
    assert not rig.log.findings  # 244x at step 6, 610x at step 7: no step after the peak yet
    more = [(s, 2.0 * 2.5**s) for s in range(8, 11)]  # median 2 * 2.5**9 = 7629 >= 10 x 2
    rig.feed(10, totals(more), layers(10, {"net.0": 50.0, "net.2": 90.0}))
    (f,) = rig.log.findings
    assert (f.code, f.severity, f.layer, f.step, f.since) == ("exploding_gradients", "warning", None, 10, 0)
    assert f.value == pytest.approx(2.5**7)  # 610.35: the growth as of step 7, where it first showed
    assert "2 at step 0 to 1.22e+03 at step 7 (610x, about 2.50x per step, rising on 7 of 7 steps" in f.message
    assert "The largest per-layer gradient at step 10 is in `net.2`" in f.message and has_remedy(f.message)
    assert f.extra["growth_from"] == 2.0 and f.extra["growth_step"] == 7 and f.extra["optimizer"] == 0


@pytest.mark.parametrize(("last", "severity"), [(1e4, "error"), (9999.0, "warning")])
def test_growth_of_1e4_or_more_is_an_error(last: float, severity: str) -> None:
    rig = Rig()  # shows at step 3 (4 steps: grad_min_steps): 100x and `last`x the 1.0 of step 0
    rig.feed_totals([(0, 1.0), (1, 10.0), (2, 100.0)] + [(s, last) for s in range(3, 7)])
    assert rig.codes() == [("exploding_gradients", severity, 6, None)]  # steps 4-6 stay at `last`: confirmed
    assert rig.log.findings[0].value == pytest.approx(last) and rig.log.findings[0].since == 0


def test_severity_is_that_of_the_growth_where_it_first_showed() -> None:
    rig = Rig()  # one flush: 4**7 = 16384 >= 100**2 by step 7, but the growth shows at step 5 (4**4, 4**5 >= 100)
    rig.feed_totals([(s, 4.0**s) for s in range(11)])
    assert rig.codes() == [("exploding_gradients", "warning", 8, None)]  # steps 6-8 confirm it
    assert rig.log.findings[0].value == 4.0**5  # 1024x < 1e4


def growth(series: list[float], flush_every: int = 1, th: GradientThresholds | None = None) -> list[Any]:
    rig = Rig(th)
    pairs = list(enumerate(series))
    for i in range(0, len(pairs), flush_every):
        rig.feed_totals(pairs[i : i + flush_every])
    return rig.log.of("exploding_gradients")


FLAT = [1.0 + 0.1 * (s % 3) for s in range(30)]


def test_exploding_gradients_needs_growth_that_persists() -> None:
    """One high newest value is a spike (it falls back); a geometric climb shows one step after it passes the
    threshold and is reported once the 3 steps after that confirm it; a two-step rise to a new level that stays
    is reported too."""
    assert growth(FLAT[:29] + [300.0]) == []  # the spike is the newest value: not judged an explosion
    assert growth(FLAT[:29] + [300.0], flush_every=10) == []
    assert growth(FLAT[:20] + [300.0] + FLAT[21:]) == []  # and it falls back
    (f,) = growth([2.0**s for s in range(20)])  # 2x per step: 128 at step 7, 256 at step 8
    assert (f.step, f.since) == (11, 0) and "256 at step 8" in f.message  # 7 and 8 past 100x; 9-11 confirm
    assert growth(FLAT[:20] + [300.0, 320.0, 310.0]) == []  # a new level, 1 step after its peak: pending
    (f,) = growth(FLAT[:20] + [300.0, 320.0, 310.0, 305.0, 315.0])  # ... and 3 steps after it that stay
    assert (f.step, f.since) == (24, 12) and "320 at step 21" in f.message  # 1.0 at step 12 is the window's min
    th = GradientThresholds(grad_growth_persist=1)  # one newest value suffices: the spike shows at step 29 ...
    assert growth(FLAT[:29] + [300.0], th=th) == []  # ... with no step after it
    (f,) = growth(FLAT[:29] + [300.0, 1.0, 1.1, 1.2], th=th)  # median 1.1 < 10 x 1.0 (step 21): fell back
    assert (f.severity, f.step, f.since) == ("info", 32, 21)
    assert "grew 300x (from 1 at step 21) up to step 29 and then fell back to 1.2 within 3 steps" in f.message
    (f,) = growth(FLAT[:29] + [300.0] * 4, th=th)  # median 300 >= 10 x 1.0: confirmed
    assert (f.severity, f.step, f.since) == ("warning", 32, 21)


@pytest.mark.parametrize(("factor", "found"), [(100.0, True), (99.0, False)])
def test_growth_threshold_boundary(factor: float, found: bool) -> None:
    # 1, then 6 steps to `factor`: the last two must both reach 100x the minimum 1.0; then 3 steps that stay
    series = [1.0, 2.0, 3.0, 5.0, 8.0, factor] + [factor * 1.01] * 4
    assert [f.step for f in growth(series, flush_every=len(series))] == ([9] if found else [])


def test_growth_must_rise_on_most_steps() -> None:
    zigzag = [1.0, 1.0, 1.0, 50.0, 2.0, 60.0, 3.0, 70.0, 4.0, 200.0, 300.0]  # window: 5 rises of 9 changes
    stays = zigzag + [300.0] * 3  # and the 3 steps after the peak stay at 300x
    assert growth(stays, flush_every=len(stays)) == []
    (f,) = growth(stays, flush_every=len(stays), th=GradientThresholds(grad_growth_monotone=0.5))
    assert "rising on 5 of 9 steps" in f.message and (f.step, f.since) == (13, 1)


def test_growth_must_pass_the_high_start() -> None:
    """A healthy run falls from a high start (80); a growth back up to 364.5 (729x the low 0.5) is below both
    10 x 80 and 10 x 100x: silent, until it passes 800."""
    series = [80.0, 60.0, 40.0, 0.5, 1.5, 4.5, 13.5, 40.5, 121.5, 364.5]
    stays = [*series, 364.5, 364.5, 364.5]
    assert growth(stays, flush_every=len(stays)) == []
    (f,) = growth(stays, flush_every=len(stays), th=GradientThresholds(grad_start_factor=4.0))
    assert f.value == pytest.approx(729.0) and (f.step, f.since) == (12, 3)
    passes = [*series, 1093.5, 1093.5, 1093.5, 1093.5]
    (f,) = growth(passes, flush_every=len(passes))  # 1093.5 > 800 at step 10, steps 11-13 confirm
    assert f.value == pytest.approx(1093.5 / 0.5) and (f.step, f.since) == (13, 3)


def test_high_start_falling_fast_is_silent() -> None:
    assert growth([80.0 * 0.7**s + 0.5 for s in range(20)], flush_every=20) == []


def test_zero_totals_are_skipped_and_growth_stops_at_the_first_nonfinite_value() -> None:
    with_zeros = [0.0 if s % 2 else 2.0**s for s in range(20)]  # 2**s on even steps: 4x per judged step
    (f,) = growth(with_zeros)
    assert "about 2.00x per step" in f.message  # per optimizer step, not per judged value
    assert (f.step, f.since) == (16, 0)  # shows at step 10 (256, 1024); steps 12, 14, 16 confirm, zeros don't
    rig = Rig()
    rig.feed_totals([(0, 1.0), (1, 2.0), (2, NAN)])
    rig.feed_totals([(s, 2.0**s) for s in range(3, 12)])
    assert [f.code for f in rig.log.findings] == ["nonfinite_gradients"]


def test_data_cause_suppresses_exploding_gradients() -> None:
    rig = Rig()
    rig.log.report("label_scale", "warning", 0, None, "targets have std 1e4")
    rig.feed_totals([(s, 2.0 * 3.0**s) for s in range(10)])
    assert [f.code for f in rig.log.findings] == ["label_scale"]
    assert rig.gradients.state_dict()["pending"] == {}
    rig = Rig()
    rig.log.report("input_scale", "info", 0, None, "0-255 pixels")
    rig.feed_totals([(s, 2.0 * 3.0**s) for s in range(10)])  # 243x at step 5, 729x at step 6; 7-9 confirm
    assert [(f.code, f.step) for f in rig.log.findings] == [("input_scale", 0), ("exploding_gradients", 9)]


def test_each_optimizer_grows_on_its_own_series() -> None:
    rig = Rig()
    for s in range(12):  # two optimizers at every step: 1e-3 flat and one doubling from 1
        rig.feed(s, GradientTotals(steps=(s, s), totals=(1e-3 * (1 + 0.1 * (s % 3)), 2.0**s), optimizers=(0, 1)))
    (f,) = rig.log.findings
    assert f.extra["optimizer"] == 1 and "the total gradient norm of optimizer 1 grows" in f.message
    assert (f.step, f.since) == (11, 0)  # shows at step 8, steps 9-11 confirm


def test_threshold_change_moves_the_growth_verdict() -> None:
    climb = [1.5**s for s in range(13)]  # over a 10-step window at most 1.5**9 = 38.4x
    assert growth(climb, flush_every=13) == []
    # 1.5**8 = 25.6x and 1.5**9 = 38.4x at steps 8 and 9 both past 20x; steps 10-12 confirm
    (f,) = growth(climb, flush_every=13, th=GradientThresholds(grad_growth=20.0))
    assert f.value == pytest.approx(1.5**9) and (f.step, f.since) == (12, 0)
    assert find_growth(list(enumerate(climb)), GradientThresholds(grad_window=3)) is None  # 3 < grad_min_steps


def test_a_burst_in_the_last_steps_of_a_fit_is_not_reported() -> None:
    """A fine-tuned classifier's heavy-tailed gradient norms gave a false exploding_gradients warning from a
    burst in the last steps of its fit: without the steps after the peak a burst and an explosion look alike."""
    assert growth([2.0**s for s in range(9)]) == []  # shows at step 8, the last step fed
    assert growth([2.0**s for s in range(9)], flush_every=9) == []
    assert growth([2.0**s for s in range(11)]) == []  # 2 of the 3 steps after the peak
    assert growth(FLAT[:27] + [300.0, 320.0, 310.0], flush_every=30) == []  # shows at step 28, 1 step after it
    rig = Rig()
    rig.feed_totals([(s, 2.0**s) for s in range(9)])
    assert rig.gradients.state_dict()["pending"] == {"0": [1.0, 0, 256.0, 8, 8, 8]}


def test_a_growth_in_one_long_flush_is_confirmed_by_the_steps_after_its_peak() -> None:
    """A logging interval of 30 steps delivers a growth, its peak and the steps after it at once: the growth is
    searched as of the first step where it shows (step 26), so steps 27-29 confirm it within that flush."""
    series = FLAT[:25] + [300.0, 320.0, 310.0, 305.0, 315.0]
    (f,) = growth(series, flush_every=30)
    assert (f.severity, f.step, f.since) == ("warning", 29, 18) and f.value == pytest.approx(320.0)
    # window 17-26: the low 1.0 at step 18 (FLAT cycles 1.0, 1.1, 1.2), then 6 rises of 8 changes
    assert "1 at step 18 to 320 at step 26" in f.message and "rising on 6 of 8 steps" in f.message
    assert [(g.step, g.since, g.value) for g in growth(series)] == [(29, 18, f.value)]  # as fed step by step
    # as of the flush's last step, window 20-29 rises on 5 of 8 changes from its low (step 21): no growth
    assert find_growth(list(enumerate(series)), GradientThresholds()) is None


def test_training_that_raises_while_a_growth_is_pending_confirms_it() -> None:
    rig = Rig()
    rig.feed_totals([(s, 2.0**s) for s in range(10)])  # shows at step 8; step 9 is 1 of the 3 after it
    assert not rig.log.findings
    rig.gradients.explain(TrainingError(10, "RuntimeError", "CUDA error: an illegal memory access was encountered"))
    assert rig.codes() == [("exploding_gradients", "warning", 10, None)]
    f = rig.log.findings[0]
    assert f.since == 0 and f.extra["growth_step"] == 8 and "1 at step 0 to 256 at step 8 (256x" in f.message
    assert rig.gradients.state_dict()["pending"] == {}
    rig.gradients.explain(TrainingError(11, "RuntimeError", "CUDA error"))  # nothing pending any more
    assert len(rig.log) == 1 and f.count == 1
    idle = Rig()
    idle.feed_totals(list(enumerate(FLAT)))
    idle.gradients.explain(TrainingError(30, "RuntimeError", "CUDA error"))
    assert not idle.log.findings


# ---------------------------------------------------------------------------------------------------------
# a burst that falls back
# ---------------------------------------------------------------------------------------------------------
def _burst(after: list[float]) -> Rig:
    rig = Rig()
    for s in range(9):  # 2x per step: shows at step 8 (128x and 256x the 1.0 of step 0)
        rig.feed_totals([(s, 2.0**s)])
    for i, v in enumerate(after):
        rig.feed_totals([(9 + i, v)])
    return rig


def test_growth_that_falls_back_becomes_info() -> None:
    rig = _burst([3.0, 3.0])
    assert not rig.log.findings  # 2 of the 3 steps after the peak: pending
    rig.feed_totals([(11, 3.0)])  # the 3rd finite step after the peak: median 3 < sqrt(100) x 1.0
    (f,) = rig.log.findings
    assert (f.code, f.severity, f.step, f.since) == ("exploding_gradients", "info", 11, 0)
    assert "grew 256x (from 1 at step 0) up to step 8 and then fell back to 3 within 3 steps" in f.message
    assert f.value == 256.0 and "Earlier report:" not in f.message  # never reported as an explosion


def test_growth_that_stays_within_10x_of_its_peak_is_kept() -> None:
    rig = _burst([10.0, 10.0, 10.0])  # median 10 = sqrt(100) x 1.0: not back
    assert rig.codes() == [("exploding_gradients", "warning", 11, None)]
    rig = _burst([3.0, NAN, 3.0, 3.0])  # the norm went non-finite after it: a divergence
    assert rig.log.get("exploding_gradients").severity == "warning"  # type: ignore[union-attr]


def test_a_nonfinite_total_after_the_peak_confirms_the_growth() -> None:
    rig = _burst([3.0, INF])  # step 10, the 2nd after the peak, is non-finite
    assert rig.codes() == [("nonfinite_gradients", "error", 10, None), ("exploding_gradients", "warning", 10, None)]
    f = rig.log.get("exploding_gradients")
    assert f is not None and f.since == 0 and f.extra["growth_step"] == 8 and "to 256 at step 8" in f.message
    rig.feed_totals([(11, 3.0), (12, 3.0)])  # low again after the non-finite step: still a divergence
    assert rig.log.get("exploding_gradients").severity == "warning"  # type: ignore[union-attr]
    rig = Rig()  # in the same flush as the growth: the step right after the peak
    rig.feed_totals([(s, 2.0**s) for s in range(9)] + [(9, NAN)])
    assert rig.codes() == [("nonfinite_gradients", "error", 9, None), ("exploding_gradients", "warning", 9, None)]
    assert rig.log.get("exploding_gradients").since == 0  # type: ignore[union-attr]


def test_a_confirmed_growth_that_falls_back_later_becomes_info() -> None:
    rig = _burst([10.0, 10.0, 10.0])  # confirmed at step 11
    for s in (12, 13, 14):  # the latest 3 steps after the peak: median 3 < 10 x 1.0
        rig.feed_totals([(s, 3.0)])
    (f,) = rig.log.findings
    assert (f.severity, f.step, f.since) == ("info", 11, 0)  # the step it became known stays
    assert "grew 256x (from 1) up to step 8 and then fell back to 3" in f.message and "Earlier report:" in f.message


def test_fallback_steps_threshold() -> None:
    rig = Rig(GradientThresholds(growth_fallback_steps=1))
    for s in range(9):
        rig.feed_totals([(s, 2.0**s)])
    rig.feed_totals([(9, 3.0)])
    assert rig.log.get("exploding_gradients").severity == "info"  # type: ignore[union-attr]


def test_a_real_explosion_after_a_burst_escalates_again() -> None:
    rig = _burst([3.0, 3.0, 3.0])
    assert rig.log.get("exploding_gradients").severity == "info"  # type: ignore[union-attr]
    # 3 -> 3 * 2**11: 384 and 768 at steps 18 and 19 are 128x and 256x the 3.0 of step 10 (the window's low
    # once step 9 left it) and past 10x the start (max 4); steps 20-22 confirm
    for s in range(12, 23):
        rig.feed_totals([(s, 3.0 * 2.0 ** (s - 11))])
        if s == 21:
            assert rig.log.get("exploding_gradients").severity == "info"  # type: ignore[union-attr]
    f = rig.log.get("exploding_gradients")
    assert f is not None and f.severity == "warning" and f.last_step == 22
    assert (
        f.extra["growth_step"] == 19 and f.extra["growth_from"] == 3.0 and "3 at step 10 to 768 at step 19" in f.message
    )


# ---------------------------------------------------------------------------------------------------------
# state
# ---------------------------------------------------------------------------------------------------------
def _plain(x: Any) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return isinstance(x, (int, float, str)) or x is None


def test_state_dict_round_trip_resumes_the_same_verdicts() -> None:
    def run(resume_at: int | None) -> list[tuple[str, str, int, int, str | None]]:
        rig = Rig()
        for s in range(14):
            if s == resume_at:
                state = json.loads(json.dumps([rig.nonfinite.state_dict(), rig.gradients.state_dict()]))
                log_state = rig.log.state_dict()
                rig = Rig()
                rig.log.load_state_dict(log_state)
                rig.nonfinite.load_state_dict(state[0])
                rig.gradients.load_state_dict(state[1])
            value = 2.0**s if s < 9 else 3.0
            rig.feed(s, totals([(s, value)]), layers(s, net([2e-6, 1.0, 1.0, 1.0])))
        return [(f.code, f.severity, f.step, f.since, f.layer) for f in rig.log.findings]

    straight = run(None)
    assert straight == [
        ("vanishing_gradients", "warning", 1, 0, "net.0"),
        ("exploding_gradients", "info", 11, 0, None),  # shows at step 8, falls back on steps 9-11
    ]
    for at in (1, 5, 8, 9, 10, 11, 12):  # 9-11: while the growth of step 8 is pending
        assert run(at) == straight, at


def test_state_dict_round_trip_keeps_a_pending_growth() -> None:
    rig = Rig()
    rig.feed_totals([(s, 2.0**s) for s in range(10)])  # shows at step 8; step 9 is 1 of the 3 after it
    state = json.loads(json.dumps(rig.gradients.state_dict()))
    assert _plain(state) and state["pending"] == {"0": [1.0, 0, 256.0, 8, 8, 8]}  # low, at, high, at, 8 of 8 rises
    resumed = Rig()
    resumed.gradients.load_state_dict(state)
    assert resumed.gradients.state_dict() == state
    resumed.feed_totals([(10, 1024.0), (11, 2048.0)])  # steps 9-11: median 1024 >= 10 x 1.0
    assert resumed.codes() == [("exploding_gradients", "warning", 11, None)]
    assert resumed.log.findings[0].since == 0 and "1 at step 0 to 256 at step 8" in resumed.log.findings[0].message
    fallen = Rig()
    fallen.gradients.load_state_dict(state)
    fallen.feed_totals([(10, 2.0), (11, 2.0)])  # steps 9-11: median(512, 2, 2) = 2 < 10 x 1.0
    assert fallen.codes() == [("exploding_gradients", "info", 11, None)]
    fresh = Rig()  # without the state: 2 steps are no window, nothing pending
    fresh.feed_totals([(10, 1024.0), (11, 2048.0)])
    assert not fresh.log.findings


def test_state_dict_is_plain_and_bounded() -> None:
    rig = Rig(GradientThresholds(grad_history=20))
    for s in range(50):
        rig.feed(s, totals([(s, 1.0)]), layers(s, net([1.0, 1.0, 1.0, 1.0]), 0), layers(s, net([1.0] * 4, "d"), 1))
    state = rig.gradients.state_dict()
    assert _plain(state) and _plain(rig.nonfinite.state_dict())
    assert len(state["totals"]["0"]) == 20 and all(len(h) == 2 for h in state["depth"].values())
    assert state["groups"] == {"0": ["net.0", "net.1", "net.2", "net.3"], "1": ["d0", "d1", "d2", "d3"]}
    empty = Rig()
    empty.gradients.load_state_dict({})
    assert empty.gradients.state_dict()["totals"] == {}
