"""Findings: what the rules concluded, and the log that keeps one per (code, layer).

:class:`FindingLog` is the only way to add, escalate, downgrade, revise or annotate a finding; it refuses
a code that is not in the registry. Escalation is automatic (a repeat with a worse severity replaces the
text); a lower severity needs :meth:`FindingLog.downgrade`, said on purpose by a rule.

Example:
    >>> log = FindingLog()
    >>> f = log.report("exploding_gradients", "warning", step=3, layer="net.0", message="grad norm 1e4")
    >>> f.code, f.severity, f.step, f.layer
    ('exploding_gradients', 'warning', 3, 'net.0')
    >>> _ = log.report("exploding_gradients", "error", step=9, layer="net.0", message="grad norm 1e9")
    >>> len(log), log.findings[0].severity, log.findings[0].step, log.findings[0].last_step
    (1, 'error', 3, 9)
    >>> log.report("not_a_code", "info", 0, None, "")
    Traceback (most recent call last):
    ...
    ValueError: unknown finding code 'not_a_code'; registered codes: exploding_activations, ...
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from lightning_normcheck.diagnosis.registry import REGISTRY, SEVERITIES, Severity

log = logging.getLogger("lightning_normcheck")


@dataclass
class Finding:
    """One conclusion about the run.

    Attributes:
        code: a stable identifier from :data:`~lightning_normcheck.CODES`.
        severity: ``"info"``, ``"warning"`` or ``"error"``.
        step: the optimizer step at which it became known.
        layer: the module name it concerns, or ``None`` for the whole model or loop.
        message: what was seen (with numbers), where, the likely causes and what to try.
        last_step: the last step at which it was seen again.
        count: how many times it was seen (one finding per (code, layer), never one per step).
        value: the headline number, when there is one.
        since: the first step of the evidence (the start of the window judged); ``step`` when it is one step.
        extra: structured details (steps, factors, the exception that followed...).
        overrides: the fixes as LightningCLI overrides (``--trainer.gradient_clip_val=2.3``), when the fix is a
            Trainer or model argument.
    """

    code: str
    severity: Severity
    step: int
    layer: str | None
    message: str
    last_step: int = -1
    count: int = 1
    value: float | None = None
    since: int = -1
    extra: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.last_step < 0:
            self.last_step = self.step
        if self.since < 0:
            self.since = self.step

    @property
    def title(self) -> str:
        """The code's title in the registry."""
        spec = REGISTRY.get(self.code)
        return spec.title if spec else self.code

    def __str__(self) -> str:
        where = f" [{self.layer}]" if self.layer else ""
        return f"{self.severity.upper()} {self.code}{where} @ step {self.step}: {self.message}"

    def short(self, width: int = 160) -> str:
        """One line: severity, code, layer, step and the start of what was seen (the full text is in the
        summary and in each logger's findings)."""
        where = f" [{self.layer}]" if self.layer else ""
        head = f"{self.severity.upper()} {self.code}{where} @ step {self.step}: "
        seen = self.message.split(". ")[0]
        room = max(20, width - len(head))
        return head + (seen if len(seen) <= room else seen[: room - 3] + "...")


def _rank(severity: str) -> int:
    return SEVERITIES.index(severity)  # type: ignore[arg-type]


class FindingLog:
    """Keeps one :class:`Finding` per ``(code, layer)``; a repeat updates it, a worse one escalates it."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str | None], Finding] = {}
        self.enabled = True  # False on ranks other than zero: only rank zero announces
        self.listeners: list[Callable[[Finding], Any]] = []

    @property
    def findings(self) -> list[Finding]:
        return list(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)

    def get(self, code: str, layer: str | None = None) -> Finding | None:
        return self._by_key.get((code, layer))

    def of(self, *codes: str) -> list[Finding]:
        """The findings of these codes (any layer), in the order they were first reported."""
        return [f for f in self._by_key.values() if f.code in codes]

    def has(self, *codes: str, at_least: Severity = "info") -> bool:
        """Whether a finding of one of ``codes`` exists with at least this severity."""
        return any(_rank(f.severity) >= _rank(at_least) for f in self.of(*codes))

    @staticmethod
    def _check(code: str, severity: str) -> None:
        if code not in REGISTRY:
            raise ValueError(f"unknown finding code {code!r}; registered codes: {', '.join(REGISTRY)}")
        if severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")

    def report(
        self,
        code: str,
        severity: Severity | None,
        step: int,
        layer: str | None,
        message: str,
        value: float | None = None,
        since: int | None = None,
        **extra: Any,
    ) -> Finding | None:
        """Record a finding (``severity=None``: the code's default); returns it when it is new or escalated
        (worth announcing), else ``None``."""
        sev: Severity = REGISTRY[code].severity if severity is None and code in REGISTRY else severity  # type: ignore[assignment]
        self._check(code, sev)
        key = (code, layer)
        old = self._by_key.get(key)
        if old is None:
            new = Finding(
                code, sev, int(step), layer, message, value=value, since=int(step if since is None else since)
            )
            new.extra.update(extra)
            self._by_key[key] = new
            self._announce(new)
            return new
        old.count += 1
        old.last_step = max(old.last_step, int(step))
        if _rank(sev) > _rank(old.severity):
            if old.severity == "info":  # a hint that became a problem: the problem is known from now
                old.step, old.since = int(step), int(step if since is None else since)
            old.severity = sev
            old.message = message
            old.value = value
            old.extra.update(extra)
            self._announce(old)
            return old
        return None

    def downgrade(self, code: str, layer: str | None, severity: Severity, message: str) -> Finding | None:
        """Lower a finding's severity when later evidence shows it was milder (a burst that fell back)."""
        f = self.get(code, layer)
        self._check(code, severity)
        if f is None or _rank(severity) >= _rank(f.severity):
            return None
        f.severity = severity
        f.message = message
        return f

    def revise(
        self,
        code: str,
        layer: str | None,
        message: str,
        *,
        step: int,
        count: int | None = None,
        value: float | None = None,
        **extra: Any,
    ) -> Finding | None:
        """Rewrite a finding that sums up many events (its message, count, headline value, details)."""
        f = self.get(code, layer)
        if f is None:
            return None
        f.message = message
        f.last_step = max(f.last_step, int(step))
        if count is not None:
            f.count = count
        if value is not None:
            f.value = value
        f.extra.update(extra)
        return f

    def advise(self, code: str, layer: str | None, message: str, overrides: list[str]) -> Finding | None:
        """Put a concrete fix into a finding: its message with the value, and the overrides that set it."""
        f = self.get(code, layer)
        if f is None:
            return None
        f.message = message
        f.overrides = list(overrides)
        return f

    def annotate(self, code: str, layer: str | None, key: str, sentence: str, **extra: Any) -> bool:
        """Append ``sentence`` to a finding once per ``key`` (e.g. the exception that followed it)."""
        f = self.get(code, layer)
        if f is None:
            return False
        notes = f.extra.setdefault("notes", [])
        if key in notes:
            return False
        notes.append(key)
        f.message = f"{f.message} {sentence.strip()}"
        f.extra.update(extra)
        return True

    def _announce(self, finding: Finding) -> None:
        if not self.enabled:
            return
        level = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}[finding.severity]
        log.log(level, "%s", finding.short())  # one short line while training; the full text once, in the summary
        for listener in self.listeners:
            listener(finding)

    def state_dict(self) -> dict[str, Any]:
        return {"findings": [asdict(f) for f in self._by_key.values()]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in fields(Finding)}
        self._by_key = {}
        for d in state.get("findings", []):
            f = Finding(**{k: v for k, v in d.items() if k in names})
            self._by_key[(f.code, f.layer)] = f

    def table(self) -> str:
        """The findings as a short table: one row per code (its layers grouped), worst first, then by first step,
        with the registry's one-line fix; nothing cut. A markdown table, padded so it reads in a console too.

        Example:
            >>> log = FindingLog()
            >>> for layer in ("net.10", "net.2", "net.4", "net.6"):
            ...     _ = log.report("dead_units", "warning", 5, layer, "...")
            >>> _ = log.report("exploding_gradients", "error", 9, None, "...")
            >>> lines = log.table().splitlines()
            >>> lines[0]
            'normcheck: 5 finding(s) of 2 code(s): 1 error, 4 warning'
            >>> [c.strip() for c in lines[4].split("|")[1:5]], "net.2, net.4 (+2 more)" in lines[5]
            (['error', 'exploding_gradients', '-', '9'], True)
        """
        import re

        found = sorted(self._by_key.values(), key=lambda f: (-_rank(f.severity), f.step, f.layer or ""))
        if not found:
            return "normcheck: no findings."
        groups: dict[str, list[Finding]] = {}  # a code's place: that of its worst, earliest finding
        for f in found:
            groups.setdefault(f.code, []).append(f)
        counts = ", ".join(f"{n} {sev}" for sev in reversed(SEVERITIES) if (n := sum(f.severity == sev for f in found)))
        header = ("severity", "code", "layers", "first step", "fix")
        rows = []
        for code, group in groups.items():
            # layers in natural order (net.2 before net.10): the full list, worst first, is in the details
            names = sorted(
                (f.layer or "-" for f in group),
                key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)],
            )
            layers = ", ".join(names) if len(names) <= 3 else f"{', '.join(names[:2])} (+{len(names) - 2} more)"
            spec = REGISTRY.get(code)
            fix = spec.fix if spec else ""
            overrides = list(dict.fromkeys(o for f in group for o in f.overrides))
            if overrides:
                fix += "; or " + " ".join(f"`{o}`" for o in overrides)
            cells = (group[0].severity, code, layers, str(min(f.step for f in group)), fix)
            rows.append(tuple(c.replace("|", "\\|") for c in cells))
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            padded = (c.rjust(w) if i == 3 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            return "| " + " | ".join(padded) + " |"

        rule = "|" + "|".join("-" * (w + 1) + (":" if i == 3 else "-") for i, w in enumerate(widths)) + "|"
        title = f"normcheck: {len(found)} finding(s) of {len(groups)} code(s): {counts}"
        return "\n".join([title, "", line(header), rule, *(line(r) for r in rows)])


__all__ = ["Finding", "FindingLog", "SEVERITIES", "Severity"]
