"""Fixes a user can apply: a clip value from the run's own pre-clip norms, named in the message, and the
LightningCLI override that sets it; applying the override to the same run makes the finding go away."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
from helpers import LitModel, MemLogger, bad, fit, mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.cli import LightningCLI
from scenarios import LossRecorder, data_fault, reg

from lightning_normcheck import NormCheck
from lightning_normcheck.diagnosis.fixes import QUANTILE, quantile

TOTAL = "normcheck/grad_norm/total"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e6, allow_nan=False), min_size=1, max_size=300), st.floats(0.0, 1.0))
def test_quantile_is_torch_quantile(values: list[float], q: float) -> None:
    expected = torch.quantile(torch.tensor(values, dtype=torch.float64), q).item()
    assert quantile(values, q) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def _totals(logger: MemLogger) -> dict[int, float]:
    return {s: row[TOTAL] for s, row in logger.rows if TOTAL in row}


def _suggested(message: str, totals: dict[int, float]) -> tuple[float, float]:
    """The value a message suggests, and the 90% quantile of the logged totals over the steps it names."""
    m = re.search(
        r"(?:clip gradients at|raise the clip value to) ([0-9.e+-]+) \(the 90% quantile of the pre-clip"
        r" total gradient norm over the (\d+) steps (\d+)-(\d+)",
        message,
    )
    assert m, message
    value, count, first, last = float(m[1]), int(m[2]), int(m[3]), int(m[4])
    window = [v for s, v in sorted(totals.items()) if first <= s <= last]
    assert len(window) == count
    return value, float(f"{torch.quantile(torch.tensor(window, dtype=torch.float64), QUANTILE).item():.2g}")


class HLit(LitModel):
    """LitModel whose learning rate is a saved hyperparameter (what LightningCLI users write)."""

    def __init__(self, width: int = 32, lr: float = 0.01, clip_probe: bool = False) -> None:
        super().__init__(mlp(width=width), lr=lr)
        self.save_hyperparameters()


def _run(model: Any, data: Any, max_steps: int, **kwargs: Any) -> tuple[NormCheck, MemLogger, list[float]]:
    cb, mem, losses = NormCheck(print_summary=False), MemLogger(), LossRecorder()
    fit(model, data, [cb, losses], max_steps=max_steps, logger=mem, **kwargs)
    return cb, mem, losses.losses


def test_clip_value_far_too_low_gets_the_90th_percentile_and_applying_it_clears_the_finding() -> None:
    cb, mem, _ = _run(HLit(lr=0.05), reg(), 60, gradient_clip_val=1e-3)
    f = next(f for f in cb.findings if f.code == "high_clip_rate" and f.severity != "info")
    value, expected = _suggested(f.message, _totals(mem))
    assert value == expected and f.overrides == [f"--trainer.gradient_clip_val={value:g}"]
    assert f"`--trainer.gradient_clip_val={value:g}`" in f.message and f"`{f.overrides[0]}`" in cb.summary()
    assert all(v > 1e-3 for v in _totals(mem).values())  # the run it came from clipped every step
    # the user applies the override: same run, the suggested clip value; no warning or error is left and the
    # run learns (the model now trains, so its norms are not those of the window the value came from: measured,
    # it still clips ~3/4 of the steps here, which the rule judges harmless for a run whose loss falls)
    cb2, mem2, losses = _run(HLit(lr=0.05), reg(), 60, gradient_clip_val=value)
    assert not bad(cb2.findings), [str(f) for f in bad(cb2.findings)]
    assert sum(v > value for v in _totals(mem2).values()) < len(_totals(mem2))
    assert sum(losses[-5:]) < 0.1 * sum(losses[:5])


def test_spikes_without_clipping_suggest_a_clip_value_from_the_recent_norms() -> None:
    cb, mem, _ = _run(HLit(), data_fault("corrupted"), 20)
    f = next(f for f in cb.findings if f.code == "gradient_spikes")
    value, expected = _suggested(f.message, _totals(mem))
    assert value == expected and f.overrides == [f"--trainer.gradient_clip_val={value:g}"]
    # the spike itself is far above the suggestion: it would have been clipped
    assert max(_totals(mem).values()) > 5 * value


def test_a_problem_from_the_first_step_falls_back_to_the_common_default() -> None:
    net = mlp(width=32, depth=3)
    cb, _, _ = _run(LitModel(net, lr=0.35), reg(), 30)
    f = next(f for f in cb.findings if f.code == "exploding_gradients")
    # the growth starts at step 0: no healthy steps before it to take a quantile from
    assert f.since == 0 and "clip gradients at 1 (a common default: fewer than 8 steps before" in f.message
    assert f.overrides == ["--trainer.gradient_clip_val=1"]


def test_learning_rate_too_high_names_the_model_override_and_lightning_cli_accepts_it() -> None:
    cb, _, _ = _run(HLit(lr=3.0), reg(), 24)
    f = next((f for f in cb.findings if f.code == "learning_rate_too_high"), None)
    assert f is not None, [str(f) for f in cb.findings]
    lr = [o for o in f.overrides if o.startswith("--model.lr=")]
    assert lr and f"`{lr[0]}`" in f.message
    value = float(lr[0].split("=", 1)[1])
    assert 0 < value < 3.0 and math.isclose(value, float(f"{f.extra['lr']:.1g}"))
    cli = LightningCLI(HLit, run=False, args=[lr[0], "--trainer.logger=false"], save_config_kwargs={"overwrite": True})
    assert cli.model.hparams.lr == value and cli.model.lr == value


def test_overrides_survive_a_checkpoint_and_reach_the_findings_file(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    cb = NormCheck(print_summary=False)
    fit(HLit(lr=0.05), reg(), [cb], max_steps=40, gradient_clip_val=1e-3, logger=CSVLogger(tmp_path))
    import json

    path = next(tmp_path.rglob("findings.json"))
    data = json.loads(path.read_text())
    rows = data["findings"] if isinstance(data, dict) else data
    clip = next(r for r in rows if r["code"] == "high_clip_rate")
    assert clip["overrides"] and clip["overrides"][0].startswith("--trainer.gradient_clip_val=")
    state = cb.state_dict()
    cb2 = NormCheck(print_summary=False)
    cb2.load_state_dict(state)
    assert cb2.findings[0].overrides == cb.findings[0].overrides
