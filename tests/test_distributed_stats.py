"""Under DDP rank zero judges the global batch, not its own shard.

Two CPU processes (gloo) run ``scripts/ddp_stats.py`` once: a unit dead on rank 0's shard but firing on rank 1's
is not dead; a raw feature seen only by rank 1 reaches rank 0's ``input_scale``; a module that runs on one rank
only is reported; the logged activation RMS, saturated fraction and input max |x| are those of both ranks'
batches together (checked against forward hooks on each rank); a healthy run stays silent and learns. The same
data on one process (rank 0's view) is the control that shows each check can fail.

In-process: one process calls no collective; the reduced path, forced on one process (where torchmetrics'
``compute()`` has nothing to synchronise), gives what the local path gives; the merge of batch statistics; a
failure flagged by another rank; a module whose width changes.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import pytest
import torch
from helpers import MemLogger
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck import norms as N
from lightning_normcheck.callbacks import _signals
from lightning_normcheck.callbacks import activation_norm_monitor as act_monitor

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_stats.py"
Rows = list[tuple[int, dict[str, float]]]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ddp_stats", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    out = tmp_path_factory.mktemp("ddp_stats")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=300, env=env)
    written = (out / "rank0.json").exists() and (out / "rank1.json").exists()
    assert proc.returncode == 0 and written, proc.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))
    for fit in ("shard", "healthy"):
        assert r0[fit]["disabled"] == r1[fit]["disabled"] == []  # every monitor ran to the end on both ranks
        assert r0[fit]["rows"] and not r1[fit]["rows"]  # rank zero logs
    return r0, r1


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """The shard fit on one process: every batch as rank 0 sees it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _script().fit_shard(1)  # type: ignore[no-any-return]


def _series(rows: Rows, key: str) -> dict[int, float]:
    return {int(step): row[key] for step, row in rows if key in row}


# -- two processes ----------------------------------------------------------------------------------------------------
def test_a_unit_that_fires_on_another_rank_is_not_dead(ddp: Any, one_process: dict[str, Any]) -> None:
    r0, r1 = ddp
    assert "dead_units" in one_process["codes"]  # the control: rank 0's shard alone has `act` dead
    assert set(_series(one_process["rows"], "normcheck/dead_frac/act").values()) == {1.0}
    assert "dead_units" not in r0["shard"]["codes"] and "dead_units" not in r1["shard"]["codes"]
    dead = _series(r0["shard"]["rows"], "normcheck/dead_frac/act")
    assert len(dead) >= 5 and set(dead.values()) == {0.0}  # every unit fired on rank 1


def test_an_extreme_feature_on_another_rank_reaches_rank_zero(ddp: Any, one_process: dict[str, Any]) -> None:
    r0, r1 = ddp
    assert "input_scale" not in one_process["codes"]  # the control: rank 0's shard is standardized
    assert max(_series(one_process["rows"], "normcheck/input/max_abs/0").values()) < 10
    assert "input_scale" in r0["shard"]["codes"] and "input_scale" in r1["shard"]["codes"]
    assert min(_series(r0["shard"]["rows"], "normcheck/input/max_abs/0").values()) > 5000


def test_a_module_that_runs_on_one_rank_only_is_reported(ddp: Any, one_process: dict[str, Any]) -> None:
    r0, _ = ddp
    assert not _series(one_process["rows"], "normcheck/act_rms/extra")
    rms = _series(r0["shard"]["rows"], "normcheck/act_rms/extra")
    assert len(rms) >= 5 and min(rms.values()) > 100  # rank 1's activations, seen by rank 0
    assert set(_series(r0["shard"]["rows"], "normcheck/dead_frac/extra").values()) == {0.0}


def test_logged_statistics_are_those_of_both_ranks_batches(ddp: Any) -> None:
    r0, r1 = ddp
    rows, mine, theirs = r0["healthy"]["rows"], r0["healthy"]["sums"], r1["healthy"]["sums"]
    checked, local_off = 0, 0.0
    for step, row in rows:
        for key, value in row.items():
            if not key.startswith("normcheck/act_rms/"):
                continue
            module = key.split("/", 2)[2]
            (s0, n0, *_), (s1, n1, *_) = mine[module][str(step)], theirs[module][str(step)]
            both = math.sqrt((s0 + s1) / (n0 + n1))
            assert value == pytest.approx(both, rel=1e-5), (step, module)
            local_off = max(local_off, abs(math.sqrt(s0 / n0) - both) / both)
            checked += 1
        if "normcheck/saturated_frac/net.3" in row:
            (_, n0, _, k0), (_, n1, _, k1) = mine["net.3"][str(step)], theirs["net.3"][str(step)]
            assert row["normcheck/saturated_frac/net.3"] == pytest.approx((k0 + k1) / (n0 + n1), abs=1e-6)
        if "normcheck/input/max_abs/0" in row:
            top = max(mine["<input>"][str(step)][2], theirs["<input>"][str(step)][2])
            assert row["normcheck/input/max_abs/0"] == pytest.approx(top, rel=1e-6)
    assert checked >= 6 * 10  # six series (the input and five modules) at every logging step
    assert local_off > 0.1  # rank 0's shard alone gives other numbers: the check can fail


def test_a_healthy_run_stays_silent_and_learns(ddp: Any) -> None:
    for r in ddp:
        healthy = r["healthy"]
        assert healthy["codes"] == []
        losses = [healthy["losses"][str(s)] for s in range(30)]
        assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


# -- one process ----------------------------------------------------------------------------------------------------
def test_one_process_calls_no_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    called: list[str] = []
    for name in ("all_reduce", "all_gather", "barrier", "broadcast", "all_gather_object", "reduce"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, _n=name, **k: called.append(_n))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = _script().fit_shard(1)
    assert called == [] and result["disabled"] == []
    assert "dead_units" in result["codes"]


def _forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reduced path on one process: a world of 2 as the monitors see it, no process group (nothing to sync)."""
    monkeypatch.setattr(act_monitor, "_world_size", lambda run: 2)
    monkeypatch.setattr(_signals, "_world_size", lambda run: 2)


def _same_rows(a: Rows, b: Rows) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert sorted(x) == sorted(y), step
        for key in x:
            if math.isnan(x[key]):
                assert math.isnan(y[key]), (step, key)
            else:
                assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize("fit", ["fit_shard", "fit_healthy"])
def test_the_reduced_path_on_one_process_gives_the_local_results(monkeypatch: pytest.MonkeyPatch, fit: str) -> None:
    script = _script()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        local = getattr(script, fit)(1)
        _forced(monkeypatch)
        reduced = getattr(script, fit)(1)
    assert reduced["disabled"] == local["disabled"] == []
    assert reduced["codes"] == local["codes"]
    _same_rows(local["rows"], reduced["rows"])


def _rows_of(batches: list[tuple[torch.Tensor, torch.Tensor]], losses: list[float]) -> torch.Tensor:
    out = []
    for (x, y), loss in zip(batches, losses):
        monitor = _signals._BatchScale(input_scale=1e3)
        monitor._measure_batch(0, (x, y))
        monitor._stats[("loss",)] = torch.tensor(loss)
        out.append(monitor._local_row(torch.device("cpu")))
    return torch.stack(out)


def test_merging_the_ranks_batch_statistics() -> None:
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(16, 6, generator=g), torch.randn(16, 6, generator=g)
    x1[:, 4] = 5000 + torch.rand(16, generator=g)  # rank 1 only
    y0, y1 = 1e4 + torch.randn(16, 1, generator=g), 1e4 + 2 * torch.randn(16, 1, generator=g)  # mean >> std
    merged = _signals._merge_rows(_rows_of([(x0, y0), (x1, y1)], [1.0, 3.0]))
    slot = merged[: _signals._SLOT]
    top = slot[1 : 1 + _signals._TOP].reshape(len(_signals._VECTOR_STATS), _signals.TOP_K)
    whole = N.feature_stats(torch.cat([x0, x1]), 1e3, _signals.TOP_K)
    assert slot[0] == 1 and top[0, 0] == 4 and top[1, 0] == whole["max_abs"][0]  # rank 1's column 4 is first
    n_above, nonfinite, all_min, all_max_abs = slot[-4:].tolist()
    assert (n_above, nonfinite) == (1, 0)
    assert all_min == whole["all_min"] and all_max_abs == whole["all_max_abs"]  # exact
    target = merged[_signals._TARGET_AT : _signals._TARGET_AT + _signals._TARGET].tolist()
    exact = N.target_stats(torch.cat([y0, y1]).double())
    assert target[:2] == [1, 32]
    for got, key in zip(target[3:], ("rms", "mean", "std", "max_abs")):
        assert got == pytest.approx(float(exact[key]), rel=1e-5), key
    assert merged[_signals._LOSS_AT : _signals._LOSS_AT + 2].tolist() == [1, 2.0]  # the mean of the ranks' losses
    assert merged[-1] == 0  # no rank failed
    # a rank whose tensor holds a NaN wins whatever the others' max |x|; an empty rank changes nothing
    x0[3, 1] = math.nan
    rows = _rows_of([(x0, y0), (x1, y1)], [1.0, 3.0])
    merged = _signals._merge_rows(torch.cat([rows, _signals._empty_row(torch.device("cpu"))[None]]))
    assert merged[1] == 1 and merged[_signals._SLOT - 3] == 1  # column 1 first, one feature with a NaN
    assert merged[_signals._TARGET_AT + 1] == 32


def test_a_failure_on_another_rank_stops_the_monitor_on_this_one_too() -> None:
    monitor = _signals._BatchScale(input_scale=1e3)
    monitor._measure_batch(0, (torch.randn(4, 3), torch.randn(4, 1)))
    with pytest.raises(RuntimeError, match="failed on another rank"):
        monitor.records(None, {("batch_scale", "failed"): 1.0})  # type: ignore[arg-type]
    assert monitor._stats == {}


def test_a_failure_inside_a_hook_waits_for_the_logging_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under DDP a forward hook that raises does not switch the monitor off on its own rank (the others would
    wait in the next collective): the failure flag travels with the reduction and every rank raises there."""
    _forced(monkeypatch)
    calls: list[int] = []

    def failing(*args: Any) -> None:
        calls.append(1)
        raise ValueError("planted")

    monkeypatch.setattr(act_monitor._ActivationNorms, "_accumulate", staticmethod(failing))
    script, cb = _script(), NormCheck(print_summary=False)
    data = torch.utils.data.DataLoader(script.ShardData(), batch_size=16)
    with pytest.warns(RuntimeWarning, match=r"activation_norm monitor failed \(ValueError: planted\)"):
        script._trainer(1, MemLogger(), [cb], max_steps=3, every=1).fit(script.ShardModel(), data)
    assert cb.disabled_monitors == ["activation_norm"]
    assert len(calls) > 1  # the hooks went on failing quietly until the logging step
    monitor = next(m for m in cb._monitors if isinstance(m, act_monitor._ActivationNorms))
    assert sorted(monitor._reducers) == ["max", "sum"]
    pickle.loads(pickle.dumps(monitor._reducers))  # the torchmetrics states travel with a pickled callback


class _Narrowing(L.LightningModule):
    """`act` sees 16 units up to step 5, then 8: the widths are agreed again."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.head = nn.Linear(16, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.fc(x)
        if self.trainer.global_step >= 6:
            h = h[:, :8]
        h = self.act(h)
        return nn.functional.mse_loss(self.head(nn.functional.pad(h, (0, 16 - h.shape[1]))), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_a_module_seen_at_another_width_is_laid_out_again(monkeypatch: pytest.MonkeyPatch) -> None:
    _forced(monkeypatch)
    from helpers import loader, regression_data

    logger, cb = MemLogger(), NormCheck(print_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _script()._trainer(1, logger, [cb], max_steps=12, every=2).fit(_Narrowing(), loader(regression_data(256)))
    assert cb.disabled_monitors == []
    dead = _series(logger.rows, "normcheck/dead_frac/act")
    rms = _series(logger.rows, "normcheck/act_rms/act")
    assert sorted(rms) == [0, 1, 2, 3, 4, 6, 8, 10]
    assert sorted(dead) == [0, 1, 2, 3, 4, 8, 10]  # step 6: the new width, not yet agreed
    monitor = next(m for m in cb._monitors if isinstance(m, act_monitor._ActivationNorms))
    assert monitor._units == [8]
