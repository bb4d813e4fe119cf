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


def test_packs_copy_subtract_and_measure_like_torch() -> None:
    """A pack (small tensors stacked by shape) holds copies: differences and norms of a pack equal those of the
    tensors one by one; a pack is reused as a buffer only when its layout fits."""
    g = torch.Generator().manual_seed(1)
    shapes = [(300, 70), (3, 4), (5,)] + [(3, 4), (7,)] * STACK_MIN + [(2, 3, 5)]
    before = [torch.randn(*s, generator=g) for s in shapes]
    after = [t + 0.01 * (i + 1) * torch.randn(t.shape, generator=g) for i, t in enumerate(before)]
    plan = NormPlan(before)
    assert plan.groups and plan.big  # both paths are exercised
    pack = plan.pack(before)
    assert plan.fits(pack) and len(pack) == len(plan.big) + len(plan.groups)
    want_diff = torch.stack([torch.linalg.vector_norm(b - a) for b, a in zip(before, after)])
    before[0].add_(100.0)  # a copy: later changes to the tensors do not reach the pack
    before[1].add_(100.0)
    got = plan.packed_norms(plan.sub_(pack, after))
    torch.testing.assert_close(got, want_diff, rtol=1e-5, atol=0.0)
    # written into an old pack of the same layout: the same objects, new values
    again = plan.pack(after, into=pack)
    assert again is pack
    torch.testing.assert_close(plan.packed_norms(again), torch.stack([torch.linalg.vector_norm(t) for t in after]))
    shared = plan.pack(after, share_big=True)
    assert all(shared[k] is after[i] for k, i in enumerate(plan.big))  # big tensors not copied when only read
    other = NormPlan([torch.zeros(4)] * (STACK_MIN + 1))
    assert not other.fits(pack) and other.pack([torch.ones(4)] * (STACK_MIN + 1), into=pack) is not pack


def test_drift_norms_with_a_plan_match_torch() -> None:
    from lightning_normcheck import norms as N

    g = torch.Generator().manual_seed(2)
    ref = [torch.randn(8, 8, generator=g) for _ in range(2 * STACK_MIN)] + [torch.randn(100, 100, generator=g)]
    now = [r + torch.randn(r.shape, generator=g) * 1e-3 for r in ref]
    plan = NormPlan(now)
    want = torch.stack([torch.linalg.vector_norm(a - b) for a, b in zip(now, ref)])
    for scratch in (None, plan.pack(now), [torch.zeros(3)]):  # none, a fitting pack, one that does not fit
        for ref_pack in (plan.pack(ref, share_big=True), None):  # packed once by the caller, or here
            got = N.drift_norms(now, ref, plan, scratch, ref_pack)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(N.drift_norms(now, ref), want, rtol=1e-4, atol=1e-7)  # without a plan
