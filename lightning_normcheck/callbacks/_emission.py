"""Emission: the one place where metric names are made, from records, and sent to every logger.

One ``logger.log_metrics(row, step=...)`` call per logger per step that has values (the per-step total
gradient norms of the steps since the last logging step at their own steps, everything else at the
logging step), rank zero only.

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
``normcheck/clip/threshold``                   :class:`ClipWindow` (the clip value)
``normcheck/input/max_abs/<tensor>``           :class:`BatchSample`
``normcheck/target/median_abs/<tensor>``       :class:`BatchSample`
``normcheck/findings/<severity>``              the findings so far of each severity (``info``, ``warning``,
                                               ``error``), at each logging step (:func:`finding_counts`)
``normcheck/cadence``                          the per-layer sampling cadence (``max_overhead``)
``normcheck/amp/scale``                        :class:`GradientTotals`: the fp16 GradScaler's loss scale at the
                                               logging step (only with an enabled scaler)
=============================================  ====================================================

Findings go to each logger's own place for text (:func:`publish_findings`):

================================  ================================================================================
Logger                            Place
================================  ================================================================================
``TensorBoardLogger``             text ``normcheck/findings`` (new or changed findings, in full) and
                                  ``normcheck/summary`` (the table); the files below in its ``log_dir``
``CSVLogger``, any ``log_dir``    ``findings.md`` (the table, then each finding in full) and ``findings.json``
                                  (the findings as dicts) beside its metrics, rewritten whole each time
``MLFlowLogger``                  the same two files as run artifacts under ``normcheck/``; tags
                                  ``normcheck.<code>`` = the code's worst severity
``WandbLogger``                   a ``wandb.Table`` logged under ``normcheck/findings``, also in the run summary
================================  ================================================================================

What the scalars cannot say (the layers' forward order, each hooked module's kind, the clip threshold, the
cadence) goes once per fit to each logger with a local ``log_dir`` as ``normcheck_run.json`` and to TensorBoard
as text ``normcheck/run`` (:func:`publish_run`), so the ``lightning-normcheck report`` command can rebuild the
records from the logged scalars (:mod:`._readback`) and run the same rules.

Depth profiles (:mod:`lightning_normcheck.profiles`: one picture per kind, ``<kind>`` one of ``grad_norm``,
``act_rms``, ``weight_norm``, ``update_ratio``) go to each logger's own place for images
(:func:`publish_profiles`):

================================  ================================================================================
Logger                            Place
================================  ================================================================================
``TensorBoardLogger``             image ``normcheck/profile/<kind>`` at the step drawn (the IMAGES tab); the files
                                  below in its ``log_dir``
``CSVLogger``, any ``log_dir``    ``normcheck_profiles/<kind>.png`` beside its metrics, overwritten each time (the
                                  last one is the end of fit's)
``MLFlowLogger``                  the same files as run artifacts ``normcheck/profile_<kind>.png``
``WandbLogger``                   an image logged under ``normcheck/profile/<kind>``
================================  ================================================================================

Example:
    >>> from lightning_normcheck.diagnosis.records import GradientTotals, GradientLayers
    >>> rows = metric_rows([GradientTotals((4, 5), (2.0, 3.0), (0, 0)), GradientLayers(5, 0, ("fc",), (3.0,))], 5)
    >>> rows[4], rows[5]
    ({'normcheck/grad_norm/total': 2.0}, {'normcheck/grad_norm/total': 3.0, 'normcheck/grad_norm/fc': 3.0})
"""

from __future__ import annotations

import json
import math
import numbers
import os
import weakref
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import singledispatch
from typing import Any

import torch

from lightning_normcheck.callbacks._isolation import rank_zero_warn
from lightning_normcheck.diagnosis.findings import Finding, FindingLog
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
from lightning_normcheck.diagnosis.registry import REGISTRY, SEVERITIES

PREFIX = "normcheck/"
TOTAL_KEY = "normcheck/grad_norm/total"
AMP_SCALE_KEY = "normcheck/amp/scale"
CLIP_RATE_KEY = "normcheck/clip/rate"
CLIP_THRESHOLD_KEY = "normcheck/clip/threshold"
#: ``normcheck/findings/<severity>``: how many findings of each severity exist at a logging step.
COUNT_KEYS = {severity: f"normcheck/findings/{severity}" for severity in SEVERITIES}
CADENCE_KEY = "normcheck/cadence"
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
    row[CLIP_THRESHOLD_KEY] = record.threshold  # drawn with the total norm: how far above the line it runs


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
            if r.scale is not None:  # the report's nonfinite rule reads it back (amp_scale_floor)
                rows.setdefault(step, {})[AMP_SCALE_KEY] = r.scale
        else:
            _metrics(r, rows.setdefault(step, {}))
    return {s: row for s, row in sorted(rows.items()) if row}


def finding_counts(findings: Iterable[Finding]) -> dict[str, float]:
    """How many ``findings`` there are of each severity, as metrics (every severity, zeros included: a chart
    that starts at 0 shows when the first one appeared)."""
    counts = dict.fromkeys(COUNT_KEYS.values(), 0.0)
    for f in findings:
        counts[COUNT_KEYS[f.severity]] += 1.0
    return counts


def add_cadence(rows: dict[int, dict[str, float]], step: int, every: int) -> None:
    """The per-layer sampling cadence in force at the logging step ``step`` (in optimizer steps; an overhead
    budget may have stretched it from the one asked for)."""
    rows.setdefault(step, {})[CADENCE_KEY] = float(every)


def log_rows(loggers: Sequence[Any], rows: dict[int, dict[str, float]]) -> None:
    """One ``logger.log_metrics(row, step=step)`` call per logger per step (Lightning's logger API), except for a
    plain TensorBoardLogger, which gets the row as one event written to its file writer (see
    :func:`_tensorboard_file`; ``log_metrics`` again if that fails)."""
    for logger in loggers:
        events = _tensorboard_file(logger)
        for s, row in rows.items():
            if events is None or not _one_event(events, row, s):
                logger.log_metrics(row, step=s)


def _tensorboard_file(logger: Any) -> Any:
    """The event file writer of a TensorBoardLogger (torch's SummaryWriter, no prefix), else None.

    ``TensorBoardLogger.log_metrics`` makes one event per key (``add_scalar``), and the writer's queue holds 10:
    1,800 per-layer values (a sampled step of a 450-module model) took 58-117 ms of wall time, the training thread
    waiting for the writer thread (2-core CPU); the same values as one event of 1,800 scalars took 1.5-2.5 ms.
    TensorBoard reads them alike (one scalar series per tag)."""
    if type(logger).__name__ != "TensorBoardLogger" or getattr(logger, "_prefix", None):
        return None
    try:
        writer = logger.experiment
        if type(writer).__module__ != "torch.utils.tensorboard.writer":
            return None
        return writer._get_file_writer()
    except Exception:  # noqa: BLE001 - Lightning's own call is the fallback
        return None


def _one_event(events: Any, row: dict[str, float], step: int) -> bool:
    """``row`` as one TensorBoard event at ``step`` (what ``add_scalar`` writes, for every key at once)."""
    try:
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = [Summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()]
        events.add_summary(Summary(value=values), step)
        return True
    except Exception:  # noqa: BLE001 - Lightning's own call is the fallback
        return False


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


#: The TensorBoard "Custom Scalars" layout: one multi-line chart per kind with every layer, the total gradient
#: norm with the clip threshold and rate, the finding counts (``(title, [regex of the tags], ...)`` per category).
LAYOUT: dict[str, dict[str, list[str]]] = {
    "normcheck: findings": {
        "findings by severity": [f"^{key}$" for key in COUNT_KEYS.values()],
    },
    "normcheck: gradients": {
        "total gradient norm (pre-clip) and clip rate": [
            f"^{TOTAL_KEY}$",
            f"^{CLIP_THRESHOLD_KEY}$",
            f"^{CLIP_RATE_KEY}$",
        ],
        "gradient norm, every layer": [f"^{PREFIX}grad_norm/(?!total$).*"],
    },
    "normcheck: activations": {
        "activation RMS, every module": [f"^{PREFIX}act_rms/.*"],
        "dead ReLU fraction": [f"^{PREFIX}dead_frac/.*"],
        "saturated tanh/sigmoid fraction": [f"^{PREFIX}saturated_frac/.*"],
    },
    "normcheck: weights": {
        "weight norm, every layer": [f"^{PREFIX}weight_norm/.*"],
        "update / weight ratio": [f"^{PREFIX}update_ratio/.*"],
        "drift from the start of fit": [f"^{PREFIX}weight_drift/.*"],
    },
}


def publish_layout(loggers: Sequence[Any]) -> None:
    """The Custom Scalars layout (:data:`LAYOUT`) to every TensorBoard logger, once per fit."""
    for logger in loggers:
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        try:
            layout = {
                cat: {title: ["Multiline", tags] for title, tags in charts.items()} for cat, charts in LAYOUT.items()
            }
            logger.experiment.add_custom_scalars(layout)
        except Exception:  # noqa: BLE001 - a convenience: never a reason for a monitor to fail
            pass


def findings_text(findings: Sequence[Finding]) -> str:
    """Markdown text of some findings (for a logger's text panel)."""
    return "\n\n".join(f"**{f.severity}** `{f.code}` {f.layer or ''} (step {f.step}): {f.message}" for f in findings)


# findings -> each logger's own place ---------------------------------------------------------------------------
FINDINGS_KEY = "normcheck/findings"
SUMMARY_KEY = "normcheck/summary"
FINDINGS_MD = "findings.md"
FINDINGS_JSON = "findings.json"
ARTIFACT_DIR = "normcheck"
TAG_PREFIX = "normcheck."
TABLE_COLUMNS = ("severity", "code", "layer", "step", "since", "message", "fix")


def _severity(f: Finding) -> int:
    return SEVERITIES.index(f.severity)


def merge_findings(groups: Iterable[Sequence[Finding]]) -> list[Finding]:
    """The findings of every lightning_normcheck callback of one run (they write the same files): one per
    (code, layer), the worst kept (then the earliest), in the order first seen."""
    merged: dict[tuple[str, str | None], Finding] = {}
    for findings in groups:
        for f in findings:
            old = merged.get((f.code, f.layer))
            if old is None or (_severity(f), -f.step) > (_severity(old), -old.step):
                merged[(f.code, f.layer)] = f
    return list(merged.values())


def worst_first(findings: Sequence[Finding]) -> list[Finding]:
    """The findings in the table's order: by code (worst, then earliest, first), then worst, earliest, by layer."""
    ranked = sorted(findings, key=lambda f: (-_severity(f), f.step, f.layer or ""))
    place = {f.code: i for i, f in reversed(list(enumerate(ranked)))}
    return sorted(ranked, key=lambda f: place[f.code])


def findings_details(findings: Sequence[Finding]) -> str:
    """Each finding in full, once, in the table's order."""
    lines = []
    for f in worst_first(findings):
        where = f" [{f.layer}]" if f.layer else ""
        since = f" (evidence from step {f.since})" if f.since != f.step else ""
        lines.append(f"- {f.severity} {f.code}{where} at step {f.step}{since}: {f.message}")
    return "\n".join(["Details:", *lines])


def findings_table(findings: Sequence[Finding]) -> str:
    """:meth:`FindingLog.table` of any findings (those of several callbacks, say)."""
    log = FindingLog()
    log.load_state_dict({"findings": [asdict(f) for f in findings]})
    return log.table()


def findings_report(findings: Sequence[Finding]) -> str:
    """The summary: the table (one row per code, worst first), then each finding in full. Plain text that is
    also markdown: printed at the end of fit and written as ``findings.md``."""
    if not findings:
        return findings_table(findings)
    return f"{findings_table(findings)}\n\n{findings_details(findings)}"


def _jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON types: a non-finite float as the string ``"inf"``/``"-inf"``/``"nan"``."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        return float(obj) if math.isfinite(obj) else str(float(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    return str(obj)


def findings_dicts(findings: Sequence[Finding]) -> list[dict[str, Any]]:
    """The findings as JSON-ready dicts (every :class:`Finding` field), in the order given."""
    return [_jsonable(asdict(f)) for f in findings]


@dataclass
class _Sent:
    """What one logger already has, so each publication sends only what changed."""

    failed: bool = False
    state: str | None = None  # the findings.json text last published
    texts: dict[tuple[str, str | None], tuple[str, str]] = field(default_factory=dict)  # (severity, message)
    tags: dict[str, str] = field(default_factory=dict)


# keyed by the logger object: gone with it, shared by the callbacks of one Trainer
_SENT: weakref.WeakKeyDictionary[Any, _Sent] = weakref.WeakKeyDictionary()


def _sent(logger: Any) -> _Sent:
    try:
        return _SENT.setdefault(logger, _Sent())
    except TypeError:  # not weak-referenceable: no memory, everything is sent each time
        return _Sent()


def _kinds(logger: Any) -> set[str]:
    """Class names in the logger's MRO: no optional package (mlflow, wandb) is imported to recognize it."""
    return {c.__name__ for c in type(logger).__mro__}


def _write(path: str, text: str) -> None:
    """Write whole, then rename: a reader (or a crash) never sees half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def _to_dir(logger: Any, log_dir: str, report: str, records: list[dict[str, Any]]) -> None:
    if "://" in log_dir:  # a remote store: only local directories are written
        return
    try:  # let the logger make its own directory first (CSVLogger warns about a non-empty one it did not make)
        _ = logger.experiment
    except Exception:  # noqa: BLE001 - the logger reports its own failures; the files are still written
        pass
    os.makedirs(log_dir, exist_ok=True)
    _write(os.path.join(log_dir, FINDINGS_MD), report + "\n")
    _write(os.path.join(log_dir, FINDINGS_JSON), json.dumps(records, indent=1, allow_nan=False) + "\n")


def _to_tensorboard(logger: Any, sent: _Sent, findings: Sequence[Finding], step: int) -> None:
    changed = [f for f in worst_first(findings) if sent.texts.get((f.code, f.layer)) != (f.severity, f.message)]
    writer = logger.experiment
    if changed:
        writer.add_text(FINDINGS_KEY, findings_text(changed), global_step=step)
    writer.add_text(SUMMARY_KEY, findings_table(findings), global_step=step)
    sent.texts.update({(f.code, f.layer): (f.severity, f.message) for f in changed})


def _to_mlflow(logger: Any, sent: _Sent, findings: Sequence[Finding], report: str, records: list[Any]) -> None:
    client, run_id = logger.experiment, logger.run_id
    client.log_text(run_id, report, f"{ARTIFACT_DIR}/{FINDINGS_MD}")
    client.log_dict(run_id, records, f"{ARTIFACT_DIR}/{FINDINGS_JSON}")
    worst: dict[str, Finding] = {}
    for f in findings:
        if f.code not in worst or _severity(f) > _severity(worst[f.code]):
            worst[f.code] = f
    for code, f in worst.items():
        if sent.tags.get(code) != f.severity:
            client.set_tag(run_id, TAG_PREFIX + code, f.severity)
            sent.tags[code] = f.severity


def _to_wandb(logger: Any, findings: Sequence[Finding], step: int) -> None:
    import wandb  # installed: a WandbLogger exists

    rows = []
    for f in worst_first(findings):
        spec = REGISTRY.get(f.code)
        rows.append([f.severity, f.code, f.layer or "", f.step, f.since, f.message, spec.fix if spec else ""])
    table = wandb.Table(columns=list(TABLE_COLUMNS), data=rows)
    run = logger.experiment
    run.log({FINDINGS_KEY: table, "trainer/global_step": step})  # WandbLogger's own step key
    run.summary[FINDINGS_KEY] = table


def _give_up(logger: Any, sent: _Sent, err: Exception) -> None:
    """A logger that failed to take the findings or the run description: warned about once, then skipped."""
    sent.failed = True
    rank_zero_warn(
        f"lightning_normcheck: could not write the findings to {type(logger).__name__} ({err!r}); it is"
        " skipped from now on. The findings are still in `callback.findings`, the other loggers and the"
        " end-of-fit summary.",
        category=RuntimeWarning,
    )


def publish_findings(loggers: Sequence[Any], findings: Sequence[Finding], step: int) -> None:
    """Every finding so far to each logger's own place for text (the table in the module docstring).

    Called, rank zero only, at each logging step where a finding is new or escalated and at the end of fit or
    on an exception, so a crashed run keeps what was found. A logger whose findings have not changed since it was
    last sent them is skipped; a logger that fails is warned about once and skipped for the rest of the run.
    """
    records = findings_dicts(findings)
    state = json.dumps(records, sort_keys=True)
    report: str | None = None
    for logger in loggers:
        sent = _sent(logger)
        if sent.failed or sent.state == state:
            continue
        kinds = _kinds(logger)
        try:
            if "MLFlowLogger" in kinds:
                report = report or findings_report(findings)
                _to_mlflow(logger, sent, findings, report, records)
            elif "WandbLogger" in kinds:
                _to_wandb(logger, findings, step)
            else:
                if "TensorBoardLogger" in kinds:
                    _to_tensorboard(logger, sent, findings, step)
                log_dir = getattr(logger, "log_dir", None)
                if isinstance(log_dir, str):
                    report = report or findings_report(findings)
                    _to_dir(logger, log_dir, report, records)
        except Exception as err:  # noqa: BLE001 - a logger that cannot take the findings must not stop training
            _give_up(logger, sent, err)
        else:
            sent.state = state


# the run description -> each logger's own place ----------------------------------------------------------------
RUN_KEY = "normcheck/run"
RUN_FILE = "normcheck_run.json"
RUN_VERSION = 1


@dataclass
class _RunSent:
    """The description one logger already has for the fit ``fit`` (several callbacks of one Trainer merge)."""

    fit: Hashable = None
    description: dict[str, Any] = field(default_factory=dict)


_RUN_SENT: weakref.WeakKeyDictionary[Any, _RunSent] = weakref.WeakKeyDictionary()


def merge_descriptions(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Two callbacks' descriptions of one fit: what either knows (a monitor only one of them has), the later
    one's values where both know something; the monitors of both."""
    merged = dict(old)
    merged.update({k: v for k, v in new.items() if v not in (None, [], {}, "")})
    merged["monitors"] = sorted(set(old.get("monitors", [])) | set(new.get("monitors", [])))
    return merged


def run_json(description: dict[str, Any]) -> str:
    """The description as JSON, one line per key and per item of a list of objects (readable, and written by
    json's C encoder: ``indent=`` takes its pure-Python one, 10 ms a publication for a 450-module model)."""
    obj = _jsonable(description)

    def value(v: Any) -> str:
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            return "[\n  " + ",\n  ".join(json.dumps(x, sort_keys=True) for x in v) + "\n ]"
        return json.dumps(v, sort_keys=True)

    return "{\n" + ",\n".join(f" {json.dumps(k)}: {value(obj[k])}" for k in sorted(obj)) + "\n}"


def run_text(description: dict[str, Any], encoded: str | None = None) -> str:
    """The description as TensorBoard text: JSON in a code block (readable there, parsed back by the report)."""
    return "```json\n" + (encoded if encoded is not None else run_json(description)) + "\n```"


def parse_run_text(text: str) -> dict[str, Any]:
    """The inverse of :func:`run_text`."""
    body = text.strip().removeprefix("```json").removesuffix("```")
    loaded = json.loads(body)
    return loaded if isinstance(loaded, dict) else {}


def publish_run(loggers: Sequence[Any], description: dict[str, Any], step: int, fit: Hashable = None) -> None:
    """The run description to each logger (rank zero): ``normcheck_run.json`` in a local ``log_dir`` and the
    TensorBoard text ``normcheck/run``. Called at the start of fit and again when the forward order is first seen;
    the descriptions of one ``fit`` from several callbacks merge. A logger that fails is warned about once and
    skipped from then on, for the findings too (they go to the same place)."""
    for logger in loggers:
        try:
            sent = _RUN_SENT.setdefault(logger, _RunSent())
        except TypeError:
            sent = _RunSent()
        if sent.fit != fit:
            sent.fit, sent.description = fit, {}
        merged = merge_descriptions(sent.description, description)
        if merged == sent.description or _sent(logger).failed:
            continue
        sent.description = merged
        kinds = _kinds(logger)
        try:
            if kinds & {"MLFlowLogger", "WandbLogger"}:
                continue
            encoded = run_json(merged)
            if "TensorBoardLogger" in kinds:
                logger.experiment.add_text(RUN_KEY, run_text(merged, encoded), global_step=step)
            log_dir = getattr(logger, "log_dir", None)
            if isinstance(log_dir, str) and "://" not in log_dir:
                _ = logger.experiment  # the logger makes its own directory first
                os.makedirs(log_dir, exist_ok=True)
                _write(os.path.join(log_dir, RUN_FILE), encoded + "\n")
        except Exception as err:  # noqa: BLE001 - it goes where the findings go: that logger is skipped from now on
            _give_up(logger, _sent(logger), err)


# depth profiles -> each logger's own place for images -------------------------------------------------------
PROFILE_KEY = "normcheck/profile"  # TensorBoard image tag and W&B key: normcheck/profile/<kind>
PROFILE_DIR = "normcheck_profiles"  # beside a local log_dir's metrics: <kind>.png


@dataclass
class _Picture:
    """One profile drawn once (:func:`~lightning_normcheck.profiles.pixels`; ``rgb``: ``(height, width, 3)``
    ``uint8``), PNG-encoded at most once."""

    kind: str
    rgb: Any
    _png: bytes | None = None

    @property
    def png(self) -> bytes:
        if self._png is None:
            from lightning_normcheck.profiles import encode_png

            self._png = encode_png(self.rgb)
        return self._png


# loggers that failed to take the images: skipped for the rest of the process (keyed weakly, like _SENT)
_NO_IMAGES: weakref.WeakSet[Any] = weakref.WeakSet()


def _write_bytes(path: str, data: bytes) -> None:
    """Like :func:`_write`, for bytes."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _images_to_dir(logger: Any, log_dir: str, pictures: Sequence[_Picture]) -> None:
    if "://" in log_dir:  # a remote store: only local directories are written
        return
    try:  # let the logger make its own directory first (as for the findings files)
        _ = logger.experiment
    except Exception:  # noqa: BLE001 - the logger reports its own failures; the files are still written
        pass
    folder = os.path.join(log_dir, PROFILE_DIR)
    os.makedirs(folder, exist_ok=True)
    for pic in pictures:
        _write_bytes(os.path.join(folder, f"{pic.kind}.png"), pic.png)


def _images_to_mlflow(logger: Any, pictures: Sequence[_Picture]) -> None:
    import tempfile

    client, run_id = logger.experiment, logger.run_id
    with tempfile.TemporaryDirectory() as tmp:  # log_artifact copies (or uploads) the file before returning
        for pic in pictures:
            path = os.path.join(tmp, f"profile_{pic.kind}.png")
            _write_bytes(path, pic.png)
            client.log_artifact(run_id, path, ARTIFACT_DIR)


def _images_to_wandb(logger: Any, pictures: Sequence[_Picture], step: int) -> None:
    import wandb  # installed: a WandbLogger exists

    images: dict[str, Any] = {f"{PROFILE_KEY}/{pic.kind}": wandb.Image(pic.rgb) for pic in pictures}
    logger.experiment.log({**images, "trainer/global_step": step})  # one history row, WandbLogger's step key


def publish_profiles(loggers: Sequence[Any], profiles: Sequence[Any], step: int) -> None:
    """Depth profiles (:class:`~lightning_normcheck.profiles.Profile`) to each logger's own place for images
    (the table in the module docstring), rank zero only, each drawn once whatever the number of loggers.

    A logger that fails is warned about once and skipped for the rest of the run. Drawing errors (and a missing
    matplotlib) are raised: the caller switches the pictures off.
    """
    targets = [lg for lg in loggers if lg not in _NO_IMAGES]
    if not profiles or not targets:
        return
    import numpy as np  # installed with matplotlib

    from lightning_normcheck.profiles import pixels

    pictures = [_Picture(p.kind, np.ascontiguousarray(pixels(p)[..., :3])) for p in profiles]
    for logger in targets:
        kinds = _kinds(logger)
        try:
            if "MLFlowLogger" in kinds:
                _images_to_mlflow(logger, pictures)
            elif "WandbLogger" in kinds:
                _images_to_wandb(logger, pictures, step)
            else:
                if "TensorBoardLogger" in kinds:
                    writer = logger.experiment
                    for pic in pictures:
                        writer.add_image(f"{PROFILE_KEY}/{pic.kind}", pic.rgb, step, dataformats="HWC")
                log_dir = getattr(logger, "log_dir", None)
                if isinstance(log_dir, str):
                    _images_to_dir(logger, log_dir, pictures)
        except Exception as err:  # noqa: BLE001 - a logger that cannot take the images must not stop training
            try:
                _NO_IMAGES.add(logger)
            except TypeError:  # not weak-referenceable: it is tried again next time
                pass
            rank_zero_warn(
                f"lightning_normcheck: could not write the depth-profile images to {type(logger).__name__}"
                f" ({err!r}); it gets no more images this run. The metrics and findings still go to it.",
                category=RuntimeWarning,
            )


__all__ = [
    "AMP_SCALE_KEY",
    "CLIP_THRESHOLD_KEY",
    "COUNT_KEYS",
    "FINDINGS_KEY",
    "HEADLINE_KEYS",
    "RUN_FILE",
    "RUN_KEY",
    "PROFILE_DIR",
    "PROFILE_KEY",
    "SUMMARY_KEY",
    "TOTAL_KEY",
    "findings_details",
    "findings_dicts",
    "findings_report",
    "findings_table",
    "findings_text",
    "finding_counts",
    "log_rows",
    "merge_findings",
    "merge_descriptions",
    "metric_rows",
    "parse_run_text",
    "publish_findings",
    "publish_run",
    "run_text",
    "publish_profiles",
    "worst_first",
]
