"""The fast per-step gradient-norm path gives the same numbers as torch, in the parameters' order."""

from __future__ import annotations

import torch
from torch import nn

from lightning_normcheck.norms import STACK_MIN, STACK_NUMEL, NormPlan


def test_plan_matches_vector_norm_for_mixed_shapes_in_order() -> None:
    g = torch.Generator().manual_seed(0)
    # (3, 4) often enough to be stacked, interleaved with large tensors and small ones too few to stack
    shapes = [(3, 4), (200, 100), (4,), (3, 4), (5,), (300, 70), (4,), (1,), (2, 3, 5)] + [(3, 4), (7,)] * STACK_MIN
    ts = [torch.randn(*s, generator=g) * (10.0 ** (i % 9)) for i, s in enumerate(shapes)]
    assert any(t.numel() > STACK_NUMEL for t in ts) and any(t.numel() <= STACK_NUMEL for t in ts)
    plan = NormPlan(ts)
    assert [len(group) for group in plan.groups] == [STACK_MIN + 2, STACK_MIN]  # (3, 4) and (7,) stacked
    assert plan.big == [1, 2, 4, 5, 6, 7, 8] and plan.inverse is not None  # the rest through one foreach
    got = plan.norms(ts)
    want = torch.stack([torch.linalg.vector_norm(t) for t in ts])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)
    total = torch.linalg.vector_norm(got)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(ts), rtol=1e-5, atol=0.0)


def test_plan_on_many_small_layers_matches_get_total_norm() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)) for _ in range(100)])
    net(torch.randn(8, 16)).pow(2).mean().backward()
    params = list(net.parameters())
    got = NormPlan(params).norms([p.grad for p in params])  # type: ignore[misc]
    want = torch.stack([p.grad.norm() for p in params])  # type: ignore[union-attr]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0.0)


def test_plan_falls_back_for_sparse_gradients_and_other_lengths() -> None:
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    grad = emb.weight.grad
    assert grad is not None and grad.is_sparse
    dense = grad.to_dense()
    torch.testing.assert_close(NormPlan([emb.weight]).norms([grad]), dense.norm().reshape(1))
    a, b = torch.ones(3), torch.full((2,), 2.0)
    torch.testing.assert_close(NormPlan([a, b]).norms([a]), torch.tensor([3.0**0.5]))  # a subset: general path
