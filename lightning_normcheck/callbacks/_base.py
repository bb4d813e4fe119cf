"""The callback base: when to measure, and the path monitor -> record -> rule -> finding -> emission.

A public callback is a thin Lightning :class:`~lightning.pytorch.callbacks.Callback` that owns one or more
*monitors* (:class:`_Monitor`) and one :class:`~lightning_normcheck.diagnosis.Diagnosis`. Monitors measure
on the device (with :mod:`lightning_normcheck.norms`) and stage their tensors; at each logging step the
callback moves every staged tensor to the host in one transfer, each monitor turns its numbers into typed
records, :mod:`._emission` names them and sends one ``log_metrics`` call per logger per step (rank zero),
and the diagnosis turns the records into findings. The pieces: :mod:`._args` (argument checks),
:mod:`._run` (per-fit run state), :mod:`._emission`, :mod:`._isolation` (a failing monitor or rule family is
reported once and switched off; training goes on), :mod:`._clip_reuse` (Lightning's clip by norm with the total
the monitors measured).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import numbers
import sys
import time
from collections.abc import Hashable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_normcheck import profiles as _profiles
from lightning_normcheck.callbacks import _clip_reuse, _emission
from lightning_normcheck.callbacks._args import _check_bool, _check_choice, _check_float, _check_int, _check_type
from lightning_normcheck.callbacks._budget import _Budget
from lightning_normcheck.callbacks._isolation import _Isolation, failure_message, rank_zero_warn
from lightning_normcheck.callbacks._run import EARLY_STEPS, _Run, compiled_prefixes, in_prefixes
from lightning_normcheck.diagnosis.engine import Diagnosis, Rules
from lightning_normcheck.diagnosis.findings import Finding
from lightning_normcheck.diagnosis.records import ActivationSample, InitStats, Record, RunInfo, TrainingError
from lightning_normcheck.diagnosis.registry import SEVERITIES
from lightning_normcheck.diagnosis.thresholds import Thresholds

log = logging.getLogger("lightning_normcheck")

#: Arguments that change how findings are shown or acted on, or what watching may cost, not what is concluded:
#: left out of the checkpoint key, so a run resumed with ``print_summary=False``, another ``stop_on``, another
#: ``max_overhead`` or without pictures finds its state.
COSMETIC_ARGS = frozenset({"print_summary", "stop_on", "depth_profiles", "max_overhead"})

#: Depth-profile images (:meth:`_NormCheckBase._update_profiles`): drawing the four kinds and writing them to a
#: TensorBoard and a CSV logger takes 0.5-1.5 s (hook_time.py's three models, 2-core CPU, matplotlib Agg);
#: feeding the book costs 0.02-0.13 ms per logging step. So the pictures are written at the end of fit (and on an
#: exception), and during the fit at a logging step once PROFILE_INTERVAL_S seconds have passed since the start
#: and since the last ones, and no sooner than PROFILE_COST_FACTOR times what those took: at most 1% of the wall
#: time, whatever the model and the logging cadence (a run shorter than that interval draws once, at its end).
PROFILE_INTERVAL_S = 300.0
PROFILE_COST_FACTOR = 100.0
_said_no_matplotlib = False  # the "no matplotlib" info line is said once per process


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


def _is_default(sig: inspect.Signature, name: str, value: Any) -> bool:
    param = sig.parameters.get(name)
    if param is None or param.default is inspect.Parameter.empty:
        return False
    try:
        default = param.default
        if value is None or default is None:
            return value is default or (name == "thresholds" and value == Thresholds())
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (value, default))
        return (numeric or type(value) is type(default)) and bool(value == default)
    except Exception:  # noqa: BLE001
        return False


class _Monitor:
    """One kind of measurement. Every hook is optional; the owner isolates failures.

    At a logging step the owner calls :meth:`collect` (stage device tensors with ``run.stage(key, tensor)``),
    moves everything staged to the host in one transfer, then calls :meth:`records` with the host values
    (``host[key]``: a float for a 0-d tensor, a list of floats for a 1-D one).
    """

    name = "monitor"

    def setup(self, run: _Run) -> None: ...

    def on_train_start(self, run: _Run) -> None: ...

    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None: ...

    def on_before_backward(self, run: _Run, loss: Tensor) -> None: ...

    def on_after_backward(self, run: _Run) -> None: ...

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None: ...

    def on_train_batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None: ...

    def pending(self) -> bool:
        """Whether measurements wait for a logging step (the end of fit flushes them)."""
        return False

    def collect(self, run: _Run) -> None:
        """At a logging step: stage device tensors with ``run.stage``."""

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        """Right after the transfer: the records of this logging step."""
        return []

    def run_info(self, run: _Run, info: RunInfo) -> RunInfo:
        """At setup: add what this monitor knows about the run (``dataclasses.replace``)."""
        return info

    def on_exception(self, run: _Run, error: TrainingError) -> TrainingError:
        """Training raised: add what this monitor knows to the error record."""
        return error

    def describe(self) -> dict[str, Any]:
        """At the start of fit: what this monitor adds to the run description (:func:`._emission.publish_run`)
        that its logged scalars lose, as JSON-ready values."""
        return {}

    def remove_hooks(self) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _lr_arg(pl_module: pl.LightningModule, optimizers: list[Any]) -> str | None:
    """The model hyperparameter that set the first optimizer's learning rate (``lr``, ``learning_rate``...):
    a LightningCLI user changes it with ``--model.<name>=...``; ``None`` when no hyperparameter matches."""
    try:
        lr = float(optimizers[0].param_groups[0]["lr"])
        hparams = dict(getattr(pl_module, "hparams", {}) or {})
    except Exception:  # noqa: BLE001 - a convenience
        return None
    for name in ("lr", "learning_rate", "base_lr", "max_lr"):
        value = hparams.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isclose(float(value), lr):
            return name
    return None


class _NormCheckBase(_Isolation, Callback):
    """Common machinery of the lightning_normcheck callbacks (not used directly)."""

    STATE_VERSION = 2
    _init_args: dict[str, Any]

    def __new__(cls, *args: Any, **kwargs: Any) -> _NormCheckBase:
        self = super().__new__(cls)
        # the arguments given (not the defaults, not the cosmetic ones) make the checkpoint key: two differently
        # configured instances in one Trainer do not collide, and the same configuration finds its state on resume
        try:
            sig = inspect.signature(cls.__init__)
            bound = sig.bind_partial(None, *args, **kwargs).arguments
            self._init_args = {
                k: v
                for i, (k, v) in enumerate(bound.items())
                if i > 0 and k not in COSMETIC_ARGS and not _is_default(sig, k, v)
            }
        except TypeError:  # wrong arguments: __init__ raises the proper error
            self._init_args = {}
        return self

    @property
    def state_key(self) -> str:
        """``NormCheck{...}``: the class name and the arguments that distinguish two instances (not cosmetic ones).

        Made once: Lightning reads it for every hook it calls (0.7 us each time to format, on every step)."""
        key: str | None = self.__dict__.get("_state_key")
        if key is None:
            args = getattr(self, "_init_args", {})
            key = self.__dict__["_state_key"] = self._generate_state_key(**{k: args[k] for k in sorted(args)})
        return key

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
        stop_on: Literal["warning", "error"] | None = None,
        depth_profiles: bool = True,
        max_overhead: float | None = None,
    ) -> None:
        owner = type(self).__name__
        _check_int(owner, "log_every_n_steps", log_every_n_steps, 1, allow_none=True)
        _check_bool(owner, "print_summary", print_summary)
        _check_type(owner, "thresholds", thresholds, Thresholds)
        _check_choice(owner, "stop_on", stop_on, (None, "warning", "error"))
        _check_bool(owner, "depth_profiles", depth_profiles)
        _check_float(owner, "max_overhead", max_overhead, 0.0, 1.0, allow_none=True)
        self.log_every_n_steps = log_every_n_steps
        self.max_overhead = None if max_overhead is None else float(max_overhead)
        self._budget: _Budget | None = None
        self._pending_budget: dict[str, Any] | None = None
        self.print_summary = print_summary
        self.depth_profiles = depth_profiles
        self._book: _profiles.ProfileBook | None = None  # this fit's depth profiles (rank zero)
        self._images = False  # whether the profiles are drawn for the loggers
        self._images_next: float | None = None  # time.monotonic() after which the next pictures may be drawn
        self._images_last: list[_profiles.Profile] = []  # the profiles last drawn
        self.stop_on = stop_on
        self.stopped_by: Finding | None = None  # the finding that stopped training (``stop_on``)
        self.thresholds = thresholds if thresholds is not None else Thresholds()
        self._diagnosis = Diagnosis(self.thresholds, on_error=self._rules_failed)
        self._findings = self._diagnosis.log
        self._monitors: list[_Monitor] = []
        self._disabled: set[str] = set()
        self._removal_pending: list[_Monitor] = []
        self._run: _Run | None = None
        self._clip_reuse: _clip_reuse._ClipReuse | None = None  # Lightning's clip by norm reusing our total
        self._pending_state: dict[str, Any] | None = None
        self._new_findings: list[Finding] = []
        self._findings.listeners.append(self._new_findings.append)

    def __getstate__(self) -> dict[str, Any]:
        # the per-fit run (trainer, weak model reference) is rebuilt at the next setup: a used callback
        # can be pickled (ddp_spawn) and deep-copied
        state = dict(self.__dict__)
        state["_run"] = None
        state["_clip_reuse"] = None
        state["_budget"] = None
        state["_removal_pending"] = []
        state.pop("_handler_cache", None)  # keyed by object ids of this process
        return state

    # public API -------------------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """Every finding so far, one per (code, layer)."""
        return self._findings.findings

    @property
    def disabled_monitors(self) -> list[str]:
        """Monitors (and rule families, as ``"<family> rules"``) switched off after failing."""
        return sorted(self._disabled | {f"{name} rules" for name in self._diagnosis.disabled})

    def profiles(self) -> list[_profiles.Profile]:
        """The depth profiles of this fit so far (:mod:`lightning_normcheck.profiles`; ``[]`` with
        ``depth_profiles=False`` and on ranks other than zero), each layer named in a warning or error finding (of
        any lightning_normcheck callback of the Trainer) marked. ``lightning_normcheck.profiles.figure(p)`` draws
        one."""
        if self._book is None:
            return []
        return self._book.profiles(self._ours_findings(self._run) if self._run is not None else self.findings)

    def summary(self) -> str:
        """The findings as a short story: a table with one row per code (worst first, the layers it covers, its
        first step, the one-line fix), then each finding in full, once."""
        return _emission.findings_report(self.findings)

    def _rules_failed(self, rules: Rules, error: Exception) -> None:
        rank_zero_warn(failure_message(f"the {rules.name} rules", error), category=RuntimeWarning)

    # records -> findings -----------------------------------------------------------------------------------
    def _observe(self, step: int, records: list[Record]) -> None:
        self._diagnosis.observe(step, records)

    def _flush(self, step: int, together: bool = True) -> None:
        """``together``: every rank flushes here too (a logging step, the end of fit), so sharded norms can be
        reduced; after an exception (maybe on one rank only) they are dropped instead."""
        run = self._run
        if run is None:
            return
        self._call("collect")
        budget = self._budget
        if budget is not None and budget.host_only:  # CUDA: the copy waits for the user's queued kernels too
            t0 = budget.clock()
            host = run.transfer(reduce=together)
            budget.spent -= budget.clock() - t0
        else:
            host = run.transfer(reduce=together)
        records: list[Record] = []
        for m in self._active():
            try:
                records += m.records(run, host)
            except Exception as err:  # noqa: BLE001 - a monitor must never break training
                self._disable(m, err)
        rows = _emission.metric_rows(records, step)
        if budget is not None:
            _emission.add_cadence(rows, step, run.cadence(step))
        _emission.publish_headline(run.trainer, rows)
        self._observe(step, records)  # first: the finding counts logged with this step's metrics include its own
        if run.is_global_zero and run.trainer.loggers:
            try:
                rows.setdefault(step, {}).update(_emission.finding_counts(self._ours_findings(run)))
                _emission.log_rows(run.trainer.loggers, rows)
            except Exception as err:  # noqa: BLE001 - a broken logger must not stop diagnosis
                rank_zero_warn(f"lightning_normcheck: logging metrics failed: {err!r}", category=RuntimeWarning)
        self._publish_forward_order(step, records)
        self._publish_new_findings(step)
        self._update_profiles(run, step, records)

    def _publish_new_findings(self, step: int, final: bool = False) -> None:
        """When a finding is new or escalated (``final``: at the end of fit or on an exception, always), every
        finding of this Trainer's lightning_normcheck callbacks to each logger's own place; rank zero only."""
        run = self._run
        if run is None or not (self._new_findings or final):
            return
        self._new_findings.clear()
        if not run.is_global_zero or not run.trainer.loggers:
            return
        try:  # the callbacks of one Trainer write the same files: each writes the findings of all
            _emission.publish_findings(run.trainer.loggers, self._ours_findings(run), step)
        except Exception as err:  # noqa: BLE001 - publishing must never stop training
            rank_zero_warn(f"lightning_normcheck: publishing the findings failed: {err!r}", category=RuntimeWarning)
        # Findings reach Python logging (logger "lightning_normcheck") when recorded; they are not raised as
        # `warnings` too: that printed each one twice, and `-W error` would turn a finding into a crash.

    # the run description (for the report) -------------------------------------------------------------------
    def _publish_run(self, run: _Run, info: RunInfo, init: InitStats | None) -> None:
        """What the rules need and the logged scalars lose, once per fit, to every logger (rank zero)."""
        description: dict[str, Any] = {
            "version": _emission.RUN_VERSION,
            "run": dataclasses.asdict(info),
            "init": [dataclasses.asdict(s) for s in init.layers] if init is not None else None,
            "log_every_n_steps": run.every,
            "early_steps": EARLY_STEPS,
            "monitors": sorted(m.name for m in self._active()),
        }
        for m in self._active():
            try:
                description.update(m.describe())
            except Exception:  # noqa: BLE001 - the description is a convenience
                pass
        self._run_description = description
        fit = (id(run.trainer), run.step)
        self._run_fit = fit
        _emission.publish_run(run.trainer.loggers, description, run.step, fit)

    def _publish_forward_order(self, step: int, records: list[Record]) -> None:
        """The first activation sample shows the modules' forward order (registration order may differ): the
        description is published again with it, once per fit."""
        run, description = self._run, getattr(self, "_run_description", None)
        if (
            run is None
            or not run.is_global_zero
            or not description
            or description.get("module_order") != "registration"
        ):
            return
        sample = next((r for r in records if isinstance(r, ActivationSample)), None)
        if sample is None:
            return
        try:
            seen = {n: i for i, n in enumerate(sample.order)}
            modules = description.get("modules", [])
            ordered = sorted(modules, key=lambda d: (seen.get(d["name"], len(seen)), modules.index(d)))
            description = {**description, "modules": ordered, "module_order": "forward"}
            self._run_description = description
            _emission.publish_run(run.trainer.loggers, description, step, getattr(self, "_run_fit", None))
        except Exception:  # noqa: BLE001 - a convenience for the report: never a reason for a monitor to fail
            pass

    def _ours_findings(self, run: _Run) -> list[Finding]:
        """The findings of every lightning_normcheck callback of this Trainer (one per code and layer)."""
        ours = [cb for cb in getattr(run.trainer, "callbacks", []) if isinstance(cb, _NormCheckBase)] or [self]
        return _emission.merge_findings(cb.findings for cb in ours)

    # depth profiles --------------------------------------------------------------------------------------------
    def _start_profiles(self, run: _Run) -> None:
        """A new book for this fit (rank zero); pictures when matplotlib is installed and there is a logger."""
        global _said_no_matplotlib
        self._book, self._images, self._images_next, self._images_last = None, False, None, []
        if not (self.depth_profiles and run.is_global_zero):
            return
        self._book = _profiles.ProfileBook()
        if not run.trainer.loggers:
            return
        self._images = _profiles.available()
        if not self._images and not _said_no_matplotlib:
            _said_no_matplotlib = True
            log.info(
                "lightning_normcheck: matplotlib is not installed: no depth-profile images (pip install"
                " 'lightning-normcheck[plots]'); metrics and findings are written as usual."
            )

    def _update_profiles(self, run: _Run, step: int, records: list[Record]) -> None:
        """Feed this logging step's records to the book; draw the pictures when due (see PROFILE_INTERVAL_S)."""
        book = self._book
        if book is None:
            return
        try:
            book.add(records)
        except Exception as err:  # noqa: BLE001 - the pictures must never stop training
            self._book = None
            rank_zero_warn(failure_message("the depth profiles", err), category=RuntimeWarning)
            return
        if self._images_next is None:  # the first pictures: PROFILE_INTERVAL_S after the start of fit
            self._images_next = time.monotonic() + PROFILE_INTERVAL_S
        if step >= EARLY_STEPS and time.monotonic() >= self._images_next:
            self._write_profiles(run, step)

    def _write_profiles(self, run: _Run, step: int, final: bool = False) -> None:
        """The pictures of every kind to every logger (``final``: at the end of fit or on an exception, unless they
        would be those drawn last). A kind that another lightning_normcheck callback of this Trainer, listed
        earlier, also has is left to that one: one picture per kind."""
        book = self._book
        if not self._images or book is None:
            return
        start = time.monotonic()
        try:
            ours = [cb for cb in getattr(run.trainer, "callbacks", []) if isinstance(cb, _NormCheckBase)]
            earlier = ours[: ours.index(self)] if self in ours else []
            taken = {k for cb in earlier if cb._images and cb._book is not None for k in cb._book.kinds}
            chosen = [p for p in book.profiles(self._ours_findings(run)) if p.kind not in taken]
            if final and chosen == self._images_last:
                return
            _emission.publish_profiles(run.trainer.loggers, chosen, step)
        except Exception as err:  # noqa: BLE001 - the pictures must never stop training
            self._images = False
            rank_zero_warn(failure_message("drawing the depth-profile images", err), category=RuntimeWarning)
            return
        took = time.monotonic() - start
        if self._budget is not None:  # bounded on their own (PROFILE_COST_FACTOR): not the per-layer sampling's cost
            self._budget.spent -= took
        self._images_last = chosen
        self._images_next = time.monotonic() + max(PROFILE_INTERVAL_S, PROFILE_COST_FACTOR * took)

    # Lightning hooks ---------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._teardown_hooks()
        self._disabled = set()
        self._run = None
        self._budget = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the run starts here rather than in `setup`: `configure_model` and the strategy (FSDP2's `fully_shard`)
        # replace the parameters in between, and a run indexed before would watch the discarded ones
        self._safely(self._start_run, trainer, pl_module)

    def _start_run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run = _Run(self, trainer, pl_module)
        self._findings.enabled = run.is_global_zero
        self._start_profiles(run)
        self._check_layout(run)
        self._call("setup")
        if self._pending_state is not None:
            self._load_monitor_state(self._pending_state)
            self._pending_state = None
        # after setup: the clip tracker knows its threshold, the layout check may have switched monitors off
        self._clip_reuse = _clip_reuse.install(run, {m.name for m in self._active()})

        if self.max_overhead is not None:
            device = getattr(pl_module, "device", None)
            self._budget = _Budget(self.max_overhead, host_only=getattr(device, "type", "cpu") != "cpu")
            self._restore_cadence()

    def _restore_cadence(self) -> None:
        """A resumed run keeps the cadence its budget had stretched to (when it asks for the same base cadence)."""
        pending, self._pending_budget = self._pending_budget, None
        run = self._run
        if run is None or self._budget is None or not pending or pending.get("base") != run.base_every:
            return
        every = pending.get("every")
        if isinstance(every, int) and every > run.base_every and every % run.base_every == 0:
            run.set_cadence(every, 0)

    def _teardown_hooks(self) -> None:
        super()._teardown_hooks()
        reuse, self._clip_reuse = getattr(self, "_clip_reuse", None), None
        if reuse is not None:
            reuse.restore()

    def _check_layout(self, run: _Run) -> None:
        """Switch off, with one info line, the monitors that cannot be right for how the parameters are laid out
        across processes: every norm monitor for sharded layouts other than DTensor; for DTensor (FSDP2) the loop
        checks and the clip rate."""
        problem = run.layout_problem()
        names = {m.name for m in self._monitors}
        why: dict[str, str] = {}
        if problem is not None:
            for name in names & {"gradient_norm", "weight_drift", "clip_rate", "training_bugs"}:
                why[name] = "its norms would not be those of the full tensors"
            head = f"{problem} is not supported"
        elif run.routes is not None:
            head = "sharded parameters (DTensor): gradient and weight norms are reduced across the device mesh"
            if "training_bugs" in names:
                # measured: under FSDP2 its gradient hooks on the sharded parameters never fire (gradients reach
                # p.grad by reduce-scatter, not autograd accumulation), so every step looked like one without backward
                why["training_bugs"] = "its gradient hooks do not fire on sharded parameters"
            if "clip_rate" in names:
                clip = run.trainer.gradient_clip_val or any(getattr(m, "clip_threshold", None) for m in self._monitors)
                # it would need the total norm of each step on the device: a collective per step
                why["clip_rate"] = "it needs each step's total norm on the device" if clip else ""
        if not why:
            return
        self._disabled |= set(why)
        said = [f"{name} ({text})" for name, text in sorted(why.items()) if text]
        if said and run.is_global_zero:
            log.info("lightning_normcheck: %s; switched off for this fit: %s.", head, ", ".join(said))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._call("on_train_start")
        run = self._run
        if run is None:
            return
        if run.is_global_zero:
            _emission.publish_layout(trainer.loggers)
        algo = getattr(trainer, "gradient_clip_algorithm", None)  # a GradClipAlgorithmType: str() is its name
        info = RunInfo(
            layers=tuple(run.layer_label(i) for i in range(len(run.layer_names))),
            optimizers=tuple(type(o).__name__ for o in trainer.optimizers),
            manual=not pl_module.automatic_optimization,
            amp_scaler=getattr(getattr(trainer, "precision_plugin", None), "scaler", None) is not None,
            clip_val=float(trainer.gradient_clip_val) if trainer.gradient_clip_val else None,
            clip_algorithm=str(getattr(algo, "value", algo) or "norm"),
            lr_arg=_lr_arg(pl_module, trainer.optimizers),
        )
        for m in self._active():
            try:
                info = m.run_info(run, info)
            except Exception as err:  # noqa: BLE001
                self._disable(m, err)
        init = next((r for r in (getattr(m, "init_stats", None) for m in self._active()) if r is not None), None)
        self._diagnosis.start(info, init)
        if run.is_global_zero:
            try:
                self._publish_run(run, info, init)
            except Exception:  # noqa: BLE001 - a convenience for the report: never a reason for a monitor to fail
                pass

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        budget, run = self._budget, self._run
        if run is not None:
            run.follow_step()
        if budget is not None and run is not None:
            budget.begin_batch(run)
        self._call("on_train_batch_start", batch, batch_idx)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._budget is not None:
            self._budget.pause()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._budget is not None:
            self._budget.resume()

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
        if run.is_log_step(run.step):  # the totals and the diagnosis keep the cadence asked for
            run.flush_due = True
            run.flush_step = run.step
        self._call("on_before_optimizer_step", optimizer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        run = self._run
        if run is None:
            return
        budget = self._budget
        flushed = run.flush_due
        if budget is None:
            self._batch_end(run, outputs, batch, batch_idx)
        else:
            budget.timed(self._batch_end, run, outputs, batch, batch_idx)
            if flushed and budget.ready(run):
                self._safely(self._stretch, run, budget)
        # the optimizer is done with these gradients: holding them would keep a copy alive past zero_grad
        run._grad_cache = {}

    def _batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._call("on_train_batch_end", outputs, batch, batch_idx)
        if run.flush_due:
            run.flush_due = False
            self._safely(self._flush, run.flush_step)
            if self.stop_on is not None:
                self._maybe_stop(run.trainer)

    def _stretch(self, run: _Run, budget: _Budget) -> None:
        """At a decision point of the overhead budget: stretch the per-layer cadence (or bring it back down) so that
        the sampled steps take at most ``max_overhead`` of the step time. Never the first ``EARLY_STEPS``, never
        the total gradient norm of every step."""
        every = budget.proposal(run)
        if getattr(run.trainer, "world_size", 1) > 1:  # every rank must sample the same steps: rank zero decides
            every = int(run.trainer.strategy.broadcast(every, src=0))
        if every == run.every:
            return
        start = run.step + 1  # past the next step, whose sampling a monitor may have planned already
        run.set_cadence(every, start)
        if every > run.base_every and not budget.said and run.is_global_zero:
            budget.said = True
            log.info(
                "lightning_normcheck: the per-layer measurements took %.1f%% of the training step time (max_overhead"
                "=%g); from step %d they are taken every %d optimizer steps instead of every %d (logged as"
                " `normcheck/cadence`). The total gradient norm is still logged at every step. Raise max_overhead,"
                " or set it to None to keep the cadence.",
                100 * budget.last_share,
                budget.limit,
                start + (-start) % every,
                every,
                run.base_every,
            )

    def _maybe_stop(self, trainer: pl.Trainer) -> None:
        """Stop at the end of this step when a finding of ``stop_on`` severity or worse exists on any rank.

        Decided at logging steps only, which every rank reaches together (one collective there under DDP, as
        Lightning's EarlyStopping does), so no rank waits for another."""
        worst = self._worst_finding()
        should_stop = trainer.strategy.reduce_boolean_decision(worst is not None, all=False)
        if not should_stop or trainer.should_stop:
            trainer.should_stop = trainer.should_stop or should_stop
            return
        trainer.should_stop = True
        self.stopped_by = worst
        if trainer.is_global_zero:
            what = (
                f"{worst.severity} {worst.code}" + (f" [{worst.layer}]" if worst.layer else "")
                if worst
                else "another rank's finding"
            )
            print(
                f"lightning_normcheck: stopping training at step {trainer.global_step}: {what}"
                f" (stop_on={self.stop_on!r}).",
                file=sys.stderr,
                flush=True,
            )

    def _worst_finding(self) -> Finding | None:
        floor = SEVERITIES.index(self.stop_on)  # type: ignore[arg-type]
        found = [f for f in self._findings.findings if SEVERITIES.index(f.severity) >= floor]
        return min(found, key=lambda f: (-SEVERITIES.index(f.severity), f.step), default=None)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self._run
        if run is not None and any(m.pending() for m in self._active()):
            self._safely(self._flush, max(0, run.step - 1))
        if run is not None:
            run._grad_cache = {}
            self._publish_new_findings(max(0, run.step - 1), final=True)
            self._write_profiles(run, max(0, run.step - 1), final=True)
        self._teardown_hooks()
        if self.print_summary and trainer.is_global_zero:
            print(self.summary(), file=sys.stdout, flush=True)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        run = self._run
        # only an exception of this fit: one in a later validate/test/predict is not a training problem
        if run is None or run.trainer is not trainer or getattr(trainer.state, "fn", None) != "fit":
            return
        try:
            self._flush(run.step, together=False)
        except Exception:  # noqa: BLE001 - never mask the user's exception
            pass
        try:  # never mask the user's exception, and always take the hooks off
            self._explain(run, exception)
        except Exception:  # noqa: BLE001
            pass
        finally:
            run._grad_cache = {}
            self._teardown_hooks()
        # before Lightning finalizes the loggers: a crashed run keeps its findings files (and its pictures)
        self._publish_new_findings(run.step, final=True)
        self._write_profiles(run, run.step, final=True)
        if self.print_summary and trainer.is_global_zero and self.findings:
            print(self.summary(), file=sys.stderr, flush=True)

    def _explain(self, run: _Run, exception: BaseException) -> None:
        text = str(exception).strip()
        error = TrainingError(run.step, type(exception).__name__, text.splitlines()[0][:200] if text else "")
        for m in self._active():
            try:
                error = m.on_exception(run, error)
            except Exception as err:  # noqa: BLE001
                self._disable(m, err)
        self._diagnosis.explain(error)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._teardown_hooks()

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
            diagnosis = self._diagnosis.state_dict()
        except Exception:  # noqa: BLE001 - a checkpoint must never fail because of a monitor
            findings, diagnosis = {}, {}
        # plain types only: Lightning may resume with torch.load(weights_only=True)
        state = {"version": self.STATE_VERSION, "findings": findings, "diagnosis": diagnosis, "monitors": monitors}
        if self._budget is not None and self._run is not None:
            state["budget"] = {"every": self._run.every, "base": self._run.base_every}
        return _plain(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        try:
            self._findings.load_state_dict(state_dict.get("findings", {}))
            self._diagnosis.load_state_dict(state_dict.get("diagnosis", {}))
        except Exception as err:  # noqa: BLE001 - a resume must never fail because of a monitor
            rank_zero_warn(f"lightning_normcheck: could not restore the findings: {err!r}")
        budget = state_dict.get("budget")
        self._pending_budget = budget if isinstance(budget, dict) else None
        if self._run is not None:
            self._restore_cadence()
        monitors = state_dict.get("monitors", {})
        if self._run is None:
            self._pending_state = monitors  # restored at setup, once the model is known
        else:
            self._load_monitor_state(monitors)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Say so when the checkpoint holds no state under this callback's key (instead of starting fresh
        silently); when it holds exactly one state of this class under another key (arguments changed since),
        restore that one."""
        saved = checkpoint.get("callbacks") or {}
        if self.state_key in saved:
            return
        ours = {getattr(cb, "state_key", None) for cb in getattr(trainer, "callbacks", [])}
        name = type(self).__qualname__
        same = [k for k in saved if isinstance(k, str) and (k == name or k.startswith(name + "{")) and k not in ours]
        if len(same) == 1:
            rank_zero_warn(
                f"lightning_normcheck: the checkpoint has no {name} state under {self.state_key!r} (its arguments"
                f" changed since it was saved); restoring the state saved under {same[0]!r}."
            )
            self.load_state_dict(saved[same[0]])
            return
        found = ", ".join(repr(k) for k in saved if isinstance(k, str)) or "none"
        rank_zero_warn(
            f"lightning_normcheck: the checkpoint has no {name} state under {self.state_key!r} (callback states"
            f" found: {found}); this fit starts with empty histories and findings. Resume with the same"
            " arguments to keep them."
        )

    def _load_monitor_state(self, monitors: dict[str, Any]) -> None:
        for m in self._monitors:
            if m.name in monitors:
                try:
                    m.load_state_dict(monitors[m.name])
                except Exception as err:  # noqa: BLE001
                    rank_zero_warn(f"lightning_normcheck: could not restore {m.name} state: {err!r}")


__all__ = [
    "COSMETIC_ARGS",
    "EARLY_STEPS",
    "_Monitor",
    "_NormCheckBase",
    "_Run",
    "compiled_prefixes",
    "in_prefixes",
]
