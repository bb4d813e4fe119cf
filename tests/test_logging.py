"""Logged numbers, read back from TensorBoard and CSV files, against independent computations."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, ManualTwoOpt, MemLogger, fit, loader, regression_data
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn.utils import get_total_norm

from lightning_normcheck import (
    ActivationNormMonitor,
    ClipRateTracker,
    GradientNormMonitor,
    NormCheck,
    WeightDriftMonitor,
)


class Recorder(L.Callback):
    """Computes the same quantities independently (torch.linalg / get_total_norm), every step."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.layer_grad: dict[int, dict[str, float]] = {}
        self.weight: dict[int, dict[str, float]] = {}
        self.drift: dict[int, dict[str, float]] = {}
        self.update: dict[int, dict[str, float]] = {}
        self.act: dict[int, dict[str, float]] = {}
        self._before: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    @staticmethod
    def _by_module(model: nn.Module, what: str) -> dict[str, torch.Tensor]:
        out: dict[str, list[torch.Tensor]] = {}
        for name, p in model.named_parameters():
            t = p.grad if what == "grad" else p.detach()
            if t is not None:
                out.setdefault(name.rsplit(".", 1)[0], []).append(t.flatten())
        return {k: torch.cat(v) for k, v in out.items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = {k: v.clone() for k, v in self._by_module(pl_module, "weight").items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        step = trainer.global_step
        self.act[step] = {}

        def make(name: str) -> Any:
            def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
                self.act[step][name] = out.detach().double().pow(2).mean().sqrt().item()

            return hook

        for name, mod in pl_module.named_modules():
            if name and not list(mod.children()):
                self._handles.append(mod.register_forward_hook(make(name)))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.total[step] = get_total_norm(grads).item()
        self.layer_grad[step] = {
            k: torch.linalg.vector_norm(v).item() for k, v in self._by_module(pl_module, "grad").items()
        }
        self._before = {k: v.clone() for k, v in self._by_module(pl_module, "weight").items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step - 1
        now = self._by_module(pl_module, "weight")
        self.weight[step] = {k: torch.linalg.vector_norm(v).item() for k, v in now.items()}
        self.drift[step] = {
            k: (torch.linalg.vector_norm(v - self._start[k]) / torch.linalg.vector_norm(self._start[k])).item()
            for k, v in now.items()
        }
        self.update[step] = {
            k: (torch.linalg.vector_norm(v - self._before[k]) / torch.linalg.vector_norm(v)).item()
            for k, v in now.items()
        }


def read_tb(log_dir: str) -> dict[str, dict[int, float]]:
    ea = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in ea.Tags()["scalars"]}


def read_csv(log_dir: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    with open(Path(log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k != "step" and v not in ("", None):
                    out.setdefault(k, {})[int(row["step"])] = float(v)
    return out


def _model() -> LitModel:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    return LitModel(net, lr=0.05)


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Recorder, dict[str, Any], L.Trainer]:
    tmp_path = tmp_path_factory.mktemp("logged")
    rec = Recorder()
    tb = TensorBoardLogger(tmp_path, name="tb")
    cs = CSVLogger(tmp_path, name="csv")
    trainer = fit(
        _model(),
        loader(regression_data(), 16),
        [rec, NormCheck()],
        max_steps=24,
        logger=[tb, cs],
        log_every_n_steps=7,
        gradient_clip_val=0.5,
    )
    return rec, {"tb": read_tb(tb.log_dir), "csv": read_csv(cs.log_dir)}, trainer


def test_total_grad_norm_every_step_equals_get_total_norm(logged_run: Any) -> None:
    rec, logs, _ = logged_run
    for kind in ("tb", "csv"):
        logged = logs[kind]["normcheck/grad_norm/total"]
        assert sorted(logged) == list(range(24)), kind  # every optimizer step, at its own step
        for step, value in logged.items():
            assert value == pytest.approx(rec.total[step], rel=1e-5), (kind, step)
    # clipping was active (threshold 0.5): the logged norm is the pre-clip one
    assert max(rec.total.values()) > 0.5


def test_per_layer_values_match_independent_computation(logged_run: Any) -> None:
    rec, logs, _ = logged_run
    tb = logs["tb"]
    steps = sorted(tb["normcheck/grad_norm/net.0"])
    assert steps[:4] == [0, 1, 2, 3] and 7 in steps and 14 in steps and 21 in steps
    for kind in ("tb", "csv"):
        data = logs[kind]
        for layer in ("net.0", "net.2", "net.4"):
            for step in steps:
                assert data[f"normcheck/grad_norm/{layer}"][step] == pytest.approx(
                    rec.layer_grad[step][layer], rel=1e-5
                )
                assert data[f"normcheck/weight_norm/{layer}"][step] == pytest.approx(rec.weight[step][layer], rel=1e-5)
                assert data[f"normcheck/weight_drift/{layer}"][step] == pytest.approx(
                    rec.drift[step][layer], rel=1e-4, abs=1e-7
                )
                assert data[f"normcheck/update_ratio/{layer}"][step] == pytest.approx(
                    rec.update[step][layer], rel=1e-4, abs=1e-9
                )
        for module in ("net.0", "net.1", "net.2", "net.3", "net.4"):
            for step in steps:
                assert data[f"normcheck/act_rms/{module}"][step] == pytest.approx(rec.act[step][module], rel=1e-5)


def test_clip_rate_matches_hand_count(logged_run: Any) -> None:
    rec, logs, _ = logged_run
    rate = logs["tb"]["normcheck/clip/rate"]
    for step, value in rate.items():
        window = [rec.total[s] > 0.5 for s in range(max(0, step - 49), step + 1)]
        assert value == pytest.approx(sum(window) / len(window), rel=1e-6)


def test_every_metric_is_under_normcheck_prefix(logged_run: Any) -> None:
    _, logs, _ = logged_run
    assert logs["tb"] and all(k.startswith("normcheck/") for k in logs["tb"])
    assert all(k.startswith("normcheck/") for k in logs["csv"])


def test_dead_and_saturated_fractions_by_hand(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(8, 16)
    with torch.no_grad():  # half the ReLU units dead for every input, tanh pushed to its bounds
        lin.bias[:8] = -100.0
    net = nn.Sequential(lin, nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    with torch.no_grad():
        net[2].weight.mul_(50.0)
    data = regression_data()
    x0 = data.tensors[0][:16]
    cb = ActivationNormMonitor(log_every_n_steps=1)
    tb = TensorBoardLogger(tmp_path, name="tb")
    fit(LitModel(net, lr=0.0), loader(data, 16), [cb], max_steps=1, logger=tb)
    logs = read_tb(tb.log_dir)
    with torch.no_grad():
        h = net[1](net[0](x0))
        t = net[3](net[2](h))
    dead = (h == 0).all(0).float().mean().item()
    sat = (t.abs() >= 0.99).float().mean().item()
    assert dead >= 0.5
    assert logs["normcheck/dead_frac/net.1"][0] == pytest.approx(dead)
    assert logs["normcheck/saturated_frac/net.3"][0] == pytest.approx(sat, abs=1e-6)


def test_works_without_logger_and_each_callback_alone(tmp_path: Path) -> None:
    for cb in (
        GradientNormMonitor(),
        ActivationNormMonitor(),
        WeightDriftMonitor(),
        ClipRateTracker(clip_threshold=1.0),
    ):
        trainer = fit(_model(), loader(regression_data(), 16), [cb], max_steps=5, logger=False)
        assert trainer.global_step == 5 and cb.disabled_monitors == []


def test_per_parameter_and_norm_type(tmp_path: Path) -> None:
    rec = Recorder()
    cs = CSVLogger(tmp_path, name="csv")
    fit(
        _model(),
        loader(regression_data(), 16),
        [rec, GradientNormMonitor(per_parameter=True, norm_type=math.inf)],
        max_steps=3,
        logger=cs,
        log_every_n_steps=1,
    )
    data = read_csv(cs.log_dir)
    assert "normcheck/grad_norm_param/net.0.weight" in data
    for step, value in data["normcheck/grad_norm/total"].items():
        assert value > 0 and value <= rec.total[step]  # the inf-norm is at most the 2-norm


class OptRecorder(L.Callback):
    """get_total_norm of the gradients of the optimizer about to step, keyed by global step."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.total[trainer.global_step] = get_total_norm(grads).item()


class TwoOptimizers(L.LightningModule):
    """Manual optimization, GAN-style alternation of two optimizers on two sub-networks."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn_like(x))
        d_loss = self.disc(fake.detach()).mean() - self.disc(x).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = -self.disc(self.gen(torch.randn_like(x))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.SGD(self.disc.parameters(), 1e-2)]


def test_total_norm_manual_optimization_two_optimizers(tmp_path: Path) -> None:
    rec = OptRecorder()
    cs = CSVLogger(tmp_path, name="csv")
    torch.manual_seed(0)
    trainer = fit(
        TwoOptimizers(), loader(regression_data(), 16), [rec, NormCheck()], max_steps=10, logger=cs, log_every_n_steps=4
    )
    logged = read_csv(cs.log_dir)["normcheck/grad_norm/total"]
    assert sorted(logged) == sorted(rec.total) == list(range(trainer.global_step))
    for step, value in logged.items():
        assert value == pytest.approx(rec.total[step], rel=1e-5)
    data = read_csv(cs.log_dir)
    assert "normcheck/grad_norm/gen.0" in data and "normcheck/grad_norm/disc.2" in data


def test_total_norm_with_accumulation_and_frozen_layer(tmp_path: Path) -> None:
    rec = OptRecorder()
    cs = CSVLogger(tmp_path, name="csv")
    model = _model()
    model.net[0].requires_grad_(False)  # frozen: grad stays None and is skipped
    fit(
        model,
        loader(regression_data(), 8),
        [rec, NormCheck()],
        max_steps=6,
        logger=cs,
        log_every_n_steps=2,
        accumulate_grad_batches=3,
    )
    data = read_csv(cs.log_dir)
    logged = data["normcheck/grad_norm/total"]
    assert sorted(logged) == list(range(6))
    for step, value in logged.items():
        assert value == pytest.approx(rec.total[step], rel=1e-5)
    assert "normcheck/grad_norm/net.0" not in data and "normcheck/grad_norm/net.2" in data


def test_bf16_mixed_total_norm(tmp_path: Path) -> None:
    rec = OptRecorder()
    cs = CSVLogger(tmp_path, name="csv")
    fit(
        _model(),
        loader(regression_data(), 16),
        [rec, GradientNormMonitor()],
        max_steps=5,
        logger=cs,
        precision="bf16-mixed",
    )
    logged = read_csv(cs.log_dir)["normcheck/grad_norm/total"]
    assert len(logged) == 5
    for step, value in logged.items():
        assert value == pytest.approx(rec.total[step], rel=1e-5)


class _TwoOptimizers(ManualTwoOpt):
    """``ManualTwoOpt`` (manual optimization, two optimizers, schedulers) recording, independently of the
    package, each layer's update-to-weight ratio (torch optimizer step hooks) and drift from the start of fit."""

    def __init__(self) -> None:
        super().__init__()
        self.update: dict[int, dict[str, float]] = {}
        self.drift: dict[int, dict[str, float]] = {}

    def _layers(self) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        for name, p in self.named_parameters():
            out.setdefault(name.rsplit(".", 1)[0], []).append(p)
        return out

    def on_train_start(self) -> None:
        self.start = {k: [p.detach().clone() for p in ps] for k, ps in self._layers().items()}
        for opt in self.trainer.optimizers:
            opt.register_step_pre_hook(self._before)
            opt.register_step_post_hook(self._after)

    def _before(self, opt: torch.optim.Optimizer, *args: Any) -> None:
        self._snap = {k: [p.detach().clone() for p in ps] for k, ps in self._layers().items()}

    def _after(self, opt: torch.optim.Optimizer, *args: Any) -> None:
        mine = {id(p) for group in opt.param_groups for p in group["params"]}
        row = self.update.setdefault(self.trainer.global_step, {})
        for k, ps in self._layers().items():
            if all(id(p) in mine for p in ps):
                delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(ps, self._snap[k])])
                row[k] = (
                    torch.linalg.vector_norm(delta) / torch.linalg.vector_norm(torch.cat([p.flatten() for p in ps]))
                ).item()

    def on_train_batch_end(self, *args: Any) -> None:
        # after the callbacks' hook (the flush, logged at the last step of this batch): the weights it saw
        step = self.trainer.global_step - 1
        self.drift[step] = {}
        for k, ps in self._layers().items():
            diff = torch.cat([(p.detach() - s).flatten() for p, s in zip(ps, self.start[k])])
            self.drift[step][k] = (
                torch.linalg.vector_norm(diff)
                / torch.linalg.vector_norm(torch.cat([s.flatten() for s in self.start[k]]))
            ).item()


def test_update_ratio_and_drift_with_two_optimizers_match_independent_computation() -> None:
    """Each optimizer's layers get the update of that optimizer's own step; snapshot buffers are reused across
    sampled steps (every step is sampled here) and the drift scratch is shared with them."""
    from helpers import MemLogger

    logger = MemLogger()
    model = _TwoOptimizers()
    fit(
        model,
        loader(regression_data(), 8),
        [NormCheck(print_summary=False)],
        max_steps=16,
        logger=logger,
        log_every_n_steps=1,
    )
    rows = {s: r for s, r in logger.rows if any(k.startswith("normcheck/update_ratio/") for k in r)}
    assert sorted(rows) == list(range(1, 16, 2))  # one flush per batch, at its second optimizer step
    for step, row in rows.items():
        # d stepped at step - 1, g at step
        expected = {**model.update[step - 1], **model.update[step]}
        assert set(expected) == {"g.0", "g.2", "d.0", "d.2"}
        for layer, value in expected.items():
            assert row[f"normcheck/update_ratio/{layer}"] == pytest.approx(value, rel=1e-4, abs=1e-9), (step, layer)
            assert row[f"normcheck/weight_drift/{layer}"] == pytest.approx(
                model.drift[step][layer], rel=1e-4, abs=1e-7
            ), (step, layer)


def test_headline_values_reach_callback_metrics_for_early_stopping() -> None:
    """The latest total gradient norm and clip rate go to ``trainer.callback_metrics`` at each logging step, so
    EarlyStopping can monitor them (strict: it raises when the key is missing)."""
    from lightning.pytorch.callbacks import EarlyStopping

    class Probe(L.Callback):
        seen: dict[int, float] = {}

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:  # after NormCheck's flush
            value = trainer.callback_metrics.get("normcheck/grad_norm/total")
            if value is not None:
                self.seen[trainer.global_step - 1] = float(value)

    rec, probe = Recorder(), Probe()
    stop = EarlyStopping(
        monitor="normcheck/grad_norm/total", mode="min", stopping_threshold=1e9, check_on_train_epoch_end=True
    )
    trainer = fit(
        _model(),
        loader(regression_data(n=64), 16),  # 4 steps per epoch
        [rec, NormCheck(print_summary=False), probe, stop],
        max_steps=40,
        max_epochs=10,
        log_every_n_steps=2,
        gradient_clip_val=0.5,
    )
    assert trainer.current_epoch == 1 and trainer.global_step == 4  # stopped by the threshold after epoch 0
    assert sorted(probe.seen) == [0, 1, 2, 3]  # the first 20 steps are all sampled
    for step, value in probe.seen.items():
        assert value == pytest.approx(rec.total[step], rel=1e-5)
    assert 0.0 <= float(trainer.callback_metrics["normcheck/clip/rate"]) <= 1.0


def test_drift_and_update_of_many_small_layers_match_independent_computation() -> None:
    """A stack of small same-shaped layers: the weights are snapshotted and compared stacked by shape (a few
    kernels, not one per tensor); the logged ratios still equal torch.linalg on each layer."""
    torch.manual_seed(0)
    blocks = [m for _ in range(12) for m in (nn.Linear(8, 8), nn.LayerNorm(8), nn.Tanh())]
    model = LitModel(nn.Sequential(nn.Linear(8, 8), *blocks, nn.Linear(8, 1)), lr=0.05)
    rec, logger = Recorder(), MemLogger()
    trainer = fit(
        model,
        loader(regression_data(), 16),
        [rec, NormCheck(print_summary=False)],
        max_steps=12,
        logger=logger,
        log_every_n_steps=5,
    )
    cb = next(c for c in trainer.callbacks if isinstance(c, NormCheck))
    wd = next(m for m in cb._monitors if m.name == "weight_drift")
    assert wd._plan is not None and len(wd._plan.groups) == 2  # the (8, 8) weights; biases and LayerNorm's (8,)
    rows = {s: r for s, r in logger.rows if any(k.startswith("normcheck/update_ratio/") for k in r)}
    assert {0, 1, 2, 3, 5, 10} <= set(rows)
    for step, row in rows.items():
        for layer in ("net.0", "net.1", "net.2", "net.34", "net.37"):
            assert row[f"normcheck/update_ratio/{layer}"] == pytest.approx(
                rec.update[step][layer], rel=1e-4, abs=1e-9
            ), (step, layer)
            assert row[f"normcheck/weight_drift/{layer}"] == pytest.approx(
                rec.drift[step][layer], rel=1e-4, abs=1e-7
            ), (step, layer)
    assert min(rec.drift[11].values()) > 0  # the weights moved: the ratios above are not all zero
