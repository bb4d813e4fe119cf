"""With clipping by norm on, does ``NormCheck()`` cost less than the floor of measuring the total norm yourself?

Run from the repository root::

    python benchmarks/clipping.py               # ~12 min on a 2-core CPU
    python benchmarks/clipping.py --repeats 3   # ~5 min, noisier
    python benchmarks/clipping.py --models stack450 --repeats 5   # the 450-module stack, ~5 min

``Trainer(gradient_clip_val=1.0)`` (by norm) on the 16-block residual MLP (width 256) and the 6-layer transformer
(d=128) of ``overhead.py`` (same models, data, AdamW and ``TensorBoardLogger``), in four configurations:

- ``bare``: no callback; Lightning's clip computes the total norm once per step (``clip_grad_norm_``);
- ``floor``: a callback that calls ``torch.nn.utils.get_total_norm`` on every gradient in every
  ``on_before_optimizer_step``: the least any gradient-norm monitor that does not share its total with the clip
  pays (a second pass over the gradients);
- ``normcheck``: ``NormCheck()`` at its defaults; the clip reuses its total (one pass);
- ``normcheck_no_reuse``: the same with the reuse switched off (the behaviour before it: two passes).

Timing: the CPU time of the training thread (``time.thread_time``, not inflated while another process holds the
core) and the wall clock, from one ``on_train_batch_start`` to the next, over steps 30 to 30 + window (the first
30 are left out: NormCheck samples densely below step 20). Per run the median step time; runs interleaved, the order
rotated each repeat, one ``bare`` run per repeat. Printed: per configuration the median over repeats of the run
medians, and of the ratio of each run to the ``bare`` run of its repeat, with the lowest and highest ratio;
and ``normcheck / floor`` per repeat. Also how many clips Lightning computed itself (``clip_grad_norm_``) and how
many reused NormCheck's total (``clip_grads_with_norm_``), per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS, Batches, LitBench, StepTimer  # noqa: E402  (the models of overhead.py)

from lightning_normcheck import NormCheck  # noqa: E402
from lightning_normcheck.callbacks import _base  # noqa: E402

CLIP = 1.0
WARMUP = 30
CLOCKS = ("cpu", "wall")


class Floor(Callback):
    """``torch.nn.utils.get_total_norm`` of every gradient, every optimizer step (kept on the device, no sync)."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.total = torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters() if p.grad is not None])


class SectionTimer(Callback):
    """The time from the first ``on_before_optimizer_step`` hook (this callback is placed before the others) to the
    end of the clip: every callback's and the LightningModule's ``on_before_optimizer_step`` and the clip, where the
    second pass over the gradients is, without the forward and backward that dominate (and blur) a step. The end is
    marked by :class:`ClipCounter` (the optimizer's step pre-hooks run before the closure, so they cannot mark it)."""

    def __init__(self, warmup: int, window: int) -> None:
        self.warmup, self.window = warmup, window
        self.start: tuple[float, float] | None = None
        self.sections: list[tuple[float, float]] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        due = self.warmup <= trainer.global_step < self.warmup + self.window
        self.start = (time.perf_counter(), time.thread_time()) if due else None

    def clipped(self) -> None:
        if self.start is not None:
            wall, cpu = self.start
            self.sections.append((time.perf_counter() - wall, time.thread_time() - cpu))
            self.start = None

    def median(self, clock: str) -> float:
        if len(self.sections) != self.window:
            raise RuntimeError("the timing window did not complete")
        return statistics.median(s[0 if clock == "wall" else 1] for s in self.sections)


class ClipCounter:
    """Counts Lightning's own clips (``clip_grad_norm_``) and clips with a given total (``clip_grads_with_norm_``)."""

    def __init__(self, after: Callable[[], None]) -> None:
        self.own = self.reused = 0
        utils = torch.nn.utils
        self._norm, self._with = utils.clip_grad_norm_, utils.clip_grads_with_norm_

        def own(*args: Any, **kwargs: Any) -> torch.Tensor:
            self.own += 1
            total = self._norm(*args, **kwargs)
            after()
            return total

        def reused(*args: Any, **kwargs: Any) -> None:
            self.reused += 1
            self._with(*args, **kwargs)
            after()

        utils.clip_grad_norm_, utils.clip_grads_with_norm_ = own, reused  # type: ignore[assignment]

    def close(self) -> None:
        torch.nn.utils.clip_grad_norm_, torch.nn.utils.clip_grads_with_norm_ = self._norm, self._with


def _no_reuse() -> list[Callback]:
    cb = NormCheck(print_summary=False)
    cb._start_run = _without_reuse(cb._start_run)  # type: ignore[method-assign]
    return [cb]


def _without_reuse(start: Callable[..., None]) -> Callable[..., None]:
    def wrapped(*args: Any) -> None:
        install = _base._clip_reuse.install
        _base._clip_reuse.install = lambda *a: None  # type: ignore[assignment]
        try:
            start(*args)
        finally:
            _base._clip_reuse.install = install

    return wrapped


CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "bare": lambda: [],
    "floor": lambda: [Floor()],
    "normcheck": lambda: [NormCheck(print_summary=False)],
    "normcheck_no_reuse": _no_reuse,
}


def run_once(model_name: str, config: str, window: int, logdir: str) -> dict[str, Any]:
    spec = MODELS[model_name]
    torch.manual_seed(0)
    model = LitBench(spec.build())
    timer = StepTimer(WARMUP, window)
    section = SectionTimer(WARMUP, window)
    steps = WARMUP + window + 1
    counter = ClipCounter(section.clipped)
    try:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            max_epochs=1,
            logger=TensorBoardLogger(logdir, name=f"{model_name}_{config}"),
            log_every_n_steps=50,
            gradient_clip_val=CLIP,
            callbacks=[timer, section, *CONFIGS[config]()],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
        )
        loader = DataLoader(Batches(spec.input_shape, steps), batch_size=None, num_workers=0)
        trainer.fit(model, loader)
    finally:
        counter.close()
    out: dict[str, Any] = {c: statistics.median(timer.steps(c)) for c in CLOCKS}
    out.update({f"section_{c}": section.median(c) for c in CLOCKS})
    out["own"], out["reused"] = counter.own, counter.reused
    return out


def measure(model_name: str, repeats: int, window: int, logdir: str) -> dict[str, list[dict[str, Any]]]:
    names = list(CONFIGS)
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t = run_once(model_name, n, window, logdir)
            runs[n].append(t)
            print(
                f"  [{model_name} rep={r}] {n:20s} cpu {t['cpu'] * 1e3:7.2f} ms/step  wall {t['wall'] * 1e3:7.2f}"
                f"  section cpu {t['section_cpu'] * 1e3:6.3f} ms  clips: Lightning's own {t['own']},"
                f" reused {t['reused']}",
                flush=True,
            )
    return runs


def summarize(model_name: str, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    title = MODELS[model_name].title
    lines = [f"### {title}, gradient_clip_val={CLIP}", ""]
    for clock in ("cpu", "wall", "section_cpu", "section_wall"):
        what = "ms/step" if clock in CLOCKS else "ms from the hooks to the end of the clip"
        lines += [
            f"{clock} clock | median {what} | - bare, ms: median [lowest, highest] | / bare: median [lowest, highest]",
            "---|---|---|---",
        ]
        bare = [x[clock] for x in runs["bare"]]
        for n, rs in runs.items():
            ratios = [x[clock] / b for x, b in zip(rs, bare)]
            extra = [(x[clock] - b) * 1e3 for x, b in zip(rs, bare)]
            med = statistics.median(x[clock] for x in rs) * 1e3
            lines.append(
                f"{n} | {med:.3f} | {statistics.median(extra):+.3f} [{min(extra):+.3f}, {max(extra):+.3f}]"
                f" | {statistics.median(ratios):.3f} [{min(ratios):.3f}, {max(ratios):.3f}]"
            )
        vs_floor = [a[clock] / f[clock] for a, f in zip(runs["normcheck"], runs["floor"])]
        vs_old = [a[clock] / f[clock] for a, f in zip(runs["normcheck"], runs["normcheck_no_reuse"])]
        lines += [
            "",
            f"normcheck / floor ({clock}): median {statistics.median(vs_floor):.3f} "
            f"[{min(vs_floor):.3f}, {max(vs_floor):.3f}] over {len(vs_floor)} repeats; "
            f"normcheck / normcheck_no_reuse: median {statistics.median(vs_old):.3f} "
            f"[{min(vs_old):.3f}, {max(vs_old):.3f}]",
            "",
        ]
    clips = {n: (rs[0]["own"], rs[0]["reused"]) for n, rs in runs.items()}
    lines.append(
        "clips per run (Lightning's own clip_grad_norm_, reused total): "
        + ", ".join(f"{n} {own}/{reused}" for n, (own, reused) in clips.items())
    )
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resmlp,transformer")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--window", type=int, default=100, help="timed steps per run, after the first 30")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out: list[str] = []
    with tempfile.TemporaryDirectory() as logdir:
        for name in args.models.split(","):
            runs = measure(name, args.repeats, args.window, logdir)
            out += summarize(name, runs)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
