"""FSDP2 on CPU with two processes (``fully_shard`` under Lightning's ModelParallelStrategy, gloo): every norm
NormCheck logs is that of the full tensors, reduced from the shards in one collective per logging step."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import LitModel, MemLogger, fit, loader, mlp, regression_data
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks._run import EARLY_STEPS

SCRIPT = Path(__file__).resolve().parent / "scripts" / "fsdp2_run.py"
RTOL = 1e-4


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    out = tmp_path_factory.mktemp("fsdp2")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=180, env=env)
    written = (out / "rank0.json").exists() and (out / "rank1.json").exists()
    assert proc.returncode == 0 and written, proc.stderr[-3000:]
    return out, json.loads((out / "rank0.json").read_text()), json.loads((out / "rank1.json").read_text())


def _rows(out: Path, name: str) -> dict[int, dict[str, float]]:
    with open(out / name / "version_0" / "metrics.csv") as f:
        rows: dict[int, dict[str, float]] = {}
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    return rows


def _due(step: int, every: int) -> bool:  # the sampling schedule of lightning_normcheck.callbacks._run
    return step % every == 0 or step < EARLY_STEPS and (step < 4 or step % 2 == 0)


@pytest.mark.parametrize(("fit", "every", "steps"), [("fp32", 1, 24), ("bf16", 5, 26)])
def test_fsdp2_norms_are_of_the_full_tensors(
    run: tuple[Path, dict[str, Any], dict[str, Any]], fit: str, every: int, steps: int
) -> None:
    out, r0, r1 = run[0], run[1][fit], run[2][fit]
    rows = _rows(out, fit)
    layers = ["net.0", "net.2", "net.4"]
    # the total of every optimizer step, logged at its own step, including the steps that log nothing else
    logged = {s: row["normcheck/grad_norm/total"] for s, row in rows.items() if "normcheck/grad_norm/total" in row}
    assert sorted(logged) == list(range(steps))
    for step, value in logged.items():
        assert value == pytest.approx(r0["total"][str(step)], rel=RTOL), step
        assert value > 0.1
    # per-layer gradient norms, weight norms, drift and update ratios on every sampled step and layer
    sampled = [s for s in range(steps) if _due(s, every)]
    for step in sampled:
        row = rows[step]
        for layer in layers:
            assert row[f"normcheck/grad_norm/{layer}"] == pytest.approx(r0["grad"][str(step)][layer], rel=RTOL)
            assert row[f"normcheck/weight_norm/{layer}"] == pytest.approx(r0["weight"][str(step)][layer], rel=RTOL)
            assert row[f"normcheck/weight_drift/{layer}"] == pytest.approx(r0["drift"][str(step)][layer], rel=1e-3)
            assert row[f"normcheck/update_ratio/{layer}"] == pytest.approx(r0["update"][str(step)][layer], rel=1e-3)
    for s in set(range(steps)) - set(sampled):
        assert not any(k.startswith("normcheck/weight_norm/") for k in rows.get(s, {}))
    weights = [rows[s]["normcheck/weight_norm/net.0"] for s in sampled]
    assert len(set(weights)) == len(weights)  # the live weights, not a copy taken before sharding
    # every rank ends with the same reduced total (trainer.callback_metrics), and only rank zero logs
    assert r0["headline"] == r1["headline"]
    for step in sampled:
        assert r0["headline"][str(step)] == pytest.approx(logged[step], rel=1e-6)
    assert r0["reported"] and not r1["reported"]
    # one collective per logging step (the queued steps together), none at the others; the first one is the
    # start-of-fit weight statistics (init advice)
    assert r0["calls"] == r1["calls"] == [0] + [s + 1 for s in sampled]
    # a healthy run: silent and learning
    assert r0["findings"] == [] and r1["findings"] == []
    assert r0["disabled"] == ["clip_rate", "training_bugs"]
    first, last = r0["data_loss"]
    assert last < 0.5 * first


def test_fsdp2_inf_norm(run: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    out, r0 = run[0], run[1]["inf"]
    rows = _rows(out, "inf")
    for step in range(4):
        assert rows[step]["normcheck/grad_norm/total"] == pytest.approx(r0["total"][str(step)], rel=RTOL)
        for layer in ("net.0", "net.2", "net.4"):
            assert rows[step][f"normcheck/grad_norm/{layer}"] == pytest.approx(r0["grad"][str(step)][layer], rel=RTOL)
            assert rows[step][f"normcheck/weight_norm/{layer}"] == pytest.approx(
                r0["weight"][str(step)][layer], rel=RTOL
            )
    assert r0["findings"] == []


def test_partial_placement_is_refused(run: tuple[Path, dict[str, Any], dict[str, Any]]) -> None:
    assert "Partial" in run[1]["partial"] and "Partial" in run[2]["partial"]


def test_a_failure_on_one_rank_switches_the_monitor_off_on_every_rank(
    run: tuple[Path, dict[str, Any], dict[str, Any]],
) -> None:
    out, r0, r1 = run[0], run[1]["fail"], run[2]["fail"]
    # rank 1 alone failed: neither rank waits for the other in a collective, both switch the monitors off
    for r in (r0, r1):
        assert {"gradient_norm", "weight_drift"} <= set(r["disabled"])
        assert sorted(int(s) for s in r["total"]) == list(range(7))  # training went on to the end
    rows = _rows(out, "fail")
    totals = sorted(s for s, row in rows.items() if "normcheck/grad_norm/total" in row)
    weights = sorted(s for s, row in rows.items() if "normcheck/weight_norm/net.0" in row)
    assert totals == [0, 1] and weights == [0, 1, 2, 3]
    for s in totals:
        assert rows[s]["normcheck/grad_norm/total"] == pytest.approx(r0["total"][str(s)], rel=RTOL)


class FullyShardedDataParallel(nn.Module):
    """Stands for FSDP1's wrapper, found by its class name: Lightning runs FSDPStrategy (FSDP1) on CUDA only, and
    DeepSpeed too, so neither can run here; this checks what happens once such a layout is found."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def test_an_unsupported_layout_switches_the_norm_monitors_off_with_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cb, logger = NormCheck(clip_threshold=1.0), MemLogger()
    with caplog.at_level("INFO", logger="lightning_normcheck"):
        fit(LitModel(FullyShardedDataParallel(mlp())), loader(regression_data()), [cb], max_steps=6, logger=logger)
    lines = [r.getMessage() for r in caplog.records if "switched off" in r.getMessage()]
    assert len(lines) == 1 and "FSDP1" in lines[0], lines
    assert cb.disabled_monitors == ["clip_rate", "gradient_norm", "training_bugs", "weight_drift"]
    keys = logger.keys()
    assert not any(k.startswith(("normcheck/grad_norm", "normcheck/weight", "normcheck/clip")) for k in keys)
    assert any(k.startswith("normcheck/act_rms/") for k in keys)  # activations are per process: still right


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, float("inf")])
def test_sums_of_powers_of_shards_give_the_full_norms(norm_type: float) -> None:
    """The math of the reduction, in one process: shards split like Shard(0) (one of them empty), their sums of
    powers summed (max for inf) over the "processes", then the root, equal the norms of the full tensors."""
    import lightning_normcheck.norms as N

    g = torch.Generator().manual_seed(0)
    full = [torch.randn(5, 3, generator=g), torch.randn(1, generator=g), torch.randn(4, generator=g)]
    layer = torch.tensor([0, 0, 1])
    shards = [list(t.tensor_split(2)) for t in full]  # the (1,) bias leaves rank 1 an empty shard
    ranks = [N.tensor_norms([s[r] for s in shards], norm_type) for r in range(2)]
    route = torch.ones(3, dtype=torch.long)  # every tensor split: route 1 (route 0: held whole)
    parts = [N.partial_powers(n, route, 2, norm_type, layer, 2) for n in ranks]
    reduced = torch.stack(parts).amax(0) if norm_type == float("inf") else torch.stack(parts).sum(0)
    got = N.finish_powers(reduced, norm_type)
    want = N.group_norms(N.tensor_norms(full, norm_type), layer, 2, norm_type)
    torch.testing.assert_close(got, want)
