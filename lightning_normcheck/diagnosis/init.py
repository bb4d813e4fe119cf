"""Initialization advice: which layers' weight scale is off for the activation that follows them.

A layer's *gain* is ``weight.std() * sqrt(fan_in)``. The activation RMS is preserved layer to layer
when the gain matches the activation that follows: ``sqrt(2)`` for ReLU-like units (Kaiming/He,
``std = sqrt(2 / fan_in)``), ``sqrt(2 * fan_in / (fan_in + fan_out))`` for tanh/sigmoid
(Xavier/Glorot) and ``1`` for SELU or no activation (LeCun, ``std = 1 / sqrt(fan_in)``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    >>> _ = nn.init.normal_(net[0].weight, std=3.0 / 64 ** 0.5)
    >>> advice = layer_init_advice(dict(net.named_modules()), ["0", "1", "2"])
    >>> advice[0].name, advice[0].activation, round(advice[0].expected_gain, 2)
    ('0', 'ReLU', 1.41)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: Activations that zero about half their input: Kaiming/He gain sqrt(2).
KAIMING_ACTS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.Mish,
    nn.RReLU,
    nn.CELU,
    nn.Softplus,
)
#: Activations that are linear around 0 and bounded: Xavier/Glorot.
XAVIER_ACTS: tuple[type[nn.Module], ...] = (nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Softsign)
#: Self-normalizing units: LeCun 1/sqrt(fan_in).
LECUN_ACTS: tuple[type[nn.Module], ...] = (nn.SELU,)


def is_weight_layer(module: nn.Module) -> bool:
    """Linear- and convolution-like modules (the layers whose outputs a depth trend is judged on)."""
    return isinstance(module, (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd))


@dataclass
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


def _following_activation(modules: dict[str, nn.Module], order: list[str], index: int) -> nn.Module | None:
    for name in order[index + 1 :]:
        m = modules.get(name)
        if m is None:
            continue
        if is_weight_layer(m):
            return None
        if isinstance(m, KAIMING_ACTS + XAVIER_ACTS + LECUN_ACTS):
            return m
    return None


@torch.no_grad()
def layer_init_advice(modules: dict[str, nn.Module], order: list[str]) -> list[LayerInit]:
    """The gain of every weight layer in ``order`` and the std to use for the activation after it.

    Args:
        modules: module name to module (the hooked leaf modules).
        order: module names in execution order (first forward pass).

    Returns:
        One :class:`LayerInit` per weight layer with a floating-point weight of 2+ dimensions.
    """
    out: list[LayerInit] = []
    for i, name in enumerate(order):
        m = modules.get(name)
        if m is None or not is_weight_layer(m):
            continue
        w = getattr(m, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 or not w.is_floating_point() or w.numel() < 2:
            continue
        fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(w)
        std = float(w.detach().float().std())
        act = _following_activation(modules, order, i)
        if isinstance(act, KAIMING_ACTS):
            scheme, expected = "Kaiming", math.sqrt(2.0)
        elif isinstance(act, XAVIER_ACTS):
            scheme, expected = "Xavier", math.sqrt(2.0 * fan_in / (fan_in + fan_out))
        else:
            scheme, expected = "LeCun", 1.0
        out.append(
            LayerInit(
                name=name,
                fan_in=int(fan_in),
                std=std,
                gain=std * math.sqrt(fan_in),
                activation=type(act).__name__ if act is not None else "none",
                scheme=scheme,
                expected_gain=expected,
                recommended_std=expected / math.sqrt(fan_in),
            )
        )
    return out


def init_message(advice: list[LayerInit], direction: str, limit: int = 4) -> str:
    """A sentence naming the layers whose gain is off in ``direction`` ("high" or "low") and the std to use.

    A layer is off when its gain is more than 1.25x away from the right one (the RMS then drifts by
    that factor per layer: 1.25**10 is ~9x over ten layers).
    """
    if direction == "high":
        off = [a for a in advice if a.ratio > 1.25]
    else:
        off = [a for a in advice if a.ratio < 0.8]
    if not off:
        return ""
    shown = "; ".join(a.describe() for a in off[:limit])
    more = f" (and {len(off) - limit} more)" if len(off) > limit else ""
    first = off[0]
    if first.scheme == "Kaiming":
        how = "nn.init.kaiming_normal_(w, nonlinearity='relu') (std sqrt(2/fan_in))"
    elif first.scheme == "Xavier":
        how = "nn.init.xavier_normal_(w) (std sqrt(2/(fan_in+fan_out)))"
    else:
        how = "nn.init.normal_(w, std=1/sqrt(fan_in)) (LeCun)"
    return f" Init is off for the activation that follows: {shown}{more}. Re-initialize with {how}."
