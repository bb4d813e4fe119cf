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
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_start",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
    "on_train_batch_end",
)


class HookClock(Callback):
    """Placed first: knows the step of the current batch; wraps a callback's hooks, and the Trainer's clipping, to
    clock them (CPU time of the training thread, outermost call only)."""

    def __init__(self) -> None:
        self.step = -1
        self.depth = 0
        self.inside: dict[int, float] = defaultdict(float)  # step -> CPU seconds inside the callback and the clip

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.step = -1  # set-up: counted with the start-up
        plugin = trainer.precision_plugin  # Lightning clips through it (LightningModule.clip_gradients)
        plugin.clip_gradients = self.wrap(plugin.clip_gradients)  # type: ignore[method-assign]

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

    def instrument(self, cb: Callback) -> Callback:
        for name in HOOKS:
            if name in type(cb).__dict__ or isinstance(cb, NormCheck):
                setattr(cb, name, self.wrap(getattr(cb, name)))  # Lightning looks hooks up on the instance
        if isinstance(cb, NormCheck):
            guard = cb._guard
            cb._guard = lambda monitor, fn: self.wrap(guard(monitor, fn))  # type: ignore[method-assign]
        return cb


def clocked_run(
    spec: B.ModelSpec, make: Callable[[], Callback], cadence: int, warmup: int, window: int, logdir: str, clip: Any
) -> tuple[float, float]:
    """One fit with ``make()`` clocked: CPU seconds per step inside it and the clip over the timed window, and in
    all before the window (set-up and the first ``warmup`` steps: the start-up)."""
    clock = HookClock()
    config = B.Config("clocked", "clocked", lambda: [clock, clock.instrument(make())])
    B.run_once(spec, config, cadence, warmup, window, logdir, clip=clip)
    startup = sum(t for s, t in clock.inside.items() if s < warmup)
    return sum(clock.inside.get(s, 0.0) for s in range(warmup, warmup + window)) / window, startup


def measure(spec: B.ModelSpec, cadence: int, repeats: int, warmup: int, window: int, clip: Any) -> dict[str, Any]:
    base_runs: list[list[float]] = []
    inside: list[float] = []
    floor: list[float] = []
    startup: dict[str, list[float]] = {"floor": [], "normcheck": []}
    with tempfile.TemporaryDirectory() as logdir:
        for r in range(repeats):
            base_runs.append(B.run_once(spec, B.BY_NAME["none"], cadence, warmup, window, logdir, clip=clip)["cpu"])
            runs = [("floor", B.FloorNorm), ("normcheck", lambda: NormCheck(print_summary=False))]
            for name, make in runs if r % 2 == 0 else runs[::-1]:
                t, start = clocked_run(spec, make, cadence, warmup, window, logdir, clip)
                startup[name].append(start)
                (floor if name == "floor" else inside).append(t)
            print(
                f"  [{spec.name} every={cadence} clip={clip} rep={r}] NormCheck + clip {inside[-1] * 1e3:.3f} ms/step,"
                f" floor + clip {floor[-1] * 1e3:.3f} ms/step; start-up {startup['normcheck'][-1]:.3f} s vs"
                f" {startup['floor'][-1]:.3f} s",
                flush=True,
            )
    step = B.step_median_time(base_runs, window)
    excess = [a - b for a, b in zip(inside, floor)]
    return {
        "step_ms": step * 1e3,
        "inside_ms": statistics.median(inside) * 1e3,
        "floor_ms": statistics.median(floor) * 1e3,
        "excess_ms": statistics.median(excess) * 1e3,
        "excess_range_ms": (min(excess) * 1e3, max(excess) * 1e3),
        "excess_pct": 100 * statistics.median(excess) / step,
        "startup_s": statistics.median(a - b for a, b in zip(startup["normcheck"], startup["floor"])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=",".join(B.MODELS))
    p.add_argument("--cadences", default="50,1")
    p.add_argument("--clips", default=f"{B.CLIP:g},none", help="gradient_clip_val values; none: no clipping")
    p.add_argument("--repeats", type=int, default=None, help="repeats per row (default 3; --quick: 2)")
    p.add_argument("--out", default=str(HERE / "HOOK_TIME.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 3)
    rows = []
    t_start = time.time()
    for cadence in [int(c) for c in args.cadences.split(",")]:
        warmup, window = (30, 100) if cadence != 1 else (25, 20)
        for c in args.clips.split(","):
            clip = None if c == "none" else float(c)
            for m in args.models.split(","):
                res = measure(B.MODELS[m], cadence, repeats, warmup, window, clip)
                rows.append((cadence, clip, m, res))
    lines = [
        "# Time inside NormCheck() per training step, against the floor",
        "",
        f"Machine: {B.machine()}.",
        "",
        f"Command: `python benchmarks/hook_time.py{' '.join([''] + (argv if argv is not None else sys.argv[1:]))}`"
        f" ({repeats} repeats, finished "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - t_start:.0f} s). CPU time of the "
        "training thread per step over the timed window, inside the callback's hooks and the Trainer's clipping "
        "(`precision_plugin.clip_gradients`, when on), outermost call only: for `NormCheck()` and for the floor (a "
        "callback computing `torch.nn.utils.get_total_norm` of all gradients every step), each run beside a run "
        "without callback; excess = NormCheck's time minus the floor's, per repeat, median (range), and in % of the "
        "step time without callback (its step-median). With clipping on, the floor's run computes the total twice "
        "(its own and Lightning's clip), NormCheck's once (the clip reuses it). Start-up excess: the same CPU time "
        "from set-up to the start of the window (`warmup` steps, NormCheck's dense first 20 steps among them), "
        "NormCheck's minus the floor's (median).",
        "",
        "| Trainer log_every_n_steps | gradient_clip_val | model | step without callback | NormCheck() (+ clip) |"
        " floor (+ clip) | excess over the floor | start-up excess |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cadence, clip, m, res in rows:
        lo, hi = res["excess_range_ms"]
        verdict = "" if cadence != 50 else f" ({'holds' if res['excess_pct'] <= 1.0 else 'MISSES'} <= +1%)"
        lines.append(
            f"| {cadence} | {clip if clip is not None else 'none'} | {B.MODELS[m].title} | {res['step_ms']:.2f} ms |"
            f" {res['inside_ms']:.3f} ms | {res['floor_ms']:.3f} ms | {res['excess_ms']:+.3f} ms ({lo:+.3f} to"
            f" {hi:+.3f}) = **{res['excess_pct']:+.2f}%**{verdict} | {res['startup_s']:+.3f} s |"
        )
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
