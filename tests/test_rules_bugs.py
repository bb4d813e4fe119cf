"""BugRules on hand-built records: every verdict of the training-bug family, its boundaries, its memory."""

from __future__ import annotations

import json
from typing import Any

import pytest

from lightning_normcheck.diagnosis.bugs import BugRules, first_line, is_graph_error, probe_ratio, reduction_verdict
from lightning_normcheck.diagnosis.engine import Diagnosis
from lightning_normcheck.diagnosis.records import (
    AccumulationWindow,
    OptimizerSteps,
    ReductionProbe,
    StaleState,
    TrainingError,
    ZeroGradWindow,
)
from lightning_normcheck.diagnosis.thresholds import BugThresholds, Thresholds

OPT = "optimizer 0 (SGD)"
SECOND_TIME = "Trying to backward through the graph a second time (or directly access saved tensors after ...)"
INPLACE = "one of the variables needed for gradient computation has been modified by an inplace operation: [x]"


def diag(**bugs: Any) -> Diagnosis:
    return Diagnosis(Thresholds(bugs=BugThresholds(**bugs)))


def codes(d: Diagnosis) -> list[str]:
    return [f.code for f in d.log.findings]


def rules(d: Diagnosis) -> BugRules:
    return next(r for r in d.rules if isinstance(r, BugRules))


def zg(step: int, stale: float, used: float = 2.0, optimizer: str = OPT) -> ZeroGradWindow:
    return ZeroGradWindow(step=step, previous_step=step - 1, optimizer=optimizer, stale_norm=stale, used_norm=used)


def steps(step: int, extra: int, first: int = 1, raw: bool = False, total: int = 10) -> OptimizerSteps:
    return OptimizerSteps(
        step=step, optimizer=OPT, extra_steps=extra, first_extra_step=first, total_steps=total, batches=5, raw=raw
    )


def window(step: int, k: int = 4, factor: float | None = 1.0, per_batch: bool = True, opt: str = OPT) -> Any:
    return AccumulationWindow(step=step, optimizer=opt, micro_batches=k, factor=factor, per_batch=per_batch)


def probe(step: int, ratio: float, a: float = 2.0, b: float = 2.0, half: int = 8) -> ReductionProbe:
    # a + b = 4 by default: loss_full = ratio * 4 is exact in binary floating point for the ratios used here
    return ReductionProbe(step=step, loss_a=a, loss_b=b, loss_full=ratio * (a + b), half=half)


def error(text: str, **kwargs: Any) -> TrainingError:
    return TrainingError(step=kwargs.pop("step", 7), type_name="RuntimeError", text=text, **kwargs)


# missing_zero_grad ----------------------------------------------------------------------------------------------
def test_zero_grad_cleared_is_silent_and_any_leftover_is_an_error() -> None:
    d = diag()
    d.observe(2, [zg(1, 0.0), zg(2, 0.0)])
    assert codes(d) == []
    d.observe(4, [zg(3, 1e-30)])  # exactly 0 after zero_grad: the smallest positive float is already a leftover
    f = d.log.get("missing_zero_grad")
    assert f is not None and (f.severity, f.step, f.since, f.layer, f.value) == ("error", 3, 2, None, 1e-30)


def test_zero_grad_message_numbers_and_growth() -> None:
    d = diag()
    d.observe(1, [zg(1, 0.0, used=2.0)])
    d.observe(2, [zg(2, 0.5, used=8.0)])
    f = d.log.get("missing_zero_grad")
    assert f is not None
    assert "between step 1 and step 2" in f.message and "norm 0.5" in f.message and "norm 8" in f.message
    assert "went from 2 (step 0) to 8 (step 1)" in f.message  # the used norms of steps 0 and 1, oldest first
    assert OPT in f.message and "zero_grad" in f.message
    assert "Likely causes, most likely first: an `optimizer_zero_grad` override" in f.message
    assert "What to try: call `opt.zero_grad()`" in f.message


def test_zero_grad_nan_is_not_judged_and_repeats_count() -> None:
    d = diag()
    d.observe(1, [zg(1, float("nan"))])
    assert codes(d) == []
    d.observe(3, [zg(2, 1.0), zg(3, 2.0)])
    f = d.log.get("missing_zero_grad")
    assert f is not None and f.count == 2 and f.step == 2 and f.last_step == 3


def test_zero_grad_history_is_per_optimizer_and_bounded() -> None:
    d = diag()
    for s in range(1, 101):
        d.observe(s, [zg(s, 0.0, used=float(s)), zg(s, 0.0, used=1.0, optimizer="optimizer 1 (Adam)")])
    hist = rules(d).used_history
    assert len(hist[OPT]) == 51 and hist[OPT][0] == (49, 50.0) and hist[OPT][-1] == (99, 100.0)
    assert {n for _, n in hist["optimizer 1 (Adam)"]} == {1.0}


# double_optimizer_step ------------------------------------------------------------------------------------------
def test_double_step_needs_two_extra_steps() -> None:
    d = diag()
    d.observe(2, [steps(2, extra=1, first=2)])
    assert codes(d) == []
    d.observe(4, [steps(4, extra=2, first=2, total=5)])
    f = d.log.get("double_optimizer_step")
    assert f is not None and (f.severity, f.step, f.since, f.value) == ("error", 4, 2, 2.0)
    assert "ran 5 times over 5 batches" in f.message and "2 of those" in f.message and "first at step 2" in f.message
    assert "training_step" in f.message and "directly" not in f.message.split("Likely causes")[0]


def test_double_step_raw_ranks_the_other_caller_first() -> None:
    d = diag()
    d.observe(3, [steps(3, extra=2, raw=True)])
    f = d.log.get("double_optimizer_step")
    assert f is not None
    where, causes = f.message.split("Likely causes, most likely first: ")
    assert "directly" in where and causes.startswith("another callback or hook stepping the torch optimizer")


def test_double_step_threshold_changes_the_verdict() -> None:
    d = diag(double_step_min=3)
    d.observe(4, [steps(4, extra=2)])
    assert codes(d) == []
    d.observe(6, [steps(6, extra=3)])
    assert codes(d) == ["double_optimizer_step"]


def test_double_step_on_exception_one_is_enough() -> None:
    d = diag()
    d.explain(error("CUDA out of memory", extra_steps=(steps(3, extra=1, first=3, total=4),)))
    f = d.log.get("double_optimizer_step")
    assert f is not None and f.step == 7 and f.since == 3 and "Training then raised" not in f.message
    assert "exception" not in f.extra


def test_double_step_under_the_graph_explains_the_inplace_error() -> None:
    d = diag()
    err = error(INPLACE, batches=3, rnn_modules=("rnn",), extra_steps=(steps(1, extra=1, first=1),))
    d.explain(err)
    f = d.log.get("double_optimizer_step")
    assert f is not None and "Training then raised 'one of the variables" in f.message
    assert f.extra["exception"] == INPLACE
    assert codes(d) == ["double_optimizer_step"]  # the extra step explains it: no hidden-state finding


def test_double_step_already_found_is_annotated_once() -> None:
    d = diag()
    d.observe(4, [steps(4, extra=2)])
    err = error(INPLACE, extra_steps=(steps(5, extra=3),))
    d.explain(err)
    d.explain(err)
    f = d.log.get("double_optimizer_step")
    assert f is not None and f.message.count("Training then raised") == 1 and f.step == 4


def test_extra_step_and_second_time_error_still_explain_the_state() -> None:
    d = diag()
    d.explain(error(SECOND_TIME, batches=3, rnn_modules=("rnn",), extra_steps=(steps(2, extra=1),)))
    assert sorted(codes(d)) == ["double_optimizer_step", "hidden_state_not_detached"]


# accumulation_not_averaged ----------------------------------------------------------------------------------------
def test_accumulation_two_windows_in_a_row() -> None:
    d = diag()
    d.observe(0, [window(0)])
    assert codes(d) == []
    d.observe(1, [window(1)])
    f = d.log.get("accumulation_not_averaged")
    assert f is not None and (f.severity, f.step, f.since, f.value) == ("warning", 1, 0, 4.0)
    assert "k=4" in f.message and "steps 0, 1" in f.message and "one per batch" in f.message
    assert "factor of 1, not 1/4 = 0.25" in f.message and "`self.manual_backward(loss / 4)`" in f.message


def test_accumulation_inside_one_batch_is_worded_so() -> None:
    d = diag()
    d.observe(1, [window(0, per_batch=False), window(1, per_batch=False)])
    f = d.log.get("accumulation_not_averaged")
    assert f is not None and "parts of one batch" in f.message


@pytest.mark.parametrize(
    "factor,fires",
    [(1.0, True), (1.049, True), (0.951, True), (1.051, False), (0.949, False), (0.25, False), (None, False)],
)
def test_accumulation_factor_tolerance(factor: float | None, fires: bool) -> None:
    d = diag()  # unscaled_tol 0.05: |factor - 1| <= 0.05 is "not divided"
    d.observe(1, [window(0, factor=factor), window(1, factor=factor)])
    assert ("accumulation_not_averaged" in codes(d)) is fires


def test_accumulation_tolerance_threshold_changes_the_verdict() -> None:
    d = diag(unscaled_tol=0.2)
    d.observe(1, [window(0, factor=1.1), window(1, factor=1.1)])
    assert codes(d) == ["accumulation_not_averaged"]


def test_accumulation_resets_on_a_break_or_another_k() -> None:
    d = diag()
    # a window that is not accumulation, an unknown factor, a single micro-batch: each breaks the run
    d.observe(6, [window(0), window(1, k=0), window(2), window(3, factor=None), window(4), window(5, k=1), window(6)])
    assert codes(d) == []
    d.observe(9, [window(7, k=3), window(8, k=4), window(9, k=4)])  # k changed: the run restarts at step 8
    f = d.log.get("accumulation_not_averaged")
    assert f is not None and f.since == 8 and f.step == 9 and "steps 8, 9" in f.message


def test_accumulation_windows_threshold_and_per_optimizer_memory() -> None:
    d = diag(accum_windows=3)
    d.observe(1, [window(0), window(0, opt="b"), window(1), window(1, opt="b", k=0)])
    assert codes(d) == []
    d.observe(2, [window(2)])  # three in a row for OPT; "b" was broken by its own window
    f = d.log.get("accumulation_not_averaged")
    assert f is not None and f.since == 0 and "steps 0, 1, 2" in f.message
    assert rules(d).accum.get("b") is None


def test_accumulation_one_window_is_enough_when_asked_and_memory_stays_bounded() -> None:
    d = diag(accum_windows=1)
    for s in range(5):
        d.observe(s, [window(s)])
    f = d.log.get("accumulation_not_averaged")
    assert f is not None and (f.step, f.since, f.count) == (0, 0, 5) and "(steps 0)" in f.message
    assert rules(d).accum[OPT] == [(4, 4, 1.0)]
    d = diag()
    for s in range(5):
        d.observe(s, [window(s)])
    assert [s for s, _, _ in rules(d).accum[OPT]] == [3, 4]  # accum_windows=2: the last two


# loss_sum_reduction --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ratio,verdict",
    [
        (1.0, "sum"),
        (0.85, "sum"),
        (1.15, "sum"),
        (0.84, None),
        (1.16, None),
        (0.5, "mean"),
        (0.4, "mean"),
        (0.6, "mean"),
        (0.39, None),
        (0.61, None),
        (0.7, None),
    ],
)
def test_reduction_verdict_bands(ratio: float, verdict: str | None) -> None:
    assert reduction_verdict(probe(0, ratio), BugThresholds()) == verdict


def test_reduction_verdict_refuses_meaningless_ratios() -> None:
    th = BugThresholds()
    nan, inf = float("nan"), float("inf")
    assert reduction_verdict(ReductionProbe(0, 1.0, -1.0, 0.5, 4), th) is None  # mixed signs
    assert reduction_verdict(ReductionProbe(0, 2.0, 2.0, -4.0, 4), th) is None  # full of the other sign
    assert reduction_verdict(ReductionProbe(0, 1e-13, 1e-13, 2e-13, 4), th) is None  # ~0: a perfect fit
    assert reduction_verdict(ReductionProbe(0, nan, 1.0, 1.0, 4), th) is None
    assert reduction_verdict(ReductionProbe(0, 1.0, 1.0, inf, 4), th) is None
    assert reduction_verdict(ReductionProbe(0, -2.0, -2.0, -4.0, 4), th) == "sum"  # negative losses (a log-lik)
    assert reduction_verdict(ReductionProbe(0, 1e-13, 1e-13, 2e-13, 4), BugThresholds(probe_min_loss=1e-14)) == "sum"


def test_two_sum_probes_report_with_their_numbers() -> None:
    d = diag()
    d.observe(0, [probe(0, 1.0, a=1.5, b=2.5, half=8)])
    assert codes(d) == []
    d.observe(1, [probe(1, 0.9)])  # 3.6 / 4
    f = d.log.get("loss_sum_reduction")
    assert f is not None and (f.severity, f.step, f.since, f.layer) == ("warning", 1, 0, None)
    assert f.value == 1.0 and f.extra["ratios"] == [1.0, pytest.approx(0.9)]
    assert "on 16 samples and on each half of 8" in f.message and "loss(half A)=1.5, loss(half B)=2.5" in f.message
    assert "loss(both)/(A+B) = 1.000, 0.900 on 2 probed batch(es)" in f.message and "(16x a mean's here)" in f.message
    assert "reduction='mean'" in f.message and probe_ratio(probe(0, 0.9)) == pytest.approx(0.9)


def test_probes_that_disagree_give_no_verdict_and_means_settle_it() -> None:
    d = diag()
    d.observe(3, [probe(0, 1.0), probe(1, 0.5), probe(2, 1.0), probe(3, 1.0)])
    assert codes(d) == [] and rules(d).reduction is None
    d.observe(4, [probe(4, 0.5)])
    assert rules(d).reduction == "mean"
    d.observe(6, [probe(5, 1.0), probe(6, 1.0)])  # after the verdict, later probes change nothing
    assert codes(d) == []


def test_inconclusive_probes_do_not_count_and_mean_verdict_is_silent() -> None:
    d = diag()
    d.observe(2, [probe(0, 1.0), probe(1, 0.7), probe(2, 1.05)])
    f = d.log.get("loss_sum_reduction")
    assert f is not None and f.step == 2 and f.since == 0 and len(f.extra["ratios"]) == 2
    d = diag()
    d.observe(1, [probe(0, 0.5), probe(1, 0.495)])
    assert codes(d) == [] and rules(d).reduction == "mean"


def test_probe_thresholds_change_the_verdict() -> None:
    d = diag(probes_to_agree=3)
    d.observe(1, [probe(0, 1.0), probe(1, 1.0)])
    assert codes(d) == []
    d.observe(2, [probe(2, 1.0)])
    assert codes(d) == ["loss_sum_reduction"]
    d = diag(sum_ratio_band=(0.95, 1.05))
    d.observe(1, [probe(0, 0.9), probe(1, 0.9)])
    assert codes(d) == []


# hidden_state_not_detached -----------------------------------------------------------------------------------------
def stale(from_batch: int | None = 0) -> StaleState:
    return StaleState(step=1, module="rnn", batch=1, from_batch=from_batch, grad_fn="MulBackward0", shape="(1, 8, 8)")


def test_stale_state_is_an_error_on_its_module() -> None:
    d = diag()
    d.observe(1, [stale()])
    f = d.log.get("hidden_state_not_detached", "rnn")
    assert f is not None and (f.severity, f.step, f.extra["batch"]) == ("error", 1, 1)
    assert "`rnn` at batch 1 (shape (1, 8, 8), grad_fn MulBackward0)" in f.message
    assert "built during batch 0" in f.message and "detach" in f.message
    d = diag()
    d.observe(1, [stale(from_batch=None)])
    f = d.log.get("hidden_state_not_detached", "rnn")
    assert f is not None and "built before this batch began" in f.message


def test_graph_error_ties_to_the_stale_state_once() -> None:
    d = diag()
    d.observe(1, [stale()])
    err = error(SECOND_TIME, step=1, batches=2, rnn_modules=("rnn",), stale_modules=("rnn",))
    d.explain(err)
    d.explain(err)
    f = d.log.get("hidden_state_not_detached", "rnn")
    assert f is not None and f.message.count("Training then raised RuntimeError: 'Trying to backward") == 1
    assert f.extra["exception"] == SECOND_TIME[:200] and len(d.log) == 1


@pytest.mark.parametrize("text", [SECOND_TIME, INPLACE])
def test_graph_error_after_the_first_batch_names_the_rnn(text: str) -> None:
    d = diag()
    d.explain(error(text, batches=1, rnn_modules=("rnn",)))
    assert codes(d) == []  # a genuine in-place bug raises in the first batch already
    d.explain(error(text, batches=2, rnn_modules=("rnn", "rnn2")))
    f = d.log.get("hidden_state_not_detached", "rnn")
    assert f is not None and f.step == 7 and "(batch 1)" in f.message and "recurrent state of `rnn`" in f.message
    assert "detach the state at each batch boundary" in f.message


def test_graph_error_without_rnn_and_other_errors() -> None:
    d = diag()
    d.explain(error(SECOND_TIME, batches=3))
    f = d.log.get("hidden_state_not_detached")
    assert f is not None and f.layer is None and "a tensor kept from an earlier batch" in f.message
    d = diag()
    d.explain(error("CUDA out of memory", batches=3, rnn_modules=("rnn",)))
    assert codes(d) == []


def test_error_text_helpers() -> None:
    assert is_graph_error(SECOND_TIME) and is_graph_error(INPLACE) and not is_graph_error("boom")
    assert first_line("x" * 300 + "\nsecond") == "x" * 200
    assert first_line("", "ValueError") == "ValueError"


# memory -------------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip_keeps_every_memory() -> None:
    d = diag()
    d.observe(1, [zg(1, 0.0, used=3.0), window(1), probe(1, 1.0), probe(1, 0.5)])
    state = json.loads(json.dumps(d.state_dict()))  # plain types only
    e = diag()
    e.load_state_dict(state)
    assert rules(e).state_dict() == rules(d).state_dict()
    e.observe(2, [window(2), zg(2, 1.0), probe(2, 1.0)])
    acc, zero = e.log.get("accumulation_not_averaged"), e.log.get("missing_zero_grad")
    assert acc is not None and acc.since == 1
    assert zero is not None and "went from 3 (step 0) to 2 (step 1)" in zero.message
    assert "loss_sum_reduction" not in codes(e)  # the restored mean probe still disagrees


def test_load_tolerates_missing_keys_and_start_resets() -> None:
    d = diag()
    d.load_state_dict({"rules": {"bugs": {}}})
    assert rules(d).state_dict()["probes"] == [] and rules(d).reduction is None
    d.start(d.ctx.run)  # the fit that restored it
    d.observe(1, [probe(0, 0.5), probe(1, 0.5), window(1), zg(1, 0.0)])
    r = rules(d)
    assert r.reduction == "mean"
    r.start()  # a new fit (no checkpoint restored just before): everything starts anew
    assert (r.reduction, r.accum, r.probes, r.used_history) == (None, {}, [], {})


def test_a_resumed_fit_keeps_its_verdict_and_history_but_not_its_windows() -> None:
    d = diag()
    d.observe(1, [probe(0, 1.0), zg(1, 0.0, used=3.0), window(1)])
    e = diag()
    e.load_state_dict(d.state_dict())
    e.start(d.ctx.run)  # Lightning restores callback states between setup and on_train_start
    r = rules(e)
    assert r.accum == {} and r.used_history == {OPT: [(0, 3.0)]} and len(r.probes) == 1
    e.observe(2, [window(2), probe(2, 1.0)])
    assert codes(e) == ["loss_sum_reduction"]  # the restored probe agrees; the window run started anew
    r.start()  # a later fit with the same callback starts anew
    assert (r.reduction, r.probes, r.used_history) == (None, [], {})
