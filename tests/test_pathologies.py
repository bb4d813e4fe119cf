"""Unit tests of the pathology diagnosis on host numbers, checked against hand computations, plus a few
real tiny runs for what only a run can show (step-0 init advice, the first non-finite value, exceptions)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import LitModel, bad, fit, loader, mlp, regression_data
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck.diagnosis.init import init_message, layer_init_advice
from lightning_normcheck.diagnosis.pathologies import (
    ActivationHistory,
    ClipHistory,
    GradientHistory,
    Thresholds,
    WeightHistory,
    diagnose_activations,
    diagnose_clipping,
    diagnose_gradients,
    diagnose_weights,
    explain_exception,
)
from lightning_normcheck.findings import FindingLog

REMEDY_WORDS = ("lower the lr", "init", "clip", "normaliz", "layernorm", "batchnorm", "eps", "warmup", "residual")


def has_remedy(message: str) -> bool:
    low = message.lower()
    return "what to try" in low and any(w in low for w in REMEDY_WORDS)


# ---------------------------------------------------------------------------------------------------------
# non-finite values: the first one, once
# ---------------------------------------------------------------------------------------------------------
def test_first_nonfinite_gradient_is_reported_once() -> None:
    log, hist = FindingLog(), GradientHistory()
    diagnose_gradients(log, hist, [(0, 2.0), (1, 3.0), (2, math.inf), (3, math.nan)], {}, 3, [], values={})
    diagnose_gradients(log, hist, [(4, math.nan), (5, math.nan)], {}, 5, [], values={"_nonfinite_loss_step": 3.0})
    nonfinite = [f for f in log.findings if f.code.startswith("nonfinite")]
    assert [(f.code, f.step, f.severity) for f in nonfinite] == [("nonfinite_gradients", 2, "error")]
    assert "inf" in nonfinite[0].message and has_remedy(nonfinite[0].message)


def test_loss_before_gradient_wins_and_names_the_first_nonfinite_module() -> None:
    log, hist = FindingLog(), GradientHistory()
    values = {
        "_nonfinite_loss_step": 4.0,
        "_nonfinite_loss_value": math.inf,
        "normcheck/act_rms/<input>": 1.0,
        "normcheck/act_rms/net.0": 2.0,
        "normcheck/act_rms/net.1": math.inf,
        "normcheck/act_rms/net.2": math.nan,
    }
    diagnose_gradients(log, hist, [(3, 1.0), (4, math.nan)], {}, 4, [], values=values)
    assert [(f.code, f.step, f.layer) for f in log.findings] == [("nonfinite_loss", 4, "net.1")]
    assert "`net.1`" in log.findings[0].message


def test_amp_scaler_tolerates_a_few_skipped_steps() -> None:
    log, hist = FindingLog(), GradientHistory()
    totals = [(0, 1.0), (1, math.inf), (2, 1.0), (3, math.inf), (4, math.inf), (5, 1.0)]
    diagnose_gradients(log, hist, totals, {}, 5, [], values={}, amp_scaler=True)
    assert not log.findings
    diagnose_gradients(log, hist, [(s, math.inf) for s in range(6, 12)], {}, 11, [], values={}, amp_scaler=True)
    assert [(f.code, f.step) for f in log.findings] == [("nonfinite_gradients", 6)]


# ---------------------------------------------------------------------------------------------------------
# gradients over depth and over time
# ---------------------------------------------------------------------------------------------------------
def _layers(norms: list[float]) -> tuple[dict[str, float], list[str]]:
    names = [f"net.{i}" for i in range(len(norms))]
    return dict(zip(names, norms)), names


def test_vanishing_gradients_over_depth_needs_two_samples() -> None:
    log, hist = FindingLog(), GradientHistory()
    layers, names = _layers([1e-9, 1e-8, 1e-7, 1e-6, 1e-4, 1e-2, 1.0])
    diagnose_gradients(log, hist, [(0, 1.0)], layers, 0, names, values={})
    assert not log.findings  # one sample is not a window
    diagnose_gradients(log, hist, [(1, 1.0)], layers, 1, names, values={})
    (f,) = log.findings
    assert (f.code, f.layer, f.severity) == ("vanishing_gradients", "net.0", "error")
    # median of the first third (2 layers) / median of the last third, computed by hand
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-2 + 1.0) / 2))
    assert "net.0" in f.message and has_remedy(f.message)


def test_prenorm_like_20x_spread_is_silent() -> None:
    log, hist = FindingLog(), GradientHistory()
    layers, names = _layers([0.05, 0.9, 0.3, 1.0, 0.06, 0.5, 1.2, 0.4])  # a 20x spread without a trend
    for s in range(5):
        diagnose_gradients(log, hist, [(s, 80.0 / (s + 1))], layers, s, names, values={})
    assert not log.findings


def test_geometric_growth_over_time_is_exploding() -> None:
    log, hist = FindingLog(), GradientHistory()
    totals = [(s, 2.0 * 2.5**s) for s in range(8)]  # x2.5 per step: 2 -> 1220
    diagnose_gradients(log, hist, totals, {"net.0": 5.0, "net.2": 9.0}, 7, ["net.0", "net.2"], values={})
    (f,) = bad(log.findings)
    assert f.code == "exploding_gradients" and f.step == 0
    assert "2.50x per step" in f.message and has_remedy(f.message)


def test_high_start_falling_fast_is_silent() -> None:
    log, hist = FindingLog(), GradientHistory()
    totals = [(s, 80.0 * 0.7**s + 0.5) for s in range(20)]
    diagnose_gradients(log, hist, totals, {}, 19, [], values={})
    assert not log.findings


def test_label_scale_finding_suppresses_exploding_gradients() -> None:
    log, hist = FindingLog(), GradientHistory()
    log.report("label_scale", "warning", 0, None, "targets have std 1e4")
    diagnose_gradients(log, hist, [(s, 2.0 * 3.0**s) for s in range(8)], {}, 7, [], values={})
    assert [f.code for f in log.findings] == ["label_scale"]


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


def _rms_values(order: list[str], modules: dict[str, nn.Module], per_layer: float) -> dict[str, float]:
    values = {"normcheck/act_rms/<input>": 1.0}
    r = 1.0
    for n in order:
        if isinstance(modules[n], nn.Linear):
            r *= per_layer
        values[f"normcheck/act_rms/{n}"] = r
    return values


def test_exploding_activations_at_step0_name_the_layers_and_the_std() -> None:
    modules, order = _net(6, gain=3.0)
    log = FindingLog()
    diagnose_activations(log, ActivationHistory(), _rms_values(order, modules, 2.5), order, modules, 0)
    (f,) = log.findings
    assert f.code == "exploding_activations" and f.step == 0 and f.layer == "8"  # the head "10" is not judged
    assert "initialization" in f.message and "kaiming" in f.message.lower()
    # every layer is named with its own gain; the std to use is sqrt(2/fan_in), computed by hand
    std0 = float(modules["0"].weight.detach().std())
    assert f"{std0 * math.sqrt(32):.3g}" in f.message
    assert f"{math.sqrt(2 / 32):.3g}" in f.message
    assert has_remedy(f.message)


def test_one_trend_finding_even_when_its_end_layer_moves() -> None:
    modules, order = _net(6, gain=0.2)
    log, hist = FindingLog(), ActivationHistory()
    for step, per_layer in enumerate([0.15, 0.2, 0.25]):
        values = _rms_values(order, modules, per_layer)
        values["normcheck/act_rms/10"] = values["normcheck/act_rms/8"]  # the last layer stops shrinking
        diagnose_activations(log, hist, values, order, modules, step)
    assert [f.code for f in log.findings] == ["vanishing_activations"]
    assert log.findings[0].count == 3


def test_flat_or_noisy_depth_profile_is_silent() -> None:
    modules, order = _net(8, gain=math.sqrt(2))
    rng = [1.0, 0.8, 1.3, 0.9, 1.2, 0.85, 1.1, 0.95]
    values = {"normcheck/act_rms/<input>": 1.0}
    for i, n in enumerate(o for o in order if isinstance(modules[o], nn.Linear)):
        values[f"normcheck/act_rms/{n}"] = rng[i]
    log = FindingLog()
    diagnose_activations(log, ActivationHistory(), values, order, modules, 0)
    assert not log.findings


def test_init_advice_matches_hand_computation() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 32), nn.SELU(), nn.Linear(32, 8), nn.GELU(), nn.Linear(8, 1)
    )
    modules = {n: m for n, m in net.named_modules() if n}
    advice = {a.name: a for a in layer_init_advice(modules, list(modules))}
    assert advice["0"].scheme == "Xavier" and advice["0"].recommended_std == pytest.approx(math.sqrt(2 / (16 + 64)))
    assert advice["2"].scheme == "LeCun" and advice["2"].recommended_std == pytest.approx(1 / math.sqrt(64))
    assert advice["4"].scheme == "Kaiming" and advice["4"].recommended_std == pytest.approx(math.sqrt(2 / 32))
    assert advice["6"].activation == "none" and advice["6"].expected_gain == 1.0
    w = net[2].weight.detach().numpy()
    assert advice["2"].gain == pytest.approx(w.std(ddof=1) * math.sqrt(64), rel=1e-4)
    # PyTorch's default init has gain 1/sqrt(3) ~ 0.58: too low for every activation here
    assert "Re-initialize" in init_message(list(advice.values()), "low")
    assert init_message(list(advice.values()), "high") == ""


# ---------------------------------------------------------------------------------------------------------
# dead and saturated units
# ---------------------------------------------------------------------------------------------------------
def test_dead_units_judged_on_full_windows_only() -> None:
    modules, order = _net(2, gain=math.sqrt(2))
    log = FindingLog()
    diagnose_activations(log, ActivationHistory(), {"_window_samples": 3.0, "_dead_window/1": 0.9}, order, modules, 2)
    assert not log.findings
    hist = ActivationHistory()
    diagnose_activations(
        log, hist, {"_window_samples": 5.0, "_dead_window/1": 0.44, "_dead_window/3": 0.65}, order, modules, 4
    )
    (f,) = log.findings
    assert (f.code, f.layer, f.severity) == ("dead_units", "3", "warning")
    assert "65%" in f.message and "`2`" in f.message and has_remedy(f.message)


def test_saturation_needs_a_window_and_spares_the_output_head() -> None:
    modules, order = _net(2, gain=6.0, act=nn.Tanh)
    log, hist = FindingLog(), ActivationHistory()
    for step in range(5):
        diagnose_activations(
            log,
            hist,
            {"normcheck/saturated_frac/1": 0.7, "normcheck/saturated_frac/3": 0.95},
            order,
            modules,
            step,
            window=5,
        )
        if step < 4:
            assert not log.findings
    by_layer = {f.layer: f for f in log.findings}
    assert by_layer["1"].severity == "warning" and "70%" in by_layer["1"].message
    # the Linear feeding it has std x sqrt(fan_in) = 6 where Xavier's is 1: named, with the std to use
    assert "Init is off for the activation that follows: 0: std" in by_layer["1"].message
    assert "Xavier: std 0.177" in by_layer["1"].message
    assert by_layer["3"].severity == "info"  # the last module: a confident output head


# ---------------------------------------------------------------------------------------------------------
# clipping and weights
# ---------------------------------------------------------------------------------------------------------
def _clip(log: FindingLog, n: float, rate: float, excess: float, recent: float) -> None:
    values = {
        "normcheck/clip/rate": rate,
        "normcheck/clip/mean_excess": excess,
        "_clip_window_steps": n,
        "_clip_recent": recent,
    }
    diagnose_clipping(log, ClipHistory(), values, int(n) - 1, 1.0, "norm", 0.5, 50)


def test_clip_rate_rules() -> None:
    log = FindingLog()
    _clip(log, 12, 1.0, 50.0, 1.0)  # too few steps
    _clip(log, 30, 0.9, 50.0, 0.2)  # not clipping any more
    assert not log.findings
    _clip(log, 30, 0.85, 1.6, 1.0)
    assert log.findings[0].severity == "info"  # updates shrunk by under half: a hint only
    _clip(log, 30, 1.0, 40.0, 1.0)
    (f,) = log.findings
    assert f.severity == "error" and "100%" in f.message and "40x" in f.message and has_remedy(f.message)


def _weights(log: FindingLog, hist: WeightHistory, step: int, growth: dict[str, float]) -> None:
    values = {}
    for n, g in growth.items():
        values[f"normcheck/weight_norm/{n}"] = 3.0 * g
        values[f"_weight_ref/{n}"] = 3.0
    diagnose_weights(log, hist, values, step)


def test_weight_growth_relative_to_the_median_layer() -> None:
    log, hist = FindingLog(), WeightHistory()
    for s in range(4):  # a CNN head growing 2.3x while the rest is flat: healthy
        _weights(log, hist, s, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 2.3})
    assert not log.findings
    _weights(log, hist, 4, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 8.0})
    assert not log.findings  # one sample is not a window
    _weights(log, hist, 5, {"conv1": 1.0, "conv2": 1.05, "conv3": 1.1, "head": 9.0})
    (f,) = log.findings
    assert (f.code, f.layer) == ("weight_norm_growth", "head") and f.value == pytest.approx(9.0 / 1.075)
    assert has_remedy(f.message)


def test_thresholds_are_configurable() -> None:
    log = FindingLog()
    values = {"normcheck/clip/rate": 0.9, "normcheck/clip/mean_excess": 5.0, "_clip_window_steps": 30.0}
    diagnose_clipping(log, ClipHistory(), values, 29, 1.0, "norm", 0.5, 50, th=Thresholds(clip_min_steps=40))
    assert not log.findings
    diagnose_clipping(log, ClipHistory(), values, 29, 1.0, "norm", 0.5, 50, th=Thresholds(clip_min_steps=10))
    assert log.findings[0].severity == "warning"


def test_explain_exception_attaches_to_the_first_nonfinite_finding() -> None:
    log = FindingLog()
    log.report("exploding_gradients", "warning", 2, None, "grew.")
    log.report("nonfinite_loss", "error", 5, None, "the loss became nan.")
    explain_exception(log, ValueError("loss is nan"), 6)
    f = log.get("nonfinite_loss")
    assert f is not None and "ValueError: loss is nan" in f.message and f.extra["exception"]
    empty = FindingLog()
    explain_exception(empty, RuntimeError("modified by an inplace operation. Hint: enable anomaly detection"), 0)
    assert not empty.findings  # not about a non-finite value: nothing to claim


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
    forward = {f"normcheck/act_rms/{n}": 1.0 for n in ["<input>", "l0", "l1", "l2", "l3", "l4", "head"]}
    log, hist = FindingLog(), GradientHistory()
    for s in range(2):
        diagnose_gradients(log, hist, [(s, 1.0)], grads, s, names, values=forward)
    (f,) = log.findings
    assert (f.code, f.layer) == ("vanishing_gradients", "l0")
    assert f.value == pytest.approx(((1e-9 + 1e-8) / 2) / ((1e-1 + 1.0) / 2))


def test_weight_growth_without_a_reference_uses_the_first_sample() -> None:
    log, hist = FindingLog(), WeightHistory()
    for s, head in enumerate([3.0, 12.0, 30.0, 36.0]):
        values = {"normcheck/weight_norm/a": 3.0, "normcheck/weight_norm/b": 3.1, "normcheck/weight_norm/c": 2.9}
        values["normcheck/weight_norm/head"] = head
        diagnose_weights(log, hist, values, s)
    (f,) = log.findings
    assert (f.code, f.layer, f.step) == ("weight_norm_growth", "head", 3)  # 10x and 12x the median: 2 in a row


def test_exploding_init_also_flags_huge_first_gradients_only_then() -> None:
    modules, order = _net(6, gain=3.0)
    values = _rms_values(order, modules, 2.5)
    values.update({"normcheck/grad_norm/0": 3e3, "normcheck/grad_norm/2": 4e3})  # total 5e3, by hand
    log = FindingLog()
    diagnose_activations(log, ActivationHistory(), values, order, modules, 0)
    f = log.get("exploding_gradients")
    assert f is not None and f.step == 0 and f.value == pytest.approx(5e3) and "net" not in (f.layer or "")
    assert "std 0.25" in f.message  # Kaiming for fan_in 32: sqrt(2/32)
    calm = _rms_values(order, modules, 1.0)
    calm.update({"normcheck/grad_norm/0": 3e3, "normcheck/grad_norm/2": 4e3})
    log2 = FindingLog()
    diagnose_activations(log2, ActivationHistory(), calm, order, modules, 0)
    assert not log2.findings  # a large first gradient alone is no finding
