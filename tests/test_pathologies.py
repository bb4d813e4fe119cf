"""Unit tests of the pathology diagnosis on host numbers, checked against hand computations, plus a few
real tiny runs for what only a run can show (step-0 init advice, the first non-finite value, exceptions)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import LitModel, bad, fit, loader, mlp, regression_data
from test_rules_gradients import Rig, layers, sample, totals
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck.diagnosis.activations import ActivationRules
from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.init import init_message, layer_init_advice
from lightning_normcheck.diagnosis.records import (
    ActivationSample,
    GradientLayers,
    InitStats,
    LayerInitStat,
    LossCheck,
    ModuleStat,
    RunInfo,
    TrainingError,
)
from lightning_normcheck.diagnosis.thresholds import InitThresholds
from lightning_normcheck.diagnosis.thresholds import Thresholds as RuleThresholds
from lightning_normcheck.findings import FindingLog

REMEDY_WORDS = ("lower the lr", "init", "clip", "normaliz", "layernorm", "batchnorm", "eps", "warmup", "residual")


def has_remedy(message: str) -> bool:
    low = message.lower()
    return "what to try" in low and any(w in low for w in REMEDY_WORDS)


# ---------------------------------------------------------------------------------------------------------
# non-finite values: the first one, once
# ---------------------------------------------------------------------------------------------------------
def test_first_nonfinite_gradient_is_reported_once() -> None:
    rig = Rig()
    rig.feed(3, totals([(0, 2.0), (1, 3.0), (2, math.inf), (3, math.nan)]))
    rig.feed(5, totals([(4, math.nan), (5, math.nan)]), LossCheck(3, math.nan))
    nonfinite = [f for f in rig.log.findings if f.code.startswith("nonfinite")]
    assert [(f.code, f.step, f.severity) for f in nonfinite] == [("nonfinite_gradients", 2, "error")]
    assert "inf" in nonfinite[0].message and has_remedy(nonfinite[0].message)


def test_loss_before_gradient_wins_and_names_the_first_nonfinite_module() -> None:
    rig = Rig()
    acts = sample(4, {"net.0": 2.0, "net.1": math.inf, "net.2": math.nan}, input_rms=1.0)
    rig.feed(4, totals([(3, 1.0), (4, math.nan)]), LossCheck(4, math.inf), acts)
    assert [(f.code, f.step, f.layer) for f in rig.log.findings] == [("nonfinite_loss", 4, "net.1")]
    assert "`net.1`" in rig.log.findings[0].message


def test_amp_scaler_tolerates_a_few_skipped_steps() -> None:
    rig = Rig(run=RunInfo(amp_scaler=True))
    rig.feed(5, totals([(0, 1.0), (1, math.inf), (2, 1.0), (3, math.inf), (4, math.inf), (5, 1.0)]))
    assert not rig.log.findings
    rig.feed(11, totals([(s, math.inf) for s in range(6, 12)]))
    # known at the 5th non-finite step in a row (step 10); the run started at step 6
    assert [(f.code, f.step, f.since) for f in rig.log.findings] == [("nonfinite_gradients", 10, 6)]


# ---------------------------------------------------------------------------------------------------------
# gradients over depth and over time
# ---------------------------------------------------------------------------------------------------------
def _layers(norms: list[float]) -> dict[str, float]:
    return {f"net.{i}": v for i, v in enumerate(norms)}


def test_vanishing_gradients_over_depth_needs_two_samples() -> None:
    rig = Rig()
    norms = _layers([1e-9, 1e-8, 1e-7, 1e-6, 1e-4, 1e-2, 1.0])
    rig.feed(0, totals([(0, 1.0)]), layers(0, norms))
    assert not rig.log.findings  # one sample is not a window
    rig.feed(1, totals([(1, 1.0)]), layers(1, norms))
    (f,) = rig.log.findings
    assert (f.code, f.layer, f.severity) == ("vanishing_gradients", "net.0", "error")
    # median of the first third (2 layers) / median of the last third, computed by hand
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-2 + 1.0) / 2))
    assert "net.0" in f.message and has_remedy(f.message)


def test_geometric_growth_over_time_is_exploding() -> None:
    rig = Rig()
    climb = [(s, 2.0 * 2.5**s) for s in range(8)]  # x2.5 per step: 2 -> 1220
    rig.feed(7, totals(climb), layers(7, {"net.0": 5.0, "net.2": 9.0}))
    assert not rig.log.findings  # past 100x at steps 6 and 7: the steps after the peak are still to come
    rig.feed(10, totals([(s, 2.0 * 2.5**s) for s in range(8, 11)]), layers(10, {"net.0": 50.0, "net.2": 90.0}))
    (f,) = bad(rig.log.findings)
    assert f.code == "exploding_gradients" and (f.step, f.since) == (10, 0)  # steps 8-10 confirm, grown from 0
    assert "2.50x per step" in f.message and "at step 10 is in `net.2`" in f.message and has_remedy(f.message)


def test_high_start_falling_fast_is_silent() -> None:
    rig = Rig()
    rig.feed(19, totals([(s, 80.0 * 0.7**s + 0.5) for s in range(20)]))
    assert not rig.log.findings


def test_label_scale_finding_suppresses_exploding_gradients() -> None:
    rig = Rig()
    rig.log.report("label_scale", "warning", 0, None, "targets have std 1e4")
    rig.feed(7, totals([(s, 2.0 * 3.0**s) for s in range(8)]))
    assert [f.code for f in rig.log.findings] == ["label_scale"]


# ---------------------------------------------------------------------------------------------------------
# activations over depth
# ---------------------------------------------------------------------------------------------------------
def _net(depth: int, gain: float, act: type[nn.Module] = nn.ReLU) -> tuple[dict[str, nn.Module], list[str]]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(32, 32)
        nn.init.normal_(lin.weight, std=gain / math.sqrt(32))
        layers += [lin, act()]
    net = nn.Sequential(*layers)
    modules = {n: m for n, m in net.named_modules() if n}
    return modules, list(modules)


_KINDS = {nn.Linear: "weight", nn.ReLU: "relu", nn.Tanh: "bounded"}


def _init_stats(modules: dict[str, nn.Module]) -> InitStats:
    """The weight scale of each Linear, as measured at the start of fit (unbiased std of the weight)."""
    linears = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear)]
    return InitStats(
        tuple(LayerInitStat(n, m.in_features, m.out_features, float(m.weight.detach().std())) for n, m in linears)
    )


def _sample(
    order: list[str],
    modules: dict[str, nn.Module],
    step: int,
    per_layer: float = 1.0,
    rms: dict[str, float] | None = None,
    dead: dict[str, float] | None = None,
    sat: dict[str, float] | None = None,
    window_samples: int = 0,
) -> ActivationSample:
    """One sampled step: every Linear multiplies the RMS by ``per_layer`` (``rms`` overrides a module's),
    activations pass it on; ``dead``/``sat``: dead-window and saturated fractions per module."""
    mods, r = [], 1.0
    for n in order:
        m = modules[n]
        r = r * per_layer if isinstance(m, nn.Linear) else r
        r = (rms or {}).get(n, r)
        kind, d, st = _KINDS.get(type(m), ""), (dead or {}).get(n), (sat or {}).get(n)
        mods.append(ModuleStat(n, type(m).__name__, kind, r, dead_window=d, saturated=st))
    return ActivationSample(step, tuple(mods), input_rms=1.0, window_samples=window_samples, window=5)


def _rules(modules: dict[str, nn.Module] | None = None) -> ActivationRules:
    return ActivationRules(Context(RuleThresholds(), init=_init_stats(modules) if modules else None), FindingLog())


def test_exploding_activations_at_step0_name_the_layers_and_the_std() -> None:
    modules, order = _net(6, gain=3.0)
    rules = _rules(modules)
    rules.observe(Flush(0, (_sample(order, modules, 0, 2.5),)))
    (f,) = rules.log.findings
    assert f.code == "exploding_activations" and f.step == 0 and f.layer == "8"  # the head "10" is not judged
    assert "initialization" in f.message and "kaiming" in f.message.lower()
    # every layer is named with its own gain; the std to use is sqrt(2/fan_in), computed by hand
    std0 = float(modules["0"].weight.detach().std())
    assert f"{std0 * math.sqrt(32):.3g}" in f.message
    assert f"{math.sqrt(2 / 32):.3g}" in f.message
    assert has_remedy(f.message)


def test_one_trend_finding_even_when_its_end_layer_moves() -> None:
    modules, order = _net(6, gain=0.2)
    rules = _rules()
    for step, per_layer in enumerate([0.15, 0.2, 0.25]):
        # the last layer stops shrinking
        rules.observe(Flush(step, (_sample(order, modules, step, per_layer, rms={"10": per_layer**5}),)))
    assert [f.code for f in rules.log.findings] == ["vanishing_activations"]
    assert rules.log.findings[0].count == 3


def test_flat_or_noisy_depth_profile_is_silent() -> None:
    modules, order = _net(8, gain=math.sqrt(2))
    rng = [1.0, 0.8, 1.3, 0.9, 1.2, 0.85, 1.1, 0.95]
    linears = [o for o in order if isinstance(modules[o], nn.Linear)]
    rules = _rules()
    rules.observe(Flush(0, (_sample(order, modules, 0, rms=dict(zip(linears, rng))),)))
    assert not rules.log.findings


def test_init_advice_matches_hand_computation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 32), nn.SELU(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 1)
    )
    modules = {n: m for n, m in net.named_modules() if n}
    order = list(modules)
    advice = {a.name: a for a in layer_init_advice(_init_stats(modules), _sample(order, modules, 0).modules)}
    assert advice["0"].scheme == "Xavier" and advice["0"].recommended_std == pytest.approx(math.sqrt(2 / (16 + 64)))
    assert advice["2"].scheme == "LeCun" and advice["2"].recommended_std == pytest.approx(1 / math.sqrt(64))
    assert advice["4"].scheme == "Kaiming" and advice["4"].recommended_std == pytest.approx(math.sqrt(2 / 32))
    assert advice["6"].activation == "none" and advice["6"].expected_gain == 1.0
    w = net[2].weight.detach().numpy()
    assert advice["2"].gain == pytest.approx(w.std(ddof=1) * math.sqrt(64), rel=1e-4)
    # PyTorch's default init has gain 1/sqrt(3) ~ 0.58: too low for every activation here
    assert "Re-initialize" in init_message(list(advice.values()), "low", InitThresholds())
    assert init_message(list(advice.values()), "high", InitThresholds()) == ""


# ---------------------------------------------------------------------------------------------------------
# dead and saturated units
# ---------------------------------------------------------------------------------------------------------
def test_dead_units_judged_on_full_windows_only() -> None:
    modules, order = _net(2, gain=math.sqrt(2))
    rules = _rules()
    rules.observe(Flush(2, (_sample(order, modules, 2, dead={"1": 0.9}, window_samples=3),)))
    assert not rules.log.findings
    rules.observe(Flush(4, (_sample(order, modules, 4, dead={"1": 0.44, "3": 0.65}, window_samples=5),)))
    (f,) = rules.log.findings
    assert (f.code, f.layer, f.severity) == ("dead_units", "3", "warning")
    assert "65%" in f.message and "`2`" in f.message and has_remedy(f.message)


def test_saturation_needs_a_window_and_spares_the_output_head() -> None:
    modules, order = _net(2, gain=6.0, act=nn.Tanh)
    rules = _rules(modules)
    for step in range(5):
        rules.observe(Flush(step, (_sample(order, modules, step, sat={"1": 0.7, "3": 0.95}),)))
        if step < 4:
            assert not rules.log.findings
    by_layer = {f.layer: f for f in rules.log.findings}
    assert by_layer["1"].severity == "warning" and "70%" in by_layer["1"].message
    # the Linear feeding it has std x sqrt(fan_in) = 6 where Xavier's is 1: named, with the std to use
    assert "Init is off for the activation that follows: 0: std" in by_layer["1"].message
    assert "Xavier: std 0.177" in by_layer["1"].message
    assert by_layer["3"].severity == "info"  # the last module: a confident output head


# ---------------------------------------------------------------------------------------------------------
# clipping and weights
# ---------------------------------------------------------------------------------------------------------
def _clip_rules(th: RuleThresholds | None = None) -> Any:
    from lightning_normcheck.diagnosis.clipping import ClipRules

    return ClipRules(Context(th or RuleThresholds()), FindingLog())


def _clip(rules: Any, n: int, rate: float, excess: float, recent: float) -> None:
    """One clip window of ``n`` steps ending at step n - 1 (clip value 1.0, norm clipping, window 50)."""
    from lightning_normcheck.diagnosis.records import ClipWindow

    w = ClipWindow(n - 1, 1.0, "norm", rate=rate, mean_excess=excess, steps=n, recent=recent, window=50)
    rules.observe(Flush(n - 1, (w,)))


def test_clip_rate_rules() -> None:
    rules = _clip_rules()
    _clip(rules, 12, 1.0, 50.0, 1.0)  # too few steps
    _clip(rules, 30, 0.9, 50.0, 0.2)  # not clipping any more
    assert not rules.log.findings
    _clip(rules, 30, 0.85, 1.6, 1.0)
    assert rules.log.findings[0].severity == "info"  # updates shrunk by under half: a hint only
    _clip(rules, 30, 1.0, 40.0, 1.0)
    (f,) = rules.log.findings
    assert f.severity == "error" and "100%" in f.message and "40x" in f.message and has_remedy(f.message)


def _weight_rules() -> Any:
    from lightning_normcheck.diagnosis.weights import WeightRules

    return WeightRules(Context(RuleThresholds()), FindingLog())


def _weights(rules: Any, step: int, growth: dict[str, float]) -> None:
    """Layers at ``growth`` x a start-of-fit norm of 3.0."""
    from lightning_normcheck.diagnosis.records import WeightSample

    names = tuple(growth)
    norms = tuple(3.0 * g for g in growth.values())
    rules.observe(Flush(step, (WeightSample(step, names, norms, start_norms=(3.0,) * len(names)),)))


def test_thresholds_are_configurable() -> None:
    from lightning_normcheck.diagnosis.thresholds import ClipThresholds

    rules = _clip_rules(RuleThresholds(clipping=ClipThresholds(clip_min_steps=40)))
    _clip(rules, 30, 0.9, 5.0, 0.9)
    assert not rules.log.findings
    rules = _clip_rules(RuleThresholds(clipping=ClipThresholds(clip_min_steps=10)))
    _clip(rules, 30, 0.9, 5.0, 0.9)
    assert rules.log.findings[0].severity == "warning"


def test_explain_exception_attaches_to_the_first_nonfinite_finding() -> None:
    rig = Rig()
    rig.log.report("exploding_gradients", "warning", 2, None, "grew.")
    rig.log.report("nonfinite_loss", "error", 5, None, "the loss became nan.")
    rig.nonfinite.explain(TrainingError(6, "ValueError", "loss is nan"))
    f = rig.log.get("nonfinite_loss")
    assert f is not None and "ValueError: loss is nan" in f.message and f.extra["exception"]
    empty = Rig()
    empty.nonfinite.explain(TrainingError(0, "RuntimeError", "modified by an inplace operation. Hint: enable anomaly"))
    assert not empty.log.findings  # not about a non-finite value: nothing to claim


# ---------------------------------------------------------------------------------------------------------
# real runs
# ---------------------------------------------------------------------------------------------------------
def test_real_run_nan_loss_raises_and_is_explained() -> None:
    class Checked(LitModel):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            x, y = batch
            loss = (torch.log(self(x) - 1.0) - y).pow(2).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()}")
            return loss

    cb = NormCheck(print_summary=False)
    with pytest.raises(FloatingPointError):
        fit(Checked(mlp()), loader(regression_data(n=128)), [cb], max_steps=10, log_every_n_steps=50)
    (f,) = bad(cb.findings)
    assert f.code == "nonfinite_loss" and f.step == 0 and "FloatingPointError" in f.message


def test_real_run_step0_init_advice_without_a_logger() -> None:
    torch.manual_seed(0)
    net = mlp(width=32, depth=6)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=3.0 / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    cb = NormCheck(print_summary=False)
    fit(
        LitModel(net, lr=1e-4, optimizer="adam"),
        loader(regression_data(n=128)),
        [cb],
        max_steps=3,
        log_every_n_steps=50,
    )
    (f,) = [f for f in bad(cb.findings) if f.code == "exploding_activations"]
    assert f.step == 0 and f.layer is not None and f.layer.startswith("net.")
    assert "net.0: std" in f.message and "Kaiming: std" in f.message


def test_activation_monitor_alone_names_the_first_nonfinite_module() -> None:
    from lightning_normcheck import ActivationNormMonitor

    class Overflow(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 1e30 * 1e30  # inf in float32

    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), Overflow(), nn.Linear(16, 1))
    cb = ActivationNormMonitor(print_summary=False)
    fit(LitModel(net, lr=1e-3), loader(regression_data(n=64)), [cb], max_steps=2)
    (f,) = bad(cb.findings)
    assert (f.code, f.layer, f.step, f.severity) == ("exploding_activations", "net.2", 0, "error")


def test_gradient_depth_follows_the_forward_order_not_registration() -> None:
    names = ["head", "l0", "l1", "l2", "l3", "l4"]  # the head registered first, run last
    grads = {"head": 1.0, "l0": 1e-9, "l1": 1e-8, "l2": 1e-6, "l3": 1e-3, "l4": 1e-1}
    rig = Rig(run=RunInfo(layers=tuple(names)))
    for s in range(2):
        forward = sample(s, dict.fromkeys(["l0", "l1", "l2", "l3", "l4", "head"], 1.0), input_rms=1.0)
        rig.feed(s, totals([(s, 1.0)]), layers(s, grads), forward)
    (f,) = rig.log.findings
    assert (f.code, f.layer) == ("vanishing_gradients", "l0")
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-1 + 1.0) / 2))


def test_weight_growth_without_a_reference_uses_the_first_sample() -> None:
    from lightning_normcheck.diagnosis.records import WeightSample

    rules = _weight_rules()
    for s, head in enumerate([3.0, 12.0, 30.0, 36.0]):
        rules.observe(Flush(s, (WeightSample(s, ("a", "b", "c", "head"), (3.0, 3.1, 2.9, head)),)))
    (f,) = rules.log.findings
    # 10x and 12x the median at steps 2 and 3: 2 in a row, known at step 3
    assert (f.code, f.layer, f.step, f.since) == ("weight_norm_growth", "head", 3, 2)


def test_exploding_init_also_flags_huge_first_gradients_only_then() -> None:
    modules, order = _net(6, gain=3.0)
    grads = GradientLayers(0, 0, ("0", "2"), (3e3, 4e3))  # total 5e3, by hand
    rules = _rules(modules)
    rules.observe(Flush(0, (_sample(order, modules, 0, 2.5), grads)))
    f = rules.log.get("exploding_gradients")
    assert f is not None and f.step == 0 and f.value == pytest.approx(5e3) and "net" not in (f.layer or "")
    assert "std 0.25" in f.message  # Kaiming for fan_in 32: sqrt(2/32)
    rules2 = _rules(modules)
    rules2.observe(Flush(0, (_sample(order, modules, 0, 1.0), grads)))
    assert not rules2.log.findings  # a large first gradient alone is no finding
