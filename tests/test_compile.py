"""torch.compile'd models: activations are measured only outside compiled code, the loss probe does not run
(it would recompile), nothing recompiles because of NormCheck, and no false alarm."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from helpers import LitModel, MemLogger, bad, fit, loader, mlp, regression_data
from lightning.pytorch.utilities.compile import from_compiled
from torch import nn

from lightning_normcheck import NormCheck
from lightning_normcheck.callbacks._base import compiled_prefixes, in_prefixes


def test_compiled_prefixes_finds_every_kind_of_compiled_module() -> None:
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    assert compiled_prefixes(plain) == []
    wrapped = nn.Sequential(nn.Linear(4, 4), torch.compile(nn.Sequential(nn.ReLU(), nn.Linear(4, 1))))
    assert compiled_prefixes(wrapped) == ["1"]  # torch.compile(m): an OptimizedModule (nothing traced yet)
    inner = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 1)))
    inner[1].compile()  # in place: nn.Module.compile
    assert compiled_prefixes(inner) == ["1"]
    whole = from_compiled(torch.compile(LitModel(mlp(depth=1))))  # torch.compile(lightning_module)
    assert compiled_prefixes(whole) == [""]
    assert in_prefixes("1.0", ["1"]) and in_prefixes("1", ["1"]) and not in_prefixes("10", ["1"])
    assert in_prefixes("anything", [""]) and not in_prefixes("a", [])


class _PartlyCompiled(LitModel):
    def __init__(self) -> None:
        # backend="eager": Dynamo's capture, guards and recompiles (what NormCheck could disturb), no C++ build
        super().__init__(
            nn.Sequential(nn.Linear(8, 32), nn.Tanh(), torch.compile(mlp(d_in=32, depth=2), backend="eager"))
        )


def test_a_compiled_model_trains_unchanged_and_silent(caplog: pytest.LogCaptureFixture) -> None:
    import torch._dynamo.utils as dynamo_utils

    data = loader(regression_data(n=640), 16)

    def graphs(callbacks: list[Any], logger: Any = False) -> int:
        torch._dynamo.reset()
        dynamo_utils.counters.clear()
        fit(_PartlyCompiled(), data, callbacks, max_steps=40, logger=logger, log_every_n_steps=10)
        return int(dynamo_utils.counters["stats"]["unique_graphs"])

    alone = graphs([])
    cb, mem = NormCheck(print_summary=False), MemLogger()
    with caplog.at_level(logging.INFO, logger="lightning_normcheck"):
        with_normcheck = graphs([cb], mem)
    assert with_normcheck == alone  # no recompilation because of NormCheck (hooks, probes)
    assert "not measured inside torch.compile'd code (`net.2`)" in caplog.text
    act = {k for k in mem.keys() if k.startswith("normcheck/act_rms/")}
    assert act == {"normcheck/act_rms/<input>", "normcheck/act_rms/net.0", "normcheck/act_rms/net.1"}
    assert "normcheck/grad_norm/net.2._orig_mod.0" in mem.keys()  # gradients and weights are measured
    assert not bad(cb.findings) and cb.disabled_monitors == []


class _CompiledLSTM(LitModel):
    """An LSTM inside compiled code, its state carried across batches and detached (truncated BPTT)."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(16, 1))
        self.rnn = torch.compile(nn.LSTM(4, 16, batch_first=True), backend="eager")
        self.state: Any = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out, state = self.rnn(x.view(x.shape[0], 2, 4), self.state)
        self.state = tuple(s.detach() for s in state)
        return nn.functional.mse_loss(self.net(out[:, -1]), y)


def test_a_compiled_rnn_is_not_hooked_and_stays_silent() -> None:
    cb = NormCheck(print_summary=False)
    fit(_CompiledLSTM(), loader(regression_data(n=320), 16), [cb], max_steps=20)
    assert not bad(cb.findings) and cb.disabled_monitors == []
