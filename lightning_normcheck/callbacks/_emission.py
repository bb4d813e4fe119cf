"""Emission: the one place where metric names are made, from records, and sent to every logger.

One ``logger.log_metrics(row, step=...)`` call per logger per step that has values (the per-step total
gradient norms of the steps since the last logging step at their own steps, everything else at the
logging step), rank zero only. New findings go to each logger's own place for text.

=============================================  ====================================================
Key                                            Record
=============================================  ====================================================
``normcheck/grad_norm/total``                  :class:`GradientTotals`, at each step
``normcheck/grad_norm/<layer>``                :class:`GradientLayers`
``normcheck/grad_norm_param/<name>``           :class:`GradientLayers` (``per_parameter=True``)
``normcheck/act_rms/<module>``                 :class:`ActivationSample` (``<input>``: the model input)
``normcheck/dead_frac/<module>``               :class:`ActivationSample`
``normcheck/saturated_frac/<module>``          :class:`ActivationSample`
``normcheck/weight_norm/<layer>``              :class:`WeightSample`
``normcheck/weight_drift/<layer>``             :class:`WeightSample`
``normcheck/update_ratio/<layer>``             :class:`UpdateSample`
``normcheck/clip/rate``, ``clip/mean_excess``  :class:`ClipWindow`
``normcheck/input/max_abs/<tensor>``           :class:`BatchSample`
``normcheck/target/median_abs/<tensor>``       :class:`BatchSample`
=============================================  ====================================================

Example:
    >>> from lightning_normcheck.diagnosis.records import GradientTotals, GradientLayers
    >>> rows = metric_rows([GradientTotals((4, 5), (2.0, 3.0), (0, 0)), GradientLayers(5, 0, ("fc",), (3.0,))], 5)
    >>> rows[4], rows[5]
    ({'normcheck/grad_norm/total': 2.0}, {'normcheck/grad_norm/total': 3.0, 'normcheck/grad_norm/fc': 3.0})
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import singledispatch
from typing import Any

import torch

from lightning_normcheck.diagnosis.findings import Finding
from lightning_normcheck.diagnosis.records import (
    INPUT_LABEL,
    ActivationSample,
    BatchSample,
    ClipWindow,
    GradientLayers,
    GradientTotals,
    Record,
    UpdateSample,
    WeightSample,
)

PREFIX = "normcheck/"
TOTAL_KEY = "normcheck/grad_norm/total"
CLIP_RATE_KEY = "normcheck/clip/rate"
#: Values also put in ``trainer.callback_metrics`` at each logging step (every rank: they are the same there),
#: so ``EarlyStopping``/``ModelCheckpoint`` can monitor them.
HEADLINE_KEYS = (TOTAL_KEY, CLIP_RATE_KEY)


@singledispatch
def _metrics(record: Any, row: dict[str, float]) -> None:
    """Add the metrics of ``record`` to ``row`` (records with no public metric add nothing)."""


@_metrics.register
def _(record: GradientLayers, row: dict[str, float]) -> None:
    for layer, v in zip(record.layers, record.norms):
        row[f"{PREFIX}grad_norm/{layer}"] = v
    for name, v in record.params:
        row[f"{PREFIX}grad_norm_param/{name}"] = v


@_metrics.register
def _(record: ActivationSample, row: dict[str, float]) -> None:
    if record.input_rms is not None:
        row[f"{PREFIX}act_rms/{INPUT_LABEL}"] = record.input_rms
    for m in record.modules:
        row[f"{PREFIX}act_rms/{m.name}"] = m.rms
        if m.dead_batch is not None:
            row[f"{PREFIX}dead_frac/{m.name}"] = m.dead_batch
        if m.saturated is not None:
            row[f"{PREFIX}saturated_frac/{m.name}"] = m.saturated


@_metrics.register
def _(record: WeightSample, row: dict[str, float]) -> None:
    for i, layer in enumerate(record.layers):
        row[f"{PREFIX}weight_norm/{layer}"] = record.norms[i]
        if record.drift is not None:
            row[f"{PREFIX}weight_drift/{layer}"] = record.drift[i]


@_metrics.register
def _(record: UpdateSample, row: dict[str, float]) -> None:
    for layer, v in zip(record.layers, record.ratios):
        row[f"{PREFIX}update_ratio/{layer}"] = v


@_metrics.register
def _(record: ClipWindow, row: dict[str, float]) -> None:
    row[CLIP_RATE_KEY] = record.rate
    row[f"{PREFIX}clip/mean_excess"] = record.mean_excess


@_metrics.register
def _(record: BatchSample, row: dict[str, float]) -> None:
    for inp in record.inputs:
        row[f"{PREFIX}input/max_abs/{inp.label}"] = inp.max_abs
    if record.target is not None:
        row[f"{PREFIX}target/median_abs/{record.target.label}"] = record.target.median_abs


def metric_rows(records: Iterable[Record], step: int) -> dict[int, dict[str, float]]:
    """The metrics of ``records``, by the step they are logged at (``step``: the logging step)."""
    rows: dict[int, dict[str, float]] = {}
    for r in records:
        if isinstance(r, GradientTotals):
            for s, v in zip(r.steps, r.totals):
                rows.setdefault(s, {})[TOTAL_KEY] = v
        else:
            _metrics(r, rows.setdefault(step, {}))
    return {s: row for s, row in sorted(rows.items()) if row}


def log_rows(loggers: Sequence[Any], rows: dict[int, dict[str, float]]) -> None:
    """One ``logger.log_metrics(row, step=step)`` call per logger per step: Lightning's logger API."""
    for logger in loggers:
        for s, row in rows.items():
            logger.log_metrics(row, step=s)


def publish_headline(trainer: Any, rows: dict[int, dict[str, float]]) -> None:
    """The latest total gradient norm and clip rate into ``trainer.callback_metrics``."""
    try:
        metrics = trainer.callback_metrics
        for key in HEADLINE_KEYS:
            value = next((row[key] for _, row in sorted(rows.items(), reverse=True) if key in row), None)
            if value is not None:
                metrics[key] = torch.tensor(value)
    except Exception:  # noqa: BLE001 - a convenience: never a reason for a monitor to fail
        pass


def findings_text(findings: Sequence[Finding]) -> str:
    """Markdown text of some findings (for a logger's text panel)."""
    return "\n\n".join(f"**{f.severity}** `{f.code}` {f.layer or ''} (step {f.step}): {f.message}" for f in findings)


def publish_findings(loggers: Sequence[Any], findings: Sequence[Finding], step: int) -> None:
    """New or escalated findings to each logger's own place for text (TensorBoard: its Text tab)."""
    if not findings:
        return
    from lightning.pytorch.loggers import TensorBoardLogger

    text = findings_text(findings)
    for logger in loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("normcheck/findings", text, global_step=step)
        except Exception:  # noqa: BLE001 - a logger that cannot take text must not stop diagnosis
            pass


__all__ = ["HEADLINE_KEYS", "TOTAL_KEY", "findings_text", "log_rows", "metric_rows", "publish_findings"]
