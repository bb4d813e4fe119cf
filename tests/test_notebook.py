"""The quickstart notebook runs top to bottom (its cells assert what they show: the healthy and the fixed run
learn and have no warning or error, the broken run has both planted problems) and shows the depth profiles."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kernel is this interpreter, importing this checkout's package
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    images = [
        o
        for c in nb.cells
        if c.cell_type == "code" and "show_profiles(" in c.source
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 3 * 3  # three runs, at least three kinds each
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "broken: mean loss" in text and "fixed: mean loss" in text
    assert (tmp_path / "normcheck_runs" / "broken").is_dir()
