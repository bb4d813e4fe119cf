"""GradientNormMonitor: the total pre-clip gradient norm of every optimizer step, per-layer norms on
sampled steps."""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import Any

import torch

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks import _signals
from lightning_normcheck.callbacks._args import _check_bool, _check_float
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.callbacks._emission import TOTAL_KEY
from lightning_normcheck.diagnosis.records import GradientLayers, GradientTotals, LossCheck, LossSeries, Record
from lightning_normcheck.diagnosis.thresholds import Thresholds


def _scalars(values: list[torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """0-d tensors of one device and dtype as one float32 vector on ``device`` (one kernel for all), else None."""
    if not values:
        return None
    first = values[0]
    if any(v.dim() != 0 or v.dtype != first.dtype or v.device != first.device for v in values):
        return None
    return torch.stack(values).float().to(device)


class _GradientNorms(_Monitor):
    name = "gradient_norm"

    def __init__(self, norm_type: float = 2.0, per_parameter: bool = False) -> None:
        self.norm_type = norm_type
        self.per_parameter = per_parameter
        self._bad_loss_step: torch.Tensor | None = None  # first step with a non-finite loss (-1: none), on device
        self._bad_loss_value: torch.Tensor | None = None
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, detached loss) since the last flush
        self._totals: list[tuple[int, int, torch.Tensor]] = []  # (step, optimizer, total) since the last flush
        self._layers: list[tuple[int, int, list[str], torch.Tensor, list[str], torch.Tensor | None]] = []
        self._staged: tuple[list[tuple[int, int]], int, int] | None = None
        self._loss_steps: list[int] = []
        self._scale: float | None = None  # the GradScaler's loss scale at the last logging step
        self._error: BaseException | None = None  # sharded: a failure to measure, reported at the next flush

    def describe(self) -> dict[str, Any]:
        return {"norm_type": self.norm_type}

    def setup(self, run: _Run) -> None:
        self._error = None
        self._scale = None
        self._bad_loss_step = self._bad_loss_value = None
        self._losses = []
        self._totals = []
        self._layers = []

    def pending(self) -> bool:
        return bool(self._totals or self._losses)

    def on_before_backward(self, run: _Run, loss: torch.Tensor) -> None:
        # hot path: only queue the loss; it is checked on the device at the next flush (no sync; no kernel unless
        # fp16 AMP, where Lightning passes it scaled and one division takes the scale off)
        self._losses.append((run.step, run.unscaled_loss(loss)))
        if len(self._losses) >= 1024:  # no flush for that long (raw optimizer steps): check now, keep memory flat
            self._check_losses()

    def _check_losses(self) -> None:
        """Track the first non-finite loss (step and value) on the device with ``torch.where``: no host sync."""
        if not self._losses:
            return
        losses, self._losses = self._losses, []
        device = losses[0][1].device
        if self._bad_loss_step is None or self._bad_loss_value is None or self._bad_loss_step.device != device:
            self._bad_loss_step = torch.full((), -1.0, device=device)
            self._bad_loss_value = torch.zeros((), device=device)
        scalars = _scalars([x for _, x in losses], device)
        if scalars is not None:  # the usual case, one stack for all (50 losses: 0.1 ms instead of 1.2 ms)
            bad, values = ~torch.isfinite(scalars), scalars
        else:
            losses = [(s, x.to(device)) for s, x in losses]
            bad = torch.stack([~torch.isfinite(x).all() for _, x in losses])
            values = torch.stack(
                [x.reshape(-1)[0].float() if x.numel() else x.new_zeros(()).float() for _, x in losses]
            )
        steps = torch.tensor([float(s) for s, _ in losses], device=device)
        i = bad.float().argmax().reshape(1)  # the first non-finite one (argmax returns the first maximum)
        first = bad.any() & (self._bad_loss_step < 0)
        # index_select, not values[i]: indexing with a 0-d tensor reads it on the host
        self._bad_loss_value = torch.where(first, values.index_select(0, i)[0], self._bad_loss_value)
        self._bad_loss_step = torch.where(first, steps.index_select(0, i)[0], self._bad_loss_step)

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        step = run.step
        if run.routes is not None:
            self._queue_sharded(run, optimizer, step)
            return
        stats = run.grad_stats(optimizer)
        if self.norm_type == 2.0:
            per_tensor, total = stats.norms, stats.total
        else:  # a non-default norm gets its own pass
            per_tensor = N.tensor_norms(stats.grads, self.norm_type)
            total = N.total_norm(per_tensor, self.norm_type)
        k = run.optimizer_index(optimizer)
        self._totals.append((step, k, total))
        if not run.is_due(step) or not stats.grads:
            return
        per_layer = N.group_norms(per_tensor, stats.layer_index, len(run.layer_names), self.norm_type)
        present = sorted(set(stats.layers))
        labels = [run.layer_label(i) for i in present]
        names = [run.param_name[id(p)] for p in stats.params] if self.per_parameter else []
        self._layers.append((step, k, labels, per_layer[present], names, per_tensor if names else None))

    def _queue_sharded(self, run: _Run, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Sharded gradients: queue the local sums of powers per route (the total of every step, per layer and per
        parameter on sampled steps); they are reduced across the mesh at the logging step, all in one collective.

        The shapes come from the host-side layout first; a failure to measure queues zeros of those shapes and is
        reported with the reduction (every process switches the monitor off at the same flush)."""
        assert run.routes is not None
        n_routes = run.routes.num
        k = run.optimizer_index(optimizer)
        params, layers, _ = run.optimizer_params(optimizer)
        due, present, names = run.is_due(step), [], []
        if due:  # the layout of a sampled step: the layers and parameters that have gradients (frozen: None)
            with_grad = [i for i, p in enumerate(params) if p.grad is not None]
            present = sorted({layers[i] for i in with_grad})
            names = [run.param_name[id(params[i])] for i in with_grad] if self.per_parameter else []
            due = bool(with_grad)
        total = per_layer = per_param = None
        if self._error is None:
            try:
                stats = run.grad_stats(optimizer)
                assert stats.route_index is not None
                per_tensor = stats.norms if self.norm_type == 2.0 else N.tensor_norms(stats.grads, self.norm_type)
                if self.norm_type == 2.0 and stats.partial is not None:
                    total = stats.partial
                else:
                    total = N.partial_powers(per_tensor, stats.route_index, n_routes, self.norm_type).reshape(-1)
                if due:
                    n_layers = len(run.layer_names)
                    per_layer = N.partial_powers(
                        per_tensor, stats.route_index, n_routes, self.norm_type, stats.layer_index, n_layers
                    )[:, present]
                    if names:
                        each = torch.arange(len(names), device=per_tensor.device)
                        per_param = N.partial_powers(
                            per_tensor, stats.route_index, n_routes, self.norm_type, each, len(names)
                        )
            except Exception as err:  # noqa: BLE001 - reported at the flush, on every process alike
                self._error = err
                total = per_layer = per_param = None
        device = N.local_tensor(params[0]).device if params else torch.device("cpu")
        self._totals.append((step, k, total if total is not None else torch.zeros(n_routes, device=device)))
        if due:
            if per_layer is None:
                per_layer = torch.zeros(n_routes, len(present), device=device)
            if names and per_param is None:
                per_param = torch.zeros(n_routes, len(names), device=device)
            self._layers.append((step, k, [run.layer_label(i) for i in present], per_layer, names, per_param))

    def collect(self, run: _Run) -> None:
        self._loss_steps = self._stage_losses(run, self._losses)
        self._check_losses()
        if self._bad_loss_step is not None and self._bad_loss_value is not None:
            run.stage((self.name, "loss_step"), self._bad_loss_step)
            run.stage((self.name, "loss_value"), self._bad_loss_value)
        totals, self._totals = self._totals, []
        if totals and run.routes is not None:  # sharded: (routes, steps) sums of powers, reduced at the transfer
            device = totals[0][2].device
            partial = torch.stack([t.float().to(device) for _, _, t in totals], dim=1)
            run.stage_norms((self.name, "totals"), partial, self.norm_type)
        elif totals:
            device = totals[0][2].device
            values = _scalars([t for _, _, t in totals], device)
            if values is None:
                values = torch.stack([t.reshape(()).float().to(device) for _, _, t in totals])
            run.stage((self.name, "totals"), values)
        stage = run.stage if run.routes is None else functools.partial(run.stage_norms, norm_type=self.norm_type)
        for i, (_, _, _, values, _, params) in enumerate(self._layers):
            stage((self.name, "layers", i), values)
            if params is not None:
                stage((self.name, "params", i), params)
        if run.routes is not None:
            device = run.pl_module.device
            run.stage_failure((self.name, "failed"), self._error is not None, device)
        self._staged = ([(s, k) for s, k, _ in totals], len(self._layers), 0)
        self._scale = _loss_scale(run) if totals else None

    def _stage_losses(self, run: _Run, losses: list[tuple[int, torch.Tensor]]) -> list[int]:
        """Stage the mean loss of each step (its micro-batches) as one vector; returns the steps."""
        losses = [(s, x) for s, x in losses if x.numel()]
        if not losses:
            return []
        steps = sorted({s for s, _ in losses})
        pos = {s: i for i, s in enumerate(steps)}
        device = losses[0][1].device
        values = _scalars([x for _, x in losses], device)
        if values is None:
            values = torch.stack([x.detach().reshape(-1)[0].float().to(device) for _, x in losses])
        index = torch.tensor([pos[s] for s, _ in losses], device=device)
        counts = torch.bincount(torch.tensor([pos[s] for s, _ in losses]), minlength=len(steps)).to(device)
        run.stage((self.name, "losses"), values.new_zeros(len(steps)).index_add_(0, index, values) / counts)
        return steps

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if host.get((self.name, "failed"), 0.0) > 0:  # here or on another process: off everywhere, together
            self._layers, self._staged = [], None
            raise _signals._deferred_error(self._error)
        out: list[Record] = []
        if self._loss_steps and (self.name, "losses") in host:
            out.append(LossSeries(tuple(self._loss_steps), tuple(host[(self.name, "losses")])))
        self._loss_steps = []
        if (self.name, "loss_step") in host:
            out.append(LossCheck(int(host[(self.name, "loss_step")]), float(host[(self.name, "loss_value")])))
        keys = self._staged[0] if self._staged else []
        if keys and (self.name, "totals") in host:  # absent: sharded norms of a flush after an exception
            values = host[(self.name, "totals")]
            out.append(
                GradientTotals(
                    tuple(s for s, _ in keys),
                    tuple(values),
                    tuple(k for _, k in keys),
                    float(self.norm_type),
                    self._scale,
                )
            )
        for i, (step, k, labels, _, names, _) in enumerate(self._layers):
            if (self.name, "layers", i) not in host:
                continue
            params = tuple(zip(names, host.get((self.name, "params", i), ())))
            out.append(GradientLayers(step, k, tuple(labels), tuple(host[(self.name, "layers", i)]), params))
        self._layers = []
        self._staged = None
        return out


class GradientNormMonitor(_NormCheckBase):
    r"""Log the total pre-clip gradient norm of every optimizer step and per-layer norms on sampled steps.

    Gradients are read in ``on_before_optimizer_step``: after backward (accumulated over
    ``accumulate_grad_batches``, unscaled by AMP's GradScaler) and *before* Lightning clips them, so
    ``normcheck/grad_norm/total`` equals ``torch.nn.utils.get_total_norm`` of the gradients the
    optimizer is about to use. Parameters whose ``grad`` is ``None`` (frozen) are skipped; tied
    weights count once. The total of each step stays on the device and reaches the loggers, at its
    own step, at the next logging step (one host transfer for all of them). When Lightning clips by norm
    (``gradient_clip_val``), it clips with this total (bit for bit the one it would compute) instead of
    computing it again.

    Args:
        log_every_n_steps: cadence of per-layer norms and of flushing, in optimizer steps; default the
            Trainer's ``log_every_n_steps``. The first 20 steps are sampled densely regardless.
        norm_type: the p of the p-norm (2.0 by default, ``inf`` allowed).
        per_parameter: also log one key per parameter (``normcheck/grad_norm_param/<name>``).
        print_summary: print the findings table at the end of fit.
        thresholds: the thresholds of the rules (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`).

    Raises:
        ValueError: if an argument is out of range (the message names it and what is allowed).

    Example:
        >>> GradientNormMonitor(log_every_n_steps=10)  # doctest: +ELLIPSIS
        <...GradientNormMonitor object at ...>

    LightningCLI::

        trainer:
          callbacks:
            - class_path: lightning_normcheck.GradientNormMonitor
              init_args: {log_every_n_steps: 10}

    ======================================  ===========================================================
    Key                                     Value
    ======================================  ===========================================================
    ``normcheck/grad_norm/total``           total pre-clip gradient norm, every optimizer step
    ``normcheck/grad_norm/<layer>``         norm of the gradients of one module's own parameters
    ``normcheck/grad_norm_param/<name>``    one parameter's gradient norm (``per_parameter=True``)
    ======================================  ===========================================================
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        norm_type: float = 2.0,
        per_parameter: bool = False,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary, thresholds=thresholds)
        self._monitors = [_make_monitor(type(self).__name__, norm_type=norm_type, per_parameter=per_parameter)]
        self._monitors.append(_signals._make_spikes(type(self).__name__))  # batches of gradient spikes


def _loss_scale(run: _Run) -> float | None:
    """The AMP GradScaler's current loss scale (``None``: no enabled scaler). ``get_scale()`` reads it on the host:
    called at logging steps only, once."""
    scaler = getattr(getattr(run.trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not callable(getattr(scaler, "get_scale", None)):
        return None
    if callable(getattr(scaler, "is_enabled", None)) and not scaler.is_enabled():
        return None
    return float(scaler.get_scale())


def _make_monitor(owner: str, norm_type: float, per_parameter: bool) -> _GradientNorms:
    _check_float(owner, "norm_type", norm_type, low=0.0)
    _check_bool(owner, "per_parameter", per_parameter)
    return _GradientNorms(float(norm_type), per_parameter)


__all__ = ["GradientNormMonitor", "TOTAL_KEY"]
