"""Initialization advice: which layers' weight scale is off for the activation that follows them.

A layer's *gain* is ``weight.std() * sqrt(fan_in)``. The activation RMS is preserved layer to layer
when the gain matches the activation that follows: ``sqrt(2)`` for ReLU-like units (Kaiming/He,
``std = sqrt(2 / fan_in)``), ``sqrt(2 * fan_in / (fan_in + fan_out))`` for tanh/sigmoid
(Xavier/Glorot) and ``1`` for SELU or no activation (LeCun, ``std = 1 / sqrt(fan_in)``).

Pure Python over records: the weight scales come from :class:`~lightning_normcheck.diagnosis.records.InitStats`
(measured at the start of fit), the activation after each layer from the execution order of an
:class:`~lightning_normcheck.diagnosis.records.ActivationSample` and the class names of its modules.

Example:
    >>> from lightning_normcheck.diagnosis.records import InitStats, LayerInitStat, ModuleStat
    >>> from lightning_normcheck.diagnosis.thresholds import InitThresholds
    >>> init = InitStats((LayerInitStat("0", fan_in=64, fan_out=64, std=3.0 / 8), LayerInitStat("2", 64, 1, 0.125)))
    >>> modules = [ModuleStat("0", "Linear", "weight", 3.0), ModuleStat("1", "ReLU", "relu", 2.0),
    ...            ModuleStat("2", "Linear", "weight", 2.0)]
    >>> advice = layer_init_advice(init, modules)
    >>> advice[0].name, advice[0].activation, advice[0].scheme, round(advice[0].expected_gain, 2)
    ('0', 'ReLU', 'Kaiming', 1.41)
    >>> advice[1].activation, advice[1].ratio
    ('none', 1.0)
    >>> print(init_message(advice, "high", InitThresholds()))  # doctest: +NORMALIZE_WHITESPACE
    Init is off for the activation that follows: 0: std 0.375 x sqrt(fan_in=64) = 3, but ReLU needs 1.41
    (Kaiming: std 0.177). Re-initialize with nn.init.kaiming_normal_(w, nonlinearity='relu') (std sqrt(2/fan_in)).
    >>> init_message(advice, "low", InitThresholds())
    ''
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from lightning_normcheck.diagnosis.records import InitStats, ModuleStat
from lightning_normcheck.diagnosis.thresholds import InitThresholds

#: Activations that zero about half their input: Kaiming/He gain sqrt(2) (class names).
KAIMING_ACTS: tuple[str, ...] = (
    "ReLU",
    "ReLU6",
    "GELU",
    "SiLU",
    "LeakyReLU",
    "PReLU",
    "ELU",
    "Mish",
    "RReLU",
    "CELU",
    "Softplus",
)
#: Activations that are linear around 0 and bounded: Xavier/Glorot.
XAVIER_ACTS: tuple[str, ...] = ("Tanh", "Sigmoid", "Hardtanh", "Hardsigmoid", "Softsign")
#: Self-normalizing units: LeCun 1/sqrt(fan_in).
LECUN_ACTS: tuple[str, ...] = ("SELU",)

_HOW = {
    "Kaiming": "nn.init.kaiming_normal_(w, nonlinearity='relu') (std sqrt(2/fan_in))",
    "Xavier": "nn.init.xavier_normal_(w) (std sqrt(2/(fan_in+fan_out)))",
    "LeCun": "nn.init.normal_(w, std=1/sqrt(fan_in)) (LeCun)",
}


@dataclass(frozen=True)
class LayerInit:
    """The init of one weight layer against the activation that follows it."""

    name: str
    fan_in: int
    std: float
    gain: float  # std * sqrt(fan_in)
    activation: str  # class name of the following activation, or "none"
    scheme: str  # "Kaiming", "Xavier" or "LeCun"
    expected_gain: float
    recommended_std: float

    @property
    def ratio(self) -> float:
        """Measured gain over the gain that keeps the RMS constant (1.0 is right)."""
        return self.gain / self.expected_gain if self.expected_gain > 0 else math.nan

    def describe(self) -> str:
        return (
            f"{self.name}: std {self.std:.3g} x sqrt(fan_in={self.fan_in}) = {self.gain:.3g}, but {self.activation}"
            f" needs {self.expected_gain:.3g} ({self.scheme}: std {self.recommended_std:.3g})"
        )


def following_activation(modules: Sequence[ModuleStat], index: int) -> str | None:
    """The class name of the first known activation after ``modules[index]`` and before the next weight layer."""
    for m in modules[index + 1 :]:
        if m.kind == "weight":
            return None
        if m.type_name in KAIMING_ACTS + XAVIER_ACTS + LECUN_ACTS:
            return m.type_name
    return None


def _scheme(activation: str | None, fan_in: int, fan_out: int) -> tuple[str, float]:
    """The init scheme for ``activation`` and the gain (std x sqrt(fan_in)) that keeps the RMS constant."""
    if activation in KAIMING_ACTS:
        return "Kaiming", math.sqrt(2.0)
    if activation in XAVIER_ACTS:
        return "Xavier", math.sqrt(2.0 * fan_in / (fan_in + fan_out))
    return "LeCun", 1.0


def layer_init_advice(init: InitStats, modules: Sequence[ModuleStat]) -> list[LayerInit]:
    """The gain of every weight layer in ``modules`` and the std to use for the activation after it.

    Args:
        init: the weight scales measured at the start of fit.
        modules: the hooked modules in execution order (a sampled step's, or a slice of them).

    Returns:
        One :class:`LayerInit` per weight layer of ``modules`` that ``init`` has a finite, positive-fan-in
        scale for, in execution order.
    """
    stats = {s.name: s for s in init.layers}
    out: list[LayerInit] = []
    for i, m in enumerate(modules):
        s = stats.get(m.name) if m.kind == "weight" else None
        if s is None or s.fan_in <= 0 or not math.isfinite(s.std):
            continue
        act = following_activation(modules, i)
        scheme, expected = _scheme(act, s.fan_in, s.fan_out)
        out.append(
            LayerInit(
                name=m.name,
                fan_in=s.fan_in,
                std=s.std,
                gain=s.std * math.sqrt(s.fan_in),
                activation=act or "none",
                scheme=scheme,
                expected_gain=expected,
                recommended_std=expected / math.sqrt(s.fan_in),
            )
        )
    return out


def init_message(
    advice: Sequence[LayerInit], direction: Literal["high", "low"], th: InitThresholds, limit: int = 4
) -> str:
    """A sentence naming the layers whose gain is off in ``direction`` and the std to use, or ``""``.

    A layer is off when its gain over the right one is above ``th.gain_high`` ("high") or below
    ``th.gain_low`` ("low"). At most ``limit`` layers are named.
    """
    if direction == "high":
        off = [a for a in advice if a.ratio > th.gain_high]
    else:
        off = [a for a in advice if a.ratio < th.gain_low]
    if not off:
        return ""
    shown = "; ".join(a.describe() for a in off[:limit])
    more = f" (and {len(off) - limit} more)" if len(off) > limit else ""
    return f"Init is off for the activation that follows: {shown}{more}. Re-initialize with {_HOW[off[0].scheme]}."


__all__ = [
    "KAIMING_ACTS",
    "LECUN_ACTS",
    "XAVIER_ACTS",
    "LayerInit",
    "following_activation",
    "init_message",
    "layer_init_advice",
]
