"""Run state: what one fit of one callback shares between its monitors.

The parameter-to-layer map, the gradient norms of the current optimizer step (one fused pass, shared by
every monitor), the sampling schedule, and the staging area of device tensors that are moved to the host in
one transfer per logging step.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
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
        self.is_global_zero = bool(trainer.is_global_zero)
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
        self._staged: list[tuple[Hashable, Tensor]] = []
        self.flush_due = False
        self.flush_step = 0
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
            stats = _GradStats(sub_params, [grads[i] for i in with_grad], sub, sub_index, step, plan)  # type: ignore[misc]
        self._grad_cache = {id(optimizer): stats}
        return stats

    # the one host transfer ----------------------------------------------------------------------------------
    def stage(self, key: Hashable, value: Tensor) -> None:
        """Queue a 0-d or 1-D device tensor for the next transfer (``key`` is private to the monitor)."""
        self._staged.append((key, value))

    def transfer(self) -> dict[Hashable, Any]:
        """Move every staged tensor to the host in one copy: ``key -> float`` (0-d) or ``list[float]`` (1-D)."""
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
