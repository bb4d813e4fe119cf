"""Run state: what one fit of one callback shares between its monitors.

The parameter-to-layer map, the gradient norms of the current optimizer step (one fused pass, shared by
every monitor), the sampling schedule, and the staging area of device tensors that are moved to the host in
one transfer per logging step.

Sharded parameters (DTensor: FSDP2 through ``ModelParallelStrategy``, tensor parallelism): the norms are of
the full tensors, reduced from the local shards. Monitors stage the local sums of powers of their shards with
:meth:`_Run.stage_norms`; at the logging step :meth:`_Run.transfer` reduces everything staged so in one
collective per process group of the mesh (one in all for FSDP2 on a 1-D mesh), takes the roots and moves the
norms to the host with the rest. A step that logs nothing calls no collective; single-process and DDP runs
(no DTensor) never take this path.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torch import Tensor

from lightning_normcheck import norms as N
from lightning_normcheck.diagnosis.records import ROOT_LABEL, Record

if TYPE_CHECKING:
    from lightning_normcheck.callbacks._base import _NormCheckBase

#: Steps below this are sampled densely so that a problem present from the start is reported
#: within the first 20 optimizer steps, whatever ``log_every_n_steps`` is.
EARLY_STEPS = 20


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
    """Gradient norms of one optimizer step, computed once and shared by the monitors.

    With sharded gradients (``route_index`` given) ``grads`` are this process's shards, ``norms`` their norms, and
    ``partial`` the local sums of squares per route, to be reduced at the logging step
    (:meth:`_Run.stage_norms`); there is no total on the device then.
    """

    __slots__ = (
        "params",
        "grads",
        "layers",
        "layer_index",
        "norms",
        "_total",
        "step",
        "route_index",
        "partial",
        "versions",
    )

    def __init__(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        layers: list[int],
        layer_index: Tensor,
        step: int,
        plan: N.NormPlan | None = None,
        route_index: Tensor | None = None,
        num_routes: int = 1,
        exact: bool = False,
    ) -> None:
        self.params = params
        self.grads = grads
        self.layers = layers  # layer index of each gradient (host list, built at setup)
        self.layer_index = layer_index
        self.step = step
        # exact: measured as torch's clip_grad_norm_ measures, with each gradient's version counter, so that the
        # clip of this step may reuse the total (:mod:`._clip_reuse`); None: not reusable
        self.versions: tuple[int, ...] | None = None
        norms = N.clip_norms(grads) if exact and route_index is None else None
        if norms is not None:
            self.versions = tuple(g._version for g in grads)
        elif plan is not None:
            norms = plan.norms(grads)
        else:
            norms = N.tensor_norms(grads)
        self.norms = norms
        self.route_index = route_index
        self.partial: Tensor | None = None
        self._total: Tensor | None = None
        if route_index is None:
            self._total = N.total_norm(self.norms)
        else:
            self.partial = N.partial_powers(self.norms, route_index, num_routes).reshape(-1)

    @property
    def total(self) -> Tensor:
        """The total norm of this step, on the device (not available for sharded gradients: see ``partial``)."""
        if self._total is None:
            raise RuntimeError(
                "the total norm of sharded gradients exists only after the reduction at the logging step"
            )
        return self._total


class _Run:
    """Per-fit state shared by the monitors of one callback."""

    def __init__(self, owner: _NormCheckBase, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.owner = owner
        self.trainer = trainer
        self.module_ref = weakref.ref(pl_module)
        #: the cadence asked for (the callback's ``log_every_n_steps``, else the Trainer's)
        self.base_every = owner.log_every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        #: the per-layer sampling cadence of steps from ``cadence_from`` on (``base_every`` unless an overhead
        #: budget stretched it); steps before that keep ``_earlier_every``, the cadence already announced to them
        self.every = self.base_every
        self.cadence_from = 0
        self._earlier_every = self.base_every
        self.is_global_zero = bool(trainer.is_global_zero)
        self._step_tracker: Any = None  # see follow_step
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
        # sharded parameters (DTensor): where each one's norm is reduced; None when none is (single process, DDP)
        self.routes: N.ShardRoutes | None = None
        self.sharding_error: str | None = None  # why the layout is not supported (the norms cannot be right)
        params = [p for _, p in pl_module.named_parameters()]
        if any(N.is_dtensor(p) for p in params):
            try:
                self.routes = N.ShardRoutes(params)
            except ValueError as err:
                self.sharding_error = str(err)
        self._route_of = {id(p): r for p, r in zip(params, self.routes.of)} if self.routes is not None else {}
        self._partials: list[tuple[Hashable, Tensor, float]] = []
        self._checked_grads: set[tuple[int, tuple[int, ...]]] = set()
        self._staged: list[tuple[Hashable, Tensor]] = []
        self.flush_due = False
        self.flush_step = 0
        self.probing = False  # True while a probe runs extra forward passes: hooks must ignore them
        self._grad_cache: dict[int, _GradStats] = {}
        self._opt_index: dict[int, tuple[list[Tensor], list[int], Tensor]] = {}
        self._opt_plan: dict[int, N.NormPlan | None] = {}  # id(optimizer) -> fast gradient-norm plan (or None)
        self._sub_index: dict[tuple[int, tuple[int, ...]], tuple[list[int], Tensor, N.NormPlan | None]] = {}
        self._opt_routes: dict[tuple[int, tuple[int, ...]], Tensor] = {}  # sharded: the route of each gradient
        #: measure gradients as torch's clip_grad_norm_ does (:func:`~lightning_normcheck.norms.clip_norms`), so
        #: that Lightning's clip by norm can reuse the total; set by :mod:`._clip_reuse` when clipping by norm is on
        self.exact_norms = False
        # the loss scaler of fp16 AMP (Lightning's MixedPrecision / FSDP precision plugins), when enabled: the loss
        # that reaches on_before_backward is multiplied by its scale (see unscaled_loss)
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        enabled = getattr(scaler, "is_enabled", None)
        self._scaler = scaler if scaler is not None and (not callable(enabled) or enabled()) else None

    def unscaled_loss(self, loss: Tensor) -> Tensor:
        """The loss as the training step returned it, detached. Under fp16 AMP Lightning hands ``on_before_backward``
        the loss times the GradScaler's scale (``precision_plugin.pre_backward`` scales before it calls the hooks);
        divided back here by the scale tensor on the device, now (the scaler updates that tensor in place after the
        optimizer step): no host read. A scaler without a scale tensor (not torch's) is left alone: reading its
        scale on the host at every step would be a sync per step."""
        loss = loss.detach()
        scale = getattr(self._scaler, "_scale", None)
        if isinstance(scale, Tensor):
            return loss.float() / scale.to(loss.device).reshape(()).float()
        return loss

    @property
    def pl_module(self) -> pl.LightningModule:
        m = self.module_ref()
        assert m is not None
        return m

    @property
    def step(self) -> int:
        """The Trainer's ``global_step`` (optimizer steps), read from its progress counter once
        :meth:`follow_step` found it (the property walks five objects; the hooks read it ~20 times a step)."""
        tracker = self._step_tracker
        if tracker is not None:
            return tracker.completed  # type: ignore[no-any-return]
        return int(self.trainer.global_step)

    def follow_step(self) -> None:
        """At each batch start: find the counter behind ``global_step`` (Lightning's optimizer-step progress,
        updated in place, also on a checkpoint restore) and check it against the property; else use the property."""
        self._step_tracker = None
        try:
            loop = self.trainer.fit_loop.epoch_loop
            if self.pl_module.automatic_optimization:
                tracker = loop.automatic_optimization.optim_progress.optimizer.step.total
            else:
                tracker = loop.manual_optimization.optim_step_progress.total
            if tracker.completed == int(self.trainer.global_step):
                self._step_tracker = tracker
        except Exception:  # noqa: BLE001 - another loop layout: the property
            pass

    def is_due(self, step: int) -> bool:
        """Whether ``step`` is a sampled step: every :meth:`cadence` steps, and densely below ``EARLY_STEPS``."""
        if step % (self.every if step >= self.cadence_from else self._earlier_every) == 0:
            return True
        return step < EARLY_STEPS and (step < 4 or step % 2 == 0)

    def is_log_step(self, step: int) -> bool:
        """Whether ``step`` is a logging step: every ``base_every`` steps (the cadence asked for, which a budget never
        stretches), and densely below ``EARLY_STEPS``; every sampled step is one."""
        return step % self.base_every == 0 or step < EARLY_STEPS and (step < 4 or step % 2 == 0)

    def cadence(self, step: int) -> int:
        """The per-layer sampling cadence that applies to ``step`` (the dense early steps aside)."""
        return self.every if step >= self.cadence_from else self._earlier_every

    def set_cadence(self, every: int, from_step: int) -> None:
        """Sample every ``every`` steps from ``from_step`` on; the steps before keep the cadence they had.

        ``from_step`` must lie beyond every step whose sampling a monitor has already planned (the bug detector
        plans the next step's), so what was planned still happens."""
        self._earlier_every = self.cadence(from_step - 1) if from_step > 0 else every
        self.every = int(every)
        self.cadence_from = int(from_step)

    def layer_label(self, index: int) -> str:
        return self.layer_names[index] or ROOT_LABEL

    def optimizer_index(self, optimizer: Any) -> int:
        """The index of ``optimizer`` (or of the optimizer a LightningOptimizer wraps) in the Trainer's list."""
        inner = getattr(optimizer, "_optimizer", optimizer)
        for i, o in enumerate(self.trainer.optimizers):
            if o is inner or o is optimizer:
                return i
        return len(self.trainer.optimizers)

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

    def layout_problem(self) -> str | None:
        """Why the norms of this run's parameters cannot be those of the full tensors, or None.

        FSDP1 (Lightning's ``FSDPStrategy``) and DeepSpeed ZeRO keep flattened local shards in plain tensors that
        do not say how they are split; a DTensor with a Partial placement holds summands, not pieces. Lightning
        runs FSDP1 and DeepSpeed on CUDA only: this check could not be exercised on a machine without a GPU.
        """
        if self.sharding_error is not None:
            return f"parameters laid out as {self.sharding_error}"
        strategy = getattr(self.trainer, "strategy", None)
        if isinstance(strategy, DeepSpeedStrategy):
            return "DeepSpeed (its ZeRO stages shard gradients and parameters into flat buffers)"
        module = self.pl_module
        if (
            isinstance(strategy, FSDPStrategy)
            or any(type(p).__name__ == "FlatParameter" for p in module.parameters())
            or any(type(m).__name__ == "FullyShardedDataParallel" for m in module.modules())
        ):
            return "FSDP1 (FullyShardedDataParallel: flattened local shards)"
        return None

    def route_index(self, params: list[Tensor]) -> Tensor:
        """The route (:class:`~lightning_normcheck.norms.ShardRoutes`) of each of ``params``, as a long tensor."""
        return torch.tensor([self._route_of.get(id(p), 0) for p in params], dtype=torch.long)

    def grad_stats(self, optimizer: torch.optim.Optimizer) -> _GradStats:
        """Per-tensor and total gradient norms for this optimizer step (one fused pass, cached)."""
        step = self.step
        cached = self._grad_cache.get(id(optimizer))
        if cached is not None and cached.step == step:
            return cached
        if self.routes is not None:
            return self._sharded_grad_stats(optimizer)
        params, layers, index = self.optimizer_params(optimizer)
        key = id(optimizer)
        if key not in self._opt_plan:
            self._opt_plan[key] = N.norm_plan(params)
        grads = [p.grad for p in params]
        if not any(g is None for g in grads):
            plan = self._opt_plan[key]
            stats = _GradStats(params, grads, layers, index, step, plan, exact=self.exact_norms)  # type: ignore[arg-type]
        else:
            with_grad = tuple(i for i, g in enumerate(grads) if g is not None)  # frozen: grad is None
            sub_params = [params[i] for i in with_grad]
            sub_key = (key, with_grad)  # the same parameters are usually frozen at every step
            if sub_key not in self._sub_index:
                sub = [layers[i] for i in with_grad]
                plan = N.NormPlan(sub_params) if self._opt_plan[key] is not None and sub_params else None
                self._sub_index = {sub_key: (sub, torch.tensor(sub, dtype=torch.long), plan)}
            sub, sub_index, plan = self._sub_index[sub_key]
            sub_grads = [grads[i] for i in with_grad]
            stats = _GradStats(sub_params, sub_grads, sub, sub_index, step, plan, exact=self.exact_norms)  # type: ignore[arg-type]
        self._grad_cache = {id(optimizer): stats}
        return stats

    def current_grad_stats(self, optimizer: Any) -> _GradStats | None:
        """The gradient norms measured for ``optimizer`` (or the optimizer a LightningOptimizer wraps) at this step,
        if any."""
        step = self.step
        for opt in (optimizer, getattr(optimizer, "_optimizer", None)):
            stats = self._grad_cache.get(id(opt)) if opt is not None else None
            if stats is not None and stats.step == step:
                return stats
        return None

    def _sharded_grad_stats(self, optimizer: torch.optim.Optimizer) -> _GradStats:
        """:meth:`grad_stats` of sharded gradients: the norms of the local shards and their sums of squares per
        route; nothing is reduced here (that waits for the logging step)."""
        assert self.routes is not None
        params, layers, _ = self.optimizer_params(optimizer)
        with_grad = tuple(i for i, p in enumerate(params) if p.grad is not None)  # frozen: grad is None
        sub_params = [params[i] for i in with_grad]
        grads = [p.grad for p in sub_params]
        check = (id(optimizer), with_grad)
        if check not in self._checked_grads:  # once per set of parameters: gradients laid out like the parameters
            for p, g in zip(sub_params, grads):
                if N.ShardRoutes.key(g) != N.ShardRoutes.key(p):  # type: ignore[arg-type]
                    raise ValueError(
                        f"the gradient of {self.param_name.get(id(p), '?')} is laid out across processes unlike the"
                        " parameter (its norm cannot be reduced from the shards)"
                    )
            self._checked_grads.add(check)
        sub_key = (id(optimizer), with_grad)
        if sub_key not in self._sub_index:
            sub = [layers[i] for i in with_grad]
            local = [N.local_tensor(p) for p in sub_params]
            self._sub_index[sub_key] = (sub, torch.tensor(sub, dtype=torch.long), N.norm_plan(local))
            self._opt_routes[sub_key] = self.route_index(sub_params)
        sub, sub_index, plan = self._sub_index[sub_key]
        local_grads = [N.local_tensor(g) for g in grads]  # type: ignore[arg-type]
        stats = _GradStats(
            sub_params, local_grads, sub, sub_index, self.step, plan, self._opt_routes[sub_key], self.routes.num
        )
        self._grad_cache = {id(optimizer): stats}
        return stats

    # the one host transfer ----------------------------------------------------------------------------------
    def stage(self, key: Hashable, value: Tensor) -> None:
        """Queue a 0-d or 1-D device tensor for the next transfer (``key`` is private to the monitor)."""
        self._staged.append((key, value))

    def stage_norms(self, key: Hashable, partial: Tensor, norm_type: float = 2.0) -> None:
        """Queue norms of sharded tensors, as local sums of powers ``(num_routes, n)`` or ``(num_routes,)``
        (:func:`~lightning_normcheck.norms.partial_powers`): at the transfer they are reduced across the mesh, and
        ``host[key]`` holds the ``n`` norms (a float when ``partial`` is 1-D). Every process stages the same keys
        with the same shapes in the same order (they follow from the layout and the schedule, never from values)."""
        self._partials.append((key, partial, float(norm_type)))

    def stage_failure(self, key: Hashable, failed: bool, device: torch.device) -> None:
        """Stage, with the sharded norms, whether this process failed to measure its share: ``host[key] > 0`` when
        any process it reduces with did, so that all of them switch the monitor off together. A monitor that failed
        on one process only must go on staging zeros of the same shapes until then: one that stopped staging
        would leave the others waiting in the collective."""
        assert self.routes is not None
        self.stage_norms(key, torch.full((self.routes.num,), float(failed), device=device), 1.0)

    def _reduce_partials(self) -> None:
        """Reduce what :meth:`stage_norms` queued (one collective per process group, for all of it together) and
        stage the norms."""
        partials, self._partials = self._partials, []
        if not partials or self.routes is None:
            return
        routes = self.routes
        device = partials[0][1].device
        rows = [t.detach().to(device=device, dtype=torch.float32).reshape(routes.num, -1) for _, t, _ in partials]
        maxes = [math.isinf(p) for (_, _, p), r in zip(partials, rows) for _ in range(r.shape[1])]
        reduced = N.all_reduce_partials(torch.cat(rows, dim=1), routes, maxes)
        at = 0
        for (key, t, p), r in zip(partials, rows):
            n = r.shape[1]
            norms = N.finish_powers(reduced[:, at : at + n], p)
            self.stage(key, norms.reshape(()) if t.dim() == 1 else norms)
            at += n

    def transfer(self, reduce: bool = True) -> dict[Hashable, Any]:
        """Move every staged tensor to the host in one copy: ``key -> float`` (0-d) or ``list[float]`` (1-D).

        Norms of sharded tensors are reduced across processes first; with ``reduce=False`` (a flush that not every
        process reaches, such as after an exception) they are dropped instead: no collective, no partial value."""
        if reduce:
            self._reduce_partials()
        self._partials = []
        staged, self._staged = self._staged, []
        if not staged:
            return {}
        device = staged[0][1].device
        parts = [t.detach().reshape(-1).to(device=device, dtype=torch.float32) for _, t in staged]
        flat = torch.cat(parts).cpu().tolist()
        out: dict[Hashable, Any] = {}
        i = 0
        for (key, t), part in zip(staged, parts):
            n = part.numel()
            out[key] = flat[i] if t.dim() == 0 else flat[i : i + n]
            i += n
        return out

    def observe(self, *records: Record) -> None:
        """Hand records to the diagnosis at once (a bug seen inside a hook)."""
        self.owner._observe(self.step, list(records))
