"""Run by tests/test_distributed.py: 2-process DDP on CPU (gloo). Each rank writes what it saw."""

from __future__ import annotations

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn.utils import get_total_norm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import LitModel, loader, regression_data  # noqa: E402

from lightning_normcheck import NormCheck  # noqa: E402


class Rec(L.Callback):
    def __init__(self) -> None:
        self.total: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.total[trainer.global_step] = get_total_norm(grads).item()


def main(out_dir: str) -> None:
    L.seed_everything(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    rec, cb = Rec(), NormCheck()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        log_every_n_steps=2,
        logger=CSVLogger(out_dir, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[rec, cb],
    )
    trainer.fit(LitModel(net, lr=0.01), loader(regression_data(n=256), 16))
    result = {
        "total": rec.total,
        "findings": [x.code for x in cb.findings if x.severity != "info"],
        "reported": cb._findings.enabled,
    }
    finish(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), result)


def finish(path: str, result: dict) -> None:  # type: ignore[type-arg]
    """Write this rank's result, tear the process group down and leave without the interpreter's exit-time
    teardown. Left to exit, gloo's threads can abort the process ("terminate called without an active
    exception", exit code -6) after a successful fit: ``std::terminate`` from a C++ object destroyed while its
    thread is still joinable; ``os._exit`` runs no atexit handlers and no C++ static destructors
    (https://docs.python.org/3/library/os.html#os._exit). Everything the run produced is written and closed
    before (this file; loggers close their files at the end of fit). The other multi-process scripts end the
    same way."""
    with open(path, "w") as f:
        json.dump(result, f)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
