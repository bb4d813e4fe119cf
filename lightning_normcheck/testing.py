"""Lint a training loop in a unit test: a short CPU fit of a copy of the model with every step sampled.

``check_training`` trains a deep copy of the LightningModule (the model you pass is left untouched) for a
few steps on the CPU with :class:`~lightning_normcheck.NormCheck` sampling every step, no logger, no
checkpoint and nothing written to the working directory (Lightning's root dir is a temporary directory
removed afterwards), and returns the findings. ``assert_healthy`` raises ``AssertionError`` with the
findings table when any warning or error is found. The pytest plugin (installed with the package) offers
both as the ``normcheck`` fixture.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader, TensorDataset
    >>> from lightning_normcheck.demo import DemoModel
    >>> data = DataLoader(TensorDataset(torch.randn(64, 16), torch.randn(64, 1)), batch_size=16)
    >>> findings = assert_healthy(DemoModel(depth=2, width=16), data, steps=8)
    >>> [f.code for f in findings if f.severity != "info"]
    []
"""

from __future__ import annotations

import copy
import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L

from lightning_normcheck.callbacks.norm_check import NormCheck
from lightning_normcheck.diagnosis.findings import Finding, FindingLog

_QUIET = ("lightning.pytorch", "lightning.fabric", "lightning_normcheck")


@contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's set-up chatter and the live finding lines off while the check runs."""
    levels = {name: logging.getLogger(name).level for name in _QUIET}
    try:
        for name in _QUIET:
            logging.getLogger(name).setLevel(logging.ERROR + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def check_training(
    model: L.LightningModule,
    data: Any = None,
    steps: int = 20,
    normcheck: NormCheck | None = None,
    **trainer_kwargs: Any,
) -> list[Finding]:
    """Train a copy of ``model`` for ``steps`` optimizer steps on the CPU and return NormCheck's findings.

    Args:
        model: the LightningModule to check; it is deep-copied, so its weights and state stay as they are.
        data: a ``DataLoader``, a ``LightningDataModule``, or ``None`` for the module's own
            ``train_dataloader``.
        steps: optimizer steps to train (20 covers the dense early sampling).
        normcheck: a configured NormCheck (default ``NormCheck(log_every_n_steps=1, print_summary=False)``).
        **trainer_kwargs: more ``Trainer`` arguments (e.g. ``gradient_clip_val``, ``accumulate_grad_batches``).

    Returns:
        The findings, one per (code, layer).
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"check_training: `steps` must be an int >= 1, got {steps!r}")
    cb = normcheck if normcheck is not None else NormCheck(log_every_n_steps=1, print_summary=False)
    copied = copy.deepcopy(model)
    with tempfile.TemporaryDirectory(prefix="normcheck-") as root, _quiet():
        options: dict[str, Any] = dict(
            max_steps=steps,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            default_root_dir=root,
            log_every_n_steps=1,
        )
        options.update(trainer_kwargs)
        options["callbacks"] = [cb, *list(options.get("callbacks") or [])]
        trainer = L.Trainer(**options)
        if isinstance(data, L.LightningDataModule):
            trainer.fit(copied, datamodule=data)
        else:
            trainer.fit(copied, train_dataloaders=data)
    return cb.findings


def findings_table(findings: list[Finding]) -> str:
    """The findings as the end-of-fit table, then each message in full."""
    log = FindingLog()
    log.load_state_dict({"findings": [vars(f) for f in findings]})
    details = "\n".join(f"- {f.severity} {f.code} [{f.layer or '-'}] @ step {f.step}: {f.message}" for f in findings)
    return f"{log.table()}\n{details}"


def assert_healthy(model: L.LightningModule, data: Any = None, steps: int = 20, **kwargs: Any) -> list[Finding]:
    """Like :func:`check_training`; raises ``AssertionError`` (the findings table as its message) when any
    finding is a warning or an error. Returns the findings (info ones may be there)."""
    findings = check_training(model, data, steps=steps, **kwargs)
    bad = [f for f in findings if f.severity != "info"]
    if bad:
        raise AssertionError("NormCheck found problems in the training loop:\n" + findings_table(bad))
    return findings


__all__ = ["assert_healthy", "check_training", "findings_table"]
