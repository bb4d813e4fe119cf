"""LightningCLI: YAML from configs/ enables the callbacks, --print_config shows them, typos are refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_normcheck import NormCheck
from lightning_normcheck.cli import run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FAST = ["--trainer.max_steps=6", "--data.num_samples=128", "--trainer.limit_val_batches=0"]


def _tags(log_dir: str) -> list[str]:
    ea = EventAccumulator(log_dir)
    ea.Reload()
    return ea.Tags()["scalars"]


def test_demo_yaml_writes_tensorboard_events(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(CONFIGS / "demo.yaml"), *FAST])
    callbacks = [cb for cb in cli.trainer.callbacks if isinstance(cb, NormCheck)]
    assert len(callbacks) == 1 and callbacks[0].log_every_n_steps == 10
    tags = _tags(cli.trainer.logger.log_dir)
    assert "normcheck/grad_norm/total" in tags
    assert any(t.startswith("normcheck/act_rms/") for t in tags)
    assert any(t.startswith("normcheck/weight_norm/") for t in tags)


@pytest.mark.parametrize(
    "config, cls",
    [
        ("norm_check.yaml", "NormCheck"),
        ("gradient_norm_monitor.yaml", "GradientNormMonitor"),
        ("activation_norm_monitor.yaml", "ActivationNormMonitor"),
        ("weight_drift_monitor.yaml", "WeightDriftMonitor"),
        ("clip_rate_tracker.yaml", "ClipRateTracker"),
        ("training_bug_detector.yaml", "TrainingBugDetector"),
    ],
)
def test_each_callback_yaml_is_loaded(config: str, cls: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = run(
        [
            "fit",
            "--config",
            str(CONFIGS / "demo.yaml"),
            "--config",
            str(CONFIGS / config),
            *FAST,
            "--trainer.logger=false",
        ]
    )
    names = [type(cb).__name__ for cb in cli.trainer.callbacks]
    assert cls in names
    spec = yaml.safe_load((CONFIGS / config).read_text())["trainer"]["callbacks"][0]
    cb = next(c for c in cli.trainer.callbacks if type(c).__name__ == cls)
    for key, value in spec.get("init_args", {}).items():
        if hasattr(cb, key):
            assert getattr(cb, key) == value
    assert cli.trainer.global_step == 6 and cb.disabled_monitors == []


def test_print_config_shows_init_args(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", str(CONFIGS / "demo.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    cbs = printed["trainer"]["callbacks"]
    spec = next(c for c in cbs if c["class_path"] == "lightning_normcheck.NormCheck")
    assert spec["init_args"]["log_every_n_steps"] == 10
    for arg in ("activations", "clip_window", "exclude_types", "high_clip_rate"):
        assert arg in spec["init_args"]


def test_typo_in_init_args_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "typo.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_normcheck.NormCheck\n"
        "      init_args:\n        log_every_n_stepz: 5\n"
    )
    with pytest.raises(SystemExit) as exc:
        run(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(bad)])
    assert exc.value.code not in (0, None)
    assert "log_every_n_stepz" in capsys.readouterr().err


def test_bad_value_in_yaml_names_argument(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_normcheck.NormCheck\n"
        "      init_args:\n        clip_algorithm: clamp\n"
    )
    with pytest.raises(SystemExit):
        run(["fit", "--config", str(CONFIGS / "demo.yaml"), "--config", str(bad)])
    assert "clip_algorithm" in capsys.readouterr().err


def test_console_script_is_installed() -> None:
    import shutil

    exe = shutil.which("normcheck-demo") or os.path.join(os.path.dirname(os.sys.executable), "normcheck-demo")
    assert os.path.exists(exe)


def test_shipped_configs_are_found_by_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pip install without the repository still has the demo: ``--config demo.yaml`` reads the packaged file."""
    from lightning_normcheck.cli import CONFIGS, resolve_configs

    monkeypatch.chdir(tmp_path)  # no configs/ here
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(
        p.name for p in (CONFIGS.parent.parent / "configs").glob("*.yaml")
    )
    args = resolve_configs(["fit", "--config", "demo.yaml", "--config=demo_problems", "--config", "missing.yaml"])
    assert args[2] == str(CONFIGS / "demo.yaml") and args[3] == "--config=" + str(CONFIGS / "demo_problems.yaml")
    assert args[5] == "missing.yaml"  # not shipped: left for LightningCLI to refuse
    cli = run(["fit", "--config", "demo.yaml", *FAST, "--trainer.logger=false"])
    assert cli.trainer.global_step == 6 and any(isinstance(cb, NormCheck) for cb in cli.trainer.callbacks)
