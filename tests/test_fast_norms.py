"""The fast per-step gradient-norm path gives the same numbers as torch, in the parameters' order."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_normcheck.callbacks._base import _STACK_NUMEL, _NormPlan


def test_plan_matches_vector_norm_for_mixed_shapes_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (200, 100), (4,), (3, 4), (5,), (300, 70), (4,), (1,), (2, 3, 5)]
    ts = [torch.randn(*s, generator=g) * (10.0**i) for i, s in enumerate(shapes)]
    assert any(t.numel() > _STACK_NUMEL for t in ts) and any(t.numel() <= _STACK_NUMEL for t in ts)
    got = _NormPlan(ts).norms(ts)
    want = torch.stack([torch.linalg.vector_norm(t) for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    total = torch.linalg.vector_norm(got)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(ts), rtol=1e-5, atol=0.0)


def test_plan_on_many_small_layers_matches_get_total_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(100)])
    net(torch.randn(8, 16)).pow(2).mean().backward()
    params = list(net.parameters())
    got = _NormPlan(params).norms([p.grad for p in params])  # type: ignore[misc]
    want = torch.stack([p.grad.norm() for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_plan_falls_back_for_sparse_gradients_and_other_lengths() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    torch.testing.assert_close(_NormPlan([emb.weight]).norms([grad]), dense.norm().reshape(1))
    a, b = torch.ones(3), torch.full((2,), 2.0)
    torch.testing.assert_close(_NormPlan([a, b]).norms([a]), torch.tensor([3.0**0.5]))  # a subset: general path


def test_tensorboard_rows_read_back_like_log_metrics(tmp_path: Any) -> None:
    """One event per step (the fast path) gives TensorBoard the same tags, steps and values as one per scalar."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_normcheck.callbacks._base import _log_metrics

    rows = {3: {"normcheck/a": 1.5, "normcheck/b/x.y": -2.25}, 7: {"normcheck/a": 0.125, "normcheck/c": 1e-8}}
    read = []
    for name, write in (("own", lambda lg, r, s: lg.log_metrics(r, step=s)), ("fast", _log_metrics)):
        logger = TensorBoardLogger(str(tmp_path), name=name)
        for step, row in rows.items():
            write(logger, row, step)
        logger.experiment.flush()
        acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
        acc.Reload()
        read.append({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]})
    assert read[0] == read[1]
    assert read[1]["normcheck/a"] == [(3, 1.5), (7, 0.125)]
