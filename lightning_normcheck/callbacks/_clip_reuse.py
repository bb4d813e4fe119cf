"""Lightning's clip by norm with the total gradient norm the monitors measured already: one pass, not two.

With ``Trainer(gradient_clip_val=..., gradient_clip_algorithm="norm")`` Lightning clips after the
``on_before_optimizer_step`` hooks (every callback's, then the LightningModule's): ``configure_gradient_clipping``
-> ``LightningModule.clip_gradients`` -> ``Precision.clip_gradients`` -> ``Precision.clip_grad_by_norm``, which
calls ``torch.nn.utils.clip_grad_norm_``, i.e. ``get_total_norm`` of the gradients, then ``clip_grads_with_norm_``
with that total. The gradient monitors measured the same total in ``on_before_optimizer_step``; Lightning would
read every gradient a second time to compute it again, and throw it away.

The extension point is the precision plugin's public ``clip_grad_by_norm``, replaced on the Trainer's plugin
*instance* for the duration of one fit:

- every clip by norm of an automatic-optimization step goes through it: the Trainer's ``gradient_clip_val`` and
  a ``configure_gradient_clipping`` of the user's that calls ``self.clip_gradients``; it is the method Lightning's
  own plugins override where they clip otherwise (FSDP's), and it receives the optimizer and the threshold;
- the alternatives are worse: ``configure_gradient_clipping`` belongs to the user's LightningModule (theirs to
  override), a precision plugin of ours passed to the Trainer would replace the user's choice of precision, and
  replacing ``torch.nn.utils.clip_grad_norm_`` would change every caller in the process;
- only on the instance (other Trainers are untouched), only when its class clips with ``Precision``'s own method
  (not FSDP, DeepSpeed or a user's subclass that clips otherwise) and nothing was set on the instance before; the
  instance attribute is removed at the end of fit, on an exception and at teardown.

A clip reuses the measured total only when it is bit for bit the total ``clip_grad_norm_`` would compute, so that
the weights are exactly those of a run without the callback: the gradients were measured with
:func:`~lightning_normcheck.norms.clip_norms` (torch's own kernels, the same tensors, the same order), for this
optimizer at this step; the plugin clips those very gradient tensors (``main_params`` of the optimizer, those with
a gradient: none added, none replaced) and none of them was changed in place since (tensor version counters: the
LightningModule's ``on_before_optimizer_step``, later callbacks and ``configure_gradient_clipping`` run in between
and may scale them). Otherwise, and in manual optimization (where ``self.clip_gradients`` runs before the hook that
measures), the plugin's own method clips. Writes that bypass version counters (through ``.data`` or a NumPy view
of a gradient) between the measurement and the clip cannot be seen: the clip would use the total from before them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.plugins.precision import Precision
from torch import Tensor

from lightning_normcheck.callbacks._isolation import failure_message, rank_zero_warn

if TYPE_CHECKING:
    from lightning_normcheck.callbacks._run import _Run

#: The monitors that measure every step's gradient norms (:meth:`_Run.grad_stats`).
MEASURING = frozenset({"gradient_norm", "clip_rate"})


class _ClipReuse:
    """The ``clip_grad_by_norm`` set on one precision plugin instance for one fit (see the module docstring)."""

    def __init__(self, run: _Run, plugin: Precision) -> None:
        self.run = run
        self.plugin = plugin
        self.original = plugin.clip_grad_by_norm  # the class's method, bound to the plugin
        self.reused = 0  # clips made with the measured total
        self.fallbacks = 0  # clips left to the plugin's own method
        plugin.clip_grad_by_norm = self.clip_grad_by_norm  # type: ignore[method-assign]

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        """Clip as ``Precision.clip_grad_by_norm`` does, with the measured total when it is the same number."""
        found: tuple[list[Tensor], Tensor] | None = None
        try:
            found = self._reusable(optimizer)
        except Exception as err:  # noqa: BLE001 - never break training: clip the plugin's own way from now on
            self.restore()
            rank_zero_warn(failure_message("reusing the measured gradient norm for clipping", err), RuntimeWarning)
        if found is None:
            self.fallbacks += 1
            self.original(optimizer, clip_val)
            return
        params, total = found
        self.reused += 1
        # what clip_grad_norm_ does after get_total_norm (same foreach choice: the default)
        torch.nn.utils.clip_grads_with_norm_(params, clip_val, total)

    def _reusable(self, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], Tensor] | None:
        """The parameters the plugin clips and the measured total, when that total is the one torch would compute."""
        run = self.run
        # a clip by norm is being made: measure the next steps the way it measures (from the start of fit when the
        # Trainer's gradient_clip_val asks for it; from here when the user clips in configure_gradient_clipping)
        run.exact_norms = True
        stats = run.current_grad_stats(optimizer)
        if stats is None or stats.versions is None or stats.route_index is not None:
            return None
        params: list[Tensor] = list(self.plugin.main_params(optimizer))
        grads = [p.grad for p in params if p.grad is not None]
        if len(grads) != len(stats.grads):
            return None
        for g, measured, version in zip(grads, stats.grads, stats.versions):
            if g is not measured or g._version != version:
                return None
        return params, stats.total

    def restore(self) -> None:
        """Remove the instance attribute (the class's method clips again); only ours, only once."""
        if vars(self.plugin).get("clip_grad_by_norm") == self.clip_grad_by_norm:
            del self.plugin.clip_grad_by_norm


def install(run: _Run, active: set[str]) -> _ClipReuse | None:
    """Set the reusing ``clip_grad_by_norm`` on the Trainer's precision plugin when it is safe and can pay off:
    automatic optimization, unsharded parameters, a monitor in ``active`` that measures every step, a plugin that
    clips with ``Precision.clip_grad_by_norm`` and has nothing set on the instance, a torch with
    ``clip_grads_with_norm_`` (2.6+). Never raises: anything unexpected leaves the plugin as it is."""
    try:
        return _install(run, active)
    except Exception:  # noqa: BLE001 - an optimization: without it Lightning clips its own way
        return None


def _install(run: _Run, active: set[str]) -> _ClipReuse | None:
    trainer: Any = run.trainer
    plugin = getattr(trainer, "precision_plugin", None)
    if (
        not isinstance(plugin, Precision)
        or not (active & MEASURING)
        or run.routes is not None
        or run.layout_problem() is not None
        or not run.pl_module.automatic_optimization
        or type(plugin).clip_grad_by_norm is not Precision.clip_grad_by_norm
        or "clip_grad_by_norm" in vars(plugin)
        or not hasattr(torch.nn.utils, "clip_grads_with_norm_")
    ):
        return None
    algo = getattr(trainer, "gradient_clip_algorithm", None)  # a GradClipAlgorithmType: its value is the name
    run.exact_norms = bool(trainer.gradient_clip_val) and str(getattr(algo, "value", algo) or "norm") == "norm"
    return _ClipReuse(run, plugin)


__all__ = ["MEASURING", "install"]
