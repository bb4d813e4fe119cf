"""ClipRateTracker: how often, and by how much, the pre-clip gradient exceeds the clipping threshold."""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._args import _check_choice, _check_float, _check_int, _check_type
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.diagnosis.records import ClipWindow, Record
from lightning_normcheck.diagnosis.thresholds import Thresholds

#: ``high_clip_rate``'s default: the clipping thresholds' own (``ClipThresholds().high_rate``).
DEFAULT_HIGH_CLIP_RATE = 0.5
#: The latest steps whose clip fraction says whether clipping still acts now (not only early in the window).
RECENT_STEPS = 5


class _ClipRate(_Monitor):
    name = "clip_rate"

    def __init__(self, clip_threshold: float | None, clip_algorithm: str | None, window: int) -> None:
        self.clip_threshold = clip_threshold
        self.clip_algorithm = clip_algorithm
        self.window = window
        self.threshold: float | None = None
        self.algorithm = "norm"
        self._clipped: Tensor | None = None  # ring buffer of 0/1 per optimizer step
        self._ratio: Tensor | None = None  # ring buffer of pre-clip measure / threshold
        self._pos = 0
        self._filled = 0
        self._pending: list[Tensor] = []  # pre-clip measures not yet written into the ring buffers
        self._staged = 0  # steps in the window when staged

    def setup(self, run: _Run) -> None:
        trainer = run.trainer
        self.threshold = self.clip_threshold
        if self.threshold is None and trainer.gradient_clip_val:
            self.threshold = float(trainer.gradient_clip_val)
        algo = getattr(trainer, "gradient_clip_algorithm", None)  # a GradClipAlgorithmType: str() is its name
        self.algorithm = self.clip_algorithm or str(getattr(algo, "value", algo) or "norm")
        self._clipped = None
        self._pos = self._filled = 0
        self._pending = []

    def describe(self) -> dict[str, Any]:
        if self.threshold is None:
            return {}
        return {"clip": {"threshold": self.threshold, "algorithm": self.algorithm, "window": self.window}}

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        if self.threshold is None:
            return
        stats = run.grad_stats(optimizer)
        if self.algorithm == "value":  # clip_grad_value_ acts when any |g| exceeds the value
            measure = N.tensor_norms(stats.grads, float("inf")).amax() if stats.grads else stats.total
        else:
            measure = stats.total
        # hot path: keep a reference only; the ring buffers are written in one go at the next flush
        self._pending.append(measure)
        if len(self._pending) >= self.window:
            self._drain()

    def _drain(self) -> None:
        """Write the pending measures into the ring buffers (device ops only: no host sync)."""
        if not self._pending or self.threshold is None:
            return
        pending, self._pending = self._pending, []
        ratios = torch.stack([m.reshape(()).float() for m in pending]) / self.threshold
        device = ratios.device
        if self._clipped is None or self._ratio is None:
            self._clipped = torch.zeros(self.window, device=device)
            self._ratio = torch.zeros(self.window, device=device)
        elif self._clipped.device != device:  # restored from a checkpoint on the CPU
            self._clipped, self._ratio = self._clipped.to(device), self._ratio.to(device)
        kept = ratios[-self.window :]
        first = self._pos + len(pending) - kept.numel()  # ring position of kept[0]
        index = torch.tensor([(first + j) % self.window for j in range(kept.numel())], device=device)
        self._clipped.index_copy_(0, index, (kept > 1.0).float())
        self._ratio.index_copy_(0, index, kept)
        self._pos += len(pending)
        self._filled = min(self._filled + len(pending), self.window)

    def collect(self, run: _Run) -> None:
        self._drain()
        self._staged = 0
        if self._clipped is None or self._filled == 0 or self._ratio is None:
            return
        n = self._staged = self._filled
        clipped = self._clipped[:n]
        mean_excess = (self._ratio[:n] * clipped).sum() / clipped.sum().clamp_min(1.0)
        k = min(n, RECENT_STEPS)  # the latest steps: still clipping now, or only early in the window?
        last = torch.tensor([(self._pos - 1 - j) % self.window for j in range(k)], device=clipped.device)
        recent = self._clipped.index_select(0, last).mean()
        run.stage((self.name, "stats"), torch.stack([clipped.mean(), mean_excess, recent]))

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if not self._staged or self.threshold is None:
            return []
        rate, excess, recent = host[(self.name, "stats")]
        return [
            ClipWindow(run.flush_step, self.threshold, self.algorithm, rate, excess, self._staged, recent, self.window)
        ]

    def state_dict(self) -> dict[str, Any]:
        self._drain()
        return {
            "clipped": None if self._clipped is None else self._clipped.cpu(),
            "ratio": None if self._ratio is None else self._ratio.cpu(),
            "pos": self._pos,
            "filled": self._filled,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("clipped") is not None and len(state["clipped"]) == self.window:
            self._clipped, self._ratio = state["clipped"], state["ratio"]
            self._pos, self._filled = int(state.get("pos", 0)), int(state.get("filled", 0))


class ClipRateTracker(_NormCheckBase):
    r"""Track the fraction of optimizer steps whose pre-clip gradient exceeded the clipping threshold.

    The threshold is the Trainer's ``gradient_clip_val`` (with ``gradient_clip_algorithm``) unless
    ``clip_threshold`` is given, as when you clip by hand in ``configure_gradient_clipping`` or a manual
    loop. For ``"norm"`` a step counts as clipped when the total gradient norm exceeds the threshold;
    for ``"value"`` when any gradient entry does. The rate is over a sliding window of the last
    ``clip_window`` optimizer steps, kept on the device. Without a threshold the tracker measures nothing.
    Lightning's clip by norm then uses the total measured here (bit for bit the one it would compute) instead
    of computing it again.

    Args:
        log_every_n_steps: logging cadence in optimizer steps (default: the Trainer's).
        clip_threshold: the clipping threshold when it is not the Trainer's ``gradient_clip_val``.
        clip_algorithm: ``"norm"`` or ``"value"`` (default: the Trainer's, else ``"norm"``).
        clip_window: the number of optimizer steps the rate is computed over.
        high_clip_rate: a rate above this over a full window is reported as ``high_clip_rate``.
        print_summary: print the findings table at the end of fit.
        thresholds: the thresholds of the rules (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`);
            ``high_clip_rate``, when given, sets ``thresholds.clipping.high_rate``.

    Example:
        >>> ClipRateTracker(clip_threshold=1.0, clip_window=100)  # doctest: +ELLIPSIS
        <...ClipRateTracker object at ...>

    ======================================  ===========================================================
    Key                                     Value
    ======================================  ===========================================================
    ``normcheck/clip/rate``                 fraction of the window's steps whose gradient was clipped
    ``normcheck/clip/mean_excess``          mean pre-clip norm / threshold over those clipped steps
    ======================================  ===========================================================
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        clip_threshold: float | None = None,
        clip_algorithm: Literal["norm", "value"] | None = None,
        clip_window: int = 50,
        high_clip_rate: float = DEFAULT_HIGH_CLIP_RATE,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        monitor = _make_monitor(
            type(self).__name__, clip_threshold=clip_threshold, clip_algorithm=clip_algorithm, clip_window=clip_window
        )
        thresholds = with_clip_rate(type(self).__name__, thresholds, high_clip_rate)
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary, thresholds=thresholds)
        self._monitors = [monitor]


def _make_monitor(owner: str, clip_threshold: float | None, clip_algorithm: str | None, clip_window: int) -> _ClipRate:
    _check_float(owner, "clip_threshold", clip_threshold, low=0.0, allow_none=True)
    if clip_algorithm is not None:
        _check_choice(owner, "clip_algorithm", clip_algorithm, ("norm", "value"))
    _check_int(owner, "clip_window", clip_window, 1)
    threshold = None if clip_threshold is None else float(clip_threshold)
    return _ClipRate(threshold, clip_algorithm, clip_window)


def with_clip_rate(owner: str, thresholds: Thresholds | None, high_clip_rate: float) -> Thresholds:
    """``thresholds`` with ``clipping.high_rate`` set from the ``high_clip_rate`` argument when that is not
    its default (the argument is the short way to set that one threshold)."""
    _check_type(owner, "thresholds", thresholds, Thresholds)
    _check_float(owner, "high_clip_rate", high_clip_rate, low=0.0, high=1.0)
    th = thresholds if thresholds is not None else Thresholds()
    if float(high_clip_rate) == DEFAULT_HIGH_CLIP_RATE:
        return th
    return dataclasses.replace(th, clipping=dataclasses.replace(th.clipping, high_rate=float(high_clip_rate)))


__all__ = ["ClipRateTracker"]
