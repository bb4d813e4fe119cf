"""Property-based tests (hypothesis): any argument is validated at construction, and odd models train
unchanged with NormCheck attached, with no monitor switched off.

Example counts are small (each odd-model example trains two real models); run with
``--hypothesis-seed`` to reproduce a failure.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from helpers import fit, loader, regression_data
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_normcheck import (
    ActivationNormMonitor,
    ClipRateTracker,
    GradientNormMonitor,
    NormCheck,
    TrainingBugDetector,
    WeightDriftMonitor,
)

CALLBACKS = [
    NormCheck,
    GradientNormMonitor,
    ActivationNormMonitor,
    WeightDriftMonitor,
    ClipRateTracker,
    TrainingBugDetector,
]
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------------------------------
# arguments: an independent statement of what each argument allows


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _int(v: Any, low: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low


def _str_list(v: Any) -> bool:
    return v is None or (isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v))


#: argument -> does this value have to be accepted (True) or refused (False)?
ALLOWED: dict[str, Callable[[Any], bool]] = {
    "log_every_n_steps": lambda v: v is None or _int(v, 1),
    "norm_type": lambda v: _num(v) and v > 0,
    "include_types": _str_list,
    "exclude_types": _str_list,
    "include_names": _str_list,
    "exclude_names": _str_list,
    "saturation_threshold": lambda v: _num(v) and 0 < v < 1,
    "activation_window": lambda v: _int(v, 1),
    "clip_threshold": lambda v: v is None or (_num(v) and v > 0),
    "clip_algorithm": lambda v: v is None or (isinstance(v, str) and v in ("norm", "value")),
    "clip_window": lambda v: _int(v, 1),
    "high_clip_rate": lambda v: _num(v) and 0 < v <= 1,
}

#: for arguments whose range is not stated here: values of the wrong type, always refused
WRONG_TYPE: dict[str, Callable[[Any], bool]] = {
    "bool": lambda v: not isinstance(v, bool),
    "int": lambda v: isinstance(v, bool) or not isinstance(v, int),
    "float": lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v),
}

POOL = [
    None,
    True,
    False,
    0,
    1,
    2,
    7,
    -1,
    0.0,
    0.5,
    0.99,
    1.0,
    1.5,
    10.0,
    -0.1,
    float("nan"),
    float("inf"),
    float("-inf"),
    "norm",
    "value",
    "x",
    "",
    [],
    ["Linear"],
    ("ReLU", "Tanh"),
    [1],
    ["a", 2],
    {},
    {"a": 1},
    b"x",
    object(),
]
VALUES = st.one_of(
    st.sampled_from(POOL),
    st.integers(-3, 60),
    st.floats(-2.0, 2.0),
    st.text(max_size=3),
    st.lists(st.sampled_from(["Linear", "ReLU", "net.*", 3]), max_size=3),
)


def _params(cls: type) -> dict[str, inspect.Parameter]:
    return {n: p for n, p in inspect.signature(cls.__init__).parameters.items() if n != "self"}


@st.composite
def one_argument(draw: st.DrawFn) -> tuple[type, str, Any]:
    cls = draw(st.sampled_from(CALLBACKS))
    name = draw(st.sampled_from(sorted(_params(cls))))
    return cls, name, draw(VALUES)


def _expectation(cls: type, name: str, value: Any) -> bool | None:
    """True: must be accepted; False: must be refused; None: not stated (range unknown here)."""
    if name in ALLOWED:
        return ALLOWED[name](value)
    ann = str(_params(cls)[name].annotation)
    kind = "bool" if ann == "bool" else "int" if ann.startswith("int") else "float" if ann.startswith("float") else None
    if kind is None:
        return None
    if ann.endswith("| None") and value is None:
        return True
    return False if WRONG_TYPE[kind](value) else None


@FAST
@given(one_argument())
@example((NormCheck, "log_every_n_steps", True))
@example((NormCheck, "saturation_threshold", 1.0))
@example((NormCheck, "clip_algorithm", ["norm"]))
@example((NormCheck, "include_names", "net.*"))
@example((NormCheck, "norm_type", float("inf")))
def test_every_argument_is_validated_at_construction(case: tuple[type, str, Any]) -> None:
    cls, name, value = case
    expected = _expectation(cls, name, value)
    try:
        cls(**{name: value})
    except (ValueError, TypeError) as err:
        assert expected is not True, f"{cls.__name__}({name}={value!r}) was refused: {err}"
        message = str(err)
        assert f"`{name}`" in message and repr(value) in message and cls.__name__ in message, message
        assert "must be" in message  # and what is allowed
        return
    assert expected is not False, f"{cls.__name__}({name}={value!r}) was accepted"


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "log_every_n_steps": st.one_of(st.none(), st.integers(1, 500)),
            "activations": st.booleans(),
            "weights": st.booleans(),
            "norm_type": st.sampled_from([1.0, 2.0, 3, float("inf")]),
            "exclude_types": st.lists(st.sampled_from(["Linear", "ReLU", "LayerNorm"]), max_size=2),
            "saturation_threshold": st.floats(0.5, 0.999),
            "activation_window": st.integers(1, 20),
            "clip_threshold": st.one_of(st.none(), st.floats(0.01, 100.0)),
            "clip_algorithm": st.sampled_from([None, "norm", "value"]),
            "clip_window": st.integers(1, 200),
            "high_clip_rate": st.floats(0.05, 1.0),
        },
    )
)
def test_valid_arguments_construct_and_give_a_stable_state_key(kwargs: dict[str, Any]) -> None:
    a, b = NormCheck(**kwargs), NormCheck(**kwargs)
    assert a.findings == [] and a.state_key == b.state_key
    defaults = {k: p.default for k, p in _params(NormCheck).items()}
    # a configuration other than the defaults has its own key; the defaults spelled out share NormCheck()'s
    assert (a.state_key != NormCheck().state_key) == any(v != defaults[k] for k, v in kwargs.items())


# ----------------------------------------------------------------------------------------------------
# odd models

FEATURES = (
    "frozen",
    "unused",
    "sparse",
    "complex",
    "int_buffer",
    "tied",
    "reuse",
    "lstm",
    "packed",
    "dict_out",
    "empty",
    "double",
    "scalar_param",
)


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, h: torch.Tensor) -> dict[str, Any]:
        y = self.lin(h)
        return {"mask": y > 0, "y": y, "aux": [y.sum(), None]}


class OddModel(L.LightningModule):
    """A small regression model with any combination of odd features."""

    def __init__(self, features: frozenset[str], optimizer: str = "adam") -> None:
        super().__init__()
        self.f = features
        self.optimizer_name = "sgd" if "sparse" in features else optimizer
        self.inp = nn.Linear(8, 16)
        self.act = nn.ReLU()
        if "frozen" in features:
            self.frozen = nn.Linear(16, 16).requires_grad_(False)
        if "unused" in features:
            self.unused = nn.Linear(16, 16)  # trainable, never called: grad stays None
        if "sparse" in features:
            self.emb = nn.Embedding(10, 16, sparse=True)
        if "complex" in features:
            self.cw = nn.Parameter(0.1 * torch.randn(16, 16, dtype=torch.cfloat))
        if "int_buffer" in features:
            self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        if "tied" in features:
            self.enc = nn.Linear(16, 16, bias=False)
            self.dec = nn.Linear(16, 16, bias=False)
            self.dec.weight = self.enc.weight
        if "reuse" in features:
            self.shared = nn.Linear(16, 16)
        if "lstm" in features:
            self.lstm = nn.LSTM(16, 16, batch_first=True)
        if "packed" in features:
            self.gru = nn.GRU(16, 16, batch_first=True)
        if "dict_out" in features:
            self.dictmod = DictOut()
        if "empty" in features:
            self.empty = nn.Parameter(torch.zeros(0))
        if "double" in features:
            self.dbl = nn.Linear(16, 16).double()
        if "scalar_param" in features:
            self.gain = nn.Parameter(torch.tensor(1.0))
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.f
        h = self.act(self.inp(x))
        if "frozen" in f:
            h = h + self.frozen(h)
        if "sparse" in f:
            h = h + self.emb((x[:, 0].abs() * 3).long().clamp(max=9))
        if "complex" in f:
            h = h + (h.to(torch.cfloat) @ self.cw).abs()
        if "int_buffer" in f:
            self.calls += 1
        if "tied" in f:
            h = self.dec(torch.tanh(self.enc(h)))
        if "reuse" in f:
            for _ in range(3):
                h = self.act(self.shared(h)) + h
        if "lstm" in f:
            out, (_, _) = self.lstm(h.unsqueeze(1).expand(-1, 3, -1))
            h = out[:, -1]
        if "packed" in f:
            lengths = torch.arange(h.shape[0]) % 3 + 1
            packed = pack_padded_sequence(
                h.unsqueeze(1).expand(-1, 3, -1), lengths, batch_first=True, enforce_sorted=False
            )
            _, hn = self.gru(packed)
            h = hn[-1]
        if "dict_out" in f:
            h = self.dictmod(h)["y"]
        if "empty" in f:
            h = h + self.empty.sum()
        if "double" in f:
            h = self.dbl(h.double()).float()
        if "scalar_param" in f:
            h = h * self.gain
        return self.head(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        self.opt = (
            torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            if self.optimizer_name == "sgd"
            else torch.optim.Adam(self.parameters(), lr=1e-3)
        )
        return self.opt


class NoParams(L.LightningModule):
    """Zero parameters: manual optimization, a forward of parameterless modules, and either no optimizer
    or a dummy one (over a parameter outside the model) stepped without any gradient."""

    def __init__(self, dummy_optimizer: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.body = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Dropout(0.1))
        self.seen = 0
        self.dummy_optimizer = dummy_optimizer

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.seen += int(self.body(batch[0]).shape[0])
        if self.dummy_optimizer:
            opt = self.optimizers()
            opt.zero_grad()  # type: ignore[union-attr]
            opt.step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> Any:
        if self.dummy_optimizer:
            return torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        return None


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(
    make: Callable[[], L.LightningModule], cb: NormCheck | None, steps: int, every: int, accumulate: int
) -> tuple[L.LightningModule, list[str]]:
    L.seed_everything(0, verbose=False)
    model = make()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(
            model,
            loader(regression_data(96), batch_size=8, shuffle=True),
            [cb] if cb else [],
            max_steps=steps,
            log_every_n_steps=every,
            accumulate_grad_batches=accumulate,
        )
    return model, [
        str(w.message) for w in rec if "lightning_normcheck" in str(w.message) and "failed" in str(w.message)
    ]


def _check_unchanged(make: Callable[[], L.LightningModule], steps: int, every: int, accumulate: int) -> NormCheck:
    plain, _ = _train(make, None, steps, every, accumulate)
    cb = NormCheck(print_summary=False)
    watched, failed = _train(make, cb, steps, every, accumulate)
    assert failed == [] and cb.disabled_monitors == [], failed
    a, b = _state(plain), _state(watched)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs with NormCheck attached"
    for name, m in watched.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, name
    opt = getattr(watched, "opt", None)
    if opt is not None:
        assert not opt._optimizer_step_post_hooks and not opt._optimizer_step_pre_hooks
    return cb


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    features=st.frozensets(st.sampled_from(FEATURES), min_size=1, max_size=5),
    optimizer=st.sampled_from(["adam", "sgd"]),
    steps=st.integers(1, 9),
    every=st.sampled_from([1, 3, 50]),
    accumulate=st.sampled_from([1, 1, 2]),
)
@example(frozenset(FEATURES), "sgd", 8, 2, 1)  # everything at once
def test_odd_models_train_unchanged_with_normcheck(
    features: frozenset[str], optimizer: str, steps: int, every: int, accumulate: int
) -> None:
    _check_unchanged(lambda: OddModel(features, optimizer), steps, every, accumulate)


@pytest.mark.parametrize("feature", FEATURES)
def test_each_odd_feature_alone(feature: str) -> None:
    cb = _check_unchanged(lambda: OddModel(frozenset({feature})), 6, 2, 1)
    assert not [f for f in cb.findings if f.code in ("nonfinite_gradients", "nonfinite_loss")]


def test_sparse_gradient_norm_is_measured() -> None:
    """nn.Embedding(sparse=True) with SGD: its gradient counts in the logged total (independent check)."""
    totals: dict[int, float] = {}

    class Total(L.Callback):
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, opt: Any) -> None:
            sq = 0.0
            for p in pl_module.parameters():
                if p.grad is not None:
                    g = p.grad.coalesce().values() if p.grad.is_sparse else p.grad
                    sq += float(g.double().pow(2).sum())
            totals[trainer.global_step] = math.sqrt(sq)

    from test_robustness import MemLogger

    logger = MemLogger()
    L.seed_everything(0, verbose=False)
    model = OddModel(frozenset({"sparse"}))
    cb = NormCheck(print_summary=False)
    fit(model, loader(regression_data(96), batch_size=8), [cb, Total()], max_steps=5, logger=logger)
    logged = {s: row["normcheck/grad_norm/total"] for s, row in logger.rows if "normcheck/grad_norm/total" in row}
    assert sorted(logged) == [0, 1, 2, 3, 4]
    for s, v in logged.items():
        assert v == pytest.approx(totals[s], rel=1e-4)
    assert cb.disabled_monitors == []


@settings(max_examples=5, deadline=None)
@given(steps=st.integers(1, 6), every=st.sampled_from([1, 2, 50]), dummy_optimizer=st.booleans())
@example(steps=3, every=1, dummy_optimizer=True)
@example(steps=3, every=1, dummy_optimizer=False)
def test_model_without_parameters(steps: int, every: int, dummy_optimizer: bool) -> None:
    L.seed_everything(0, verbose=False)
    model = NoParams(dummy_optimizer)
    cb = NormCheck(print_summary=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(
            model,
            loader(regression_data(64), batch_size=8),
            [cb],
            max_steps=-1,
            max_epochs=1,
            limit_train_batches=steps,
            log_every_n_steps=every,
        )
    assert model.seen == 8 * steps
    assert cb.disabled_monitors == [], [str(w.message) for w in rec]
    assert not [str(w.message) for w in rec if "monitor failed" in str(w.message)]
    assert not [f for f in cb.findings if f.severity != "info"]
    assert all(not m._forward_hooks for m in model.modules())
