"""Training-code bugs: the decisions and the messages (host values and Python objects; no hooks, no Lightning).

:class:`~lightning_normcheck.TrainingBugDetector` measures; this module decides and words the findings:

- ``missing_zero_grad``: gradients already non-zero at every backward between two optimizer steps.
- ``double_optimizer_step``: ``optimizer.step()`` with no backward pass since the previous step.
- ``loss_sum_reduction``: the two-halves probe ``loss(full) / (loss(half A) + loss(half B))`` is 1.0
  (a sum over the batch), not 0.5 (a mean).
- ``accumulation_not_averaged``: k > 1 micro-batches per step in manual optimization and the losses
  given to ``manual_backward`` are not divided by k (read from the loss's autograd graph).
- ``hidden_state_not_detached``: a recurrent state that still carries an earlier batch's graph.

Example:
    >>> import torch
    >>> x = torch.ones(3, requires_grad=True)
    >>> loss = (x ** 2).sum()
    >>> loss_scale_factor((loss / 4).grad_fn), loss_scale_factor(loss.grad_fn)
    (0.25, 1.0)
    >>> a, b, full, m = split_batch((torch.arange(5), [torch.zeros(5, 2)]))
    >>> a[0].tolist(), b[0].tolist(), full[1][0].shape[0], m
    ([0, 1], [2, 3], 4, 2)
    >>> reduction_verdict(2.0, 2.2, 4.2), reduction_verdict(2.0, 2.2, 2.1), reduction_verdict(1.0, -1.0, 0.5)
    ('sum', 'mean', None)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_normcheck.findings import FindingLog

#: Two-halves ratio ``loss(full) / (loss(A) + loss(B))``: 1.0 for a sum, 0.5 for a mean (0.495 measured
#: with BatchNorm, see LIGHTNING_NOTES.md); bands of +-0.15 and +-0.1 leave room for Dropout/BatchNorm noise.
SUM_RATIO_BAND = (0.85, 1.15)
MEAN_RATIO_BAND = (0.4, 0.6)
#: Probes that must agree before a verdict (one batch can be odd; two agreeing ones are not by chance).
PROBES_TO_AGREE = 2
#: Smallest half batch the probe uses: BatchNorm needs more than one sample per channel in train mode.
MIN_HALF = 2
#: A scale factor within 5% of 1.0 means "not divided" (1/k is at most 0.5 for k >= 2).
UNSCALED_TOL = 0.05
#: Windows in a row with the same k > 1 before accumulation is called accumulation (not a skipped step).
ACCUM_WINDOWS = 2
#: Backward passes of the same loss inside one training_step that count as micro-batches: 2 look-alike
#: losses are common and legitimate (DCGAN's real and fake discriminator losses), 3 or more are chunks.
MIN_CHUNKS = 3
#: Extra steps seen before reporting a double step (one could be a deliberate one-off, two are a pattern).
DOUBLE_STEP_MIN = 2

_RAISE_SECOND_TIME = "backward through the graph a second time"
_RAISE_INPLACE = "modified by an inplace operation"

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


def _leading_size(batch: Any) -> int | None:
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
        n = _leading_size(item)
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
    n = _leading_size(batch)
    if n is None or n // 2 < min_half:
        return None
    m = n // 2
    try:
        return _slice(batch, 0, m, n), _slice(batch, m, 2 * m, n), _slice(batch, 0, 2 * m, n), m
    except _Unsplittable:
        return None


def reduction_verdict(loss_a: float, loss_b: float, loss_full: float) -> str | None:
    """``"sum"``, ``"mean"`` or ``None`` (inconclusive) from one two-halves probe.

    For a per-sample loss reduced by sum, ``loss(A) + loss(B) == loss(A u B)``; reduced by mean, the
    halves add up to twice the full loss. The ratio ``full / (A + B)`` is 1.0 or 0.5.
    """
    vals = (loss_a, loss_b, loss_full)
    if not all(math.isfinite(v) for v in vals):
        return None
    halves = loss_a + loss_b
    # losses of mixed sign or near zero make the ratio meaningless
    if abs(halves) < 1e-12 or (loss_a > 0) != (loss_b > 0) or (loss_full > 0) != (halves > 0):
        return None
    ratio = loss_full / halves
    if SUM_RATIO_BAND[0] <= ratio <= SUM_RATIO_BAND[1]:
        return "sum"
    if MEAN_RATIO_BAND[0] <= ratio <= MEAN_RATIO_BAND[1]:
        return "mean"
    return None


def diagnose_reduction(findings: FindingLog, probes: list[tuple[int, float, float, float, int]]) -> str | None:
    """Decide sum vs mean from the probes so far; report ``loss_sum_reduction`` on a sum.

    Args:
        findings: the log.
        probes: ``(step, loss_a, loss_b, loss_full, half_size)`` per probed batch, in order.

    Returns:
        ``"sum"`` or ``"mean"`` once :data:`PROBES_TO_AGREE` conclusive probes agree (no more probes
        needed), else ``None``.
    """
    verdicts = [(p, reduction_verdict(p[1], p[2], p[3])) for p in probes]
    sums = [p for p, v in verdicts if v == "sum"]
    means = [p for p, v in verdicts if v == "mean"]
    if len(means) >= PROBES_TO_AGREE:
        return "mean"
    if len(sums) < PROBES_TO_AGREE or means:
        return None  # not enough agreeing probes yet (or they disagree): no verdict, no finding
    first = sums[0]
    m = first[4]
    ratios = ", ".join(f"{p[3] / (p[1] + p[2]):.3f}" for p in sums)
    findings.report(
        "loss_sum_reduction",
        "warning",
        first[0],
        None,
        f"the loss is summed over the batch, not averaged. Two-halves probe (re-running training_step without"
        f" gradients on {2 * m} samples and on each half of {m}): loss(half A)={first[1]:.4g},"
        f" loss(half B)={first[2]:.4g}, loss(both)={first[3]:.4g}, so loss(both)/(A+B) = {ratios} on"
        f" {len(sums)} probed batch(es); a loss averaged over the batch gives 0.5, a sum gives 1.0. With a sum"
        f" the gradient grows with the batch size ({2 * m}x a mean's here), so the learning rate that works"
        " depends on the batch size and large batches explode. Likely causes: reduction='sum' in"
        " F.mse_loss/F.cross_entropy/nn.*Loss, or a hand-written `.sum()` over samples. What to try:"
        " reduction='mean', or divide the sum by the batch size (summing over features and averaging over"
        " samples is fine); then re-tune the learning rate.",
        value=sums[0][3] / (sums[0][1] + sums[0][2]),
        ratios=[p[3] / (p[1] + p[2]) for p in sums],
    )
    return "sum"


def report_missing_zero_grad(
    findings: FindingLog,
    step: int,
    optimizer: str,
    stale_norm: float,
    used_norm: float,
    previous_step: int,
    history: list[tuple[int, float]],
) -> None:
    """Report gradients that were never cleared between two optimizer steps.

    Args:
        findings: the log.
        step: the step whose window showed it (first seen).
        optimizer: a label for the optimizer.
        stale_norm: the smallest gradient norm (of the watched parameters) seen at the start of any
            backward pass between the two steps (0 after a ``zero_grad``).
        used_norm: the same parameters' gradient norm used by the previous step.
        previous_step: the previous step.
        history: ``(step, norm)`` of the gradients used by past steps, oldest first.
    """
    growth = ""
    if len(history) >= 2 and history[0][1] > 0:
        (s0, n0), (s1, n1) = history[0], history[-1]
        growth = f" The gradient norm those steps used went from {n0:.4g} (step {s0}) to {n1:.4g} (step {s1})."
    findings.report(
        "missing_zero_grad",
        "error",
        step,
        None,
        f"gradients are not cleared between optimizer steps ({optimizer}). At every backward pass between"
        f" step {previous_step} and step {step}, the watched parameters' gradients were already non-zero"
        f" before backward (the smallest left-over gradient of one watched parameter had norm {stale_norm:.4g}; step"
        f" {previous_step} had used a gradient of norm {used_norm:.4g} on them), so each new gradient is added to all the previous ones: the update is a running"
        f" sum over the whole run, growing with the step count.{growth} Summing inside one accumulation window"
        " is fine; carrying over across optimizer steps is this bug. Likely causes: an `optimizer_zero_grad`"
        " override that does nothing; a manual-optimization loop without `opt.zero_grad()`. What to try: call"
        " `opt.zero_grad()` once per optimizer step (before the first backward of each window), or remove"
        " the `optimizer_zero_grad` override.",
        value=stale_norm,
    )


def report_double_step(
    findings: FindingLog,
    step: int,
    optimizer: str,
    extra_steps: int,
    total_steps: int,
    batches: int,
    raw: bool,
    exception: str | None = None,
) -> None:
    """Report optimizer steps that had no backward pass since the previous step.

    Args:
        findings: the log.
        step: the step of the first extra one.
        optimizer: a label for the optimizer.
        extra_steps: steps that followed another step with no backward in between.
        total_steps: ``step()`` calls seen.
        batches: training batches seen.
        raw: one step of an extra pair bypassed Lightning (no ``on_before_optimizer_step`` before it).
        exception: the autograd error training raised after an extra step, if any.
    """
    where = (
        "No Lightning hook fired before one of them: another callback or user code called the torch"
        " optimizer directly (e.g. `trainer.optimizers[0].step()`), which bypasses Lightning."
        if raw
        else "Lightning saw each step: `opt.step()` runs more than once per backward pass (twice in"
        " `training_step`, in an `optimizer_step` override, or `self.optimizers().step()` from a hook)."
    )
    note = (
        f" Training then raised '{exception}': an extra step between a forward pass and its backward"
        " changes the weights in place under the graph that backward still needs."
        if exception
        else ""
    )
    old = findings.get("double_optimizer_step", None)
    if old is not None and note:
        if "exception" not in old.extra:
            old.extra["exception"] = exception
            old.message += note
        return
    findings.report(
        "double_optimizer_step",
        "error",
        step,
        None,
        f"`optimizer.step()` ran {total_steps} times over {batches} batches ({optimizer}), and {extra_steps} of"
        f" those steps came with no backward pass since the previous step (first at step {step}): the same"
        " gradients are applied twice, which doubles the effective learning rate (and advances Adam's step"
        f" count and LR schedules twice as fast). {where} What to try: call `step()` exactly once per"
        f" backward pass (or accumulation window), remove the extra call.{note}",
        value=float(extra_steps),
        **({"exception": exception} if exception else {}),
    )


def report_accumulation(
    findings: FindingLog, step: int, optimizer: str, k: int, factor: float, steps: list[int], per_batch: bool = True
) -> None:
    """Report manual gradient accumulation over ``k`` micro-batches without dividing the loss by ``k``.

    Args:
        findings: the log.
        step: the first step where it was seen.
        optimizer: a label for the optimizer.
        k: micro-batches (backward passes in separate batches) per optimizer step.
        factor: the constant factor found on the losses given to ``manual_backward``.
        steps: the optimizer steps of the windows checked.
        per_batch: one micro-batch per training batch (else several inside one ``training_step``).
    """
    findings.report(
        "accumulation_not_averaged",
        "warning",
        step,
        None,
        f"manual gradient accumulation is not averaged ({optimizer}): each optimizer step (steps"
        f" {', '.join(map(str, steps))}) sums the gradients of k={k} micro-batches (k `manual_backward` calls"
        f" between steps, {'one per batch' if per_batch else 'the same loss on parts of one batch'}), but the losses given to `manual_backward` carry a factor of {factor:.3g}, not 1/{k} ="
        f" {1 / k:.3g}. The accumulated gradient is {k}x the large-batch gradient, so the effective learning"
        f" rate grows with k. What to try: `self.manual_backward(loss / {k})` (or divide the loss by the number"
        " of accumulated micro-batches), or lower the learning rate by the same factor.",
        value=float(k),
    )


def report_stale_hidden(
    findings: FindingLog, step: int, module: str, batch: int, from_batch: int | None, grad_fn: str, shape: str
) -> None:
    """Report a recurrent state that carries an earlier batch's autograd graph (before backward fails).

    Args:
        findings: the log.
        step: the global step.
        module: the RNN module name.
        batch: the batch (counted from 0 in this fit) whose forward received the state.
        from_batch: the batch where that state's graph was built, if known.
        grad_fn: the name of the state's ``grad_fn``.
        shape: the state's shape, as text.
    """
    origin = f"built during batch {from_batch}" if from_batch is not None else "built before this batch began"
    findings.report(
        "hidden_state_not_detached",
        "error",
        step,
        module,
        f"the hidden state passed to `{module}` at batch {batch} (shape {shape}, grad_fn {grad_fn}) still"
        f" carries the autograd graph {origin}: the state is carried across batches without `.detach()`."
        " Backward then runs through the previous batch's graph too, which raises 'Trying to backward through"
        " the graph a second time' (or 'modified by an inplace operation' with retain_graph=True after the"
        " optimizer changed the weights), or silently grows memory and time with every batch. What to try:"
        " detach the state at each batch boundary (`self.hidden = tuple(h.detach() for h in hidden)`, or"
        " `h.detach()` for a GRU/RNN), i.e. truncated backpropagation through time.",
        batch=batch,
    )


def explain_graph_exception(
    findings: FindingLog,
    exception: BaseException,
    step: int,
    batches: int,
    rnn_modules: list[str],
    stale_modules: list[str],
) -> None:
    """Explain "backward through the graph a second time" / "modified by an inplace operation".

    Attributed to a state carried across batches when a stale state was seen, or when training raised
    after its first batch (a genuine in-place op in the model raises at the first backward already; the
    caller rules out an extra optimizer step between forward and backward first).

    Args:
        findings: the log.
        exception: what training raised.
        step: the global step.
        batches: batches started in this fit (the exception is in the last one).
        rnn_modules: names of the model's recurrent modules.
        stale_modules: modules that received a stale state (already reported).
    """
    text = str(exception)
    second = _RAISE_SECOND_TIME in text
    inplace = _RAISE_INPLACE in text
    if not (second or inplace):
        return
    first_line = text.strip().splitlines()[0][:200]
    note = (
        f" Training then raised {type(exception).__name__}: '{first_line}' at step {step}: this state carried"
        " across batches is the cause."
    )
    if stale_modules:
        for name in stale_modules:
            f = findings.get("hidden_state_not_detached", name)
            if f is not None and "exception" not in f.extra:
                f.extra["exception"] = first_line
                f.message += note
        return
    if batches < 2:
        return  # in the first batch nothing can come from an earlier one (a plain in-place bug raises there)
    layer = rnn_modules[0] if rnn_modules else None
    what = (
        f"the recurrent state of `{layer}`"
        if layer
        else "a tensor kept from an earlier batch (a recurrent state, a cache)"
    )
    findings.report(
        "hidden_state_not_detached",
        "error",
        step,
        layer,
        f"training raised {type(exception).__name__}: '{first_line}' at step {step} (batch {batches - 1}). The"
        f" real cause is most likely {what} carried into this batch without `.detach()`: backward then"
        " tries to go through the previous batch's graph, which was already freed (or whose weights the"
        " optimizer has since changed in place). What to try: detach the state at each batch boundary"
        " (`self.hidden = tuple(h.detach() for h in hidden)`), i.e. truncated backpropagation through time;"
        " do not use retain_graph=True to silence the error.",
        exception=first_line,
    )


__all__ = [
    "diagnose_reduction",
    "explain_graph_exception",
    "graph_signature",
    "oldest_node",
    "loss_scale_factor",
    "reduction_verdict",
    "report_accumulation",
    "report_double_step",
    "report_missing_zero_grad",
    "report_stale_hidden",
    "split_batch",
]

_ = torch


from lightning_normcheck.diagnosis.engine import Rules  # noqa: E402


class BugRules(Rules):
    name = "bugs"
