"""The scenario suite: real tiny Lightning runs with a planted pathology (found, with the right code, layer,
numbers and remedy, within the first 20 steps at log_every_n_steps=50) and healthy look-alikes (silent).

The whole catalog with recall and false alarms: ``python benchmarks/scenario_report.py``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from helpers import LitModel, bad, mlp
from scenarios import ALL, HEALTHY, PATHOLOGY_CODES, PLANTED, Result, judge, reg, run_scenario

from lightning_normcheck.findings import CODES, SEVERITIES

_cache: dict[str, Result] = {}


def result(name: str) -> Result:
    if name not in _cache:
        _cache[name] = run_scenario(next(s for s in ALL if s.name == name))
    return _cache[name]


def _param(sc: Any) -> Any:
    return pytest.param(sc.name, marks=() if sc.fast else pytest.mark.slow, id=sc.name)


def assert_contract(findings: list[Any]) -> None:
    keys = [(f.code, f.layer) for f in findings]
    assert len(keys) == len(set(keys)), "one finding per (code, layer)"
    for f in findings:
        assert f.code in CODES and f.severity in SEVERITIES
        assert isinstance(f.step, int) and f.step >= 0
        assert f.layer is None or isinstance(f.layer, str)
        assert isinstance(f.message, str) and f.message


def assert_explains(f: Any) -> None:
    low = f.message.lower()
    assert any(ch.isdigit() for ch in f.message), "the message states the numbers seen"
    assert "likely cause" in low and "what to try" in low, f.message
    if f.layer is not None:
        assert f.layer in f.message, f"the message names the layer {f.layer}"


@pytest.mark.parametrize("name", [_param(s) for s in PLANTED])
def test_planted_pathology_is_found(name: str) -> None:
    res = result(name)
    sc = res.scenario
    missed, wrong = judge(res)
    assert not missed, f"{name}: missed {missed}; got {[str(f) for f in res.findings]}"
    assert not wrong, f"{name}: the wrong story {[str(f) for f in wrong]}"
    assert_contract(res.findings)
    assert (res.exception is not None) == sc.raises, res.exception
    for code in sc.expect:
        hits = [f for f in res.findings if f.code == code and f.severity != "info"]
        if sc.layer is not None and code == sc.expect[0]:
            assert sc.layer in {f.layer for f in hits}, [str(f) for f in hits]
        for f in hits:
            assert f.step < 20, "a problem present from the start is found within the first 20 steps"
            if code in PATHOLOGY_CODES:
                assert_explains(f)
            else:  # data and bug checks word their advice their own way: numbers and a fix
                assert any(ch.isdigit() for ch in f.message) and len(f.message) > 80, f.message
    # one finding per (code, layer), never a storm: at most one non-finite finding per run
    assert len([f for f in res.findings if f.code in ("nonfinite_loss", "nonfinite_gradients")]) <= 1


@pytest.mark.parametrize("name", [_param(s) for s in HEALTHY])
def test_healthy_run_is_silent(name: str) -> None:
    res = result(name)
    assert res.exception is None, res.exception
    _, false = judge(res)
    assert not false, f"{name}: false alarms {[str(f) for f in false]}"
    assert bad(res.findings) == [], "no warning or error of any code (bug and data checks included)"
    assert_contract(res.findings)
    assert res.learned() < res.scenario.learns, f"{name} must learn: last/first loss {res.learned():.3f}"


def test_suite_size() -> None:
    assert len(PLANTED) >= 15 and len(HEALTHY) >= 12
    planted = {c for s in PLANTED for c in s.expect}
    assert planted >= set(PATHOLOGY_CODES), "every pathology code has a planted run"
    assert planted >= {"input_scale", "label_scale", "gradient_spikes", "missing_zero_grad", "loss_sum_reduction"}


@pytest.mark.parametrize("name", ["exploding_act_relu_init", "vanishing_act_relu_init", "vanishing_act_selu_init"])
def test_init_pathology_reported_at_step0_with_init_advice(name: str) -> None:
    res = result(name)
    code = res.scenario.expect[0]
    (f,) = [f for f in res.findings if f.code == code]
    assert f.step == 0 and f.extra.get("at_init")
    import lightning as L

    L.seed_everything(0, verbose=False)  # as run_scenario(seed=0) did before building
    model, _, _ = res.scenario.build()  # the same construction: compute the advice by hand
    first = model.net[0].weight
    assert f"net.0: std {float(first.detach().std()):.3g} x sqrt(fan_in=" in f.message
    act = "SELU" if "selu" in name else "ReLU"
    right = 1 / math.sqrt(first.shape[1]) if act == "SELU" else math.sqrt(2 / first.shape[1])
    assert f"{act} needs" in f.message and f"std {right:.3g}" in f.message


class _Recorder(LitModel):
    """Records each step's loss on the host (test-side, independent of the package)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.losses.append(float(loss.detach()))
        return loss


def test_divergence_reports_only_the_first_nonfinite_value() -> None:
    import lightning as L

    from lightning_normcheck import NormCheck

    L.seed_everything(0, verbose=False)
    model = _Recorder(mlp(width=32, depth=3), lr=50.0)
    cb = NormCheck(print_summary=False)
    L.Trainer(
        callbacks=[cb],
        max_steps=20,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=50,
        accelerator="cpu",
    ).fit(model, reg())
    first_bad = next(i for i, v in enumerate(model.losses) if not math.isfinite(v))
    nonfinite = [f for f in cb.findings if f.code.startswith("nonfinite")]
    assert len(nonfinite) == 1
    (f,) = nonfinite
    if f.code == "nonfinite_loss":
        assert f.step == first_bad and f"{model.losses[first_bad]}" in f.message
    else:  # the gradient went non-finite first, with a finite loss at that step
        assert f.step < first_bad and math.isfinite(model.losses[f.step])
    assert f.severity == "error" and sum(1 for v in model.losses if not math.isfinite(v)) > 3


def test_exception_after_nan_is_explained() -> None:
    res = result("nonfinite_raises")
    assert isinstance(res.exception, ValueError)
    (f,) = [f for f in res.findings if f.code == "nonfinite_loss"]
    assert "ValueError" in f.message and f.step == 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", [s.name for s in HEALTHY])
def test_healthy_run_is_silent_other_seeds(name: str, seed: int) -> None:
    res = run_scenario(next(s for s in HEALTHY if s.name == name), seed=seed)
    assert res.exception is None, res.exception
    _, false = judge(res)
    assert not false, f"{name} seed {seed}: false alarms {[str(f) for f in false]}"
    assert bad(res.findings) == []
    assert res.learned() < res.scenario.learns, f"{name} seed {seed} must learn: {res.learned():.3f}"


def test_saturation_from_init_names_the_feeding_layer_and_the_std_to_use() -> None:
    """Tanh saturated by a too-large init: the message names the Linear before it, its std x sqrt(fan_in) and
    Xavier's std; saturation from a large bias (weights fine) gets no init advice."""
    sat = [f for f in bad(result("saturated_tanh_init").findings) if f.code == "saturated_activations"]
    assert sat
    for f in sat:
        feeding = f"net.{int(f.layer.rsplit('.', 1)[1]) - 1}"  # init_mlp: Linear, Tanh, Linear, Tanh, ...
        assert f"Init is off for the activation that follows: {feeding}: std" in f.message, f.message
        assert "x sqrt(fan_in=" in f.message and "xavier_normal_" in f.message
    bias = [f for f in bad(result("saturated_sigmoid_bias").findings) if f.code == "saturated_activations"]
    assert bias and all("Init is off" not in f.message for f in bias)
