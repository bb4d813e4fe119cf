"""Findings: what a monitor concluded, in plain words, and the log that keeps one per (code, layer).

Example:
    >>> log = FindingLog()
    >>> f = log.report("exploding_gradients", "warning", step=3, layer="net.0", message="grad norm 1e4")
    >>> f.code, f.severity, f.step, f.layer
    ('exploding_gradients', 'warning', 3, 'net.0')
    >>> _ = log.report("exploding_gradients", "error", step=9, layer="net.0", message="grad norm 1e9")
    >>> len(log), log.findings[0].severity, log.findings[0].step, log.findings[0].last_step
    (1, 'error', 3, 9)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "error"]

SEVERITIES: tuple[str, ...] = ("info", "warning", "error")

CODES: tuple[str, ...] = (
    "exploding_activations",
    "vanishing_activations",
    "exploding_gradients",
    "vanishing_gradients",
    "nonfinite_loss",
    "nonfinite_gradients",
    "dead_units",
    "saturated_activations",
    "high_clip_rate",
    "weight_norm_growth",
    "missing_zero_grad",
    "double_optimizer_step",
    "loss_sum_reduction",
    "accumulation_not_averaged",
    "hidden_state_not_detached",
    "gradient_spikes",
    "input_scale",
    "label_scale",
)

log = logging.getLogger("lightning_normcheck")


@dataclass
class Finding:
    """One conclusion about the run.

    Attributes:
        code: a stable identifier from :data:`CODES`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: the global (optimizer) step at which it was first seen.
        layer: the module name it concerns, or ``None`` for the whole model or loop.
        message: what was seen (with numbers), where, the likely cause and what to try.
        last_step: the last step at which it was seen again.
        count: how many times it was reported (one finding per (code, layer), never one per step).
        value: the headline number, when there is one.
    """

    code: str
    severity: Severity
    step: int
    layer: str | None
    message: str
    last_step: int = -1
    count: int = 1
    value: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.last_step < 0:
            self.last_step = self.step

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"{self.severity.upper()} {self.code}{where} @ step {self.step}: {self.message}"


class FindingLog:
    """Keeps one :class:`Finding` per ``(code, layer)``; a repeat updates it, a worse one escalates it."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str | None], Finding] = {}
        self.enabled = True  # False on ranks other than zero: only rank zero reports
        self.listeners: list[Any] = []

    @property
    def findings(self) -> list[Finding]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, code: str, layer: str | None = None) -> Finding | None:
        return self._by_key.get((code, layer))

    def report(
        self,
        code: str,
        severity: Severity,
        step: int,
        layer: str | None,
        message: str,
        value: float | None = None,
        **extra: Any,
    ) -> Finding | None:
        """Record a finding; returns it when it is new or escalated (worth announcing), else ``None``."""
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")
        key = (code, layer)
        old = self._by_key.get(key)
        if old is None:
            new = Finding(code, severity, int(step), layer, message, value=value, extra=dict(extra))
            self._by_key[key] = new
            self._announce(new)
            return new
        old.count += 1
        old.last_step = max(old.last_step, int(step))
        if SEVERITIES.index(severity) > SEVERITIES.index(old.severity):
            old.severity = severity
            old.message = message
            old.value = value
            old.extra.update(extra)
            self._announce(old)
            return old
        return None

    def _announce(self, finding: Finding) -> None:
        if not self.enabled:
            return
        level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[finding.severity]
        log.log(level, "%s", finding)
        for listener in self.listeners:
            listener(finding)

    def remove(self, code: str, layer: str | None = None) -> None:
        self._by_key.pop((code, layer), None)

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [asdict(f) for f in self._by_key.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._by_key = {}
        for d in state.get("findings", []):
            f = Finding(**d)
            self._by_key[(f.code, f.layer)] = f

    def table(self) -> str:
        """A short fixed-width table of the findings, worst first."""
        rows = sorted(self._by_key.values(), key=lambda f: (-SEVERITIES.index(f.severity), f.step))
        if not rows:
            return "normcheck: no findings."
        lines = [
            f"normcheck: {len(rows)} finding(s)",
            f"{'severity':<8} {'step':>6}  {'code':<26} {'layer':<24} message",
        ]
        for f in rows:
            msg = f.message if len(f.message) <= 160 else f.message[:157] + "..."
            lines.append(f"{f.severity:<8} {f.step:>6}  {f.code:<26} {str(f.layer or '-'):<24} {msg}")
        return "\n".join(lines)
