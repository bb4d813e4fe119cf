"""The README's two commands: CI runs its test command, and the demo command's configs exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S)
    assert block, "the README opens with a bash block"
    return [ln for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def test_readme_opens_with_two_commands() -> None:
    cmds = _commands()
    assert len(cmds) == 2
    assert all("pip install torch==2.13.0" in c for c in cmds)
    assert "pip install -e . " in cmds[0] and "normcheck-demo fit" in cmds[0]  # the demo needs the base install only
    assert 'pip install -e ".[dev]"' in cmds[1] and cmds[1].endswith("pytest -q")


def test_ci_runs_the_readme_test_command() -> None:
    test_cmd = _commands()[1].split("&&")[-1].strip()
    ci_lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_cmd in ci_lines


def test_demo_command_configs_exist() -> None:
    demo = _commands()[0]
    configs = re.findall(r"--config (\S+)", demo)
    assert configs and all((ROOT / c).is_file() for c in configs)


def test_every_finding_code_is_documented() -> None:
    from lightning_normcheck.findings import CODES

    for code in CODES:
        assert f"`{code}`" in README, code


def test_finding_codes_are_exactly_the_contract_codes() -> None:
    """The public contract lists these codes; nothing else may appear (info findings included)."""
    from lightning_normcheck.findings import CODES

    contract = """exploding_activations vanishing_activations exploding_gradients vanishing_gradients nonfinite_loss
    nonfinite_gradients dead_units saturated_activations high_clip_rate weight_norm_growth missing_zero_grad
    double_optimizer_step loss_sum_reduction accumulation_not_averaged hidden_state_not_detached gradient_spikes
    input_scale label_scale learning_rate_too_high zero_gradients""".split()
    assert sorted(CODES) == sorted(contract) and len(CODES) == 20
