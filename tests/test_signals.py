"""Data causes and first-step hygiene: input_scale, label_scale, gradient_spikes, hygiene hints.

Every detector is tested on a real buggy run where it fires and on a healthy look-alike where it stays
silent; numbers in messages are checked against an independent computation on the data or on norms
recorded by a separate callback (``torch.nn.utils.get_total_norm``).
"""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

import lightning as L
import pytest
import torch
from helpers import LitModel, bad, codes, fit, loader, mlp
from helpers import MemLogger as CaptureLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_normcheck import GradientNormMonitor, NormCheck
from lightning_normcheck.diagnosis.thresholds import ClipThresholds, GradientThresholds

MINE = {"input_scale", "label_scale", "gradient_spikes"}
SPIKES = GradientThresholds()  # the default spike thresholds


# --- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _seed() -> None:
    """Models are built before ``fit`` seeds: seed here so the init does not depend on the test order."""
    torch.manual_seed(0)


class NormRecorder(L.Callback):
    """Independent total gradient norm of every optimizer step (pre-clip)."""

    def __init__(self) -> None:
        self.totals: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        self.totals.append(float(torch.nn.utils.get_total_norm(grads)))


def tabular(n: int = 320, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return x, y


def independent_ratio(totals: list[float], step: int) -> float:
    """Norm / baseline: the larger of the medians of the previous 50 and the previous 8 steps with gradients."""
    before = [v for v in totals[:step] if v > 0]
    window = before[-SPIKES.spike_window :]
    return totals[step] / max(statistics.median(window), statistics.median(window[-SPIKES.spike_recent :]))


def finding(cb: Any, code: str) -> Any:
    found = [f for f in cb.findings if f.code == code]
    assert found, f"no {code} finding in {[(f.code, f.severity) for f in cb.findings]}"
    return found[0]


# --- input_scale ---------------------------------------------------------------------------------------------
def test_input_scale_raw_feature_found_early_named_and_logged() -> None:
    x, y = tabular()
    x[:, 2] = x[:, 2] * 1500.0 + 4000.0  # a raw feature in the thousands (a price, a year...)
    log = CaptureLogger()
    cb = NormCheck(print_summary=False)
    fit(
        LitModel(mlp(), lr=1e-3, optimizer="adam"),
        loader(TensorDataset(x, y)),
        [cb],
        max_steps=20,
        log_every_n_steps=50,
        logger=log,
    )
    f = finding(cb, "input_scale")
    assert f.severity == "warning" and f.step < 20
    first = x[:16, 2].abs().max().item()  # the first batch (no shuffle), measured independently
    assert f.value == pytest.approx(first, rel=1e-5)
    assert "column 2 of batch[0]" in f.message and f"{first:.3g}" in f.message
    assert "standardize" in f.message and "raw" in f.message
    assert "label_scale" not in codes(cb.findings)
    logged = {k: v for _, row in log.rows for k, v in row.items() if k.startswith("normcheck/input/")}
    assert logged["normcheck/input/max_abs/0"] == pytest.approx(x[:, 2].abs().max().item(), rel=0.5)
    assert not any(k.startswith("_") for _, row in log.rows for k in row)


def test_input_scale_tiny_std_column() -> None:
    x, y = tabular()
    # a nearly constant column standardized by a std computed where it was constant (~0, floored at 1e-6)
    x[:, 3] = 0.0
    x[::10, 3] = 0.01 / 1e-6
    cb = NormCheck(print_summary=False)
    fit(
        LitModel(mlp(), lr=1e-3, optimizer="adam"),
        loader(TensorDataset(x, y)),
        [cb],
        max_steps=12,
        log_every_n_steps=50,
    )
    f = finding(cb, "input_scale")
    assert f.severity == "warning" and f.step == 0
    assert "column 3 of batch[0]" in f.message and "1e+04" in f.message
    assert "tiny std" in f.message and "clamp_min" in f.message and "drop the constant column" in f.message
    near_zero = (x[:16, 3].abs() <= 0.01 * x[:16, 3].abs().max()).float().mean().item()
    assert f"{100 * near_zero:.0f}% of its values are near 0" in f.message


def test_input_scale_nan_feature_is_an_error() -> None:
    x, y = tabular()
    x[5, 6] = float("nan")  # a missing value left as NaN, in the first batch
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), lr=1e-3), loader(TensorDataset(x, y)), [cb], max_steps=3, log_every_n_steps=50)
    f = finding(cb, "input_scale")
    assert f.severity == "error" and f.step == 0 and "column 6 of batch[0]" in f.message and "impute" in f.message


def test_input_scale_found_when_training_raises() -> None:
    class Raising(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            if batch_idx == 0:  # before any optimizer step: only the flush of on_exception can report
                raise RuntimeError("loss exploded, stopping")  # e.g. the user's own guard
            return super().training_step(batch, batch_idx)

    x, y = tabular()
    x[:, 4] = x[:, 4] * 3e3 + 1e4
    cb = NormCheck(print_summary=False)
    with pytest.raises(RuntimeError, match="loss exploded"):
        fit(Raising(mlp(), lr=1e-3), loader(TensorDataset(x, y)), [cb], max_steps=10, log_every_n_steps=50)
    f = finding(cb, "input_scale")
    assert f.severity == "warning" and "column 4 of batch[0]" in f.message


def test_raw_inputs_do_not_start_the_activation_chain() -> None:
    """Raw inputs (RMS ~2e3) into a net whose LayerNorm brings them to ~1: input_scale, not a vanishing
    activation trend that starts at the input (the layers themselves have no trend)."""
    x, y = tabular()
    x = x * 1500.0 + 1000.0  # every column raw, in the thousands
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()
    )
    net.append(nn.Linear(32, 1))
    with torch.no_grad():  # independently: from the input to the last hidden Linear the RMS falls 1000x+
        h, rms = x[:16], {}
        for i, m in enumerate(net):
            h = m(h)
            rms[i] = float(h.square().mean().sqrt())
    assert float(x[:16].square().mean().sqrt()) / rms[5] > 1000
    cb = NormCheck(print_summary=False)
    fit(LitModel(net, lr=1e-3, optimizer="adam"), loader(TensorDataset(x, y)), [cb], max_steps=20, log_every_n_steps=50)
    assert codes(cb.findings) == {"input_scale"}, [str(f) for f in bad(cb.findings)]


def test_raw_features_behind_a_first_batchnorm_are_info_only() -> None:
    x, y = tabular()
    x[:, 2] = x[:, 2] * 1500.0 + 4000.0
    net = nn.Sequential(nn.BatchNorm1d(8), mlp())
    cb = NormCheck(print_summary=False)
    fit(LitModel(net, lr=1e-3, optimizer="adam"), loader(TensorDataset(x, y)), [cb], max_steps=4, log_every_n_steps=50)
    f = finding(cb, "input_scale")
    assert f.severity == "info" and "net.0 (BatchNorm1d)" in f.message and "column 2" in f.message


@pytest.mark.parametrize("shape", [(16, 5), (4, 6, 5), (2, 5, 3, 4)])
def test_feature_stats_match_an_independent_computation(shape: tuple[int, ...]) -> None:
    from lightning_normcheck.norms import feature_stats

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    axis = 1 if len(shape) != 3 else 2
    scale = torch.tensor([1.0, 3e3, 0.5, 40.0, 2e4], dtype=torch.float64)
    view = [1] * len(shape)
    view[axis] = 5
    x = x * scale.reshape(view)
    cols = x.movedim(axis, -1).reshape(-1, 5).numpy()  # feature columns, the plain way
    stats = feature_stats(x.float(), 1e3)
    order = sorted(range(5), key=lambda j: -abs(cols[:, j]).max())[:3]
    assert stats["idx"].tolist() == order
    for i, j in enumerate(order):
        assert stats["max_abs"][i].item() == pytest.approx(abs(cols[:, j]).max(), rel=1e-5)
        assert stats["std"][i].item() == pytest.approx(cols[:, j].std(), rel=1e-4)
        assert stats["mean"][i].item() == pytest.approx(cols[:, j].mean(), rel=1e-4, abs=1e-3)
    assert stats["n_above"].item() == 2


def test_healthy_tabular_constant_column_handled_labels_in_tens_is_silent() -> None:
    x, y = tabular()
    raw_const = torch.full((x.shape[0],), 7.0)
    x[:, 3] = (raw_const - raw_const.mean()) / raw_const.std().clamp_min(1e-3)  # std clamped: 0, not huge
    y = 10.0 * y + 20.0  # regression labels in the tens
    cb = NormCheck(print_summary=False)
    fit(
        LitModel(mlp(), lr=1e-3, optimizer="adam"),
        loader(TensorDataset(x, y), batch_size=8),
        [cb],
        max_steps=30,
        log_every_n_steps=5,
    )
    assert not (codes(cb.findings) & MINE), bad(cb.findings)


class TinyCNN(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def images(kind: str) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (64, 3, 8, 8), generator=g).float()
    y = torch.randint(0, 3, (64,), generator=g)
    if kind == "unit":
        return TensorDataset(raw / 255.0, y)
    if kind == "standardized":
        return TensorDataset((raw / 255.0 - 0.5) / 0.25, y)
    return TensorDataset(raw, y)


@pytest.mark.parametrize("kind", ["unit", "standardized"])
def test_healthy_images_are_silent(kind: str) -> None:
    cb = NormCheck(print_summary=False)
    fit(TinyCNN(), loader(images(kind)), [cb], max_steps=8, log_every_n_steps=2)
    assert not (codes(cb.findings) & MINE), bad(cb.findings)
    assert not [f for f in cb.findings if f.code == "input_scale"]


def test_raw_pixels_are_info_only() -> None:
    cb = NormCheck(print_summary=False)
    fit(TinyCNN(), loader(images("raw")), [cb], max_steps=4, log_every_n_steps=2)
    f = finding(cb, "input_scale")
    assert f.severity == "info" and "0-255" in f.message and "divide by 255" in f.message
    assert "input_scale" not in codes(cb.findings)


class TokenModel(L.LightningModule):
    """Token ids in, class ids out: integer tensors are not features to judge."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(5000, 16)
        self.head = nn.Linear(16, 4)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self.head(self.emb(batch["input_ids"]).mean(1)), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class TokenData(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1000, 5000, (64, 12), generator=g)  # ids in the thousands
        self.labels = torch.randint(0, 4, (64,), generator=g)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def test_token_ids_are_not_features() -> None:
    cb = NormCheck(print_summary=False)
    fit(TokenModel(), DataLoader(TokenData(), batch_size=8), [cb], max_steps=8, log_every_n_steps=2)
    assert not [f for f in cb.findings if f.code in MINE]


# --- label_scale -----------------------------------------------------------------------------------------------
def test_label_scale_prices_found_at_first_step_and_told_apart() -> None:
    x, y = tabular()
    prices = 1e4 * y + 3e4  # prices in the tens of thousands
    rec = NormRecorder()
    cb = NormCheck(print_summary=False)
    fit(
        LitModel(mlp(), lr=1e-3, optimizer="adam"),
        loader(TensorDataset(x, prices)),
        [rec, cb],
        max_steps=20,
        log_every_n_steps=50,
    )
    f = finding(cb, "label_scale")
    assert f.severity == "warning" and f.step == 0
    median = prices[:16].abs().median().item()  # the first batch, computed independently
    assert f.value == pytest.approx(median, rel=1e-5)
    assert "batch[1]" in f.message and f"{median:.3g}" in f.message
    assert f"{rec.totals[0]:.3g}" in f.message  # the gradient norm of that step, as recorded outside
    assert "inputs look standardized" in f.message and "not from the network" in f.message
    assert "normalize the targets" in f.message and "un-normalize predictions" in f.message
    assert "input_scale" not in codes(cb.findings)


def test_label_scale_zero_mean_targets_times_1000() -> None:
    x, y = tabular()
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), lr=1e-3, optimizer="adam"), loader(TensorDataset(x, 1e3 * y)), [cb], max_steps=4)
    f = finding(cb, "label_scale")
    assert f.severity == "warning" and f.value == pytest.approx((1e3 * y[:16]).abs().median().item(), rel=1e-5)


class DictRegression(L.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = mlp()
        self.automatic_optimization = not manual

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self.net(batch["features"]), batch["target"])
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3)


class DictData(Dataset):
    def __init__(self, scale: float) -> None:
        self.x, y = tabular()
        self.y = y * scale + 2 * scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.x[i], "target": self.y[i]}


@pytest.mark.parametrize("manual", [False, True])
def test_label_scale_dict_batch_diverging_sgd(manual: bool) -> None:
    cb = NormCheck(print_summary=False)
    fit(DictRegression(manual), DataLoader(DictData(1e4), batch_size=16), [cb], max_steps=10, log_every_n_steps=50)
    f = finding(cb, "label_scale")
    assert f.step == 0 and "batch['target']" in f.message and "batch key 'target'" in f.message


def test_exploding_network_with_small_labels_is_not_label_scale() -> None:
    x, y = tabular()
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(depth=4), lr=2.0), loader(TensorDataset(x, y)), [cb], max_steps=12, log_every_n_steps=50)
    assert bad(cb.findings)  # the run does blow up ...
    assert not [f for f in cb.findings if f.code in ("label_scale", "input_scale")]  # ... but not from data


# --- gradient_spikes -------------------------------------------------------------------------------------------
def corrupted(value: float, batches: tuple[int, ...] = (17, 40), n: int = 60 * 16) -> TensorDataset:
    x, y = tabular(n)
    for b in batches:
        y[b * 16 + 3] = value  # one corrupted label in ~3% of the batches
    return TensorDataset(x, y)


def test_gradient_spikes_corrupted_label() -> None:
    rec = NormRecorder()
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), lr=1e-2), loader(corrupted(1000.0)), [rec, cb], max_steps=60, log_every_n_steps=10)
    f = finding(cb, "gradient_spikes")
    # known when step 17 fell back (within spike_fallback_steps), the evidence starting at the spike
    assert f.severity == "warning" and f.since == 17 and 17 < f.step <= 17 + SPIKES.spike_fallback_steps
    assert f.count == 2
    assert f.extra["steps"] == [17, 40] and f.extra["batches"] == ["epoch 0, batch 17", "epoch 0, batch 40"]
    ratios = [independent_ratio(rec.totals, s) for s in (17, 40)]
    assert all(r > 50 for r in ratios)
    assert f.extra["factors"] == pytest.approx(ratios, rel=1e-3)
    assert f"step 17 (epoch 0, batch 17, {ratios[0]:.3g}x" in f.message
    assert "most likely first: a corrupted target" in f.message  # float targets: regression causes first
    assert "class weights" in f.message
    others = [s for s in range(SPIKES.spike_min_history, 60) if s not in (17, 40)]
    assert max(independent_ratio(rec.totals, s) for s in others) < SPIKES.spike_factor
    # the clip value to try is the 90% quantile of this run's own pre-clip totals over the steps it names
    m = re.search(
        r"Nothing clips the gradients: clip gradients at ([0-9.e+-]+) \(the 90% quantile of the pre-clip"
        r" total gradient norm over the (\d+) steps (\d+)-(\d+)",
        f.message,
    )
    assert m, f.message
    window = torch.tensor(rec.totals[int(m[3]) : int(m[4]) + 1], dtype=torch.float64)
    expected = float(f"{torch.quantile(window, 0.9).item():.2g}")
    assert len(window) == int(m[2]) and float(m[1]) == expected
    assert f.overrides == [f"--trainer.gradient_clip_val={expected:g}"]
    # the newest value of the step-40 flush is the spike: 100x+ the window minimum, rising into it; it falls
    # back right after, so it is a spike and not a geometric explosion
    assert rec.totals[40] / min(rec.totals[31:41]) > 100 and rec.totals[41] < rec.totals[40] / 10
    assert "exploding_gradients" not in {f.code for f in cb.findings}


def test_gradient_spikes_standalone_monitor_with_clipping() -> None:
    cb = GradientNormMonitor(print_summary=False)
    fit(
        LitModel(mlp(), lr=1e-2),
        loader(corrupted(1000.0)),
        [cb],
        max_steps=45,
        log_every_n_steps=10,
        gradient_clip_val=20.0,
    )
    f = finding(cb, "gradient_spikes")
    assert f.extra["steps"] == [17, 40] and "Clipping is on (gradient_clip_val=20" in f.message
    assert "Nothing clips" not in f.message


def rare_class_data(n_batches: int, bs: int = 8, rare: float = 0.01, seed: int = 1) -> tuple[TensorDataset, set[int]]:
    g = torch.Generator().manual_seed(seed)
    n = bs * n_batches
    centers = torch.randn(4, 8, generator=g) * 3
    y = torch.randint(0, 3, (n,), generator=g)
    if rare > 0:
        y[torch.rand(n, generator=g) < rare] = 3
    else:
        y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + 0.5 * torch.randn(n, 8, generator=g)
    rare_batches = {int(i) // bs for i in torch.nonzero(y == 3).flatten()} if rare > 0 else set()
    return TensorDataset(x, y), rare_batches


def test_gradient_spikes_rare_class() -> None:
    ds, rare_batches = rare_class_data(100)
    rec = NormRecorder()
    cb = GradientNormMonitor(print_summary=False)
    fit(
        LitModel(mlp(d_out=4), loss=nn.functional.cross_entropy, lr=0.2),
        loader(ds, 8),
        [rec, cb],
        max_steps=100,
        log_every_n_steps=10,
    )
    f = finding(cb, "gradient_spikes")
    assert f.extra["steps"] and set(f.extra["steps"]) <= rare_batches  # every spike is a rare-class batch
    assert "most likely first: a rare class the model keeps getting wrong" in f.message  # integer labels
    for s, factor in zip(f.extra["steps"], f.extra["factors"]):
        assert factor == pytest.approx(independent_ratio(rec.totals, s), rel=1e-3)


@pytest.mark.parametrize("bs", [2, 8, 32])
def test_clean_runs_have_no_spikes(bs: int) -> None:
    steps = 40
    x, y = tabular(steps * bs)
    rec = NormRecorder()
    cb = GradientNormMonitor(print_summary=False)
    fit(LitModel(mlp(), lr=1e-2), loader(TensorDataset(x, y), bs), [rec, cb], max_steps=steps, log_every_n_steps=10)
    assert not [f for f in cb.findings if f.code == "gradient_spikes"]
    assert max(independent_ratio(rec.totals, s) for s in range(SPIKES.spike_min_history, steps)) < SPIKES.spike_factor


def test_balanced_classes_small_batch_no_spikes() -> None:
    ds, _ = rare_class_data(100, rare=0.0)
    cb = GradientNormMonitor(print_summary=False)
    fit(
        LitModel(mlp(d_out=4), loss=nn.functional.cross_entropy, lr=0.2),
        loader(ds, 8),
        [cb],
        max_steps=100,
        log_every_n_steps=10,
    )
    assert not [f for f in cb.findings if f.code == "gradient_spikes"]


def test_spike_history_steady_climb_is_not_a_spike() -> None:
    from lightning_normcheck.diagnosis.engine import Context, Flush
    from lightning_normcheck.diagnosis.findings import FindingLog
    from lightning_normcheck.diagnosis.records import GradientTotals
    from lightning_normcheck.diagnosis.spikes import SpikeRules
    from lightning_normcheck.diagnosis.thresholds import Thresholds

    def rules() -> SpikeRules:
        return SpikeRules(Context(Thresholds()), FindingLog())

    def feed(r: SpikeRules, series: list[tuple[int, float]]) -> None:
        steps, values = zip(*series)
        r.observe(Flush(steps[-1], (GradientTotals(steps, values, (0,) * len(steps)),)))

    h = rules()
    feed(h, [(s, 1.3**s) for s in range(60)])  # exploding: never falls back
    assert not h.log.findings
    h = rules()
    feed(h, [(s, 0.01 if s < 12 else 1.0 + 0.05 * (s % 2)) for s in range(40)])  # a zero-init head waking up
    assert not h.log.findings
    h = rules()
    feed(h, [(s, 100.0 if s in (20, 33) else 1.0 + 0.1 * (s % 3)) for s in range(40)])
    f = h.log.get("gradient_spikes")
    assert f is not None and f.extra["steps"] == [20, 33]
    median = statistics.median([1.0 + 0.1 * (s % 3) for s in range(20)])
    assert f.value == pytest.approx(100.0 / median) and f.extra["factors"][0] == pytest.approx(100.0 / median, rel=1e-3)
    h2 = rules()  # a spike in the last step is pending and survives a checkpoint
    feed(h, [(40, 500.0)])
    h2.load_state_dict(h.state_dict())
    feed(h2, [(41, 1.0)])
    assert h2.windows[0].count == 3 and [s.step for s in h2.windows[0].spikes] == [20, 33, 40]
    assert list(h2.windows[0].window)[-1] == 1.0


def test_burst_of_bad_batches_that_falls_back_is_not_an_explosion() -> None:
    """Two corrupted labels in a row knock the weights: the norm rises 3 steps in a row (200 -> 367 -> 684,
    judged at the dense early flushes as it happens) and then falls back. The final report: gradient_spikes;
    exploding_gradients, said while it rose, becomes info once the norm fell back."""
    rec = NormRecorder()
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), lr=1e-2), loader(corrupted(1000.0, batches=(12, 13))), [rec, cb], max_steps=30)
    t = rec.totals
    low = min(t[8:12])
    assert t[12] < t[13] < t[14] and t[13] / low > 100 and t[14] / low > 100  # persistent growth at step 14
    assert statistics.median(t[15:18]) < 10 * low  # ... that fell back
    assert codes(cb.findings) == {"gradient_spikes"}, [str(f) for f in bad(cb.findings)]
    f = finding(cb, "exploding_gradients")
    assert f.severity == "info" and "fell back" in f.message


def test_exploding_gradients_needs_growth_that_persists() -> None:
    """One high newest value is a spike (it falls back); a geometric climb shows one step after it passes the
    threshold and is reported once the 3 steps after that confirm it; a two-step rise to a new level that stays
    is reported too."""
    from test_rules_gradients import Rig, totals

    def growth(series: list[float], flush_every: int = 1) -> list[Any]:
        rig = Rig()
        pairs = list(enumerate(series))
        for i in range(0, len(pairs), flush_every):
            chunk = pairs[i : i + flush_every]
            rig.feed(chunk[-1][0], totals(chunk))
        return rig.log.of("exploding_gradients")

    flat = [1.0 + 0.1 * (s % 3) for s in range(30)]
    assert growth(flat[:29] + [300.0]) == []  # the spike is the newest value: not judged an explosion
    assert growth(flat[:29] + [300.0], flush_every=10) == []
    assert growth(flat[:20] + [300.0] + flat[21:]) == []  # and it falls back
    climb = [1.0 * 2.0**s for s in range(20)]  # 2x per step: past 100x at step 7 (128) over step 0
    (f,) = growth(climb)
    assert (f.step, f.since) == (11, 0) and "256 at step 8" in f.message  # 7 and 8 past 100x; 9-11 confirm
    assert growth(flat[:20] + [300.0, 320.0, 310.0]) == []  # a new level, 1 step after its peak: pending
    (f,) = growth(flat[:20] + [300.0, 320.0, 310.0, 305.0, 315.0])  # ... and 3 steps after it that stay
    assert (f.step, f.since) == (24, 12) and "320 at step 21" in f.message  # 1.0 at step 12 is the window's min


class PerOptimizerRecorder(L.Callback):
    """Independent total gradient norm of each optimizer step, over that optimizer's own parameters."""

    def __init__(self) -> None:
        self.totals: dict[int, list[float]] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        k = [getattr(o, "optimizer", o) for o in trainer.optimizers].index(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.totals.setdefault(k, []).append(float(torch.nn.utils.get_total_norm(grads)))


def test_two_optimizers_are_judged_each_on_its_own_scale() -> None:
    """GAN-like manual optimization: two optimizers whose gradients differ ~1e4x in scale. Mixed into one
    series every other step is a 'spike'; judged per optimizer the healthy run is silent."""
    from scenarios import TwoOptimizers

    rec = PerOptimizerRecorder()
    cb = NormCheck(print_summary=False)
    fit(TwoOptimizers(), loader(TensorDataset(*tabular(640))), [rec, cb], max_steps=40, log_every_n_steps=10)
    a, b = rec.totals[0], rec.totals[1]
    assert len(a) == len(b) == 20
    assert statistics.median(b) / statistics.median(a) > 10 * SPIKES.spike_factor  # mixed, b would look like spikes
    assert bad(cb.findings) == [], [str(f) for f in bad(cb.findings)]


def test_two_optimizers_spike_of_one_optimizer_is_found() -> None:
    """A corrupted label makes both optimizers' gradients spike on that batch, each against its own median."""
    from scenarios import TwoOptimizers

    rec = PerOptimizerRecorder()
    cb = NormCheck(print_summary=False)
    ds = corrupted(1000.0, batches=(15,), n=40 * 16)
    fit(TwoOptimizers(), loader(ds), [rec, cb], max_steps=40, log_every_n_steps=10)
    f = finding(cb, "gradient_spikes")
    assert f.severity == "warning"
    spiked = [k for k in (0, 1) if independent_ratio(rec.totals[k], 15) > SPIKES.spike_factor]
    assert spiked and f.extra["steps"] == [2 * 15 + k for k in spiked]  # two optimizer steps per batch
    for k, factor in zip(spiked, f.extra["factors"]):
        assert factor == pytest.approx(independent_ratio(rec.totals[k], 15), rel=1e-3)
        assert f"step {2 * 15 + k} (epoch 0, batch 15, optimizer {k} (Adam)" in f.message
    others = [
        independent_ratio(rec.totals[k], b) for k in (0, 1) for b in range(SPIKES.spike_min_history, 20) if b != 15
    ]
    assert max(others) < SPIKES.spike_factor
    assert "exploding_gradients" not in {g.code for g in cb.findings}


def test_skipped_batches_are_not_samples_of_the_gradient_norm() -> None:
    """training_step returning None on every other batch: those optimizer steps have no gradient (total 0);
    they must not drag the running median down so that every real step looks like a spike."""

    class Skipping(LitModel):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            return None if batch_idx % 2 else super().training_step(batch, batch_idx)

    rec = NormRecorder()
    cb = NormCheck(print_summary=False)
    ds = corrupted(0.0, batches=(), n=60 * 16)
    fit(Skipping(mlp(), optimizer="adam"), loader(ds), [rec, cb], max_steps=60, log_every_n_steps=50)
    assert rec.totals.count(0.0) >= 25 and min(v for v in rec.totals if v > 0) > 0.01  # half the steps: no grads
    assert bad(cb.findings) == [], [str(f) for f in bad(cb.findings)]
    # a corrupted label among them is still a spike
    cb = NormCheck(print_summary=False)
    fit(Skipping(mlp(), optimizer="adam"), loader(corrupted(1000.0, batches=(40,))), [cb], max_steps=60)
    f = finding(cb, "gradient_spikes")
    assert f.extra["steps"] == [40] and "exploding_gradients" not in codes(cb.findings)


class MaxEntryRecorder(L.Callback):
    """Independent max |gradient entry| of every optimizer step (before Lightning clips)."""

    def __init__(self) -> None:
        self.maxes: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.maxes.append(max(float(p.grad.abs().max()) for p in pl_module.parameters() if p.grad is not None))


def test_trainer_value_clipping_is_read_as_value_clipping() -> None:
    """Trainer(gradient_clip_algorithm="value") stores an enum whose str() is 'GradClipAlgorithmType.VALUE':
    the clip tracker and the spike monitor must still see 'value' (max |entry| vs the value, not the norm)."""
    rec = MaxEntryRecorder()
    cb = NormCheck(print_summary=False)
    kw = {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "value"}
    fit(LitModel(mlp(), lr=1e-2, optimizer="adam"), loader(TensorDataset(*tabular(640))), [rec, cb], max_steps=20, **kw)
    f = finding(cb, "high_clip_rate")
    assert "max |gradient entry|" in f.message and "total gradient norm" not in f.message
    clipped = [m for m in rec.maxes[: f.step + 1] if m > 0.5]
    assert f"clipped on {len(clipped) / (f.step + 1):.0%}" in f.message
    assert cb._diagnosis.ctx.run.clip_algorithm == "value"  # what the spike and clipping rules are told


def test_rising_norm_during_warmup_is_not_a_spike() -> None:
    """OneCycleLR warm-up: the norm climbs from ~0.2 to ~13 in 27 steps, then bursts to 30-45. Against the
    50-step median those bursts are 10x+; against the recent level (median of the last 8) they are ~4x."""
    from scenarios import OneCycleAdamW, reg

    L.seed_everything(0, verbose=False)
    rec = NormRecorder()
    cb = NormCheck(print_summary=False)
    fit(OneCycleAdamW(mlp(width=64, depth=4)), reg(n=4096), [rec, cb], max_steps=150, log_every_n_steps=50)
    t = rec.totals
    long_only = [
        s
        for s in range(SPIKES.spike_min_history, 150)
        if t[s] > SPIKES.spike_factor * statistics.median(t[max(0, s - 50) : s])
    ]
    assert long_only, "the 50-step median alone would call the warm-up bursts spikes"
    assert max(independent_ratio(t, s) for s in range(SPIKES.spike_min_history, 150)) < SPIKES.spike_factor
    assert bad(cb.findings) == [], [str(f) for f in bad(cb.findings)]


def test_spike_state_survives_resume(tmp_path: Any) -> None:
    """A spike two steps after resuming is found: the running-median window came back with the checkpoint."""
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=25)
    fit(
        LitModel(mlp(), lr=1e-2),
        loader(corrupted(0.0, batches=())),
        [GradientNormMonitor(print_summary=False), ckpt],
        max_steps=25,
        log_every_n_steps=5,
        enable_checkpointing=True,
    )
    # the plain DataLoader is not resumable: after resuming at step 25 it starts again from its batch 0, so
    # its batch 2 is the one of global step 27 (Lightning keeps counting batch_idx from 25)
    ds = corrupted(1000.0, batches=(2,))
    cb = GradientNormMonitor(print_summary=False)
    L.seed_everything(0, verbose=False)
    t = L.Trainer(
        accelerator="cpu",
        max_steps=32,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
        callbacks=[cb],
    )
    t.fit(LitModel(mlp(), lr=1e-2), loader(ds), ckpt_path=str(tmp_path / "last.ckpt"))
    assert finding(cb, "gradient_spikes").extra["steps"] == [27]


# --- hygiene -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("below", [1.5, 20.0], ids=["mild", "far"])
def test_hint_clipping_on_most_steps(below: float) -> None:
    """Clipping on most steps gives a hint (lower the LR) filed under high_clip_rate: an info finding when the
    norms are near the threshold, joined to the high_clip_rate error when they are far above it."""
    x, y = tabular()
    probe = NormRecorder()
    fit(LitModel(mlp(), lr=1e-2), loader(TensorDataset(x, y)), [probe], max_steps=20)
    clip = float(torch.tensor(probe.totals).median()) / below  # most steps' norms sit above it
    rec = NormRecorder()
    cb = NormCheck(print_summary=False, activations=False, bugs=False)
    fit(
        LitModel(mlp(), lr=1e-2),
        loader(TensorDataset(x, y)),
        [rec, cb],
        max_steps=20,
        log_every_n_steps=5,
        gradient_clip_val=clip,
    )
    hint = finding(cb, "high_clip_rate")
    # the hint is given once, at the first flush with clip_min_steps totals: its rate is over those steps
    seen = re.search(r"acts on (\d+)% of the last (\d+) steps", hint.message)
    assert seen is not None and int(seen.group(2)) >= ClipThresholds().clip_min_steps
    n = int(seen.group(2))
    rate = sum(v > clip for v in rec.totals[:n]) / n
    assert rate >= ClipThresholds().high_rate and seen.group(1) == f"{100 * rate:.0f}"
    assert "lower the LR" in hint.message and hint.extra["notes"] == ["clipping_most"]
    assert hint.severity == ("info" if below < 3 else "error")


def warmup_model(lr: float, warmup: bool) -> LitModel:
    class M(LitModel):
        def configure_optimizers(self) -> Any:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr)
            if not warmup:
                return opt
            sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=200)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return M(mlp(), lr=lr)


@pytest.mark.parametrize(("lr", "warmup", "expected"), [(0.05, False, True), (0.05, True, False), (1e-3, False, False)])
def test_hygiene_adam_warmup_hint(lr: float, warmup: bool, expected: bool) -> None:
    x, y = tabular()
    cb = NormCheck(print_summary=False, activations=False, bugs=False)
    fit(warmup_model(lr, warmup), loader(TensorDataset(x, y)), [cb], max_steps=6, log_every_n_steps=50)
    hints = [f for f in cb.findings if f.code == "weight_norm_growth" and "warm-up" in f.message]
    assert bool(hints) == expected
    if expected:
        assert hints[0].severity == "info" and "AdamW runs at its full LR (0.05)" in hints[0].message


# --- arguments ---------------------------------------------------------------------------------------------------
def test_arguments_are_validated_and_data_can_be_switched_off() -> None:
    with pytest.raises(ValueError, match="NormCheck: `spike_factor`"):
        NormCheck(spike_factor=0.5)
    with pytest.raises(TypeError, match="NormCheck: `data`"):
        NormCheck(data="yes")  # type: ignore[arg-type]
    names = [m.name for m in NormCheck()._monitors]
    assert names[:2] == ["batch_scale", "gradient_spikes"]  # first: their findings precede the gradient diagnosis
    assert "batch_scale" not in [m.name for m in NormCheck(data=False)._monitors]
    assert "gradient_spikes" in [m.name for m in GradientNormMonitor()._monitors]
    assert math.isclose(NormCheck(spike_factor=20).thresholds.gradients.spike_factor, 20.0)


def test_batch_hooks_do_not_sync_with_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the flush, the data monitors only queue device tensors: no .item()/float()/bool()/.tolist()."""
    from lightning_normcheck.callbacks import _signals

    def forbid(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host sync in a hot-path hook")

    def no_sync(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with pytest.MonkeyPatch.context() as mp:
                for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
                    mp.setattr(torch.Tensor, name, forbid)
                return fn(*args, **kwargs)

        return wrapped

    for cls, hooks in (
        (_signals._BatchScale, ("on_train_batch_start", "on_before_backward")),
        (_signals._GradientSpikes, ("on_train_batch_start",)),
    ):
        for hook in hooks:
            monkeypatch.setattr(cls, hook, no_sync(getattr(cls, hook)))
    x, y = tabular()
    x[:, 1] = x[:, 1] * 1e3 + 5e3
    cb = NormCheck(print_summary=False)
    fit(LitModel(mlp(), lr=1e-3), loader(TensorDataset(x, 1e4 * y + 3e4)), [cb], max_steps=4, log_every_n_steps=50)
    assert cb.disabled_monitors == []
    assert {"input_scale", "label_scale"} <= codes(cb.findings)


def test_batch_structures_and_target_guess() -> None:
    from dataclasses import dataclass

    from lightning_normcheck.callbacks._signals import _guess_target, _walk

    @dataclass
    class Batch:
        features: torch.Tensor
        target: torch.Tensor
        ids: torch.Tensor

    x, y, ids = torch.randn(4, 3), torch.randn(4, 1), torch.arange(4)
    found: list[Any] = []
    _walk(Batch(x, y, ids), "batch", 0, found)
    assert [(d, lb) for d, lb, _ in found] == [("batch.features", "features"), ("batch.target", "target")]
    assert _guess_target(Batch(x, y, ids))[0] is y
    found = []
    _walk({"inputs": {"num": x, "tok": ids}, "labels": y}, "batch", 0, found)
    assert [d for d, _, _ in found] == ["batch['inputs']['num']", "batch['labels']"]
    assert _guess_target({"inputs": {"num": x}, "labels": y})[0] is y
    assert _guess_target((x, y))[0] is y
    assert _guess_target((x, ids))[0] is None  # class ids: classification, no regression target
    assert _guess_target((x,))[0] is None and _guess_target(x)[0] is None
    assert _guess_target((x, torch.randn(5, 1)))[0] is None  # not one value per example
