"""No host sync on steps that log nothing.

Every tensor method that moves a value to the host (``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``,
``bool(t)``, ``float(t)``, ``int(t)``, ``t.__index__()``) is wrapped for the duration of a real fit; a call
counts when any frame on the Python stack belongs to ``lightning_normcheck`` (so a sync inside a torch helper
called by the package counts too). The batch it happens in is recorded by a callback placed before NormCheck.
With ``log_every_n_steps=10``, steps 20 and later that are not a multiple of 10 are not sampled: the count
there must be zero. The same wrapper must see the package's one transfer on the logging steps (the control
that shows the instrumentation works).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, fit, loader, regression_data
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_normcheck import NormCheck

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
EVERY = 10
STEPS = 35


class _BatchTracker(Callback):
    """Placed first: knows which optimizer step the current batch leads to (None outside training batches)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self.step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step = None  # the end-of-fit flush is allowed to transfer


def _package_frame() -> str | None:
    f = sys._getframe(2)
    while f is not None:
        if f.f_globals.get("__name__", "").startswith("lightning_normcheck"):
            return f"{f.f_globals['__name__']}:{f.f_code.co_name}:{f.f_lineno}"
        f = f.f_back
    return None


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> tuple[_BatchTracker, list[tuple[int | None, str, str]]]:
    tracker = _BatchTracker()
    events: list[tuple[int | None, str, str]] = []
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *args: Any, _original: Any = original, _name: str = name, **kw: Any) -> Any:
            where = _package_frame()
            if where is not None:
                events.append((tracker.step, _name, where))
            return _original(self, *args, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return tracker, events


def _unsampled(step: int | None) -> bool:
    # the contract: dense sampling only below step 20, then every `EVERY` steps
    return step is not None and step >= 20 and step % EVERY != 0


class _ManualModel(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=10.0, gradient_clip_algorithm="norm")
        opt.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _check(events: list[tuple[int | None, str, str]]) -> None:
    bad = [e for e in events if _unsampled(e[0])]
    assert not bad, f"host syncs from lightning_normcheck on unsampled steps: {bad[:10]}"
    logged = {s for s, _, _ in events if s is not None and s >= 20 and s % EVERY == 0}
    assert logged, f"the wrapper saw no transfer on the logging steps (instrumentation broken?): {events[:10]}"


def test_no_host_sync_on_unsampled_steps_automatic(syncs: Any) -> None:
    tracker, events = syncs
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
    data = loader(regression_data(n=STEPS * 8, d=8), batch_size=8)
    fit(
        LitModel(net, optimizer="adam", lr=1e-3),
        data,
        [tracker, NormCheck(print_summary=False)],
        max_steps=STEPS,
        log_every_n_steps=EVERY,
        gradient_clip_val=10.0,  # a clip threshold: the clip-rate tracker works on every step
    )
    _check(events)


def test_no_host_sync_on_unsampled_steps_manual(syncs: Any) -> None:
    tracker, events = syncs
    data = loader(regression_data(n=STEPS * 8, d=8), batch_size=8)
    cb = NormCheck(print_summary=False, clip_threshold=10.0)
    fit(_ManualModel(), data, [tracker, cb], max_steps=STEPS, log_every_n_steps=EVERY)
    _check(events)


def test_a_planted_sync_is_caught(syncs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: a ``float()`` of the total norm on every step is seen on the unsampled steps."""
    from lightning_normcheck import GradientNormMonitor
    from lightning_normcheck.callbacks import gradient_norm_monitor as gnm

    original = gnm._GradientNorms.on_before_optimizer_step

    def planted(self: Any, run: Any, optimizer: torch.optim.Optimizer) -> None:
        float(run.grad_stats(optimizer).total)
        original(self, run, optimizer)

    monkeypatch.setattr(gnm._GradientNorms, "on_before_optimizer_step", planted)
    tracker, events = syncs
    data = loader(regression_data(n=200, d=8), batch_size=8)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    fit(LitModel(net), data, [tracker, GradientNormMonitor(print_summary=False)], max_steps=25, log_every_n_steps=EVERY)
    with pytest.raises(AssertionError, match="unsampled steps"):
        _check(events)
    assert {s for s, name, _ in events if name == "__float__"} >= set(range(21, 25))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_cuda_sync_on_unsampled_steps() -> None:
    """On CUDA, ``torch.cuda.set_sync_debug_mode("error")`` is on while the package's code runs on unsampled steps.

    Every entry into the package goes through ``_call`` (Lightning hooks), ``_safely`` (the flush) or a
    ``_guard``-wrapped hook (forward, tensor and optimizer hooks inside the user's code); all are wrapped here.
    A synchronizing call there raises, the package's fault isolation switches that monitor off and warns: the
    fit must end with no monitor switched off. The control: the same wrapper with the mode on at every step
    must see the logging steps' transfer fail. Not run here (no GPU was lent); checked only with a simulated
    sync mode on CPU.
    """
    from lightning_normcheck.callbacks import _base

    def run_fit(check: Callable[[int | None], bool]) -> NormCheck:
        tracker = _BatchTracker()
        base = _base._NormCheckBase
        original_call, original_guard, original_safely = base._call, base._guard, base._safely

        def checked(fn: Any) -> Any:
            def inner(*args: Any, **kwargs: Any) -> Any:
                if not check(tracker.step):
                    return fn(*args, **kwargs)
                previous = torch.cuda.get_sync_debug_mode()  # calls nest (the flush calls the monitors)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return fn(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode(previous)

            return inner

        def call(self: Any, method: str, *args: Any) -> None:
            checked(lambda: original_call(self, method, *args))()

        def guard(self: Any, monitor: Any, fn: Any) -> Any:
            return original_guard(self, monitor, checked(fn))

        def safely(self: Any, fn: Any, *args: Any) -> None:
            original_safely(self, checked(fn), *args)

        cb = NormCheck(print_summary=False)
        net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        data = loader(regression_data(n=STEPS * 8, d=8), batch_size=8)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(base, "_call", call)
            mp.setattr(base, "_guard", guard)
            mp.setattr(base, "_safely", safely)
            fit(LitModel(net), data, [tracker, cb], max_steps=STEPS, log_every_n_steps=EVERY, accelerator="cuda")
        return cb

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert run_fit(_unsampled).disabled_monitors == []
        # control: with the mode on at the sampled steps too, the one transfer per logging step is caught
        assert run_fit(lambda step: step is not None).disabled_monitors != []
