"""``lightning-normcheck report``: real runs logged to TensorBoard and CSV, their findings files deleted, and the
report's re-derived findings compared with the callback's own; its printed table and worst layers, PNGs, HTML page
and console script."""

from __future__ import annotations

import csv
import html
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from helpers import trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from scenarios import LossRecorder, _lit, data_fault, init_mlp, reg
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck import profiles as P
from lightning_normcheck.diagnosis.registry import REGISTRY
from lightning_normcheck.report import REDERIVED, build, main

PNG = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parent.parent


def _fit(
    save_dir: Path,
    logger_cls: type,
    model: L.LightningModule,
    data: Any,
    normcheck: dict[str, Any] | None = None,
    **kw: Any,
) -> tuple[Any, Any, Any]:
    L.seed_everything(0, verbose=False)
    cb, rec = NormCheck(print_summary=False, **(normcheck or {})), LossRecorder()
    logger = logger_cls(str(save_dir))
    trainer([cb, rec], max_steps=40, logger=logger, log_every_n_steps=5, **kw).fit(model, data)
    return cb, rec, logger.log_dir


def _drop_findings_files(log_dir: str) -> None:
    for name in ("findings.json", "findings.md"):
        os.remove(os.path.join(log_dir, name))


def _key(findings: list[Any], codes: set[str]) -> list[tuple[str, str | None, str, int]]:
    return sorted((f.code, f.layer, f.severity, f.step) for f in findings if f.code in codes)


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """ReLU MLP with std 3/sqrt(fan_in) (activations explode with depth, huge first gradients) clipped at 1.0 (every
    step clipped), logged to TensorBoard; an older run directory beside it."""
    root = tmp_path_factory.mktemp("tb")
    old = root / "lightning_logs" / "version_old"
    old.mkdir(parents=True)
    (old / "findings.json").write_text("[]\n")
    os.utime(old / "findings.json", (1e9, 1e9))
    model = _lit(init_mlp(8, gain=3.0), lr=1e-2)
    cb, rec, log_dir = _fit(root, TensorBoardLogger, model, data_fault("corrupted"), gradient_clip_val=1.0)
    _drop_findings_files(log_dir)
    return {"root": root, "cb": cb, "log_dir": log_dir, "rec": rec}


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """12 sigmoid layers at SGD lr 0.1 (gradients vanish with depth, sigmoid units saturate, late layers' weights
    grow) on data with one corrupted label (a gradient spike), logged to CSV; no reference copy of the weights."""
    root = tmp_path_factory.mktemp("csv")
    model = _lit(init_mlp(12, act=nn.Sigmoid), lr=0.1)
    cb, rec, log_dir = _fit(root, CSVLogger, model, data_fault("corrupted"), {"track_drift": False})
    kept = root / "with_files"
    shutil.copytree(log_dir, kept)
    _drop_findings_files(log_dir)
    return {"root": root, "cb": cb, "log_dir": log_dir, "kept": str(kept)}


def _rederivable(report: Any) -> set[str]:
    return set(REDERIVED) - set(report.not_rederived)


def test_tensorboard_run_rederives_the_callback_findings(tb_run: dict[str, Any]) -> None:
    report = build(str(tb_run["root"]))  # a directory above the runs: the newest run is taken
    assert report.run_dir == tb_run["log_dir"] and report.source == "tensorboard" and report.rederived
    live = tb_run["cb"].findings
    assert {"exploding_activations", "exploding_gradients", "high_clip_rate"} <= {
        f.code for f in live if f.severity in ("warning", "error")
    }
    codes = _rederivable(report)
    assert {"exploding_activations", "exploding_gradients", "high_clip_rate", "gradient_spikes"} <= codes
    assert _key(report.findings, codes) == _key(live, codes)
    assert "weight_norm_growth" in report.not_rederived  # NormCheck keeps a reference copy: start norms not logged


def test_tensorboard_text_stands_in_for_the_description_file(tb_run: dict[str, Any], tmp_path: Path) -> None:
    """A TensorBoard-only log directory (no normcheck_run.json) has the description as text ``normcheck/run``."""
    copy = tmp_path / "tb_only"
    shutil.copytree(tb_run["log_dir"], copy, ignore=shutil.ignore_patterns("normcheck_report", "*.json"))
    report = build(str(copy))
    codes = _rederivable(report)
    assert {"exploding_activations", "high_clip_rate"} <= codes and report.description
    assert _key(report.findings, codes) == _key(tb_run["cb"].findings, codes)


def test_csv_run_rederives_the_callback_findings(csv_run: dict[str, Any]) -> None:
    report = build(csv_run["log_dir"])
    assert report.source == "csv" and report.rederived
    live = csv_run["cb"].findings
    assert {
        "vanishing_gradients",
        "gradient_spikes",
        "saturated_activations",
        "exploding_activations",
        "weight_norm_growth",
    } <= {f.code for f in live if f.severity in ("warning", "error")}
    codes = _rederivable(report)
    assert "weight_norm_growth" in codes  # no reference copy: the live rule took the first samples too
    assert _key(report.findings, codes) == _key(live, codes)
    # the spike finding's details come from the same rule: its steps and factors too
    ours, theirs = (next(f for f in fs if f.code == "gradient_spikes") for fs in (report.findings, live))
    assert (ours.since, ours.extra["steps"], ours.extra["factors"]) == (
        theirs.since,
        theirs.extra["steps"],
        theirs.extra["factors"],
    )


def test_findings_files_are_read_as_written(csv_run: dict[str, Any]) -> None:
    report = build(csv_run["kept"])
    assert not report.rederived and report.not_rederived == {}
    live = csv_run["cb"].findings
    assert [(f.code, f.layer, f.severity, f.step, f.message) for f in report.findings] == [
        (f.code, f.layer, f.severity, f.step, f.message) for f in live
    ]


def test_healthy_run_rederives_no_warning(tmp_path: Path) -> None:
    model = _lit(init_mlp(3, scheme="kaiming"), lr=1e-2, optimizer="adam")
    cb, rec, log_dir = _fit(tmp_path, TensorBoardLogger, model, reg())
    first, last = statistics.mean(rec.losses[:5]), statistics.mean(rec.losses[-5:])
    assert last < 0.2 * first  # it learns
    _drop_findings_files(log_dir)
    report = build(log_dir)
    assert report.rederived and report.readback.flushes
    assert not [f for f in report.findings if f.severity != "info"]
    assert not [f for f in cb.findings if f.severity != "info"]


def _csv_latest(path: str, family: str) -> dict[str, float]:
    """The latest logged value of each layer of a family, read with the csv module (independent of the package)."""
    latest: dict[str, tuple[int, float]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            for key, value in row.items():
                if key.startswith(f"normcheck/{family}/") and value != "" and key != "normcheck/grad_norm/total":
                    step = int(row["step"])
                    if step >= latest.get(key, (-1, 0.0))[0]:
                        latest[key] = (step, float(value))
    return {k.split("/", 2)[2]: v for k, (_, v) in latest.items()}


def test_printed_table_and_worst_layers(csv_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = Path(csv_run["root"]) / "out_text"
    assert main(["report", csv_run["log_dir"], "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert "re-derived from the logged scalars" in out
    assert "| severity | code" in out and "Details:" in out
    for f in csv_run["cb"].findings:
        if f.code in ("vanishing_gradients", "gradient_spikes"):
            assert f"| {f.code}" in out
    assert "dead_units (the fraction of units dead over the whole window is not logged" in out
    # worst layers: the latest activation RMS of each module over the median, computed here from the file
    latest = _csv_latest(os.path.join(csv_run["log_dir"], "metrics.csv"), "act_rms")
    med = statistics.median(latest.values())
    top = max(latest, key=lambda n: latest[n])
    low = min(latest, key=lambda n: latest[n])
    line = next(x for x in out.splitlines() if x.startswith("- activation RMS"))
    assert f"largest {top} {latest[top]:.3g} ({latest[top] / med:.3g}x)" in line
    assert f"smallest {low} {latest[low]:.3g} ({latest[low] / med:.3g}x)" in line


def test_pictures_and_self_contained_html(tb_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = Path(tb_run["root"]) / "out_html"
    assert main(["report", tb_run["log_dir"], "--out", str(out_dir)]) == 0
    capsys.readouterr()
    pngs = sorted(p.name for p in out_dir.glob("*.png"))
    assert pngs == sorted(f"{k}.png" for k in P.KINDS)  # NormCheck logs every kind
    for name in pngs:
        assert (out_dir / name).read_bytes()[:8] == PNG
    page = (out_dir / "report.html").read_text()
    srcs = re.findall(r"""src=['"]([^'"]*)""", page)
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "href=" not in page and "<link" not in page and "<script" not in page
    for f in tb_run["cb"].findings:
        assert f.code in page and html.escape(f.message, quote=True) in page
        for fix in REGISTRY[f.code].fixes:
            assert html.escape(fix, quote=True) in page


def test_default_out_dir_and_no_matplotlib(
    csv_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(P, "available", lambda: False)
    assert main(["report", csv_run["log_dir"]]) == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out
    out_dir = Path(csv_run["log_dir"]) / "normcheck_report"
    assert not list(out_dir.glob("*.png"))
    page = (out_dir / "report.html").read_text()
    assert "data:image/png" not in page and "matplotlib is not installed" in page


def test_without_run_description_says_what_is_not_rederived(csv_run: dict[str, Any], tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(csv_run["log_dir"], bare, ignore=shutil.ignore_patterns("normcheck_report"))
    os.remove(bare / "normcheck_run.json")
    report = build(str(bare))
    missing = report.not_rederived
    for code in ("exploding_activations", "saturated_activations", "vanishing_gradients"):
        assert "run description" in missing[code]
    assert not {f.code for f in report.findings} & {"exploding_activations", "saturated_activations"}
    assert any("normcheck_run.json" in n for n in report.readback.notes)
    codes = {"gradient_spikes"}  # the totals alone still make it
    assert _key(report.findings, codes) == _key(csv_run["cb"].findings, codes)


class Swapped(nn.Module):
    """Registers the second layer first: registration order is not forward order."""

    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(16, 1)
        self.act = nn.Tanh()
        self.a = nn.Linear(8, 16)

    def forward(self, x: Any) -> Any:
        return self.b(self.act(self.a(x)))


def test_run_description_file_and_tensorboard_text(tmp_path: Path) -> None:
    model = _lit(Swapped(), lr=1e-2)
    _, _, log_dir = _fit(tmp_path, TensorBoardLogger, model, reg(), gradient_clip_val=0.5)
    described = json.loads(Path(log_dir, "normcheck_run.json").read_text())
    assert [(m["name"], m["type"], m["kind"]) for m in described["modules"]] == [
        ("net.a", "Linear", "weight"),
        ("net.act", "Tanh", "bounded"),
        ("net.b", "Linear", "weight"),
    ]
    assert described["module_order"] == "forward"
    assert described["run"]["layers"] == ["net.b", "net.a"]  # registration order
    assert described["clip"] == {"threshold": 0.5, "algorithm": "norm", "window": 50}
    assert described["log_every_n_steps"] == 5 and described["run"]["optimizers"] == ["SGD"]
    assert {s["name"]: (s["fan_in"], s["fan_out"]) for s in described["init"]} == {
        "net.a": (8, 16),
        "net.b": (16, 1),
    }
    from lightning_normcheck.report import read_tensorboard

    _, from_tb = read_tensorboard(log_dir)
    assert from_tb == described


def test_console_script(tb_run: dict[str, Any], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "lightning_normcheck.report", "report", str(tb_run["root"]), "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "| severity | code" in done.stdout and "Worst layers" in done.stdout
    assert (tmp_path / "report.html").exists()
    script = shutil.which("lightning-normcheck", path=os.path.dirname(sys.executable))
    if script is not None:  # installed with this entry point
        done = subprocess.run(
            [script, "report", str(tb_run["root"]), "--out", str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0 and "Worst layers" in done.stdout
    missing = subprocess.run(
        [*cmd[:4], str(tmp_path / "nothing")], capture_output=True, text=True, env=env, timeout=120
    )
    assert missing.returncode == 2 and "no lightning_normcheck logs" in missing.stdout
