"""Monitors for data and first-step causes: the scale of the batch (inputs and regression targets) and
intermittent spikes of the total gradient norm, plus info-level training hygiene hints.

:class:`_BatchScale` looks at the float tensors of the batch on sampled steps only (a handful of
reductions per tensor, queued for the flush; integer tensors such as token ids or class labels are not
features and are skipped). :class:`_GradientSpikes` reads the per-step total gradient norms that the
gradient monitor queues anyway, on the host at each flush; it costs nothing on the device. The decisions
are in :mod:`lightning_normcheck.diagnosis.data`.

Under DDP each rank sees its own shard of the batch: at each logging step the ranks' batch statistics are
gathered (:class:`_CrossRank`, a torchmetrics state) and merged, so that rank zero judges the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter, OrderedDict
from collections.abc import Hashable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torchmetrics import Metric

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
#: Class-label tensors up to this many entries are counted for the spike rules (a 1-D label vector of a batch;
#: dense labels such as segmentation masks are not class counts per example).
MAX_LABELS = 4096
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


def _labels_of(batch: Any) -> Tensor | None:
    """The tensor that holds the batch's labels or targets: a dict key named like a target, or the last of a tuple."""
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        batch = {fld.name: getattr(batch, fld.name, None) for fld in dataclasses.fields(batch)}
    labels: Any = None
    if isinstance(batch, Mapping):
        labels = next((v for k, v in batch.items() if isinstance(k, str) and k.lower() in TARGET_NAMES), None)
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        labels = batch[-1]
    return labels if isinstance(labels, Tensor) else None


def _task_of(batch: Any) -> str:
    """``classification`` when the batch's labels are integers, ``regression`` when a float target is found."""
    labels = _labels_of(batch)
    if labels is None:
        return ""
    if labels.dtype == torch.bool or not (labels.is_floating_point() or labels.is_complex()):
        return "classification"
    return "regression"


# -- statistics of the global batch under DDP ------------------------------------------------------------------
def _world_size(run: _Run) -> int:
    """How many processes train together: the Trainer's world size when a process group of that size is up,
    else 1 (then the monitors combine nothing and call no collective)."""
    size = int(getattr(run.trainer, "world_size", 1) or 1)
    if size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 1
    return size if torch.distributed.get_world_size() == size else 1


def _all_reduce(op: str, value: Tensor, group: Any = None) -> list[Tensor]:
    out = value.clone()
    reduce_op = torch.distributed.ReduceOp.SUM if op == "sum" else torch.distributed.ReduceOp.MAX
    torch.distributed.all_reduce(out, op=reduce_op, group=group)
    return [out]


def _all_gather(value: Tensor, group: Any = None) -> list[Tensor]:
    value = value.contiguous()
    out = [torch.empty_like(value) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(out, value, group=group)
    return out


class _CrossRank(Metric):
    """One flat state combined across the ranks of a multi-process run by a single collective.

    A torchmetrics state (``add_state`` with ``dist_reduce_fx``) that ``compute()`` synchronises: ``"sum"`` and
    ``"max"`` all-reduce it, ``"gather"`` stacks every rank's copy into ``(world_size, n)``. The callers build
    the same layout on every rank whatever each measured, so the collective is a plain ``all_reduce`` or
    ``all_gather``: torchmetrics' default gather first exchanges the shapes (a barrier, a second collective and
    a host read per state). Without a process group ``compute()`` returns the local value and calls nothing.
    """

    full_state_update = False
    value: Tensor

    def __init__(self, reduce: Literal["sum", "max", "gather"]) -> None:
        sync = _all_gather if reduce == "gather" else functools.partial(_all_reduce, reduce)
        super().__init__(dist_sync_fn=sync, sync_on_compute=True, compute_with_cache=False)
        self.gathers = reduce == "gather"
        self.add_state("value", torch.zeros(0), dist_reduce_fx=None if reduce == "gather" else reduce)

    def update(self, value: Tensor) -> None:
        self.value = value

    def compute(self) -> Tensor:
        return self.value

    def combine(self, local: Tensor) -> Tensor:
        """``local`` (1-D) combined over the ranks: the same shape for ``"sum"``/``"max"``, ``(world_size, n)`` for
        ``"gather"``. Every rank calls it at the same point with a tensor of the same size."""
        self.update(local)
        try:
            out = self.compute()  # torchmetrics squeezes a one-element result to 0-d: shape it back
        finally:
            self.reset()
        return out.reshape(-1, local.numel()) if self.gathers else out.reshape(local.shape)


def _deferred_error(error: BaseException | None) -> BaseException:
    """What a monitor raises, on every rank alike, once the ranks learnt at a flush that one of them failed."""
    if error is not None:
        return error
    return RuntimeError("it failed on another rank (that rank's warning names the error)")


class _BatchScale(_Monitor):
    """On sampled steps: per-feature scale of the float inputs, scale of the regression target, the loss.

    Measured in ``on_train_batch_start`` (the batch as the model gets it) and ``on_before_backward`` (the
    loss), staged for the logging step of the same step and handed over as one :class:`BatchSample`.

    Under DDP the ranks' statistics are gathered at the logging step (one ``all_gather`` of a fixed-size row per
    rank) and merged on the device before the one transfer, so rank zero judges the global batch:

    - exact: per input tensor ``all_max_abs`` (max over ranks) and ``all_min`` (min); the target's ``rms``,
      ``mean``, ``std`` (from each rank's element count) and ``max_abs``;
    - approximate: the top features are those of the rank with the largest ``all_max_abs`` (a rank with NaN/inf
      first), with that rank's shard statistics, so an extreme feature on any rank is seen but the others may
      be missed; ``n_above`` and ``nonfinite`` are the max over ranks (a lower bound of the global count); the
      target's ``median_abs`` is the median of the ranks' medians; the loss is the mean of the ranks' losses
      (what DDP averages).

    The flush of a failed fit (``on_exception``, possibly on one rank only) and the end-of-fit flush use the
    rank's own batch and call no collective.
    """

    name = "batch_scale"

    def __init__(self, input_scale: float) -> None:
        self.input_scale = input_scale  # features above it are counted (DataThresholds.input_scale)
        self._meta: dict[str, tuple[str, str, int, int]] = {}  # label -> (display, axis, n_features, ndim)
        self._target: tuple[str, str, str] | None = None  # (label, display, why)
        self._target_count = 0
        self._step = -1
        self._task = ""
        self._stats: dict[Hashable, Tensor] = {}
        self.normalized_by: str | None = None
        self._world = 1
        self._together = False  # the next flush is a logging step that every rank reaches
        self._error: BaseException | None = None  # raised at the next reduced flush, on every rank
        self._gather: _CrossRank | None = None

    def setup(self, run: _Run) -> None:
        self.normalized_by = None
        self._task = ""
        self._world = _world_size(run)
        self._together, self._error = False, None
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
        if self._world == 1:
            self._measure_batch(step, batch)
            return
        try:  # under DDP a failure waits for the flush, where every rank learns of it and stops alike
            self._measure_batch(step, batch)
        except Exception as err:  # noqa: BLE001
            self._error = self._error or err

    def _measure_batch(self, step: int, batch: Any) -> None:
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
                self._target_count = t.numel()
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
        if self._world == 1:
            self._measure_loss(run, loss)
            return
        try:  # as in on_train_batch_start
            self._measure_loss(run, loss)
        except Exception as err:  # noqa: BLE001
            self._error = self._error or err

    def _measure_loss(self, run: _Run, loss: Tensor) -> None:
        scale = 1.0
        if run.pl_module.automatic_optimization:  # Lightning divided the loss by accumulate_grad_batches
            scale = float(getattr(run.trainer, "accumulate_grad_batches", 1) or 1)
        self._stats[("loss",)] = run.unscaled_loss(loss).float().reshape(()) * scale  # fp16 AMP: passed scaled

    def on_train_batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._together = run.flush_due  # every rank flushes at the end of this batch

    def collect(self, run: _Run) -> None:
        together, self._together = self._together and self._world > 1, False
        if together:
            self._collect_together(run)
            return
        for key, t in self._stats.items():
            run.stage((self.name, *key), t.reshape(-1) if t.dim() > 1 else t)  # type: ignore[misc]

    def _collect_together(self, run: _Run) -> None:
        """Gather every rank's row, merge, and stage the merged values under the keys of the one-rank path."""
        device = run.pl_module.device
        row = None
        if self._error is None:
            try:
                row = self._local_row(device)
            except Exception as err:  # noqa: BLE001 - the other ranks are waiting in the collective
                self._error = err
        if row is None:
            row = _empty_row(device, failed=True)
        if self._gather is None:
            self._gather = _CrossRank("gather")
        merged = _merge_rows(self._gather.combine(row))
        run.stage((self.name, "failed"), merged[-1])
        for i, label in enumerate(self._meta):
            start = i * _SLOT + 1
            run.stage((self.name, "top", label), merged[start : start + _TOP])
            run.stage((self.name, "all", label), merged[start + _TOP : start + _SLOT - 1])
        if self._target is not None and ("target", self._target[0]) in self._stats:
            run.stage((self.name, "target", self._target[0]), merged[_TARGET_AT + 2 : _TARGET_AT + _TARGET])
        if ("loss",) in self._stats:
            run.stage((self.name, "loss"), merged[_LOSS_AT + 1])

    def _local_row(self, device: torch.device) -> Tensor:
        """This rank's statistics in the fixed layout of :func:`_merge_rows` (the same size on every rank)."""
        parts: list[Tensor] = []
        labels = list(self._meta)
        empty = _empty_row(device)
        for slot in range(MAX_TENSORS):
            if slot >= len(labels):
                parts.append(empty[slot * _SLOT : (slot + 1) * _SLOT])
                continue
            top = self._stats[("top", labels[slot])].to(device=device, dtype=torch.float32)  # (7, k)
            if top.shape[1] < TOP_K:  # fewer features than TOP_K: the missing columns have no index (NaN)
                top = torch.nn.functional.pad(top, (0, TOP_K - top.shape[1]), value=math.nan)
            scalars = self._stats[("all", labels[slot])].to(device=device, dtype=torch.float32)
            parts += [torch.ones(1, device=device), top.reshape(-1), scalars]
        target = self._stats.get(("target", self._target[0])) if self._target is not None else None
        if target is None:
            parts.append(empty[_TARGET_AT : _TARGET_AT + _TARGET])
        else:
            count = torch.tensor([1.0, float(self._target_count)], device=device)
            parts += [count, target.to(device=device, dtype=torch.float32)]
        loss = self._stats.get(("loss",))
        if loss is None:
            parts.append(empty[_LOSS_AT:])
        else:
            parts += [torch.ones(1, device=device), loss.to(device=device, dtype=torch.float32).reshape(1)]
            parts.append(torch.zeros(1, device=device))  # failed: no
        return torch.cat(parts)

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        failed = host.get((self.name, "failed"))
        if failed is not None and failed > 0:  # some rank failed: every rank raises here, at the same flush
            error, self._error = self._error, None
            self._meta, self._stats, self._target, self._step = {}, {}, None, -1
            raise _deferred_error(error)
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

# The row each rank contributes under DDP (float32, the same size on every rank whatever its batch holds):
# MAX_TENSORS input slots of [present, the TOP_K top features' stats (7 x TOP_K, row-major), n_above,
# nonfinite, all_min, all_max_abs], the target [present, element count, median_abs, rms, mean, std, max_abs],
# the loss [present, value] and a failure flag.
_TOP = len(_VECTOR_STATS) * TOP_K
_SLOT = 1 + _TOP + len(_SCALAR_STATS)
_TARGET = 7
_TARGET_AT = MAX_TENSORS * _SLOT
_LOSS_AT = _TARGET_AT + _TARGET


def _empty_row(device: torch.device, failed: bool = False) -> Tensor:
    """A row that holds nothing (the neutral element of every merge), with the failure flag as given."""
    slot = [0.0] + [math.nan] * _TOP + [0.0, 0.0, math.inf, -math.inf]
    return torch.tensor(slot * MAX_TENSORS + [0.0] * _TARGET + [0.0, 0.0, float(failed)], device=device)


@torch.no_grad()
def _merge_rows(rows: Tensor) -> Tensor:
    """Merge the ranks' rows (``(world_size, _ROW)``) into one row of the same layout, on the device.

    Per input slot: the top features of the rank with the largest ``all_max_abs`` (NaN/inf first; ties: the
    lowest rank), ``n_above`` and ``nonfinite`` the max, ``all_min`` the min, ``all_max_abs`` the max over the
    ranks that have the tensor. The target's ``rms``, ``mean`` and ``std`` from the ranks' element counts
    (exact), ``max_abs`` the max, ``median_abs`` the median of the ranks' medians; the loss the mean over the
    ranks that have one; the failure flag the max.
    """
    world = rows.shape[0]
    inf = torch.full((), math.inf, device=rows.device)
    slots = rows[:, :_TARGET_AT].reshape(world, MAX_TENSORS, _SLOT)
    present = slots[..., 0] > 0.5
    n_above, nonfinite, vmin, vmax = slots[..., -4], slots[..., -3], slots[..., -2], slots[..., -1]
    key = torch.where(present, torch.where((nonfinite > 0) | vmax.isnan(), inf, vmax), -inf)
    winner = key.argmax(0)  # (MAX_TENSORS,)
    top = slots[winner, torch.arange(MAX_TENSORS, device=rows.device), 1 : 1 + _TOP]
    zero = torch.zeros((), device=rows.device)
    scalars = torch.stack(
        [
            torch.where(present, n_above, zero).amax(0),
            torch.where(present, nonfinite, zero).amax(0),
            torch.where(present, vmin, inf).amin(0),  # NaN propagates, as in one rank's statistics
            torch.where(present, vmax, -inf).amax(0),
        ],
        dim=1,
    )
    merged_slots = torch.cat([present.any(0).float()[:, None], top, scalars], dim=1).reshape(-1)

    t = rows[:, _TARGET_AT:_LOSS_AT]
    has = t[:, 0] > 0.5
    n = torch.where(has, t[:, 1], zero)
    total = n.sum()
    per = total.clamp_min(1.0)
    mean = torch.where(has, n * t[:, 4], zero).sum() / per
    square = torch.where(has, n * t[:, 3].square(), zero).sum() / per
    # the pooled variance as sum n_r (std_r^2 + (mean_r - mean)^2) / n: no difference of large squares (Chan et al.,
    # "Algorithms for computing the sample variance", 1983), so a target with mean >> std keeps its std in float32
    var = torch.where(has, n * (t[:, 5].square() + (t[:, 4] - mean).square()), zero).sum() / per
    median = torch.where(has, t[:, 2], torch.full_like(t[:, 2], math.nan)).nanmedian()
    max_abs = torch.where(has, t[:, 6], -inf).amax()
    target = torch.stack([has.any().float(), total, median, square.sqrt(), mean, var.sqrt(), max_abs])

    lp = rows[:, _LOSS_AT] > 0.5
    loss = torch.where(lp, rows[:, _LOSS_AT + 1], zero).sum() / lp.sum().clamp_min(1)
    tail = torch.stack([lp.any().float(), loss, rows[:, -1].amax()])
    return torch.cat([merged_slots, target, tail])


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
        self._labels: list[tuple[int, Tensor]] = []  # (step, class labels of its batch) since the last flush
        self._staged_labels: list[tuple[int, int]] = []  # (step, how many labels) staged at the flush

    def setup(self, run: _Run) -> None:
        self._batches = OrderedDict()
        self.task = None
        self._labels = []

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if self.task is None:
            self.task = _task_of(batch)
        if self.task == "classification" and not run.probing:
            labels = _labels_of(batch)  # a reference only: counted on the host at the next logging step
            if labels is not None and labels.dim() == 1 and labels.numel() <= MAX_LABELS:
                self._labels.append((step, labels.detach()))
        epoch = int(run.trainer.current_epoch)
        old = self._batches.get(step)
        self._batches[step] = (epoch, old[1], batch_idx) if old and old[0] == epoch else (epoch, batch_idx, batch_idx)
        while len(self._batches) > MAX_BATCH_MAP:
            self._batches.popitem(last=False)

    def collect(self, run: _Run) -> None:
        labels, self._labels = self._labels, []
        self._staged_labels = [(s, t.numel()) for s, t in labels]
        if labels:
            device = labels[0][1].device
            run.stage((self.name, "labels"), torch.cat([t.to(device=device, dtype=torch.float32) for _, t in labels]))

    def _label_counts(self, host: dict[Hashable, Any]) -> dict[int, tuple[tuple[int, int], ...]]:
        values = host.get((self.name, "labels"), [])
        counts: dict[int, Counter[int]] = {}
        i = 0
        for step, n in self._staged_labels:
            counts.setdefault(step, Counter()).update(int(v) for v in values[i : i + n])
            i += n
        self._staged_labels = []
        return {step: tuple(sorted(c.items())) for step, c in counts.items()}

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        labels = self._label_counts(host)
        if not self._batches:
            return [StepBatches({}, self.task or "", labels)] if labels else []
        described = {
            step: f"epoch {e}, batch {a}" if a == b else f"epoch {e}, batches {a}-{b}"
            for step, (e, a, b) in self._batches.items()
        }
        # the current step's batch may get more micro-batches: keep it for the next logging step too
        last = next(reversed(self._batches))
        self._batches = OrderedDict((s, v) for s, v in self._batches.items() if s == last)
        return [StepBatches(described, self.task or "", labels)]


def _make_batch_scale(owner: str, input_scale: float) -> _BatchScale:
    return _BatchScale(input_scale)


def _make_spikes(owner: str) -> _GradientSpikes:
    return _GradientSpikes()


__all__ = ["_BatchScale", "_GradientSpikes"]
