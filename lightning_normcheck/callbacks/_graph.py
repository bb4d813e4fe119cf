"""Autograd-graph and batch helpers of the training-bug detector: they read torch tensors and autograd nodes,
so they live with the callbacks (the rules in :mod:`lightning_normcheck.diagnosis.bugs` see host numbers only).

- :func:`loss_scale_factor`: the constant factor on top of a loss's graph (``loss / k`` gives ``1/k``).
- :func:`graph_signature`: the node types at the top of a loss's graph (the same loss code gives the same).
- :func:`oldest_node`: a node of a graph built before a given autograd sequence number (an earlier batch).
- :func:`split_batch`: two equal halves of a batch and their union, for the two-halves loss probe.

Example:
    >>> import torch
    >>> x = torch.ones(3, requires_grad=True)
    >>> loss = (x ** 2).sum()
    >>> loss_scale_factor((loss / 4).grad_fn), loss_scale_factor(loss.grad_fn)
    (0.25, 1.0)
    >>> a, b, full, m = split_batch((torch.arange(5), [torch.zeros(5, 2)]))
    >>> a[0].tolist(), b[0].tolist(), full[1][0].shape[0], m
    ([0, 1], [2, 3], 4, 2)
    >>> graph_signature(loss.grad_fn) == graph_signature((x ** 2).sum().grad_fn)
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

#: Smallest half batch the probe uses: BatchNorm needs more than one sample per channel in train mode.
MIN_HALF = 2

# autograd nodes that are linear in their single input: a constant factor on the input passes through
_LINEAR_UNARY = (
    "Mean",
    "Sum",
    "View",
    "Reshape",
    "Unsafe",
    "ToCopy",
    "Clone",
    "Squeeze",
    "Unsqueeze",
    "Expand",
    "Select",
    "Slice",
    "Alias",
    "Permute",
    "Transpose",
    "TBackward",
    "Neg",
    "Copy",
)


def _scalar(t: Any) -> float | None:
    """A Python float for a one-element CPU tensor (no device sync), else ``None``."""
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return float(t)
    if isinstance(t, Tensor) and t.numel() == 1 and t.device.type == "cpu" and not t.requires_grad:
        return float(t.reshape(()).item())  # a CPU scalar saved by autograd: no device sync
    return None


def loss_scale_factor(grad_fn: Any, max_nodes: int = 64) -> float | None:
    """The constant factor applied at the top of a loss's autograd graph (``loss / k`` gives ``1/k``).

    Walks down from ``grad_fn`` through multiplications and divisions by constants (which multiply the
    factor), linear unary ops (mean, sum, views, dtype casts: the factor passes through) and additions
    (the largest factor of the terms). It stops at any other op (factor 1.0: nothing scaled the loss on
    top of it). Pure Python on the graph's nodes: no kernel, no sync.

    Args:
        grad_fn: ``loss.grad_fn``.
        max_nodes: give up (``None``) past this many nodes.

    Returns:
        The factor, or ``None`` when it cannot be known (a tensor divisor on a device, a divisor that
        requires grad, too large a graph).
    """
    budget = [max_nodes]

    def walk(node: Any) -> float | None:
        if node is None:
            return 1.0
        budget[0] -= 1
        if budget[0] < 0:
            return None
        name = type(node).__name__
        nexts = [n for n, _ in getattr(node, "next_functions", ())]
        live = [n for n in nexts if n is not None]
        if name.startswith(("DivBackward", "MulBackward")):
            if len(live) != 1 or (name.startswith("Div") and nexts and nexts[0] is None):
                return None  # the divisor itself requires grad: data-dependent, not a constant
            other = _scalar(getattr(node, "_saved_other", None))
            if other is None or other == 0.0:
                return None
            if name.startswith("MulBackward") and nexts and nexts[0] is None:
                # constant * tensor: the saved "other" is the tensor, the constant is "self"
                other = _scalar(getattr(node, "_saved_self", None))
                if other is None:
                    return None
            inner = walk(live[0])
            if inner is None:
                return None
            return inner * (1.0 / other if name.startswith("Div") else other)
        if name.startswith(("AddBackward", "SubBackward")):
            parts = [walk(n) for n in live]
            if not parts or any(p is None for p in parts):
                return None
            return max(abs(p) for p in parts if p is not None)
        if len(live) == 1 and any(name.startswith(k) or k in name for k in _LINEAR_UNARY):
            inner = walk(live[0])
            return None if inner is None else abs(inner)
        return 1.0

    factor = walk(grad_fn)
    return None if factor is None else abs(factor)


def graph_signature(grad_fn: Any, max_nodes: int = 24) -> tuple[str, ...]:
    """The node types of the first ``max_nodes`` nodes of a loss's graph (depth first): the same loss code
    run on two micro-batches gives the same signature, two different losses usually do not."""
    out: list[str] = []
    stack = [grad_fn]
    seen: set[int] = set()
    while stack and len(out) < max_nodes:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(type(node).__name__)
        stack.extend(n for n, _ in reversed(getattr(node, "next_functions", ())))
    return tuple(out)


def oldest_node(grad_fn: Any, marker: int, max_nodes: int = 32) -> Any:
    """A node of the graph above ``grad_fn`` built before ``marker`` (an autograd sequence number), or None.

    Autograd numbers the nodes it creates in increasing order (per thread), so a node numbered below the
    number taken at the start of a batch comes from an earlier batch. Parameters' ``AccumulateGrad`` nodes
    carry the largest number and never match. Looks at the first ``max_nodes`` nodes only (pure Python).
    """
    stack = [grad_fn]
    seen: set[int] = set()
    while stack and len(seen) < max_nodes:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node._sequence_nr() < marker:
            return node
        stack.extend(n for n, _ in getattr(node, "next_functions", ()))
    return None


def leading_size(batch: Any) -> int | None:
    """The leading (batch) size of the first tensor with at least one dimension."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() >= 1 else None
    if isinstance(batch, Mapping):
        items: Sequence[Any] = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        items = batch
    else:
        return None
    for item in items:
        n = leading_size(item)
        if n is not None:
            return n
    return None


def _has_tensor(batch: Any) -> bool:
    if isinstance(batch, Tensor):
        return True
    if isinstance(batch, Mapping):
        return any(_has_tensor(v) for v in batch.values())
    if isinstance(batch, (list, tuple)):
        return any(_has_tensor(v) for v in batch)
    return False


class _Unsplittable(Exception):
    pass


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(batch, Tensor):
        if batch.dim() == 0:
            return batch
        if batch.shape[0] != n:
            raise _Unsplittable
        return batch[start:stop].clone()  # a copy: a training_step that edits its batch in place edits ours
    if isinstance(batch, Mapping):
        out = {k: _slice(v, start, stop, n) for k, v in batch.items()}
        try:
            return type(batch)(out)  # type: ignore[call-arg]  # OrderedDict and other dict types built from a dict
        except Exception:  # noqa: BLE001 - e.g. defaultdict: a plain dict will do
            return out
    if isinstance(batch, (list, tuple)):
        if not _has_tensor(batch):
            # a per-sample list (ids, strings) is sliced with the tensors; anything else is kept
            return batch[start:stop] if len(batch) == n else batch
        items = [_slice(v, start, stop, n) for v in batch]
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*items)  # namedtuple
        return type(batch)(items)
    if isinstance(batch, (str, bytes, int, float, bool)) or batch is None:
        return batch
    raise _Unsplittable  # an object we do not know how to split: skip the probe


def split_batch(batch: Any, min_half: int = MIN_HALF) -> tuple[Any, Any, Any, int] | None:
    """Two equal halves of a batch and their union (an odd last sample is left out).

    Tensors (any depth of tuples, lists, namedtuples and dicts) are sliced along their first dimension;
    per-sample lists without tensors are sliced too; scalars are kept.

    Args:
        batch: what the dataloader yielded.
        min_half: smallest half size to return.

    Returns:
        ``(half_a, half_b, both, m)`` with ``m`` samples per half, or ``None`` when the batch cannot be
        split (no tensors, leading sizes that differ, unknown objects, too small).
    """
    n = leading_size(batch)
    if n is None or n // 2 < min_half:
        return None
    m = n // 2
    try:
        return _slice(batch, 0, m, n), _slice(batch, m, 2 * m, n), _slice(batch, 0, 2 * m, n), m
    except _Unsplittable:
        return None


__all__ = ["MIN_HALF", "graph_signature", "leading_size", "loss_scale_factor", "oldest_node", "split_batch"]
