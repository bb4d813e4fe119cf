"""Run by tests/test_fsdp2.py: 2-process FSDP2 (``fully_shard`` under Lightning's ModelParallelStrategy) on CPU
(gloo). Each rank writes what it measured from the full tensors (``DTensor.full_tensor()``) next to what NormCheck
logged; two fits in the same processes: 32-bit, then bf16-mixed with a sparser logging cadence."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.nn.utils import get_total_norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import loader, regression_data  # noqa: E402

import lightning_normcheck.norms as N  # noqa: E402
from lightning_normcheck import NormCheck  # noqa: E402

TOTAL = "normcheck/grad_norm/total"


class FSDP2Model(L.LightningModule):
    """A 3-Linear MLP, each Linear and the whole net sharded with FSDP2 over the data-parallel mesh."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        assert self.device_mesh is not None  # built by the strategy: (data_parallel=2, tensor_parallel=1)
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _layers(module: nn.Module) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, p in module.named_parameters():
        out.setdefault(name.rsplit(".", 1)[0], []).append(p)
    return out


@torch.no_grad()
def _data_loss(pl_module: L.LightningModule) -> float:
    x, y = regression_data(n=256).tensors
    return nn.functional.mse_loss(pl_module.net(x), y).item()  # type: ignore[operator]


class FullTensors(L.Callback):
    """The truth, from gathered full tensors (the test may gather; the package must not)."""

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type
        self.total: dict[int, float] = {}
        self.grad: dict[int, dict[str, float]] = {}
        self.weight: dict[int, dict[str, float]] = {}
        self.drift: dict[int, dict[str, float]] = {}
        self.update: dict[int, dict[str, float]] = {}
        self.loss: dict[int, float] = {}
        self.headline: dict[int, float] = {}  # trainer.callback_metrics after NormCheck's flush, on this rank
        self.data_loss: list[float] = []  # the loss on the whole data set at the start and at the end of fit
        self._start: dict[str, list[torch.Tensor]] = {}
        self._before: dict[str, list[torch.Tensor]] = {}

    @staticmethod
    def _full(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.full_tensor().detach().clone() for t in ts]  # type: ignore[attr-defined]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        assert all(N.is_dtensor(p) for p in pl_module.parameters()), "the parameters are not sharded"
        self._start = {k: self._full(v) for k, v in _layers(pl_module).items()}
        self.data_loss.append(_data_loss(pl_module))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.data_loss.append(_data_loss(pl_module))

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        self.loss[trainer.global_step] = float(loss.detach())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        grads = [p.grad.full_tensor() for p in pl_module.parameters() if p.grad is not None]  # type: ignore[attr-defined]
        self.total[step] = get_total_norm(grads, self.norm_type).item()
        self.grad[step] = {
            k: get_total_norm([p.grad.full_tensor() for p in v], self.norm_type).item()  # type: ignore[union-attr]
            for k, v in _layers(pl_module).items()
        }
        self._before = {k: self._full(v) for k, v in _layers(pl_module).items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step - 1
        now = {k: self._full(v) for k, v in _layers(pl_module).items()}
        self.weight[step] = {k: get_total_norm(v).item() for k, v in now.items()}
        self.drift[step] = {
            k: (get_total_norm([a - b for a, b in zip(v, self._start[k])]) / get_total_norm(self._start[k])).item()
            for k, v in now.items()
        }
        self.update[step] = {
            k: (get_total_norm([a - b for a, b in zip(v, self._before[k])]) / get_total_norm(v)).item()
            for k, v in now.items()
        }


class Headline(L.Callback):
    """After NormCheck: the total norm it put in ``callback_metrics`` (every rank: reduced, so the same)."""

    def __init__(self, into: FullTensors) -> None:
        self.into = into

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        value = trainer.callback_metrics.get(TOTAL)
        if value is not None:
            self.into.headline[trainer.global_step - 1] = float(value)


def fit(
    out_dir: str,
    name: str,
    precision: str,
    every: int,
    steps: int,
    norm_type: float = 2.0,
    extra: list[L.Callback] | None = None,
) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    truth, cb = FullTensors(norm_type), NormCheck(log_every_n_steps=every, norm_type=norm_type)
    calls: list[int] = []  # the global step of each sharded-norm reduction (a collective) NormCheck made
    reduce = N.all_reduce_partials

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(int(trainer.global_step))
        return reduce(*args, **kwargs)

    N.all_reduce_partials = counted  # type: ignore[assignment]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        precision=precision,  # type: ignore[arg-type]
        max_steps=steps,
        log_every_n_steps=every,
        logger=CSVLogger(out_dir, name=name, version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[truth, cb, Headline(truth), *(extra or [])],
    )
    try:
        trainer.fit(FSDP2Model(), loader(regression_data(n=256), 16, shuffle=True))
    finally:
        N.all_reduce_partials = reduce  # type: ignore[assignment]
    return {
        "total": truth.total,
        "grad": truth.grad,
        "weight": truth.weight,
        "drift": truth.drift,
        "update": truth.update,
        "loss": truth.loss,
        "data_loss": truth.data_loss,
        "headline": truth.headline,
        "calls": calls,
        "findings": [f"{f.severity} {f.code} {f.layer}" for f in cb.findings if f.severity != "info"],
        "disabled": cb.disabled_monitors,
        "reported": cb._findings.enabled,
        "rank": trainer.global_rank,
    }


def _fails_on_one_rank(out_dir: str) -> dict[str, Any]:
    """Rank 1 alone fails to measure: its gradients at step 2, its weight drift at step 4. No rank may be left
    waiting in a collective: both switch the monitor off at the same flush and training goes on."""
    from lightning_normcheck.callbacks import _run

    grad_stats, drift_norms = _run._Run.grad_stats, N.drift_norms
    if torch.distributed.get_rank() == 1:

        def bad_grad_stats(self: Any, optimizer: Any) -> Any:
            if self.step == 2:
                raise RuntimeError("injected gradient failure")
            return grad_stats(self, optimizer)

        def bad_drift_norms(*args: Any, **kwargs: Any) -> Any:
            if calls_at[0] >= 4:
                raise RuntimeError("injected drift failure")
            return drift_norms(*args, **kwargs)

        calls_at = [0]
        _run._Run.grad_stats = bad_grad_stats  # type: ignore[method-assign]
        N.drift_norms = bad_drift_norms  # type: ignore[assignment]

        class Step(L.Callback):
            def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
                calls_at[0] = trainer.global_step

        extra: list[L.Callback] = [Step()]
    else:
        extra = []
    try:
        return fit(out_dir, "fail", "32-true", every=1, steps=7, extra=extra)
    finally:
        _run._Run.grad_stats = grad_stats  # type: ignore[method-assign]
        N.drift_norms = drift_norms  # type: ignore[assignment]


def _partial_is_refused() -> str:
    """A DTensor with a Partial placement holds summands: its norm cannot come from the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (2,))
    try:
        N.ShardRoutes([DTensor.from_local(torch.ones(3), mesh, [Partial()])])
    except ValueError as err:
        return str(err)
    return ""


def main(out_dir: str) -> None:
    result: dict[str, Any] = {
        "fp32": fit(out_dir, "fp32", "32-true", every=1, steps=24),
        "bf16": fit(out_dir, "bf16", "bf16-mixed", every=5, steps=26),
        # max-reduced gradient norms next to sum-reduced weight norms: one all_gather reduced both ways
        "inf": fit(out_dir, "inf", "32-true", every=1, steps=4, norm_type=float("inf")),
        "partial": _partial_is_refused(),
        "fail": _fails_on_one_rank(out_dir),
    }
    rank = result["fp32"]["rank"]
    from ddp_run import finish  # this folder is on sys.path when run as a script

    finish(os.path.join(out_dir, f"rank{rank}.json"), result)


if __name__ == "__main__":
    main(sys.argv[1])
