"""The overhead budget (``NormCheck(max_overhead=...)``): NormCheck clocks its own hooks and stretches the per-layer
sampling cadence when they take more than the budget; never the total norm of every step, never the first 20 steps.

The real fits use a budget so tight (1e-4 of the step) that stretching is certain on any machine, or the loosest
one (1.0: the per-layer part can never take more than the whole step), so nothing here depends on timing.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, fit, loader, mlp, regression_data
from lightning.pytorch.loggers import CSVLogger
from scenarios import NoZeroGrad, _lit, init_mlp, reg
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks._budget import AIM, _Budget

TIGHT = 1e-4


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.fc(self.norm(x)))


def stack(blocks: int = 40, width: int = 8) -> nn.Sequential:
    """Many small modules (3 per block): the per-layer measurements cost far more than the step itself."""
    return nn.Sequential(nn.Linear(8, width), *[Block(width) for _ in range(blocks)], nn.Linear(width, 1))


class Truth(L.Callback):
    """Independent record of each optimizer step's gradients: the total norm and one layer's norm."""

    def __init__(self, layer: str) -> None:
        self.layer = layer
        self.total: dict[int, float] = {}
        self.one: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.total[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))
        own = [p.grad for n, p in pl_module.named_parameters() if n.rsplit(".", 1)[0] == self.layer]
        self.one[trainer.global_step] = float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in own])))


def read_csv(logger: CSVLogger) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for r in csv.DictReader(f):
            rows.setdefault(int(r["step"]), {}).update({k: float(v) for k, v in r.items() if v and k != "step"})
    return rows


def run(tmp_path: Path, max_overhead: float | None, steps: int = 70) -> tuple[dict[int, dict[str, float]], Truth, Any]:
    layer = "net.5.fc"
    truth = Truth(layer)
    cb = NormCheck(max_overhead=max_overhead, print_summary=False)
    logger = CSVLogger(tmp_path, name="budget")
    data = loader(regression_data(n=steps * 16))
    fit(LitModel(stack(), lr=1e-3), data, [truth, cb], max_steps=steps, logger=logger, log_every_n_steps=1)
    return read_csv(logger), truth, cb


def test_a_tight_budget_stretches_the_cadence_and_keeps_every_total(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    steps = 70
    with caplog.at_level(logging.INFO, logger="lightning_normcheck"):
        rows, truth, cb = run(tmp_path, TIGHT, steps)
    layer_key = "normcheck/grad_norm/net.5.fc"
    # the total norm of every optimizer step, equal to torch's of the same gradients
    totals = {s: r["normcheck/grad_norm/total"] for s, r in rows.items() if "normcheck/grad_norm/total" in r}
    assert sorted(totals) == list(range(steps))
    for s, v in totals.items():
        assert v == pytest.approx(truth.total[s], rel=1e-5), s
    # the cadence as logged: 1 (the Trainer's) through the dense start, stretched after it
    cadence = {s: r["normcheck/cadence"] for s, r in rows.items() if "normcheck/cadence" in r}
    assert all(cadence[s] == 1.0 for s in range(20))
    stretched = [s for s, c in cadence.items() if c > 1.0]
    assert stretched and min(stretched) >= 20 and max(cadence.values()) >= 100
    # per-layer norms on every step of the first 20, and afterwards only on the steps of the cadence in force
    sampled = sorted(s for s, r in rows.items() if layer_key in r)
    assert sampled[:20] == list(range(20))
    for s in sampled:
        assert rows[s][layer_key] == pytest.approx(truth.one[s], rel=1e-5), s
        assert s % cadence[s] == 0, (s, cadence[s])
    assert len(sampled) < 40  # without the budget: 70
    # the weight monitor measures on sampled steps only, not on every logging step
    assert sorted(s for s, r in rows.items() if "normcheck/weight_norm/net.5.fc" in r) == sampled
    assert not [s for s in sampled if s >= min(stretched) + 1]  # a cadence of 100+ samples none of the rest
    # said once, as an info line (not a finding)
    said = [r for r in caplog.records if r.name == "lightning_normcheck" and "normcheck/cadence" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO
    assert "max_overhead" in said[0].getMessage() and "every 1)" not in said[0].getMessage()
    assert not cb.findings or all(f.code for f in cb.findings)  # cadence is no finding code


def test_a_generous_budget_stretches_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    steps = 45
    with caplog.at_level(logging.INFO, logger="lightning_normcheck"):
        rows, truth, _ = run(tmp_path, 1.0, steps)
    assert {r["normcheck/cadence"] for r in rows.values() if "normcheck/cadence" in r} == {1.0}
    sampled = sorted(s for s, r in rows.items() if "normcheck/grad_norm/net.5.fc" in r)
    assert sampled == list(range(steps))
    assert not [r for r in caplog.records if "normcheck/cadence" in r.getMessage()]


def test_no_budget_logs_no_cadence(tmp_path: Path) -> None:
    rows, _, _ = run(tmp_path, None, 25)
    assert not any("normcheck/cadence" in r for r in rows.values())
    assert sorted(s for s, r in rows.items() if "normcheck/grad_norm/net.5.fc" in r) == list(range(25))


@pytest.mark.parametrize(
    ("build", "code"),
    [
        (lambda: NoZeroGrad(mlp(), lr=1e-2), "missing_zero_grad"),
        (lambda: _lit(init_mlp(8, gain=3.0), lr=1e-4, optimizer="adam"), "exploding_activations"),
    ],
    ids=["missing_zero_grad", "exploding_activations"],
)
def test_a_bug_present_from_the_start_is_found_within_20_steps_under_a_tight_budget(build: Any, code: str) -> None:
    cb = NormCheck(max_overhead=TIGHT, print_summary=False)
    fit(build(), reg(), [cb], max_steps=40, log_every_n_steps=1)
    assert cb._run is not None and cb._run.every >= 100  # stretched after the start
    found = [f for f in cb.findings if f.code == code]
    assert found and found[0].step < 20 and found[0].severity in ("warning", "error")


def test_the_stretched_cadence_survives_a_resume(tmp_path: Path) -> None:
    cb = NormCheck(max_overhead=TIGHT, print_summary=False)
    data = loader(regression_data(n=2048))
    t = fit(LitModel(stack(blocks=10), lr=1e-3), data, [cb], max_steps=40, log_every_n_steps=1)
    assert cb._run is not None
    every = cb._run.every
    assert every >= 100 and cb.state_dict()["budget"] == {"every": every, "base": 1}
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    again = NormCheck(max_overhead=TIGHT, print_summary=False)
    logger = CSVLogger(tmp_path, name="resumed")
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=60,
        logger=logger,
        log_every_n_steps=1,
        callbacks=[again],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(LitModel(stack(blocks=10), lr=1e-3), data, ckpt_path=ckpt)
    rows = read_csv(logger)
    assert sorted(s for s, r in rows.items() if "normcheck/grad_norm/total" in r) == list(range(40, 60))
    # no re-measuring at the Trainer's cadence: steps 40-59 are past the dense start and off the stretched cadence
    assert not [s for s, r in rows.items() if "normcheck/grad_norm/net.1.fc" in r]
    assert {r["normcheck/cadence"] for r in rows.values() if "normcheck/cadence" in r} == {float(every)}


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, math.nan, math.inf, "0.03", True])
def test_bad_max_overhead_fails_at_construction(value: Any) -> None:
    with pytest.raises(ValueError, match=r"NormCheck: `max_overhead` must be a number in \(0.0, 1.0\] or None, got"):
        NormCheck(max_overhead=value)


def test_max_overhead_from_yaml_values() -> None:
    assert NormCheck().max_overhead == 0.03
    assert NormCheck(max_overhead=None).max_overhead is None
    assert NormCheck(max_overhead=1).max_overhead == 1.0
    # a resume with another budget finds its state: the budget is not part of the checkpoint key
    assert NormCheck(max_overhead=0.1).state_key == NormCheck().state_key


class FakeRun(SimpleNamespace):
    def is_due(self, step: int) -> bool:
        return step % self.every == 0


def test_the_decision_from_clocked_times_by_hand() -> None:
    """Clocked times in, cadence out, checked against the budget's arithmetic done by hand."""
    now = [0.0]
    budget = _Budget(0.05, clock=lambda: now[0])
    run = FakeRun(step=20, every=1, base_every=1, flush_step=0, cadence_from=0)

    def batch(step: int, user: float, ours: float) -> None:
        run.step = step
        budget.begin_batch(run)
        budget.timed(lambda: now.__setitem__(0, now[0] + ours))
        now[0] += user
        run.flush_step = step

    for s in range(20, 40):  # every step sampled: 10 ms of training, 5 ms of NormCheck
        batch(s, 0.010, 0.005)
    assert budget.ready(run)
    # all 20 batches sampled: the per-layer part is all 5 ms; share 5/15; the cadence that brings it to AIM * 5%
    a = AIM * 0.05
    want = math.ceil(0.005 * (1 - a) / (a * 0.010))
    assert budget.proposal(run) == want == 12
    assert budget.last_share == pytest.approx(1 / 3)
    run.every, run.cadence_from = want, 42
    # at cadence 12: 0.2 ms on every step, 5 ms more on sampled steps (48, 60, 72); the share of the per-layer part
    # is 3 x 5 / (42 x 10.2 + 3 x 5) = 3.4%: within the budget and above 40% of it, so the cadence stays
    for s in range(42, 84):
        batch(s, 0.010, 0.0002 + (0.005 if s % 12 == 0 else 0.0))
    run.flush_step = 84
    assert budget.proposal(run) == 12
    assert budget.last_share == pytest.approx(3 * 0.005 / (42 * 0.0102 + 3 * 0.005), rel=1e-6)
    # the steps got 10x longer: the share (0.5%) falls below 40% of the budget, the cadence comes back down
    for s in range(84, 126):
        batch(s, 0.100, 0.0002 + (0.005 if s % 12 == 0 else 0.0))
    assert budget.proposal(run) == math.ceil(0.005 * (1 - a) / (a * 0.1002)) == 2
    # and a share above the budget at a cadence that is not the base: stretched further, to a multiple of the base
    run.every, run.base_every, run.cadence_from = 4, 2, 126
    for s in range(126, 146):
        batch(s, 0.010, 0.0002 + (0.005 if s % 4 == 0 else 0.0))
    assert budget.proposal(run) == 2 * math.ceil(0.005 * (1 - a) / (a * 0.0102) / 2) == 12
