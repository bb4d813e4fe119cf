"""Run by tests/test_distributed_stats.py: 2-process DDP on CPU (gloo), two fits in one launch. Each rank writes
what it saw to rank<r>.json.

- ``shard``: rank 0's inputs are all negative, so every unit of ``act`` (a ReLU after a Linear with positive
  weights and no bias) stays at 0 on rank 0 and fires on rank 1; column 3 holds raw values in the thousands on
  rank 1 only; ``extra`` (a ReLU) runs on rank 1 only. The learning rate is 0: nothing changes during the fit.
- ``healthy``: a small regression MLP whose rank-1 inputs are 1.5 times larger; forward hooks record, on each
  rank, the sum of squares and the element count of every module's output (and of the model input) at each step.

The test imports this file too: :func:`fit_shard` with ``devices=1`` is the one-process control (rank 0's data).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import LitModel, MemLogger  # noqa: E402

from lightning_normcheck import NormCheck  # noqa: E402


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _trainer(devices: int, logger: MemLogger, callbacks: list[Any], max_steps: int, every: int) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        max_steps=max_steps,
        log_every_n_steps=every,
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
    )


def _codes(cb: NormCheck) -> list[str]:
    return sorted({f.code for f in cb.findings if f.severity != "info"})


# -- shard: what one rank sees alone is not the global batch ------------------------------------------------------
class ShardData(Dataset):
    def __init__(self, n: int = 256) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g).abs()
        self.y = torch.randn(n, 1, generator=g)
        self.big = 5000.0 + 100.0 * torch.rand(n, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i].clone()
        if rank() == 1:
            x[3] = self.big[i]  # a raw feature, on rank 1 only
        else:
            x = -x  # rank 0: every pre-activation of `act` is negative
        return x, self.y[i]


class ShardModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        with torch.no_grad():
            self.fc.weight.abs_()
            self.fc.bias.zero_()
        self.act = nn.ReLU()
        self.extra = nn.ReLU()
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        if rank() == 1:
            h = self.extra(h)  # a module that runs on one rank only
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit_shard(devices: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    logger, cb = MemLogger(), NormCheck(print_summary=False)
    trainer = _trainer(devices, logger, [cb], max_steps=8, every=2)
    trainer.fit(ShardModel(), DataLoader(ShardData(), batch_size=16, shuffle=False))
    return {"codes": _codes(cb), "rows": logger.rows, "disabled": cb.disabled_monitors}


# -- healthy: a run that learns; the logged RMS is checked against forward hooks ------------------------------------
class HealthyData(Dataset):
    def __init__(self, n: int = 960) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 8, generator=g)
        self.w = torch.randn(8, 1, generator=g) / 3
        self.noise = 0.05 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.x[i] * (1.5 if rank() == 1 else 1.0)
        return x, x @ self.w + self.noise[i]


def _stats(t: torch.Tensor) -> tuple[float, int, float, int]:
    """Sum of squares (float64), element count, max |x|, and the count within 0.01 of +-1 (a saturated tanh at the
    default ``saturation_threshold=0.99``)."""
    t = t.detach().double()
    return float(t.square().sum()), t.numel(), float(t.abs().max()), int((t.abs() >= 0.99).sum())


class Recorder(L.Callback):
    """Per step, :func:`_stats` of each leaf module's output and of the model input, from the training forward
    (the loss probe's forwards run without gradients), and the loss."""

    def __init__(self) -> None:
        self.sums: dict[str, dict[int, tuple[float, int, float, int]]] = {}
        self.losses: dict[int, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, module in pl_module.named_modules():
            if name and not any(True for _ in module.children()):
                module.register_forward_hook(self._hook(trainer, name))

    def _hook(self, trainer: L.Trainer, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            step = trainer.global_step
            self.sums.setdefault(name, {})[step] = _stats(output)
            if name == "net.0":
                self.sums.setdefault("<input>", {})[step] = _stats(inputs[0])

        return hook

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        self.losses[trainer.global_step - 1] = float(outputs["loss"])


def fit_healthy(devices: int) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    logger, cb, rec = MemLogger(), NormCheck(print_summary=False), Recorder()
    trainer = _trainer(devices, logger, [rec, cb], max_steps=30, every=5)
    trainer.fit(LitModel(net, lr=0.05), DataLoader(HealthyData(), batch_size=16, shuffle=False))
    return {
        "codes": _codes(cb),
        "rows": logger.rows,
        "disabled": cb.disabled_monitors,
        "sums": rec.sums,
        "losses": rec.losses,
    }


def main(out_dir: str) -> None:
    result = {"shard": fit_shard(2), "healthy": fit_healthy(2)}
    from ddp_run import finish  # this folder is on sys.path when run as a script

    finish(os.path.join(out_dir, f"rank{rank()}.json"), result)


if __name__ == "__main__":
    main(sys.argv[1])
