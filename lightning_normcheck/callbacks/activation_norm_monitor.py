"""ActivationNormMonitor: output RMS, dead and saturated fractions of leaf modules on sampled steps.

Under DDP the statistics are reduced across ranks at each logging step (a fixed layout per fit, a fixed number
of collectives), so rank zero describes the global batch: a unit that fires on any rank is alive.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from collections.abc import Hashable
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._args import _check_float, _check_int, _check_str_list
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.callbacks._run import compiled_prefixes, in_prefixes
from lightning_normcheck.callbacks._signals import _CrossRank, _deferred_error, _world_size
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
        self._staged_dead: list[str] = []  # the modules of the staged dead fractions, in order
        self._staged_saturated: list[str] = []  # ... and of the staged saturated fractions
        self._staged_input = False
        self.init_stats: InitStats | None = None
        # under DDP (see _collect_together)
        self._world = 1
        self._together = False  # the next flush is a logging step that every rank reaches
        self._staged_together = False
        self._error: BaseException | None = None  # a hook's failure, raised at the next reduced flush on every rank
        self._relu: list[str] = []  # the ReLU-like modules, in setup order: the layout of the masks
        self._units: list[int] | None = None  # their unit counts, agreed by the ranks (None: not yet)
        self._window_next: dict[str, list[Tensor]] = {}  # the windows of this flush, kept if a unit fired anywhere
        self._reducers: dict[str, _CrossRank] = {}

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
        self._world = _world_size(run)
        self._together, self._staged_together, self._error, self._units = False, False, None, None
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
        self._relu = [name for name in self.modules if self.kinds[name] == "relu"]

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

    def describe(self) -> dict[str, Any]:
        # the modules' kinds and (at the first sampled step, see _base) forward order: metric names keep neither
        modules = [
            {"name": n, "type": type(m).__name__, "kind": self.kinds.get(n, "")} for n, m in self.modules.items()
        ]
        return {"modules": modules, "module_order": "registration", "activation_window": self.window}

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
        self._together = run.flush_due  # every rank flushes at the end of this batch
        self.remove_hooks()

    def __getstate__(self) -> dict[str, Any]:
        # the hook closures belong to one fit (they hold its run): rebuilt at the next sampled step
        state = dict(self.__dict__)
        state.pop("_hook_fns", None)
        state.pop("_hook_run", None)
        return state

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _make_hook(self, run: _Run, name: str) -> Any:
        kind = self.kinds[name]
        bounds = self.bounds.get(name)
        thr = self.saturation_threshold

        # no no_grad context: _accumulate measures detached tensors (entering a context on each of 450 modules'
        # calls cost more than the kernels)
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

        if self._world == 1:
            return hook

        def deferring(module: nn.Module, inputs: Any, output: Any) -> None:
            try:  # under DDP a failure waits for the flush, where every rank learns of it and stops alike
                hook(module, inputs, output)
            except Exception as err:  # noqa: BLE001
                self._error = self._error or err

        return deferring

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
        self._staged_together, self._together = self._together and self._world > 1, False
        if self._staged_together:
            self._collect_together(run)
            return
        if not self._stats:
            return
        order = [n for n in sorted(self._stats, key=lambda n: self._stats[n].order) if self._stats[n].sumsq is not None]
        self._staged_order = self.last_order = order
        self._staged_input = self._input is not None and self._input.sumsq is not None
        if self._input is not None and self._input.sumsq is not None:
            run.stage((self.name, "input"), N.rms_from_sumsq(self._input.sumsq, self._input.numel))
        self._window_samples += 1
        if order:  # every module's RMS as one vector: per-module staging cost ~10 ms a step on 450 modules
            sums = [self._stats[name].sumsq for name in order]
            device = sums[0].device  # type: ignore[union-attr]
            wide = torch.float64 if any(t.dtype == torch.float64 for t in sums) else torch.float32  # type: ignore[union-attr]
            squares = torch.stack([t.to(device=device, dtype=wide) for t in sums])  # type: ignore[union-attr]
            counts = torch.tensor([max(self._stats[name].numel, 1) for name in order], dtype=wide, device=device)
            run.stage((self.name, "rms"), (squares / counts).sqrt())
        # dead and saturated fractions of all modules as a few vectors: a few tensors per module made this collect
        # 5.3 ms a flush on the 450-module benchmark stack, 2.9 ms as vectors (2-core CPU)
        relu = [name for name in order if self._stats[name].alive is not None]
        for name in relu:
            # a sliding window of the last `window` sampled batches: a unit is dead if it never fired in any
            alive = self._stats[name].alive
            hist = self._window_alive.setdefault(name, [])
            keep = [a for a in hist if a.shape == alive.shape]  # type: ignore[union-attr]
            hist[:] = keep[max(0, len(keep) - self.window + 1) :] + [alive]  # type: ignore[list-item]
        self._staged_dead = relu
        if relu:
            batch, window = _dead_fractions([self._window_alive[name] for name in relu])
            run.stage((self.name, "dead_batch"), batch)
            run.stage((self.name, "dead_window"), window)
        bounded = [name for name in order if self._stats[name].saturated is not None]
        self._staged_saturated = bounded
        if bounded:
            counts = torch.stack([self._stats[name].saturated.float() for name in bounded])  # type: ignore[union-attr]
            sizes = torch.tensor([max(self._stats[name].numel, 1) for name in bounded], device=counts.device)
            run.stage((self.name, "saturated"), counts / sizes)
        self._stats = {}
        self._input = None

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if self._staged_together:
            self._staged_together = False
            return self._records_together(run, host)
        if not self._staged_order:
            return []
        stats = []
        rms = host[(self.name, "rms")]
        dead = dict(
            zip(
                self._staged_dead,
                zip(host.get((self.name, "dead_batch"), []), host.get((self.name, "dead_window"), [])),
            )
        )
        saturated = dict(zip(self._staged_saturated, host.get((self.name, "saturated"), [])))
        for i, name in enumerate(self._staged_order):
            kind = self.kinds.get(name, "")
            d = dead.get(name) if kind == "relu" else None
            stats.append(
                ModuleStat(
                    name,
                    type(self.modules[name]).__name__ if name in self.modules else "",
                    kind,
                    rms[i],
                    dead_batch=d[0] if d is not None else None,
                    dead_window=d[1] if d is not None else None,
                    saturated=saturated.get(name) if kind == "bounded" else None,
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

    # under DDP: the statistics of the global batch ------------------------------------------------------------
    def _reducer(self, op: Literal["sum", "max"]) -> _CrossRank:
        if op not in self._reducers:
            self._reducers[op] = _CrossRank(op)
        return self._reducers[op]

    def _local_units(self, name: str) -> int:
        st = self._stats.get(name)
        return int(st.alive.shape[0]) if st is not None and st.alive is not None else 0

    def _collect_together(self, run: _Run) -> None:
        """Reduce this logging step's statistics across the ranks, then stage the global values as one tensor.

        Every rank reduces the same layout whatever it measured (a module that did not run on a rank adds
        zeros there), fixed per fit by the hooked modules and the ReLU-like modules' unit counts:

        - sum (float64 where the device has it, so element counts stay exact): the sum of squares of the
          input and of each module's output, each module's saturated count, the element counts;
        - max: a failure flag; each module's ``-(position in the forward)``, ``-inf`` when it did not run
          (the global order is the earliest position on any rank); per ReLU-like module a flag "had a unit
          mask of the agreed width" and a flag "had one of another width"; the unit masks (1: fired).

        So the RMS and the saturated fraction are exact over the global batch, and a unit is dead only if it
        fired on no rank (per batch, and over the window of sampled batches). The unit counts are agreed by
        one more max-reduction and one host read at the first logging step of a fit, and again at the next
        logging step after some rank saw a module at another width (that step reports no dead fraction for it).
        """
        device = run.pl_module.device
        names = list(self.modules)
        if self._units is None:
            self._units = []
            if self._relu:
                local = torch.tensor([float(self._local_units(n)) for n in self._relu], device=device)
                self._units = [int(u) for u in self._reducer("max").combine(local).tolist()]
        units = self._units
        big = torch.float64 if device.type in ("cpu", "cuda") else torch.float32
        packed = None
        if self._error is None:
            try:
                packed = self._pack(names, units, device, big)
            except Exception as err:  # noqa: BLE001 - the other ranks are waiting in the collective
                self._error = err
        if packed is None:  # nothing measured, the failure flag set: every rank raises after the reduction
            flags = torch.tensor([1.0] + [-math.inf] * len(names), device=device)
            packed = (
                torch.zeros(2 + 3 * len(names), dtype=big, device=device),
                torch.cat([flags, torch.zeros(2 * len(units) + sum(units), device=device)]),
            )
        sums = self._reducer("sum").combine(packed[0])
        maxima = self._reducer("max").combine(packed[1])
        self._stats = {}
        self._input = None
        self._stage_together(run, sums, maxima, len(names), units)

    def _pack(
        self, names: list[str], units: list[int], device: torch.device, big: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        zero = torch.zeros((), dtype=big, device=device)
        inp = self._input if self._input is not None and self._input.sumsq is not None else None
        ran = [st if st is not None and st.sumsq is not None else None for st in map(self._stats.get, names)]
        squares = [inp.sumsq if inp is not None else zero] + [st.sumsq if st is not None else zero for st in ran]
        saturated = [st.saturated if st is not None and st.saturated is not None else zero for st in ran]
        counts = [inp.numel if inp is not None else 0] + [st.numel if st is not None else 0 for st in ran]
        local_sum = torch.cat(
            [
                torch.stack([t.to(device=device, dtype=big) for t in squares + saturated]),  # type: ignore[union-attr]
                torch.tensor(counts, dtype=big, device=device),
            ]
        )
        flags = [0.0] + [-float(st.order) if st is not None else -math.inf for st in ran]
        masked: list[float] = []
        conflict: list[float] = []
        masks: list[Tensor] = []
        for name, width in zip(self._relu, units):
            st = self._stats.get(name)
            alive = st.alive if st is not None else None
            fits = alive is not None and alive.shape[0] == width
            masked.append(float(fits))
            conflict.append(float(alive is not None and not fits))
            if width:
                masks.append(alive.float() if fits and alive is not None else torch.zeros(width, device=device))
        local_max = torch.cat([torch.tensor(flags + masked + conflict, device=device), *masks])
        return local_sum, local_max

    def _stage_together(self, run: _Run, sums: Tensor, maxima: Tensor, m: int, units: list[int]) -> None:
        squares, saturated, counts = sums[: 1 + m], sums[1 + m : 1 + 2 * m], sums[1 + 2 * m :]
        rms = (squares / counts.clamp_min(1)).sqrt()  # the input first, then the modules
        sat = saturated / counts[1:].clamp_min(1)
        flags = maxima[: 1 + m + 2 * len(units)]
        masks = maxima[1 + m + 2 * len(units) :]
        nan = torch.full((), math.nan, device=maxima.device)
        dead: list[Tensor] = []
        self._window_next = {}
        offset = 0
        for name, width in zip(self._relu, units):
            if not width:
                dead += [nan, nan]
                continue
            fired = masks[offset : offset + width] > 0.5  # on any rank
            offset += width
            hist = [a for a in self._window_alive.get(name, []) if a.shape == fired.shape]
            window = hist[max(0, len(hist) - self.window + 1) :] + [fired]
            self._window_next[name] = window  # kept by records() if a rank had this module's mask
            dead += [N.dead_fraction([fired]), N.dead_fraction(window)]
        parts = [counts[:1].float(), rms.float(), sat.float(), flags.float()]
        if dead:
            parts.append(torch.stack(dead).float())
        run.stage((self.name, "together"), torch.cat(parts))

    def _records_together(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        names = list(self.modules)
        m, r = len(names), len(self._relu)
        v = host[(self.name, "together")]
        input_count, rms, sat = v[0], v[1 : 2 + m], v[2 + m : 2 + 2 * m]
        at = 2 + 2 * m
        failed, order = v[at], v[at + 1 : at + 1 + m]
        masked, conflict, dead = (
            v[at + 1 + m : at + 1 + m + r],
            v[at + 1 + m + r : at + 1 + m + 2 * r],
            v[at + 1 + m + 2 * r :],
        )
        window_next, self._window_next = self._window_next, {}
        if failed > 0:  # some rank failed: every rank raises here, at the same logging step
            error, self._error = self._error, None
            raise _deferred_error(error)
        dead_of: dict[str, tuple[float, float]] = {}
        for j, name in enumerate(self._relu):
            if conflict[j] > 0.5:
                self._units = None  # a rank saw another width: agree on the widths again at the next logging step
            elif masked[j] > 0.5 and name in window_next:
                self._window_alive[name] = window_next[name]
                dead_of[name] = (dead[2 * j], dead[2 * j + 1])
        ran = sorted((-order[i], i) for i in range(m) if order[i] != -math.inf)
        if not ran:
            return []
        self._window_samples += 1
        stats = []
        for _, i in ran:
            name = names[i]
            kind = self.kinds.get(name, "")
            d = dead_of.get(name)
            stats.append(
                ModuleStat(
                    name,
                    type(self.modules[name]).__name__,
                    kind,
                    rms[1 + i],
                    dead_batch=d[0] if d is not None else None,
                    dead_window=d[1] if d is not None else None,
                    saturated=sat[i] if kind == "bounded" else None,
                )
            )
        self.last_order = [names[i] for _, i in ran]
        return [
            ActivationSample(
                run.flush_step,
                tuple(stats),
                input_rms=rms[0] if input_count > 0 else None,
                window_samples=min(self._window_samples, self.window),
                window=self.window,
            )
        ]


def _dead_fractions(windows: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """For each module's window of alive masks (oldest first, the current batch last): the fraction of its units
    that never fired in the current batch, and in the whole window. A few kernels for all modules together where
    the windows have one length (the usual case), else one module at a time."""
    length = len(windows[0])
    if any(len(w) != length for w in windows):
        batch = torch.stack([N.dead_fraction(w[-1:]) for w in windows])
        return batch, torch.stack([N.dead_fraction(w) for w in windows])
    device = windows[0][-1].device
    units = [w[-1].numel() for w in windows]
    segment = torch.repeat_interleave(torch.arange(len(units), device=device), torch.tensor(units, device=device))
    size = torch.tensor(units, dtype=torch.float32, device=device)  # 0 units: nan, as N.dead_fraction gives
    per_sample = torch.stack([torch.cat([w[i].reshape(-1) for w in windows]) for i in range(length)])  # (L, units)

    def dead(alive: Tensor) -> Tensor:
        fired = torch.zeros(len(units), device=device).index_add_(0, segment, alive.float())
        return 1.0 - fired / size

    return dead(per_sample[-1]), dead(per_sample.any(0))


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

    Under DDP each rank sees its shard of the batch. At each logging step the ranks' statistics are reduced
    (torchmetrics states: a sum and a max, two small collectives; at the first logging step of a fit one more
    max and a host read agree on the unit counts) so that rank zero reports the global batch. Exact: the RMS
    and the saturated fraction over all ranks' outputs, and the dead fractions (a unit is dead only if it
    fired on no rank; per batch, and over the window). A module that ran on some ranks only is measured over
    those; the order of the modules is the earliest position any rank saw. The flush of a failed fit reports
    rank zero's shard only.

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
