"""Run by tests/test_guard.py: 2-process DDP on CPU (gloo) with NormCheck(stop_on="error"). Only rank 1 forgets
``opt.zero_grad()`` (a loop bug on one rank: only rank 1 sees missing_zero_grad); both ranks must stop together."""

from __future__ import annotations

import os
import sys

import lightning as L
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddp_run import finish  # noqa: E402  (this folder is on sys.path when run as a script)
from helpers import LitModel, loader, regression_data  # noqa: E402

from lightning_normcheck import NormCheck  # noqa: E402


class OneRankBug(LitModel):
    def __init__(self) -> None:
        super().__init__(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)), lr=0.01)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        opt = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        if self.global_rank == 0:
            opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def main(out_dir: str) -> None:
    L.seed_everything(0)
    cb = NormCheck(stop_on="error", print_summary=False)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=40,
        log_every_n_steps=5,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[cb],
    )
    trainer.fit(OneRankBug(), loader(regression_data(n=1280), 16))
    result = {
        "codes": [x.code for x in cb.findings if x.severity != "info"],
        "global_step": trainer.global_step,
        "stopped_by": cb.stopped_by.code if cb.stopped_by else None,
    }
    finish(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), result)


if __name__ == "__main__":
    main(sys.argv[1])
