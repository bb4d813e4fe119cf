"""Depth profiles: each layer's value against its depth, a few sampled steps overlaid.

The picture the norms checklist asks for: "a line chart of activation norm vs. layer depth should look flat".
One profile per kind (gradient norm, activation RMS, weight norm, update/weight ratio): the layers in forward
order on the x axis, the value on a log scale, the first, a middle and the latest sampled step overlaid, and
the layers named in a finding marked. A :class:`ProfileBook` is fed the typed records
(:mod:`lightning_normcheck.diagnosis.records`) of a live callback or of a report reading logs back, so both
draw the same pictures from the same numbers.

Drawing needs matplotlib (``pip install lightning-normcheck[plots]``); without it :func:`available` is False
and everything else works.

Example:
    >>> from lightning_normcheck.diagnosis.records import GradientLayers
    >>> book = ProfileBook()
    >>> book.add([GradientLayers(0, 0, ("fc1", "fc2"), (1.0, 4.0)), GradientLayers(9, 0, ("fc1", "fc2"), (0.5, 8.0))])
    >>> p = book.profiles()[0]
    >>> p.kind, p.layers, p.steps, p.values
    ('grad_norm', ('fc1', 'fc2'), (0, 9), ((1.0, 4.0), (0.5, 8.0)))
"""

from __future__ import annotations

import importlib.util
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_normcheck.diagnosis.findings import Finding
from lightning_normcheck.diagnosis.records import (
    INPUT_LABEL,
    ActivationSample,
    GradientLayers,
    Record,
    UpdateSample,
    WeightSample,
)

#: kind -> (title, y-axis label), in the order the pictures are shown.
KINDS: dict[str, tuple[str, str]] = {
    "act_rms": ("activation RMS by depth", "RMS of the module's output"),
    "grad_norm": ("gradient norm by depth", "L2 norm of the layer's gradient"),
    "weight_norm": ("weight norm by depth", "L2 norm of the layer's parameters"),
    "update_ratio": ("update / weight ratio by depth", "|step update| / |weights|"),
}

#: Most layer names written under a profile (a model of hundreds of layers gets every k-th, and the marked ones).
MAX_TICKS = 40
#: Sampled steps kept per kind before the history is thinned (every other one dropped, the first and latest
#: always kept): memory stays bounded on any run length.
MAX_KEPT = 64


@dataclass(frozen=True)
class Profile:
    """One kind's depth profile.

    Attributes:
        kind: a key of :data:`KINDS`.
        layers: the layers in forward order (registration order for parameters).
        steps: the steps drawn (first, middle, latest; fewer when fewer were sampled).
        values: per step, each layer's value (``nan`` where a layer had none at that step).
        marked: the layers named in a finding.
    """

    kind: str
    layers: tuple[str, ...]
    steps: tuple[int, ...]
    values: tuple[tuple[float, ...], ...]
    marked: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return KINDS[self.kind][0]


class ProfileBook:
    """The per-layer values of every kind at the sampled steps, kept bounded, from typed records."""

    def __init__(self) -> None:
        # kind -> [(step, {layer: value})], in step order; kind -> layers in the order first seen
        self._history: dict[str, list[tuple[int, dict[str, float]]]] = {k: [] for k in KINDS}
        self._order: dict[str, list[str]] = {k: [] for k in KINDS}

    def add(self, records: Iterable[Record]) -> None:
        """Take the per-layer values of ``records`` (other records are ignored)."""
        for r in records:
            if isinstance(r, GradientLayers):
                self._put("grad_norm", r.step, r.layers, r.norms)
            elif isinstance(r, ActivationSample):
                names = ([INPUT_LABEL] if r.input_rms is not None else []) + [m.name for m in r.modules]
                vals = ([r.input_rms] if r.input_rms is not None else []) + [m.rms for m in r.modules]
                self._put("act_rms", r.step, names, vals)  # type: ignore[arg-type]
            elif isinstance(r, WeightSample):
                self._put("weight_norm", r.step, r.layers, r.norms)
            elif isinstance(r, UpdateSample):
                self._put("update_ratio", r.step, r.layers, r.ratios)

    def _put(self, kind: str, step: int, layers: Sequence[str], values: Sequence[float]) -> None:
        order, history = self._order[kind], self._history[kind]
        known = set(order)
        order.extend(name for name in layers if name not in known)
        if history and history[-1][0] == step:  # two optimizers at one step: one profile of both
            history[-1][1].update(zip(layers, values))
            return
        history.append((step, dict(zip(layers, (float(v) for v in values)))))
        if len(history) > MAX_KEPT:
            self._history[kind] = history[:1] + history[1:-1][1::2] + history[-1:]

    def __len__(self) -> int:
        return sum(len(h) for h in self._history.values())

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds that have values, in the order of :data:`KINDS`."""
        return tuple(k for k in KINDS if self._history[k])

    def profiles(self, findings: Sequence[Finding] = ()) -> list[Profile]:
        """One :class:`Profile` per kind that has values: the first, a middle and the latest sampled step."""
        named = {f.layer for f in findings if f.layer and f.severity != "info"}
        out = []
        for kind in KINDS:
            history, layers = self._history[kind], tuple(self._order[kind])
            if not history:
                continue
            first, last = history[0][0], history[-1][0]
            middle = min(history, key=lambda h: abs(h[0] - (first + last) / 2))
            picked = [history[0]] + ([middle] if middle[0] not in (first, last) else []) + [history[-1]]
            picked = [h for i, h in enumerate(picked) if all(h[0] != p[0] for p in picked[:i])]
            out.append(
                Profile(
                    kind=kind,
                    layers=layers,
                    steps=tuple(s for s, _ in picked),
                    values=tuple(tuple(v.get(name, math.nan) for name in layers) for _, v in picked),
                    marked=tuple(name for name in layers if name in named),
                )
            )
        return out


def available() -> bool:
    """Whether matplotlib is installed (pictures can be drawn)."""
    return importlib.util.find_spec("matplotlib") is not None


def figure(profile: Profile) -> Any:
    """The profile as a matplotlib ``Figure`` (not attached to pyplot: nothing to close, no display needed).

    Raises:
        ImportError: matplotlib is not installed.
    """
    from matplotlib.figure import Figure

    n = len(profile.layers)
    # at most MAX_TICKS named ticks (every k-th layer, and every marked one): drawing 450 rotated labels took
    # most of a 450-module model's ~1.2 s a figure
    every = max(1, math.ceil(n / MAX_TICKS))
    ticks = [i for i, name in enumerate(profile.layers) if i % every == 0 or name in profile.marked]
    # fixed margins instead of tight_layout, which draws the figure once more to measure it (measured: 0.20 s ->
    # 0.12 s for 33 layers); the room under the plot grows with the longest layer name (rotated tick labels of
    # ~0.048 in of height per character at 7-8 pt)
    longest = max((len(profile.layers[i]) for i in ticks), default=4)
    label_in, left_in = 0.35 + 0.048 * longest, max(0.65, 0.026 * longest)  # the first label leans left
    width, height = max(6.0, min(16.0, 0.35 * len(ticks) + 3)) + left_in - 0.65, 3.0 + label_in
    fig = Figure(figsize=(width, height), dpi=100)
    fig.subplots_adjust(left=left_in / width, right=1 - 0.15 / width, top=1 - 0.35 / height, bottom=label_in / height)
    ax = fig.add_subplot()
    xs = list(range(n))
    styles = ["o:", "s--", "^-"]
    for i, (step, values) in enumerate(zip(profile.steps, profile.values)):
        style = styles[i] if len(profile.steps) == 3 else styles[-len(profile.steps) + i]
        pos = [(x, v) for x, v in zip(xs, values) if math.isfinite(v) and v > 0]
        if pos:
            ax.plot(
                [x for x, _ in pos], [v for _, v in pos], style, label=f"step {step}", markersize=4 if n <= 60 else 1.5
            )
    for name in profile.marked:
        x = profile.layers.index(name)
        ax.axvspan(x - 0.4, x + 0.4, color="tab:red", alpha=0.15, lw=0)
    ax.set_yscale("log")
    ax.set_title(profile.title + (" (red: layers named in a finding)" if profile.marked else ""), fontsize=10)
    ax.set_ylabel(KINDS[profile.kind][1], fontsize=9)
    ax.set_xticks(ticks)
    ax.set_xticklabels([profile.layers[i] for i in ticks], rotation=60, ha="right", fontsize=7 if n > 12 else 8)
    if every > 1:
        ax.set_xlabel(f"{n} layers in forward order (every {every}th named)", fontsize=8)
    for label in ax.get_xticklabels():
        if label.get_text() in profile.marked:
            label.set_color("tab:red")
    ax.grid(True, which="major", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return fig


def pixels(profile: Profile) -> Any:
    """The profile drawn once: an RGBA ``uint8`` numpy array of shape ``(height, width, 4)`` (needs matplotlib).

    Draw once, then hand the pixels to every logger (and :func:`encode_png` them for files): a second drawing
    of the same figure costs as much as the first (about 0.1-0.4 s, see :func:`figure`).
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure(profile))
    canvas.draw()
    return np.array(canvas.buffer_rgba())  # a copy: the canvas's buffer goes with the figure


def encode_png(image: Any) -> bytes:
    """PNG bytes of an RGBA (or RGB) ``uint8`` array such as :func:`pixels` returns (matplotlib's PNG writer, the
    one ``savefig`` uses)."""
    from matplotlib.image import imsave

    buf = io.BytesIO()
    imsave(buf, image, format="png")
    return buf.getvalue()


def png(profile: Profile) -> bytes:
    """The profile drawn as PNG bytes (needs matplotlib)."""
    return encode_png(pixels(profile))


__all__ = ["KINDS", "Profile", "ProfileBook", "available", "encode_png", "figure", "pixels", "png"]
