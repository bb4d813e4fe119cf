"""Training-step overhead of the lightning_normcheck callbacks against Lightning's own recipe and naive hooks.

Run from the repository root (one command; ``--quick`` for a short smoke run)::

    python benchmarks/overhead.py            # full: ~15 min on a 2-core CPU
    python benchmarks/overhead.py --quick    # ~3 min, noisier

What is timed, separately:

- the *start-up*: from the start of ``fit`` (the timing callback's ``setup``, before NormCheck's) to the
  ``on_train_batch_start`` of step ``warmup``: Lightning's and the callbacks' set-up and the first steps, in which
  NormCheck samples densely (every step below 4, every other step below 20) whatever the cadence; and
- the *steady state*: the time of a training step (``on_train_batch_start`` of step ``warmup`` to
``on_train_batch_start`` of step ``warmup + window``, so data fetch, forward, backward, clipping, the optimizer
step, every callback hook and the logger are all inside), on a real ``lightning.Trainer`` with a
``TensorBoardLogger``. The window is a whole number of logging periods, so logging steps count in proportion.
The first steps (where NormCheck samples densely) are left out by the warm-up. At
``log_every_n_steps=1`` the warm-up is longer (40 steps) so that the overhead budget (``max_overhead``, which
first decides at step 30) is in force, and the window of the configurations that have one (and of the floor) is
200 steps. Configurations run interleaved
(a baseline run without callback after every few configurations, the order rotated each repeat) and each
configuration's time is divided by the mean of the two nearest baseline runs. The table gives the median of
those ratios over the repeats and their spread (lowest and highest).

*Cost = floor + excess*: the floor is a bare callback that only computes ``torch.nn.utils.get_total_norm`` of all
gradients in ``on_before_optimizer_step`` every step (what ``normcheck/grad_norm/total`` of every step needs at
least); the excess is NormCheck's step time minus the floor's, in % of the step time without callback (per repeat,
the two runs' ratios to their neighbouring baseline runs; median and range).

Writes ``benchmarks/RESULTS.md`` (tables + goal checks), ``benchmarks/results.json`` (every raw time) and
``benchmarks/overhead.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_normcheck import (
    ActivationNormMonitor,
    ClipRateTracker,
    GradientNormMonitor,
    NormCheck,
    TrainingBugDetector,
    WeightDriftMonitor,
)

HERE = Path(__file__).resolve().parent
#: Every run clips (so ClipRateTracker has work); a safety-net value above the healthy gradient norms here.
CLIP = 20.0
warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric", "lightning_normcheck"):
    logging.getLogger(_name).setLevel(logging.ERROR)


# models ------------------------------------------------------------------------------------------------------
class Transformer(nn.Module):
    """6-layer pre-norm transformer encoder, d_model=128, 4 heads, feed-forward 512, on (batch, 32, 128)."""

    def __init__(self, d: int = 128, layers: int = 6) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(1))


class ResBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


class ResMLP(nn.Module):
    """16 pre-norm residual blocks of width 256 (LayerNorm, Linear, ReLU, Linear), final LayerNorm, head."""

    def __init__(self, width: int = 256, blocks: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x)))


class SmallBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.fc(self.norm(x)))


class Stack450(nn.Module):
    """150 residual blocks of (LayerNorm, Linear, ReLU) at width 32 (450 small layers), final LayerNorm, head."""

    def __init__(self, width: int = 32, blocks: int = 150) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SmallBlock(width) for _ in range(blocks)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.blocks(x)))


@dataclass
class ModelSpec:
    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]


MODELS: dict[str, ModelSpec] = {
    "transformer": ModelSpec("transformer", "6-layer transformer (d=128)", Transformer, (16, 32, 128)),
    "resmlp": ModelSpec("resmlp", "16-block residual MLP (width 256)", ResMLP, (64, 256)),
    "stack450": ModelSpec("stack450", "450-module stack of small layers", Stack450, (32, 32)),
}


class Batches(Dataset):
    """A few fixed batches, cycled (no collate cost in the timed loop)."""

    def __init__(self, shape: tuple[int, ...], length: int, distinct: int = 8) -> None:
        g = torch.Generator().manual_seed(0)
        self.data = [(torch.randn(*shape, generator=g), torch.randn(shape[0], 1, generator=g)) for _ in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.data[i % len(self.data)]


class LitBench(L.LightningModule):
    """A plain regression LightningModule (AdamW, logs its loss) that can run Lightning's grad_norm recipe."""

    def __init__(self, net: nn.Module, recipe: str | None = None) -> None:
        super().__init__()
        self.net = net
        self.recipe = recipe  # None, "every_step" or "cadence"

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning's documented recipe (docs "Track and Visualize Experiments" / utilities.grads.grad_norm)
        if self.recipe is None:
            return
        if self.recipe == "cadence" and self.trainer.global_step % self.trainer.log_every_n_steps != 0:
            return
        self.log_dict(grad_norm(self, norm_type=2))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


# naive anchors ----------------------------------------------------------------------------------------------
class NaiveItemLoop(Callback):
    """Per-parameter ``p.grad.norm().item()`` every step; one ``log_metrics`` call at the logging cadence."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        norms = {
            f"naive/grad_norm/{n}": p.grad.norm().item() for n, p in pl_module.named_parameters() if p.grad is not None
        }
        if trainer.global_step % trainer.log_every_n_steps == 0 and trainer.logger is not None:
            trainer.logger.log_metrics(norms, step=trainer.global_step)


class NaiveForwardHooks(Callback):
    """A forward hook on every leaf module, always attached, computing the output norm on every call."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.norms: list[Tensor] = []
        self.names: list[str] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name, m in pl_module.named_modules():
            if name and not any(True for _ in m.children()):
                self.names.append(name)
                self.handles.append(m.register_forward_hook(self._hook))

    @torch.no_grad()
    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self.norms.append(output.detach().norm())

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if trainer.global_step % trainer.log_every_n_steps == 0 and trainer.logger is not None and self.norms:
            values = torch.stack(self.norms).tolist()
            trainer.logger.log_metrics({f"naive/act_norm/{i}": v for i, v in enumerate(values)}, trainer.global_step)
        self.norms = []

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for h in self.handles:
            h.remove()


class FloorNorm(Callback):
    """The floor: only ``torch.nn.utils.get_total_norm`` of all gradients, every optimizer step (kept on the device,
    as NormCheck keeps its total until the logging step)."""

    def __init__(self) -> None:
        self.total: Tensor | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.total = torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None])


# configurations ---------------------------------------------------------------------------------------------
@dataclass
class Config:
    name: str
    label: str
    make: Callable[[], list[Callback]]
    recipe: str | None = None
    cadences: tuple[int, ...] = (50, 1)  # 1: runs at log_every_n_steps=1; 50: runs at any other cadence
    kind: str = "normcheck"  # "normcheck" or "anchor"

    def runs_at(self, cadence: int) -> bool:
        return (1 if cadence == 1 else 50) in self.cadences


def _quiet(cls: type, **kw: Any) -> Callable[[], list[Callback]]:
    return lambda: [cls(print_summary=False, **kw)]


CONFIGS: list[Config] = [
    Config("none", "no callback", lambda: [], kind="baseline"),
    Config("floor", "floor: get_total_norm of all gradients, every step", lambda: [FloorNorm()], kind="floor"),
    Config("normcheck", "NormCheck() defaults", _quiet(NormCheck)),
    Config(
        "normcheck_nobudget",
        "NormCheck(max_overhead=None): no budget",
        _quiet(NormCheck, max_overhead=None),
        cadences=(1,),  # at the default cadence the budget rarely acts
    ),
    Config("gradient", "GradientNormMonitor()", _quiet(GradientNormMonitor)),
    Config("activation", "ActivationNormMonitor()", _quiet(ActivationNormMonitor)),
    Config("weight", "WeightDriftMonitor()", _quiet(WeightDriftMonitor)),
    Config("clip", "ClipRateTracker()", _quiet(ClipRateTracker)),
    Config("bugs", "TrainingBugDetector()", _quiet(TrainingBugDetector)),
    Config(
        "gradient_every_step",
        "GradientNormMonitor(log_every_n_steps=1): every layer, every step",
        _quiet(GradientNormMonitor, log_every_n_steps=1),
        cadences=(50,),  # at log_every_n_steps=1 this is GradientNormMonitor()
    ),
    Config("pl_every_step", "Lightning grad_norm + log_dict, every step", lambda: [], "every_step", kind="anchor"),
    Config(
        "pl_cadence",
        "Lightning grad_norm + log_dict, every log_every_n_steps",
        lambda: [],
        "cadence",
        cadences=(50,),  # at log_every_n_steps=1 this is the every-step recipe
        kind="anchor",
    ),
    Config("naive_item", "naive per-parameter .item() loop, every step", lambda: [NaiveItemLoop()], kind="anchor"),
    Config("naive_hooks", "naive forward hooks, norm on every call", lambda: [NaiveForwardHooks()], kind="anchor"),
]
BY_NAME = {c.name: c for c in CONFIGS}


class StepTimer(Callback):
    """Per-step times of steps ``warmup .. warmup + window - 1`` (the first callback, so it brackets the others).

    A step's time runs from its ``on_train_batch_start`` to the next one's: data, forward, backward, clipping,
    the optimizer step, every callback hook and the logger. Both the wall-clock time and the CPU time of the
    training thread (``time.thread_time``) are kept: the latter is not inflated while the thread waits for a core
    that another process holds.
    """

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup, self.window = warmup, window
        self.marks: list[tuple[float, float]] = []
        self.start: tuple[float, float] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.start = (time.perf_counter(), time.thread_time())

    def startup(self, clock: str) -> float:
        """Seconds from the start of fit to the start of step ``warmup``."""
        assert self.start is not None and self.marks
        k = 0 if clock == "wall" else 1
        return self.marks[0][k] - self.start[k]

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.warmup <= trainer.global_step <= self.warmup + self.window:
            self.marks.append((time.perf_counter(), time.thread_time()))

    def steps(self, clock: str) -> list[float]:
        if len(self.marks) != self.window + 1:
            raise RuntimeError("the timing window did not complete")
        k = 0 if clock == "wall" else 1
        return [b[k] - a[k] for a, b in zip(self.marks, self.marks[1:])]


def run_once(
    spec: ModelSpec, config: Config, cadence: int, warmup: int, window: int, logdir: str, clip: float | None = CLIP
) -> dict[str, Any]:
    """One fit (``clip``: the Trainer's ``gradient_clip_val``, by norm; None: no clipping); the seconds of each timed step, by wall clock and by thread CPU time (``cpu``, ``wall``), the
    start-up (``startup_cpu``, ``startup_wall``) and, for NormCheck, its per-layer cadence at the end (``cadence``).

    Every run starts with a full garbage collection, whatever its configuration: the runs before it in this process
    leave garbage behind, and Python's full collection (0.3-0.4 s here, with ~455,000 tracked objects) falls in
    whichever later run tips its threshold, most often the one that allocates most early on (seen inside
    NormCheck's first steps in 3 of 3 repeats). Collections that a run's own allocations trigger still count."""
    gc.collect()
    torch.manual_seed(0)
    model = LitBench(spec.build(), recipe=config.recipe)
    timer = StepTimer(warmup, window)
    callbacks = config.make()
    steps = warmup + window + 1
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=1,
        logger=TensorBoardLogger(logdir, name=f"{spec.name}_{config.name}_{cadence}"),
        log_every_n_steps=cadence,
        gradient_clip_val=clip,
        callbacks=[timer, *callbacks],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(Batches(spec.input_shape, steps), batch_size=None, num_workers=0)
    trainer.fit(model, loader)
    out: dict[str, Any] = {c: timer.steps(c) for c in CLOCKS}
    out.update({f"startup_{c}": timer.startup(c) for c in CLOCKS})
    runs = [getattr(cb, "_run", None) for cb in callbacks if isinstance(cb, NormCheck)]
    if runs and runs[0] is not None:
        out["cadence"] = runs[0].every
    return out


CLOCKS = ("cpu", "wall")


def schedule(names: list[str], repeat: int, baseline_every: int) -> list[str]:
    """Rotated order with a baseline run before, between every few, and after the configurations."""
    k = repeat % len(names)
    order = names[k:] + names[:k]
    out = ["none"]
    for i, n in enumerate(order):
        out.append(n)
        if (i + 1) % baseline_every == 0 or i == len(order) - 1:
            out.append("none")
    return out


def step_median_time(runs: list[list[float]], window: int) -> float:
    """Mean over the window of each step's median over the runs (robust to a run slowed by other processes, while
    a cost that recurs at the same step in every run, such as a logging step, is kept)."""
    return sum(statistics.median(r[i] for r in runs) for i in range(window)) / window


def measure(
    spec: ModelSpec, cadence: int, names: list[str], repeats: int, warmup: int, windows: dict[str, int], logdir: str
) -> dict[str, dict[str, dict[str, Any]]]:
    """Interleaved, repeated runs: ``{config: {clock: {"runs", "ratio", "ratios", "time"}}}``.

    ``ratio``: the step-median time of the configuration over that of the baseline, over the same steps;
    ``ratios``: per repeat, the mean step time of the run over the mean of its two neighbouring baseline runs.
    """
    full = max(windows.values())
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in ["none", *names]}
    paired: dict[str, dict[str, list[float]]] = {n: {c: [] for c in CLOCKS} for n in names}
    for r in range(repeats):
        seq = schedule(names, r, baseline_every=3)
        times: list[dict[str, Any]] = []
        for n in seq:
            w = full if n == "none" else windows[n]
            t = run_once(spec, BY_NAME[n], cadence, warmup, w, logdir)
            times.append(t)
            runs[n].append(t)
            print(
                f"  [{spec.name} every={cadence} rep={r}] {n:20s} cpu {statistics.mean(t['cpu']) * 1e3:8.2f} "
                f"ms/step, wall {statistics.mean(t['wall']) * 1e3:8.2f} ms/step, start-up {t['startup_wall']:.2f} s"
                + (f", cadence {t['cadence']}" if "cadence" in t else ""),
                flush=True,
            )
        base_pos = [i for i, n in enumerate(seq) if n == "none"]
        for i, n in enumerate(seq):
            if n == "none":
                continue
            before = max(p for p in base_pos if p < i)
            after = min(p for p in base_pos if p > i)
            w = windows[n]
            for c in CLOCKS:
                base = (statistics.mean(times[before][c][:w]) + statistics.mean(times[after][c][:w])) / 2
                paired[n][c].append(statistics.mean(times[i][c]) / base)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for n, rs in runs.items():
        w = full if n == "none" else windows[n]
        out[n] = {}
        for c in CLOCKS:
            mine = step_median_time([x[c] for x in rs], w)
            base = step_median_time([x[c] for x in runs["none"]], w)
            out[n][c] = {
                "run_means": [statistics.mean(x[c]) for x in rs],
                "time": mine,
                "ratio": mine / base,
                "ratios": paired[n][c] if n != "none" else [],
                "startups": [x[f"startup_{c}"] for x in rs],
                "startup": statistics.median(x[f"startup_{c}"] for x in rs),
                "cadences": [x["cadence"] for x in rs if "cadence" in x],
            }
    return out


def excess(cells: dict[str, Any], name: str, clock: str) -> tuple[float, float, float] | None:
    """Step time of ``name`` minus the floor's, in units of the step time without callback: the median over the
    repeats of the difference of the two runs' ratios to their neighbouring baseline runs, and its range."""
    mine, floor = cells.get(name, {}).get(clock), cells.get("floor", {}).get(clock)
    if not mine or not floor or not mine["ratios"] or not floor["ratios"]:
        return None
    diffs = [a - b for a, b in zip(mine["ratios"], floor["ratios"])]
    return statistics.median(diffs), min(diffs), max(diffs)


# reporting -------------------------------------------------------------------------------------------------
def fmt_ratio(cell: dict[str, Any] | None) -> str:
    if not cell:
        return "n/a"
    r = cell["ratios"]
    spread = f" ({min(r):.3f}-{max(r):.3f})" if r else ""
    return f"{cell['ratio']:.3f}x{spread}"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import lightning

    return (
        f"{cpu}, {os.cpu_count()} cores shared with other work, torch {torch.__version__} with "
        f"torch.set_num_threads(1), lightning {lightning.__version__}, Python {platform.python_version()}; no GPU"
    )


def table(results: dict[str, Any], cadence: int, clock: str) -> list[str]:
    models = [m for m in results["models"] if str(cadence) in results["cells"][m]]
    lines = ["| configuration | " + " | ".join(MODELS[m].title for m in models) + " |"]
    lines.append("|---|" + "---|" * len(models))
    row = ["no callback (time per step)"]
    for m in models:
        row.append(f"{results['cells'][m][str(cadence)]['none'][clock]['time'] * 1e3:.2f} ms")
    lines.append("| " + " | ".join(row) + " |")
    for cfg in CONFIGS[1:]:
        if not cfg.runs_at(cadence):
            continue
        if not any(cfg.name in results["cells"][m][str(cadence)] for m in models):
            continue
        row = [cfg.label]
        for m in models:
            c = results["cells"][m][str(cadence)].get(cfg.name)
            row.append(fmt_ratio(c[clock] if c else None))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def floor_table(results: dict[str, Any], cadence: int, clock: str) -> list[str]:
    """Steady state, cost = floor + excess: per model, the floor, each NormCheck configuration and its excess."""
    models = [m for m in results["models"] if str(cadence) in results["cells"][m]]
    names = [c for c in CONFIGS if c.kind == "normcheck" and c.name.startswith("normcheck") and c.runs_at(cadence)]
    lines = ["| model | no callback | floor | " + " | ".join(f"{c.label}: ratio, excess" for c in names) + " |"]
    lines.append("|---|---|---|" + "---|" * len(names))
    for m in models:
        cells = results["cells"][m][str(cadence)]
        if "floor" not in cells:
            continue
        row = [MODELS[m].title, f"{cells['none'][clock]['time'] * 1e3:.2f} ms", fmt_ratio(cells["floor"][clock])]
        for c in names:
            ex = excess(cells, c.name, clock)
            cad = cells.get(c.name, {}).get(clock, {}).get("cadences") or []
            said = f", per-layer cadence at the end {sorted(set(cad))}" if cad and cadence == 1 else ""
            row.append(
                "n/a"
                if ex is None
                else f"{fmt_ratio(cells[c.name][clock])}, {ex[0] * 100:+.2f}% ({ex[1] * 100:+.2f} to {ex[2] * 100:+.2f}){said}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return lines


def startup_table(results: dict[str, Any], clock: str) -> list[str]:
    """Start-up (fit start to step ``warmup``): median seconds and the excess over the runs without callback."""
    lines = ["| Trainer log_every_n_steps | model | no callback | floor | NormCheck() | excess of NormCheck() |"]
    lines.append("|---|---|---|---|---|---|")
    for m in results["models"]:
        for cadence in results["cadences"]:
            cells = results["cells"][m].get(str(cadence), {})
            if "normcheck" not in cells or "startups" not in cells["normcheck"][clock]:
                continue  # a cell kept by --update from a run that did not time the start-up
            none, nc = cells["none"][clock], cells["normcheck"][clock]
            floor = cells.get("floor", {}).get(clock)
            lo, hi = min(nc["startups"]), max(nc["startups"])
            lines.append(
                f"| {cadence} | {MODELS[m].title} | {none['startup']:.2f} s | "
                + (f"{floor['startup']:.2f} s" if floor else "n/a")
                + f" | {nc['startup']:.2f} s ({lo:.2f}-{hi:.2f}) | {nc['startup'] - none['startup']:+.2f} s |"
            )
    return lines


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    clock = args.clock
    other = "wall" if clock == "cpu" else "cpu"
    names = {"cpu": "CPU time of the training thread", "wall": "wall-clock time"}
    lines = ["# lightning_normcheck overhead benchmark", ""]
    lines.append(f"Machine: {results['machine']}.")
    lines.append("")
    lines.append(
        "Command: "
        + "; ".join(
            f"`{part['command']}` ({part.get('repeats', args.repeats)} repeats, finished {part['finished']}, "
            f"{part['seconds'] / 60:.0f} min)"
            for part in results.get("parts", [])
        )
        + f" (interleaved repeats; steady state over {args.window} "
        f"steps ({args.window_anchor} for the anchors) after {args.warmup} warm-up steps, {args.window1} after "
        f"{args.warmup1} at log_every_n_steps=1, {args.window1_budget} for NormCheck() and the floor there). Every run: `lightning.Trainer` on CPU, `TensorBoardLogger`, "
        f"`gradient_clip_val={CLIP}`, AdamW, the model logs its loss with `self.log` every step."
    )
    lines.append("")
    lines.append(
        f"Cells: {names[clock]} per training step relative to the same training without any callback. The "
        "headline number compares, step by step over the timed window, the median over the repeats (so a run "
        "slowed by another process does not count, while a cost that recurs at the same step in every run, such "
        "as a logging step, does); in brackets the lowest and highest ratio of single runs to their neighbouring "
        "baseline runs. The first row is the time per step without callback."
    )
    for cadence in results["cadences"]:
        lines += ["", f"## Trainer(log_every_n_steps={cadence}), {names[clock]}", ""]
        lines += table(results, cadence, clock)
    lines += [
        "",
        f"## Cost = floor + excess (steady state), {names[clock]}",
        "",
        "Floor: a bare callback computing `torch.nn.utils.get_total_norm` of all gradients every step. Excess: "
        "NormCheck's step time minus the floor's, in % of the step time without callback (median over the repeats, "
        "range in brackets). `NormCheck()` has the overhead budget `max_overhead=0.03` on; at log_every_n_steps=1 "
        "the per-layer cadence it ends at is given (its stretch of the per-layer sampling).",
    ]
    for cadence in results["cadences"]:
        lines += ["", f"Trainer(log_every_n_steps={cadence}):", ""]
        lines += floor_table(results, cadence, clock)
    lines += [
        "",
        f"## Start-up, {names[clock]}",
        "",
        f"From the start of fit to the start of step {args.warmup} ({args.warmup1} at log_every_n_steps=1): the "
        "set-up of Lightning and the callbacks and the first steps, where NormCheck samples densely. Median over the "
        "repeats (range in brackets).",
        "",
    ]
    lines += startup_table(results, clock)
    lines += ["", f"## Same runs, {names[other]}", ""]
    for cadence in results["cadences"]:
        lines += ["", f"Trainer(log_every_n_steps={cadence}):", ""]
        lines += table(results, cadence, other)
    lines += ["", "## Goals", ""]
    lines += [f"- {g}" for g in results["goals"]]
    lines += [
        "- No host sync on steps that log nothing: checked by `tests/test_no_sync.py` (counts `.item()`, "
        "`.tolist()`, `.cpu()`, `.numpy()`, `bool()`, `float()`, `int()` on tensors from lightning_normcheck code).",
        "",
        "Memory (peak and steady, 5,000 steps): see `benchmarks/memory_soak.py`.",
        "",
        "GPU: none was available in the session that produced these numbers; all timings are CPU.",
        "",
        "![overhead](overhead.png)",
        "",
    ]
    return "\n".join(lines)


def goals(results: dict[str, Any], clock: str) -> list[str]:
    out = []
    default = str(next((c for c in results["cadences"] if c != 1), 50))
    for m in results["models"]:
        ex = excess(results["cells"].get(m, {}).get(default, {}), "normcheck", clock)
        if ex is None:
            continue
        verdict = "holds" if ex[0] <= 0.01 else "MISSED"
        out.append(
            f"NormCheck() defaults on the {MODELS[m].title} (log_every_n_steps={default}): excess over the floor "
            f"{ex[0] * 100:+.2f}% of the step ({ex[1] * 100:+.2f} to {ex[2] * 100:+.2f}) (goal <= +1%): {verdict}"
        )
    for m in results["models"]:
        cells = results["cells"].get(m, {}).get("1", {})
        ex, ex_off = excess(cells, "normcheck", clock), excess(cells, "normcheck_nobudget", clock)
        if ex is None:
            continue
        cad = sorted(set(cells["normcheck"][clock].get("cadences") or []))
        off = f" (without the budget: {ex_off[0] * 100:+.1f}%)" if ex_off else ""
        out.append(
            f"NormCheck() (max_overhead=0.03) on the {MODELS[m].title} at log_every_n_steps=1: excess over the floor "
            f"{ex[0] * 100:+.2f}% ({ex[1] * 100:+.2f} to {ex[2] * 100:+.2f}){off}, per-layer cadence stretched to "
            f"{cad} (the budget governs the per-layer part; the every-step part, a flush and a logger call per "
            "logging step, comes on top)"
        )
    cell = results["cells"].get("stack450", {}).get(default, {})
    if "normcheck" in cell and "startup" in cell["normcheck"][clock] and "startup" in cell["none"][clock]:
        extra = cell["normcheck"][clock]["startup"] - cell["none"][clock]["startup"]
        verdict = "holds" if extra <= 0.5 else "MISSED"
        out.append(
            f"Start-up of NormCheck() on the {MODELS['stack450'].title} (set-up and the first steps, over the runs "
            f"without callback): {extra:+.2f} s (goal <= 0.5 s): {verdict}"
        )
    return out


def plot(results: dict[str, Any], path: Path, clock: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return False
    cadences = [str(c) for c in results["cadences"]]
    models = results["models"]
    fig, axes = plt.subplots(
        len(cadences), len(models), figsize=(5.2 * len(models), 4.2 * len(cadences)), squeeze=False
    )
    for row, cadence in enumerate(cadences):
        names = [
            c
            for c in CONFIGS[1:]
            if c.runs_at(int(cadence)) and any(c.name in results["cells"][m][cadence] for m in models)
        ]
        for col, m in enumerate(models):
            ax = axes[row][col]
            cells = results["cells"][m].get(cadence, {})
            ys = list(range(len(names)))
            meds, lo, hi = [], [], []
            for c in names:
                cell = cells.get(c.name, {}).get(clock)
                rs = cell["ratios"] if cell else []
                mid = cell["ratio"] if cell else 1.0
                meds.append(mid)
                lo.append(max(0.0, mid - min(rs)) if rs else 0.0)
                hi.append(max(0.0, max(rs) - mid) if rs else 0.0)
            colors = ["tab:blue" if c.kind == "normcheck" else "tab:red" for c in names]
            ax.barh(ys, [x - 1 for x in meds], left=1, xerr=[lo, hi], color=colors, capsize=2)
            ax.set_yticks(ys)
            ax.set_yticklabels([c.label for c in names] if col == 0 else [], fontsize=7)
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xscale("log")
            lo_x = min([*meds, 1.0]) / 1.02
            hi_x = max([*(m + h for m, h in zip(meds, hi)), 1.0]) * 1.05
            ax.set_xlim(lo_x, hi_x)
            ticks: list[float] = []
            for t in (1.0, 0.95, 0.9, 1.02, 1.05, 1.1, 1.25, 1.5, 2, 3, 5, 8, 12):  # 1x first, then spaced apart
                if lo_x <= t <= hi_x and all(abs(math.log(t / u)) >= math.log(hi_x / lo_x) / 7 for u in ticks):
                    ticks.append(t)
            ticks.sort()
            ax.xaxis.set_major_locator(FixedLocator(ticks))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(axis="x", labelsize=7)
            ax.set_title(f"{MODELS[m].title}\nlog_every_n_steps={cadence}", fontsize=9)
            ax.set_xlabel("step time / no callback (log scale)", fontsize=8)
            ax.invert_yaxis()
    fig.suptitle("Training-step time relative to no callback (blue: lightning_normcheck, red: anchors)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run, noisier)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated: " + ",".join(MODELS))
    p.add_argument("--configs", default=None, help="comma-separated configuration names (default: all)")
    p.add_argument("--cadences", default="50,1", help="Trainer log_every_n_steps values")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--clock",
        choices=CLOCKS,
        default="cpu",
        help="what the main tables and the goals use: CPU time of the training thread (robust when other "
        "processes share the cores) or wall-clock time (both are always reported)",
    )
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    p.add_argument(
        "--update",
        action="store_true",
        help="re-measure only the chosen models and cadences; keep the rest of the existing results.json",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    # warm-up past the dense sampling of the first 20 steps; windows of whole logging periods (50)
    args.warmup, args.window, args.window_anchor = (30, 50, 50) if args.quick else (30, 100, 50)
    args.warmup1, args.window1 = (40, 10) if args.quick else (40, 20)
    # at log_every_n_steps=1 the budget stretches the per-layer cadence to ~100 steps: whole periods of it
    args.window1_budget = 100 if args.quick else 200
    torch.set_num_threads(1)
    models = args.models.split(",")
    cadences = [int(c) for c in args.cadences.split(",")]
    chosen = args.configs.split(",") if args.configs else [c.name for c in CONFIGS[1:]]
    command = "python benchmarks/overhead.py" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    results: dict[str, Any] = {
        "machine": machine(),
        "command": command,
        "clock": args.clock,
        "models": models,
        "cadences": cadences,
        "cells": {},
    }
    t_start = time.time()
    with tempfile.TemporaryDirectory() as logdir:
        for m in models:
            results["cells"][m] = {}
            for cadence in cadences:
                names = [n for n in chosen if BY_NAME[n].runs_at(cadence)]
                if cadence == 1:
                    warmup = args.warmup1
                    long = ("normcheck", "floor")
                    windows = {n: args.window1_budget if n in long else args.window1 for n in names}
                else:
                    warmup = args.warmup
                    windows = {n: args.window_anchor if BY_NAME[n].kind == "anchor" else args.window for n in names}
                results["cells"][m][str(cadence)] = measure(
                    MODELS[m], cadence, names, args.repeats, warmup, windows, logdir
                )
    results["seconds"] = time.time() - t_start
    results["parts"] = [
        {
            "command": command,
            "models": models,
            "cadences": cadences,
            "repeats": args.repeats,
            "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "seconds": results["seconds"],
        }
    ]
    out = Path(args.out)
    previous = out.parent / "results.json"
    if args.update and previous.exists():
        old = json.loads(previous.read_text())
        for m, by_cadence in old.get("cells", {}).items():
            for cadence, cells in by_cadence.items():
                results["cells"].setdefault(m, {}).setdefault(cadence, cells)
        results["models"] = [m for m in MODELS if m in results["cells"]]
        results["cadences"] = sorted(
            {int(c) for by_cadence in results["cells"].values() for c in by_cadence}, key=lambda c: (c == 1, c)
        )
        results["parts"] = old.get("parts", []) + results["parts"]
        results["seconds"] = sum(part["seconds"] for part in results["parts"])
    results["goals"] = goals(results, args.clock)
    (out.parent / "results.json").write_text(json.dumps(results, indent=1))
    text = report(results, args)
    out.write_text(text)
    plot(results, out.parent / "overhead.png", args.clock)
    print(text)
    print(f"wrote {out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
