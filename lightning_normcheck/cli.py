"""``normcheck-demo``: LightningCLI over the demo model, with NormCheck enabled from YAML.

Example (shell)::

    normcheck-demo fit --config configs/demo.yaml
    normcheck-demo fit --config configs/demo.yaml --print_config
    tensorboard --logdir normcheck_runs
"""

from __future__ import annotations

from collections.abc import Sequence

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


def run(args: Sequence[str] | None = None) -> LightningCLI:
    """Run the demo CLI (``args`` as on the command line; default ``sys.argv[1:]``) and return it."""
    cli = LightningCLI(
        DemoModel,
        DemoDataModule,
        args=list(args) if args is not None else None,
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
