"""DDP on CPU with two processes: norms are of the (all-reduced) global gradient, only rank zero logs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_run.py"


def test_ddp_two_processes(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env
    )
    # the script leaves with os._exit once its results are written: no exit-time teardown that could abort
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    # DDP all-reduces gradients before on_before_optimizer_step: both ranks measure the same global norm
    for step, value in r0["total"].items():
        assert value == pytest.approx(r1["total"][step], rel=1e-6)
    with open(tmp_path / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("normcheck/grad_norm/total")]
    logged = {int(r["step"]): float(r["normcheck/grad_norm/total"]) for r in rows}
    assert sorted(logged) == list(range(8))
    for step, value in logged.items():
        assert value == pytest.approx(r0["total"][str(step)], rel=1e-5)
    assert r0["reported"] and not r1["reported"]
