"""GradientNormMonitor: the total pre-clip gradient norm of every optimizer step, per-layer norms on
sampled steps."""

from __future__ import annotations

from typing import Any

import torch

from lightning_normcheck import diagnosis as D
from lightning_normcheck import norms as N
from lightning_normcheck.callbacks import _signals
from lightning_normcheck.callbacks._base import (
    _check_bool,
    _check_float,
    _Monitor,
    _NormCheckBase,
    _Run,
)

TOTAL_KEY = "normcheck/grad_norm/total"


class _GradientNorms(_Monitor):
    name = "gradient_norm"

    def __init__(self, norm_type: float = 2.0, per_parameter: bool = False) -> None:
        self.norm_type = norm_type
        self.per_parameter = per_parameter
        self.history = D.GradientHistory()
        self._first_nonfinite: tuple[int, list[str]] | None = None
        self._bad_loss_step: torch.Tensor | None = None  # first step with a non-finite loss (-1: none), on device
        self._bad_loss_value: torch.Tensor | None = None
        self._amp_scaler = False
        self._losses: list[tuple[int, torch.Tensor]] = []  # (step, detached loss) since the last flush
        self._opt_index: dict[int, int] = {}  # id(optimizer) -> 0, 1, ... in order of first step
        self._opt_layers: dict[int, list[str]] = {}  # optimizer index -> its layers' labels
        self._step_opt: dict[int, int] = {}  # step -> optimizer index, since the last flush

    def setup(self, run: _Run) -> None:
        self._opt_index = {}
        self._opt_layers = {}
        self._step_opt = {}
        self._bad_loss_step = self._bad_loss_value = None
        self._losses = []
        self._amp_scaler = getattr(getattr(run.trainer, "precision_plugin", None), "scaler", None) is not None

    def on_before_backward(self, run: _Run, loss: torch.Tensor) -> None:
        # hot path: only queue the loss; it is checked on the device at the next flush (no sync, no kernel)
        self._losses.append((run.step, loss.detach()))
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
        losses = [(s, x.to(device)) for s, x in losses]
        bad = torch.stack([~torch.isfinite(x).all() for _, x in losses])
        values = torch.stack([x.reshape(-1)[0].float() if x.numel() else x.new_zeros(()).float() for _, x in losses])
        steps = torch.tensor([float(s) for s, _ in losses], device=device)
        i = bad.float().argmax().reshape(1)  # the first non-finite one (argmax returns the first maximum)
        first = bad.any() & (self._bad_loss_step < 0)
        # index_select, not values[i]: indexing with a 0-d tensor reads it on the host
        self._bad_loss_value = torch.where(first, values.index_select(0, i)[0], self._bad_loss_value)
        self._bad_loss_step = torch.where(first, steps.index_select(0, i)[0], self._bad_loss_step)

    def collect(self, run: _Run) -> None:
        self._check_losses()
        if self._bad_loss_step is not None and self._bad_loss_value is not None:
            run.add_metric("_nonfinite_loss_step", self._bad_loss_step)
            run.add_metric("_nonfinite_loss_value", self._bad_loss_value)

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        step = run.step
        if self.norm_type == 2.0:
            stats = run.grad_stats(optimizer)
            per_tensor, total = stats.norms, stats.total
        else:  # a non-default norm gets its own pass
            stats = run.grad_stats(optimizer)
            per_tensor = N.tensor_norms(stats.grads, self.norm_type)
            total = N.total_norm(per_tensor, self.norm_type)
        run.add_series(step, TOTAL_KEY, total)
        # host bookkeeping for diagnosis (plain ints, no sync): which optimizer stepped, and its layers
        k = self._opt_index.setdefault(id(optimizer), len(self._opt_index))
        self._step_opt[step] = k
        if k not in self._opt_layers:
            self._opt_layers[k] = [run.layer_label(i) for i in sorted(set(stats.layers))]
        if not run.is_due(step) or not stats.grads:
            return
        per_layer = N.group_norms(per_tensor, stats.layer_index, len(run.layer_names), self.norm_type)
        present = sorted(set(stats.layers))
        run.add_metrics("normcheck/grad_norm/", per_layer[present], [run.layer_label(i) for i in present])
        if self.per_parameter:
            names = [run.param_name[id(p)] for p in stats.params]
            run.add_metrics("normcheck/grad_norm_param/", per_tensor, names)

    def diagnose(self, run: _Run, values: dict[str, float], step: int) -> None:
        totals = [(s, v) for s, n, v in run.flushed_series if n == TOTAL_KEY]
        layers = {
            k[len("normcheck/grad_norm/") :]: v
            for k, v in values.items()
            if k.startswith("normcheck/grad_norm/") and k != TOTAL_KEY
        }
        D.diagnose_gradients(
            run.findings,
            self.history,
            totals,
            layers,
            step,
            run.layer_names,
            values=values,
            amp_scaler=self._amp_scaler,
            optimizer_of_step=self._step_opt,
            layer_groups=list(self._opt_layers.values()),
        )
        self._step_opt = {}

    def on_exception(self, run: _Run, exception: BaseException) -> None:
        D.explain_exception(run.findings, exception, run.step)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))


class GradientNormMonitor(_NormCheckBase):
    r"""Log the total pre-clip gradient norm of every optimizer step and per-layer norms on sampled steps.

    Gradients are read in ``on_before_optimizer_step``: after backward (accumulated over
    ``accumulate_grad_batches``, unscaled by AMP's GradScaler) and *before* Lightning clips them, so
    ``normcheck/grad_norm/total`` equals ``torch.nn.utils.get_total_norm`` of the gradients the
    optimizer is about to use. Parameters whose ``grad`` is ``None`` (frozen) are skipped; tied
    weights count once. The total of each step stays on the device and reaches the loggers, at its
    own step, at the next logging step (one host transfer for all of them).

    Args:
        log_every_n_steps: cadence of per-layer norms and of flushing, in optimizer steps; default the
            Trainer's ``log_every_n_steps``. The first 20 steps are sampled densely regardless.
        norm_type: the p of the p-norm (2.0 by default, ``inf`` allowed).
        per_parameter: also log one key per parameter (``normcheck/grad_norm_param/<name>``).
        print_summary: print the findings table at the end of fit.

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
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary)
        self._monitors = [_make_monitor(type(self).__name__, norm_type=norm_type, per_parameter=per_parameter)]
        self._monitors.append(_signals._make_spikes(type(self).__name__))  # gradient_spikes, hygiene hints


def _make_monitor(owner: str, norm_type: float, per_parameter: bool) -> _GradientNorms:
    _check_float(owner, "norm_type", norm_type, low=0.0)
    _check_bool(owner, "per_parameter", per_parameter)
    return _GradientNorms(float(norm_type), per_parameter)


__all__ = ["GradientNormMonitor", "TOTAL_KEY"]
