"""Memory soak: process memory and the package's own live allocations over a long run with NormCheck().

Run from the repository root::

    python benchmarks/memory_soak.py                 # 5,000 steps with NormCheck(), then 5,000 without
    python benchmarks/memory_soak.py --steps 2000    # shorter
    python benchmarks/memory_soak.py --logger csv    # with a CSVLogger (files in a temporary folder)
    python benchmarks/memory_soak.py --no-tracemalloc

A small MLP with BatchNorm and Dropout trains on random data (CPU, one thread) for ``--steps`` optimizer
steps with ``NormCheck()`` at its defaults (so every monitor runs: per-step gradient totals, sampled
activations, weight snapshots, clipping windows, the training-bug detector's probes), then the same run
without the callback as a baseline (Lightning and torch allocate a little on their own). Printed:

* the process RSS (``/proc/self/status``, VmRSS) every ``--every`` steps;
* with tracemalloc (default on), the bytes still held by allocations made in ``lightning_normcheck``
  files at each checkpoint: what the callback keeps (histories, windows, references), which must reach a
  plateau rather than grow with the number of steps;
* one summary line to quote: RSS growth after warm-up with and without NormCheck, and the package's own
  live memory at warm-up and at the end.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
import tracemalloc
import warnings
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
for _name in ("lightning.pytorch", "lightning.fabric", "lightning_normcheck"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)

from lightning_normcheck import NormCheck  # noqa: E402

MIB = 1024.0 * 1024.0


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _package_snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*lightning_normcheck*")])


def package_bytes() -> int:
    """Bytes currently held by allocations made in lightning_normcheck source files (tracemalloc)."""
    if not tracemalloc.is_tracing():
        return 0
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(True, "*lightning_normcheck*")])
    return sum(s.size for s in snap.statistics("filename"))


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(32, 64),
            nn.BatchNorm1d(64),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(64, 64),
            nn.Tanh(),
            nn.Linear(64, 64),
            nn.ReLU(),
            nn.Linear(64, 4),
        )

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1000)}


class Probe(L.Callback):
    """Records RSS (and the package's live bytes) every ``every`` optimizer steps."""

    def __init__(self, every: int, traced: bool) -> None:
        self.every = every
        self.traced = traced
        self.rows: list[tuple[int, float, int]] = []
        self.snapshots: list[tracemalloc.Snapshot] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0:
            row = (step, rss_mib(), package_bytes() if self.traced else 0)
            if self.traced and len(self.snapshots) < 2:
                self.snapshots.append(_package_snapshot())
            elif self.traced:
                self.snapshots[1] = _package_snapshot()
            self.rows.append(row)
            extra = f"  lightning_normcheck live {row[2] / 1024:8.1f} KiB" if self.traced else ""
            print(f"  step {step:>6}  RSS {row[1]:8.1f} MiB{extra}", flush=True)


def soak(
    steps: int, every: int, with_callback: bool, logger: str, traced: bool, log_every: int = 50
) -> tuple[Probe, float]:
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g)
    y = x[:, :4].argmax(1)
    data = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    probe = Probe(every, traced)
    callbacks: list[Any] = [probe] + ([NormCheck(print_summary=False)] if with_callback else [])
    tmp = tempfile.mkdtemp(prefix="normcheck_soak_")
    log: Any = False
    if logger == "csv":
        from lightning.pytorch.loggers import CSVLogger

        log = CSVLogger(tmp)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=log,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=log_every,
        num_sanity_val_steps=0,
        default_root_dir=tmp,
    )
    t0 = time.perf_counter()
    trainer.fit(Net(), data)
    return probe, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--every", type=int, default=500, help="print every N optimizer steps")
    parser.add_argument("--log-every", type=int, default=50, help="the Trainer's log_every_n_steps")
    parser.add_argument("--logger", choices=["none", "csv"], default="none")
    parser.add_argument("--no-tracemalloc", action="store_true")
    parser.add_argument("--top", type=int, default=5, help="print the N lines whose allocations grew most")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without NormCheck")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    traced = not args.no_tracemalloc
    if traced:
        tracemalloc.start()
    print(
        f"memory_soak: torch {torch.__version__}, lightning {L.__version__}, python {sys.version.split()[0]}, "
        f"{args.steps} steps, log_every_n_steps={args.log_every}, logger={args.logger}, tracemalloc={'on' if traced else 'off'}"
    )
    print("with NormCheck():")
    probe, secs = soak(args.steps, args.every, True, args.logger, traced, args.log_every)
    rows = probe.rows
    if traced and len(probe.snapshots) == 2 and args.top:
        print(f"largest growth of lightning_normcheck allocations, step {rows[0][0]} -> {rows[-1][0]}:")
        for stat in probe.snapshots[1].compare_to(probe.snapshots[0], "lineno")[: args.top]:
            print(f"  {stat}")
    base: list[Any] = []
    if not args.no_baseline:
        print("without NormCheck (baseline):")
        base_probe, base_secs = soak(args.steps, args.every, False, args.logger, False, args.log_every)
        base = base_probe.rows
    warm = min(len(rows) - 1, 1)  # the first printed step after step 0 is the warm-up point
    growth = rows[-1][1] - rows[warm][1]
    line = (
        f"memory_soak: {args.steps} steps with NormCheck(): RSS {rows[warm][1]:.1f} MiB at step {rows[warm][0]}"
        f" -> {rows[-1][1]:.1f} MiB at step {rows[-1][0]} ({growth:+.1f} MiB)"
    )
    if base:
        b_growth = base[-1][1] - base[warm][1]
        line += f"; without it {b_growth:+.1f} MiB"
    if traced:
        line += (
            f"; memory held by lightning_normcheck {rows[warm][2] / 1024:.0f} KiB at step {rows[warm][0]},"
            f" {rows[-1][2] / 1024:.0f} KiB at step {rows[-1][0]}"
        )
    line += f" ({secs:.0f} s" + (f", baseline {base_secs:.0f} s)" if base else ")")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
