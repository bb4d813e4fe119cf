"""The one typed path monitor -> record -> rule -> finding -> emission, kept honest.

- ``diagnosis/`` imports neither torch nor Lightning, registers no hooks, reads no module and parses no
  metric name; ``norms.py`` imports no Lightning.
- Every finding code is registered once; the log refuses others and is the only thing that changes findings.
- Thresholds are per instance, from Python and from LightningCLI YAML, and change verdicts on real runs.
- The checkpoint key ignores cosmetic arguments; a resume that cannot find its state says so.
"""

from __future__ import annotations

import ast
import dataclasses
import warnings
from pathlib import Path

import pytest
import torch
from helpers import LitModel, fit, loader, mlp, regression_data, trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_normcheck
from lightning_normcheck import NormCheck
from lightning_normcheck.cli import run
from lightning_normcheck.diagnosis import CODES, REGISTRY, FindingLog, compose
from lightning_normcheck.diagnosis.thresholds import ActivationThresholds, DataThresholds, Thresholds

PACKAGE = Path(lightning_normcheck.__file__).resolve().parent
CONFIGS = PACKAGE.parent / "configs"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "diagnosis").glob("*.py")), ids=lambda p: p.name)
def test_diagnosis_is_pure(path: Path) -> None:
    """Typed records in, findings out: no torch, no Lightning, no hooks, no modules, no metric-name parsing."""
    imported = _imports(path)
    outside = {m for m in imported if m == "torch" or m.startswith("torch.") or m.split(".")[0] == "lightning"}
    assert not outside, outside
    text = path.read_text()
    for banned in ("register_forward", "register_hook", "nn.Module", "normcheck/", 'startswith("_'):
        assert banned not in text, f"{path.name} contains {banned!r}"


def test_norms_and_callbacks_layering() -> None:
    assert not any("lightning" in m for m in _imports(PACKAGE / "norms.py"))
    # the metric names are made in one place
    makers = [p.name for p in (PACKAGE / "callbacks").glob("*.py") if '"normcheck/' in p.read_text()]
    assert makers == ["_emission.py"], makers


def test_every_code_is_registered_once_with_causes_and_fixes() -> None:
    assert CODES == tuple(REGISTRY) and len(set(CODES)) == len(CODES)
    assert set(lightning_normcheck.CODES) == set(CODES)
    for spec in REGISTRY.values():
        assert spec.severity in ("info", "warning", "error") and spec.title and spec.causes and spec.fixes
        msg = compose(spec.code, "seen 3.2 at step 4", where="in `fc1`")
        assert msg.startswith("seen 3.2 at step 4. in `fc1`. Likely causes, most likely first: " + spec.causes[0])
        assert "What to try: " + spec.fixes[0] in msg


@pytest.mark.unregistered_code
def test_the_log_refuses_unregistered_codes_and_escalates_only() -> None:
    log = FindingLog()
    with pytest.raises(ValueError, match="unknown finding code 'made_up'"):
        log.report("made_up", "warning", 0, None, "x")
    assert log.report("dead_units", None, 3, "fc", "m", since=1).severity == "warning"  # the registry's default
    assert log.report("dead_units", "info", 5, "fc", "milder") is None  # a repeat never lowers it
    f = log.get("dead_units", "fc")
    assert (f.severity, f.step, f.since, f.last_step, f.count, f.message) == ("warning", 3, 1, 5, 2, "m")
    assert log.downgrade("dead_units", "fc", "info", "fell back") is f and f.severity == "info"
    assert log.annotate("dead_units", "fc", "exc", "Then it raised.") and not log.annotate(
        "dead_units", "fc", "exc", "x"
    )
    assert f.message == "fell back Then it raised."


# ----------------------------------------------------------------------------------------------------
# thresholds per instance: standardized inputs (max |x| about 3-4) are silent by default; a threshold of 1.0
# calls them large. Checked on real runs that learn.


def _fit_input_run(cb: NormCheck) -> list[float]:
    losses: list[float] = []

    class Model(LitModel):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            loss = super().training_step(batch, batch_idx)
            losses.append(float(loss.detach()))
            return loss

    torch.manual_seed(0)
    fit(Model(mlp(8, 32, 2, 1), lr=0.05), loader(regression_data(512), 32), [cb], max_steps=30)
    return losses


def test_thresholds_from_python_change_the_verdict() -> None:
    default = NormCheck(print_summary=False)
    losses = _fit_input_run(default)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])  # it learns
    assert [f for f in default.findings if f.severity != "info"] == []
    strict = NormCheck(print_summary=False, thresholds=Thresholds(data=DataThresholds(input_scale=1.0)))
    _fit_input_run(strict)
    f = next(f for f in strict.findings if f.code == "input_scale")
    assert f.severity == "warning" and "max |x|" in f.message


def test_thresholds_are_validated_and_per_instance() -> None:
    with pytest.raises(ValueError, match=r"ActivationThresholds: `dead_fraction` must be in \(0, 1\], got 1.5"):
        ActivationThresholds(dead_fraction=1.5)
    with pytest.raises(TypeError, match="NormCheck: `thresholds` must be a Thresholds or None, got"):
        NormCheck(thresholds={"data": {}})  # type: ignore[arg-type]
    a = NormCheck(thresholds=Thresholds(data=DataThresholds(input_scale=1.0)))
    b = NormCheck()
    assert a.thresholds.data.input_scale == 1.0 and b.thresholds.data.input_scale == 1e3
    assert a.state_key != b.state_key
    # the argument shortcuts set their threshold
    assert NormCheck(high_clip_rate=0.8).thresholds.clipping.high_rate == 0.8
    assert NormCheck(spike_factor=20.0).thresholds.gradients.spike_factor == 20.0


def test_thresholds_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "strict.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_normcheck.NormCheck\n"
        "      init_args:\n"
        "        print_summary: false\n"
        "        thresholds:\n"
        "          data: {input_scale: 1.0}\n"
        "          activations: {dead_fraction: 0.7}\n"
    )
    cli = run(
        [
            "fit",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--config",
            str(config),
            "--trainer.max_steps=6",
            "--data.num_samples=128",
            "--trainer.limit_val_batches=0",
            "--trainer.logger=false",
        ]
    )
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, NormCheck))
    assert cb.thresholds.data.input_scale == 1.0 and cb.thresholds.activations.dead_fraction == 0.7
    assert cb.thresholds.gradients == Thresholds().gradients  # the rest keep their defaults
    assert any(f.code == "input_scale" and f.severity == "warning" for f in cb.findings)


# ----------------------------------------------------------------------------------------------------
# checkpoint keys


def test_state_key_ignores_cosmetic_arguments() -> None:
    assert NormCheck(print_summary=False).state_key == NormCheck().state_key == "NormCheck{}"
    assert NormCheck(activations=False).state_key != NormCheck().state_key
    same = Thresholds(data=dataclasses.replace(DataThresholds()))
    assert NormCheck(thresholds=same).state_key == NormCheck().state_key  # the default thresholds, spelled out


def _resume(tmp_path: Path, first: NormCheck, second: NormCheck) -> list[str]:
    data = loader(regression_data(256), batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(LitModel(mlp(depth=2)), data, [first, ckpt], max_steps=6, enable_checkpointing=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        t = trainer([second], max_steps=8, enable_checkpointing=False)
        t.fit(LitModel(mlp(depth=2)), data, ckpt_path=str(tmp_path / "last.ckpt"))
    return [str(w.message) for w in rec if "lightning_normcheck" in str(w.message)]


def test_resume_with_a_cosmetic_change_keeps_its_state(tmp_path: Path) -> None:
    first_thresholds = Thresholds(data=DataThresholds(input_scale=1.0))
    first = NormCheck(print_summary=True, thresholds=first_thresholds)
    second = NormCheck(print_summary=False, thresholds=first_thresholds)
    said = _resume(tmp_path, first, second)
    assert said == []
    assert [(f.code, f.step) for f in second.findings] == [(f.code, f.step) for f in first.findings] != []


def test_resume_that_cannot_find_its_state_says_so(tmp_path: Path) -> None:
    # another configuration: its state is found under the old key and restored, with a warning saying so
    first = NormCheck(print_summary=False, thresholds=Thresholds(data=DataThresholds(input_scale=1.0)))
    second = NormCheck(print_summary=False, activations=False)
    said = _resume(tmp_path, first, second)
    assert len(said) == 1 and "restoring the state saved under" in said[0]
    assert {f.code for f in second.findings} >= {f.code for f in first.findings}


def test_resume_from_a_checkpoint_without_normcheck_state_says_so(tmp_path: Path) -> None:
    data = loader(regression_data(256), batch_size=16)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(LitModel(mlp(depth=2)), data, [ckpt], max_steps=4, enable_checkpointing=True)
    cb = NormCheck(print_summary=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        trainer([cb], max_steps=6, enable_checkpointing=False).fit(
            LitModel(mlp(depth=2)), data, ckpt_path=str(tmp_path / "last.ckpt")
        )
    said = [str(w.message) for w in rec if "lightning_normcheck" in str(w.message)]
    assert len(said) == 1 and "starts with empty histories and findings" in said[0]
