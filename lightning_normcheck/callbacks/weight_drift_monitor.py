"""WeightDriftMonitor: per-layer weight norms, drift from the start of fit, and update-to-weight ratios."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from lightning_normcheck import norms as N
from lightning_normcheck.callbacks._args import _check_bool
from lightning_normcheck.callbacks._base import _Monitor, _NormCheckBase, _Run
from lightning_normcheck.callbacks._signals import _deferred_error
from lightning_normcheck.diagnosis.records import Record, UpdateSample, WeightSample
from lightning_normcheck.diagnosis.thresholds import Thresholds


class _WeightDrift(_Monitor):
    name = "weight_drift"

    def __init__(self, track_drift: bool = True) -> None:
        self.track_drift = track_drift
        self.params: list[Tensor] = []
        self.layers: list[int] = []
        self.layer_index: Tensor | None = None
        self._routes: Tensor | None = None  # sharded parameters: the route of each (see _Run.stage_norms)
        self.reference: list[Tensor] | None = None
        self._snapshot: dict[int, list[Tensor]] = {}  # id(optimizer) -> params before a sampled step
        # id(optimizer) -> a snapshot buffer kept for the next sampled step (CPU only: there an allocation costs
        # more than the copy; CUDA's caching allocator makes a new one cheap, and keeping it would hold memory)
        self._buffers: dict[int, list[Tensor]] = {}
        self._updates: dict[int, Tensor] = {}  # id(optimizer) -> per-tensor update norms of that step
        self._update_step: dict[int, int] = {}  # id(optimizer) -> the step whose update was measured
        self._handles: list[Any] = []
        self._labels: list[str] = []
        self._staged_updates: list[tuple[int, int]] = []  # (id(optimizer), its update step) staged at the flush
        self._restored_reference: list[Tensor] | None = None
        self._pending_updates: list[int] = []  # sharded: optimizers with a sampled step since the last flush
        self._error: BaseException | None = None  # sharded: a failure to measure, reported at the next flush

    def setup(self, run: _Run) -> None:
        self.params = [p for p in run.pl_module.parameters() if p.requires_grad]
        self.layers = [run.param_layer[id(p)] for p in self.params]
        self.layer_index = torch.tensor(self.layers, dtype=torch.long)
        self.reference = None  # a new fit measures from its own start, unless a checkpoint restores one
        self._pending_updates, self._error = [], None
        # sharded (DTensor) parameters: everything below is of the local shards, and the norms are reduced across
        # the mesh at the transfer (the reference and the snapshots are local shards too: nothing is gathered)
        self._routes = run.route_index(self.params) if run.routes is not None else None
        # fast norms of self.params and of any list shaped like it (reference, differences); flush-time only
        self._plan: N.NormPlan | None = N.norm_plan(self._local(self.params))
        # (reference, its per-tensor norms, it in self._plan's layout); the reference is fixed: measured once
        self._ref_norms: tuple[list[Tensor], Tensor, list[Tensor] | None] | None = None
        # id(optimizer) -> the layout of its snapshots (small tensors stacked; None: one copy per tensor)
        self._opt_plans: dict[int, N.NormPlan | None] = {}
        # id(optimizer) -> its parameters' indices in self.params (None: some are not in it)
        self._positions: dict[int, Tensor | None] = {}

    def _local(self, tensors: list[Tensor]) -> list[Tensor]:
        """This process's shards of sharded parameters (the tensors themselves otherwise)."""
        return [N.local_tensor(t) for t in tensors] if self._routes is not None else tensors

    def on_train_start(self, run: _Run) -> None:
        ref = self._restored_reference
        self._restored_reference = None
        if self._routes is not None:
            # sharded: the reference is this process's shards, taken now (a checkpoint holds rank zero's only, so
            # a resumed run measures drift from where it resumed)
            if self.track_drift:
                try:
                    self.reference = N.clone_tensors(self._local(self.params))
                except Exception as err:  # noqa: BLE001 - reported at the next flush, on every process alike
                    self._error = err
        elif ref is not None and len(ref) == len(self.params):
            self.reference = [r.to(p.device) for r, p in zip(ref, self.params)]
        elif self.track_drift:
            self.reference = N.clone_tensors(self.params)
        owner = run.owner
        for opt in run.trainer.optimizers:
            hook = owner._guard(self, self._make_post_hook(run, opt))
            self._handles.append(opt.register_step_post_hook(hook))

    def on_before_optimizer_step(self, run: _Run, optimizer: torch.optim.Optimizer) -> None:
        if run.is_due(run.step):  # a snapshot only before sampled steps: copying every step is costly
            params, _, _ = run.optimizer_params(optimizer)
            key = id(optimizer)
            if self._routes is not None:
                self._update_step[key] = run.step
                if key not in self._pending_updates:
                    self._pending_updates.append(key)
                try:
                    self._snapshot[key] = N.copy_tensors(self._local(params), into=self._buffers.pop(key, None))
                except Exception as err:  # noqa: BLE001 - reported at the next flush, on every process alike
                    self._error = self._error or err
                return
            if key not in self._opt_plans:
                self._opt_plans[key] = N.norm_plan(params)
            plan, into = self._opt_plans[key], self._buffers.pop(key, None)
            self._snapshot[key] = plan.pack(params, into=into) if plan is not None else N.copy_tensors(params, into)
            self._update_step[key] = run.step

    def _make_post_hook(self, run: _Run, optimizer: torch.optim.Optimizer) -> Any:
        def post_hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            before = self._snapshot.pop(id(opt), None)
            if before is None:
                return
            params, _, _ = run.optimizer_params(opt)
            # the snapshot is ours and done with: the differences go into it
            plan = self._opt_plans.get(id(opt)) if self._routes is None else None
            try:
                if plan is not None:  # the snapshot is a pack of that plan (see on_before_optimizer_step)
                    self._updates[id(opt)] = plan.packed_norms(plan.sub_(before, params))
                else:
                    self._updates[id(opt)] = N.sub_norms(before, self._local(params), inplace=True)
            except Exception as err:  # noqa: BLE001
                if self._routes is None:
                    raise
                self._error = self._error or err  # sharded: reported at the next flush, on every process alike
            if before and all(t.device.type == "cpu" for t in before):
                self._buffers[id(opt)] = before

        return post_hook

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._snapshot = {}
        self._buffers = {}

    def collect(self, run: _Run) -> None:
        if not self.params or self.layer_index is None:
            return
        if not run.is_due(run.flush_step) and not self._updates and not self._pending_updates:
            # a logging step that is not sampled (an overhead budget stretched the cadence): the weights wait for
            # the next sampled step (measured: 20 ms a flush on the residual MLP, 50% of its step)
            self._staged_updates = []
            return
        n_layers = len(run.layer_names)
        present = sorted(set(self.layers))
        self._labels = [run.layer_label(i) for i in present]
        plan = getattr(self, "_plan", None)
        if self._routes is not None:
            self._collect_sharded(run, plan, present)
            return
        with torch.no_grad():
            w_norms = N.plan_norms(plan, self.params)
        per_layer = N.group_norms(w_norms, self.layer_index, n_layers)
        run.stage((self.name, "norm"), per_layer[present])
        if self.reference is not None:
            cached = self._reference_norms(plan)
            # a kept snapshot buffer (CPU) is free until the next sampled step: the differences go there
            scratch = next(iter(self._buffers.values()), None)
            drift, ref = N.relative_drift(
                self.params, self.reference, self.layer_index, n_layers, cached[1], plan, scratch, cached[2]
            )
            run.stage((self.name, "drift"), (drift / ref.clamp_min(1e-12))[present])
            run.stage((self.name, "start"), ref[present])
        self._staged_updates = []
        for opt_id, upd in list(self._updates.items()):
            opt = next((o for o in run.trainer.optimizers if id(o) == opt_id), None)
            if opt is None:
                continue
            run.stage((self.name, "update", opt_id), self._update_ratios(run, opt, upd, w_norms))
            self._staged_updates.append((opt_id, self._update_step.get(opt_id, run.step)))
        self._updates = {}

    def _collect_sharded(self, run: _Run, plan: N.NormPlan | None, present: list[int]) -> None:
        """:meth:`collect` of sharded parameters: per-layer sums of squares of the local shards, staged with
        ``run.stage_norms`` (reduced across the mesh at the transfer); the ratios are taken on the host after.

        What is staged follows from the layout and the schedule only; a failure to measure stages zeros of the same
        shapes and is reported with the reduction (every process switches the monitor off at the same flush)."""
        assert self._routes is not None and self.layer_index is not None and run.routes is not None
        n_routes, n_layers = run.routes.num, len(run.layer_names)
        device = N.local_tensor(self.params[0]).device
        # an optimizer sampled but not stepped (a skipped manual step) has no update on any process; one whose
        # update failed here has zeros, and the flag below switches the monitor off
        opts = [
            o
            for o in run.trainer.optimizers
            if id(o) in self._pending_updates and (id(o) in self._updates or self._error is not None)
        ]
        self._pending_updates = []
        expected: list[tuple[Hashable, int]] = [((self.name, "norm"), len(present))]
        if self.track_drift:
            expected += [((self.name, "drift"), len(present)), ((self.name, "start"), len(present))]
        for opt in opts:
            n = len(set(run.optimizer_params(opt)[1]))
            expected += [((self.name, "update", id(opt)), n), ((self.name, "update_w", id(opt)), n)]

        def per_layer(norms: Tensor, routes: Tensor, layers: Tensor, which: list[int]) -> Tensor:
            return N.partial_powers(norms, routes, n_routes, 2.0, layers, n_layers)[:, which]

        values: dict[Hashable, Tensor] = {}
        if self._error is None:
            try:
                local = self._local(self.params)
                with torch.no_grad():
                    w_norms = N.plan_norms(plan, local)
                values[(self.name, "norm")] = per_layer(w_norms, self._routes, self.layer_index, present)
                if self.track_drift and self.reference is not None:
                    cached = self._reference_norms(plan)
                    scratch = next(iter(self._buffers.values()), None)
                    drift = N.drift_norms(local, self.reference, plan, scratch, cached[2])
                    values[(self.name, "drift")] = per_layer(drift, self._routes, self.layer_index, present)
                    values[(self.name, "start")] = per_layer(cached[1], self._routes, self.layer_index, present)
                for opt in opts:
                    upd = self._updates[id(opt)]
                    params, layers, index = run.optimizer_params(opt)
                    routes = run.route_index(params)
                    which = sorted(set(layers))
                    with torch.no_grad():
                        after = N.tensor_norms(self._local(params), device=w_norms.device)
                    values[(self.name, "update", id(opt))] = per_layer(upd, routes, index, which)
                    values[(self.name, "update_w", id(opt))] = per_layer(after, routes, index, which)
            except Exception as err:  # noqa: BLE001 - reported at the flush, on every process alike
                self._error = err
                values = {}
        for key, cols in expected:
            value = values.get(key)
            run.stage_norms(key, value if value is not None else torch.zeros(n_routes, cols, device=device))
        run.stage_failure((self.name, "failed"), self._error is not None, device)
        self._staged_updates = [(id(o), self._update_step.get(id(o), run.step)) for o in opts]
        self._updates = {}

    def _reference_norms(self, plan: N.NormPlan | None) -> tuple[list[Tensor], Tensor, list[Tensor] | None]:
        """The reference, its per-tensor norms and it packed in ``plan``'s layout (the reference is fixed: once)."""
        assert self.reference is not None
        cached = getattr(self, "_ref_norms", None)
        if cached is None or cached[0] is not self.reference:
            packed = plan.pack(self.reference, share_big=True) if plan is not None else None
            norms = (
                plan.packed_norms(packed) if plan is not None and packed is not None else N.tensor_norms(self.reference)
            )
            cached = self._ref_norms = (self.reference, norms, packed)
        return cached

    def _update_ratios(self, run: _Run, opt: torch.optim.Optimizer, upd: Tensor, w_norms: Tensor) -> Tensor:
        """Per-layer ``||update|| / ||w_after||`` of one optimizer's parameters (the layers it trains)."""
        n_layers = len(run.layer_names)
        params, layers, index = run.optimizer_params(opt)
        u = N.group_norms(upd, index, n_layers)
        opt_id = id(opt)
        if opt_id not in self._positions:  # where this optimizer's parameters sit in self.params (once per fit)
            where = {id(p): i for i, p in enumerate(self.params)}
            found = [where.get(id(p)) for p in params]
            self._positions[opt_id] = (
                torch.tensor(found, dtype=torch.long, device=w_norms.device) if None not in found else None
            )
        pos = self._positions[opt_id]
        with torch.no_grad():  # the weights after the step: the norms measured above, when they cover them
            w_tensor = (
                w_norms.index_select(0, pos) if pos is not None else N.plan_norms(run._opt_plan.get(opt_id), params)
            )
            w = N.group_norms(w_tensor, index, n_layers)
        return (u / w.clamp_min(1e-12))[sorted(set(layers))]

    def records(self, run: _Run, host: dict[Hashable, Any]) -> list[Record]:
        if host.get((self.name, "failed"), 0.0) > 0:  # here or on another process: off everywhere, together
            self._staged_updates = []
            raise _deferred_error(self._error)
        if (self.name, "norm") not in host:
            return []
        step = run.flush_step
        start = host.get((self.name, "start"))
        drift = host.get((self.name, "drift"))
        if self._routes is not None and drift is not None and start is not None:  # sharded: absolute drift, reduced
            drift = [d / max(s, 1e-12) for d, s in zip(drift, start)]
        out: list[Record] = [
            WeightSample(
                step,
                tuple(self._labels),
                tuple(host[(self.name, "norm")]),
                tuple(start) if start is not None else None,
                tuple(drift) if drift is not None else None,
            )
        ]
        for opt_id, at in self._staged_updates:
            if (self.name, "update", opt_id) not in host:  # sharded norms of a flush after an exception
                continue
            ratios = host[(self.name, "update", opt_id)]
            if (self.name, "update_w", opt_id) in host:  # sharded: ||update|| and ||w_after||, reduced
                ratios = [u / max(w, 1e-12) for u, w in zip(ratios, host[(self.name, "update_w", opt_id)])]
            k, opt = next((i, o) for i, o in enumerate(run.trainer.optimizers) if id(o) == opt_id)
            _, layers, _ = run.optimizer_params(opt)
            group = opt.param_groups[0]
            lr = float(group.get("lr", 0.0))
            base = float(group.get("initial_lr", lr))
            out.append(
                UpdateSample(
                    at,
                    k,
                    type(opt).__name__,
                    lr,
                    lr < 0.99 * base,  # below the scheduler's base LR: a warm-up
                    tuple(run.layer_label(i) for i in sorted(set(layers))),
                    tuple(ratios),
                )
            )
        self._staged_updates = []
        return out

    def state_dict(self) -> dict[str, Any]:
        sharded = self._routes is not None  # this process's shards: meaningless to the others on resume
        ref = [r.detach().cpu() for r in self.reference] if self.reference is not None and not sharded else None
        return {"reference": ref}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored_reference = state.get("reference")


class WeightDriftMonitor(_NormCheckBase):
    r"""Track per-layer weight norms, their drift from the start of fit and the size of each update.

    At ``on_train_start`` a copy of the trainable weights is kept as the reference (on their device;
    saved with the checkpoint so a resumed run keeps its reference). On sampled steps the weights are
    copied just before the optimizer step and compared right after it (a torch optimizer step
    post-hook), giving the update-to-weight ratio ``||w_after - w_before|| / ||w_after||`` per layer.
    Nothing is copied on other steps.

    Args:
        log_every_n_steps: sampling cadence in optimizer steps (default: the Trainer's).
        track_drift: keep the start-of-fit reference and log the relative drift from it.
        print_summary: print the findings table at the end of fit.
        thresholds: the thresholds of the rules (:class:`~lightning_normcheck.diagnosis.thresholds.Thresholds`).

    Example:
        >>> WeightDriftMonitor(track_drift=False)  # doctest: +ELLIPSIS
        <...WeightDriftMonitor object at ...>

    ========================================  ========================================================
    Key                                       Value
    ========================================  ========================================================
    ``normcheck/weight_norm/<layer>``         L2 norm of the module's own parameters
    ``normcheck/weight_drift/<layer>``        ``||w - w_start|| / ||w_start||``
    ``normcheck/update_ratio/<layer>``        ``||w_after - w_before|| / ||w_after||`` of a sampled step
    ========================================  ========================================================
    """

    def __init__(
        self,
        log_every_n_steps: int | None = None,
        track_drift: bool = True,
        print_summary: bool = True,
        thresholds: Thresholds | None = None,
    ) -> None:
        super().__init__(log_every_n_steps=log_every_n_steps, print_summary=print_summary, thresholds=thresholds)
        self._monitors = [_make_monitor(type(self).__name__, track_drift=track_drift)]


def _make_monitor(owner: str, track_drift: bool) -> _WeightDrift:
    _check_bool(owner, "track_drift", track_drift)
    return _WeightDrift(track_drift)


__all__ = ["WeightDriftMonitor"]
