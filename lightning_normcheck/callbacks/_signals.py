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
import functools
import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_normcheck.callbacks._base import _check_float, _Monitor, _Run
from lightning_normcheck.diagnosis import data as DD

TOTAL_KEY = "normcheck/grad_norm/total"  # same key as gradient_norm_monitor.TOTAL_KEY (no import cycle)
INPUT_KEY = "normcheck/input/max_abs/"
TARGET_KEY = "normcheck/target/median_abs/"
_PREFIX = "_data/"
#: Batch keys taken as the regression target in a dict batch.
TARGET_NAMES = ("y", "target", "targets", "label", "labels", "y_true", "score", "scores", "value", "values")
#: At most this many float tensors of one batch are measured (a batch is rarely wider).
MAX_TENSORS = 8
#: Features listed per tensor (the largest by max |x|).
TOP_K = 3
#: The target median is taken over at most this many entries (a dense target can be large).
MEDIAN_SAMPLE = 65536
#: Input tensors larger than this are measured on their first samples only (cost: a 32x3x224x224 batch
#: took ~8 passes' time; tabular batches, where a rare huge value matters, are far below it).
MAX_ELEMENTS = 1 << 20
#: Step -> batch index entries kept for the spike report (flushes are at most this far apart).
MAX_BATCH_MAP = 20000
#: A step with no batch of its own was made in the batch of an earlier step (manual optimization with several
#: optimizers, a GAN's n_critic loop): looked up this many steps back at most.
MAX_STEPS_PER_BATCH = 16


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


def _feature_axis(x: Tensor) -> tuple[int, str]:
    if x.ndim <= 1:
        return -1, "column"
    if x.ndim == 2:
        return 1, "column"
    if x.ndim == 3:
        return 2, "feature"  # (batch, time, features)
    return 1, "channel"  # (batch, channels, ...)


@torch.no_grad()
def _input_stats(x: Tensor, threshold: float) -> dict[str, Tensor]:
    """Per-feature scale statistics of one float tensor, reduced to its top features (device tensors).

    Reductions run over every dimension but the feature axis (no copy of the batch); about ten kernels.
    """
    x = x.detach()
    if x.ndim >= 2 and x.numel() > MAX_ELEMENTS:  # big images/sequences: the first samples tell the scale
        x = x[: max(1, MAX_ELEMENTS // max(1, x[0].numel()))]
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half precision: squares of large values would overflow in std
    if x.ndim <= 1:
        x = x.reshape(-1, 1)
    axis, _ = _feature_axis(x)
    dims = tuple(d for d in range(x.ndim) if d != axis)
    vmin, vmax = x.amin(dim=dims), x.amax(dim=dims)  # NaN propagates: a NaN feature has a NaN max
    std, mean = torch.std_mean(x, dim=dims, correction=0)
    max_abs = torch.maximum(vmax, -vmin)
    bad = ~(torch.isfinite(vmin) & torch.isfinite(vmax))
    rank = torch.where(bad, torch.full_like(max_abs, math.inf), max_abs)  # non-finite features first
    k = min(TOP_K, max_abs.shape[0])
    _, idx = torch.topk(rank, k)
    top = x.index_select(axis, idx).abs()
    shape = [1] * x.ndim
    shape[axis] = k
    near_zero = (top <= 0.01 * max_abs[idx].reshape(shape)).float().mean(dim=dims)
    return {
        "idx": idx.float(),
        "max_abs": max_abs[idx],
        "mean": mean[idx],
        "std": std[idx],
        "min": vmin[idx],
        "max": vmax[idx],
        "near_zero": near_zero,
        "n_above": (max_abs > threshold).sum(),
        "nonfinite": bad.sum(),
        "all_min": vmin.min(),
        "all_max_abs": max_abs.max(),
    }


@torch.no_grad()
def _target_stats(y: Tensor) -> dict[str, Tensor]:
    y = y.detach()
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()
    flat = y.reshape(-1)
    std, mean = torch.std_mean(flat, correction=0)
    sample = flat[:MEDIAN_SAMPLE].abs()
    return {
        "median_abs": sample.median(),
        "rms": flat.square().mean().sqrt(),
        "mean": mean,
        "std": std,
        "max_abs": flat.abs().max(),
    }


class _BatchScale(_Monitor):
    """On sampled steps: per-feature scale of the float inputs, scale of the regression target, the loss.

    Measured in ``on_train_batch_start`` (the batch as the model gets it) and ``on_before_backward`` (the
    loss); queued as ``_``-internal values plus ``normcheck/input/max_abs/<tensor>`` and
    ``normcheck/target/median_abs/<tensor>``; judged at the flush of the same step.
    """

    name = "batch_scale"

    def __init__(self) -> None:
        self._meta: dict[str, tuple[str, str, int, int]] = {}  # label -> (display, axis, n_features, ndim)
        self._target: tuple[str, str, str] | None = None  # (label, display, why)
        self._step = -1
        self.normalized_by: str | None = None

    def setup(self, run: _Run) -> None:
        self.normalized_by = None
        for name, module in run.pl_module.named_modules():
            if next(module.children(), None) is not None or not any(True for _ in module.parameters(False)):
                continue
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self.normalized_by = f"{name} ({type(module).__name__})"
            break  # the first leaf module with parameters

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if run.probing or not run.is_due(step):
            return
        if step != self._step:
            self._meta = {}
            self._target = None
            self._step = step
        target, why = _guess_target(batch)
        found: list[tuple[str, str, Tensor]] = []
        _walk(batch, "batch", 0, found)
        for display, label, t in found:
            if target is not None and t is target:
                stats = _target_stats(t)
                for key, v in stats.items():
                    run.add_metric(f"{_PREFIX}target/{key}", v)
                run.add_metric(TARGET_KEY + label, stats["median_abs"])
                self._target = (label, display, why)
                continue
            axis, axis_name = _feature_axis(t)
            n_features = 1 if t.ndim <= 1 else int(t.shape[axis])
            k = min(TOP_K, n_features)
            p = f"{_PREFIX}in/{label}/"
            for key, v in _input_stats(t, DD.INPUT_SCALE).items():
                if v.ndim == 0:
                    run.add_metric(p + key, v)
                else:
                    run.add_metrics(f"{p}{key}/", v, [str(j) for j in range(k)])
                if key == "all_max_abs":
                    run.add_metric(INPUT_KEY + label, v)
            self._meta[label] = (display, axis_name, n_features, t.ndim)

    def on_before_backward(self, run: _Run, loss: Tensor) -> None:
        if run.probing or not run.is_due(run.step) or not isinstance(loss, Tensor) or loss.numel() != 1:
            return
        scale = 1.0
        if run.pl_module.automatic_optimization:  # Lightning divided the loss by accumulate_grad_batches
            scale = float(getattr(run.trainer, "accumulate_grad_batches", 1) or 1)
        run.add_metric(f"{_PREFIX}loss", loss.detach().float().reshape(()) * scale)

    def diagnose(self, run: _Run, values: dict[str, float], step: int) -> None:
        inputs: list[DD.InputScale] = []
        for label, (display, axis, n_features, ndim) in self._meta.items():
            p = f"{_PREFIX}in/{label}/"
            if p + "n_above" not in values:
                continue
            top = []
            for j in range(min(TOP_K, n_features)):
                g = {key: values.get(f"{p}{key}/{j}", math.nan) for key in _VECTOR_STATS}
                index = g.pop("idx")
                if math.isfinite(index):
                    top.append(DD.FeatureStat(index=int(index), **g))
            inputs.append(
                DD.InputScale(
                    display,
                    axis,
                    n_features,
                    top,
                    int(values[p + "n_above"]),
                    int(values[p + "nonfinite"]),
                    values[p + "all_min"],
                    ndim,
                )
            )
        input_max = max(
            (values[f"{_PREFIX}in/{lb}/all_max_abs"] for lb in self._meta if f"{_PREFIX}in/{lb}/all_max_abs" in values),
            default=None,
        )
        measured = self._step if self._step >= 0 else step
        self._meta = {}
        self._step = -1
        DD.diagnose_inputs(run.findings, measured, inputs, self.normalized_by)
        target = self._target
        self._target = None
        if target is None or f"{_PREFIX}target/median_abs" not in values:
            return
        label, display, why = target
        t = DD.TargetScale(
            display,
            values[f"{_PREFIX}target/median_abs"],
            values[f"{_PREFIX}target/rms"],
            values[f"{_PREFIX}target/mean"],
            values[f"{_PREFIX}target/std"],
            values[f"{_PREFIX}target/max_abs"],
            why,
        )
        grad = next((v for s, n, v in run.flushed_series if n == TOTAL_KEY and s == measured), None)
        DD.diagnose_labels(run.findings, measured, t, values.get(f"{_PREFIX}loss"), grad, input_max)


_VECTOR_STATS = ("idx", "max_abs", "mean", "std", "min", "max", "near_zero")


class _GradientSpikes(_Monitor):
    """Intermittent spikes of the total gradient norm, and info-level clipping/warm-up hints.

    Reads the per-step ``normcheck/grad_norm/total`` values of each flush (queued every optimizer step by
    the gradient monitor; host floats) and keeps a bounded running-median window per optimizer, saved with
    checkpoints: with several optimizers (a GAN's generator and discriminator) the totals of each are on
    their own scale and are judged separately. The batch and the optimizer of each step are remembered from
    ``on_train_batch_start`` and ``on_before_optimizer_step`` (host ints, no sync).
    """

    name = "gradient_spikes"

    def __init__(self, factor: float = DD.SPIKE_FACTOR) -> None:
        self.factor = factor
        self.history = DD.SpikeHistory()  # optimizer 0 (the only one in most runs)
        self.histories: dict[int, DD.SpikeHistory] = {0: self.history}  # optimizer index -> its window
        self._opt_index: dict[int, int] = {}  # id(optimizer) -> index, in order of first step
        self._step_opt: dict[int, int] = {}  # step -> optimizer index, since the last flush
        self._batches: OrderedDict[int, tuple[int, int, int]] = OrderedDict()  # step -> (epoch, first, last)
        self._recent: list[float] = []  # totals of the last steps, for the clipping hint
        self.clip_val: float | None = None
        self.clip_algorithm = "norm"
        self.task: str | None = None  # "classification" / "regression" / "" (unknown), from the first batch

    def setup(self, run: _Run) -> None:
        trainer = run.trainer
        self.clip_val = float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None
        algo = getattr(trainer, "gradient_clip_algorithm", None)  # a GradClipAlgorithmType: str() is its name
        self.clip_algorithm = str(getattr(algo, "value", algo) or "norm")
        self._batches = OrderedDict()
        self.task = None
        self._opt_index = {}
        self._step_opt = {}

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        k = self._opt_index.get(id(optimizer))  # host bookkeeping (plain ints), no sync
        if k is None:
            opts = [getattr(o, "optimizer", o) for o in run.trainer.optimizers]
            k = next((i for i, o in enumerate(opts) if o is optimizer), len(opts) + len(self._opt_index))
            self._opt_index[id(optimizer)] = k
        self._step_opt[run.step] = k

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if self.task is None:
            self.task = _task_of(batch)
        epoch = int(run.trainer.current_epoch)
        old = self._batches.get(step)
        self._batches[step] = (epoch, old[1], batch_idx) if old and old[0] == epoch else (epoch, batch_idx, batch_idx)
        while len(self._batches) > MAX_BATCH_MAP:
            self._batches.popitem(last=False)

    def _batch_and_optimizer(self, step: int, name: str) -> str:
        """Where a spike of ``step`` came from: its batch, and the optimizer when there are several."""
        return ", ".join(filter(None, (self._batch_of(step), name)))

    def _batch_of(self, step: int) -> str:
        b = self._batches.get(step)
        for earlier in range(step - 1, step - MAX_STEPS_PER_BATCH - 1, -1):  # several optimizer steps per batch
            if b is not None or earlier < 0:
                break
            b = self._batches.get(earlier)
        if b is None:
            return ""
        epoch, first, last = b
        return f"epoch {epoch}, batch {first}" if first == last else f"epoch {epoch}, batches {first}-{last}"

    def _clipping(self, run: _Run) -> str | None:
        if self.clip_val is None:
            return None
        return f"gradient_clip_val={self.clip_val:g}, gradient_clip_algorithm={self.clip_algorithm!r}"

    def diagnose(self, run: _Run, values: dict[str, float], step: int) -> None:
        totals = [(s, v) for s, n, v in run.flushed_series if n == TOTAL_KEY]
        if totals:
            per_opt: dict[int, list[tuple[int, float]]] = {}
            for s, v in totals:
                per_opt.setdefault(self._step_opt.get(s, 0), []).append((s, v))
            several = len(self._opt_index) > 1
            new: list[DD.Spike] = []
            for k, series in sorted(per_opt.items()):
                history = self.histories.setdefault(k, DD.SpikeHistory())
                name = self._optimizer_name(run, k) if several else ""
                new += history.update(series, functools.partial(self._batch_and_optimizer, name=name))
            view = DD.merged_history(list(self.histories.values())) if len(self.histories) > 1 else self.history
            DD.report_spikes(run.findings, view, new, self._clipping(run), self.factor, self.task)
            self._step_opt = {}
            if several:  # the clipping hint compares totals against one clip value: the first optimizer's
                totals = per_opt.get(0, [])
            self._recent = (self._recent + [v for _, v in totals])[-DD.SPIKE_WINDOW :]
            if self.clip_algorithm == "norm":
                DD.diagnose_clipping_hygiene(run.findings, step, self._recent, self.clip_val)
        self._warmup_hint(run, values, step)
        last = min(h.last_step for h in self.histories.values())
        for s in [s for s in self._batches if s < last - DD.SPIKE_FALLBACK_STEPS - 1]:
            del self._batches[s]  # pending spikes already carry their batch description

    def _optimizer_name(self, run: _Run, k: int) -> str:
        opts = run.trainer.optimizers
        return f"optimizer {k} ({type(opts[k]).__name__})" if k < len(opts) else f"optimizer {k}"

    def _warmup_hint(self, run: _Run, values: dict[str, float], step: int) -> None:
        if step >= DD.EARLY_STEPS:
            return
        ratios = {
            k[len("normcheck/update_ratio/") :]: v for k, v in values.items() if k.startswith("normcheck/update_ratio/")
        }
        if not ratios or not run.trainer.optimizers:
            return
        opt = run.trainer.optimizers[0]
        group = opt.param_groups[0]
        lr = float(group.get("lr", 0.0))
        base = float(group.get("initial_lr", lr))
        warming_up = lr < 0.99 * base
        DD.diagnose_warmup(run.findings, step, type(opt).__name__, lr, warming_up, ratios)

    def state_dict(self) -> dict[str, Any]:
        others = {str(k): h.state_dict() for k, h in self.histories.items() if k != 0}
        return {"version": 1, "history": self.history.state_dict(), "others": others, "recent": list(self._recent)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.histories = {0: self.history}
        for k, h in state.get("others", {}).items():
            self.histories[int(k)] = DD.SpikeHistory()
            self.histories[int(k)].load_state_dict(h)
        self._recent = [float(v) for v in state.get("recent", [])]


def _make_batch_scale(owner: str) -> _BatchScale:
    return _BatchScale()


def _make_spikes(owner: str, spike_factor: float = DD.SPIKE_FACTOR) -> _GradientSpikes:
    _check_float(owner, "spike_factor", spike_factor, low=1.0)
    return _GradientSpikes(float(spike_factor))


__all__ = ["INPUT_KEY", "TARGET_KEY", "_BatchScale", "_GradientSpikes"]
