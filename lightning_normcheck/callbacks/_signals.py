"""Monitors for data and first-step causes: the scale of the batch (inputs and regression targets) and
intermittent spikes of the total gradient norm, plus info-level training hygiene hints.

:class:`_BatchScale` looks at the float tensors of the batch on sampled steps only (a handful of
reductions per tensor, queued for the flush; integer tensors such as token ids or class labels are not
features and are skipped). :class:`_GradientSpikes` reads the per-step total gradient norms that the
gradient monitor queues anyway, on the host at each flush; it costs nothing on the device. The decisions
are in :mod:`lightning_normcheck.diagnosis.data`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._base import _Monitor, _Run
from lightning_normcheck.diagnosis.records import (
    BatchSample,
    FeatureStat,
    InputScale,
    Record,
    RunInfo,
    StepBatches,
    TargetScale,
)

#: Batch keys taken as the regression target in a dict batch.
TARGET_NAMES = ("y", "target", "targets", "label", "labels", "y_true", "score", "scores", "value", "values")
#: At most this many float tensors of one batch are measured (a batch is rarely wider).
MAX_TENSORS = 8
#: Features listed per tensor (the largest by max |x|).
TOP_K = 3
#: Step -> batch index entries kept for the spike report (flushes are at most this far apart).
MAX_BATCH_MAP = 20000


def _walk(batch: Any, name: str, depth: int, out: list[tuple[str, str, Tensor]]) -> None:
    """Collect the floating-point tensors of a batch as (display name, key label, tensor)."""
    if len(out) >= MAX_TENSORS or depth > 3:
        return
    if isinstance(batch, Tensor):
        if batch.is_floating_point() and batch.layout == torch.strided and batch.numel() > 0:
            label = name[len("batch") :].strip("[]'.").replace("][", ".").replace("'", "") or "batch"
            out.append((name, label, batch))
        return
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        for fld in dataclasses.fields(batch):
            _walk(getattr(batch, fld.name, None), f"{name}.{fld.name}", depth + 1, out)
    elif isinstance(batch, Mapping):
        for k, v in batch.items():
            _walk(v, f"{name}[{k!r}]", depth + 1, out)
    elif isinstance(batch, (tuple, list)):
        for i, v in enumerate(batch):
            _walk(v, f"{name}[{i}]", depth + 1, out)


def _guess_target(batch: Any) -> tuple[Tensor | None, str]:
    """The tensor that looks like the regression target, and why (``None`` when nothing does)."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = {fld.name: getattr(batch, fld.name, None) for fld in dataclasses.fields(batch)}
    if isinstance(batch, Mapping):
        for k, v in batch.items():
            if isinstance(k, str) and k.lower() in TARGET_NAMES and isinstance(v, Tensor):
                return (v, f"batch key {k!r}") if v.is_floating_point() else (None, "")
        return None, ""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        last, first = batch[-1], batch[0]
        if isinstance(last, Tensor) and isinstance(first, Tensor) and last.is_floating_point():
            if last.ndim >= 1 and first.ndim >= 1 and last.shape[0] == first.shape[0]:
                return last, "the last tensor of the batch tuple"
    return None, ""


def _task_of(batch: Any) -> str:
    """``classification`` when the batch's labels are integers, ``regression`` when a float target is found."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = {fld.name: getattr(batch, fld.name, None) for fld in dataclasses.fields(batch)}
    labels: Any = None
    if isinstance(batch, Mapping):
        labels = next((v for k, v in batch.items() if isinstance(k, str) and k.lower() in TARGET_NAMES), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[-1]
    if not isinstance(labels, Tensor):
        return ""
    if labels.dtype == torch.bool or not (labels.is_floating_point() or labels.is_complex()):
        return "classification"
    return "regression"


class _BatchScale(_Monitor):
    """On sampled steps: per-feature scale of the float inputs, scale of the regression target, the loss.

    Measured in ``on_train_batch_start`` (the batch as the model gets it) and ``on_before_backward`` (the
    loss), staged for the logging step of the same step and handed over as one :class:`BatchSample`.
    """

    name = "batch_scale"

    def __init__(self, input_scale: float) -> None:
        self.input_scale = input_scale  # features above it are counted (DataThresholds.input_scale)
        self._meta: dict[str, tuple[str, str, int, int]] = {}  # label -> (display, axis, n_features, ndim)
        self._target: tuple[str, str, str] | None = None  # (label, display, why)
        self._step = -1
        self._task = ""
        self._stats: dict[Hashable, Tensor] = {}
        self.normalized_by: str | None = None

    def setup(self, run: _Run) -> None:
        self.normalized_by = None
        self._task = ""
        for name, module in run.pl_module.named_modules():
            if next(module.children(), None) is not None or not any(True for _ in module.parameters(False)):
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.normalized_by = f"{name} ({type(module).__name__})"
            break  # the first leaf module with parameters

    def run_info(self, run: _Run, info: RunInfo) -> RunInfo:
        return dataclasses.replace(info, normalized_by=self.normalized_by)

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if run.probing or not run.is_due(step):
            return
        if step != self._step:
            self._meta, self._stats, self._target, self._step = {}, {}, None, step
        self._task = self._task or _task_of(batch)
        target, why = _guess_target(batch)
        found: list[tuple[str, str, Tensor]] = []
        _walk(batch, "batch", 0, found)
        for display, label, t in found:
            if target is not None and t is target:
                self._stats[("target", label)] = torch.stack(list(N.target_stats(t).values()))
                self._target = (label, display, why)
                continue
            axis, axis_name = N.feature_axis(t.ndim)
            n_features = 1 if t.ndim <= 1 else int(t.shape[axis])
            stats = N.feature_stats(t, self.input_scale, TOP_K)
            self._stats[("top", label)] = torch.stack([stats[k] for k in _VECTOR_STATS])  # (7, k)
            self._stats[("all", label)] = torch.stack([stats[k].float() for k in _SCALAR_STATS])
            self._meta[label] = (display, axis_name, n_features, t.ndim)

    def on_before_backward(self, run: _Run, loss: Tensor) -> None:
        if run.probing or not run.is_due(run.step) or not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        scale = 1.0
        if run.pl_module.automatic_optimization:  # Lightning divided the loss by accumulate_grad_batches
            scale = float(getattr(run.trainer, "accumulate_grad_batches", 1) or 1)
        self._stats[("loss",)] = loss.detach().float().reshape(()) * scale

    def collect(self, run: _Run) -> None:
        for key, t in self._stats.items():
            run.stage((self.name, *key), t.reshape(-1) if t.dim() > 1 else t)  # type: ignore[misc]

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if not self._stats:
            return []
        inputs = [self._input_scale(label, host) for label in self._meta]
        target = None
        if self._target is not None and (self.name, "target", self._target[0]) in host:
            label, display, why = self._target
            median_abs, rms, mean, std, max_abs = host[(self.name, "target", label)]
            target = TargetScale(display, median_abs, rms, mean, std, max_abs, why, label)
        loss = host.get((self.name, "loss"))
        sample = BatchSample(self._step if self._step >= 0 else run.flush_step, tuple(inputs), target, loss, self._task)
        self._meta, self._stats, self._target, self._step = {}, {}, None, -1
        return [sample]

    def _input_scale(self, label: str, host: dict[Hashable, Any]) -> InputScale:
        display, axis, n_features, ndim = self._meta[label]
        flat = host[(self.name, "top", label)]
        k = len(flat) // len(_VECTOR_STATS)
        rows = {name: flat[i * k : (i + 1) * k] for i, name in enumerate(_VECTOR_STATS)}
        top = [
            FeatureStat(int(rows["idx"][j]), *(rows[n][j] for n in _VECTOR_STATS[1:]))
            for j in range(k)
            if math.isfinite(rows["idx"][j])
        ]
        n_above, nonfinite, all_min, all_max_abs = host[(self.name, "all", label)]
        return InputScale(
            display, axis, n_features, top, int(n_above), int(nonfinite), all_min, ndim, label, all_max_abs
        )


_VECTOR_STATS = ("idx", "max_abs", "mean", "std", "min", "max", "near_zero")
_SCALAR_STATS = ("n_above", "nonfinite", "all_min", "all_max_abs")


class _GradientSpikes(_Monitor):
    """Which training batch each optimizer step came from, for naming the batches of gradient spikes.

    Host bookkeeping only (plain ints from ``on_train_batch_start``): at each logging step the batches of the
    steps since the previous one go to the rules as a :class:`StepBatches` record; the spike rules read the
    per-step total gradient norms that the gradient monitor records anyway.
    """

    name = "gradient_spikes"

    def __init__(self) -> None:
        self._batches: OrderedDict[int, tuple[int, int, int]] = OrderedDict()  # step -> (epoch, first, last)
        self.task: str | None = None  # from the first batch

    def setup(self, run: _Run) -> None:
        self._batches = OrderedDict()
        self.task = None

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if self.task is None:
            self.task = _task_of(batch)
        epoch = int(run.trainer.current_epoch)
        old = self._batches.get(step)
        self._batches[step] = (epoch, old[1], batch_idx) if old and old[0] == epoch else (epoch, batch_idx, batch_idx)
        while len(self._batches) > MAX_BATCH_MAP:
            self._batches.popitem(last=False)

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if not self._batches:
            return []
        described = {
            step: f"epoch {e}, batch {a}" if a == b else f"epoch {e}, batches {a}-{b}"
            for step, (e, a, b) in self._batches.items()
        }
        # the current step's batch may get more micro-batches: keep it for the next logging step too
        last = next(reversed(self._batches))
        self._batches = OrderedDict((s, v) for s, v in self._batches.items() if s == last)
        return [StepBatches(described, self.task or "")]


def _make_batch_scale(owner: str, input_scale: float) -> _BatchScale:
    return _BatchScale(input_scale)


def _make_spikes(owner: str) -> _GradientSpikes:
    return _GradientSpikes()


__all__ = ["_BatchScale", "_GradientSpikes"]
