"""A catalog of small real Lightning training runs on CPU: planted norm pathologies and healthy look-alikes.

Each :class:`Scenario` builds a model, a loader and Trainer arguments; :func:`run_scenario` trains it with
``NormCheck()`` (defaults, ``log_every_n_steps=50`` so only the dense early sampling can catch problems
within the first 20 steps) and returns the findings. ``tests/test_scenarios.py`` runs the fast ones;
``benchmarks/scenario_report.py`` runs them all and prints recall and false alarms.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from helpers import LitModel, classification_data, loader, mlp, regression_data, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

PATHOLOGY_CODES = (
    "exploding_activations",
    "vanishing_activations",
    "exploding_gradients",
    "vanishing_gradients",
    "nonfinite_loss",
    "nonfinite_gradients",
    "dead_units",
    "saturated_activations",
    "high_clip_rate",
    "weight_norm_growth",
)


@dataclass
class Scenario:
    """One run: ``expect`` lists the codes that must be found (each as a warning or error); empty: healthy."""

    name: str
    build: Callable[[], tuple[L.LightningModule, DataLoader, dict[str, Any]]]
    expect: tuple[str, ...] = ()
    max_steps: int = 20
    raises: bool = False  # training is expected to raise (findings must still be there)
    fast: bool = True  # part of the default (CI) test run
    layer: str | None = None  # the layer the first expected finding must name, when known
    forbid: tuple[str, ...] = ()  # codes a planted run must not give (the wrong story for this cause)
    learns: float = 0.9  # healthy: the mean loss of the last 5 batches is at most this fraction of the first 5's
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def planted(self) -> bool:
        return bool(self.expect)


@dataclass
class Result:
    scenario: Scenario
    findings: list[Any]
    seconds: float
    exception: BaseException | None
    losses: list[float] = field(default_factory=list)  # each training batch's loss, recorded by the test side

    def learned(self, k: int = 5) -> float:
        """Mean loss of the last ``k`` batches over the mean of the first ``k`` (below 1: the run learns)."""
        finite = [v for v in self.losses if math.isfinite(v)]
        if len(finite) < 2 * k:
            return math.nan
        return (sum(finite[-k:]) / k) / (sum(finite[:k]) / k)


class LossRecorder(L.Callback):
    """Each training batch's loss as the training step returned it (independent of the package)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self.losses.append(float(loss.detach()))


# ---------------------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------------------
def init_mlp(
    depth: int,
    width: int = 32,
    act: type[nn.Module] | None = nn.ReLU,
    gain: float | None = None,
    d_in: int = 8,
    d_out: int = 1,
    scheme: str | None = None,
) -> nn.Sequential:
    """An MLP whose hidden Linear layers get ``std = gain / sqrt(fan_in)`` (or a named scheme) and zero bias."""
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        lin = nn.Linear(d, width)
        if scheme == "kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_normal_(lin.weight)
        elif scheme == "lecun":
            nn.init.normal_(lin.weight, std=1.0 / math.sqrt(d))
        elif gain is not None:
            nn.init.normal_(lin.weight, std=gain / math.sqrt(d))
        if scheme is not None or gain is not None:
            nn.init.zeros_(lin.bias)
        layers.append(lin)
        if act is not None:
            layers.append(act())
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def reg(n: int = 512, batch: int = 32, d: int = 8, seed: int = 0) -> DataLoader:
    return loader(regression_data(n=n, d=d, seed=seed), batch_size=batch, shuffle=True)


def cls(n: int = 512, batch: int = 32, d: int = 8, classes: int = 4) -> DataLoader:
    return loader(classification_data(n=n, d=d, classes=classes), batch_size=batch, shuffle=True)


def _ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out, y)


class Blowup(nn.Module):
    """Multiplies by a huge factor from a given step on (a planted float32 overflow)."""

    def __init__(self, factor: float = 1e30) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


class LogLoss(LitModel):
    """A loss that takes the log of the raw prediction (NaN as soon as it is negative)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return (torch.log(self(x) - 1.0) - y).pow(2).mean()  # the outputs start near 0: log < 0 is NaN


class SqrtLoss(LitModel):
    """MSE plus a sqrt of an exact 0: the loss is finite, its gradient is NaN."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        return nn.functional.mse_loss(out, y) + torch.sqrt((out * 0.0).pow(2).sum())


class CheckedLogLoss(LogLoss):
    """Like LogLoss but the user's own check raises on a non-finite loss."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if not torch.isfinite(loss):
            raise ValueError(f"loss is {loss.item()}")
        return loss


class GroupLR(LitModel):
    """Adam with one layer on its own (far too high) learning rate."""

    def __init__(self, net: nn.Module, hot: str, hot_lr: float, lr: float = 1e-3) -> None:
        super().__init__(net, lr=lr, optimizer="adam")
        self.hot = hot
        self.hot_lr = hot_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hot = [p for n, p in self.net.named_parameters() if n.startswith(self.hot + ".")]
        rest = [p for n, p in self.net.named_parameters() if not n.startswith(self.hot + ".")]
        return torch.optim.Adam([{"params": rest}, {"params": hot, "lr": self.hot_lr}], lr=self.lr)


class ConvNet(nn.Module):
    def __init__(self, bn: bool = True, channels: int = 16, bias: float | None = None, classes: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 1
        for _ in range(3):
            conv = nn.Conv2d(c, channels, 3, padding=1, bias=not bn)
            if bias is not None and conv.bias is not None:
                nn.init.constant_(conv.bias, bias)
            layers += [conv] + ([nn.BatchNorm2d(channels)] if bn else []) + [nn.ReLU()]
            c = channels
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def images(n: int = 256, batch: int = 32, classes: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) * 4 + x[:, 0, 0, 0]).mul(1.5).round().clamp(-1, 2).long() + 1
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


class PreNormBlock(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32, blocks: int = 2, vocab: int = 50) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[PreNormBlock(d) for _ in range(blocks)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.emb(x))))


class LMModel(LitModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def tokens(n: int = 256, seq: int = 12, vocab: int = 50, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    y = (x * 7 + 3) % vocab  # a learnable per-token map
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


class ResidualLN(nn.Module):
    def __init__(self, d_in: int = 8, d: int = 32, blocks: int = 6) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(blocks)
        )
        self.out = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


class SeqModel(L.LightningModule):
    """RNN/LSTM regression on sequences; ``carry`` keeps the hidden state across batches, detached (TBPTT)."""

    def __init__(self, kind: str = "lstm", hidden: int = 32, post_norm: bool = False, carry: bool = False) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}.get(kind, nn.RNN)
        self.rnn = rnn_cls(4, hidden, batch_first=True)
        self.norm = nn.LayerNorm(hidden) if post_norm else nn.Identity()
        self.head = nn.Linear(hidden, 1)
        self.carry = carry
        self.state: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state if self.carry else None
        out, state = self.rnn(x, state)
        if self.carry:
            self.state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
        return self.head(self.norm(out))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def sequences(n: int = 256, seq: int = 20, batch: int = 16) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, seq, 4, generator=g)
    y = x[..., :1].cumsum(1) / math.sqrt(seq)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False, drop_last=True)


class BagModel(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 32) -> None:
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, d, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.emb(x))


def bags(n: int = 256, batch: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 100, (n, 6), generator=g)
    y = (x[:, 0] % 4).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)


class _SGDMomentum(LitModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def dropout_mlp() -> LitModel:
    net = init_mlp(6, width=64, scheme="kaiming", d_out=4)
    layers: list[nn.Module] = []
    for m in net:
        layers.append(m)
        if isinstance(m, nn.ReLU):
            layers.append(nn.Dropout(0.1))
    return _SGDMomentum(nn.Sequential(*layers), loss=_ce, lr=0.02)


def init_std1_mlp() -> nn.Sequential:
    net = mlp(width=32, depth=6)
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=1.0)
    return net


class TwoOptimizers(L.LightningModule):
    """Manual optimization with two optimizers on two nets of very different gradient scales (GAN-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a = init_mlp(3, scheme="kaiming")
        self.b = init_mlp(3, width=64, scheme="kaiming")

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        opt_a, opt_b = self.optimizers()  # type: ignore[misc]
        losses = []
        for net, opt, scale in ((self.a, opt_a, 0.01), (self.b, opt_b, 100.0)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            self.manual_backward(scale * loss)
            opt.step()
            losses.append(loss.detach())
        return sum(losses)  # type: ignore[return-value]  # what both nets have learned (for the test side)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.Adam(self.a.parameters(), lr=1e-3), torch.optim.Adam(self.b.parameters(), lr=1e-3)]


def frozen_mlp() -> LitModel:
    net = init_mlp(4, scheme="kaiming")
    for p in list(net.parameters())[:4]:
        p.requires_grad_(False)
    return LitModel(net, lr=3e-3, optimizer="adam")


class LateDeath(LitModel):
    """At step 6 one bad update (simulated) pushes a hidden layer's pre-activations far below 0."""

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.global_step == 6:
            with torch.no_grad():
                self.net[2].bias.fill_(-20.0)


def dead_bias_mlp() -> LitModel:
    net = init_mlp(3, scheme="kaiming")
    nn.init.constant_(net[2].bias, -6.0)
    return LitModel(net, lr=3e-3, optimizer="adam")


def sigmoid_bias_mlp() -> LitModel:
    net = init_mlp(3, act=nn.Sigmoid, scheme="xavier")
    nn.init.constant_(net[2].bias, 8.0)
    return LitModel(net, lr=3e-3, optimizer="adam")


def blowup_mlp() -> LitModel:
    net = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), Blowup(1e12), nn.ReLU(), Blowup(1e30), nn.Linear(32, 1)
    )
    return LitModel(net, lr=3e-3, optimizer="adam")


def sigmoid_head() -> LitModel:
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 1), nn.Sigmoid())

    def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.binary_cross_entropy(out, (y > 0).float())

    return LitModel(net, loss=bce, lr=3e-2, optimizer="adam")


# ---------------------------------------------------------------------------------------------------------
# the catalog
# ---------------------------------------------------------------------------------------------------------
def _lit(net: nn.Module, **kw: Any) -> LitModel:
    return LitModel(net, **kw)


def data_fault(kind: str, n: int = 640, batch: int = 32) -> DataLoader:
    """Regression data with one data fault: ``raw`` inputs (every column in the thousands), ``prices``
    (targets x1000), ``corrupted`` (one label of 1000 in batch 12; no shuffle so the batch is known)."""
    x, y = regression_data(n=n).tensors
    x, y = x.clone(), y.clone()
    if kind == "raw":
        x = x * 1500.0 + 1000.0
    elif kind == "prices":
        y = y * 1000.0
    elif kind == "corrupted":
        y[12 * batch + 3] = 1000.0
    return loader(TensorDataset(x, y), batch_size=batch, shuffle=kind != "corrupted")


def layernorm_first_mlp() -> nn.Sequential:
    """Linear -> LayerNorm -> ReLU, then plain ReLU layers: the LayerNorm brings raw inputs back to ~1."""
    net = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU())
    for _ in range(2):
        net.extend([nn.Linear(32, 32), nn.ReLU()])
    return net.append(nn.Linear(32, 1))


class NoZeroGrad(LitModel):
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        pass  # the bug: gradients are never cleared


class OneCycleAdamW(LitModel):
    """AdamW with OneCycleLR (warm-up to 1e-2 over the first 30% of the steps): the norm rises ~50x."""

    def __init__(self, net: nn.Module, total_steps: int = 150) -> None:
        super().__init__(net)
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SkipOdd(LitModel):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None if batch_idx % 2 else super().training_step(batch, batch_idx)  # no backward: no gradient


def _sum_mse(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(pred, y, reduction="sum")


class AdamWLM(LMModel):
    """A small pre-norm transformer language model with AdamW (the usual LM recipe, here at a far too high LR)."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class ZeroGradBeforeStep(LitModel):
    """Manual optimization with ``opt.zero_grad()`` between ``manual_backward`` and ``step``: every step sees
    all-zero gradients and the weights never change (the bug as users write it)."""

    def __init__(self) -> None:
        super().__init__(mlp(), lr=0.05)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.manual_backward(loss)
        opt.zero_grad()  # the bug: the gradients are cleared before the step uses them
        opt.step()
        return loss.detach()


class Encoder(nn.Module):
    """A small pre-norm transformer encoder for sequence classification (mean-pooled, a linear head)."""

    def __init__(self, d: int = 32, blocks: int = 2, vocab: int = 50, classes: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, seq, d))
        self.blocks = nn.Sequential(*[PreNormBlock(d) for _ in range(blocks)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.emb(x) + self.pos[:, : x.shape[1]])
        return self.head(self.ln(h).mean(1))


class EncoderClassifier(LitModel):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def count_tokens(n: int = 3200, seq: int = 16, vocab: int = 50, batch: int = 16) -> DataLoader:
    """Sequence classification: more tokens below vocab/2 than above (ties dropped): learnable to 100% held-out
    accuracy, with a few hard examples near the boundary that keep a heavy tail of gradient norms."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    score = (x < vocab // 2).sum(1) - (x >= vocab // 2).sum(1)
    keep = score != 0
    return DataLoader(TensorDataset(x[keep], (score[keep] > 0).long()), batch_size=batch, shuffle=True)


class MoE(nn.Module):
    """Top-1 routing over 4 experts by a fixed rule that never picks experts 2 and 3 (unused experts: their
    gradients stay None; the router and experts 0 and 1 train)."""

    def __init__(self, d: int = 8, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(d, width)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(4)])
        self.head = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        pick = (x[:, 0] > 0).long()  # experts 0 and 1 only
        out = torch.stack([e(h) for e in self.experts[:2]], 1)
        return self.head(out[torch.arange(len(x)), pick])


PLANTED: list[Scenario] = [
    Scenario(
        "exploding_act_relu_init",
        lambda: (_lit(init_mlp(8, gain=3.0), lr=1e-4, optimizer="adam"), reg(), {}),
        ("exploding_activations",),
        notes="ReLU MLP, std 3/sqrt(fan_in) (Kaiming is 1.41)",
    ),
    Scenario(
        "vanishing_act_relu_init",
        lambda: (_lit(init_mlp(8, gain=0.3), lr=1e-3, optimizer="adam"), reg(), {}),
        ("vanishing_activations",),
        notes="ReLU MLP, std 0.3/sqrt(fan_in), zero bias",
    ),
    Scenario(
        "exploding_act_gelu_init",
        lambda: (_lit(init_mlp(8, act=nn.GELU, gain=3.0), lr=1e-4, optimizer="adam"), reg(), {}),
        ("exploding_activations",),
    ),
    Scenario(
        "vanishing_act_selu_init",
        lambda: (_lit(init_mlp(8, act=nn.SELU, gain=0.2), lr=1e-3, optimizer="adam"), reg(), {}),
        ("vanishing_activations",),
    ),
    Scenario(
        "exploding_act_linear_deep",
        lambda: (_lit(init_mlp(8, act=None, gain=2.5), lr=1e-5, optimizer="adam"), reg(), {}),
        ("exploding_activations",),
        notes="deep stack without activations or normalization, std 2.5/sqrt(fan_in)",
    ),
    Scenario(
        "vanishing_grads_sigmoid_deep",
        lambda: (_lit(init_mlp(12, act=nn.Sigmoid), lr=0.1), reg(), {}),
        ("vanishing_gradients",),
        notes="12 sigmoid layers, PyTorch default init",
    ),
    Scenario(
        "vanishing_grads_sigmoid_xavier",
        lambda: (_lit(init_mlp(12, act=nn.Sigmoid, scheme="xavier"), lr=1e-3, optimizer="adam"), reg(), {}),
        ("vanishing_gradients",),
        notes="12 sigmoid layers even with Xavier init: sigmoid' <= 0.25 per layer",
    ),
    Scenario(
        "exploding_grads_lr",
        lambda: (_lit(mlp(width=32, depth=3), lr=0.35), reg(), {}),
        ("exploding_gradients",),
        max_steps=30,
        notes="SGD with a learning rate past the stable limit",
    ),
    Scenario(
        "exploding_grads_init_std1",
        lambda: (_lit(init_std1_mlp(), lr=1e-4, optimizer="adam"), reg(), {}),
        ("exploding_gradients", "exploding_activations"),
        notes="nn.init.normal_(w, std=1.0): activations and the first gradients explode from init",
    ),
    Scenario(
        "nonfinite_loss_log",
        lambda: (LogLoss(mlp(), lr=1e-3), reg(), {}),
        ("nonfinite_loss",),
        notes="log of a prediction that can be negative",
    ),
    Scenario(
        "nonfinite_act_module",
        lambda: (blowup_mlp(), reg(), {}),
        ("nonfinite_loss",),
        layer="net.5",
        notes="a module overflows float32: the first inf activation must be named",
    ),
    Scenario(
        "nonfinite_grads_sqrt",
        lambda: (SqrtLoss(mlp(), lr=1e-3), reg(), {}),
        ("nonfinite_gradients",),
        notes="sqrt(0) in the loss: finite loss, NaN gradient",
    ),
    Scenario(
        "diverge_huge_lr",
        lambda: (_lit(mlp(width=32, depth=3), lr=50.0), reg(), {}),
        ("nonfinite_loss",),
        notes="SGD lr=50: inf then NaN; only the first non-finite value is reported",
    ),
    Scenario(
        "dead_relu_bias",
        lambda: (dead_bias_mlp(), reg(), {}),
        ("dead_units",),
        layer="net.3",
        notes="bias -6 before a ReLU",
    ),
    Scenario(
        "dead_relu_after_bad_update",
        lambda: (LateDeath(init_mlp(3, scheme="kaiming"), lr=1e-3, optimizer="adam"), reg(), {}),
        ("dead_units",),
        layer="net.3",
        notes="the units die at step 6, after a window of healthy samples: the window slides",
    ),
    Scenario(
        "dead_relu_conv",
        lambda: (_lit(ConvNet(bn=False, bias=-6.0), loss=_ce, lr=1e-3, optimizer="adam"), images(), {}),
        ("dead_units",),
        layer="net.features.1",
    ),
    Scenario(
        "saturated_tanh_init",
        lambda: (_lit(init_mlp(4, act=nn.Tanh, gain=6.0), lr=1e-3, optimizer="adam"), reg(), {}),
        ("saturated_activations",),
    ),
    Scenario(
        "saturated_sigmoid_bias", lambda: (sigmoid_bias_mlp(), reg(), {}), ("saturated_activations",), layer="net.3"
    ),
    Scenario(
        "high_clip_rate",
        lambda: (_lit(mlp(), lr=0.05), reg(), {"gradient_clip_val": 1e-3}),
        ("high_clip_rate",),
        max_steps=24,
    ),
    Scenario(
        "weight_norm_growth",
        lambda: (GroupLR(init_mlp(4, scheme="kaiming"), hot="4", hot_lr=0.5), reg(), {}),
        ("weight_norm_growth",),
        layer="net.4",
        max_steps=24,
        notes="one layer on Adam lr 0.5",
    ),
    Scenario(
        "nonfinite_raises",
        lambda: (CheckedLogLoss(mlp(), lr=1e-3), reg(), {}),
        ("nonfinite_loss",),
        raises=True,
        notes="the user's own check raises on the NaN loss",
    ),
    Scenario(
        "nonfinite_grads_anomaly_raises",
        lambda: (SqrtLoss(mlp(), lr=1e-3), reg(), {"detect_anomaly": True}),
        ("nonfinite_gradients",),
        raises=True,
        notes="Trainer(detect_anomaly=True) raises in backward at the NaN gradient",
    ),
]

# data causes and training bugs: the whole NormCheck must tell them apart from norm pathologies
PLANTED += [
    Scenario(
        "raw_inputs",
        lambda: (_lit(layernorm_first_mlp(), lr=1e-3, optimizer="adam"), data_fault("raw"), {}),
        ("input_scale",),
        forbid=("vanishing_activations",),
        notes="raw features in the thousands; a LayerNorm after the first layer: no activation trend",
    ),
    Scenario(
        "label_scale_prices",
        lambda: (_lit(mlp(), lr=1e-3, optimizer="adam"), data_fault("prices"), {}),
        ("label_scale",),
        notes="regression targets x1000",
    ),
    Scenario(
        "corrupted_label_spike",
        lambda: (_lit(mlp(), lr=1e-2), data_fault("corrupted"), {}),
        ("gradient_spikes",),
        forbid=("exploding_gradients",),
        notes="one label of 1000 in batch 12: a spike that falls back, not an explosion",
    ),
    Scenario(
        "missing_zero_grad",
        lambda: (NoZeroGrad(mlp(), lr=1e-2), reg(), {}),
        ("missing_zero_grad",),
        notes="optimizer_zero_grad overridden with a no-op",
    ),
    Scenario(
        "loss_sum_reduction",
        lambda: (_lit(mlp(), loss=_sum_mse, lr=1e-3), reg(), {}),
        ("loss_sum_reduction",),
        notes="MSE with reduction='sum' (scales with the batch size)",
    ),
    Scenario(
        "adamw_lm_lr_too_high",
        lambda: (AdamWLM(TinyTransformer(blocks=2), lr=1.0), tokens(n=1024), {}),
        ("learning_rate_too_high",),
        notes="AdamW at lr 1.0: the loss goes 4.2 -> 26 by step 2 and stays there, every layer's weights grow",
    ),
    Scenario(
        "zero_grad_before_step",
        lambda: (ZeroGradBeforeStep(), reg(), {}),
        ("zero_gradients",),
        notes="manual_backward(loss); opt.zero_grad(); opt.step(): the weights never change",
    ),
]

HEALTHY: list[Scenario] = [
    Scenario("kaiming_relu_deep", lambda: (_lit(init_mlp(8, scheme="kaiming"), lr=1e-2), reg(), {}), max_steps=30),
    Scenario(
        "kaiming_relu_deep_adam",
        lambda: (_lit(init_mlp(10, width=64, scheme="kaiming"), lr=1e-3, optimizer="adam"), reg(), {}),
        max_steps=30,
    ),
    Scenario("default_mlp_adam", lambda: (_lit(mlp(), lr=1e-2, optimizer="adam"), reg(), {}), max_steps=30),
    Scenario(
        "prenorm_transformer",
        lambda: (LMModel(TinyTransformer(), lr=3e-3, optimizer="adam"), tokens(), {}),
        max_steps=30,
    ),
    Scenario(
        "residual_layernorm_mlp", lambda: (_lit(ResidualLN(), lr=3e-3, optimizer="adam"), reg(), {}), max_steps=30
    ),
    Scenario(
        "cnn_batchnorm",
        lambda: (_lit(ConvNet(bn=True), loss=_ce, lr=1e-2, optimizer="adam"), images(), {}),
        max_steps=40,
    ),
    Scenario("lstm_tbptt", lambda: (SeqModel("lstm", carry=True), sequences(), {}), max_steps=30),
    Scenario(
        "bf16_mixed",
        lambda: (_lit(init_mlp(6, scheme="kaiming"), lr=1e-3, optimizer="adam"), reg(), {"precision": "bf16-mixed"}),
        max_steps=30,
    ),
    Scenario("frozen_backbone", lambda: (frozen_mlp(), reg(), {}), max_steps=30),
    Scenario(
        "postnorm_rnn",
        lambda: (SeqModel("rnn", post_norm=True), sequences(seq=30), {}),
        max_steps=30,
        notes="LayerNorm after the RNN output: trains fine",
    ),
    Scenario(
        "tanh_xavier_deep", lambda: (_lit(init_mlp(8, act=nn.Tanh, scheme="xavier"), lr=1e-2), reg(), {}), max_steps=30
    ),
    Scenario(
        "selu_lecun_deep",
        lambda: (_lit(init_mlp(8, act=nn.SELU, scheme="lecun"), lr=1e-3, optimizer="adam"), reg(), {}),
        max_steps=30,
    ),
    Scenario(
        "clipped_classifier",
        lambda: (
            _lit(init_mlp(4, scheme="kaiming", d_out=4), loss=_ce, lr=3e-3, optimizer="adam"),
            cls(),
            {"gradient_clip_val": 1.0},
        ),
        max_steps=40,
    ),
    Scenario(
        "sigmoid_output_bce",
        lambda: (sigmoid_head(), reg(), {}),
        max_steps=40,
        notes="a confident sigmoid output head saturates by design",
    ),
    Scenario("manual_two_optimizers", lambda: (TwoOptimizers(), reg(), {}), max_steps=40),
    Scenario(
        "embedding_bag", lambda: (_lit(BagModel(), loss=_ce, lr=1e-2, optimizer="adam"), bags(), {}), max_steps=30
    ),
    Scenario(
        "onecycle_warmup_adamw",
        lambda: (OneCycleAdamW(mlp(width=64, depth=4)), reg(n=4096), {}),
        max_steps=150,
        notes="LR warm-up: the gradient norm rises ~50x in 30 steps; bursts of 3-4x its recent level",
    ),
    Scenario(
        "skipped_batches",
        lambda: (SkipOdd(mlp(), lr=3e-3, optimizer="adam"), reg(n=2048), {}),
        max_steps=60,
        notes="training_step returns None on every other batch: those optimizer steps have no gradient",
    ),
    Scenario(
        "high_lr_adam_converging",
        lambda: (_lit(init_mlp(3, scheme="kaiming"), lr=3e-2, optimizer="adam"), reg(), {}),
        max_steps=40,
    ),
    # slower look-alikes (run by benchmarks/scenario_report.py and `pytest -m slow`)
    Scenario(
        "cnn_no_bn_default",
        lambda: (_lit(ConvNet(bn=False), loss=_ce, lr=1e-2, optimizer="adam"), images(), {}),
        max_steps=80,
        fast=False,
        learns=0.95,
        notes="a CNN without BatchNorm at the default init learns slowly: 0.86-0.92 of its first loss in 80 steps",
    ),
    Scenario(
        "gru_sequence",
        lambda: (SeqModel("gru"), sequences(), {}),
        max_steps=40,
        fast=False,
    ),
    Scenario(
        "kaiming_dropout_sgd_momentum",
        lambda: (dropout_mlp(), cls(), {}),
        max_steps=60,
        fast=False,
    ),
    Scenario(
        "prenorm_transformer_long",
        lambda: (LMModel(TinyTransformer(blocks=4), lr=1e-3, optimizer="adam"), tokens(n=512), {}),
        max_steps=80,
        fast=False,
    ),
    Scenario(
        "accumulated_residual_mlp",
        lambda: (_lit(ResidualLN(blocks=8), lr=1e-3, optimizer="adam"), reg(), {"accumulate_grad_batches": 2}),
        max_steps=30,
        fast=False,
    ),
    Scenario(
        "moe_unused_experts",
        lambda: (_lit(MoE(), lr=1e-2, optimizer="adam"), reg(), {}),
        max_steps=30,
        notes="two of four experts never routed to: their gradients stay None, the rest trains",
    ),
    Scenario(
        "converged_encoder_classifier",
        lambda: (EncoderClassifier(Encoder(), loss=_ce, lr=2e-3), count_tokens(), {}),
        max_steps=400,
        fast=False,
        learns=0.01,
        notes="fine-tuned to 100% held-out accuracy: heavy-tailed gradient norms (hard examples 13-55x a collapsing"
        " median) are no spikes",
    ),
    Scenario(
        "default_mlp_long",
        lambda: (_lit(mlp(width=64, depth=4), lr=3e-3, optimizer="adam"), reg(n=2048), {}),
        max_steps=200,
        fast=False,
        notes="200 steps: the regular cadence (every 50 steps) after the dense start",
    ),
]

ALL: list[Scenario] = PLANTED + HEALTHY


def run_scenario(sc: Scenario, seed: int = 0, **normcheck_kwargs: Any) -> Result:
    """Train ``sc`` with ``NormCheck`` (log_every_n_steps=50 on the Trainer) and collect its findings."""
    from lightning_normcheck import NormCheck

    L.seed_everything(seed, verbose=False)
    model, data, kwargs = sc.build()
    cb = NormCheck(print_summary=False, **normcheck_kwargs)
    rec = LossRecorder()
    trainer_kwargs: dict[str, Any] = dict(max_steps=sc.max_steps, log_every_n_steps=50)
    trainer_kwargs.update(kwargs)
    t0 = time.perf_counter()
    exc: BaseException | None = None
    try:
        trainer([cb, rec], **trainer_kwargs).fit(model, data)
    except Exception as err:  # noqa: BLE001 - planted scenarios may raise on purpose
        exc = err
    return Result(sc, cb.findings, time.perf_counter() - t0, exc, rec.losses)


def judge(res: Result, codes: tuple[str, ...] | None = None) -> tuple[list[str], list[Any]]:
    """``(missed expected codes, false alarms)`` of a result, looking only at ``codes`` (default: every code,
    those of the data and bug checks too: a healthy run must give no warning or error at all)."""
    from lightning_normcheck.findings import CODES

    codes = CODES if codes is None else codes
    bad = [f for f in res.findings if f.severity in ("warning", "error") and f.code in codes]
    found = {f.code for f in bad}
    missed = [c for c in res.scenario.expect if c not in found]
    if res.scenario.planted:  # extra codes are fine on a planted run, except those it forbids
        false = [f for f in bad if f.code in res.scenario.forbid]
    else:
        false = [f for f in bad if f.code not in res.scenario.expect]
    return missed, false
