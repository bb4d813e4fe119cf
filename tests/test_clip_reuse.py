"""Lightning's clip by norm reuses the total NormCheck measured: the weights stay bit for bit those of a run
without NormCheck, the gradients are read once per step, and the precision plugin is left as it was found.

Every test trains a real tiny Lightning model on CPU twice with the same seed, with and without NormCheck, with a
``gradient_clip_val`` that clips on most steps (checked from the totals torch's own ``clip_grad_norm_`` returns in
the run without NormCheck), and compares every parameter and buffer with ``torch.equal``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, MemLogger, fit, loader, mlp, regression_data, trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import Precision
from torch import nn

import lightning_normcheck.norms as N
from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks._emission import TOTAL_KEY
from lightning_normcheck.callbacks._run import _Run

STEPS = 12


class Spy:
    """Counts calls to torch's clipping functions (looked up at call time by Lightning and by NormCheck) and keeps
    the totals ``clip_grad_norm_`` returns."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clip_grad_norm = 0
        self.with_norm = 0
        self.totals: list[float] = []
        utils = torch.nn.utils
        clip_grad_norm_, clip_grads_with_norm_ = utils.clip_grad_norm_, utils.clip_grads_with_norm_

        def norm_spy(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.clip_grad_norm += 1
            total = clip_grad_norm_(*args, **kwargs)
            self.totals.append(float(total))
            return total

        def with_norm_spy(*args: Any, **kwargs: Any) -> None:
            self.with_norm += 1
            clip_grads_with_norm_(*args, **kwargs)

        monkeypatch.setattr(utils, "clip_grad_norm_", norm_spy)
        monkeypatch.setattr(utils, "clip_grads_with_norm_", with_norm_spy)

    def reset(self) -> None:
        self.clip_grad_norm = self.with_norm = 0
        self.totals = []


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    yield Spy(monkeypatch)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def compare(
    spy: Spy,
    make: Callable[[], L.LightningModule],
    clip: float,
    steps: int = STEPS,
    reused: bool = True,
    plugins: Callable[[], list[Any]] | None = None,
    **kw: Any,
) -> tuple[L.LightningModule, L.Trainer]:
    """Fit ``make()`` without and with NormCheck; assert identical weights, that clipping acted on most steps and
    that NormCheck's run clipped with its own total (``reused``) or left every clip to Lightning."""
    data = loader(regression_data(256), batch_size=16)
    torch.manual_seed(0)
    plain = make()
    if plugins is not None:
        kw["plugins"] = plugins()
    fit(plain, data, [], max_steps=steps, gradient_clip_val=clip, **kw)
    assert spy.clip_grad_norm == steps and spy.with_norm == 0
    clipped = sum(t > clip for t in spy.totals)
    assert clipped >= 0.75 * steps, spy.totals  # the threshold really clips
    spy.reset()
    torch.manual_seed(0)
    model = make()
    cb = NormCheck(print_summary=False)
    if plugins is not None:
        kw["plugins"] = plugins()
    t = fit(model, data, [cb], max_steps=steps, gradient_clip_val=clip, **kw)
    assert cb.disabled_monitors == []
    if reused:
        assert (spy.clip_grad_norm, spy.with_norm) == (0, steps)
    else:
        assert (spy.clip_grad_norm, spy.with_norm) == (steps, 0)
    a, b = state_of(plain), state_of(model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs with NormCheck attached"
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)
    return model, t


class TotalProbe(Callback):
    """After NormCheck: ``get_total_norm`` of the gradients (read only) and the loss, every optimizer step."""

    def __init__(self) -> None:
        self.totals: list[float] = []
        self.losses: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.totals.append(float(torch.nn.utils.get_total_norm(grads)))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.losses.append(float(trainer.callback_metrics.get("train_loss", torch.nan)))


class Logged(LitModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss)
        return loss


def test_plain_mlp_is_identical_learns_and_logs_the_exact_pre_clip_total(spy: Spy) -> None:
    compare(spy, lambda: LitModel(mlp(width=64), lr=0.05), clip=0.3)
    # the logged total is torch's own get_total_norm of the gradients before the clip, to the last bit
    spy.reset()
    probe, log = TotalProbe(), MemLogger()
    model = Logged(mlp(width=64), lr=0.2)
    data = loader(regression_data(256), batch_size=16)
    fit(model, data, [NormCheck(print_summary=False), probe], max_steps=40, gradient_clip_val=0.3, logger=log)
    assert spy.with_norm == 40 and spy.clip_grad_norm == 0
    logged = {s: row[TOTAL_KEY] for s, row in log.rows if TOTAL_KEY in row}
    assert sorted(logged) == list(range(40))
    assert [logged[s] for s in range(40)] == probe.totals
    assert sum(t > 0.3 for t in probe.totals) >= 30
    assert probe.losses[-1] < 0.5 * probe.losses[0]  # a healthy run that learns


class SmallStack(nn.Module):
    """Ten residual blocks of (LayerNorm, Linear) at width 16: 40 tensors of 16 or 256 elements."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.Tanh()) for _ in range(10))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.head(h)


def test_many_small_tensors_of_one_shape_are_identical(spy: Spy) -> None:
    net = SmallStack()
    plan = N.norm_plan(list(net.parameters()))
    assert plan is not None and plan.groups  # without clipping, NormCheck would stack these by shape
    compare(spy, lambda: LitModel(SmallStack(), lr=0.05), clip=0.2)


def test_gradient_accumulation_is_identical(spy: Spy) -> None:
    compare(spy, lambda: LitModel(mlp(width=32), lr=0.05), clip=0.2, accumulate_grad_batches=2)


class TwoGroupsFrozen(LitModel):
    """Two parameter groups with their own learning rates; the first layer frozen (its gradients stay None)."""

    def __init__(self) -> None:
        super().__init__(mlp(width=32), lr=0.05)
        for p in self.net[0].parameters():
            p.requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        head = list(self.net[-1].parameters())
        body = [p for p in self.net.parameters() if all(p is not h for h in head)]
        return torch.optim.SGD([{"params": body}, {"params": head, "lr": 0.01}], lr=0.05, momentum=0.9)


def test_two_parameter_groups_and_frozen_parameters_are_identical(spy: Spy) -> None:
    model, _ = compare(spy, TwoGroupsFrozen, clip=0.2)
    assert all(p.grad is None for p in model.net[0].parameters())


def test_bf16_mixed_is_identical(spy: Spy) -> None:
    compare(spy, lambda: LitModel(mlp(width=32), lr=0.05), clip=0.2, precision="bf16-mixed")


def test_fp16_with_a_grad_scaler_is_identical(spy: Spy) -> None:
    """Gradients unscaled by the GradScaler before the hooks; steps with non-finite gradients (skipped by the
    scaler) are clipped alike too."""
    fp16 = lambda: [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]  # noqa: E731
    compare(spy, lambda: LitModel(mlp(width=32), lr=0.05), clip=0.2, plugins=fp16)


class ScalesGradients(LitModel):
    """Its own ``on_before_optimizer_step`` (after every callback's) halves the gradients in place."""

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(0.5)


def test_gradients_changed_after_the_measurement_fall_back(spy: Spy) -> None:
    compare(spy, lambda: ScalesGradients(mlp(width=32), lr=0.05), clip=0.1, reused=False)


class ClipsByHand(LitModel):
    """Clips by norm in its own ``configure_gradient_clipping`` (the Trainer has no ``gradient_clip_val``)."""

    def __init__(self, by_value_first: bool = False) -> None:
        super().__init__(mlp(width=32), lr=0.05)
        self.by_value_first = by_value_first

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        if self.by_value_first:  # changes the gradients in place before the clip by norm
            self.clip_gradients(optimizer, gradient_clip_val=0.05, gradient_clip_algorithm="value")
        self.clip_gradients(optimizer, gradient_clip_val=0.2, gradient_clip_algorithm="norm")


@pytest.mark.parametrize("by_value_first", [False, True])
def test_a_clip_by_norm_in_configure_gradient_clipping(spy: Spy, by_value_first: bool) -> None:
    """The first clip finds gradients measured NormCheck's usual way and is Lightning's; from the next step they
    are measured as torch does and reused, unless a clip by value changed them in between."""
    data = loader(regression_data(256), batch_size=16)
    torch.manual_seed(0)
    plain = ClipsByHand(by_value_first)
    fit(plain, data, [], max_steps=STEPS)
    assert spy.clip_grad_norm == STEPS and sum(t > 0.2 for t in spy.totals) >= 0.75 * STEPS
    spy.reset()
    torch.manual_seed(0)
    model = ClipsByHand(by_value_first)
    fit(model, data, [NormCheck(print_summary=False)], max_steps=STEPS)
    expected = (STEPS, 0) if by_value_first else (1, STEPS - 1)
    assert (spy.clip_grad_norm, spy.with_norm) == expected
    a, b = state_of(plain), state_of(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


class ManualClip(LitModel):
    """Manual optimization that clips with ``self.clip_gradients`` before ``opt.step()`` (before NormCheck's hook)."""

    def __init__(self) -> None:
        super().__init__(mlp(width=32), lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        opt.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        self.clip_gradients(opt, gradient_clip_val=0.1, gradient_clip_algorithm="norm")  # type: ignore[arg-type]
        opt.step()  # type: ignore[union-attr]


def test_manual_optimization_clips_its_own_way(spy: Spy) -> None:
    data = loader(regression_data(256), batch_size=16)
    torch.manual_seed(0)
    plain = ManualClip()
    fit(plain, data, [], max_steps=STEPS)
    assert spy.clip_grad_norm == STEPS and sum(t > 0.1 for t in spy.totals) >= 0.75 * STEPS
    spy.reset()
    torch.manual_seed(0)
    model = ManualClip()
    fit(model, data, [NormCheck(print_summary=False)], max_steps=STEPS)
    assert (spy.clip_grad_norm, spy.with_norm) == (STEPS, 0)
    a, b = state_of(plain), state_of(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_gradients_are_read_once_per_step(spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch._foreach_norm`` over the gradients: once per step with NormCheck (Lightning's own clip alone reads
    them once too), where a callback that measures the total by itself makes it twice."""
    foreach_norm = torch._foreach_norm
    model = LitModel(mlp(width=64), lr=0.05)
    first = model.net[0].weight
    passes: list[int] = []

    def counting(tensors: Any, *args: Any, **kwargs: Any) -> Any:
        if tensors and first.grad is not None and tensors[0] is first.grad:
            passes.append(int(model.trainer.global_step))
        return foreach_norm(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    data = loader(regression_data(256), batch_size=16)
    fit(model, data, [NormCheck(print_summary=False)], max_steps=STEPS, gradient_clip_val=0.3)
    assert passes == list(range(STEPS))
    assert (spy.clip_grad_norm, spy.with_norm) == (0, STEPS)
    passes.clear()
    model = LitModel(mlp(width=64), lr=0.05)
    first = model.net[0].weight
    fit(model, data, [TotalProbe()], max_steps=STEPS, gradient_clip_val=0.3)
    assert passes == sorted(list(range(STEPS)) * 2)


class Installed(Callback):
    """Records, at every batch, whether a ``clip_grad_by_norm`` is set on the precision plugin instance."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.seen.append("clip_grad_by_norm" in vars(trainer.precision_plugin))


class FailsAtStep3(LitModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if batch_idx == 3:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


def test_the_plugin_is_restored_after_fit_and_after_an_exception() -> None:
    data = loader(regression_data(256), batch_size=16)
    seen = Installed()
    t = fit(LitModel(mlp()), data, [NormCheck(print_summary=False), seen], max_steps=5, gradient_clip_val=0.3)
    assert seen.seen == [True] * 5
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)
    assert type(t.precision_plugin).clip_grad_by_norm is Precision.clip_grad_by_norm

    seen = Installed()
    L.seed_everything(0, verbose=False)
    t = trainer([NormCheck(print_summary=False), seen], max_steps=10, gradient_clip_val=0.3)
    with pytest.raises(RuntimeError, match="boom"):
        t.fit(FailsAtStep3(mlp()), data)
    assert seen.seen == [True] * 4
    assert "clip_grad_by_norm" not in vars(t.precision_plugin)


def test_a_failure_in_the_reuse_is_said_once_and_lightning_clips(spy: Spy, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Any, optimizer: Any) -> None:
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(_Run, "current_grad_stats", broken)
    data = loader(regression_data(256), batch_size=16)
    torch.manual_seed(0)
    plain = LitModel(mlp())
    fit(plain, data, [], max_steps=5, gradient_clip_val=0.3)
    spy.reset()
    torch.manual_seed(0)
    model, seen, cb = LitModel(mlp()), Installed(), NormCheck(print_summary=False)
    with pytest.warns(RuntimeWarning, match="reusing the measured gradient norm for clipping failed") as caught:
        fit(model, data, [cb, seen], max_steps=5, gradient_clip_val=0.3)
    assert len([w for w in caught if "reusing" in str(w.message)]) == 1
    assert seen.seen == [True, False, False, False, False]  # removed at the first clip
    assert (spy.clip_grad_norm, spy.with_norm) == (5, 0) and cb.disabled_monitors == []
    a, b = state_of(plain), state_of(model)
    assert all(torch.equal(a[k], b[k]) for k in a)


class OwnClip(Precision):
    """A precision plugin that clips by norm its own way (as FSDP's does): left alone."""

    def __init__(self) -> None:
        self.calls = 0

    def clip_grad_by_norm(self, optimizer: torch.optim.Optimizer, clip_val: int | float) -> None:
        self.calls += 1
        super().clip_grad_by_norm(optimizer, clip_val)


def test_a_plugin_that_clips_its_own_way_is_left_alone(spy: Spy) -> None:
    plugin = OwnClip()
    seen = Installed()
    data = loader(regression_data(256), batch_size=16)
    fit(
        LitModel(mlp()),
        data,
        [NormCheck(print_summary=False), seen],
        max_steps=5,
        gradient_clip_val=0.3,
        plugins=[plugin],
    )
    assert seen.seen == [False] * 5 and plugin.calls == 5
    assert (spy.clip_grad_norm, spy.with_norm) == (5, 0)


DDP_SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_clip.py"


@pytest.mark.slow
def test_ddp_two_processes_are_identical(tmp_path: Path) -> None:
    """Each rank clips the all-reduced gradients with its own measured total: the same weights as DDP without
    NormCheck, on both ranks."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    for mode in ("plain", "normcheck"):
        proc = subprocess.run(
            [sys.executable, str(DDP_SCRIPT), str(tmp_path), mode], capture_output=True, text=True, timeout=300, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    steps = 8
    for rank in (0, 1):
        plain = json.loads((tmp_path / f"plain{rank}.json").read_text())
        watched = json.loads((tmp_path / f"normcheck{rank}.json").read_text())
        assert (plain["clip_grad_norm_"], plain["clip_grads_with_norm_"]) == (steps, 0)
        assert sum(t > 0.2 for t in plain["totals"]) >= 6  # the threshold clips
        assert (watched["clip_grad_norm_"], watched["clip_grads_with_norm_"]) == (0, steps)
        assert not watched["left_installed"]
        a = torch.load(tmp_path / f"plain{rank}.pt")
        b = torch.load(tmp_path / f"normcheck{rank}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a)
