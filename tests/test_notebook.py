"""notebooks/quickstart.ipynb runs as written: its healthy run gives no warning, its planted run does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cells = [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), str(NOTEBOOK), "exec"), ns)  # noqa: S102 - our own notebook
    healthy, check = ns["healthy"], ns["check"]
    assert [f for f in healthy.findings if f.severity != "info"] == []
    codes = {f.code for f in check.findings if f.severity in ("warning", "error")}
    assert {"loss_sum_reduction", "saturated_activations"} <= codes, codes
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "normcheck_runs").rglob("*"))
