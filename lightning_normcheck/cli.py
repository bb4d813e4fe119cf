"""``normcheck-demo``: LightningCLI over the demo model, with NormCheck enabled from YAML.

Example (shell)::

    normcheck-demo fit --config configs/demo.yaml
    normcheck-demo fit --config demo.yaml --config demo_problems.yaml   # the configs shipped in the package
    normcheck-demo fit --config configs/demo.yaml --print_config
    tensorboard --logdir normcheck_runs

A ``--config`` value that is not a file but names one of the package's configs (``demo.yaml``,
``norm_check.yaml``, ... in ``lightning_normcheck/configs``) is read from the package, so a ``pip install``
without the repository still has the demo.

Example:
    >>> resolve_configs(["fit", "--config", "demo.yaml"])[2].endswith("lightning_normcheck/configs/demo.yaml")
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from lightning_normcheck.callbacks._base import _NormCheckBase
from lightning_normcheck.demo import DemoDataModule, DemoModel


def _report(cli: LightningCLI) -> None:
    """After fit: say where the logs are and print every NormCheck callback's findings."""
    trainer = cli.trainer
    if not trainer.is_global_zero:
        return
    for logger in trainer.loggers:
        print(f"normcheck-demo: logs written to {logger.log_dir}  (open with: tensorboard --logdir {logger.save_dir})")
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, _NormCheckBase):
            bad = [f for f in cb.findings if f.severity != "info"]
            print(
                f"normcheck-demo: {type(cb).__name__} reported {len(cb.findings)} finding(s), {len(bad)} warning/error"
            )
            for f in cb.findings:
                print(f"  {f}")


#: The configs shipped inside the package.
CONFIGS = Path(__file__).resolve().parent / "configs"


def resolve_configs(args: Sequence[str]) -> list[str]:
    """``args`` with every ``--config NAME`` (or ``--config=NAME``) that is not a file but names a shipped config
    replaced by that config's path."""
    out = list(args)
    for i, a in enumerate(out):
        if a == "--config" and i + 1 < len(out):
            out[i + 1] = _shipped(out[i + 1])
        elif a.startswith("--config="):
            out[i] = "--config=" + _shipped(a[len("--config=") :])
    return out


def _shipped(value: str) -> str:
    if Path(value).is_file():
        return value
    name = Path(value).name
    for candidate in (name, f"{name}.yaml"):
        if (CONFIGS / candidate).is_file():
            return str(CONFIGS / candidate)
    return value


def run(args: Sequence[str] | None = None) -> LightningCLI:
    """Run the demo CLI (``args`` as on the command line; default ``sys.argv[1:]``) and return it."""
    import sys

    cli = LightningCLI(
        DemoModel,
        DemoDataModule,
        args=resolve_configs(args if args is not None else sys.argv[1:]),
        save_config_kwargs={"overwrite": True},
        seed_everything_default=0,
    )
    if cli.subcommand == "fit":
        _report(cli)
    return cli


def main() -> None:
    """Console entry point of ``normcheck-demo``."""
    run()  # LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()
