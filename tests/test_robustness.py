"""A monitor must never be the reason a training run fails or changes.

Every test trains a real tiny Lightning model on CPU. "Identical" always means ``torch.equal`` on every
parameter and buffer of a run with NormCheck against the same run (same seed) without it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import (
    LitModel,
    ManualTwoOpt,
    MemLogger,
    classification_data,
    fit,
    loader,
    mlp,
    regression_data,
    trainer,
)
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_normcheck.norms as N
from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks import activation_norm_monitor

# ----------------------------------------------------------------------------------------------------
# helpers


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs with NormCheck attached"


def leftover_hooks(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """Every module, tensor, optimizer and global hook still registered."""
    left = []
    for name, m in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, attr, None):
                left.append(f"{name or '<root>'}.{attr}")
    for name, p in model.named_parameters():
        if getattr(p, "_backward_hooks", None):
            left.append(f"{name}._backward_hooks")
        if getattr(p, "_post_accumulate_grad_hooks", None):
            left.append(f"{name}._post_accumulate_grad_hooks")
    for i, opt in enumerate(optimizers):
        for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
            if getattr(opt, attr, None):
                left.append(f"optimizer{i}.{attr}")
    import torch.nn.modules.module as mm
    import torch.optim.optimizer as oo

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        if getattr(mm, attr, None):
            left.append(f"global {attr}")
    for attr in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks"):
        if getattr(oo, attr, None):
            left.append(f"global {attr}")
    return left


def failed_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "switched off for the rest of this fit" in str(w.message)]


def run_pair(
    make_model: Any, data: Any, max_steps: int = 12, cb: NormCheck | None = None, **kw: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], NormCheck, list[str], L.LightningModule]:
    """Train the same model (same seed) without and with NormCheck; returns both states and the callback."""
    L.seed_everything(0, verbose=False)
    plain = make_model()
    fit(plain, data() if callable(data) else data, [], max_steps=max_steps, **kw)
    L.seed_everything(0, verbose=False)
    watched = make_model()
    cb = cb or NormCheck(print_summary=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(watched, data() if callable(data) else data, [cb], max_steps=max_steps, **kw)
    return state_of(plain), state_of(watched), cb, failed_warnings(rec), watched


class DropBN(L.LightningModule):
    """Dropout + BatchNorm (random masks, running buffers, an integer num_batches_tracked buffer)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 32),
            nn.BatchNorm1d(32),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(32, 32),
            nn.Tanh(),
            nn.Dropout(0.2),
            nn.Linear(32, 4),
        )
        self.opt: torch.optim.Optimizer | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        self.opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        return self.opt


def cls_loader(shuffle: bool = True) -> DataLoader:
    return loader(classification_data(128), batch_size=16, shuffle=shuffle)


# ----------------------------------------------------------------------------------------------------
# watching changes nothing


def test_watching_changes_nothing_dropout_batchnorm() -> None:
    plain, watched, cb, failed, _ = run_pair(DropBN, cls_loader, max_steps=25)
    assert_identical(plain, watched)
    assert failed == [] and cb.disabled_monitors == []


# ----------------------------------------------------------------------------------------------------
# isolation


def test_failing_forward_hook_is_switched_off_and_training_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    seen_hooks: list[tuple[int, int, int]] = []  # (step, hooks before, hooks after a first forward)

    class Spy(DropBN):
        def __init__(self) -> None:
            super().__init__()
            seen_hooks.clear()  # keep the calls of the last model built (the watched one)

        def _hooks(self) -> int:
            return sum(len(m._forward_hooks) for m in self.modules())

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            before = self._hooks()
            self.net(batch[0])  # a first forward, its output unused (same in both runs)
            seen_hooks.append((self.trainer.global_step, before, self._hooks()))
            return super().training_step(batch, batch_idx)

    def boom(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("injected torch failure")

    # a failure inside the activation monitor's forward hook (it reads the module output first)
    monkeypatch.setattr(activation_norm_monitor, "first_tensor", boom)
    plain, watched, cb, failed, model = run_pair(Spy, cls_loader, max_steps=15)
    assert_identical(plain, watched)
    assert cb.disabled_monitors == ["activation_norm"]
    assert len(failed) == 1 and "activation_norm" in failed[0]  # one warning, not one per step
    assert "injected torch failure" in failed[0]
    # the hooks of the failing monitor went away at once: no later forward (probe or step) sees them
    # the training step of step 0 (other calls are the bug detector's probes, which hooks ignore): its
    # first forward failed, and the hooks were gone before the next forward
    assert (0, 6, 0) in seen_hooks, seen_hooks  # 6: Linear, BatchNorm1d, ReLU, Linear, Tanh, Linear
    assert all(before == after == 0 for step, before, after in seen_hooks if step > 0), seen_hooks
    assert leftover_hooks(model, [model.opt]) == []


HOOK_KINDS = {"module": nn.Module, "tensor": torch.Tensor, "optimizer": torch.optim.Optimizer}


@pytest.mark.parametrize("kind", sorted(HOOK_KINDS))
def test_failing_hook_of_each_kind_is_switched_off(kind: str) -> None:
    """Every hook a monitor puts in the user's code (forward, tensor grad, optimizer step) raising once."""
    cb = NormCheck(print_summary=False, log_every_n_steps=1)
    raised: list[int] = []
    guard = cb._guard

    def failing_guard(monitor: Any, fn: Any) -> Any:
        def hook(*args: Any, **kwargs: Any) -> Any:
            if args and isinstance(args[0], HOOK_KINDS[kind]):
                raised.append(1)
                raise RuntimeError(f"injected failure in a {kind} hook")
            return fn(*args, **kwargs)

        return guard(monitor, hook)

    cb._guard = failing_guard  # type: ignore[method-assign]
    seen: list[tuple[int, int]] = []

    class Spy(DropBN):
        def __init__(self) -> None:
            super().__init__()
            seen.clear()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if kind == "module":
                n = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules())
            elif kind == "tensor":
                n = sum(len(p._backward_hooks or {}) for p in self.parameters())
            else:
                n = len(self.opt._optimizer_step_post_hooks) + len(self.opt._optimizer_step_pre_hooks)
            seen.append((self.trainer.global_step, n))
            return super().training_step(batch, batch_idx)

    plain, watched, cb, failed, model = run_pair(Spy, cls_loader, max_steps=8, cb=cb)
    assert_identical(plain, watched)
    assert raised, f"no {kind} hook was registered"
    assert cb.disabled_monitors and len(failed) == len(cb.disabled_monitors)  # one warning per monitor
    assert all(f"injected failure in a {kind} hook" in w for w in failed)
    # every monitor with a hook of this kind failed at its first call: from the next step on, none is left
    assert max(n for _, n in seen) > 0 and all(n == 0 for step, n in seen if step >= 1), seen
    assert leftover_hooks(model, [model.opt]) == []


def test_failing_optimizer_hook_is_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    logger = MemLogger()

    def boom(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("injected failure in a step post-hook")

    monkeypatch.setattr(N, "sub_norms", boom)  # the post-hook's measurement, one tensor at a time ...
    monkeypatch.setattr(N.NormPlan, "sub_", boom)  # ... and with small tensors stacked
    plain, watched, cb, failed, model = run_pair(DropBN, cls_loader, max_steps=15, logger=logger)
    assert_identical(plain, watched)
    assert "weight_drift" in cb.disabled_monitors
    assert len([w for w in failed if "weight_drift" in w]) == 1
    assert leftover_hooks(model, [model.opt]) == []
    steps = sorted({s for s, row in logger.rows if "normcheck/grad_norm/total" in row})
    assert steps[-1] == 14  # the gradient monitor went on to the end


def test_failing_diagnosis_is_switched_off() -> None:
    cb = NormCheck(print_summary=False)
    calls = []

    def boom(*args: Any) -> None:
        calls.append(1)
        raise ZeroDivisionError("odd value in diagnosis")

    for rules in cb._diagnosis.rules:
        if rules.name == "gradients":
            rules.observe = boom  # type: ignore[method-assign]
    plain, watched, cb, failed, model = run_pair(DropBN, cls_loader, max_steps=12, cb=cb)
    assert_identical(plain, watched)
    assert cb.disabled_monitors == ["gradients rules"] and len(calls) == 1 and len(failed) == 1
    assert "the gradients rules failed" in failed[0]
    assert [r.name for r in cb._diagnosis.rules if r.name == "nonfinite"] == ["nonfinite"]  # the others go on


@pytest.mark.parametrize("where", ["_Run.__init__", "_Run.transfer"])
def test_failing_shared_plumbing_switches_everything_off(where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_normcheck.callbacks import _base

    cls_name, method = where.split(".")

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"injected failure in {where}")

    monkeypatch.setattr(getattr(_base, cls_name), method, boom)
    plain, watched, cb, failed, model = run_pair(DropBN, cls_loader, max_steps=10)
    assert_identical(plain, watched)
    assert cb.disabled_monitors == sorted(m.name for m in cb._monitors)
    assert len(failed) == 1 and f"injected failure in {where}" in failed[0]
    assert leftover_hooks(model, [model.opt]) == []


def test_odd_module_outputs_do_not_disable_anything() -> None:
    class Odd(nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.lin = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> Any:
            y = self.lin(x)
            return {
                "none": None,
                "int": 3,
                "str": "x",
                "obj": object(),
                "long": y.long(),
                "bool": y > 0,
                "empty": y[:0],
                "nested": [(None, {"a": y})],
            }[self.kind]

    class Model(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.odd = nn.ModuleList([Odd(k) for k in ("none", "int", "str", "obj", "long", "bool", "empty", "nested")])
            self.head = nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            for m in self.odd:
                m(x)
            return nn.functional.mse_loss(self.head(self.odd[-1](x)[0][1]["a"]), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    plain, watched, cb, failed, _ = run_pair(Model, lambda: loader(regression_data(64)), max_steps=6)
    assert_identical(plain, watched)
    assert failed == [] and cb.disabled_monitors == []


def test_user_exception_propagates_unchanged_and_hooks_are_removed() -> None:
    err = ValueError("my own bug at batch 5")

    hooks_when_raised: list[int] = []

    class Raises(DropBN):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 5:
                hooks_when_raised.append(len(leftover_hooks(self, [self.opt] if self.opt else [])))
                raise err
            return super().training_step(batch, batch_idx)

    model = Raises()
    cb = NormCheck(print_summary=False, log_every_n_steps=1)  # hooks live on every step
    with pytest.raises(ValueError) as info:
        fit(model, cls_loader(), [cb], max_steps=20)
    assert info.value is err and str(info.value) == "my own bug at batch 5"
    assert info.value.__cause__ is None and info.value.__context__ is None  # nothing chained onto it
    assert hooks_when_raised and hooks_when_raised[0] > 0  # raised while module and optimizer hooks were on
    assert leftover_hooks(model, [model.opt]) == []
    assert cb.disabled_monitors == []


def test_user_exception_inside_forward_while_hooks_attached() -> None:
    class Explode(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise KeyError("raised inside a hooked forward")

    class Model(DropBN):
        def __init__(self) -> None:
            super().__init__()
            self.bad = Explode()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            loss = super().training_step(batch, batch_idx)
            if batch_idx == 2:
                self.bad(batch[0])
            return loss

    model = Model()
    cb = NormCheck(print_summary=False)
    with pytest.raises(KeyError, match="raised inside a hooked forward"):
        fit(model, cls_loader(), [cb], max_steps=20)
    assert leftover_hooks(model, [model.opt]) == []


# ----------------------------------------------------------------------------------------------------
# hooks


def test_hooks_removed_after_fit_and_fit_twice_works() -> None:
    cb = NormCheck(print_summary=False)
    logger1, logger2 = MemLogger(), MemLogger()
    m1 = DropBN()
    fit(m1, cls_loader(), [cb], max_steps=8, logger=logger1)
    assert leftover_hooks(m1, [m1.opt]) == []
    m2 = DropBN()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(m2, cls_loader(), [cb], max_steps=12, logger=logger2)
    assert failed_warnings(rec) == [] and cb.disabled_monitors == []
    assert leftover_hooks(m2, [m2.opt]) == [] and leftover_hooks(m1, [m1.opt]) == []
    # the second fit was measured in full: totals every step, activations on its own sampled steps
    totals = sorted(s for s, row in logger2.rows if "normcheck/grad_norm/total" in row)
    assert totals == list(range(12))
    act_steps = {s for s, row in logger2.rows if any(k.startswith("normcheck/act_rms/") for k in row)}
    assert {0, 1, 2, 3} <= act_steps
    assert any(k.startswith("normcheck/weight_drift/") for k in logger2.keys())


def test_second_fit_is_measured_from_its_own_step_0() -> None:
    cb = NormCheck(print_summary=False)
    for _ in range(2):
        logger = MemLogger()
        fit(DropBN(), cls_loader(), [cb], max_steps=1, logger=logger)
        for prefix in ("normcheck/act_rms/", "normcheck/grad_norm/", "normcheck/weight_norm/"):
            assert [s for s, row in logger.rows if any(k.startswith(prefix) for k in row)] == [0], prefix
    assert cb.disabled_monitors == []


def test_validation_test_predict_are_not_measured() -> None:
    hooks_in_eval: list[int] = []

    class WithVal(DropBN):
        def _count(self) -> None:
            hooks_in_eval.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.modules()))

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self._count()
            self.net(batch[0] * 1e4)  # would be an alarming activation scale if it were measured

        def test_step(self, batch: Any, batch_idx: int) -> None:
            self._count()
            self.net(batch[0] * 1e4)

        def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self._count()
            return self.net(batch[0] * 1e4)

    big = loader(classification_data(32), batch_size=16)
    model = WithVal()
    cb = NormCheck(print_summary=False, log_every_n_steps=1)
    logger = MemLogger()
    L.seed_everything(0, verbose=False)
    t = trainer([cb], max_steps=12, logger=logger, val_check_interval=3, num_sanity_val_steps=2)
    t.fit(model, cls_loader(), big)
    t.validate(model, big, verbose=False)
    t.test(model, big, verbose=False)
    t.predict(model, big)
    assert len(hooks_in_eval) > 8 and set(hooks_in_eval) == {0}
    # every activation value logged is a training-time value (validation inputs are 1e4 larger)
    act = [v for _, row in logger.rows for k, v in row.items() if k.startswith("normcheck/act_rms/")]
    assert act and max(act) < 100.0
    logged_steps = {s for s, row in logger.rows if any(k.startswith("normcheck/") for k in row)}
    assert max(logged_steps) <= 11
    assert cb.disabled_monitors == [] and leftover_hooks(model, [model.opt]) == []


def test_exception_in_a_later_validate_is_left_alone(capsys: pytest.CaptureFixture[str]) -> None:
    err = RuntimeError("Trying to backward through the graph a second time (raised by my validation_step)")

    class BadVal(DropBN):
        def validation_step(self, batch: Any, batch_idx: int) -> None:
            raise err

    model = BadVal()
    cb = NormCheck()
    t = trainer([cb], max_steps=6)
    t.fit(model, cls_loader())
    before = [(f.code, f.layer, f.count) for f in cb.findings]
    capsys.readouterr()
    with pytest.raises(RuntimeError) as info:
        t.validate(model, loader(classification_data(32)), verbose=False)
    assert info.value is err
    assert [(f.code, f.layer, f.count) for f in cb.findings] == before  # not explained as a training bug
    assert "normcheck" not in capsys.readouterr().err
    assert leftover_hooks(model, [model.opt]) == []


def test_two_normchecks_in_one_trainer_have_distinct_state_keys(tmp_path: Path) -> None:
    a, b = NormCheck(print_summary=False), NormCheck(activations=False, print_summary=False)
    assert a.state_key != b.state_key
    assert NormCheck(print_summary=False).state_key == a.state_key  # stable: a resumed run finds its state
    assert NormCheck(print_summary=False, log_every_n_steps=None, norm_type=2).state_key == a.state_key  # defaults
    model = DropBN()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(model, cls_loader(), [a, b, ckpt], max_steps=4, enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]
    assert a.state_key in saved and b.state_key in saved


def test_pickle_and_deepcopy_keep_the_configuration() -> None:
    import copy
    import pickle

    cb = NormCheck(clip_threshold=1.0, print_summary=False)
    fit(DropBN(), cls_loader(), [cb], max_steps=3)
    for clone in (pickle.loads(pickle.dumps(cb)), copy.deepcopy(cb)):
        assert clone.state_key == cb.state_key
        assert [m.name for m in clone._monitors] == [m.name for m in cb._monitors]
        model = DropBN()
        fit(model, cls_loader(), [clone], max_steps=3)
        assert clone.disabled_monitors == [] and leftover_hooks(model, [model.opt]) == []


# ----------------------------------------------------------------------------------------------------
# resume


class _NanGrad(torch.autograd.Function):
    """Forward: 0. Backward: a NaN gradient. A parameter with a non-finite gradient, finite loss."""

    @staticmethod
    def forward(ctx: Any, p: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape = p.shape
        return p.new_zeros(())

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.full(ctx.shape, float("nan"))


class NanGradModel(LitModel):
    def __init__(self) -> None:
        super().__init__(mlp(depth=2))
        self.odd = nn.Parameter(torch.ones(3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) + _NanGrad.apply(self.odd)

    def configure_optimizers(self) -> Any:
        # `odd` is stepped with lr 0: it turns NaN, which its forward ignores; the rest trains normally
        return torch.optim.SGD([{"params": self.net.parameters()}, {"params": [self.odd], "lr": 0.0}], lr=0.01)


@contextlib.contextmanager
def _finding_log() -> Iterator[list[str]]:
    """Messages announced on the ``lightning_normcheck`` logger while the block runs."""
    messages: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler = _Handler()
    logger = logging.getLogger("lightning_normcheck")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def _resumed_histories(saved: Any, now: Any) -> list[bool]:
    """Every list of (step, value) entries in the saved rule state is the start of the same list after the resumed
    fit; returns, per list, whether it grew."""
    out: list[bool] = []
    if isinstance(saved, dict):
        for key, value in saved.items():
            if isinstance(now, dict) and key in now:
                out += _resumed_histories(value, now[key])
    elif isinstance(saved, list) and saved and all(isinstance(x, (list, tuple)) and len(x) == 2 for x in saved):
        same_start = repr([tuple(x) for x in now][: len(saved)]) == repr([tuple(x) for x in saved])
        if not same_start and len(now) <= len(saved):
            return out  # a short bounded window (2 samples) that rolled on since
        assert same_start
        out.append(len(now) > len(saved))
    return out


def test_resume_keeps_findings_histories_and_drift_reference(tmp_path: Path) -> None:
    data = loader(regression_data(256), batch_size=16)
    L.seed_everything(0, verbose=False)
    model = NanGradModel()
    start = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    cb1 = NormCheck(print_summary=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    with _finding_log() as rec1:
        fit(model, data, [cb1, ckpt], max_steps=10, enable_checkpointing=True)
    first = {(f.code, f.layer): f.step for f in cb1.findings}
    assert "nonfinite_gradients" in {code for code, _ in first}
    assert any("nonfinite_gradients" in msg for msg in rec1)
    hist1 = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][cb1.state_key]["diagnosis"]["rules"]

    cb2 = NormCheck(print_summary=False)
    logger = MemLogger()
    model2 = NanGradModel()
    with _finding_log() as rec2:
        L.seed_everything(0, verbose=False)
        t = trainer(
            [cb2, ModelCheckpoint(dirpath=tmp_path / "2")], max_steps=20, logger=logger, enable_checkpointing=True
        )
        t.fit(model2, data, ckpt_path=str(tmp_path / "last.ckpt"))
    # old findings kept (same first step), not announced again
    second = {(f.code, f.layer): f.step for f in cb2.findings}
    for key, step in first.items():
        assert second[key] == step
    assert not any("nonfinite_gradients" in msg for msg in rec2)
    # the histories (windows, baselines) were restored: each resumed history starts with the saved one
    checked = _resumed_histories(hist1, cb2._diagnosis.state_dict()["rules"])
    assert len(checked) >= 3 and any(checked)  # several histories restored, and they went on from there
    # the drift reference is the weights of the very first start, checked from the logged numbers
    drift = {s: row for s, row in logger.rows if any(k.startswith("normcheck/weight_drift/") for k in row)}
    step = max(drift)
    assert step == 19  # the end-of-fit flush: the weights now are the weights it measured
    w_now = {n: p.detach() for n, p in model2.net.named_parameters()}
    resumed = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    for layer in ("0", "2", "4"):
        names = [n for n in start if n.rsplit(".", 1)[0] == layer]
        den = sum(start[n].pow(2).sum() for n in names).sqrt()
        expected = sum((w_now[n] - start[n]).pow(2).sum() for n in names).sqrt() / den
        logged = drift[step][f"normcheck/weight_drift/net.{layer}"]
        assert logged == pytest.approx(expected.item(), rel=1e-4)
        # not measured from the resumed weights
        re_den = sum(resumed[f"net.{n}"].pow(2).sum() for n in names).sqrt()
        from_resume = sum((w_now[n] - resumed[f"net.{n}"]).pow(2).sum() for n in names).sqrt() / re_den
        assert abs(logged - from_resume.item()) > 1e-3 * logged


def test_lightning_restores_callback_state_after_setup_and_before_train_start(tmp_path: Path) -> None:
    """The order _NormCheckBase relies on (state loaded into monitors already set up for the model)."""
    order: list[str] = []

    class Order(L.Callback):
        def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
            order.append("setup")

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            order.append("load_state_dict")

        def state_dict(self) -> dict[str, Any]:
            return {"x": 1}

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            order.append("on_train_start")

    fit(
        DropBN(),
        cls_loader(),
        [Order(), ModelCheckpoint(tmp_path, save_last=True)],
        max_steps=2,
        enable_checkpointing=True,
    )
    order.clear()
    t = trainer([Order(), ModelCheckpoint(tmp_path / "2")], max_steps=3, enable_checkpointing=True)
    t.fit(DropBN(), cls_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert order == ["setup", "load_state_dict", "on_train_start"]


def test_resume_keeps_the_clipping_window(tmp_path: Path) -> None:
    """The clip rate after a resume is over the steps before and after it (window 50 > 12 steps)."""
    norms: dict[int, float] = {}

    class PreClip(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            sq = sum(float(p.grad.double().pow(2).sum()) for p in pl_module.parameters() if p.grad is not None)
            norms[trainer.global_step] = sq**0.5

    clip = 1.0
    kw: dict[str, Any] = dict(gradient_clip_val=clip, enable_checkpointing=True)
    L.seed_everything(0, verbose=False)
    fit(
        DropBN(),
        cls_loader(),
        [NormCheck(print_summary=False), PreClip(), ModelCheckpoint(tmp_path, save_last=True)],
        max_steps=6,
        **kw,
    )
    logger = MemLogger()
    L.seed_everything(1, verbose=False)
    t = trainer(
        [NormCheck(print_summary=False), PreClip(), ModelCheckpoint(tmp_path / "2")], max_steps=12, logger=logger, **kw
    )
    t.fit(DropBN(), cls_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(norms) == list(range(12))
    ratios = [norms[s] / clip for s in range(12)]
    clipped = [r for r in ratios if r > 1.0]
    assert 0 < len(clipped) < 12, ratios  # a mix, so that the window's content matters
    last = max(s for s, row in logger.rows if "normcheck/clip/rate" in row)
    row = dict(next(r for s, r in logger.rows if s == last and "normcheck/clip/rate" in r))
    assert last == 11
    assert row["normcheck/clip/rate"] == pytest.approx(len(clipped) / 12, abs=1e-6)
    assert row["normcheck/clip/mean_excess"] == pytest.approx(sum(clipped) / len(clipped), rel=1e-4)


# ----------------------------------------------------------------------------------------------------
# memory


def _tensors_in(obj: Any, seen: set[int] | None = None, depth: int = 0) -> Iterator[torch.Tensor]:
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 8:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple, set)) or type(obj).__name__ == "deque":
        for v in obj:
            yield from _tensors_in(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("lightning_normcheck"):
        yield from _tensors_in(vars(obj), seen, depth + 1)
    elif hasattr(obj, "__slots__") and type(obj).__module__.startswith("lightning_normcheck"):
        for s in obj.__slots__:
            yield from _tensors_in(getattr(obj, s, None), seen, depth + 1)


def test_no_graph_or_growing_state_is_kept() -> None:
    cb = NormCheck(print_summary=False, log_every_n_steps=5)
    model = DropBN()
    sizes: list[int] = []
    checked: list[int] = []

    class Probe(L.Callback):
        grads: list[weakref.ref] = []

        def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
            # zero_grad(set_to_none) has run: nothing may keep the previous step's gradients alive
            assert all(r() is None for r in self.grads), "the last step's gradients are kept alive"
            checked.append(len(self.grads))

        def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
            self.grads = [weakref.ref(p.grad) for p in trainer.lightning_module.parameters() if p.grad is not None]
            if trainer.global_step in (20, 60, 100):
                held = list(_tensors_in([m for m in cb._monitors] + [cb._run]))
                assert not [t for t in held if t.grad_fn is not None], "a kept tensor holds an autograd graph"
                params = {id(p) for p in trainer.lightning_module.parameters()}
                grads = {id(p.grad) for p in trainer.lightning_module.parameters() if p.grad is not None}
                sizes.append(sum(t.numel() for t in held if id(t) not in params and id(t) not in grads))

    fit(model, loader(classification_data(512), batch_size=4), [cb, Probe()], max_steps=101)
    assert len(sizes) == 3 and len(checked) == 101 and min(checked[1:]) > 0
    assert sizes[2] <= sizes[0] * 1.05 + 64, f"monitor state grows with steps: {sizes}"


# ----------------------------------------------------------------------------------------------------
# works with


class LBFGSModel(LitModel):
    def __init__(self) -> None:
        super().__init__(mlp(depth=2))

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


class ManualLBFGS(LitModel):
    """Manual optimization with an LBFGS closure (the closure runs forward and backward several times)."""

    def __init__(self) -> None:
        super().__init__(mlp(depth=2))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt = self.optimizers()

        def closure() -> torch.Tensor:
            opt.zero_grad()  # type: ignore[union-attr]
            loss = nn.functional.mse_loss(self(x), y)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)  # type: ignore[union-attr]

    def configure_optimizers(self) -> Any:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)


class SkipsBatches(DropBN):
    """Returns None on every third batch (Lightning skips backward and the step) and a dict otherwise."""

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx % 3 == 2:
            return None
        return {"loss": super().training_step(batch, batch_idx), "extra": torch.ones(3)}


class TwoLoaders(DropBN):
    """A dict of train loaders: the batch is a dict of (x, y) pairs."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch["a"], batch_idx) + super().training_step(batch["b"], batch_idx)


class Batch:
    """A custom batch object (no tensor at the top level)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class CustomBatch(DropBN):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.net(batch.x), batch.y)


def custom_batches() -> DataLoader:
    def collate(items: list[Any]) -> Batch:
        return Batch(torch.stack([x for x, _ in items]), torch.stack([y for _, y in items]))

    return DataLoader(classification_data(128), batch_size=16, collate_fn=collate)


class Scheduled(DropBN):
    def configure_optimizers(self) -> Any:
        self.opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=0.1, total_steps=100)
        return {"optimizer": self.opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Stream(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(1)
        for _ in range(64):
            x = torch.randn(8, generator=g)
            yield x, (x.sum() > 0).long()


@pytest.mark.parametrize(
    "name, make, data, kw",
    [
        ("manual_two_optimizers", ManualTwoOpt, lambda: loader(regression_data(64)), {}),
        ("lbfgs_closure", LBFGSModel, lambda: loader(regression_data(64)), {}),
        ("fast_dev_run", DropBN, cls_loader, {"fast_dev_run": True}),
        ("max_steps_1", DropBN, cls_loader, {"max_steps": 1}),
        ("limit_train_batches", DropBN, cls_loader, {"limit_train_batches": 3, "max_steps": -1, "max_epochs": 3}),
        ("iterable_dataset", DropBN, lambda: DataLoader(Stream(), batch_size=8), {}),
        ("accumulate_grad_batches", DropBN, cls_loader, {"accumulate_grad_batches": 3}),
        ("step_lr_scheduler", Scheduled, cls_loader, {}),
        ("gradient_clipping", DropBN, cls_loader, {"gradient_clip_val": 0.5}),
        ("clip_by_value", DropBN, cls_loader, {"gradient_clip_val": 0.05, "gradient_clip_algorithm": "value"}),
        ("manual_lbfgs_closure", ManualLBFGS, lambda: loader(regression_data(64)), {}),
        ("bf16_mixed", DropBN, cls_loader, {"precision": "bf16-mixed"}),
        ("training_step_returns_none_or_dict", SkipsBatches, cls_loader, {}),
        ("dict_of_train_loaders", TwoLoaders, lambda: {"a": cls_loader(), "b": cls_loader(False)}, {}),
        ("custom_batch_object", CustomBatch, custom_batches, {}),
    ],
)
def test_works_with(name: str, make: Any, data: Any, kw: dict[str, Any]) -> None:
    kw = dict(kw)
    max_steps = kw.pop("max_steps", 10)
    plain, watched, cb, failed, model = run_pair(make, data, max_steps=max_steps, **kw)
    assert_identical(plain, watched)
    assert failed == [] and cb.disabled_monitors == [], failed
    opts = [o for o in (getattr(model, "opt", None),) if o is not None]
    assert leftover_hooks(model, opts) == []
