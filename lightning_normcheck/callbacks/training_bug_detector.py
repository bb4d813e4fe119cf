"""TrainingBugDetector: plain training-loop bugs (missing zero_grad, double step, summed loss,
unaveraged accumulation, undetached RNN state).

The monitor only measures and hands over records (:mod:`lightning_normcheck.diagnosis.records`); every
verdict is made by :class:`~lightning_normcheck.diagnosis.bugs.BugRules`:

- :class:`~.records.ZeroGradWindow`: per closed window of an observed step, the smallest watched-gradient
  norm seen before a backward and the norm the previous step used (staged, moved at the logging step).
- :class:`~.records.OptimizerSteps`: each time a step comes with no backward since the previous one (at
  once: training may raise right after).
- :class:`~.records.AccumulationWindow`: per closed window in manual optimization (host numbers, handed
  over at the logging step).
- :class:`~.records.ReductionProbe`: each two-halves probe's three losses (staged).
- :class:`~.records.StaleState`: a recurrent state that carries an earlier batch's graph (at once).
- :class:`~.records.TrainingError`: on an exception, the batches, RNN modules, stale modules, extra steps.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Hashable
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks import _graph as G
from lightning_normcheck.callbacks._args import _check_bool, _check_int
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.callbacks._run import compiled_prefixes
from lightning_normcheck.diagnosis.records import (
    AccumulationWindow,
    OptimizerSteps,
    Record,
    ReductionProbe,
    StaleState,
    TrainingError,
    ZeroGradWindow,
)
from lightning_normcheck.diagnosis.thresholds import BugThresholds, Thresholds

#: Parameters watched per optimizer (the first two and the last two that train): enough to see every
#: backward pass that reaches the optimizer, cheap enough for every backward (one Python call each).
WATCHED_PER_OPTIMIZER = 4
#: Batches of a fit on which the two-halves loss probe may run (each costs about two forward passes).
MAX_LOSS_PROBES = 3
#: Backward passes of the same loss inside one training_step that count as micro-batches: 2 look-alike
#: losses are common and legitimate (DCGAN's real and fake discriminator losses), 3 or more are chunks.
MIN_CHUNKS = 3
#: Accumulation windows held between logging steps before they are handed over anyway (raw optimizer steps
#: with no Lightning step, hence no logging step, for that long): memory stays flat.
MAX_QUEUED_WINDOWS = 1024


class _Window:
    """What happened to one optimizer's parameters between two of its steps."""

    __slots__ = ("observed", "min_sq", "events", "bwd", "raw_bwd", "used_sq", "opened_at")

    def __init__(self, observed: bool = False, used_sq: Tensor | None = None, opened_at: int = -1) -> None:
        self.observed = observed  # zero_grad check on (a sampled step)
        self.min_sq: Tensor | None = None  # smallest watched-gradient square norm seen before a backward
        self.events = 0
        self.bwd: dict[int, tuple[int, float | None, tuple[str, ...]]] = {}  # id -> (batch, loss scale, graph)
        self.raw_bwd = False  # a backward not made through Lightning (no loss seen)
        self.used_sq = used_sq  # square norm of the watched gradients the previous step used
        self.opened_at = opened_at  # the previous step

    def accumulation(self, step: int, label: str) -> AccumulationWindow:
        """The window as a record: its micro-batches (0: not accumulation) and the largest loss factor.

        Micro-batches are one backward per batch, or the same loss computation repeated within a batch at
        least :data:`MIN_CHUNKS` times: two different losses backpropagated one after the other are a sum of
        objectives, not accumulation (DCGAN's ``errD_real.backward(); errD_fake.backward()``).
        """
        bwd = list(self.bwd.values())
        k = len(bwd)
        batches = {b for b, _, _ in bwd}
        factors = [f for _, f, _ in bwd]
        same_loss = len({g for _, _, g in bwd}) == 1 and k >= MIN_CHUNKS
        counted = not self.raw_bwd and k >= 2 and (len(batches) == k or same_loss)
        known = [f for f in factors if f is not None]
        factor = max(known) if known and len(known) == k else None
        return AccumulationWindow(step, label, k if counted else 0, factor, len(batches) == k)


class _OptimizerWatch:
    """Per-optimizer bookkeeping (host ints and a few device scalars)."""

    def __init__(self, index: int, optimizer: torch.optim.Optimizer, watched: list[Tensor]) -> None:
        self.index = index
        self.label = f"optimizer {index} ({type(optimizer).__name__})"
        self.watched = watched
        self.steps = 0
        self.reached = False  # a backward pass reached its parameters since its last step
        self.lightning_hook = False  # on_before_optimizer_step fired since its last step
        self.extra_steps = 0
        self.first_extra_step = -1
        self.raw_extra = False
        self.last_raw = False  # the previous step fired no Lightning hook
        self.window = _Window()

    def counts(self, step: int, total_steps: int, batches: int) -> OptimizerSteps:
        return OptimizerSteps(
            step, self.label, self.extra_steps, self.first_extra_step, total_steps, batches, self.raw_extra
        )


class _TrainingBugs(_Monitor):
    """Counts real optimizer steps (torch step post-hooks), sees every backward that reaches an optimizer
    (tensor hooks on a few of its parameters), probes the loss reduction, and watches RNN inputs.

    It measures only; the verdicts and messages live in :mod:`lightning_normcheck.diagnosis.bugs`. The loss
    probe runs on the first ``max_loss_probes`` batches it can split (3 by default), whatever the probes say:
    the rules decide once enough agree, and asking them back would put a verdict in the monitor for the price
    of at most one probe (one forward pass without gradients) per fit.
    """

    name = "training_bugs"

    def __init__(self, loss_probe: bool = True, max_loss_probes: int = MAX_LOSS_PROBES) -> None:
        self.loss_probe = loss_probe
        self.max_loss_probes = max_loss_probes
        self._handles: list[Any] = []
        self.rnn_modules: dict[str, nn.Module] = {}
        self._probe_runs = 0
        self._reset()

    def _reset(self) -> None:
        self.watches: dict[int, _OptimizerWatch] = {}
        self.batches = 0  # batches started in this fit
        self._batch: Any = None
        self._batch_idx = 0
        self._bwd_id = 0
        # (id, batch, loss scale, loss graph signature) during a backward made through Lightning
        self._bwd: tuple[int, int, float | None, tuple[str, ...]] | None = None
        self._marker_leaf: Tensor | None = None
        self._markers: list[tuple[int, int]] = []  # (batch, autograd sequence number at its start)
        self._stale: list[str] = []
        self._checked: dict[str, int] = {}  # RNN module -> batch whose first call was checked
        # closed zero_grad windows: (optimizer label, previous step, step, min stale sq, used sq)
        self._zero_grad: list[tuple[str, int, int, Tensor, Tensor]] = []
        self._probes: list[tuple[int, int, Tensor]] = []  # (step, half size, the three losses)
        # a probe waiting for its batch's own loss: (step, half size, the halves' losses, batch)
        self._probe_pending: tuple[int, int, Tensor, int] | None = None
        self._windows: list[AccumulationWindow] = []
        self._staged: tuple[list[tuple[str, int, int]], list[tuple[int, int]]] = ([], [])
        self._probe_runs = 0
        self._probe_failures = 0
        self._manual = False
        self._compiled = False

    # setup ------------------------------------------------------------------------------------------------
    def setup(self, run: _Run) -> None:
        self.remove_hooks()
        self._reset()
        module = run.pl_module
        self._manual = not module.automatic_optimization
        # extra forward passes on half batches without gradients would recompile torch.compile'd code (other
        # shapes, other grad mode) and could switch it to dynamic shapes: training would no longer be unchanged
        self._compiled = bool(compiled_prefixes(module))
        self.rnn_modules = {n: m for n, m in module.named_modules() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))}
        for name, m in self.rnn_modules.items():
            self._handles.append(
                m.register_forward_pre_hook(run.owner._guard(self, self._rnn_pre_hook(run, name)), with_kwargs=True)
            )

    def on_train_start(self, run: _Run) -> None:
        for i, opt in enumerate(run.trainer.optimizers):
            if id(opt) in self.watches:
                continue
            params, _, _ = run.optimizer_params(opt)
            trainable = [p for p in params if p.requires_grad]
            k = WATCHED_PER_OPTIMIZER // 2
            watched = trainable if len(trainable) <= 2 * k else trainable[:k] + trainable[-k:]
            w = _OptimizerWatch(i, opt, watched)
            self.watches[id(opt)] = w
            self._handles.append(opt.register_step_post_hook(run.owner._guard(self, self._step_hook(run, w))))
            for p in watched:
                self._handles.append(p.register_hook(run.owner._guard(self, self._grad_hook(run, w, p))))

    def pending(self) -> bool:
        return bool(self._zero_grad or self._probes or self._windows)

    # hooks inside the user's code ----------------------------------------------------------------------
    def _grad_hook(self, run: _Run, w: _OptimizerWatch, p: Tensor) -> Any:
        def hook(grad: Tensor) -> None:
            # runs before the new gradient is added to p.grad: p.grad is what was there before backward
            w.reached = True
            win = w.window
            win.events += 1
            if self._bwd is None:
                win.raw_bwd = True
            else:
                bid, batch, scale, sig = self._bwd
                if p.grad is None:
                    # a cleared gradient (zero_grad(set_to_none=True)) starts a new accumulation
                    win.bwd = {}
                    win.raw_bwd = False
                win.bwd.setdefault(bid, (batch, scale, sig))
            if win.observed:
                sq = torch.zeros((), device=grad.device) if p.grad is None else N.sum_of_squares(p.grad)
                win.min_sq = sq if win.min_sq is None else torch.minimum(win.min_sq, sq.to(win.min_sq.device))
            return None

        return hook

    def _step_hook(self, run: _Run, w: _OptimizerWatch) -> Any:
        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            step = run.step
            # a step with every watched gradient None applies nothing (e.g. training_step returned None)
            applied = any(p.grad is not None for p in w.watched)
            raw = not w.lightning_hook
            if w.steps > 0 and not w.reached and applied:
                w.extra_steps += 1
                if w.first_extra_step < 0:
                    w.first_extra_step = step
                w.raw_extra = w.raw_extra or raw or w.last_raw
                run.observe(w.counts(step, w.steps + 1, self.batches))  # at once: training may raise next
            self._close_window(run, w, step)
            w.steps += 1
            w.reached = False
            w.lightning_hook = False
            w.last_raw = raw
            return None

        return hook

    def _close_window(self, run: _Run, w: _OptimizerWatch, step: int) -> None:
        """Queue what the closing window measured and open the next one (observed when its step is due)."""
        win = w.window
        if w.steps > 0 and win.observed and win.events > 0 and win.min_sq is not None and win.used_sq is not None:
            self._zero_grad.append((w.label, win.opened_at, step, win.min_sq, win.used_sq))
        if self._manual:
            self._windows.append(win.accumulation(step, w.label))
            if len(self._windows) >= MAX_QUEUED_WINDOWS:  # no logging step for that long: hand them over now
                windows, self._windows = self._windows, []
                run.observe(*windows)
        observe = run.is_due(step + 1)
        used_sq = None
        if observe:
            grads = [p.grad for p in w.watched if p.grad is not None]
            dev = grads[0].device if grads else None
            used_sq = torch.stack([N.sum_of_squares(g).to(dev) for g in grads]).sum() if grads else None
        w.window = _Window(observe, used_sq, step)

    def _rnn_pre_hook(self, run: _Run, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if run.probing or not self._markers or not torch.is_grad_enabled():
                return None
            if self._checked.get(name) == self.batches:
                return None  # a stale state enters at the module's first call of a batch (cells loop over time)
            self._checked[name] = self.batches
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            states = [hx] if isinstance(hx, Tensor) else list(hx) if isinstance(hx, (tuple, list)) else []
            for h in states:
                record = self._stale_state(run, name, h)
                if record is not None:
                    if name not in self._stale:
                        self._stale.append(name)
                    run.observe(record)  # at once: backward raises before the next logging step
                    break
            return None

        return hook

    def _stale_state(self, run: _Run, name: str, h: Any) -> StaleState | None:
        """A :class:`StaleState` when ``h`` carries a graph node built before this batch began, else None."""
        fn = getattr(h, "grad_fn", None) if isinstance(h, Tensor) else None
        old = G.oldest_node(fn, self._markers[-1][1]) if fn is not None else None
        if old is None:
            return None  # built in this batch (an encoder state, a learned h0) or detached: fine
        seq = old._sequence_nr()
        origin = next((b for b, mark in reversed(self._markers[:-1]) if seq >= mark), None)
        return StaleState(run.step, name, self.batches - 1, origin, type(old).__name__, str(tuple(h.shape)))

    # Lightning hooks ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        self._batch_idx = batch_idx
        self._probe_pending = None  # its batch ended without a loss (training_step returned None)
        if self.rnn_modules:
            # the autograd sequence number now: any graph node below it was built in an earlier batch
            if self._marker_leaf is None:
                self._marker_leaf = torch.zeros((), requires_grad=True)
            with torch.enable_grad():
                seq = (self._marker_leaf * 1.0).grad_fn._sequence_nr()  # type: ignore[union-attr]
            self._markers = [*self._markers[-15:], (self.batches - 1, seq)]
        if (
            not self._manual
            and not self._compiled
            and self.loss_probe
            and self._probe_runs < self.max_loss_probes
            and self._probe_failures < 2
        ):
            # before the real forward: a probe between forward and backward would bump the version of
            # BatchNorm buffers saved for backward and break it
            self._batch = batch
            self._probe_loss(run)

    def on_before_backward(self, run: _Run, loss: Tensor) -> None:
        self._bwd_id += 1
        # reading a constant saved on the graph is a host read: only on sampled steps (dense early on)
        read = self._manual and run.is_due(run.step)
        scale = G.loss_scale_factor(loss.grad_fn) if read else None
        sig = G.graph_signature(loss.grad_fn) if read else ()
        self._bwd = (self._bwd_id, self.batches - 1, scale, sig)

    def on_after_backward(self, run: _Run) -> None:
        self._bwd = None

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        w = self.watches.get(id(getattr(optimizer, "_optimizer", optimizer)))
        if w is not None:
            w.lightning_hook = True

    # the two-halves loss probe ----------------------------------------------------------------------------
    def _probe_loss(self, run: _Run) -> None:
        """Re-run ``training_step`` without gradients on two halves of the batch; the loss of both together is the
        batch's own, from the training step that follows (:meth:`on_train_batch_end`): one forward pass fewer. (A
        batch of odd size has a sample the halves leave out: both halves together are run too.)

        Leaves training untouched: RNG states, buffers (BatchNorm running stats) and module attributes are
        restored, ``self.log`` is a no-op meanwhile, and ``run.probing`` tells activation hooks to ignore it.
        """
        split = G.split_batch(self._batch)
        whole = split is not None and G.leading_size(self._batch) == 2 * split[3]  # the halves make up the batch
        self._batch = None
        if split is None:
            self._probe_failures += 1
            return
        half_a, half_b, both, m = split
        module = run.pl_module
        self._probe_runs += 1
        state = _snapshot(module)
        rng = _rng_state()
        plugin = getattr(run.trainer, "precision_plugin", None)
        ctx = plugin.train_step_context() if plugin is not None else nullcontext()
        losses: list[Tensor] = []
        # Lightning passes batch_idx only when training_step takes it
        takes_idx = is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2)
        run.probing = True
        module.__dict__["log"] = _no_log
        module.__dict__["log_dict"] = _no_log
        try:
            with torch.no_grad(), ctx:
                for part in (half_a, half_b) if whole else (half_a, half_b, both):
                    out = module.training_step(part, self._batch_idx) if takes_idx else module.training_step(part)
                    loss = out.get("loss") if isinstance(out, dict) else out
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        self._probe_failures += 1
                        return
                    losses.append(loss.detach().reshape(()).float())
        except Exception:  # noqa: BLE001 - a batch the model cannot take in halves: no verdict from it
            self._probe_failures += 1
            return
        finally:
            run.probing = False
            _restore(state)
            _set_rng_state(rng)
        if whole:
            self._probe_pending = (run.step, m, torch.stack(losses), self.batches)
        else:
            self._probes.append((run.step, m, torch.stack(losses)))

    def on_train_batch_end(self, run: _Run, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending, self._probe_pending = self._probe_pending, None
        if pending is None or pending[3] != self.batches:
            return
        # Lightning hands over a detached copy of the loss before any AMP scaling, divided by accumulate_grad_batches
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            self._probe_failures += 1
            return
        full = loss.detach().reshape(1).float() * float(getattr(run.trainer, "accumulate_grad_batches", 1) or 1)
        step, m, halves, _ = pending
        self._probes.append((step, m, torch.cat([halves.to(full.device), full])))

    # the logging step -------------------------------------------------------------------------------------
    def collect(self, run: _Run) -> None:
        zero_grad, self._zero_grad = self._zero_grad, []
        for i, (_, _, _, min_sq, used_sq) in enumerate(zero_grad):
            run.stage((self.name, "zg", i), torch.stack([min_sq.reshape(()), used_sq.reshape(()).to(min_sq.device)]))
        probes, self._probes = self._probes, []
        for i, (_, _, losses) in enumerate(probes):
            run.stage((self.name, "probe", i), losses)
        self._staged = ([(label, prev, step) for label, prev, step, _, _ in zero_grad], [(s, m) for s, m, _ in probes])

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        zero_grad, probes = self._staged
        self._staged = ([], [])
        out: list[Record] = []
        for i, (label, prev, step) in enumerate(zero_grad):
            stale_sq, used_sq = host[(self.name, "zg", i)]
            out.append(ZeroGradWindow(step, prev, label, _root(stale_sq), _root(used_sq)))
        for i, (step, m) in enumerate(probes):
            a, b, full = host[(self.name, "probe", i)]
            out.append(ReductionProbe(step, a, b, full, m))
        windows, self._windows = self._windows, []
        return [*out, *windows]

    def on_exception(self, run: _Run, error: TrainingError) -> TrainingError:
        # the steps so far (this step's hook counted it already)
        extra = tuple(w.counts(run.step, w.steps, self.batches) for w in self.watches.values() if w.extra_steps > 0)
        return dataclasses.replace(
            error,
            batches=self.batches,
            rnn_modules=tuple(self.rnn_modules),
            stale_modules=tuple(self._stale),
            extra_steps=extra,
        )

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.watches = {}
        self.rnn_modules = {}  # no model references kept after fit (the callback pickles small)
        self._batch = None
        self._marker_leaf = None

    def state_dict(self) -> dict[str, Any]:
        return {"version": 2, "probe_runs": self._probe_runs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._probe_runs = int(state.get("probe_runs", 0))


def _root(sq: float) -> float:
    """The norm from a sum of squares (NaN stays NaN)."""
    return math.sqrt(sq) if sq >= 0.0 else math.nan


# probe helpers ---------------------------------------------------------------------------------------------
def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


#: Tensor attributes larger than this (a dataset kept on the module) are not copied for the probe.
_MAX_CLONE = 1 << 20


_Snapshot = list[tuple[nn.Module, dict[str, Any], dict[str, Tensor], dict[str, Any]]]


def _snapshot(module: nn.Module) -> _Snapshot:
    """Shallow copies of every submodule's attributes, the values of its buffers, the values and version
    counters of its tensor attributes and the items of its list attributes."""
    out = []
    for m in module.modules():
        attrs = dict(m.__dict__)
        buffers = {k: b.detach().clone() for k, b in m._buffers.items() if b is not None}
        extra: dict[str, Any] = {}
        for k, v in attrs.items():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter) and v.numel() <= _MAX_CLONE:
                extra[k] = (v.detach().clone(), v._version)  # e.g. torchmetrics states updated in place
            elif isinstance(v, list):
                extra[k] = list(v)
        out.append((m, attrs, buffers, extra))
    return out


@torch.no_grad()
def _restore(snapshot: _Snapshot) -> None:
    """Put attributes back and buffer values; copy values back into tensor attributes only when written
    since (their version moved), so a carried tensor that a graph still needs is not touched."""
    for m, attrs, buffers, extra in snapshot:
        d = m.__dict__
        for k in [k for k in d if k not in attrs]:
            del d[k]
        for k, v in attrs.items():
            if d.get(k) is not v:
                d[k] = v
        for k, saved in buffers.items():
            b = m._buffers.get(k)
            # always: BatchNorm's kernel updates running stats without moving the version counter (the probe
            # runs before the forward, so no graph has saved these buffers yet)
            if b is not None:
                b.copy_(saved)
        for k, saved in extra.items():
            v = d[k]
            if isinstance(v, Tensor):
                if v._version != saved[1]:
                    v.copy_(saved[0])
            elif isinstance(v, list) and (len(v) != len(saved) or any(a is not b for a, b in zip(v, saved))):
                v[:] = saved


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class TrainingBugDetector(_NormCheckBase):
    r"""Find plain training-code bugs that no exception names.

    Checks (one finding per code; each says what was seen, why it is this bug, and the fix):

    - ``missing_zero_grad`` (error): on sampled steps, the gradients of a few watched parameters per
      optimizer are read just before each backward pass (a tensor hook); if they are non-zero at *every*
      backward between two optimizer steps, nothing cleared them. Summing inside one accumulation window
      is fine (the first backward of a window starts from zero).
    - ``double_optimizer_step`` (error): a torch step post-hook counts every real ``optimizer.step()``,
      including raw calls that bypass Lightning; a step with no backward pass since the previous step of
      the same optimizer applies the same gradients twice (reported from the second such step,
      ``BugThresholds.double_step_min``; from the first when training then raised).
    - ``loss_sum_reduction`` (warning): automatic optimization only; on the first ``max_loss_probes`` (3)
      batches that split in two, ``training_step`` is re-run without gradients on two halves of the batch;
      with the batch's own loss, ``loss(both) / (loss(A) + loss(B))`` is 1.0 for a sum over samples and 0.5 for a mean
      (two agreeing probes decide, ``BugThresholds.probes_to_agree``).
    - ``accumulation_not_averaged`` (warning): manual optimization; k > 1 ``manual_backward`` calls in k
      batches per optimizer step, with losses that carry no 1/k factor in their autograd graph.
    - ``hidden_state_not_detached`` (error): a forward pre-hook on RNN modules sees an incoming state whose
      graph was built in an earlier batch (before the backward error); when training raises "backward
      through the graph a second time" / "modified by an inplace operation", the finding explains it.

    Cost: a few Python calls per backward and step; a few scalar kernels on sampled steps; the loss probe
    (one extra forward pass without gradients, in two halves) on at most ``max_loss_probes`` batches per fit. It
    never changes training: the probe restores RNG states, buffers and module attributes and never logs.

    Args:
        log_every_n_steps: cadence of its checks, in optimizer steps (default: the Trainer's).
        loss_probe: run the two-halves loss-reduction probe (automatic optimization only).
        max_loss_probes: most batches per fit the loss probe runs on.
        print_summary: print the findings table at the end of fit.
        thresholds: the thresholds of the rules (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`;
            this detector's are ``thresholds.bugs``, a
            :class:`~lightning_normcheck.diagnosis.thresholds.BugThresholds`).

    Raises:
        ValueError: ``max_loss_probes`` is not an int >= 2.
        TypeError: ``loss_probe`` or ``print_summary`` is not a bool.

    Example:
        >>> TrainingBugDetector(max_loss_probes=2).findings
        []

    LightningCLI::

        trainer:
          callbacks:
            - class_path: lightning_normcheck.TrainingBugDetector
              init_args:
                loss_probe: true
                thresholds:
                  bugs: {double_step_min: 2, probes_to_agree: 2}

    It emits no metrics (findings only).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        loss_probe: bool = True,
        max_loss_probes: int = MAX_LOSS_PROBES,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary, thresholds=thresholds)
        self._monitors = [_make_monitor(type(self).__name__, loss_probe=loss_probe, max_loss_probes=max_loss_probes)]


def _make_monitor(owner: str, loss_probe: bool = True, max_loss_probes: int = MAX_LOSS_PROBES) -> _TrainingBugs:
    _check_bool(owner, "loss_probe", loss_probe)
    # a verdict needs this many agreeing probes (BugThresholds.probes_to_agree, by default)
    _check_int(owner, "max_loss_probes", max_loss_probes, BugThresholds().probes_to_agree)
    return _TrainingBugs(loss_probe=loss_probe, max_loss_probes=max_loss_probes)


__all__ = ["TrainingBugDetector"]
