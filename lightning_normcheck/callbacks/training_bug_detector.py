"""TrainingBugDetector: plain training-loop bugs (missing zero_grad, double step, summed loss,
unaveraged accumulation, undetached RNN state)."""

from __future__ import annotations

import random
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._base import (
    _check_bool,
    _check_int,
    _Monitor,
    _NormCheckBase,
    _Run,
    compiled_prefixes,
)
from lightning_normcheck.diagnosis import bugs as B

#: Parameters watched per optimizer (the first two and the last two that train): enough to see every
#: backward pass that reaches the optimizer, cheap enough for every backward (one Python call each).
WATCHED_PER_OPTIMIZER = 4
#: Batches of a fit on which the two-halves loss probe may run (each costs about two forward passes).
MAX_LOSS_PROBES = 3


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
        self.accum: list[tuple[int, int, float]] = []  # (step, k, factor) of the last windows
        self.used_history: list[tuple[int, Tensor]] = []


class _TrainingBugs(_Monitor):
    """Counts real optimizer steps (torch step post-hooks), sees every backward that reaches an optimizer
    (tensor hooks on a few of its parameters), probes the loss reduction, and watches RNN inputs.

    The decisions and messages live in :mod:`lightning_normcheck.diagnosis.bugs`.
    """

    name = "training_bugs"

    def __init__(self, loss_probe: bool = True, max_loss_probes: int = MAX_LOSS_PROBES) -> None:
        self.loss_probe = loss_probe
        self.max_loss_probes = max_loss_probes
        self._handles: list[Any] = []
        self.rnn_modules: dict[str, nn.Module] = {}
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
        self._pending: list[tuple[str, _OptimizerWatch, int, int, Tensor, Tensor]] = []
        self._queued: list[tuple[str, _OptimizerWatch, int, int]] = []
        self._probes_pending: list[tuple[str, int, int, Tensor]] = []
        self._probes_queued: list[tuple[str, int, int]] = []
        self._probe_results: list[tuple[int, float, float, float, int]] = []
        self._probe_runs = 0
        self._probe_failures = 0
        self._reduction: str | None = None
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
                if w.extra_steps >= B.DOUBLE_STEP_MIN:
                    B.report_double_step(
                        run.findings,
                        w.first_extra_step,
                        w.label,
                        w.extra_steps,
                        w.steps + 1,
                        self.batches,
                        w.raw_extra,
                    )
            win = w.window
            if w.steps > 0 and win.observed and win.events > 0 and win.min_sq is not None and win.used_sq is not None:
                self._pending.append(("_bugs/zg", w, win.opened_at, step, win.min_sq, win.used_sq))
            if self._manual:
                self._check_accumulation(run, w, step)
            observe = run.is_due(step + 1)
            used_sq = None
            if observe:
                grads = [p.grad for p in w.watched if p.grad is not None]
                dev = grads[0].device if grads else None
                used_sq = torch.stack([N.sum_of_squares(g).to(dev) for g in grads]).sum() if grads else None
            w.window = _Window(observe, used_sq, step)
            w.steps += 1
            w.reached = False
            w.lightning_hook = False
            w.last_raw = raw
            return None

        return hook

    def _check_accumulation(self, run: _Run, w: _OptimizerWatch, step: int) -> None:
        win = w.window
        bwd = list(win.bwd.values())
        k = len(bwd)
        batches = {b for b, _, _ in bwd}
        factors = [f for _, f, _ in bwd]
        # micro-batches: one backward per batch, or the same loss computation repeated within a batch (two
        # different losses backpropagated one after the other are a sum of objectives, not accumulation)
        # (DCGAN's errD_real.backward(); errD_fake.backward() is two look-alike losses: in-batch needs k >= 3)
        same_loss = len({g for _, _, g in bwd}) == 1 and k >= B.MIN_CHUNKS
        if win.raw_bwd or k < 2 or not (len(batches) == k or same_loss) or any(f is None for f in factors):
            w.accum = []
            return
        top = max(f for f in factors if f is not None)
        if abs(top - 1.0) > B.UNSCALED_TOL:
            w.accum = []  # divided (by k or by something else): not this bug
            return
        if w.accum and w.accum[-1][1] != k:
            w.accum = []
        w.accum.append((step, k, top))
        if len(w.accum) >= B.ACCUM_WINDOWS:
            B.report_accumulation(
                run.findings, w.accum[0][0], w.label, k, top, [s for s, _, _ in w.accum], len(batches) == k
            )

    def _rnn_pre_hook(self, run: _Run, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if run.probing or not self._markers or not torch.is_grad_enabled():
                return None
            if self._checked.get(name) == self.batches:
                return None  # a stale state enters at the module's first call of a batch (cells loop over time)
            self._checked[name] = self.batches
            hx = args[1] if len(args) > 1 else kwargs.get("hx")
            states = [hx] if isinstance(hx, Tensor) else list(hx) if isinstance(hx, (tuple, list)) else []
            marker = self._markers[-1][1]
            for h in states:
                fn = getattr(h, "grad_fn", None) if isinstance(h, Tensor) else None
                old = B.oldest_node(fn, marker) if fn is not None else None
                if old is None:
                    continue  # built in this batch (an encoder state, a learned h0) or detached: fine
                seq = old._sequence_nr()
                origin = None
                for b, mark in reversed(self._markers[:-1]):
                    if seq >= mark:
                        origin = b
                        break
                if name not in self._stale:
                    self._stale.append(name)
                B.report_stale_hidden(
                    run.findings, run.step, name, self.batches - 1, origin, type(old).__name__, str(tuple(h.shape))
                )
                break
            return None

        return hook

    # Lightning hooks ------------------------------------------------------------------------------------------
    def on_train_batch_start(self, run: _Run, batch: Any, batch_idx: int) -> None:
        self.batches += 1
        self._batch_idx = batch_idx
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
            and self._reduction is None
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
        scale = B.loss_scale_factor(loss.grad_fn) if read else None
        sig = B.graph_signature(loss.grad_fn) if read else ()
        self._bwd = (self._bwd_id, self.batches - 1, scale, sig)

    def on_after_backward(self, run: _Run) -> None:
        self._bwd = None

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        w = self.watches.get(id(getattr(optimizer, "_optimizer", optimizer)))
        if w is not None:
            w.lightning_hook = True

    # the two-halves loss probe ----------------------------------------------------------------------------
    def _probe_loss(self, run: _Run) -> None:
        """Re-run ``training_step`` without gradients on two halves of the batch and on both together.

        Leaves training untouched: RNG states, buffers (BatchNorm running stats) and module attributes are
        restored, ``self.log`` is a no-op meanwhile, and ``run.probing`` tells activation hooks to ignore it.
        """
        split = B.split_batch(self._batch)
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
                for part in (half_a, half_b, both):
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
        self._probes_pending.append((f"_bugs/probe{self._probe_runs}", run.step, m, torch.stack(losses)))

    # flush -------------------------------------------------------------------------------------------------
    def collect(self, run: _Run) -> None:
        for i, (key, w, prev, step, min_sq, used_sq) in enumerate(self._pending):
            name = f"{key}{w.index}/{step}/{i}"
            run.add_metric(f"{name}/stale", min_sq)
            run.add_metric(f"{name}/used", used_sq)
            self._queued.append((name, w, prev, step))
        self._pending = []
        for key, step, m, losses in self._probes_pending:
            for j, part in enumerate(("a", "b", "full")):
                run.add_metric(f"{key}/{part}", losses[j])
            self._probes_queued.append((key, step, m))
        self._probes_pending = []

    def diagnose(self, run: _Run, values: dict[str, float], step: int) -> None:
        for name, w, prev, at in self._queued:
            stale, used = values.get(f"{name}/stale"), values.get(f"{name}/used")
            if stale is None or used is None:
                continue
            w.used_history = [*w.used_history[-50:], (prev, used**0.5)]  # type: ignore[list-item]
            if stale > 0.0:  # exactly 0 after any zero_grad (None or zeros): no tolerance needed
                B.report_missing_zero_grad(
                    run.findings,
                    at,
                    w.label,
                    stale**0.5,
                    used**0.5,
                    prev,
                    list(w.used_history),  # type: ignore[arg-type]
                )
        self._queued = []
        for key, at, m in self._probes_queued:
            vals = [values.get(f"{key}/{p}") for p in ("a", "b", "full")]
            if all(v is not None for v in vals):
                self._probe_results.append((at, vals[0], vals[1], vals[2], m))  # type: ignore[arg-type]
        self._probes_queued = []
        if self._probe_results and self._reduction is None:
            self._reduction = B.diagnose_reduction(run.findings, self._probe_results)

    def on_exception(self, run: _Run, exception: BaseException) -> None:
        text = str(exception)
        graph_error = B._RAISE_SECOND_TIME in text or B._RAISE_INPLACE in text
        first_line = text.strip().splitlines()[0][:200] if text.strip() else type(exception).__name__
        extra = [w for w in self.watches.values() if w.extra_steps > 0]
        for w in extra:  # training stopped: one extra step is enough to report
            B.report_double_step(
                run.findings,
                w.first_extra_step,
                w.label,
                w.extra_steps,
                w.steps,
                self.batches,
                w.raw_extra,
                exception=first_line if graph_error else None,
            )
        if extra and not self._stale and B._RAISE_INPLACE in text:
            return  # the extra step modified the weights under the graph: explained above
        B.explain_graph_exception(
            run.findings, exception, run.step, self.batches, list(self.rnn_modules), list(self._stale)
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
        return {"version": 1, "reduction": self._reduction, "probe_runs": self._probe_runs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._reduction = state.get("reduction")
        self._probe_runs = int(state.get("probe_runs", 0))


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
      the same optimizer applies the same gradients twice (reported from the second such step).
    - ``loss_sum_reduction`` (warning): automatic optimization only; on up to 3 batches, ``training_step``
      is re-run without gradients on two halves of the batch and on both; ``loss(both) / (loss(A) +
      loss(B))`` is 1.0 for a sum over samples and 0.5 for a mean (two agreeing probes decide).
    - ``accumulation_not_averaged`` (warning): manual optimization; k > 1 ``manual_backward`` calls in k
      batches per optimizer step, with losses that carry no 1/k factor in their autograd graph.
    - ``hidden_state_not_detached`` (error): a forward pre-hook on RNN modules sees an incoming state whose
      graph was built in an earlier batch (before the backward error); when training raises "backward
      through the graph a second time" / "modified by an inplace operation", the finding explains it.

    Cost: a few Python calls per backward and step; a few scalar kernels on sampled steps; the loss probe
    (about two extra forward passes without gradients) on at most ``max_loss_probes`` batches per fit. It
    never changes training: the probe restores RNG states, buffers and module attributes and never logs.

    Args:
        log_every_n_steps: cadence of its checks, in optimizer steps (default: the Trainer's).
        loss_probe: run the two-halves loss-reduction probe (automatic optimization only).
        max_loss_probes: most batches per fit the loss probe runs on.
        print_summary: print the findings table at the end of fit.

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

    It emits no metrics (findings only).
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        loss_probe: bool = True,
        max_loss_probes: int = MAX_LOSS_PROBES,
        print_summary: bool = True,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary)
        self._monitors = [_make_monitor(type(self).__name__, loss_probe=loss_probe, max_loss_probes=max_loss_probes)]


def _make_monitor(owner: str, loss_probe: bool = True, max_loss_probes: int = MAX_LOSS_PROBES) -> _TrainingBugs:
    _check_bool(owner, "loss_probe", loss_probe)
    # two agreeing probes are needed for a verdict (diagnosis.bugs.PROBES_TO_AGREE)
    _check_int(owner, "max_loss_probes", max_loss_probes, B.PROBES_TO_AGREE)
    return _TrainingBugs(loss_probe=loss_probe, max_loss_probes=max_loss_probes)


__all__ = ["TrainingBugDetector"]
