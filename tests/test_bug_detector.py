"""TrainingBugDetector: a real buggy run and a healthy look-alike for every bug, on tiny CPU models."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, bad, classification_data, codes, fit, loader, mlp, regression_data
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn import functional as F

from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks import _graph as G
from lightning_normcheck.callbacks.training_bug_detector import TrainingBugDetector, _make_monitor
from lightning_normcheck.diagnosis.thresholds import BugThresholds, Thresholds


def detector() -> TrainingBugDetector:
    return TrainingBugDetector(print_summary=False)


def finding(cb: TrainingBugDetector, code: str) -> Any:
    found = [f for f in cb.findings if f.code == code and f.severity in ("warning", "error")]
    assert found, f"no {code} finding; got {[(f.code, f.severity) for f in cb.findings]}"
    return found[0]


# missing_zero_grad ------------------------------------------------------------------------------------------
class NoZeroGrad(LitModel):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # the bug: gradients are never cleared


class ManualModel(LitModel):
    """Manual optimization; ``zero_grad``, accumulation ``k`` and division are switches."""

    def __init__(self, zero_grad: bool = True, k: int = 1, divide: bool = True, steps_per_batch: int = 1) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False
        self.zero, self.k, self.divide, self.steps_per_batch = zero_grad, k, divide, steps_per_batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.manual_backward(loss / self.k if self.divide and self.k > 1 else loss)
        if (batch_idx + 1) % self.k == 0:
            for _ in range(self.steps_per_batch):
                opt.step()
            if self.zero:
                opt.zero_grad()
        return loss


def test_missing_zero_grad_automatic() -> None:
    cb = detector()
    fit(NoZeroGrad(mlp()), loader(regression_data()), [cb], max_steps=6)
    f = finding(cb, "missing_zero_grad")
    assert f.severity == "error" and f.step <= 2
    assert "zero_grad" in f.message and "norm" in f.message


def test_missing_zero_grad_under_accumulation_and_healthy_accumulation() -> None:
    buggy = detector()
    fit(NoZeroGrad(mlp()), loader(regression_data()), [buggy], max_steps=4, accumulate_grad_batches=2)
    assert "missing_zero_grad" in codes(buggy.findings)
    healthy = detector()  # summing inside one accumulation window is legitimate
    fit(LitModel(mlp()), loader(regression_data()), [healthy], max_steps=4, accumulate_grad_batches=2)
    assert bad(healthy.findings) == []


def test_missing_zero_grad_manual_and_healthy_manual() -> None:
    buggy = detector()
    fit(ManualModel(zero_grad=False), loader(regression_data()), [buggy], max_steps=6)
    f = finding(buggy, "missing_zero_grad")
    assert f.step <= 2
    healthy = detector()
    fit(ManualModel(), loader(regression_data()), [healthy], max_steps=6)
    assert bad(healthy.findings) == []


def test_missing_zero_grad_numbers_match_an_independent_computation() -> None:
    """The reported stale norm is the norm of the watched gradients left over from the previous step."""
    model = ManualModel(zero_grad=False)
    seen: list[float] = []

    class Spy(Callback):
        def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
            w = [p for p in pl_module.parameters()]
            watched = w[:2] + w[-2:]
            if all(p.grad is not None for p in watched):
                seen.append(min(float(p.grad.norm()) for p in watched))  # smallest left-over gradient

    cb = detector()
    fit(model, loader(regression_data()), [Spy(), cb], max_steps=3)
    f = finding(cb, "missing_zero_grad")
    assert seen and f.value == pytest.approx(seen[0], rel=1e-4)


# double_optimizer_step ---------------------------------------------------------------------------------------
class ExtraStep(Callback):
    """Another callback calling the torch optimizer directly: no Lightning hook fires for it."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        trainer.optimizers[0].step()


def test_double_step_manual_twice() -> None:
    cb = detector()
    fit(ManualModel(steps_per_batch=2), loader(regression_data()), [cb], max_steps=8)
    f = finding(cb, "double_optimizer_step")
    assert f.severity == "error" and f.step <= 4
    assert "training_step" in f.message


def test_double_step_from_another_callback() -> None:
    cb = detector()
    fit(LitModel(mlp(), optimizer="adam"), loader(regression_data()), [ExtraStep(), cb], max_steps=6)
    f = finding(cb, "double_optimizer_step")
    assert "directly" in f.message and f.step <= 2


class NestedStep(Callback):
    """A raw step inside Lightning's own step (from on_before_optimizer_step): the outer one is extra."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        optimizer.step()


class StepBeforeBackward(Callback):
    """A step between forward and backward (Lightning zeroes grads there): training raises."""

    def on_before_zero_grad(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        optimizer.step()


def test_double_step_nested_and_when_it_makes_training_raise() -> None:
    cb = detector()
    fit(LitModel(mlp()), loader(regression_data()), [NestedStep(), cb], max_steps=6)
    assert "directly" in finding(cb, "double_optimizer_step").message
    cb = detector()
    with pytest.raises(RuntimeError, match="inplace"):
        fit(LitModel(mlp()), loader(regression_data()), [StepBeforeBackward(), cb], max_steps=6)
    f = finding(cb, "double_optimizer_step")
    assert "Training then raised" in f.message
    assert "hidden_state_not_detached" not in codes(cb.findings)  # the extra step explains the error


def test_double_step_threshold_reaches_the_rules() -> None:
    """BugThresholds given to the callback decide: 6 raw extra steps stay below double_step_min=10."""
    cb = TrainingBugDetector(print_summary=False, thresholds=Thresholds(bugs=BugThresholds(double_step_min=10)))
    fit(LitModel(mlp(), optimizer="adam"), loader(regression_data()), [ExtraStep(), cb], max_steps=6)
    assert "double_optimizer_step" not in codes(cb.findings)


def test_healthy_skipped_batches() -> None:
    """training_step returning None skips backward; Lightning still calls step() (with no gradients)."""

    class Skipping(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    cb = detector()
    fit(Skipping(mlp(), optimizer="adam"), loader(regression_data()), [cb], max_steps=8)
    assert bad(cb.findings) == []


class GAN(L.LightningModule):
    """Two optimizers alternating every batch (manual optimization), each stepping once."""

    def __init__(self, n_critic: int = 1) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.g = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))
        self.d = nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        self.n_critic = n_critic

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(x.shape[0], 4)
        # generator (no toggling: its backward also reaches the discriminator's parameters)
        if batch_idx % self.n_critic == 0:
            g_loss = F.softplus(-self.d(self.g(z))).mean()
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
        # discriminator, DCGAN style: real and fake losses backpropagated one after the other, not divided
        opt_d.zero_grad()
        real, fake = self.d(x), self.d(self.g(z).detach())
        self.manual_backward(F.binary_cross_entropy_with_logits(real, torch.ones_like(real)))
        self.manual_backward(F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
        opt_d.step()

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.g.parameters(), 1e-3), torch.optim.Adam(self.d.parameters(), 1e-3)


def test_healthy_gan_alternation_and_n_critic() -> None:
    for n_critic in (1, 3):
        cb = detector()
        fit(GAN(n_critic), loader(regression_data()), [cb], max_steps=12)
        assert bad(cb.findings) == [], n_critic


class LBFGSModel(LitModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_healthy_lbfgs_and_lr_scheduler() -> None:
    cb = detector()
    fit(LBFGSModel(mlp()), loader(regression_data()), [cb], max_steps=4)
    assert bad(cb.findings) == []

    class Scheduled(LitModel):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)}

    cb = detector()
    fit(Scheduled(mlp()), loader(regression_data()), [cb], max_steps=6)
    assert bad(cb.findings) == []


# loss_sum_reduction ------------------------------------------------------------------------------------------
def sum_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, y, reduction="sum")


def features_sum_batch_mean(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum(dim=1).mean()


def sum_over_batch_size(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((pred - y) ** 2).sum() / pred.shape[0]


@pytest.mark.parametrize(
    "loss,data,summed",
    [
        (sum_mse, "reg", True),
        (lambda p, y: F.cross_entropy(p, y, reduction="sum"), "cls", True),
        (lambda p, y: ((p - y) ** 2).sum(), "reg", True),
        (features_sum_batch_mean, "reg", False),
        (sum_over_batch_size, "reg", False),
        (F.cross_entropy, "cls", False),
    ],
    ids=["mse_sum", "ce_sum", "hand_sum", "feature_sum_batch_mean", "sum_div_batch", "ce_mean"],
)
def test_loss_sum_reduction(loss: Any, data: str, summed: bool) -> None:
    if data == "cls":
        model, ds = LitModel(mlp(d_out=4), loss=loss, lr=1e-3), classification_data()
    else:
        model, ds = LitModel(mlp(d_out=3), loss=loss, lr=1e-3), _multi_target()
    cb = detector()
    fit(model, loader(ds, batch_size=16), [cb], max_steps=4)
    if summed:
        f = finding(cb, "loss_sum_reduction")
        assert f.value == pytest.approx(1.0, abs=0.02) and f.step <= 2
        assert "reduction='mean'" in f.message
    else:
        assert bad(cb.findings) == []


def _multi_target() -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(128, 8, generator=g)
    return torch.utils.data.TensorDataset(x, x[:, :3] * 2 + 0.1 * torch.randn(128, 3, generator=g))


def test_probe_ratio_matches_independent_computation() -> None:
    """The reported ratio equals loss(both)/(loss(A)+loss(B)) computed here, by hand, on the first batch."""
    torch.manual_seed(0)
    model = LitModel(mlp(d_out=3), loss=sum_mse, lr=0.0)  # lr 0: the weights stay those at the probe
    ds = _multi_target()
    cb = detector()
    fit(model, loader(ds, batch_size=10), [cb], max_steps=3)
    f = finding(cb, "loss_sum_reduction")
    x, y = ds.tensors[0][:8], ds.tensors[1][:8]
    with torch.no_grad():
        a, b, full = (sum_mse(model(x[s]), y[s]).item() for s in (slice(0, 4), slice(4, 8), slice(0, 8)))
    assert f.extra["ratios"][0] == pytest.approx(full / (a + b), rel=1e-4)


class BNDropNet(LitModel):
    def __init__(self, loss: Any = None, log_it: bool = True, lr: float = 0.05) -> None:
        net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 1))
        super().__init__(net, loss=loss, lr=lr)
        self.log_it = log_it
        self.calls = 0
        self.outputs: list[torch.Tensor] = []
        self.register_buffer("seen", torch.zeros(()))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        batch[0].mul_(1.5)  # edits its batch in place (an in-place augmentation)
        self.calls += 1
        self.seen += batch[0].shape[0]  # in place, like a torchmetrics state
        loss = super().training_step(batch, batch_idx)
        self.outputs.append(loss.detach())
        if self.log_it:
            self.log("train_loss", loss)
        return loss


def test_probe_leaves_training_bit_identical() -> None:
    """Weights after N steps with and without the detector are bit-identical (Dropout, BatchNorm, self.log)."""
    base = BNDropNet(loss=sum_mse, lr=1e-3)  # summed: the probe runs on 3 batches and reports
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    t_plain = fit(a, loader(regression_data(), batch_size=16), [], max_steps=6)
    cb = detector()
    t_probe = fit(b, loader(regression_data(), batch_size=16), [cb], max_steps=6)
    assert "loss_sum_reduction" in codes(cb.findings)  # the probe did run
    for (n, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.isfinite(pa).all() and torch.equal(pa, pb), n  # parameters and BatchNorm running stats
    assert a.calls == b.calls and len(a.outputs) == len(b.outputs)  # attributes restored after the probe
    assert set(t_plain.callback_metrics) == set(t_probe.callback_metrics) == {"train_loss"}
    assert torch.equal(t_plain.callback_metrics["train_loss"], t_probe.callback_metrics["train_loss"])


def test_healthy_bn_dropout_mean_and_forward_twice() -> None:
    cb = detector()
    fit(BNDropNet(), loader(regression_data(), batch_size=16), [cb], max_steps=6)
    assert bad(cb.findings) == []

    class Twice(LitModel):  # forward runs several times per step (two views, one loss)
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return 0.5 * (F.mse_loss(self(x), y) + F.mse_loss(self(x + 0.01), y))

    cb = detector()
    fit(Twice(mlp()), loader(regression_data()), [cb], max_steps=6)
    assert bad(cb.findings) == []


def test_probe_with_training_step_without_batch_idx() -> None:
    class NoIdx(LitModel):
        def training_step(self, batch: Any) -> torch.Tensor:  # type: ignore[override]
            return sum_mse(self(batch[0]), batch[1])

    cb = detector()
    fit(NoIdx(mlp(), lr=1e-3), loader(regression_data()), [cb], max_steps=3)
    assert "loss_sum_reduction" in codes(cb.findings)


PROBE_CALLS: list[int] = []  # module level: the probe restores the model's own list attributes


def test_probe_runs_on_max_loss_probes_batches_after_the_verdict_too() -> None:
    """The monitor probes its first max_loss_probes batches; the rules decide at the second agreeing one."""

    class Counting(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if not torch.is_grad_enabled():
                PROBE_CALLS.append(batch_idx)  # the probe: half A, half B, both
            return super().training_step(batch, batch_idx)

    PROBE_CALLS.clear()
    cb = detector()
    fit(Counting(mlp(), loss=sum_mse, lr=1e-3), loader(regression_data()), [cb], max_steps=6)
    assert PROBE_CALLS == [0, 0, 1, 1, 2, 2]
    f = finding(cb, "loss_sum_reduction")
    assert (f.step, f.since, len(f.extra["ratios"])) == (1, 0, 2)
    # a batch of odd size: the halves leave a sample out, so both halves together are run too
    PROBE_CALLS.clear()
    odd = TrainingBugDetector(max_loss_probes=2, print_summary=False)
    fit(Counting(mlp(), loss=sum_mse, lr=1e-3), loader(regression_data(), batch_size=15), [odd])
    assert PROBE_CALLS == [0, 0, 0, 1, 1, 1]
    assert finding(odd, "loss_sum_reduction").step == 1


def test_graph_helpers() -> None:
    """The autograd-graph helpers moved to callbacks/_graph.py, on real graphs."""
    x = torch.ones(3, requires_grad=True)
    base = (x**2).mean()
    assert G.loss_scale_factor(base.grad_fn) == 1.0
    assert G.loss_scale_factor((base / 4).grad_fn) == pytest.approx(0.25)
    assert G.loss_scale_factor((0.5 * base).grad_fn) == pytest.approx(0.5)
    assert G.loss_scale_factor((base / 4 + base / 2).grad_fn) == pytest.approx(0.5)  # the largest term
    assert G.loss_scale_factor((base / x.sum()).grad_fn) is None  # a divisor that requires grad
    assert G.graph_signature((x**2).mean().grad_fn) == G.graph_signature(base.grad_fn)
    assert G.graph_signature(x.abs().mean().grad_fn) != G.graph_signature(base.grad_fn)
    old = torch.tanh(x)  # built before the marker: a state from an earlier batch
    marker = (torch.zeros((), requires_grad=True) * 1.0).grad_fn._sequence_nr()  # type: ignore[union-attr]
    carried, fresh = (old * 2).sum(), (x * 2).sum()
    assert type(G.oldest_node(carried.grad_fn, marker)).__name__ == "TanhBackward0"
    assert G.oldest_node(fresh.grad_fn, marker) is None  # the leaf's AccumulateGrad never matches
    assert G.split_batch((torch.arange(6), ["a", "b", "c", "d", "e", "f"]))[1][1] == ["d", "e", "f"]  # type: ignore[index]


def test_unsplittable_batch_is_skipped() -> None:
    class Dictionary(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return sum_mse(self(batch["x"]), batch["y"])

    ds = regression_data(64)
    data = [{"x": ds.tensors[0][i], "y": ds.tensors[1][i]} for i in range(64)]
    cb = detector()
    fit(Dictionary(mlp()), loader(data), [cb], max_steps=4)  # type: ignore[arg-type]  # dict batches split
    assert "loss_sum_reduction" in codes(cb.findings)
    assert G.split_batch({"x": torch.zeros(4, 2), "y": torch.zeros(3)}) is None
    assert G.split_batch(torch.zeros(3, 2)) is None  # halves of one sample: BatchNorm could not take them


# accumulation_not_averaged -------------------------------------------------------------------------------------
def test_manual_accumulation_not_averaged_and_averaged() -> None:
    buggy = detector()
    fit(ManualModel(k=4, divide=False), loader(regression_data()), [buggy], max_steps=2)
    f = finding(buggy, "accumulation_not_averaged")
    assert "k=4" in f.message and f.value == 4.0
    healthy = detector()
    fit(ManualModel(k=4, divide=True), loader(regression_data()), [healthy], max_steps=2)
    assert bad(healthy.findings) == []


class ChunkAccumulation(LitModel):
    """Manual accumulation inside one training_step: k chunks of the batch, one backward each."""

    def __init__(self, divide: bool, two_losses: bool = False) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False
        self.divide, self.two_losses = divide, two_losses

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        if self.two_losses:  # two different objectives backpropagated one after the other: not accumulation
            out = self(x)
            self.manual_backward(F.mse_loss(out, y), retain_graph=True)
            self.manual_backward(out.abs().mean() * 1e-3)
        else:
            for xc, yc in zip(x.chunk(4), y.chunk(4)):
                loss = F.mse_loss(self(xc), yc)
                self.manual_backward(loss / 4 if self.divide else loss)
        opt.step()


def test_accumulation_inside_one_training_step() -> None:
    buggy = detector()
    fit(ChunkAccumulation(divide=False), loader(regression_data()), [buggy], max_steps=4)
    f = finding(buggy, "accumulation_not_averaged")
    assert "k=4" in f.message and "parts of one batch" in f.message
    for kwargs in ({"divide": True}, {"divide": False, "two_losses": True}):
        healthy = detector()
        fit(ChunkAccumulation(**kwargs), loader(regression_data()), [healthy], max_steps=4)
        assert bad(healthy.findings) == [], kwargs


class ManualLBFGS(LitModel):
    def __init__(self) -> None:
        super().__init__(mlp())
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        x, y = batch

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.mse_loss(self(x), y)
            self.manual_backward(loss)
            return loss

        opt.step(closure=closure)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=4)


def test_healthy_manual_lbfgs_closure() -> None:
    cb = detector()
    fit(ManualLBFGS(), loader(regression_data()), [cb], max_steps=4)
    assert bad(cb.findings) == []


# hidden_state_not_detached ---------------------------------------------------------------------------------------
def sequence_data(n: int = 64, t: int = 6, d: int = 4) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, t, d, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(dim=(1, 2), keepdim=False)[:, None])


class Stateful(L.LightningModule):
    """An LSTM whose state is carried from batch to batch (stateful TBPTT)."""

    def __init__(self, detach: bool, retain_graph: bool = False, kind: str = "lstm") -> None:
        super().__init__()
        self.kind = kind
        if kind == "cell":
            self.rnn: nn.Module = nn.LSTMCell(4, 8)
        else:
            self.rnn = (nn.LSTM if kind == "lstm" else nn.GRU)(4, 8, batch_first=True)
        self.head = nn.Linear(8, 1)
        self.detach, self.retain_graph = detach, retain_graph
        self.hidden: Any = None
        if retain_graph:
            self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.hidden is not None and self.detach:
            self.hidden = (
                tuple(h.detach() for h in self.hidden) if isinstance(self.hidden, tuple) else self.hidden.detach()
            )
        if self.kind == "cell":  # a cell looped over time; the state is scaled before use (a new graph node)
            state = None if self.hidden is None else tuple(0.9 * h for h in self.hidden)
            for t in range(x.shape[1]):
                state = self.rnn(x[:, t], state)
            self.hidden, last = state, state[0]
        else:
            out, self.hidden = self.rnn(x, self.hidden)
            last = out[:, -1]
        loss = F.mse_loss(self.head(last), y)
        if self.retain_graph:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss, retain_graph=True)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("retain_graph", [False, True], ids=["second_time", "inplace"])
def test_hidden_state_not_detached_raises_and_is_explained(retain_graph: bool) -> None:
    cb = detector()
    with pytest.raises(RuntimeError, match="second time|inplace"):
        fit(Stateful(detach=False, retain_graph=retain_graph), loader(sequence_data()), [cb], max_steps=6)
    f = finding(cb, "hidden_state_not_detached")
    assert f.layer == "rnn" and f.severity == "error"
    assert "batch 1" in f.message and "detach" in f.message
    assert "Training then raised" in f.message  # tied to the exception


def test_hidden_state_not_detached_cell_loop() -> None:
    """An LSTMCell looped over time, the carried state rescaled first: found at the first call of batch 1."""
    cb = detector()
    with pytest.raises(RuntimeError, match="second time|inplace"):
        fit(Stateful(detach=False, kind="cell"), loader(sequence_data()), [cb], max_steps=6)
    f = finding(cb, "hidden_state_not_detached")
    assert f.layer == "rnn" and "built during batch 0" in f.message


def test_hidden_state_detached_tbptt_is_healthy() -> None:
    for kind in ("lstm", "gru", "cell"):
        cb = detector()
        fit(Stateful(detach=True, kind=kind), loader(sequence_data()), [cb], max_steps=6)
        assert bad(cb.findings) == [], kind


def test_exception_without_rnn_hook_still_explained() -> None:
    """A carried state the pre-hook cannot see (a hand-written cell) is still explained from the exception."""

    class Cell(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Linear(4, 4)
            self.state: torch.Tensor | None = None

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x = batch[0][:, 0]
            self.state = torch.tanh(self.w(x) + (self.state if self.state is not None else 0))
            return self.state.pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    cb = detector()
    with pytest.raises(RuntimeError, match="second time"):
        fit(Cell(), loader(sequence_data()), [cb], max_steps=4)
    f = finding(cb, "hidden_state_not_detached")
    assert f.layer is None and "detach" in f.message


# wiring -----------------------------------------------------------------------------------------------------------
def test_arguments_validated_and_normcheck_wiring() -> None:
    with pytest.raises(ValueError, match="max_loss_probes"):
        TrainingBugDetector(max_loss_probes=1)
    with pytest.raises(TypeError, match="loss_probe"):
        _make_monitor("NormCheck", loss_probe="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NormCheck.*max_loss_probes"):
        NormCheck(max_loss_probes=0)
    off = NormCheck(loss_probe=False, print_summary=False)
    fit(LitModel(mlp(), loss=sum_mse, lr=1e-3), loader(regression_data()), [off], max_steps=4)
    assert "loss_sum_reduction" not in codes(off.findings)
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), loss=sum_mse, lr=1e-3), loader(regression_data()), [cb], max_steps=4)
    assert "loss_sum_reduction" in codes(cb.findings)


def test_no_host_sync_on_unsampled_steps_manual_and_rnn(monkeypatch: pytest.MonkeyPatch) -> None:
    """Manual accumulation (graph reads) and an RNN (pre-hooks): no host read from the package off sampled steps."""
    import sys

    step: list[int | None] = [None]
    events: list[tuple[int | None, str]] = []

    class Where(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
            step[0] = trainer.global_step

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: Any, _o: Any = original, _n: str = name, **k: Any) -> Any:
            f = sys._getframe(1)
            while f is not None:
                if f.f_globals.get("__name__", "").startswith("lightning_normcheck"):
                    events.append((step[0], _n))
                    break
                f = f.f_back
            return _o(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    for model in (ManualModel(k=2, divide=True), Stateful(detach=True)):
        events.clear()
        fit(
            model,
            loader(regression_data(512) if isinstance(model, ManualModel) else sequence_data(512)),
            [Where(), TrainingBugDetector(print_summary=False, log_every_n_steps=10)],
            max_steps=26,
        )
        off = [(s, n) for s, n in events if s is not None and s >= 20 and s % 10]
        assert off == [], off
