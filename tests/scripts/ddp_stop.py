"""Run by tests/test_guard.py: 2-process DDP on CPU (gloo) with NormCheck(stop_on="warning"). Only rank 1's shard
of each batch holds a raw feature in the thousands (input_scale on rank 1 only); both ranks must stop together."""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import LitModel  # noqa: E402

from lightning_normcheck import NormCheck  # noqa: E402


def main(out_dir: str) -> None:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 8, generator=g)
    y = x.sum(1, keepdim=True) / 3
    big = 5000.0 + 100.0 * torch.rand(640, generator=g)

    class RankData(TensorDataset):
        """Rank 1 reads column 3 as raw values in the thousands; rank 0 reads it standardized."""

        def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
            xi, yi = super().__getitem__(i)
            if torch.distributed.get_rank() == 1:
                xi = xi.clone()
                xi[3] = big[i]
            return xi, yi

    data = DataLoader(RankData(x, y), batch_size=16, shuffle=False)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    cb = NormCheck(stop_on="warning", print_summary=False)
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
    trainer.fit(LitModel(net, lr=1e-6), data)
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(
            {
                "codes": [x.code for x in cb.findings if x.severity != "info"],
                "messages": [x.message for x in cb.findings if x.severity != "info"],
                "global_step": trainer.global_step,
                "stopped_by": cb.stopped_by.code if cb.stopped_by else None,
            },
            f,
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
