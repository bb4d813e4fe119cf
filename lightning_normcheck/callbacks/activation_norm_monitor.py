"""ActivationNormMonitor: output RMS, dead and saturated fractions of leaf modules on sampled steps."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._args import _check_float, _check_int, _check_str_list
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.callbacks._run import compiled_prefixes, in_prefixes
from lightning_normcheck.diagnosis.records import (
    ActivationSample,
    InitStats,
    LayerInitStat,
    ModuleStat,
    Record,
)
from lightning_normcheck.diagnosis.thresholds import Thresholds

_log = logging.getLogger("lightning_normcheck")

#: Modules whose output is exactly zero for a dead unit.
RELU_LIKE: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: Bounded activations and their (low, high) bounds.
BOUNDED: dict[type[nn.Module], tuple[float, float]] = {
    nn.Tanh: (-1.0, 1.0),
    nn.Sigmoid: (0.0, 1.0),
    nn.Hardtanh: (-1.0, 1.0),
    nn.Hardsigmoid: (0.0, 1.0),
}
#: Leaf modules that never say anything about scale.
SKIPPED: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
)


def is_weight_layer(module: nn.Module) -> bool:
    """Linear- and convolution-like modules (the layers whose outputs a depth trend is judged on)."""
    return isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd))


def first_tensor(output: Any) -> Tensor | None:
    """The first floating-point tensor in a module output (tensor, tuple/list, dict or PackedSequence)."""
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if isinstance(output, PackedSequence):
        return first_tensor(output.data)
    if isinstance(output, (tuple, list)):
        for o in output:
            t = first_tensor(o)
            if t is not None:
                return t
    if isinstance(output, dict):
        for o in output.values():
            t = first_tensor(o)
            if t is not None:
                return t
    return None


class _Stats:
    """Accumulated statistics of one module over the calls of one sampled step (device tensors)."""

    __slots__ = ("sumsq", "numel", "alive", "saturated", "order")

    def __init__(self, order: int) -> None:
        self.sumsq: Tensor | None = None
        self.numel = 0
        self.alive: Tensor | None = None
        self.saturated: Tensor | None = None
        self.order = order


class _ActivationNorms(_Monitor):
    name = "activation_norm"

    def __init__(
        self,
        include_types: list[str] | None,
        exclude_types: list[str] | None,
        include_names: list[str] | None,
        exclude_names: list[str] | None,
        saturation_threshold: float,
        window: int,
    ) -> None:
        self.include_types = include_types
        self.exclude_types = exclude_types
        self.include_names = include_names
        self.exclude_names = exclude_names
        self.saturation_threshold = saturation_threshold
        self.window = window
        self.modules: dict[str, nn.Module] = {}
        self.kinds: dict[str, str] = {}  # "relu", "bounded", "" per module name
        self.bounds: dict[str, tuple[float, float]] = {}
        self._handles: list[Any] = []
        self._stats: dict[str, _Stats] = {}
        self._input: _Stats | None = None
        self._sampled_step = -1
        self._window_alive: dict[str, list[Tensor]] = {}  # alive masks of the last `window` sampled batches
        self._window_samples = 0
        self.last_order: list[str] = []
        self._staged_order: list[str] = []
        self._staged_input = False
        self.init_stats: InitStats | None = None

    def _selected(self, name: str, module: nn.Module) -> bool:
        if any(True for _ in module.children()) or isinstance(module, SKIPPED) or not name:
            return False
        tname = type(module).__name__
        if self.include_types is not None and tname not in self.include_types:
            return False
        if self.exclude_types is not None and tname in self.exclude_types:
            return False
        if self.include_names is not None and not any(fnmatch.fnmatchcase(name, p) for p in self.include_names):
            return False
        if self.exclude_names is not None and any(fnmatch.fnmatchcase(name, p) for p in self.exclude_names):
            return False
        return True

    def setup(self, run: _Run) -> None:
        self.modules = {}
        self._sampled_step = -1  # a new fit restarts its step count: its step 0 is sampled again
        self._stats = {}
        self._window_alive = {}
        self._window_samples = 0
        compiled = compiled_prefixes(run.pl_module)
        if compiled and run.is_global_zero:
            where = "the whole model" if "" in compiled else ", ".join(f"`{p}`" for p in compiled)
            _log.info(
                "lightning_normcheck: activations are not measured inside torch.compile'd code (%s): compiled code"
                " does not see forward hooks added after its first trace, and adding them would recompile it.",
                where,
            )
        for name, module in run.pl_module.named_modules():
            if in_prefixes(name, compiled):
                continue
            if self._selected(name, module):
                self.modules[name] = module
                if isinstance(module, RELU_LIKE):
                    self.kinds[name] = "relu"
                elif type(module) in BOUNDED:
                    self.kinds[name] = "bounded"
                    self.bounds[name] = BOUNDED[type(module)]
                else:
                    self.kinds[name] = "weight" if is_weight_layer(module) else ""

    def on_train_start(self, run: _Run) -> None:
        # the weight scale of every hooked Linear/Conv at the start of fit, for init advice (one transfer)
        weights = {n: getattr(m, "weight", None) for n, m in self.modules.items() if self.kinds[n] == "weight"}
        layers = [
            (name, w)
            for name, w in weights.items()
            if isinstance(w, Tensor) and w.dim() >= 2 and w.is_floating_point() and w.numel() >= 2
        ]
        stds, fan_in, fan_out = N.init_stats([w for _, w in layers])
        values = stds.cpu().tolist()
        self.init_stats = InitStats(
            tuple(LayerInitStat(n, fi, fo, v) for (n, _), fi, fo, v in zip(layers, fan_in, fan_out, values))
        )

    # hooks only live during sampled steps -------------------------------------------------------------
    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        step = run.step
        if step == self._sampled_step or not run.is_due(step) or self._handles:
            return
        self._sampled_step = step
        self._stats = {}
        self._input = None
        # the hook functions are made once per fit; only registering them is left for each sampled step
        if getattr(self, "_hook_run", None) is not run:
            owner = run.owner
            self._hook_fns = {name: owner._guard(self, self._make_hook(run, name)) for name in self.modules}
            self._hook_run = run
        hook_fns = self._hook_fns
        self._handles = [module.register_forward_hook(hook_fns[name]) for name, module in self.modules.items()]

    def on_before_backward(self, run: _Run, loss: Tensor) -> None:
        self.remove_hooks()  # the forward of this micro-batch is over

    def on_train_batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, run: _Run, name: str) -> Any:
        kind = self.kinds[name]
        bounds = self.bounds.get(name)
        thr = self.saturation_threshold

        @torch.no_grad()
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            if run.probing:
                return
            out = first_tensor(output)
            if out is None:
                return
            if self._input is None and not self._stats:
                x = first_tensor(inputs)
                if x is not None:
                    self._input = _Stats(-1)
                    self._accumulate(self._input, x, "", None, thr)
            st = self._stats.get(name)
            if st is None:
                st = self._stats[name] = _Stats(len(self._stats))
            self._accumulate(st, out, kind, bounds, thr)

        return hook

    @staticmethod
    def _accumulate(st: _Stats, x: Tensor, kind: str, bounds: tuple[float, float] | None, thr: float) -> None:
        x = x.detach()
        sq = N.sum_of_squares(x)
        st.sumsq = sq if st.sumsq is None else st.sumsq + sq
        st.numel += x.numel()
        if kind == "relu":
            alive = N.alive_units(x)
            if alive is not None:
                st.alive = alive if st.alive is None or st.alive.shape != alive.shape else st.alive | alive
        elif kind == "bounded" and bounds is not None:
            sat = N.saturated_count(x, bounds[0], bounds[1], thr)
            st.saturated = sat if st.saturated is None else st.saturated + sat

    def collect(self, run: _Run) -> None:
        self._staged_order = []
        if not self._stats:
            return
        order = [n for n in sorted(self._stats, key=lambda n: self._stats[n].order) if self._stats[n].sumsq is not None]
        self._staged_order = self.last_order = order
        self._staged_input = self._input is not None and self._input.sumsq is not None
        if self._input is not None and self._input.sumsq is not None:
            run.stage((self.name, "input"), N.rms_from_sumsq(self._input.sumsq, self._input.numel))
        self._window_samples += 1
        for name in order:
            st = self._stats[name]
            values = [N.rms_from_sumsq(st.sumsq, st.numel)]  # type: ignore[arg-type]
            if st.alive is not None:
                # a sliding window of the last `window` sampled batches: a unit is dead if it never fired in any
                hist = self._window_alive.setdefault(name, [])
                keep = [a for a in hist if a.shape == st.alive.shape]
                hist[:] = keep[max(0, len(keep) - self.window + 1) :] + [st.alive]
                values += [N.dead_fraction([st.alive]), N.dead_fraction(hist)]
            if st.saturated is not None:
                values.append(st.saturated.float() / max(st.numel, 1))
            run.stage((self.name, name), torch.stack([v.float() for v in values]))
        self._stats = {}
        self._input = None

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if not self._staged_order:
            return []
        stats = []
        for name in self._staged_order:
            v = host[(self.name, name)]
            kind = self.kinds.get(name, "")
            dead = kind == "relu" and len(v) >= 3
            stats.append(
                ModuleStat(
                    name,
                    type(self.modules[name]).__name__ if name in self.modules else "",
                    kind,
                    v[0],
                    dead_batch=v[1] if dead else None,
                    dead_window=v[2] if dead else None,
                    saturated=v[1] if kind == "bounded" and len(v) >= 2 else None,
                )
            )
        self._staged_order = []
        return [
            ActivationSample(
                run.flush_step,
                tuple(stats),
                input_rms=host.get((self.name, "input")),
                window_samples=min(self._window_samples, self.window),
                window=self.window,
            )
        ]


class ActivationNormMonitor(_NormCheckBase):
    r"""Measure the outputs of leaf modules on sampled steps: RMS, dead units and saturation.

    Forward hooks are attached at the start of a sampled training batch and removed as soon as its
    forward is over, so unsampled steps cost nothing. Each hooked module's output (the first
    floating-point tensor of a tuple, dict, RNN output or ``PackedSequence``) gives its RMS; a module
    called several times in one step is measured over all its calls. For ReLU-like modules the fraction
    of units that are exactly zero for the whole batch is measured, and over a window of sampled steps
    a unit counts as dead only if it never fired. For tanh/sigmoid the fraction of outputs within
    ``1 - saturation_threshold`` of their bounds is measured. Validation, test and predict loops are
    not measured.

    Args:
        log_every_n_steps: sampling cadence in optimizer steps (default: the Trainer's).
        include_types: only hook modules of these class names (e.g. ``["Linear", "ReLU"]``).
        exclude_types: never hook modules of these class names.
        include_names: only hook modules whose name matches one of these glob patterns.
        exclude_names: never hook modules whose name matches one of these glob patterns.
        saturation_threshold: a bounded unit counts as saturated past this fraction of its range (0.99
            means ``|tanh| > 0.99``).
        activation_window: number of sampled steps over which dead and saturated units are judged.
        print_summary: print the findings table at the end of fit.
        thresholds: the thresholds of the rules (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`).

    Example:
        >>> ActivationNormMonitor(exclude_types=["LayerNorm"])  # doctest: +ELLIPSIS
        <...ActivationNormMonitor object at ...>

    ========================================  ========================================================
    Key                                       Value
    ========================================  ========================================================
    ``normcheck/act_rms/<module>``            RMS of the module's output (``<input>``: the model input)
    ``normcheck/dead_frac/<module>``          ReLU-like: fraction of units zero for the whole batch
    ``normcheck/saturated_frac/<module>``     tanh/sigmoid: fraction of outputs near the bounds
    ========================================  ========================================================
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        include_types: list[str] | None = None,
        exclude_types: list[str] | None = None,
        include_names: list[str] | None = None,
        exclude_names: list[str] | None = None,
        saturation_threshold: float = 0.99,
        activation_window: int = 5,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary, thresholds=thresholds)
        self._monitors = [
            _make_monitor(
                type(self).__name__,
                include_types=include_types,
                exclude_types=exclude_types,
                include_names=include_names,
                exclude_names=exclude_names,
                saturation_threshold=saturation_threshold,
                activation_window=activation_window,
            )
        ]


def _make_monitor(
    owner: str,
    include_types: list[str] | None,
    exclude_types: list[str] | None,
    include_names: list[str] | None,
    exclude_names: list[str] | None,
    saturation_threshold: float,
    activation_window: int,
) -> _ActivationNorms:
    lists = {
        "include_types": include_types,
        "exclude_types": exclude_types,
        "include_names": include_names,
        "exclude_names": exclude_names,
    }
    for arg, val in lists.items():
        _check_str_list(owner, arg, val)
    _check_float(owner, "saturation_threshold", saturation_threshold, low=0.0, high=1.0)
    if saturation_threshold >= 1.0:
        raise ValueError(f"{owner}: `saturation_threshold` must be in (0, 1), got {saturation_threshold!r}")
    _check_int(owner, "activation_window", activation_window, 1)
    copies = {k: (list(v) if v is not None else None) for k, v in lists.items()}
    return _ActivationNorms(**copies, saturation_threshold=float(saturation_threshold), window=activation_window)


__all__ = ["ActivationNormMonitor", "first_tensor"]
