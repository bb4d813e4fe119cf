"""Run by tests/test_clip_reuse.py: 2-process DDP on CPU (gloo) with gradient clipping by norm, with or without
NormCheck (argv[2]: "plain" or "normcheck"). Each rank saves its final weights and counts who clipped."""

from __future__ import annotations

import os
import sys
from typing import Any

import lightning as L
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_run import finish  # noqa: E402
from helpers import LitModel, loader, regression_data  # noqa: E402

from lightning_normcheck import NormCheck  # noqa: E402

STEPS = 8


def main(out_dir: str, mode: str) -> None:
    counts = {"clip_grad_norm_": 0, "clip_grads_with_norm_": 0}
    totals: list[float] = []
    utils = torch.nn.utils
    own, with_norm = utils.clip_grad_norm_, utils.clip_grads_with_norm_

    def own_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        counts["clip_grad_norm_"] += 1
        total = own(*args, **kwargs)
        totals.append(float(total))
        return total

    def with_norm_spy(*args: Any, **kwargs: Any) -> None:
        counts["clip_grads_with_norm_"] += 1
        with_norm(*args, **kwargs)

    utils.clip_grad_norm_, utils.clip_grads_with_norm_ = own_spy, with_norm_spy  # type: ignore[assignment]
    L.seed_everything(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))
    model = LitModel(net, lr=0.05)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=STEPS,
        gradient_clip_val=0.2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[NormCheck(print_summary=False)] if mode == "normcheck" else [],
    )
    trainer.fit(model, loader(regression_data(n=256), 16))
    rank = trainer.global_rank
    torch.save(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, os.path.join(out_dir, f"{mode}{rank}.pt")
    )
    installed = "clip_grad_by_norm" in vars(trainer.precision_plugin)
    finish(os.path.join(out_dir, f"{mode}{rank}.json"), {**counts, "totals": totals, "left_installed": installed})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
