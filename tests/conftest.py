import logging
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
logging.getLogger("lightning.fabric").setLevel(logging.WARNING)

import torch  # noqa: E402

# Tiny models on 2 shared cores: one intra-op thread is much faster than torch's default under load.
torch.set_num_threads(1)

import pytest  # noqa: E402

from lightning_normcheck.findings import CODES, FindingLog  # noqa: E402


@pytest.fixture(autouse=True)
def _only_contract_codes(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """Every finding any test produces has one of the codes of the public contract (``CODES``). Checked after the
    test: the log's own refusal inside a rule would be absorbed by the package's fault isolation."""
    if request.node.get_closest_marker("unregistered_code"):  # a test of that refusal itself
        yield
        return
    report, unknown = FindingLog.report, []

    def checked(self, code, *args, **kwargs):  # type: ignore[no-untyped-def]
        if code not in CODES:
            unknown.append(code)
        return report(self, code, *args, **kwargs)

    monkeypatch.setattr(FindingLog, "report", checked)
    yield
    assert not unknown, f"finding codes outside the contract: {sorted(set(unknown))}"
