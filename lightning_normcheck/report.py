"""``lightning-normcheck report LOGDIR``: a run's findings, worst layers and depth profiles, from its logs.

It reads, during or after the run, what the callbacks logged: the TensorBoard event files (with TensorBoard's
own reader) or a ``CSVLogger``'s ``metrics.csv``, the findings files (``findings.json``) and the run description
(``normcheck_run.json``, or the TensorBoard text ``normcheck/run``). It prints the findings table (the same one
the callbacks print), the worst layers of each kind (the largest and smallest latest values relative to the
median layer), writes one depth-profile PNG per kind and ONE self-contained HTML page (pictures embedded) to
``<run dir>/normcheck_report/`` (``--out`` to change it).

``LOGDIR`` is a run's own log directory (``lightning_logs/version_3``) or any directory above it: then the run
directory with lightning_normcheck data whose files changed last is taken (the newest run).

Without findings files (a run of an older version, a logger that keeps no files, or ``--rederive``) the findings
are re-derived: the logged scalars are turned back into the typed records
(:mod:`lightning_normcheck.callbacks._readback`) and judged by the same rules as the callbacks
(:class:`~lightning_normcheck.diagnosis.Diagnosis`), one logging step at a time. :data:`REDERIVED` lists the codes
that can be re-derived and what each needs; the others need numbers that are not logged (:data:`NOT_REDERIVED`).

Example:
    >>> main(["report", "/nonexistent"])
    lightning-normcheck: no lightning_normcheck logs under /nonexistent (looked for TensorBoard event files, metrics.csv, findings.json)
    2
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_normcheck import profiles as P
from lightning_normcheck.callbacks import _emission as E
from lightning_normcheck.callbacks._readback import ReadBack, parse_key, read_back
from lightning_normcheck.diagnosis.engine import Diagnosis
from lightning_normcheck.diagnosis.findings import Finding
from lightning_normcheck.diagnosis.registry import CODES, REGISTRY

#: The codes a report re-derives from the logged scalars with the callbacks' rules, and what each needs.
REDERIVED: dict[str, str] = {
    "exploding_activations": "act_rms scalars and the run description's module list (kinds, forward order)",
    "vanishing_activations": "act_rms scalars and the run description's module list (kinds, forward order)",
    "saturated_activations": "saturated_frac scalars and the run description (module kinds, activation window)",
    "exploding_gradients": "the total gradient norm of every step; per-layer norms for the depth trend",
    "vanishing_gradients": "per-layer gradient norms and the layers' order (run description)",
    "gradient_spikes": "the total gradient norm of every step",
    "high_clip_rate": "clip/rate and the run description's clip threshold, or the totals and gradient_clip_val",
    "weight_norm_growth": "weight_norm scalars of a run without a reference copy (no weight_drift scalars)",
}
#: Why the other codes are not re-derived.
NOT_REDERIVED: dict[str, str] = {
    "nonfinite_loss": "the loss of each step is not logged by lightning_normcheck",
    "nonfinite_gradients": "the first non-finite value is found from per-parameter checks that are not logged",
    "dead_units": "the fraction of units dead over the whole window is not logged (dead_frac is one batch's)",
    "input_scale": "needs per-feature batch statistics (only the largest |x| is logged)",
    "label_scale": "needs the target's full statistics (only its median |y| is logged)",
    "learning_rate_too_high": "needs the optimizer's learning rate and the update ratios' context",
    "zero_gradients": "needs the per-step checks of the gradient hooks",
    "missing_zero_grad": "found by hooks inside the training loop; nothing is logged",
    "double_optimizer_step": "found by hooks inside the training loop; nothing is logged",
    "loss_sum_reduction": "found by a probe of training_step; nothing is logged",
    "accumulation_not_averaged": "found by hooks inside the training loop; nothing is logged",
    "hidden_state_not_detached": "found by hooks inside the training loop; nothing is logged",
}
OUT_DIR = "normcheck_report"
HTML_FILE = "report.html"
_MARKERS = ("events.out.tfevents.", "metrics.csv", E.FINDINGS_JSON, E.RUN_FILE)
#: Layers listed at each end in the worst-layers table.
WORST_SHOWN = 3


# -- finding the run and reading it --------------------------------------------------------------------------
def _has_data(path: str) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    if E.FINDINGS_JSON in names or E.RUN_FILE in names or any(n.startswith(_MARKERS[0]) for n in names):
        return True
    if "metrics.csv" in names:
        try:
            with open(os.path.join(path, "metrics.csv"), encoding="utf-8") as fh:
                return E.PREFIX in fh.readline()
        except OSError:
            return False
    return False


def _newest(path: str) -> float:
    """When the run's own files last changed (a report written into it later does not count)."""
    files = [os.path.join(path, n) for n in os.listdir(path)]
    return max((os.path.getmtime(f) for f in files if os.path.isfile(f)), default=0.0)


def find_run_dir(logdir: str) -> str | None:
    """``logdir`` itself when it holds lightning_normcheck data, else the run directory below it whose files
    changed last (``None``: none)."""
    if _has_data(logdir):
        return logdir
    found = [root for root, _, _ in os.walk(logdir) if root != logdir and _has_data(root)]
    return max(found, key=_newest) if found else None


def read_tensorboard(run_dir: str) -> tuple[dict[int, dict[str, float]], dict[str, Any] | None]:
    """The scalars of a TensorBoard run directory by step (keys in the order they were first written), and the
    latest run description of its text ``normcheck/run``."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(run_dir, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    rows: dict[int, dict[str, float]] = {}
    for tag in tags.get(ea.SCALARS, []):
        if parse_key(tag) is None:
            continue
        for event in acc.Scalars(tag):
            rows.setdefault(int(event.step), {})[tag] = float(event.value)
    description = None
    text_tag = f"{E.RUN_KEY}/text_summary"
    if text_tag in tags.get(ea.TENSORS, []):
        events = acc.Tensors(text_tag)
        if events:
            latest = max(events, key=lambda e: (e.step, e.wall_time))
            try:
                description = E.parse_run_text(latest.tensor_proto.string_val[0].decode("utf-8"))
            except (ValueError, IndexError):
                description = None
    return {s: rows[s] for s in sorted(rows)}, description


def read_csv(path: str) -> dict[int, dict[str, float]]:
    """The lightning_normcheck scalars of a ``metrics.csv`` by step (empty cells skipped)."""
    rows: dict[int, dict[str, float]] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for line in csv.DictReader(fh):
            try:
                step = int(float(line.get("step") or ""))
            except ValueError:
                continue
            for key, value in line.items():
                if key is None or parse_key(key) is None or value in (None, ""):
                    continue
                rows.setdefault(step, {})[key] = float(value)
    return {s: rows[s] for s in sorted(rows)}


def load_findings(run_dir: str) -> list[Finding] | None:
    """The findings the callbacks wrote (``findings.json``), or ``None`` when there is no such file."""
    path = os.path.join(run_dir, E.FINDINGS_JSON)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        records = json.load(fh)
    out = []
    for r in records:
        value = r.get("value")
        r["value"] = float(value) if value is not None else None  # "inf"/"nan" written as strings
        out.append(Finding(**r))
    return out


# -- the report ----------------------------------------------------------------------------------------------
@dataclass
class WorstLayers:
    """One kind's layers at its latest sampled step, by value relative to the median layer."""

    kind: str
    step: int
    median: float
    largest: list[tuple[str, float, float]]  # (layer, value, value / median), largest ratio first
    smallest: list[tuple[str, float, float]]  # smallest ratio first


@dataclass
class Report:
    """What ``lightning-normcheck report`` found about one run."""

    run_dir: str
    source: str  # "tensorboard" or "csv" (the scalars), "" when there were none
    findings: list[Finding]
    rederived: bool  # the findings were re-derived from the scalars (else read from findings.json)
    readback: ReadBack
    description: dict[str, Any] | None
    worst: list[WorstLayers] = field(default_factory=list)
    profiles: list[P.Profile] = field(default_factory=list)

    @property
    def not_rederived(self) -> dict[str, str]:
        """The codes this report could not re-derive, and why (empty when the findings came from the files)."""
        if not self.rederived:
            return {}
        out = dict(NOT_REDERIVED)
        fam = self.readback.families
        modules = bool((self.description or {}).get("modules"))
        for code in ("exploding_activations", "vanishing_activations", "saturated_activations"):
            if "act_rms" not in fam:
                out[code] = "no act_rms scalars were logged (no activation monitor)"
            elif not modules:
                out[code] = "no run description with the module list (kinds, forward order)"
        if "grad_norm" in fam and not self.readback.run.layers and not modules and self.source == "csv":
            out["vanishing_gradients"] = "the layers' order is unknown without a run description"
        if "grad_norm" not in fam:
            for code in ("exploding_gradients", "vanishing_gradients", "gradient_spikes"):
                out[code] = "no gradient norms were logged (no gradient monitor)"
        if not (self.description or {}).get("clip") and not self.readback.run.clip_val:
            out["high_clip_rate"] = (
                "no run description with the clip threshold"
                if "clip" in fam
                else "no clip rate was logged and no gradient_clip_val is known"
            )
        if "weight_drift" in fam:
            out["weight_norm_growth"] = "the start-of-fit weight norms of the reference copy are not logged"
        elif "weight_norm" not in fam:
            out["weight_norm_growth"] = "no weight norms were logged"
        return {c: out[c] for c in CODES if c in out}


def worst_layers(profiles: Sequence[P.Profile], shown: int = WORST_SHOWN) -> list[WorstLayers]:
    """Per kind, the layers whose latest value is furthest above and below the median layer's."""
    out = []
    for p in profiles:
        latest = [(n, v) for n, v in zip(p.layers, p.values[-1]) if math.isfinite(v) and v > 0]
        if len(latest) < 2:
            continue
        med = statistics.median(v for _, v in latest)
        ranked = sorted(((n, v, v / med) for n, v in latest), key=lambda t: -t[2])
        largest = [t for t in ranked[:shown] if t[2] > 1.0]
        smallest = [t for t in reversed(ranked[-shown:]) if t[2] < 1.0]
        out.append(WorstLayers(p.kind, p.steps[-1], med, largest, smallest))
    return out


def rederive(rb: ReadBack) -> list[Finding]:
    """The findings of the callbacks' rules on the records read back, one logging step at a time."""
    d = Diagnosis()
    quiet = logging.getLogger("lightning_normcheck")
    was, quiet.disabled = quiet.disabled, True  # the live run's one line per new finding: the table says it all here
    try:
        d.start(rb.run, rb.init)
        for step, records in rb.flushes:
            d.observe(step, records)
    finally:
        quiet.disabled = was
    return list(d.log.findings)


def build(logdir: str, rederive_findings: bool = False) -> Report:
    """Read the run under ``logdir`` and judge it.

    Raises:
        FileNotFoundError: no lightning_normcheck logs under ``logdir``.
    """
    run_dir = find_run_dir(logdir)
    if run_dir is None:
        raise FileNotFoundError(
            f"no lightning_normcheck logs under {logdir} (looked for TensorBoard event files, metrics.csv,"
            f" {E.FINDINGS_JSON})"
        )
    rows: dict[int, dict[str, float]] = {}
    description: dict[str, Any] | None = None
    source = ""
    names = os.listdir(run_dir)
    if any(n.startswith(_MARKERS[0]) for n in names):
        rows, description = read_tensorboard(run_dir)
        source = "tensorboard"
    if not rows and "metrics.csv" in names:
        rows, source = read_csv(os.path.join(run_dir, "metrics.csv")), "csv"
    run_file = os.path.join(run_dir, E.RUN_FILE)
    if os.path.exists(run_file):
        with open(run_file, encoding="utf-8") as fh:
            description = json.load(fh)
    rb = read_back(rows, description, key_order=source != "csv")
    findings = None if rederive_findings else load_findings(run_dir)
    rederived = findings is None
    if findings is None:
        findings = rederive(rb)
    book = P.ProfileBook()
    book.add(rb.pictures)
    profiles = book.profiles(findings)
    return Report(run_dir, source, findings, rederived, rb, description, worst_layers(profiles), profiles)


def _g(v: float) -> str:
    return f"{v:.3g}"


def worst_text(worst: Sequence[WorstLayers]) -> str:
    """The worst layers, one line per kind and direction."""
    if not worst:
        return "Worst layers: no per-layer values were logged."
    lines = ["Worst layers (latest sampled step, relative to the median layer):"]
    for w in worst:
        title = P.KINDS[w.kind][0].removesuffix(" by depth")
        big = ", ".join(f"{n} {_g(v)} ({_g(r)}x)" for n, v, r in w.largest) or "-"
        small = ", ".join(f"{n} {_g(v)} ({_g(r)}x)" for n, v, r in w.smallest) or "-"
        lines.append(f"- {title} at step {w.step} (median {_g(w.median)}): largest {big}; smallest {small}")
    return "\n".join(lines)


def text(report: Report) -> str:
    """The report as console text."""
    how = (
        "re-derived from the logged scalars by the callbacks' rules"
        if report.rederived
        else f"as the callbacks wrote them ({E.FINDINGS_JSON})"
    )
    parts = [
        f"lightning-normcheck report: {report.run_dir} (scalars: {report.source or 'none'}; findings {how})",
        E.findings_report(report.findings),
        worst_text(report.worst),
    ]
    notes = list(report.readback.notes) if report.rederived else []
    missing = report.not_rederived
    if missing:
        notes.append("not re-derived: " + "; ".join(f"{c} ({why})" for c, why in missing.items()))
    if notes:
        parts.append("Notes:\n" + "\n".join(f"- {n}" for n in notes))
    return "\n\n".join(parts)


# -- files -------------------------------------------------------------------------------------------------
_CSS = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
    ".error{color:#b00}.warning{color:#a60}.info{color:#555}img{max-width:100%}pre{white-space:pre-wrap}"
)


def html_page(report: Report, pictures: dict[str, bytes], note: str = "") -> str:
    """ONE self-contained page: the findings table, each finding in full with the fixes of its code, the worst
    layers, the depth profiles as PNG data URIs; nothing loaded from elsewhere."""
    esc = html.escape
    out = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>lightning-normcheck report: {esc(report.run_dir)}</title><style>{_CSS}</style></head><body>",
        f"<h1>lightning-normcheck report</h1><p>{esc(report.run_dir)}: "
        + (
            "findings re-derived from the logged scalars"
            if report.rederived
            else "findings as the callbacks wrote them"
        )
        + "</p>",
        "<h2>Findings</h2>",
    ]
    ordered = E.worst_first(report.findings)
    if ordered:
        out.append(
            "<table><tr>" + "".join(f"<th>{c}</th>" for c in ("severity", "code", "layer", "step", "fix")) + "</tr>"
        )
        for f in ordered:
            spec = REGISTRY.get(f.code)
            out.append(
                f"<tr class='{esc(f.severity)}'><td>{esc(f.severity)}</td><td>{esc(f.code)}</td>"
                f"<td>{esc(f.layer or '-')}</td><td>{f.step}</td><td>{esc(spec.fix if spec else '')}</td></tr>"
            )
        out.append("</table><h2>Each finding in full</h2>")
        for f in ordered:
            spec = REGISTRY.get(f.code)
            since = f" (evidence from step {f.since})" if f.since != f.step else ""
            out.append(
                f"<h3 class='{esc(f.severity)}'>{esc(f.severity)} {esc(f.code)}"
                f"{' [' + esc(f.layer) + ']' if f.layer else ''} at step {f.step}{since}</h3><p>{esc(f.message)}</p>"
            )
            if spec:
                out.append("<p>Fixes:</p><ul>" + "".join(f"<li>{esc(x)}</li>" for x in spec.fixes) + "</ul>")
    else:
        out.append("<p>No findings.</p>")
    out.append(f"<h2>Worst layers</h2><pre>{esc(worst_text(report.worst))}</pre>")
    out.append("<h2>Depth profiles</h2>")
    if note:
        out.append(f"<p>{esc(note)}</p>")
    for kind, data in pictures.items():
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        out.append(f"<h3>{esc(P.KINDS[kind][0])}</h3><img alt='{esc(kind)}' src='{uri}'>")
    missing = report.not_rederived
    if missing or (report.rederived and report.readback.notes):
        out.append("<h2>Notes</h2><ul>")
        out += [f"<li>{esc(n)}</li>" for n in (report.readback.notes if report.rederived else [])]
        out += [f"<li>not re-derived: {esc(c)} ({esc(why)})</li>" for c, why in missing.items()]
        out.append("</ul>")
    out.append("</body></html>")
    return "\n".join(out)


def write(report: Report, out_dir: str) -> tuple[list[str], str]:
    """The PNGs (one per kind that has values; matplotlib needed) and the HTML page into ``out_dir``; returns the
    paths written and a line about the pictures when they could not be drawn."""
    os.makedirs(out_dir, exist_ok=True)
    pictures: dict[str, bytes] = {}
    note = ""
    if not P.available():
        note = "matplotlib is not installed: no depth-profile pictures (pip install lightning-normcheck[plots])"
    else:
        pictures = {p.kind: P.png(p) for p in report.profiles}
    written = []
    for kind, data in pictures.items():
        path = os.path.join(out_dir, f"{kind}.png")
        with open(path, "wb") as fh:
            fh.write(data)
        written.append(path)
    path = os.path.join(out_dir, HTML_FILE)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(html_page(report, pictures, note))
    written.append(path)
    return written, note


# -- the console script --------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-normcheck", description="lightning_normcheck tools")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "report",
        help="findings, worst layers and depth profiles of a run, from its logs",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    r.add_argument("logdir", metavar="LOGDIR", help="a run's log directory, or a directory above it (newest run)")
    r.add_argument("--out", help=f"output directory (default: <run dir>/{OUT_DIR})")
    r.add_argument(
        "--rederive",
        action="store_true",
        help=f"re-derive the findings from the scalars even when {E.FINDINGS_JSON} exists",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lightning-normcheck`` console script; returns the exit status (2: no logs found)."""
    args = parser().parse_args(argv)
    try:
        report = build(args.logdir, rederive_findings=args.rederive)
    except FileNotFoundError as err:
        print(f"lightning-normcheck: {err}")
        return 2
    print(text(report))
    out_dir = args.out or os.path.join(report.run_dir, OUT_DIR)
    written, note = write(report, out_dir)
    if note:
        print(note)
    print("Written: " + ", ".join(written))
    return 0


__all__ = ["NOT_REDERIVED", "REDERIVED", "Report", "build", "find_run_dir", "main", "read_csv", "read_tensorboard"]


if __name__ == "__main__":
    sys.exit(main())
