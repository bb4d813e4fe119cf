"""Time spent inside NormCheck() per training step, measured directly, against the step time without it.

Run from the repository root::

    python benchmarks/hook_time.py            # ~4 min on a 2-core CPU
    python benchmarks/hook_time.py --quick    # ~1 min

Why a second measure: ``overhead.py`` compares whole training runs with and without the callback. On a
shared machine, runs without any callback differ from each other by 5-15% (other processes, frequency
scaling, memory bandwidth), so an overhead of 1-2% is below what that A/B comparison resolves. Here the
CPU time of the training thread spent *inside* the callback is clocked directly: every Lightning hook of
the callback and every hook it places in the user's code (forward, tensor-gradient and optimizer-step
hooks, all of which go through its guard) is wrapped in a ``time.thread_time()`` pair, outermost call only.
Summed over the same timed window as ``overhead.py`` (steps 30-129 at ``log_every_n_steps=50``: two
logging steps; steps 25-44 at ``=1``) and divided by the number of steps, it is the callback's own cost per
step; divided by the median step time of runs without the callback (same models, same Trainer), it gives
``1 + inside / step``. What it leaves out, and the A/B runs include: the TensorBoard writer thread (it
writes the events on the other core) and any slowdown the callback's memory traffic causes in the user's
own kernels; so it is a lower bound, but a precise one.

Writes ``benchmarks/HOOK_TIME.md`` and prints it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as B  # noqa: E402  (the models, the Trainer set-up and the timing of overhead.py)

from lightning_normcheck import NormCheck  # noqa: E402

HERE = Path(__file__).resolve().parent
HOOKS = (
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class HookClock(Callback):
    """Placed first: knows the step of the current batch; wraps a callback's hooks to clock them."""

    def __init__(self) -> None:
        self.step = -1
        self.depth = 0
        self.inside: dict[int, float] = defaultdict(float)  # step -> CPU seconds inside the callback

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int) -> None:
        self.step = trainer.global_step

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def clocked(*args: Any, **kwargs: Any) -> Any:
            if self.depth:  # nested (a hook that runs inside another clocked call): counted by the outer one
                return fn(*args, **kwargs)
            self.depth = 1
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside[self.step] += time.thread_time() - t0
                self.depth = 0

        return clocked

    def instrument(self, cb: NormCheck) -> NormCheck:
        for name in HOOKS:
            setattr(cb, name, self.wrap(getattr(cb, name)))  # Lightning looks hooks up on the instance
        guard = cb._guard
        cb._guard = lambda monitor, fn: self.wrap(guard(monitor, fn))  # type: ignore[method-assign]
        return cb


def measure(spec: B.ModelSpec, cadence: int, repeats: int, warmup: int, window: int) -> dict[str, Any]:
    base_runs: list[list[float]] = []
    inside: list[float] = []
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(repeats):
            base_runs.append(B.run_once(spec, B.BY_NAME["none"], cadence, warmup, window, logdir)["cpu"])
            clock = HookClock()
            config = B.Config(
                "normcheck_clocked",
                "NormCheck() defaults",
                lambda clock=clock: [clock, clock.instrument(NormCheck(print_summary=False))],
            )
            B.run_once(spec, config, cadence, warmup, window, logdir)
            per_step = sum(clock.inside.get(s, 0.0) for s in range(warmup, warmup + window)) / window
            inside.append(per_step)
            print(f"  [{spec.name} every={cadence} rep={r}] inside NormCheck {per_step * 1e3:.3f} ms/step", flush=True)
    step = B.step_median_time(base_runs, window)
    return {
        "step_ms": step * 1e3,
        "inside_ms": statistics.median(inside) * 1e3,
        "inside_range_ms": (min(inside) * 1e3, max(inside) * 1e3),
        "ratio": 1.0 + statistics.median(inside) / step,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=",".join(B.MODELS))
    p.add_argument("--cadences", default="50,1")
    p.add_argument("--out", default=str(HERE / "HOOK_TIME.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    repeats = 2 if args.quick else 3
    rows = []
    t_start = time.time()
    for cadence in [int(c) for c in args.cadences.split(",")]:
        warmup, window = (30, 100) if cadence != 1 else (25, 20)
        for m in args.models.split(","):
            res = measure(B.MODELS[m], cadence, repeats, warmup, window)
            rows.append((cadence, m, res))
    goals = {"transformer": 1.02, "resmlp": 1.02, "stack450": 1.05}
    lines = [
        "# Time inside NormCheck() per training step",
        "",
        f"Machine: {B.machine()}.",
        "",
        f"Command: `python benchmarks/hook_time.py{' --quick' if args.quick else ''}` ({repeats} repeats, finished "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t_start:.0f} s). CPU time of the "
        "training thread inside the callback's hooks (outermost call), per step over the timed window, median over "
        "the repeats (range in brackets); the step time is the step-median of runs without the callback.",
        "",
        "| Trainer log_every_n_steps | model | step without callback | inside NormCheck() per step | 1 + inside / step |"
        " goal |",
        "|---|---|---|---|---|---|",
    ]
    for cadence, m, res in rows:
        lo, hi = res["inside_range_ms"]
        goal = goals.get(m) if cadence == 50 else None
        verdict = "" if goal is None else f"<= {goal:.2f}x: {'holds' if res['ratio'] <= goal else 'MISSED'}"
        lines.append(
            f"| {cadence} | {B.MODELS[m].title} | {res['step_ms']:.2f} ms | {res['inside_ms']:.3f} ms "
            f"({lo:.3f}-{hi:.3f}) | {res['ratio']:.3f}x | {verdict} |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
