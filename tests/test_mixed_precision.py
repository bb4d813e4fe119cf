"""fp16 autocast with a GradScaler on CPU: real Lightning runs.

``Trainer(precision="16-mixed")`` on CPU becomes bf16-mixed (no scaler); an explicit
``MixedPrecision("16-mixed", "cpu", scaler=GradScaler("cpu"))`` plugin runs a real fp16 autocast with a loss scaler,
and Lightning unscales the gradients before ``on_before_optimizer_step``.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, MemLogger, bad, fit, loader, mlp, regression_data
from lightning.pytorch.plugins import MixedPrecision
from torch.nn.utils import get_total_norm

from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks._emission import TOTAL_KEY
from lightning_normcheck.diagnosis.engine import Context, Flush
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.nonfinite import NonfiniteRules
from lightning_normcheck.diagnosis.records import GradientTotals, RunInfo, TrainingError
from lightning_normcheck.diagnosis.thresholds import Thresholds


class Recorder(L.Callback):
    """Independently of the package: the total norm of the gradients the optimizer is about to use (already
    unscaled by Lightning at this hook), the loss scale then, and each step's loss."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.scale: dict[int, float] = {}
        self.loss: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.total[trainer.global_step] = get_total_norm(grads).item()
        plugin = trainer.precision_plugin
        assert isinstance(plugin, MixedPrecision) and plugin.scaler is not None
        self.scale[trainer.global_step] = plugin.scaler.get_scale()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.loss[trainer.global_step - 1] = float(outputs["loss"])


def _fp16(scaler: torch.amp.GradScaler) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


def _run(model: L.LightningModule, scaler: torch.amp.GradScaler, steps: int = 40) -> tuple[Recorder, NormCheck, Any]:
    rec, cb, mem = Recorder(), NormCheck(print_summary=False), MemLogger()
    t = fit(
        model,
        loader(regression_data(), 16, shuffle=True),
        [rec, cb],
        max_steps=steps,
        logger=mem,
        plugins=[_fp16(scaler)],
    )
    assert isinstance(t.precision_plugin, MixedPrecision) and t.precision_plugin.scaler is scaler
    return rec, cb, mem


def _model() -> LitModel:
    torch.manual_seed(0)
    return LitModel(mlp(), lr=0.05)


@pytest.fixture(scope="module")
def healthy() -> tuple[Recorder, NormCheck, Any, torch.amp.GradScaler]:
    scaler = torch.amp.GradScaler("cpu")  # the defaults: init_scale 2**16, halved on each skipped step
    return (*_run(_model(), scaler), scaler)


def test_total_norm_is_that_of_the_unscaled_gradients(healthy: Any) -> None:
    rec, _, mem, _ = healthy
    logged = {step: row[TOTAL_KEY] for step, row in mem.rows if TOTAL_KEY in row}
    assert sorted(logged) == sorted(rec.total) == list(range(40))
    for step, value in logged.items():
        assert value == pytest.approx(rec.total[step], rel=1e-5, nan_ok=True)
    # the scale is large: the logged norms are not those of the scaled gradients (which would be ~2**13x larger)
    assert min(rec.scale.values()) >= 2.0**10 and max(v for v in logged.values() if math.isfinite(v)) < 100


def test_healthy_fp16_run_is_silent_and_learns(healthy: Any) -> None:
    rec, cb, _, scaler = healthy
    assert bad(cb.findings) == [], [str(f) for f in cb.findings]
    losses = [rec.loss[s] for s in range(40)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    # the default scale overflows on a few steps here before it settles: said once, as info (tested below)
    assert {f.code for f in cb.findings} <= {"nonfinite_gradients"}


def test_steps_the_scaler_skipped_are_info_with_the_scale() -> None:
    # 2**40 overflows fp16 on the first steps; backing off by 2**-8 per skipped step reaches a usable scale after a
    # few (measured: 4 steps skipped on this model), fewer than amp_nonfinite_steps (5) in a row
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-8)
    rec, cb, _ = _run(_model(), scaler)
    skipped = [s for s, v in sorted(rec.total.items()) if not math.isfinite(v)]
    assert skipped and skipped[0] == 0 and len(skipped) < 5
    (f,) = cb.findings
    assert (f.code, f.severity, f.layer, f.since) == ("nonfinite_gradients", "info", None, 0)
    assert f.extra["skipped"] == f.count == len(skipped)
    assert f.extra["scale"] == f.value == scaler.get_scale() < 2.0**40
    assert f"skipped {len(skipped)} optimizer steps" in f.message
    assert f"now {scaler.get_scale():.6g}" in f.message
    losses = [rec.loss[s] for s in range(40)]
    assert sum(losses[-5:]) < 0.5 * sum(losses[5:10])  # it went on and learned


class _NaNGradient(LitModel):
    """A finite loss whose backward is NaN on every step: sqrt at 0 has an infinite derivative, times 0."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        pred = self(x)
        pred = pred + 1e-3 * torch.sqrt((pred - pred.detach()) ** 2)
        return self.loss_fn(pred, y)


def test_persistent_nonfinite_gradients_under_the_scaler_are_an_error() -> None:
    torch.manual_seed(0)
    rec, cb, _ = _run(_NaNGradient(mlp(), lr=0.05), torch.amp.GradScaler("cpu"), steps=20)
    assert all(math.isnan(v) for v in rec.total.values()) and all(math.isfinite(v) for v in rec.loss.values())
    errors = [f for f in cb.findings if f.code == "nonfinite_gradients"]
    # halved from 2**16 on each skipped step: 1 after step 15's skip, the first logging step where it is at most 1
    assert rec.scale[15] == 2.0  # read before that step's skip
    assert [(f.severity, f.step, f.since) for f in errors] == [("error", 15, 0)]
    assert "on 16 steps in a row from step 0" in errors[0].message and "GradScaler" in errors[0].message
    assert "backed its loss scale off to 1," in errors[0].message


def test_a_long_calibration_of_the_scaler_is_not_an_error(tmp_path: Any) -> None:
    """A large loss (~800, labels in the thousands, de-normalized output) at the default scale 2**16: the scaler
    skips 8 steps in a row while it backs off, then trains. Not an error: the run ended with the scale above 1; the
    report re-derives the same from the logged scale (``normcheck/amp/scale``)."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_normcheck.report import build

    ds = regression_data()
    x, y = ds.tensors
    torch.manual_seed(0)
    model = LitModel(_Denormalized(), lr=1e-2, optimizer="adam")
    rec, cb = Recorder(), NormCheck(print_summary=False)
    scaler = torch.amp.GradScaler("cpu")
    fit(
        model,
        loader(torch.utils.data.TensorDataset(x, 1000.0 + 10.0 * y), 16, shuffle=True),
        [rec, cb],
        max_steps=40,
        log_every_n_steps=10,
        plugins=[_fp16(scaler)],
        logger=CSVLogger(tmp_path, name="amp"),
    )
    skipped = [s for s, v in sorted(rec.total.items()) if not math.isfinite(v)]
    run = next(i for i in range(40) if math.isfinite(rec.total[i]))  # the first run of skipped steps: 0 .. run-1
    assert run > 5 and skipped[:run] == list(range(run))  # longer than amp_nonfinite_steps (5)
    (f,) = [f for f in cb.findings if f.code == "nonfinite_gradients"]
    assert f.severity == "info" and f.extra["skipped"] == len(skipped)
    assert not bad(cb.findings), [f.message for f in bad(cb.findings)]
    assert statistics.mean(rec.loss[s] for s in range(35, 40)) < 0.5 * rec.loss[run]  # then it trained
    report = build(str(tmp_path), rederive_findings=True)
    assert report.rederived and "amp" in report.readback.families
    assert [(f.code, f.severity) for f in report.findings if f.code == "nonfinite_gradients"] == [
        ("nonfinite_gradients", "info")
    ]


# -- the rule alone, on hand-built records ----------------------------------------------------------------------------
def _rules() -> NonfiniteRules:
    return NonfiniteRules(Context(Thresholds(), RunInfo(amp_scaler=True)), FindingLog())


def _feed(rules: NonfiniteRules, pairs: list[tuple[int, float]], scale: float | None) -> None:
    steps, totals = tuple(s for s, _ in pairs), tuple(v for _, v in pairs)
    rules.observe(Flush(steps[-1], (GradientTotals(steps, totals, (0,) * len(steps), scale=scale),)))


def test_skipped_steps_are_counted_then_escalate_when_a_run_persists() -> None:
    inf = math.inf
    rules = _rules()
    _feed(rules, [(0, inf), (1, inf), (2, 1.0), (3, inf)], scale=2.0**14)
    (f,) = rules.log.findings
    assert (f.severity, f.step, f.since, f.extra["skipped"], f.value) == ("info", 3, 0, 2, 2.0**14)
    assert "skipped 2 optimizer steps (between steps 0 and 1)" in f.message and "now 16384" in f.message
    _feed(rules, [(4, 1.0), (5, 1.0)], scale=2.0**13)  # the open run (step 3) closed: revised, still one finding
    (f,) = rules.log.findings
    assert (f.severity, f.count, f.value) == ("info", 3, 2.0**13) and "between steps 0 and 3" in f.message
    state = rules.state_dict()
    resumed = _rules()
    resumed.load_state_dict(state)
    resumed.log.load_state_dict(rules.log.state_dict())
    _feed(resumed, [(s, math.nan) for s in range(6, 11)], scale=2.0**8)  # 5 in a row, the scale still high
    (f,) = resumed.log.findings
    assert f.severity == "info"  # the scaler may still be calibrating
    _feed(resumed, [(s, math.nan) for s in range(11, 14)], scale=0.5)  # still going with the scale below 1
    (f,) = resumed.log.findings
    assert (f.severity, f.step, f.since) == ("error", 11, 6) and "on 6 steps in a row from step 6" in f.message


def test_skipped_steps_do_not_explain_an_exception() -> None:
    rules = _rules()
    _feed(rules, [(0, math.inf), (1, 1.0)], scale=2.0**15)
    rules.explain(TrainingError(step=2, type_name="RuntimeError", text="CUDA out of memory"))
    (f,) = rules.log.findings
    assert f.severity == "info" and "Training then raised" not in f.message


class _Denormalized(torch.nn.Module):
    """A regression net that de-normalizes its output to the labels' scale (y ~ 1000 +- 30): the loss is on the
    residual's scale, not the squared label scale, so label_scale must stay silent."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * 10.0 + 1000.0


def test_the_loss_is_judged_unscaled_under_the_scaler() -> None:
    """Lightning hands on_before_backward the loss times the GradScaler's scale (2**16): the rules must see the
    loss the training step returned (before the fix, the scaled loss made this healthy run a label_scale warning)."""
    from lightning_normcheck.diagnosis.records import BatchSample, LossSeries

    ds = regression_data()
    x, y = ds.tensors
    torch.manual_seed(0)
    model = LitModel(_Denormalized(), lr=1e-2, optimizer="adam")
    rec, cb, mem = Recorder(), NormCheck(print_summary=False), MemLogger()
    seen: list[Any] = []
    observe = cb._observe
    cb._observe = lambda step, records: (seen.extend(records), observe(step, records))[1]  # type: ignore[method-assign]
    # init_scale 2**8: fewer skipped steps than at the default 2**16 (8 in a row while the scaler backs off, the
    # test below), so that most steps' losses are compared
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    fit(
        model,
        loader(torch.utils.data.TensorDataset(x, 1000.0 + 10.0 * y), 16, shuffle=True),
        [rec, cb],
        max_steps=40,
        logger=mem,
        log_every_n_steps=10,
        plugins=[_fp16(scaler)],
    )
    assert scaler.get_scale() >= 16.0  # the loss was scaled throughout (halved on each skipped step)
    assert not bad(cb.findings), [f.message for f in bad(cb.findings)]
    series = {s: v for r in seen if isinstance(r, LossSeries) for s, v in zip(r.steps, r.values)}
    assert sorted(series) == list(range(40))
    for step, value in series.items():
        assert value == pytest.approx(rec.loss[step], rel=1e-3), step
    batch = [r for r in seen if isinstance(r, BatchSample) and r.loss is not None]
    assert batch and all(r.loss == pytest.approx(rec.loss[r.step], rel=1e-3) for r in batch)
    assert any(r.target is not None and r.target.median_abs > 300 for r in batch)  # label_scale was judged
    assert statistics.mean(rec.loss[s] for s in range(35, 40)) < 0.5 * statistics.mean(rec.loss[s] for s in range(5))
