"""A small real model and data module for trying lightning_normcheck (used by ``normcheck-demo``).

The data is synthetic (made on the fly, nothing downloaded): a regression target that is a smooth
nonlinear function of the inputs. The model is an MLP whose depth, width, activation, init scale, loss
reduction and learning rate are arguments, so a YAML file can plant a pathology in one line.

Example:
    >>> import lightning as L
    >>> model = DemoModel(depth=2, width=16)
    >>> data = DemoDataModule(num_samples=64, batch_size=16)
    >>> trainer = L.Trainer(max_steps=2, logger=False, enable_progress_bar=False,
    ...                     enable_model_summary=False, enable_checkpointing=False)
    >>> trainer.fit(model, data)
    >>> trainer.global_step
    2
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


class DemoDataModule(L.LightningDataModule):
    """Synthetic regression data: ``y = sin(x @ a) + 0.5 * (x @ b) + noise``, scaled by ``label_scale``.

    Args:
        num_samples: number of training samples.
        num_features: input dimension.
        batch_size: batch size of the training loader.
        label_scale: multiply the targets by this (1e4 plants a label-scale problem).
        seed: seed of the generator that makes the data.
    """

    def __init__(
        self,
        num_samples: int = 2048,
        num_features: int = 16,
        batch_size: int = 32,
        label_scale: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.num_samples = num_samples
        self.num_features = num_features
        self.batch_size = batch_size
        self.label_scale = label_scale
        self.seed = seed
        self._train: TensorDataset | None = None
        self._val: TensorDataset | None = None

    def _make(self, n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.num_features, generator=g)
        a = torch.randn(self.num_features, 1, generator=torch.Generator().manual_seed(self.seed + 1))
        b = torch.randn(self.num_features, 1, generator=torch.Generator().manual_seed(self.seed + 2))
        y = torch.sin(x @ a / math.sqrt(self.num_features)) + 0.5 * (x @ b) / math.sqrt(self.num_features)
        y = (y + 0.05 * torch.randn(n, 1, generator=g)) * self.label_scale
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        self._train = self._make(self.num_samples, self.seed)
        self._val = self._make(max(self.num_samples // 8, self.batch_size), self.seed + 100)

    def train_dataloader(self) -> DataLoader:
        assert self._train is not None
        return DataLoader(self._train, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        assert self._val is not None
        return DataLoader(self._val, batch_size=self.batch_size, num_workers=0)


class DemoModel(L.LightningModule):
    """An MLP regressor with knobs that plant the pathologies lightning_normcheck explains.

    Args:
        num_features: input dimension (match the data module).
        depth: number of hidden layers.
        width: hidden width.
        activation: ``relu``, ``tanh``, ``sigmoid`` or ``gelu``.
        init_std: if set, every Linear weight is drawn from N(0, init_std^2) (``None``: PyTorch's default).
        loss_reduction: ``mean`` (correct) or ``sum`` (a bug: gradients grow with the batch size).
        lr: learning rate.
        optimizer: ``adam`` or ``sgd``.
    """

    def __init__(
        self,
        num_features: int = 16,
        depth: int = 4,
        width: int = 64,
        activation: Literal["relu", "tanh", "sigmoid", "gelu"] = "relu",
        init_std: float | None = None,
        loss_reduction: Literal["mean", "sum"] = "mean",
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d = num_features
        for _ in range(depth):
            layers += [nn.Linear(d, width), _ACTIVATIONS[activation]()]
            d = width
        layers.append(nn.Linear(d, 1))
        self.net = nn.Sequential(*layers)
        if init_std is not None:
            for m in self.net:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=init_std)
                    nn.init.zeros_(m.bias)
        self.loss_fn = nn.MSELoss(reduction=loss_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.loss_fn(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp["optimizer"] == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp["lr"])
        return torch.optim.Adam(self.parameters(), lr=hp["lr"])


__all__ = ["DemoDataModule", "DemoModel"]
