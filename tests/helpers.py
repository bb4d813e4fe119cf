"""Small real Lightning models and a one-call ``fit`` for the tests (CPU, seconds)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance.*LeafSpec.*")


def regression_data(n: int = 256, d: int = 8, seed: int = 0, noise: float = 0.1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + noise * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def classification_data(n: int = 256, d: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, classes, generator=g)).argmax(1)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=0)


def mlp(
    d_in: int = 8, width: int = 32, depth: int = 3, d_out: int = 1, act: type[nn.Module] = nn.ReLU
) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class LitModel(L.LightningModule):
    """A LightningModule around any ``net`` with a configurable loss and optimizer."""

    def __init__(
        self,
        net: nn.Module,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lr: float = 0.01,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.net = net
        self.loss_fn = loss or nn.functional.mse_loss
        self.lr = lr
        self.optimizer_name = optimizer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return self.loss_fn(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def trainer(callbacks: list[Any], max_steps: int = 20, **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return L.Trainer(callbacks=callbacks, **defaults)


def fit(
    model: L.LightningModule, data: DataLoader, callbacks: list[Any], max_steps: int = 20, seed: int = 0, **kwargs: Any
) -> L.Trainer:
    L.seed_everything(seed, verbose=False)
    t = trainer(callbacks, max_steps=max_steps, **kwargs)
    t.fit(model, data)
    return t


def bad(findings: list[Any]) -> list[Any]:
    """Findings of severity warning or error (what a healthy run must not have)."""
    return [f for f in findings if f.severity in ("warning", "error")]


def codes(findings: list[Any]) -> set[str]:
    return {f.code for f in bad(findings)}


class MemLogger(Logger):
    """Keeps every ``log_metrics`` call in memory."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "mem"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((int(step or 0), dict(metrics)))

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def keys(self) -> set[str]:
        return {k for _, row in self.rows for k in row}


class ManualTwoOpt(L.LightningModule):
    """Manual optimization, two optimizers, two schedulers (a GAN-shaped loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()  # type: ignore[misc]
        loss_d = (self.d(x) - 1).pow(2).mean() + self.d(self.g(x).detach()).pow(2).mean()
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = (self.d(self.g(x)) - 1).pow(2).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()
        for s in self.lr_schedulers():  # type: ignore[union-attr]
            s.step()

    def configure_optimizers(self) -> Any:
        og = torch.optim.Adam(self.g.parameters(), lr=1e-3)
        od = torch.optim.SGD(self.d.parameters(), lr=1e-2, momentum=0.9)
        return [og, od], [torch.optim.lr_scheduler.StepLR(og, 3), torch.optim.lr_scheduler.StepLR(od, 3)]
