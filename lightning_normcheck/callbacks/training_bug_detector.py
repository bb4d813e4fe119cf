"""TrainingBugDetector: plain training-loop bugs (missing zero_grad, double step, summed loss,
unaveraged accumulation, undetached RNN state)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run


class _TrainingBugs(_Monitor):
    """Plumbing: counts real optimizer steps (torch step post-hooks) and sees RNN inputs (pre-hooks).

    The checks themselves live in :mod:`lightning_normcheck.diagnosis.bugs`.
    """

    name = "training_bugs"

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.steps_this_batch = 0
        self.rnn_modules: dict[str, nn.Module] = {}

    def setup(self, run: _Run) -> None:
        self.rnn_modules = {n: m for n, m in run.pl_module.named_modules() if isinstance(m, nn.RNNBase)}

    def on_train_start(self, run: _Run) -> None:
        for opt in run.trainer.optimizers:
            self._handles.append(opt.register_step_post_hook(run.owner._guard(self, self._count_step)))

    def _count_step(self, opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.steps_this_batch += 1

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        self.steps_this_batch = 0

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class TrainingBugDetector(_NormCheckBase):
    r"""Find plain training-code bugs that no exception names.

    Args:
        log_every_n_steps: cadence of its probes, in optimizer steps (default: the Trainer's).
        print_summary: print the findings table at the end of fit.

    Example:
        >>> TrainingBugDetector()  # doctest: +ELLIPSIS
        <...TrainingBugDetector object at ...>
    """

    def __init__(self, log_every_n_steps: int | None = None, print_summary: bool = True) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary)
        self._monitors = [_make_monitor(type(self).__name__)]


def _make_monitor(owner: str) -> _TrainingBugs:
    return _TrainingBugs()


__all__ = ["TrainingBugDetector"]

_ = Tensor
