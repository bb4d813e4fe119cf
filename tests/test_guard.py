"""Guard and lint: ``NormCheck(stop_on=...)`` stops a doomed run; ``lightning_normcheck.testing`` checks a
training loop in a unit test (and its pytest fixture)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import LitModel, fit, loader, mlp, regression_data
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_normcheck import NormCheck
from lightning_normcheck.cli import run
from lightning_normcheck.testing import assert_healthy, check_training

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))


class ManualNoZeroGrad(LitModel):
    """The bug a user writes: manual optimization without ``opt.zero_grad()``."""

    def __init__(self, zero_grad: bool = False) -> None:
        super().__init__(mlp(8, 32, 2, 1), lr=0.05)
        self.automatic_optimization = False
        self.zero = zero_grad

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.zero:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


class OwnData(LitModel):
    def __init__(self) -> None:
        super().__init__(mlp(8, 32, 2, 1), lr=0.05)

    def train_dataloader(self) -> Any:
        return loader(regression_data(256), 16)


class DataModule(L.LightningDataModule):
    def train_dataloader(self) -> Any:
        return loader(regression_data(256), 16)


# ----------------------------------------------------------------------------------------------------
# stop_on


def test_stop_on_error_stops_a_doomed_run_within_a_few_steps_of_its_finding(tmp_path: Path) -> None:
    cb = NormCheck(stop_on="error", print_summary=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    t = fit(ManualNoZeroGrad(), loader(regression_data(512), 16), [cb, ckpt], max_steps=30, enable_checkpointing=True)
    f = next(f for f in cb.findings if f.code == "missing_zero_grad")
    assert f.severity == "error" and cb.stopped_by is not None and cb.stopped_by.severity == "error"
    assert f.step <= t.global_step <= f.step + 3 < 30  # stopped at the end of a step soon after, fit returned
    assert (tmp_path / "last.ckpt").exists()  # the checkpoint callbacks behave as usual


def test_stop_on_warning_never_stops_a_healthy_run_and_stop_on_none_never_stops() -> None:
    rec = LossRecorder()
    cb = NormCheck(stop_on="warning", print_summary=False)
    t = fit(LitModel(mlp(8, 32, 2, 1), lr=0.05), loader(regression_data(512), 16), [cb, rec], max_steps=40)
    assert t.global_step == 40 and cb.stopped_by is None
    assert sum(rec.losses[-5:]) < 0.5 * sum(rec.losses[:5])  # it learns
    plain = NormCheck(print_summary=False)
    t = fit(ManualNoZeroGrad(), loader(regression_data(512), 16), [plain], max_steps=25)
    assert t.global_step == 25 and any(f.code == "missing_zero_grad" for f in plain.findings)


def test_stop_on_from_yaml_and_bad_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        ValueError, match=r"NormCheck: `stop_on` must be one of \(None, 'warning', 'error'\), got 'fatal'"
    ):
        NormCheck(stop_on="fatal")  # type: ignore[arg-type]
    assert NormCheck(stop_on="error").state_key == NormCheck().state_key  # not a reason to lose state on resume
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "stop.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_normcheck.NormCheck\n"
        "      init_args: {stop_on: error, print_summary: false}\n"
    )
    # a planted problem: far too large an init std makes the loss non-finite within the first steps
    cli = run(
        ["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(config), "--trainer.max_steps=60"]
        + ["--data.num_samples=512", "--trainer.limit_val_batches=0", "--trainer.logger=false", "--model.lr=50.0"]
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, NormCheck))
    assert cb.stop_on == "error" and cb.stopped_by is not None
    assert cli.trainer.global_step < 60


def test_stop_on_agrees_across_two_ddp_processes(tmp_path: Path) -> None:
    """Only rank 1 forgets zero_grad: rank 1 finds missing_zero_grad, rank 0 does not, and both stop at the same
    step (one collective at the logging step, as EarlyStopping does), well before max_steps."""
    script = Path(__file__).resolve().parent / "scripts" / "ddp_stop.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert "missing_zero_grad" in r1["codes"] and "missing_zero_grad" not in r0["codes"]
    assert r0["global_step"] == r1["global_step"] < 20
    assert r1["stopped_by"] == "missing_zero_grad"


# ----------------------------------------------------------------------------------------------------
# check_training / assert_healthy


def test_assert_healthy_catches_a_missing_zero_grad_and_leaves_the_model_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    model = ManualNoZeroGrad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AssertionError, match="missing_zero_grad") as info:
        assert_healthy(model, loader(regression_data(512), 16))
    assert "What to try" in str(info.value) and "severity" in str(info.value)  # the table, then the details
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # a copy was trained
    assert list(tmp_path.iterdir()) == []  # nothing written to the working directory


@pytest.mark.parametrize("source", ["dataloader", "datamodule", "module"])
def test_check_training_takes_every_data_source(source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    data = {"dataloader": loader(regression_data(256), 16), "datamodule": DataModule(), "module": None}[source]
    start = time.perf_counter()
    findings = assert_healthy(OwnData(), data, steps=20)
    assert time.perf_counter() - start < 30  # a few seconds (measured in the README), with a wide margin
    assert all(f.severity == "info" for f in findings)
    assert list(tmp_path.iterdir()) == []


def test_a_healthy_loop_checked_by_check_training_learns() -> None:
    rec = LossRecorder()
    model = ManualNoZeroGrad(zero_grad=True)
    findings = check_training(model, loader(regression_data(512), 16), steps=30, callbacks=[rec])
    assert [f for f in findings if f.severity != "info"] == []
    assert sum(rec.losses[-5:]) < 0.5 * sum(rec.losses[:5])
    with pytest.raises(ValueError, match="`steps` must be an int >= 1, got 0"):
        check_training(model, None, steps=0)


def test_pytest_fixture(normcheck: Any) -> None:
    with pytest.raises(AssertionError, match="missing_zero_grad"):
        normcheck.assert_healthy(ManualNoZeroGrad(), loader(regression_data(256), 16), steps=10)
    normcheck.assert_healthy(ManualNoZeroGrad(zero_grad=True), loader(regression_data(256), 16), steps=10)
