"""Training-loop bugs: the verdicts and the messages, from the records of the training-bug detector.

:class:`~lightning_normcheck.TrainingBugDetector` measures (hooks on the optimizer, a few parameters'
gradients, RNN inputs, a two-halves loss probe) and hands over records; :class:`BugRules` decides:

- ``missing_zero_grad``: a :class:`~.records.ZeroGradWindow` whose smallest left-over gradient is not 0:
  the gradients were non-zero at every backward between two optimizer steps.
- ``double_optimizer_step``: :class:`~.records.OptimizerSteps` with ``double_step_min`` steps that came
  with no backward pass since the previous step (one is enough when training then raised).
- ``loss_sum_reduction``: ``probes_to_agree`` :class:`~.records.ReductionProbe` whose ratio
  ``loss(full) / (loss(half A) + loss(half B))`` is 1.0 (a sum over the batch), not 0.5 (a mean).
- ``accumulation_not_averaged``: ``accum_windows`` :class:`~.records.AccumulationWindow` in a row with the
  same k > 1 micro-batches and a loss factor within ``unscaled_tol`` of 1 (not divided by k).
- ``hidden_state_not_detached``: a :class:`~.records.StaleState`, or a :class:`~.records.TrainingError`
  "backward through the graph a second time" / "modified by an inplace operation" after the first batch.

Example:
    >>> from lightning_normcheck.diagnosis.engine import Diagnosis
    >>> d = Diagnosis()
    >>> p = [ReductionProbe(step=s, loss_a=2.0, loss_b=2.2, loss_full=4.2, half=4) for s in (0, 1)]
    >>> d.observe(1, p)
    >>> f = d.log.get("loss_sum_reduction")
    >>> f.step, f.since, f.value
    (1, 0, 1.0)
    >>> reduction_verdict(p[0], d.thresholds.bugs), reduction_verdict(ReductionProbe(0, 2, 2.2, 2.1, 4),
    ...                                                                   d.thresholds.bugs)
    ('sum', 'mean')
"""

from __future__ import annotations

import math
from typing import Any, TypeVar

from lightning_normcheck.diagnosis.engine import Flush, Rules
from lightning_normcheck.diagnosis.records import (
    AccumulationWindow,
    OptimizerSteps,
    ReductionProbe,
    StaleState,
    TrainingError,
    ZeroGradWindow,
)
from lightning_normcheck.diagnosis.registry import REGISTRY, compose
from lightning_normcheck.diagnosis.thresholds import BugThresholds

T = TypeVar("T")

#: The autograd errors a state carried across batches (or an extra step under a graph) raises.
RAISE_SECOND_TIME = "backward through the graph a second time"
RAISE_INPLACE = "modified by an inplace operation"

#: Past gradient norms kept per optimizer for the zero-grad message (memory bound, no verdict depends on it).
_USED_KEPT = 51
#: Conclusive probes kept (memory bound: the monitor probes a few batches per fit).
_PROBES_KEPT = 64
#: Characters of an exception's first line quoted in a message.
_QUOTE = 200


def _last(items: list[T], n: int) -> list[T]:
    """The last ``n`` items (none for ``n <= 0``; ``items[-0:]`` would be all of them)."""
    return items[max(0, len(items) - n) :] if n > 0 else []


def first_line(text: str, type_name: str = "") -> str:
    """The first line of an exception's text (at most 200 characters), or its type name when it is empty.

    >>> first_line("boom\\nmore"), first_line("  ", "RuntimeError")
    ('boom', 'RuntimeError')
    """
    stripped = text.strip()
    return stripped.splitlines()[0][:_QUOTE] if stripped else type_name


def is_graph_error(text: str) -> bool:
    """Whether an exception's text is one of the two autograd errors a stale graph raises."""
    return RAISE_SECOND_TIME in text or RAISE_INPLACE in text


# -- loss reduction ------------------------------------------------------------------------------------------
def probe_ratio(probe: ReductionProbe) -> float:
    """``loss(full) / (loss(A) + loss(B))``: 1.0 for a sum over samples, 0.5 for a mean."""
    return probe.loss_full / (probe.loss_a + probe.loss_b)


def reduction_verdict(probe: ReductionProbe, th: BugThresholds) -> str | None:
    """``"sum"``, ``"mean"`` or ``None`` (inconclusive) from one two-halves probe.

    For a per-sample loss reduced by sum, ``loss(A) + loss(B) == loss(A u B)``; reduced by mean, the halves
    add up to twice the full loss.
    """
    a, b, full = probe.loss_a, probe.loss_b, probe.loss_full
    if not all(math.isfinite(v) for v in (a, b, full)):
        return None
    halves = a + b
    # losses of mixed sign or near zero make the ratio meaningless
    if abs(halves) < th.probe_min_loss or (a > 0) != (b > 0) or (full > 0) != (halves > 0):
        return None
    ratio = full / halves
    if th.sum_ratio_band[0] <= ratio <= th.sum_ratio_band[1]:
        return "sum"
    if th.mean_ratio_band[0] <= ratio <= th.mean_ratio_band[1]:
        return "mean"
    return None


def reduction_message(sums: list[ReductionProbe]) -> str:
    """The ``loss_sum_reduction`` message from the probes that found a sum (the first one's losses)."""
    first, m = sums[0], sums[0].half
    ratios = ", ".join(f"{probe_ratio(p):.3f}" for p in sums)
    seen = (
        "the loss is summed over the batch, not averaged. Two-halves probe (re-running training_step without"
        f" gradients on {2 * m} samples and on each half of {m}): loss(half A)={first.loss_a:.4g},"
        f" loss(half B)={first.loss_b:.4g}, loss(both)={first.loss_full:.4g}, so loss(both)/(A+B) = {ratios} on"
        f" {len(sums)} probed batch(es) (steps {', '.join(str(p.step) for p in sums)}); a loss averaged over the"
        " batch gives 0.5, a sum gives 1.0. With a sum the gradient grows with the batch size"
        f" ({2 * m}x a mean's here), so the learning rate that works depends on the batch size and large"
        " batches explode"
    )
    return compose("loss_sum_reduction", seen)


# -- zero_grad ------------------------------------------------------------------------------------------------
def zero_grad_message(w: ZeroGradWindow, history: list[tuple[int, float]]) -> str:
    """The ``missing_zero_grad`` message; ``history``: ``(step, norm)`` of the gradients past steps used."""
    growth = ""
    if len(history) >= 2 and history[0][1] > 0:
        (s0, n0), (s1, n1) = history[0], history[-1]
        growth = f" The gradient norm those steps used went from {n0:.4g} (step {s0}) to {n1:.4g} (step {s1})."
    seen = (
        f"gradients are not cleared between optimizer steps. At every backward pass between step"
        f" {w.previous_step} and step {w.step}, the watched parameters' gradients were already non-zero before"
        f" backward (the smallest left-over gradient of one watched parameter had norm {w.stale_norm:.4g}; step"
        f" {w.previous_step} had used a gradient of norm {w.used_norm:.4g} on them), so each new gradient is"
        " added to all the previous ones: the update is a running sum over the whole run, growing with the step"
        f" count.{growth} Summing inside one accumulation window is fine; carrying over across optimizer steps is"
        " this bug"
    )
    return compose("missing_zero_grad", seen, where=f"On {w.optimizer}")


# -- double step ------------------------------------------------------------------------------------------------
_RAW_WHERE = (
    "No Lightning hook fired before one of them: another callback or user code called the torch optimizer"
    " directly (e.g. `trainer.optimizers[0].step()`), which bypasses Lightning"
)
_LIGHTNING_WHERE = (
    "Lightning saw each step: `opt.step()` runs more than once per backward pass (twice in `training_step`, in"
    " an `optimizer_step` override, or `self.optimizers().step()` from a hook)"
)


def double_step_note(exception: str) -> str:
    """The sentence that ties an autograd error to an extra step."""
    return (
        f"Training then raised '{exception}': an extra step between a forward pass and its backward changes"
        " the weights in place under the graph that backward still needs."
    )


def double_step_message(s: OptimizerSteps, exception: str | None = None) -> str:
    """The ``double_optimizer_step`` message (a raw step ranks the "another caller" cause first)."""
    seen = (
        f"`optimizer.step()` ran {s.total_steps} times over {s.batches} batches, and {s.extra_steps} of those"
        f" steps came with no backward pass since the previous step (first at step {s.first_extra_step}): the"
        " same gradients are applied twice, which doubles the effective learning rate (and advances Adam's step"
        " count and LR schedules twice as fast)"
    )
    causes = REGISTRY["double_optimizer_step"].causes
    return compose(
        "double_optimizer_step",
        seen,
        where=f"On {s.optimizer}. {_RAW_WHERE if s.raw else _LIGHTNING_WHERE}",
        causes=causes[::-1] if s.raw else causes,
        note=double_step_note(exception) if exception else "",
    )


# -- accumulation -----------------------------------------------------------------------------------------------
def accumulation_message(w: AccumulationWindow, steps: list[int]) -> str:
    """The ``accumulation_not_averaged`` message for ``k = w.micro_batches`` over the windows ``steps``."""
    k, factor = w.micro_batches, w.factor if w.factor is not None else math.nan
    kind = "one per batch" if w.per_batch else "the same loss on parts of one batch"
    seen = (
        f"manual gradient accumulation is not averaged: each optimizer step (steps {', '.join(map(str, steps))})"
        f" sums the gradients of k={k} micro-batches (k `manual_backward` calls between steps, {kind}), but the"
        f" losses given to `manual_backward` carry a factor of {factor:.3g}, not 1/{k} = {1 / k:.3g}. The"
        f" accumulated gradient is {k}x the large-batch gradient, so the effective learning rate grows with k"
    )
    fixes = (
        f"`self.manual_backward(loss / {k})` (or divide the loss by the number of accumulated micro-batches)",
        "or lower the learning rate by the same factor",
    )
    return compose("accumulation_not_averaged", seen, where=f"On {w.optimizer}", fixes=fixes)


# -- hidden state ---------------------------------------------------------------------------------------------
def stale_state_message(s: StaleState) -> str:
    """The ``hidden_state_not_detached`` message of a stale state seen entering an RNN module."""
    origin = f"built during batch {s.from_batch}" if s.from_batch is not None else "built before this batch began"
    seen = (
        f"the hidden state passed to `{s.module}` at batch {s.batch} (shape {s.shape}, grad_fn {s.grad_fn}) still"
        f" carries the autograd graph {origin}: the state is carried across batches without `.detach()`."
        " Backward then runs through the previous batch's graph too, which raises 'Trying to backward through"
        " the graph a second time' (or 'modified by an inplace operation' with retain_graph=True after the"
        " optimizer changed the weights), or silently grows memory and time with every batch"
    )
    return compose("hidden_state_not_detached", seen)


def stale_exception_note(error: TrainingError, line: str) -> str:
    """The sentence that ties an autograd error to a stale state already reported."""
    return (
        f"Training then raised {error.type_name}: '{line}' at step {error.step}: this state carried across"
        " batches is the cause."
    )


def graph_error_message(error: TrainingError, line: str, layer: str | None) -> str:
    """The ``hidden_state_not_detached`` message when only the exception showed it (no stale state seen)."""
    what = (
        f"the recurrent state of `{layer}`"
        if layer
        else "a tensor kept from an earlier batch (a recurrent state, a cache)"
    )
    seen = (
        f"training raised {error.type_name}: '{line}' at step {error.step} (batch {error.batches - 1}). The real"
        f" cause is most likely {what} carried into this batch without `.detach()`: backward then tries to go"
        " through the previous batch's graph, which was already freed (or whose weights the optimizer has since"
        " changed in place)"
    )
    return compose("hidden_state_not_detached", seen, causes=(f"{what} carried across batches without `.detach()`",))


class BugRules(Rules):
    """Verdicts on the training-bug detector's records; memory: per-optimizer gradient norms and
    accumulation windows, the conclusive loss probes, the reduction verdict."""

    name = "bugs"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored = False
        self.start()

    @property
    def th(self) -> BugThresholds:
        return self.ctx.thresholds.bugs

    def start(self) -> None:
        """A fit starts: the monitor's windows start anew, so do the accumulation windows in a row. The rest
        starts anew too, unless a checkpoint was just restored (Lightning restores callback states between
        setup and on_train_start): a resumed fit keeps its reduction verdict and its gradient history."""
        # optimizer label -> (step, k, factor) of the last unscaled accumulation windows with the same k
        self.accum: dict[str, list[tuple[int, int, float]]] = {}
        if self._restored:
            self._restored = False
            return
        # optimizer label -> (step, norm) of the gradients its past steps used, oldest first
        self.used_history: dict[str, list[tuple[int, float]]] = {}
        self.probes: list[ReductionProbe] = []  # conclusive probes, in order
        self.reduction: str | None = None  # "sum" or "mean" once the probes agree

    def observe(self, flush: Flush) -> None:
        for w in flush.of(ZeroGradWindow):
            self._zero_grad(w)
        for s in flush.of(OptimizerSteps):
            self._double_step(s)
        for a in flush.of(AccumulationWindow):
            self._accumulation(a)
        for p in flush.of(ReductionProbe):
            self._probe(p)
        for st in flush.of(StaleState):
            self.log.report(
                "hidden_state_not_detached", "error", st.step, st.module, stale_state_message(st), batch=st.batch
            )

    # rules ---------------------------------------------------------------------------------------------------
    def _zero_grad(self, w: ZeroGradWindow) -> None:
        history = [*_last(self.used_history.get(w.optimizer, []), _USED_KEPT - 1), (w.previous_step, w.used_norm)]
        self.used_history[w.optimizer] = history
        if w.stale_norm > 0.0:  # exactly 0 after any zero_grad (None or zeros): no tolerance needed
            msg = zero_grad_message(w, history)
            self.log.report("missing_zero_grad", "error", w.step, None, msg, value=w.stale_norm, since=w.previous_step)

    def _double_step(self, s: OptimizerSteps) -> None:
        if s.extra_steps >= self.th.double_step_min:
            self._report_double_step(s, s.step)

    def _report_double_step(self, s: OptimizerSteps, step: int, exception: str | None = None) -> None:
        msg = double_step_message(s, exception)
        extra = {"exception": exception} if exception else {}
        since = min(s.first_extra_step, step) if s.first_extra_step >= 0 else step
        self.log.report("double_optimizer_step", "error", step, None, msg, float(s.extra_steps), since, **extra)

    def _accumulation(self, w: AccumulationWindow) -> None:
        if w.micro_batches < 2 or w.factor is None or abs(w.factor - 1.0) > self.th.unscaled_tol:
            self.accum.pop(w.optimizer, None)  # not accumulation, unknown, or divided (by k or otherwise)
            return
        run = self.accum.get(w.optimizer, [])
        if run and run[-1][1] != w.micro_batches:
            run = []
        run = [*_last(run, self.th.accum_windows - 1), (w.step, w.micro_batches, w.factor)]
        self.accum[w.optimizer] = run
        if len(run) >= self.th.accum_windows:
            msg = accumulation_message(w, [s for s, _, _ in run])
            self.log.report(
                "accumulation_not_averaged", "warning", w.step, None, msg, float(w.micro_batches), run[0][0]
            )

    def _probe(self, p: ReductionProbe) -> None:
        verdict = None if self.reduction is not None else reduction_verdict(p, self.th)
        if verdict is None:
            return
        self.probes = [*_last(self.probes, _PROBES_KEPT - 1), p]
        verdicts = [reduction_verdict(q, self.th) for q in self.probes]
        sums = [q for q, v in zip(self.probes, verdicts) if v == "sum"]
        means = len(verdicts) - len(sums)
        if means >= self.th.probes_to_agree:
            self.reduction = "mean"
        elif len(sums) >= self.th.probes_to_agree and not means:  # probes that disagree: no verdict
            self.reduction = "sum"
            ratios = [probe_ratio(q) for q in sums]
            msg = reduction_message(sums)
            self.log.report("loss_sum_reduction", "warning", p.step, None, msg, ratios[0], sums[0].step, ratios=ratios)

    # the exception ---------------------------------------------------------------------------------------------
    def explain(self, error: TrainingError) -> None:
        graph_error = is_graph_error(error.text)
        line = first_line(error.text, error.type_name)
        extra = [s for s in error.extra_steps if s.extra_steps > 0]
        for s in extra:  # training stopped: one extra step is enough to report
            self._explain_double_step(s, error.step, line if graph_error else None)
        if extra and not error.stale_modules and RAISE_INPLACE in error.text:
            return  # the extra step modified the weights under the graph: explained above
        if graph_error:
            self._explain_graph_error(error, line)

    def _explain_double_step(self, s: OptimizerSteps, step: int, exception: str | None) -> None:
        if exception and self.log.get("double_optimizer_step") is not None:
            self.log.annotate(
                "double_optimizer_step", None, "exception", double_step_note(exception), exception=exception
            )
            return
        self._report_double_step(s, step, exception)

    def _explain_graph_error(self, error: TrainingError, line: str) -> None:
        """Attributed to a state carried across batches when a stale state was seen, or when training raised
        after its first batch (a genuine in-place op in the model raises at the first backward already)."""
        if error.stale_modules:
            for name in error.stale_modules:
                note = stale_exception_note(error, line)
                self.log.annotate("hidden_state_not_detached", name, "exception", note, exception=line)
            return
        if error.batches < 2:
            return  # in the first batch nothing can come from an earlier one (a plain in-place bug raises there)
        layer = error.rnn_modules[0] if error.rnn_modules else None
        msg = graph_error_message(error, line, layer)
        self.log.report("hidden_state_not_detached", "error", error.step, layer, msg, exception=line)

    # state ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "used_history": {k: [[s, n] for s, n in v] for k, v in self.used_history.items()},
            "accum": {k: [[s, n, f] for s, n, f in v] for k, v in self.accum.items()},
            "probes": [[p.step, p.loss_a, p.loss_b, p.loss_full, p.half] for p in self.probes],
            "reduction": self.reduction,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = False
        self.start()
        self._restored = True  # the next start() (the resumed fit's) keeps what is restored here
        self.used_history = {k: [(int(s), float(n)) for s, n in v] for k, v in state.get("used_history", {}).items()}
        self.accum = {k: [(int(s), int(n), float(f)) for s, n, f in v] for k, v in state.get("accum", {}).items()}
        self.probes = [
            ReductionProbe(int(s), float(a), float(b), float(f), int(m)) for s, a, b, f, m in state.get("probes", [])
        ]
        reduction = state.get("reduction")
        self.reduction = reduction if reduction in ("sum", "mean") else None


__all__ = [
    "RAISE_INPLACE",
    "RAISE_SECOND_TIME",
    "BugRules",
    "first_line",
    "is_graph_error",
    "probe_ratio",
    "reduction_verdict",
]
