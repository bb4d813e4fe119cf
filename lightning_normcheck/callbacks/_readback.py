"""Read-back: logged scalars -> the typed records they were made from (the inverse of :mod:`._emission`).

The ``lightning-normcheck report`` command reads a run's scalars back (TensorBoard, ``metrics.csv``) as
``{step: {key: value}}`` and rebuilds, per logging step, the records :func:`._emission.metric_rows` named, so the
rules of :mod:`lightning_normcheck.diagnosis` judge them as they judged the live run. Metric names are parsed
here, next to where they are made, and nowhere else: the diagnosis sees records only.

What the scalars lose comes from the run description (``normcheck_run.json``, :func:`._emission.publish_run`): the
modules' forward order and kinds, the layers' registration order, the clip threshold, the activation window, the
cadence. Without it the records are rebuilt as far as the scalars allow and :attr:`ReadBack.notes` says what
is missing.

Example:
    >>> from lightning_normcheck.callbacks._emission import metric_rows
    >>> rows = metric_rows([GradientTotals((0, 1), (2.0, 3.0), (0, 0)), GradientLayers(0, 0, ("fc",), (2.0,))], 0)
    >>> rb = read_back(rows, {"run": {"layers": ["fc"]}, "log_every_n_steps": 5, "early_steps": 0})
    >>> [(s, [type(r).__name__ for r in recs]) for s, recs in rb.flushes]
    [(0, ['GradientTotals', 'GradientLayers']), (1, ['GradientTotals'])]
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from lightning_normcheck.callbacks._emission import PREFIX, TOTAL_KEY
from lightning_normcheck.diagnosis.records import (
    INPUT_LABEL,
    ActivationSample,
    ClipWindow,
    GradientLayers,
    GradientTotals,
    InitStats,
    LayerInitStat,
    ModuleStat,
    Record,
    RunInfo,
    UpdateSample,
    WeightSample,
)

#: The clip tracker's count of the latest steps that say whether clipping still acts (its ``RECENT_STEPS``).
RECENT_STEPS = 5
#: The metric families of :mod:`._emission`'s table, by the name between the prefix and the layer.
FAMILIES = (
    "grad_norm",
    "grad_norm_param",
    "act_rms",
    "dead_frac",
    "saturated_frac",
    "weight_norm",
    "weight_drift",
    "update_ratio",
    "clip",
    "input",
    "target",
    "amp",
)


def parse_key(key: str) -> tuple[str, str] | None:
    """``(family, name)`` of a metric key made by :mod:`._emission` (``None``: not ours). The total gradient norm
    is ``("grad_norm", "")``; the clip window's two values are ``("clip", "rate")`` and ``("clip", "mean_excess")``."""
    if key == TOTAL_KEY:
        return "grad_norm", ""
    if not key.startswith(PREFIX):
        return None
    family, _, name = key[len(PREFIX) :].partition("/")
    if family not in FAMILIES or not name:
        return None
    return family, name


@dataclass
class ReadBack:
    """The records rebuilt from a run's scalars.

    Attributes:
        flushes: ``(logging step, records)`` in step order: what the rules are fed.
        pictures: the per-layer records of every logging step (weights and update ratios too), for the profiles.
        run: the run info (from the description, else what the scalars show).
        init: the init statistics of the description, if any.
        notes: what could not be rebuilt, and why.
        families: the metric families the scalars hold.
    """

    flushes: list[tuple[int, list[Record]]] = field(default_factory=list)
    pictures: list[Record] = field(default_factory=list)
    run: RunInfo = field(default_factory=RunInfo)
    init: InitStats | None = None
    notes: list[str] = field(default_factory=list)
    families: set[str] = field(default_factory=set)


def run_info(description: dict[str, Any]) -> RunInfo:
    """The :class:`RunInfo` of a run description."""
    run = description.get("run") or {}
    clip = run.get("clip_val")
    return RunInfo(
        layers=tuple(str(x) for x in run.get("layers", ())),
        optimizers=tuple(str(x) for x in run.get("optimizers", ())),
        manual=bool(run.get("manual", False)),
        amp_scaler=bool(run.get("amp_scaler", False)),
        clip_val=float(clip) if clip is not None else None,
        clip_algorithm=str(run.get("clip_algorithm", "norm")),
        normalized_by=run.get("normalized_by"),
    )


def init_stats(description: dict[str, Any]) -> InitStats | None:
    """The :class:`InitStats` of a run description, if it has them."""
    layers = description.get("init")
    if not layers:
        return None
    return InitStats(
        tuple(LayerInitStat(str(s["name"]), int(s["fan_in"]), int(s["fan_out"]), float(s["std"])) for s in layers)
    )


def _due(step: int, every: int, early: int) -> bool:
    """The callbacks' cadence (``_Run.is_due``)."""
    return step % every == 0 or (step < early and (step < 4 or step % 2 == 0))


def _ordered(names: Iterable[str], order: Iterable[str]) -> list[str]:
    """``names`` in ``order`` first, the others after in the order given."""
    names = list(names)
    known = [n for n in order if n in set(names)]
    return known + [n for n in names if n not in set(known)]


def natural(name: str) -> list[Any]:
    """A sort key that puts ``net.2`` before ``net.10``."""
    return [(0, int(t)) if t.isdigit() else (1, t) for t in re.split(r"(\d+)", name)]


def read_back(
    rows: dict[int, dict[str, float]], description: dict[str, Any] | None, key_order: bool = True
) -> ReadBack:
    """Rebuild the records of every logging step from ``rows`` (``{step: {key: value}}``) and the run description
    (``None``: none was found). ``key_order``: the logger kept the keys in the order they were written (TensorBoard
    does, a CSV file's sorted columns do not); without a description and without it, the layers' order is unknown
    and the gradient depth trends are not judged."""
    d = description or {}
    out = ReadBack(run=run_info(d), init=init_stats(d))
    by_step: dict[int, dict[str, dict[str, float]]] = {}
    totals: dict[int, float] = {}
    for step in sorted(rows):
        for key, value in rows[step].items():
            parsed = parse_key(key)
            if parsed is None:
                continue
            family, name = parsed
            out.families.add(family)
            if key == TOTAL_KEY:
                totals[step] = float(value)
            else:
                by_step.setdefault(step, {}).setdefault(family, {})[name] = float(value)
    if not totals and not by_step:
        out.notes.append("the logs hold no lightning_normcheck scalars")
        return out
    last = max([*totals, *by_step])
    every, early = d.get("log_every_n_steps"), d.get("early_steps")
    if isinstance(every, int) and every > 0 and isinstance(early, int):
        steps = {s for s in range(last + 1) if _due(s, every, early)} | set(by_step) | {last}
    else:
        steps = set(by_step) | {last}
        out.notes.append(
            "no run description (normcheck_run.json): the logging steps are taken from the per-layer scalars"
        )
    modules = [m for m in d.get("modules", []) if isinstance(m, dict)]
    kinds = {str(m["name"]): str(m.get("kind", "")) for m in modules}
    types = {str(m["name"]): str(m.get("type", "")) for m in modules}
    module_order = [str(m["name"]) for m in modules]
    if "act_rms" in out.families and not modules:
        out.notes.append(
            "no module list in a run description: the activation rules need each module's kind (weight/ReLU/"
            "bounded) and forward order, so activation findings are not re-derived"
        )
    elif modules and d.get("module_order") != "forward":
        out.notes.append("the description has the modules in registration order only (no sampled step was logged)")
    layer_order: list[str] = list(out.run.layers) or module_order
    depth = bool(layer_order) or key_order
    if "grad_norm" in out.families and not layer_order:
        out.notes.append(
            "the layers' order is unknown (metric names do not keep it): gradient depth trends are judged in the"
            " order the logger kept the keys"
            if key_order
            else "the layers' order is unknown (metric names do not keep it, nor do the file's sorted columns):"
            " the gradient depth trends (vanishing_gradients, exploding_gradients over depth) are not re-derived"
        )
    clip = d.get("clip") or {}
    norm_type = float(d.get("norm_type", 2.0))
    window = int(d.get("activation_window", 5))
    total_steps = sorted(totals)
    samples = 0
    prev = -1
    for s in sorted(steps):
        recs: list[Record] = []
        mine = [t for t in total_steps if prev < t <= s]
        if mine:
            scale = by_step.get(s, {}).get("amp", {}).get("scale")  # the GradScaler's, at this logging step
            recs.append(GradientTotals(tuple(mine), tuple(totals[t] for t in mine), (0,) * len(mine), norm_type, scale))
        fam = by_step.get(s, {})
        grads = {k: v for k, v in fam.get("grad_norm", {}).items()}
        if grads:
            layers = _ordered(grads if depth else sorted(grads, key=natural), layer_order)
            params = tuple(fam.get("grad_norm_param", {}).items())
            record = GradientLayers(s, 0, tuple(layers), tuple(grads[n] for n in layers), params)
            if depth:
                recs.append(record)
            else:
                out.pictures.append(record)
        rms = {k: v for k, v in fam.get("act_rms", {}).items() if k != INPUT_LABEL}
        if rms:
            samples += 1
            dead, sat = fam.get("dead_frac", {}), fam.get("saturated_frac", {})
            stats = tuple(
                ModuleStat(
                    n,
                    types.get(n, ""),
                    kinds.get(n, ""),
                    rms[n],
                    dead_batch=dead.get(n),
                    saturated=sat.get(n) if kinds.get(n) == "bounded" else None,
                )
                for n in _ordered(rms if key_order else sorted(rms, key=natural), module_order)
            )
            input_rms = fam["act_rms"].get(INPUT_LABEL)
            recs.append(ActivationSample(s, stats, input_rms, min(samples, window), window))
        clip_fam = fam.get("clip", {})
        if "rate" in clip_fam and clip.get("threshold"):
            recs.append(_clip_window(s, clip, clip_fam, [totals[t] for t in total_steps if t <= s], out))
        out.pictures += [r for r in recs if isinstance(r, (GradientLayers, ActivationSample))]
        weights = _weights(s, fam)
        out.pictures += weights
        if "weight_drift" not in out.families:  # no reference copy: the live rule also took the first samples
            recs += [r for r in weights if isinstance(r, WeightSample)]
        out.flushes.append((s, recs))
        prev = s
    if "clip" in out.families and not clip.get("threshold"):
        out.notes.append("no clip threshold in a run description: high_clip_rate is re-derived from the totals only")
    return out


def _clip_window(
    step: int, clip: dict[str, Any], values: dict[str, float], seen: list[float], out: ReadBack
) -> ClipWindow:
    """The clip tracker's window at ``step``: its rate and mean excess as logged; the steps it holds and the
    fraction of the latest ones clipped from the total norms (``"norm"`` clipping), as the tracker counts them."""
    threshold, algorithm, window = float(clip["threshold"]), str(clip.get("algorithm", "norm")), int(clip["window"])
    rate = values["rate"]
    n = min(len(seen), window)
    recent = rate
    if algorithm == "norm" and seen:
        # the tracker's own arithmetic: float32 measures over the threshold, clipped where the ratio exceeds 1
        latest = torch.tensor(seen[-min(n, RECENT_STEPS) :], dtype=torch.float32) / threshold
        recent = float((latest > 1.0).float().mean())
    else:
        note = "value clipping: the clip rate of the latest steps is taken as the window's rate"
        if note not in out.notes:
            out.notes.append(note)
    return ClipWindow(step, threshold, algorithm, rate, values.get("mean_excess", float("nan")), n or 1, recent, window)


def _weights(step: int, fam: dict[str, dict[str, float]]) -> list[Record]:
    """Weight norms and update ratios for the pictures (the rules need what the scalars lack: the start norms,
    the optimizer and its learning rate)."""
    out: list[Record] = []
    norms = fam.get("weight_norm", {})
    if norms:
        out.append(WeightSample(step, tuple(norms), tuple(norms.values())))
    ratios = fam.get("update_ratio", {})
    if ratios:
        out.append(UpdateSample(step, 0, "", float("nan"), False, tuple(ratios), tuple(ratios.values())))
    return out


__all__ = ["FAMILIES", "ReadBack", "init_stats", "natural", "parse_key", "read_back", "run_info"]
