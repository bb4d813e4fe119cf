"""Norm computations shared by every lightning_normcheck callback.

Pure torch (no Lightning import), in the spirit of ``lightning.pytorch.utilities.grads`` and
``torch.nn.utils.clip_grad``: everything runs under ``no_grad``, returns tensors that stay on the
device, groups inputs by ``(device, dtype)`` and uses torch's fused ``_foreach_norm`` with a plain
per-tensor fallback. Nothing here calls ``.item()`` or otherwise synchronizes with the host (but
:func:`init_stats` of sharded weights, once at the start of fit): the callbacks stack the results and move
them to the host once per logging step. Sharded tensors (DTensor) are measured from their local shards; the
sums of powers are reduced across the mesh by the caller (:class:`ShardRoutes`, :func:`all_reduce_partials`).

Example:
    >>> import torch
    >>> ts = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    >>> tensor_norms(ts)
    tensor([ 5., 12.])
    >>> total_norm(tensor_norms(ts))
    tensor(13.)
    >>> group_norms(tensor_norms(ts), torch.tensor([0, 0]), num_groups=1)
    tensor([13.])
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

__all__ = [
    "tensor_norms",
    "total_norm",
    "group_norms",
    "rms",
    "nonfinite",
    "sum_of_squares",
    "sub_norms",
    "clone_tensors",
    "copy_tensors",
    "NormPlan",
    "norm_plan",
    "clip_norms",
    "plan_norms",
    "rms_from_sumsq",
    "alive_units",
    "dead_fraction",
    "saturated_count",
    "feature_stats",
    "target_stats",
    "init_stats",
    "relative_drift",
    "drift_norms",
    "is_dtensor",
    "local_tensor",
    "ShardRoutes",
    "partial_powers",
    "finish_powers",
    "all_reduce_partials",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norm_input(t: Tensor) -> Tensor:
    # Sparse gradients (nn.Embedding(sparse=True)) have no foreach kernel: their values carry the norm.
    if t.is_sparse:
        return t.coalesce().values()
    return t.detach()


@torch.no_grad()
def tensor_norms(tensors: Sequence[Tensor], norm_type: float = 2.0, device: torch.device | None = None) -> Tensor:
    """Per-tensor norms as one 1-D ``float32`` tensor, in the order of ``tensors``.

    Tensors are grouped by ``(device, dtype)``; each group costs one fused ``_foreach_norm`` launch.
    Half-precision inputs are reduced in ``float32`` so a large fp16 gradient does not overflow the
    norm itself. Complex tensors give the norm of their magnitudes, like ``torch.linalg.vector_norm``.

    Args:
        tensors: the tensors to measure (gradients, weights, activations).
        norm_type: the order of the norm (``2.0``, ``1.0``, ``inf``...).
        device: where the result lives; default the first tensor's device (CPU when empty).

    Returns:
        A ``float32`` tensor of shape ``(len(tensors),)``.
    """
    tensors = [_norm_input(t) for t in tensors]
    if device is None:
        device = tensors[0].device if tensors else torch.device("cpu")
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=device)
    norm_type = float(norm_type)
    if math.isinf(norm_type):  # the max of nothing raises; an empty tensor (a shard of none) has norm 0
        tensors = [t if t.numel() else t.new_zeros(1) for t in tensors]
    out: list[Tensor | None] = [None] * len(tensors)
    grouped = _group_tensors_by_device_and_dtype([tensors], with_indices=True)  # type: ignore[list-item]
    for (dev, dtype), ([group_or_none], indices) in grouped.items():  # type: ignore[misc]
        group = cast(list[Tensor], group_or_none)
        norms: Sequence[Tensor]
        if _has_foreach_support(group, dev) and not dtype.is_complex:
            kwargs = {"dtype": torch.float32} if dtype in _LOW_PRECISION else {}
            norms = torch._foreach_norm(group, norm_type, **kwargs)
        else:
            norms = [torch.linalg.vector_norm(t, norm_type, dtype=_reduce_dtype(t)) for t in group]
        for i, n in zip(indices, norms):
            out[i] = n
    return torch.stack([n.to(device=device, dtype=torch.float32) for n in out])  # type: ignore[union-attr]


def _reduce_dtype(t: Tensor) -> torch.dtype | None:
    if t.dtype in _LOW_PRECISION or not t.is_floating_point() and not t.is_complex():
        return torch.float32
    return None


def total_norm(norms: Tensor, norm_type: float = 2.0) -> Tensor:
    """Combine per-tensor norms into the norm of all tensors concatenated.

    This is what ``torch.nn.utils.get_total_norm`` computes (it also takes the norm of the stacked
    per-tensor norms), so the two agree to float rounding. An empty input gives ``0``.
    """
    if norms.numel() == 0:
        return norms.new_zeros(())
    return torch.linalg.vector_norm(norms, float(norm_type))


def group_norms(norms: Tensor, group_index: Tensor, num_groups: int, norm_type: float = 2.0) -> Tensor:
    """Aggregate per-tensor norms into per-group norms (for example per owning module).

    ``group_index[i]`` is the group of tensor ``i``. For a p-norm the group norm is
    ``(sum_i norm_i ** p) ** (1/p)``, the norm of the group's tensors concatenated; for ``inf`` it is
    the max. One ``index_add_`` (or ``scatter_reduce``), no host sync. Empty groups give ``0``.
    """
    norm_type = float(norm_type)
    out = group_powers(norms, group_index, num_groups, norm_type)
    if norms.numel() == 0 or math.isinf(norm_type):
        return out
    return out.pow(1.0 / norm_type)


def group_powers(norms: Tensor, group_index: Tensor, num_groups: int, norm_type: float = 2.0) -> Tensor:
    """Per-group sums of ``norm ** p`` (for ``inf``: the max), i.e. :func:`group_norms` before the root.

    Sums of powers add up across the shards of a tensor, where norms do not: this is what a sharded norm
    reduces across processes before taking the root.
    """
    norm_type = float(norm_type)
    group_index = group_index.to(norms.device)
    out = norms.new_zeros(num_groups)
    if norms.numel() == 0:
        return out
    if math.isinf(norm_type):
        return out.scatter_reduce(0, group_index, norms, reduce="amax", include_self=True)
    out.index_add_(0, group_index, norms.pow(norm_type))
    return out


def rms(norms: Tensor, numels: Tensor | Sequence[int]) -> Tensor:
    """Root mean square from L2 norms and element counts: ``norm / sqrt(numel)`` (0 when empty)."""
    numels_t = torch.as_tensor(numels, dtype=torch.float32, device=norms.device)
    return norms / numels_t.clamp_min(1.0).sqrt()


def sum_of_squares(t: Tensor) -> Tensor:
    """Sum of squares of one tensor, reduced in ``float32`` (one kernel; used by forward and gradient hooks).

    Of a DTensor, the sum over this process's shard (a plain tensor): no collective inside a hook. Of the detached
    tensor (no graph), without a ``no_grad`` context: entering one costs more than the kernel on a small tensor.
    """
    t = local_tensor(t)
    return torch.linalg.vector_norm(_norm_input(t), 2.0, dtype=_reduce_dtype(t)).square()


def nonfinite(values: Tensor) -> Tensor:
    """Boolean mask of entries that are ``inf`` or ``nan`` (a norm is non-finite iff its tensor is)."""
    return ~torch.isfinite(values)


@torch.no_grad()
def clone_tensors(tensors: Sequence[Tensor]) -> list[Tensor]:
    """Detached copies (used for weight snapshots)."""
    return [t.detach().clone() for t in tensors]


@torch.no_grad()
def copy_tensors(tensors: Sequence[Tensor], into: list[Tensor] | None = None) -> list[Tensor]:
    """Detached copies of ``tensors``, written into ``into`` (one fused ``_foreach_copy_``) when it has their
    shapes, dtypes and devices, else new ones. Reusing a buffer spares the allocation, which on CPU costs
    more than the copy itself (2.1 M floats: 2.1 ms to clone, 0.7 ms to copy into a buffer)."""
    if (
        into is None
        or len(into) != len(tensors)
        or any(b.shape != t.shape or b.dtype != t.dtype or b.device != t.device for b, t in zip(into, tensors))
    ):
        return clone_tensors(tensors)
    torch._foreach_copy_(into, list(tensors))  # under no_grad: no graph, no detached views needed
    return into


@torch.no_grad()
def sub_norms(a: Sequence[Tensor], b: Sequence[Tensor], norm_type: float = 2.0, *, inplace: bool = False) -> Tensor:
    """Per-pair norms of ``a[i] - b[i]`` (update sizes, drift from a reference) in one fused pass.

    ``inplace=True`` writes the differences into ``a`` (a scratch copy the caller owns) instead of allocating.
    """
    if len(a) != len(b):
        raise ValueError(f"sub_norms needs sequences of the same length, got {len(a)} and {len(b)}")
    if not a:
        return torch.zeros(0, dtype=torch.float32)
    diffs: Sequence[Tensor]
    if inplace:
        diffs = list(a)
        torch._foreach_sub_(diffs, [t.detach() for t in b])
    else:
        diffs = torch._foreach_sub([t.detach() for t in a], [t.detach() for t in b])
    return tensor_norms(diffs, norm_type)


#: Tensors up to this many elements are stacked by shape and reduced together (copying them costs less than
#: one kernel launch each: 600 small parameters take 0.26 ms instead of 1.9 ms on a 2-core CPU).
STACK_NUMEL = 8192
#: ... and only in groups of at least this many tensors of one shape (fewer: one norm each is cheaper; a 10-layer
#: MLP's parameters took 28 us stacked by shape, 14 us through one ``_foreach_norm``).
STACK_MIN = 8


def norm_plan(tensors: list[Tensor]) -> NormPlan | None:
    """A :class:`NormPlan` for ``tensors`` (and any list of same-shaped tensors), or None when they are not all
    plain float32 tensors on one device."""
    plain = bool(tensors) and all(
        type(t) in (Tensor, torch.nn.Parameter) and t.dtype == torch.float32 and t.device == tensors[0].device
        for t in tensors
    )
    return NormPlan(tensors) if plain else None


def plan_norms(plan: NormPlan | None, tensors: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms through ``plan`` when there is one, else :func:`tensor_norms`."""
    return plan.norms(tensors) if plan is not None else tensor_norms(tensors)


class NormPlan:
    """A fast way to compute the per-tensor L2 norms of one optimizer's gradients, built once per fit.

    The hot path of every optimizer step. Only for plain float32 tensors on one device (the caller checks):
    large gradients go through one fused ``_foreach_norm``; small ones are stacked by shape, one
    ``vector_norm`` per shape, so a model of hundreds of small layers does not pay one kernel per tensor.
    The result is in the order of the parameters and equals :func:`tensor_norms`.
    Anything unexpected (a sparse gradient from ``nn.Embedding(sparse=True)``) takes that general path.
    """

    __slots__ = ("count", "big", "groups", "inverse", "part_shapes")

    def __init__(self, params: list[Tensor]) -> None:
        self.count = len(params)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        self.big: list[int] = []  # through one _foreach_norm
        for i, p in enumerate(params):
            if p.numel() > STACK_NUMEL:
                self.big.append(i)
            else:
                by_shape.setdefault(tuple(p.shape), []).append(i)
        # a stack pays for its copy and two kernels only with enough tensors of one shape: the rest go with big
        self.groups = [g for g in by_shape.values() if len(g) >= STACK_MIN]
        self.big = sorted(self.big + [i for g in by_shape.values() if len(g) < STACK_MIN for i in g])
        order = self.big + [i for g in self.groups for i in g]
        self.part_shapes = [tuple(params[i].shape) for i in self.big] + [
            (len(g), *params[g[0]].shape) for g in self.groups
        ]
        self.inverse: Tensor | None = None  # None: already in parameter order
        if order != list(range(len(order))):
            inverse = torch.empty(len(order), dtype=torch.long)
            inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
            self.inverse = inverse.to(params[0].device)

    def norms(self, grads: list[Tensor]) -> Tensor:
        if len(grads) != self.count:
            return tensor_norms(grads)
        try:
            return self.packed_norms(self._layout(grads))
        except (NotImplementedError, RuntimeError):
            return tensor_norms(grads)

    # packs: tensors shaped like the plan's in its layout (weight snapshots, differences) ---------------------------
    def _layout(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The big tensors themselves, then each group stacked (gradients: no grad mode needed, none is tracked)."""
        return [tensors[i] for i in self.big] + [torch.stack([tensors[i] for i in g]) for g in self.groups]

    @torch.no_grad()
    def pack(
        self, tensors: Sequence[Tensor], into: list[Tensor] | None = None, share_big: bool = False
    ) -> list[Tensor]:
        """``tensors`` (shaped like the plan's) in the plan's layout: each big one on its own, then each group of
        small ones stacked into one tensor, so that copying, subtracting and measuring hundreds of small tensors
        takes a few kernels instead of one each (the 600 small parameters of a 450-module stack, 2-core CPU:
        subtract and measure 4.1 ms one by one, 0.95 ms stacked).

        A copy, written into ``into`` (a pack of a plan of the same layout) when it fits, else new; ``share_big``:
        the big tensors themselves, not copies (for a pack that is only read: a reference copy). Under ``no_grad``:
        no graph, no detached views needed."""
        big = [tensors[i] for i in self.big]
        if into is not None and self.fits(into):
            if big:
                torch._foreach_copy_(into[: len(big)], big)
            for buf, g in zip(into[len(big) :], self.groups):
                torch.stack([tensors[i] for i in g], out=buf)
            return into
        if share_big:
            return self._layout(tensors)
        return [t.clone() for t in big] + [torch.stack([tensors[i] for i in g]) for g in self.groups]

    def fits(self, pack: Sequence[Tensor]) -> bool:
        """Whether ``pack`` has this plan's layout (the shapes of its parts)."""
        return len(pack) == len(self.big) + len(self.groups) and all(
            tuple(t.shape) == s for t, s in zip(pack, self.part_shapes)
        )

    @torch.no_grad()
    def diff(
        self, tensors: Sequence[Tensor], reference: list[Tensor], into: list[Tensor] | None = None
    ) -> list[Tensor]:
        """``tensors - reference`` (a pack of this layout) as a pack, written into ``into`` when it fits: one pass
        over each big tensor (``torch.sub`` with ``out=``), not a copy and a subtraction (the drift of 2.1 M floats
        with its norms, inside a training run on a 2-core CPU: 1.2-1.5 ms -> 1.0-1.1 ms)."""
        nb = len(self.big)
        if into is None or not self.fits(into):
            head = torch._foreach_sub([tensors[i] for i in self.big], reference[:nb]) if nb else []
            return list(head) + [
                torch.stack([tensors[i] for i in g]).sub_(r) for g, r in zip(self.groups, reference[nb:])
            ]
        for k, i in enumerate(self.big):
            torch.sub(tensors[i], reference[k], out=into[k])
        for buf, g, r in zip(into[nb:], self.groups, reference[nb:]):
            torch.stack([tensors[i] for i in g], out=buf).sub_(r)
        return into

    @torch.no_grad()
    def sub_(self, pack: list[Tensor], tensors: Sequence[Tensor]) -> list[Tensor]:
        """``pack -= tensors`` in place (``tensors`` as given to :meth:`pack`); returns ``pack``."""
        nb = len(self.big)
        if nb:
            torch._foreach_sub_(pack[:nb], [tensors[i] for i in self.big])
        for buf, g in zip(pack[nb:], self.groups):
            buf.sub_(torch.stack([tensors[i] for i in g]))
        return pack

    def packed_norms(self, pack: Sequence[Tensor]) -> Tensor:
        """The L2 norm of each tensor of a pack, in the order of the tensors packed (the hot path of
        :meth:`norms`: packs hold no graph, so no grad-mode context)."""
        nb = len(self.big)
        parts: list[Tensor] = []
        if nb:
            parts.append(torch.stack(torch._foreach_norm(list(pack[:nb]), 2.0)))
        for buf, g in zip(pack[nb:], self.groups):
            parts.append(torch.linalg.vector_norm(buf.reshape(len(g), -1), 2.0, dim=1))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out if self.inverse is None else out[self.inverse]


@torch.no_grad()
def clip_norms(grads: list[Tensor]) -> Tensor | None:
    """Per-tensor L2 norms of ``grads`` computed the way ``torch.nn.utils.get_total_norm`` computes them, so that
    :func:`total_norm` of the result is bit for bit that function's total (and a clip with it is the clip
    ``clip_grad_norm_`` makes); None when ``grads`` are not all dense float32 tensors on one device.

    Same kernels on the same tensors in the same order: one ``_foreach_norm`` where torch's foreach check passes,
    else one ``vector_norm`` each, stacked in the order given. :class:`NormPlan`'s stacks of small tensors matched
    ``_foreach_norm`` bit for bit in 720 random trials on a 2-core CPU, but that is a property of the CPU kernels
    (a GPU's fused ``_foreach_norm`` has its own reduction order, not measured here), so a total meant for clipping
    never relies on it. ``get_total_norm`` also takes ``vector_norm`` of each 0-d norm before stacking; that is the
    identity on the CPU (measured: 22,000 float32 values from 1e-30 to 1e30, none changed), so :func:`total_norm`
    skips those per-tensor kernels. On a GPU, where a float32 reduction accumulates in float32, it could differ only
    for a tensor norm below ~1e-19 or above ~1e19 (its square under- or overflows): not measured (no GPU here).
    """
    if not grads:
        return None
    device = grads[0].device
    if not all(type(g) is Tensor and g.dtype == torch.float32 and g.layout == torch.strided for g in grads):
        return None
    if any(g.device != device for g in grads):
        return None
    if _has_foreach_support(grads, device):
        return torch.stack(torch._foreach_norm(grads, 2.0))
    return torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads])


# -- activation statistics ------------------------------------------------------------------------------------
def rms_from_sumsq(sumsq: Tensor, numel: int) -> Tensor:
    """Root mean square from a sum of squares and an element count (0 when empty)."""
    return (sumsq / max(int(numel), 1)).sqrt()


def alive_units(x: Tensor) -> Tensor | None:
    """Boolean mask of the units of a ReLU-like output that are non-zero for at least one example.

    A unit is a channel (dim 1) of a 4-D+ output, else the last dimension. ``None`` for a 0-d/1-d output.
    """
    if x.dim() < 2:
        return None
    x = x.detach()
    unit_dim = 1 if x.dim() >= 4 else x.dim() - 1
    if x.numel() == 0:  # an empty batch: no unit fired (max/min of nothing would raise)
        return torch.zeros(x.shape[unit_dim], dtype=torch.bool, device=x.device)
    dims = tuple(d for d in range(x.dim()) if d != unit_dim)
    # a unit fired iff its largest or smallest value is nonzero (NaN too: max/min propagate it): two reductions in
    # place, no mask the size of x and no channels-last copy (a (32, 16, 16, 16) conv output: 435 -> 27 us on a
    # 2-core CPU against any() over a moved and reshaped copy)
    return (x.amax(dim=dims) != 0) | (x.amin(dim=dims) != 0)


def dead_fraction(alive: Sequence[Tensor]) -> Tensor:
    """The fraction of units that never fired in any of the ``alive`` masks (a window of sampled batches)."""
    return 1.0 - torch.stack(list(alive)).any(0).float().mean()


def saturated_count(x: Tensor, low: float, high: float, threshold: float) -> Tensor:
    """How many entries of a bounded activation's output lie within ``1 - threshold`` of its range of a bound."""
    x = x.detach()
    margin = (high - low) * (1.0 - threshold) / 2.0
    return ((x <= low + margin) | (x >= high - margin)).sum()


# -- batch statistics --------------------------------------------------------------------------------------
#: Input tensors larger than this are measured on their first samples only (cost: a 32x3x224x224 batch
#: took ~8 passes' time; tabular batches, where a rare huge value matters, are far below it).
MAX_ELEMENTS = 1 << 20
#: The target median is taken over at most this many entries (a dense target can be large).
MEDIAN_SAMPLE = 65536


def feature_axis(ndim: int) -> tuple[int, str]:
    """The axis that holds the features of a batch tensor with ``ndim`` dimensions, and its name."""
    if ndim <= 2:
        return (-1 if ndim <= 1 else 1), "column"
    if ndim == 3:
        return 2, "feature"  # (batch, time, features)
    return 1, "channel"  # (batch, channels, ...)


@torch.no_grad()
def feature_stats(x: Tensor, threshold: float, top_k: int = 3) -> dict[str, Tensor]:
    """Per-feature scale statistics of one float batch tensor, reduced to its ``top_k`` features by max |x|.

    Reductions run over every dimension but the feature axis (no copy of the batch); about ten kernels, all
    results on the device: ``idx``, ``max_abs``, ``mean``, ``std``, ``min``, ``max``, ``near_zero`` (fraction
    within 1% of the feature's max |x|) of the top features, and ``n_above`` (features above ``threshold``),
    ``nonfinite`` (features with a NaN/inf), ``all_min``, ``all_max_abs`` of the whole tensor.
    """
    x = x.detach()
    if x.ndim >= 2 and x.numel() > MAX_ELEMENTS:  # big images/sequences: the first samples tell the scale
        x = x[: max(1, MAX_ELEMENTS // max(1, x[0].numel()))]
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # half precision: squares of large values would overflow in std
    if x.ndim <= 1:
        x = x.reshape(-1, 1)
    axis, _ = feature_axis(x.ndim)
    dims = tuple(d for d in range(x.ndim) if d != axis)
    vmin, vmax = x.amin(dim=dims), x.amax(dim=dims)  # NaN propagates: a NaN feature has a NaN max
    # two passes (mean, then the mean square of the deviations): torch.std_mean over the batch dim of a (64, 256)
    # batch took 125 us on a 2-core CPU, these three kernels 17 us; as stable (no difference of large squares)
    mean = x.mean(dim=dims, keepdim=True)
    std = (x - mean).square().mean(dim=dims).sqrt()
    mean = mean.reshape(-1)
    max_abs = torch.maximum(vmax, -vmin)
    bad = ~(torch.isfinite(vmin) & torch.isfinite(vmax))
    rank = torch.where(bad, torch.full_like(max_abs, math.inf), max_abs)  # non-finite features first
    k = min(top_k, max_abs.shape[0])
    _, idx = torch.topk(rank, k)
    top = x.index_select(axis, idx).abs()
    shape = [1] * x.ndim
    shape[axis] = k
    near_zero = (top <= 0.01 * max_abs[idx].reshape(shape)).float().mean(dim=dims)
    return {
        "idx": idx.float(),
        "max_abs": max_abs[idx],
        "mean": mean[idx],
        "std": std[idx],
        "min": vmin[idx],
        "max": vmax[idx],
        "near_zero": near_zero,
        "n_above": (max_abs > threshold).sum(),
        "nonfinite": bad.sum(),
        "all_min": vmin.min(),
        "all_max_abs": max_abs.max(),
    }


@torch.no_grad()
def target_stats(y: Tensor) -> dict[str, Tensor]:
    """Scale statistics of a regression target: ``median_abs`` (over its first entries), ``rms``, ``mean``,
    ``std``, ``max_abs`` (device tensors)."""
    y = y.detach()
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()
    flat = y.reshape(-1)
    std, mean = torch.std_mean(flat, correction=0)
    sample = flat[:MEDIAN_SAMPLE].abs()
    return {
        "median_abs": sample.median(),
        "rms": flat.square().mean().sqrt(),
        "mean": mean,
        "std": std,
        "max_abs": flat.abs().max(),
    }


# -- weights -----------------------------------------------------------------------------------------------
@torch.no_grad()
def init_stats(weights: Sequence[Tensor]) -> tuple[Tensor, list[int], list[int]]:
    """The std of each weight (one float32 tensor, one kernel each) and its fan-in and fan-out, as
    ``torch.nn.init`` computes them (the Kaiming/Xavier formulas use these).

    Of sharded weights (DTensor), the std of the full tensors from the shards: one collective, then one host read
    that tells every process whether one of them failed; every process must call it with the same weights."""
    fans = [torch.nn.init._calculate_fan_in_and_fan_out(w) for w in weights]
    if not weights:
        return torch.zeros(0), [], []
    if any(is_dtensor(w) for w in weights):
        stds = _sharded_stds(weights)
    else:
        stds = torch.stack([w.detach().float().std().to(weights[0].device) for w in weights])
    return stds, [int(f[0]) for f in fans], [int(f[1]) for f in fans]


def _sharded_stds(weights: Sequence[Tensor]) -> Tensor:
    """The std of each full weight from the local shards: count, sum and sum of squares (float64) per shard,
    summed across the mesh in one collective per route, as ``Tensor.std`` (Bessel's correction)."""
    routes = ShardRoutes(weights)
    device = local_tensor(weights[0]).device
    # one row per weight, and a last one whose entries count the processes that failed to measure: every process
    # reaches the collective whatever happened to it, and all of them raise after it alike
    sums = torch.zeros(routes.num, len(weights) + 1, 3, dtype=torch.float64, device=device)
    error: Exception | None = None
    try:
        for i, w in enumerate(weights):
            x = local_tensor(w).to(device=device, dtype=torch.float64)
            sums[routes.of[i], i] = torch.stack([x.new_tensor(float(x.numel())), x.sum(), x.square().sum()])
    except Exception as err:  # noqa: BLE001 - raised below, once every process has reached the collective
        error = err
        sums.zero_()
        sums[:, -1, 0] = 1.0
    sums = all_reduce_partials(sums, routes, [False] * (sums.numel() // routes.num)).sum(0)
    if bool(sums[-1].sum() > 0):  # setup time, not the training loop: one host read
        raise error or RuntimeError("measuring the initial weights failed on another process")
    n, s, ss = sums[:-1].unbind(-1)
    var = (ss - s * s / n.clamp_min(1.0)) / (n - 1.0).clamp_min(1.0)
    return var.clamp_min(0.0).sqrt().float()


@torch.no_grad()
def relative_drift(
    params: Sequence[Tensor],
    reference: Sequence[Tensor],
    layer_index: Tensor,
    num_layers: int,
    reference_norms: Tensor,
    plan: NormPlan | None = None,
    scratch: list[Tensor] | None = None,
    reference_pack: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-layer ``||w - w_ref||`` and ``||w_ref||`` (the drift from a reference copy, and its scale).

    ``reference_norms`` are the per-tensor norms of ``reference`` (measured once: the reference is fixed);
    ``scratch`` is a buffer the differences may be written into (see :func:`drift_norms`).
    """
    drift = group_norms(drift_norms(params, reference, plan, scratch, reference_pack), layer_index, num_layers)
    return drift, group_norms(reference_norms, layer_index, num_layers)


@torch.no_grad()
def drift_norms(
    params: Sequence[Tensor],
    reference: Sequence[Tensor],
    plan: NormPlan | None = None,
    scratch: list[Tensor] | None = None,
    reference_pack: list[Tensor] | None = None,
) -> Tensor:
    """Per-tensor ``||w - w_ref||``. With a ``plan`` of ``params``, the differences are taken in its layout (small
    tensors stacked, :meth:`NormPlan.pack`): into ``scratch`` when it is a pack of that layout, from
    ``reference_pack`` (the reference packed once) when given. Without one, into ``scratch`` when it has the
    shapes of ``params``."""
    if plan is not None and len(params) == plan.count and len(reference) == plan.count:
        ref = reference_pack if reference_pack is not None and plan.fits(reference_pack) else None
        return plan.packed_norms(
            plan.diff(params, ref if ref is not None else plan.pack(reference, share_big=True), scratch)
        )
    diffs = copy_tensors(params, into=scratch)
    torch._foreach_sub_(diffs, [r.detach() for r in reference])
    return plan_norms(plan, diffs)


# -- sharded tensors (DTensor: FSDP2, tensor parallelism) ---------------------------------------------------
# The norm of a sharded tensor is reduced from its shards, as torchtitan does and as
# ``torch.nn.utils.get_total_norm`` does on DTensors (its result has a Partial placement that ``full_tensor()``
# reduces): sums of ``|x| ** p`` (max for inf) of the local shards add up across the mesh dims the tensor is split
# over; the root is taken after. No full tensor is ever gathered.


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (importing nothing: none exists unless that module is
    loaded)."""
    cls = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return cls is not None and isinstance(t, cls)


def local_tensor(t: Tensor) -> Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (a plain tensor, no copy), else ``t``."""
    return cast(Tensor, t.to_local()).detach() if is_dtensor(t) else t.detach()  # type: ignore[attr-defined]


def _split(placement: Any) -> bool | None:
    """True: the mesh dim splits the tensor into disjoint pieces; False: every process there holds the same
    piece; None: anything else (a Partial holds summands, not pieces: the norm of a sum is not a sum of norms)."""
    if placement.is_replicate():
        return False
    if placement.is_shard() or type(placement).__name__ == "_StridedShard":  # FSDP2 over tensor parallelism
        return True
    return None


class ShardRoutes:
    """The process groups a (possibly sharded) tensor's sums of powers are summed over, one *route* per distinct
    (device mesh, mesh dims the tensor is split over). Route 0 is "this process alone": plain tensors and
    replicated DTensors, which every process holds whole.

    Raises:
        ValueError: a DTensor with a placement whose norm cannot be reduced from its shards (Partial), or on a
            mesh this process is not part of.
    """

    def __init__(self, tensors: Sequence[Tensor]) -> None:
        keys: dict[Any, int] = {None: 0}
        self.groups: list[tuple[Any, ...]] = [()]
        self.of: list[int] = []
        for t in tensors:
            key = self.key(t)
            if key not in keys:
                mesh, dims = key
                keys[key] = len(self.groups)
                self.groups.append(tuple(mesh.get_group(d) for d in dims))
            self.of.append(keys[key])

    @staticmethod
    def key(t: Tensor) -> Any:
        """``(mesh, split mesh dims)`` of a DTensor split over some mesh dim, else None (held whole)."""
        if not is_dtensor(t):
            return None
        mesh, placements = t.device_mesh, t.placements  # type: ignore[attr-defined]
        split = [_split(p) for p in placements]
        if None in split:
            raise ValueError(f"a DTensor with placements {tuple(placements)} (only Shard and Replicate are supported)")
        if mesh.get_coordinate() is None:
            raise ValueError("a DTensor on a device mesh this process is not part of")
        dims = tuple(d for d, s in enumerate(split) if s)
        return (mesh, dims) if dims else None

    @property
    def num(self) -> int:
        return len(self.groups)


def partial_powers(
    norms: Tensor,
    route_index: Tensor,
    num_routes: int,
    norm_type: float = 2.0,
    group_index: Tensor | None = None,
    num_groups: int = 1,
) -> Tensor:
    """Per-tensor norms of local shards -> ``(num_routes, num_groups)`` sums of ``norm ** p`` (max for ``inf``),
    one row per route: what :func:`all_reduce_partials` reduces and :func:`finish_powers` turns into norms."""
    route_index = route_index.to(norms.device)
    index = route_index * num_groups
    if group_index is not None:
        index = index + group_index.to(norms.device)
    return group_powers(norms, index, num_routes * num_groups, norm_type).reshape(num_routes, num_groups)


def finish_powers(partials: Tensor, norm_type: float = 2.0) -> Tensor:
    """Reduced ``(num_routes, ...)`` sums of powers -> norms: summed (max for ``inf``) over routes, then the root."""
    norm_type = float(norm_type)
    if math.isinf(norm_type):
        return partials.amax(0) if partials.shape[0] else partials.new_zeros(partials.shape[1:])
    return partials.sum(0).pow(1.0 / norm_type)


def all_reduce_partials(partials: Tensor, routes: ShardRoutes, maxes: Sequence[bool]) -> Tensor:
    """Row ``r`` of ``partials`` (``(num_routes, n)``, any trailing shape flattened) reduced over route ``r``'s
    process groups: summed, or max where ``maxes[j]`` (inf norms). One collective per group of each route with any:
    ``all_reduce`` when every entry reduces alike, else one ``all_gather`` reduced here. Every process must call it
    with the same shape and ``maxes`` (they follow from the tensors' layout, never from their values)."""
    import torch.distributed as dist

    out = partials.clone()
    flat = out.reshape(routes.num, -1)
    any_max, all_max = any(maxes), all(maxes) and len(maxes) > 0
    for r, groups in enumerate(routes.groups):
        for group in groups:
            row = flat[r].contiguous()
            if not any_max or all_max:
                dist.all_reduce(row, op=dist.ReduceOp.MAX if all_max else dist.ReduceOp.SUM, group=group)
            else:
                parts = [torch.empty_like(row) for _ in range(dist.get_world_size(group))]
                dist.all_gather(parts, row, group=group)
                stacked = torch.stack(parts)
                mask = torch.tensor(list(maxes), dtype=torch.bool, device=row.device)
                row = torch.where(mask, stacked.amax(0), stacked.sum(0))
            flat[r] = row
    return out
