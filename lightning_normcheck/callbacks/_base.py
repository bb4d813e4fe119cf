"""Plumbing shared by every lightning_normcheck callback.

A public callback is a thin Lightning :class:`~lightning.pytorch.callbacks.Callback` that owns one or
more *monitors* (:class:`_Monitor`). The callback decides *when* (cadence, sampled steps), keeps one
:class:`_Run` per fit (the parameter-to-layer map, the gradient norms of the current optimizer step,
the pending metrics) and does all emission: one host transfer and one ``logger.log_metrics`` call per
logger per logging step, rank zero only. Monitors measure (with :mod:`lightning_normcheck.norms`) and
diagnose (with :mod:`lightning_normcheck.diagnosis`). A monitor that raises is switched off with one
warning; the user's training goes on.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn as _rank_zero_warn
from torch import Tensor

from lightning_normcheck import norms as N
from lightning_normcheck.findings import Finding, FindingLog

log = logging.getLogger("lightning_normcheck")


def rank_zero_warn(message: str, category: type[Warning] = UserWarning) -> None:
    """Lightning's rank_zero_warn that can never raise into training (e.g. under ``-W error``)."""
    try:
        _rank_zero_warn(message, category=category)
    except Exception:  # noqa: BLE001
        log.warning("%s", message)


#: Steps below this are sampled densely so that a problem present from the start is reported
#: within the first 20 optimizer steps, whatever ``log_every_n_steps`` is.
EARLY_STEPS = 20


def _check_int(owner: str, name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")


def _check_float(
    owner: str,
    name: str,
    value: Any,
    low: float = 0.0,
    high: float = math.inf,
    allow_none: bool = False,
    low_inclusive: bool = False,
) -> None:
    if value is None and allow_none:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value >= low if low_inclusive else value > low) and value <= high
    if not ok:
        bracket = "[" if low_inclusive else "("
        allowed = f"a number in {bracket}{low}, {high}]" + (" or None" if allow_none else "")
        raise ValueError(f"{owner}: `{name}` must be {allowed}, got {value!r}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: `{name}` must be True or False, got {value!r}")


def _check_str_list(owner: str, name: str, value: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{owner}: `{name}` must be a list of strings{' or None' if allow_none else ''}, got {value!r}")


def _check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {choices}, got {value!r}")


def _is_default(sig: inspect.Signature, name: str, value: Any) -> bool:
    param = sig.parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return False
    try:
        default = param.default
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, default))
        return (numeric or type(value) is type(default)) and bool(value == default)
    except Exception:  # noqa: BLE001
        return False


def _plain(obj: Any) -> Any:
    """``obj`` as types ``torch.load(weights_only=True)`` accepts: containers, numbers, strings, CPU tensors."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {
            (k if isinstance(k, (str, int, float, bool, tuple)) or k is None else str(k)): _plain(v)
            for k, v in obj.items()
        }
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, (list, set, frozenset)) or hasattr(obj, "maxlen"):  # deque
        return [_plain(v) for v in obj]
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj)
    return repr(obj)


def compiled_prefixes(module: torch.nn.Module) -> list[str]:
    """Names of the submodules of ``module`` whose forward runs as ``torch.compile``'d code ("" for all of it).

    ``torch.compile(m)`` (an ``OptimizedModule``), ``m.compile()``, and a LightningModule compiled whole
    (``torch.compile(lightning_module)``, which Lightning unwraps with ``from_compiled``). Forward hooks added
    inside such code after its first trace are not seen (Dynamo does not guard on them), and extra forward
    passes with other shapes or without gradients recompile it.
    """
    if getattr(module, "_compiler_ctx", None):
        return [""]
    out: list[str] = []
    for name, m in module.named_modules():
        if in_prefixes(name, out):  # inside a compiled module already listed
            continue
        # OptimizedModule by name: importing torch._dynamo to check the type would cost a second at setup
        optimized = type(m).__name__ == "OptimizedModule" and hasattr(m, "_orig_mod")
        if optimized or getattr(m, "_compiled_call_impl", None) is not None:
            if not name:
                return [""]
            out.append(name)
    return out


def in_prefixes(name: str, prefixes: list[str]) -> bool:
    """Whether module ``name`` is one of ``prefixes`` or inside one ("" contains every name)."""
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


class _GradStats:
    """Gradient norms of one optimizer step, computed once and shared by the monitors."""

    __slots__ = ("params", "grads", "layers", "layer_index", "norms", "total", "step")

    def __init__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        layers: list[int],
        layer_index: Tensor,
        step: int,
        plan: N.NormPlan | None = None,
    ) -> None:
        self.params = params
        self.grads = grads
        self.layers = layers  # layer index of each gradient (host list, built at setup)
        self.layer_index = layer_index
        self.step = step
        self.norms = plan.norms(grads) if plan is not None else N.tensor_norms(grads)
        self.total = N.total_norm(self.norms)


class _Run:
    """Per-fit state shared by the monitors of one callback."""

    def __init__(self, owner: _NormCheckBase, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.owner = owner
        self.trainer = trainer
        self.module_ref = weakref.ref(pl_module)
        self.every = owner.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        self.findings = owner._findings
        self.is_global_zero = bool(trainer.is_global_zero)
        self.findings.enabled = self.is_global_zero
        # parameter -> layer (owning module) map; named_parameters() already counts tied weights once
        self.layer_names: list[str] = []
        self.param_layer: dict[int, int] = {}
        self.param_name: dict[int, str] = {}
        layer_pos: dict[str, int] = {}
        for name, p in pl_module.named_parameters():
            layer = name.rsplit(".", 1)[0] if "." in name else ""
            if layer not in layer_pos:
                layer_pos[layer] = len(self.layer_names)
                self.layer_names.append(layer)
            self.param_layer[id(p)] = layer_pos[layer]
            self.param_name[id(p)] = name
        self.metrics: dict[str, Tensor] = {}
        self.blocks: list[tuple[list[str], Tensor]] = []  # add_metrics: (names, 1-D tensor of their values)
        self.series: list[tuple[int, str, Tensor]] = []
        self.flush_due = False
        self.flush_step = 0
        self.flushed_series: list[tuple[int, str, float]] = []  # per-step values of the last flush
        self.probing = False  # True while a probe runs extra forward passes: hooks must ignore them
        self._grad_cache: dict[int, _GradStats] = {}
        self._opt_index: dict[int, tuple[list[Tensor], list[int], Tensor]] = {}
        self._opt_plan: dict[int, N.NormPlan | None] = {}  # id(optimizer) -> fast gradient-norm plan (or None)
        self._sub_index: dict[tuple[int, tuple[int, ...]], tuple[list[int], Tensor, N.NormPlan | None]] = {}

    @property
    def pl_module(self) -> pl.LightningModule:
        m = self.module_ref()
        assert m is not None
        return m

    @property
    def step(self) -> int:
        return int(self.trainer.global_step)

    def is_due(self, step: int) -> bool:
        if step % self.every == 0:
            return True
        return step < EARLY_STEPS and (step < 4 or step % 2 == 0)

    def layer_label(self, index: int) -> str:
        name = self.layer_names[index]
        return name or "<root>"

    def optimizer_params(self, optimizer: torch.optim.Optimizer) -> tuple[list[Tensor], list[int], Tensor]:
        """The unique trainable parameters of ``optimizer``, their layer indices, and those as a tensor."""
        key = id(optimizer)
        if key not in self._opt_index:
            seen: set[int] = set()
            params: list[Tensor] = []
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen or id(p) not in self.param_layer:
                        continue
                    seen.add(id(p))
                    params.append(p)
            layers = [self.param_layer[id(p)] for p in params]
            self._opt_index[key] = (params, layers, torch.tensor(layers, dtype=torch.long))
        return self._opt_index[key]

    def grad_stats(self, optimizer: torch.optim.Optimizer) -> _GradStats:
        """Per-tensor and total gradient norms for this optimizer step (one fused pass, cached)."""
        step = self.step
        cached = self._grad_cache.get(id(optimizer))
        if cached is not None and cached.step == step:
            return cached
        params, layers, index = self.optimizer_params(optimizer)
        key = id(optimizer)
        if key not in self._opt_plan:
            self._opt_plan[key] = N.norm_plan(params)
        grads = [p.grad for p in params]
        if not any(g is None for g in grads):
            stats = _GradStats(params, grads, layers, index, step, self._opt_plan[key])  # type: ignore[arg-type]
        else:
            with_grad = tuple(i for i, g in enumerate(grads) if g is not None)  # frozen: grad is None
            sub_params = [params[i] for i in with_grad]
            sub_key = (key, with_grad)  # the same parameters are usually frozen at every step
            if sub_key not in self._sub_index:
                sub = [layers[i] for i in with_grad]
                plan = N.NormPlan(sub_params) if self._opt_plan[key] is not None and sub_params else None
                self._sub_index = {sub_key: (sub, torch.tensor(sub, dtype=torch.long), plan)}
            sub, sub_index, plan = self._sub_index[sub_key]
            stats = _GradStats(
                sub_params,
                [grads[i] for i in with_grad],  # type: ignore[misc]
                sub,
                sub_index,
                step,
                plan,
            )
        self._grad_cache = {id(optimizer): stats}
        return stats

    # emission -------------------------------------------------------------------------------------
    def add_metric(self, name: str, value: Tensor) -> None:
        """Queue a scalar for the next flush; names starting with ``_`` are for diagnosis only."""
        self.metrics[name] = value

    def add_metrics(self, prefix: str, values: Tensor, labels: list[str]) -> None:
        """Queue a vector of scalars named ``prefix + label`` (kept as one tensor until the transfer)."""
        if len(labels) != values.numel():  # a prefix of a longer vector: one by one
            for i, label in enumerate(labels):
                self.metrics[f"{prefix}{label}"] = values.reshape(-1)[i]
            return
        self.blocks.append(([f"{prefix}{label}" for label in labels], values))

    def add_series(self, step: int, name: str, value: Tensor) -> None:
        """Queue a per-step scalar (logged at its own step at the next flush)."""
        self.series.append((step, name, value))

    @property
    def pending(self) -> bool:
        """Whether anything is queued for the next flush."""
        return bool(self.metrics or self.blocks or self.series)

    def transfer(self) -> tuple[dict[str, float], list[tuple[int, str, float]]]:
        """Move every queued scalar to the host in one transfer (vectors stay whole: one copy each, no loop)."""
        blocks, self.blocks = self.blocks, []
        names = [n for block_names, _ in blocks for n in block_names] + list(self.metrics)
        scalars = [self.metrics[n].detach().reshape(()) for n in self.metrics] + [
            t.detach().reshape(()) for _, _, t in self.series
        ]
        self.metrics = {}
        series_keys = [(s, n) for s, n, _ in self.series]
        self.series = []
        if not names and not series_keys:
            return {}, []
        device = blocks[0][1].device if blocks else scalars[0].device
        parts = [v.detach().reshape(-1).to(device=device, dtype=torch.float32) for _, v in blocks]
        if scalars:
            parts.append(torch.stack([t.to(device=device, dtype=torch.float32) for t in scalars]))
        flat = torch.cat(parts).cpu().tolist()
        values = dict(zip(names, flat[: len(names)]))
        series = [(s, n, v) for (s, n), v in zip(series_keys, flat[len(names) :])]
        return values, series

    def emit(self, values: dict[str, float], series: list[tuple[int, str, float]], step: int) -> None:
        if not self.is_global_zero or not self.trainer.loggers:
            return
        public = {k: v for k, v in values.items() if not k.startswith("_")}
        by_step: dict[int, dict[str, float]] = {}
        for s, n, v in series:
            by_step.setdefault(s, {})[n] = v
        for logger in self.trainer.loggers:
            for s in sorted(by_step):
                row = by_step[s]
                if s == step:
                    row = {**row, **public}
                _log_metrics(logger, row, s)
            if public and step not in by_step:
                _log_metrics(logger, public, step)


#: Values also put in ``trainer.callback_metrics`` at each logging step (every rank: they are the same there),
#: so ``EarlyStopping``/``ModelCheckpoint`` can monitor them.
HEADLINE_KEYS = ("normcheck/grad_norm/total", "normcheck/clip/rate")


def _publish_headline(trainer: Any, values: dict[str, float], series: list[tuple[int, str, float]]) -> None:
    try:
        metrics = trainer.callback_metrics
        for key in HEADLINE_KEYS:
            # per-step series are in step order: the last entry of a key is the latest step's
            value = next((v for _, n, v in reversed(series) if n == key), values.get(key))
            if value is not None:
                metrics[key] = torch.tensor(value)
    except Exception:  # noqa: BLE001 - a convenience: never a reason for a monitor to fail
        pass


def _log_metrics(logger: Any, row: dict[str, float], step: int) -> None:
    """One ``logger.log_metrics(row, step=step)`` call: Lightning's logger API, whatever the logger."""
    logger.log_metrics(row, step=step)


class _Monitor:
    """One kind of measurement. Every hook is optional; the owner isolates failures."""

    name = "monitor"

    def setup(self, run: _Run) -> None: ...

    def on_train_start(self, run: _Run) -> None: ...

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None: ...

    def on_before_backward(self, run: _Run, loss: Tensor) -> None: ...

    def on_after_backward(self, run: _Run) -> None: ...

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None: ...

    def on_train_batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None: ...

    def collect(self, run: _Run) -> None:
        """At a flush: queue device tensors with ``run.add_metric``."""

    def diagnose(self, run: _Run, values: dict[str, float], step: int) -> None:
        """At a flush, on host values: report findings."""

    def on_exception(self, run: _Run, exception: BaseException) -> None: ...

    def remove_hooks(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _NormCheckBase(Callback):
    """Common machinery of the lightning_normcheck callbacks (not used directly)."""

    STATE_VERSION = 1
    _init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _NormCheckBase:
        self = super().__new__(cls)
        # the arguments given (not the defaults) make the checkpoint key: two differently configured
        # instances in one Trainer do not collide, and the same configuration finds its state on resume
        try:
            sig = inspect.signature(cls.__init__)
            bound = sig.bind_partial(None, *args, **kwargs).arguments
            self._init_args = {k: v for i, (k, v) in enumerate(bound.items()) if i > 0 and not _is_default(sig, k, v)}
        except TypeError:  # wrong arguments: __init__ raises the proper error
            self._init_args = {}
        return self

    @property
    def state_key(self) -> str:
        """``NormCheck{...}``: the class name and the arguments given, so that instances do not collide."""
        args = getattr(self, "_init_args", {})
        return self._generate_state_key(**{k: args[k] for k in sorted(args)})

    def __init__(self, log_every_n_steps: int | None = None, print_summary: bool = True) -> None:
        owner = type(self).__name__
        _check_int(owner, "log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        _check_bool(owner, "print_summary", print_summary)
        self.log_every_n_steps = log_every_n_steps
        self.print_summary = print_summary
        self._findings = FindingLog()
        self._monitors: list[_Monitor] = []
        self._disabled: set[str] = set()
        self._removal_pending: list[_Monitor] = []
        self._run: _Run | None = None
        self._pending_state: dict[str, Any] | None = None
        self._new_findings: list[Finding] = []
        self._findings.listeners.append(self._new_findings.append)

    def __getstate__(self) -> dict[str, Any]:
        # the per-fit run (trainer, weak model reference) is rebuilt at the next setup: a used callback
        # can be pickled (ddp_spawn) and deep-copied
        state = dict(self.__dict__)
        state["_run"] = None
        state["_removal_pending"] = []
        return state

    # public API -------------------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, one per (code, layer)."""
        return self._findings.findings

    @property
    def disabled_monitors(self) -> list[str]:
        """Monitors switched off after failing (each reported once as a warning)."""
        return sorted(self._disabled)

    def summary(self) -> str:
        """The findings as a short table."""
        return self._findings.table()

    # isolation ------------------------------------------------------------------------------------------
    def _active(self) -> list[_Monitor]:
        return [m for m in self._monitors if m.name not in self._disabled]

    def _disable(self, monitor: _Monitor, error: BaseException, inside_hook: bool = False) -> None:
        if monitor.name in self._disabled:
            return
        self._disabled.add(monitor.name)
        rank_zero_warn(
            f"lightning_normcheck: the {monitor.name} monitor failed ({type(error).__name__}: {error}) and is"
            " switched off for the rest of this fit; training goes on unchanged.",
            category=RuntimeWarning,
        )
        if inside_hook:
            # torch may be iterating over the dict that holds this hook (optimizer step hooks iterate it
            # live): removing now would raise "mutated during iteration" in the user's step. The wrapper
            # is already a no-op; the handles go at the next Lightning hook.
            self._removal_pending.append(monitor)
            return
        self._remove_monitor_hooks(monitor)

    @staticmethod
    def _remove_monitor_hooks(monitor: _Monitor) -> None:
        try:
            monitor.remove_hooks()
        except Exception:  # noqa: BLE001 - best effort while already failing
            pass

    def _drain_removals(self) -> None:
        while self._removal_pending:
            self._remove_monitor_hooks(self._removal_pending.pop())

    def _safely(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run a piece of the shared plumbing; if it fails, switch every monitor off (one warning)."""
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001 - a monitor must never break training
            if len(self._disabled) < len(self._monitors):
                rank_zero_warn(
                    f"lightning_normcheck: {type(self).__name__} failed ({type(err).__name__}: {err}) and is"
                    " switched off for the rest of this fit; training goes on unchanged.",
                    category=RuntimeWarning,
                )
            self._disabled.update(m.name for m in self._monitors)
            self._teardown_hooks()

    def _call(self, method: str, *args: Any) -> None:
        if self._removal_pending:
            self._drain_removals()
        run = self._run
        if run is None:
            return
        for m in self._active():
            try:
                getattr(m, method)(run, *args)
            except Exception as err:  # noqa: BLE001 - a monitor must never break training
                self._disable(m, err)

    def _guard(self, monitor: _Monitor, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a hook that runs inside the user's code (forward/optimizer hooks): never raise."""

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if monitor.name in self._disabled:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                # module hooks run from a copy of the hook dict: safe to remove them at once
                self._disable(monitor, err, inside_hook=not (args and isinstance(args[0], torch.nn.Module)))
                return None

        return wrapped

    # flushing ---------------------------------------------------------------------------------------------
    def _flush(self, step: int) -> None:
        run = self._run
        if run is None:
            return
        self._call("collect")
        values, series = run.transfer()
        _publish_headline(run.trainer, values, series)
        try:
            run.emit(values, series, step)
        except Exception as err:  # noqa: BLE001 - a broken logger must not stop diagnosis
            rank_zero_warn(f"lightning_normcheck: logging metrics failed: {err!r}", category=RuntimeWarning)
        run.flushed_series = series
        self._call("diagnose", values, step)
        self._publish_new_findings(step)

    def _publish_new_findings(self, step: int) -> None:
        if not self._new_findings or self._run is None:
            return
        new, self._new_findings[:] = list(self._new_findings), []
        if not self._run.is_global_zero:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        text = "\n\n".join(f"**{f.severity}** `{f.code}` {f.layer or ''} (step {f.step}): {f.message}" for f in new)
        for logger in self._run.trainer.loggers:
            try:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_text("normcheck/findings", text, global_step=step)
            except Exception:  # noqa: BLE001
                pass
        # Findings reach Python logging (logger "lightning_normcheck") when recorded; they are not raised as
        # `warnings` too: that printed each one twice, and `-W error` would turn a finding into a crash.

    # Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._teardown_hooks()
        self._disabled = set()
        self._run = None
        self._safely(self._start_run, trainer, pl_module)

    def _start_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._run = _Run(self, trainer, pl_module)
        self._call("setup")
        if self._pending_state is not None:
            self._load_monitor_state(self._pending_state)
            self._pending_state = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._call("on_train_start")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._call("on_train_batch_start", batch, batch_idx)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._call("on_before_backward", loss)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._call("on_after_backward")

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Runs after backward (gradients accumulated and AMP-unscaled) and before Lightning clips."""
        run = self._run
        if run is None:
            return
        if run.is_due(run.step):
            run.flush_due = True
            run.flush_step = run.step
        self._call("on_before_optimizer_step", optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = self._run
        if run is None:
            return
        self._call("on_train_batch_end", outputs, batch, batch_idx)
        if run.flush_due:
            run.flush_due = False
            self._safely(self._flush, run.flush_step)
        # the optimizer is done with these gradients: holding them would keep a copy alive past zero_grad
        run._grad_cache = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is not None and run.pending:
            self._safely(self._flush, max(0, run.step - 1))
        if run is not None:
            run._grad_cache = {}
        self._teardown_hooks()
        if self.print_summary and trainer.is_global_zero:
            print(self.summary(), file=sys.stdout, flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        run = self._run
        # only an exception of this fit: one in a later validate/test/predict is not a training problem
        if run is None or run.trainer is not trainer or getattr(trainer.state, "fn", None) != "fit":
            return
        try:
            self._flush(run.step)
        except Exception:  # noqa: BLE001 - never mask the user's exception
            pass
        try:  # never mask the user's exception, and always take the hooks off
            self._call("on_exception", exception)
            self._publish_new_findings(run.step)
        except Exception:  # noqa: BLE001
            pass
        finally:
            run._grad_cache = {}
            self._teardown_hooks()
        if self.print_summary and trainer.is_global_zero and self.findings:
            print(self.summary(), file=sys.stderr, flush=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._teardown_hooks()

    def _teardown_hooks(self) -> None:
        self._removal_pending = []
        for m in self._monitors:
            try:
                m.remove_hooks()
            except Exception:  # noqa: BLE001
                pass

    # checkpointing -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        monitors = {}
        for m in self._monitors:
            try:
                monitors[m.name] = m.state_dict()
            except Exception:  # noqa: BLE001
                monitors[m.name] = {}
        try:
            findings = self._findings.state_dict()
        except Exception:  # noqa: BLE001 - a checkpoint must never fail because of a monitor
            findings = {}
        # plain types only: Lightning may resume with torch.load(weights_only=True)
        return _plain({"version": self.STATE_VERSION, "findings": findings, "monitors": monitors})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._findings.load_state_dict(state_dict.get("findings", {}))
        except Exception as err:  # noqa: BLE001 - a resume must never fail because of a monitor
            rank_zero_warn(f"lightning_normcheck: could not restore the findings: {err!r}")
        monitors = state_dict.get("monitors", {})
        if self._run is None:
            self._pending_state = monitors  # restored at setup, once the model is known
        else:
            self._load_monitor_state(monitors)

    def _load_monitor_state(self, monitors: dict[str, Any]) -> None:
        for m in self._monitors:
            if m.name in monitors:
                try:
                    m.load_state_dict(monitors[m.name])
                except Exception as err:  # noqa: BLE001
                    rank_zero_warn(f"lightning_normcheck: could not restore {m.name} state: {err!r}")
