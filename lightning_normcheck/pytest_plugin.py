"""The pytest plugin of lightning_normcheck (registered through the ``pytest11`` entry point).

It offers the ``normcheck`` fixture: ``normcheck.check_training(model, data, steps=20, **trainer_kwargs)``
and ``normcheck.assert_healthy(model, data, ...)`` from :mod:`lightning_normcheck.testing`::

    def test_my_loop_is_healthy(normcheck):
        normcheck.assert_healthy(MyModule(), my_dataloader)
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture
def normcheck() -> SimpleNamespace:
    """``check_training`` and ``assert_healthy`` of :mod:`lightning_normcheck.testing`."""
    from lightning_normcheck import testing

    return SimpleNamespace(
        check_training=testing.check_training,
        assert_healthy=testing.assert_healthy,
        findings_table=testing.findings_table,
    )
