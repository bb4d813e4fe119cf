"""Findings read back from each logger's own place: CSV/TensorBoard log dirs, an MLflow file store, a W&B offline run.

Each test is a real tiny fit with a planted problem (ReLU layers whose biases kill most units, so one code,
``dead_units``, fires on several layers), then reads what the logger wrote to disk.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, MemLogger, fit, loader, mlp, regression_data
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from lightning_normcheck import ActivationNormMonitor, NormCheck
from lightning_normcheck.callbacks import _emission
from lightning_normcheck.diagnosis.findings import FindingLog
from lightning_normcheck.diagnosis.registry import REGISTRY

FIELDS = ("code", "severity", "step", "layer")


def planted() -> LitModel:
    """Four ReLU layers with 70% of their units given a -50 bias: ``dead_units`` on every one of them."""
    net = mlp(depth=4)
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Linear) and m.out_features == 32:
                m.bias[:22] = -50.0
    return LitModel(net)


def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [tuple(r[k] for k in FIELDS) for r in rows]


def read_dir(log_dir: str | Path) -> tuple[str, list[dict[str, Any]]]:
    d = Path(log_dir)
    return (d / "findings.md").read_text(), json.loads((d / "findings.json").read_text())


def check_report(md: str, cb: NormCheck) -> None:
    """The table (one row per code, layers grouped, worst first), then every message in full, once."""
    assert md == cb.summary() + "\n"
    table, details = md.split("\nDetails:\n")
    codes = _emission.worst_first(cb.findings)
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "first step" not in ln]
    assert [r.split("|")[2].strip() for r in rows] == list(dict.fromkeys(f.code for f in codes))
    for f in cb.findings:
        assert md.count(f.message) == 1, f.code
        assert REGISTRY[f.code].fix in table
    dead = sorted(f.layer for f in cb.findings if f.code == "dead_units")
    assert len(dead) >= 3
    assert f"{dead[0]}, {dead[1]} (+{len(dead) - 2} more)" in table


def test_summary_table_is_worst_first_grouped_uncut_with_info_rows() -> None:
    log = FindingLog()
    for i, layer in enumerate(["net.10", "net.2", "net.4", "net.6", "net.8"]):
        log.report("dead_units", "warning", 5 + i, layer, f"dead {layer}")
    log.report("dead_units", "error", 9, "net.0", "dead net.0")
    log.report("input_scale", "info", 0, None, "raw feature " + "x" * 300)
    log.report("missing_zero_grad", "error", 2, None, "not cleared")
    text = _emission.findings_report(log.findings)
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in text.splitlines() if ln.startswith("| ")][1:]
    assert rows == [
        ["error", "missing_zero_grad", "-", "2", REGISTRY["missing_zero_grad"].fix],
        ["error", "dead_units", "net.0, net.2 (+4 more)", "5", REGISTRY["dead_units"].fix],
        ["info", "input_scale", "-", "0", REGISTRY["input_scale"].fix],
    ]
    details = text.split("Details:\n")[1].splitlines()
    assert [d.split(":")[0] for d in details][:3] == [
        "- error missing_zero_grad at step 2",
        "- error dead_units [net.0] at step 9",
        "- warning dead_units [net.10] at step 5",
    ]
    assert all(text.count(f.message) == 1 for f in log.findings)  # each in full (300 characters), once


def test_csv_log_dir_gets_the_table_and_the_findings_updated_during_fit(tmp_path: Path) -> None:
    seen: list[int] = []

    class Probe(L.Callback):  # reads the file while training goes on
        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            path = Path(trainer.logger.log_dir) / "findings.json"  # type: ignore[union-attr]
            seen.append(len(json.loads(path.read_text())) if path.exists() else 0)

    cb = NormCheck(print_summary=False)
    logger = CSVLogger(tmp_path, name="csv")
    fit(planted(), loader(regression_data()), [cb, Probe()], max_steps=12, logger=logger)

    md, rows = read_dir(logger.log_dir)
    assert cb.findings and key(rows) == key([asdict(f) for f in cb.findings])
    assert set(rows[0]) == set(asdict(cb.findings[0]))  # every field of a Finding
    check_report(md, cb)
    assert any(seen)  # written at the logging step where findings appeared, before the end of fit


def test_tensorboard_gets_text_and_the_summary_table(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = NormCheck(print_summary=False)
    logger = TensorBoardLogger(tmp_path, name="tb")
    fit(planted(), loader(regression_data()), [cb], max_steps=12, logger=logger)
    logger.experiment.flush()

    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    tags = ea.Tags()["tensors"]
    assert {"normcheck/findings/text_summary", "normcheck/summary/text_summary"} <= set(tags)

    def texts(tag: str) -> list[str]:
        return [e.tensor_proto.string_val[0].decode() for e in ea.Tensors(tag)]

    posted = "\n".join(texts("normcheck/findings/text_summary"))
    for f in cb.findings:
        assert posted.count(f.message) == 1, f.code  # each message once, when it appeared or changed
    assert texts("normcheck/summary/text_summary")[-1] == _emission.findings_table(cb.findings)
    check_report(read_dir(logger.log_dir)[0], cb)  # a log_dir: the files too


def test_a_crashed_run_keeps_its_findings_files(tmp_path: Path) -> None:
    class Crashes(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if self.trainer.global_step == 8:
                raise RuntimeError("data loader died")
            return super().training_step(batch, batch_idx)

    model = Crashes(planted().net)
    cb = NormCheck(print_summary=False)
    logger = CSVLogger(tmp_path, name="csv")
    with pytest.raises(RuntimeError, match="data loader died"):
        fit(model, loader(regression_data()), [cb], max_steps=20, logger=logger)
    md, rows = read_dir(logger.log_dir)
    assert cb.findings and key(rows) == key([asdict(f) for f in cb.findings])
    check_report(md, cb)


def test_healthy_run_says_no_findings_and_summary_prints_the_story(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    cb = NormCheck()
    logger = CSVLogger(tmp_path, name="csv")
    fit(LitModel(mlp()), loader(regression_data()), [cb], max_steps=8, logger=logger)
    md, rows = read_dir(logger.log_dir)
    assert rows == [asdict(f) for f in cb.findings] == []
    assert md == "normcheck: no findings.\n" and "normcheck: no findings." in capsys.readouterr().out


def test_two_callbacks_write_one_set_of_files(tmp_path: Path) -> None:
    a, b = NormCheck(print_summary=False), ActivationNormMonitor(print_summary=False)
    logger = CSVLogger(tmp_path, name="csv")
    fit(planted(), loader(regression_data()), [a, b], max_steps=8, logger=logger)
    _, rows = read_dir(logger.log_dir)
    merged = _emission.merge_findings([a.findings, b.findings])
    assert {(f.code, f.layer) for f in b.findings} <= {(r["code"], r["layer"]) for r in rows}
    assert key(rows) == key([asdict(f) for f in merged])


def test_a_failing_logger_is_warned_about_once_and_skipped(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("")

    class Unwritable(MemLogger):
        calls = 0

        @property
        def log_dir(self) -> str:  # under a file: makedirs fails
            Unwritable.calls += 1
            return str(tmp_path / "a_file" / "logs")

    # no pictures: only the findings read log_dir here (the images' failures: test_profiles.py)
    cb = NormCheck(print_summary=False, depth_profiles=False)
    bad, csv_logger = Unwritable(), CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(planted(), loader(regression_data()), [cb], max_steps=12, logger=[bad, csv_logger])
    ours = [w for w in caught if "could not write the findings to Unwritable" in str(w.message)]
    assert len(ours) == 1 and Unwritable.calls == 1  # skipped after the failure (several publications followed)
    assert bad.rows  # its metrics still went to it
    assert key(read_dir(csv_logger.log_dir)[1]) == key([asdict(f) for f in cb.findings])


def test_mlflow_gets_artifacts_and_tags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from lightning.pytorch.loggers import MLFlowLogger

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store unless asked

    cb = NormCheck(print_summary=False)
    logger = MLFlowLogger(experiment_name="normcheck", tracking_uri="file:" + str(tmp_path / "mlruns"))
    fit(planted(), loader(regression_data()), [cb], max_steps=12, logger=logger)

    run_dir = tmp_path / "mlruns" / str(logger.experiment_id) / str(logger.run_id)
    md, rows = read_dir(run_dir / "artifacts" / "normcheck")
    assert key(rows) == key([asdict(f) for f in cb.findings])
    check_report(md.rstrip("\n") + "\n", cb)
    for f in cb.findings:
        worst = max((g.severity for g in cb.findings if g.code == f.code), key=("info", "warning", "error").index)
        assert (run_dir / "tags" / f"normcheck.{f.code}").read_text() == worst


def test_wandb_gets_a_table_of_the_findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read back from the offline run's files on disk: the findings table W&B wrote (its summary lives only in
    wandb's binary run log, whose reader is inside wandb's own service: a hand-written reader of it failed
    once in ten runs on a loaded machine, so the test reads the table file)."""
    wandb = pytest.importorskip("wandb")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    cb = NormCheck(print_summary=False)
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="normcheck")
    try:
        fit(planted(), loader(regression_data()), [cb], max_steps=12, logger=logger)
        files, run_file = logger.experiment.dir, glob.glob(os.path.join(logger.experiment.dir, "..", "run-*.wandb"))
    finally:
        wandb.finish()

    assert run_file, "the offline run log exists"
    tables = sorted(
        Path(files).glob("media/table/normcheck/findings_*.table.json"), key=lambda p: int(p.name.split("_")[1])
    )
    assert tables, sorted(str(p.relative_to(files)) for p in Path(files).rglob("*"))
    table = json.loads(tables[-1].read_text())  # the latest step's (findings_<step>_<hash>.table.json)
    assert table["columns"] == list(_emission.TABLE_COLUMNS)
    got = [dict(zip(table["columns"], row)) for row in table["data"]]
    want = _emission.worst_first(cb.findings)
    assert [(r["code"], r["severity"], r["step"], r["layer"] or None) for r in got] == [
        (f.code, f.severity, f.step, f.layer) for f in want
    ]
    assert [r["message"] for r in got] == [f.message for f in want]


def test_tensorboard_custom_scalars_layout(tmp_path: Path) -> None:
    """The Custom Scalars tab: one multi-line chart per kind with every layer, whose tag patterns match the
    tags the run logged."""
    import re

    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    fit(planted(), loader(regression_data()), [NormCheck(print_summary=False)], max_steps=6, logger=logger)
    ea = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    ea.Reload()
    (event,) = ea.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    scalars = ea.Tags()["scalars"]
    for title in ("gradient norm, every layer", "activation RMS, every module", "weight norm, every layer"):
        matched = [t for t in scalars if any(re.match(p, t) for p in charts[title])]
        assert len(matched) >= 2, (title, matched)
    total = charts["total gradient norm (pre-clip) and clip rate"]
    assert [t for t in scalars if any(re.match(p, t) for p in total)] == ["normcheck/grad_norm/total"]
