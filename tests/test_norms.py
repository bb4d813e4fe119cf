"""The shared norm module against torch.linalg.vector_norm and torch.nn.utils.get_total_norm."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import get_total_norm

from lightning_normcheck import norms as N

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _tensors(device: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (7,), (2, 3, 5), (1,), (16, 16)]
    return [(torch.randn(s, generator=g) * (i + 1)).to(device=device, dtype=dtype) for i, s in enumerate(shapes)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
def test_tensor_norms_match_vector_norm(device: str, norm_type: float) -> None:
    ts = _tensors(device)
    got = N.tensor_norms(ts, norm_type)
    want = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in ts])
    assert got.dtype == torch.float32 and got.device.type == device
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_total_norm_matches_get_total_norm(device: str, norm_type: float) -> None:
    ts = _tensors(device)
    got = N.total_norm(N.tensor_norms(ts, norm_type), norm_type)
    want = get_total_norm(ts, norm_type)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # and against one concatenated vector, computed in float64 by hand
    flat = torch.cat([t.flatten().double() for t in ts])
    assert got.item() == pytest.approx(torch.linalg.vector_norm(flat, norm_type).item(), rel=1e-5)


def test_empty_input() -> None:
    assert N.tensor_norms([]).shape == (0,)
    assert N.total_norm(N.tensor_norms([])).item() == 0.0
    assert get_total_norm([]).item() == 0.0
    assert N.group_norms(N.tensor_norms([]), torch.zeros(0, dtype=torch.long), 3).tolist() == [0.0, 0.0, 0.0]


def test_mixed_dtypes_keep_order_and_match() -> None:
    ts = _tensors("cpu")
    mixed = [ts[0].double(), ts[1].half(), ts[2].bfloat16(), ts[3], ts[4].double()]
    got = N.tensor_norms(mixed)
    want = torch.stack([torch.linalg.vector_norm(t.double()) for t in mixed]).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_reduced_in_float32(dtype: torch.dtype) -> None:
    # 300 entries of 100 in fp16: the squared sum (3e6) overflows fp16's max (65504) if reduced natively
    t = torch.full((300,), 100.0, dtype=dtype)
    got = N.tensor_norms([t])[0]
    assert math.isfinite(got.item())
    assert got.item() == pytest.approx(100.0 * math.sqrt(300), rel=1e-3)


def test_nonfinite_values_propagate() -> None:
    a = torch.tensor([1.0, float("inf")])
    b = torch.tensor([float("nan"), 2.0])
    c = torch.tensor([3.0, 4.0])
    norms = N.tensor_norms([a, b, c])
    assert N.nonfinite(norms).tolist() == [True, True, False]
    assert norms[2].item() == 5.0
    assert not math.isfinite(N.total_norm(norms).item())


def test_group_norms_per_layer_by_hand() -> None:
    ts = [torch.tensor([3.0, 4.0]), torch.tensor([1.0]), torch.tensor([12.0]), torch.tensor([2.0, 2.0])]
    idx = torch.tensor([0, 1, 0, 1])
    got = N.group_norms(N.tensor_norms(ts), idx, 3)
    assert got.tolist() == pytest.approx([13.0, 3.0, 0.0])
    got_inf = N.group_norms(N.tensor_norms(ts, math.inf), idx, 2, math.inf)
    assert got_inf.tolist() == [12.0, 2.0]


def test_rms_sum_of_squares_and_sub_norms() -> None:
    x = torch.randn(10, 20)
    assert N.sum_of_squares(x).item() == pytest.approx((x.double() ** 2).sum().item(), rel=1e-5)
    assert N.rms(torch.tensor([10.0]), [100]).item() == pytest.approx(1.0)
    a, b = [torch.ones(3), torch.zeros(2)], [torch.zeros(3), torch.ones(2)]
    assert N.sub_norms(a, b).tolist() == pytest.approx([math.sqrt(3), math.sqrt(2)])
    with pytest.raises(ValueError, match="same length"):
        N.sub_norms(a, b[:1])


def test_sparse_and_complex_tensors() -> None:
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([3.0, 4.0]), (5,))
    cplx = torch.tensor([3 + 4j, 0 + 0j], dtype=torch.complex64)
    got = N.tensor_norms([sparse, cplx])
    assert got.tolist() == pytest.approx([5.0, 5.0])


def test_clone_tensors_are_detached_copies() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    (c,) = N.clone_tensors([p])
    assert not c.requires_grad and torch.equal(c, p.detach())
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(c, p.detach())


def test_copy_tensors_reuses_a_matching_buffer_and_sub_norms_in_place() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    first = N.copy_tensors(params)  # no buffer: new copies
    assert all(torch.equal(c, p.detach()) and not c.requires_grad for c, p in zip(first, params))
    with torch.no_grad():
        for p in params:
            p.mul_(2.0)
    again = N.copy_tensors(params, into=first)
    assert again is first and all(torch.equal(c, p.detach()) for c, p in zip(again, params))
    other = N.copy_tensors(params, into=[torch.zeros(4, 3), torch.zeros(6)])  # a shape differs: not reused
    assert other[1].shape == (5,) and torch.equal(other[1], params[1].detach())
    before = [p.detach() / 2.0 for p in params]
    expected = [torch.linalg.vector_norm(b - p.detach()).item() for b, p in zip(before, params)]
    scratch = [b.clone() for b in before]
    assert N.sub_norms(scratch, params, inplace=True).tolist() == pytest.approx(expected, rel=1e-6)
    assert torch.equal(scratch[0], before[0] - params[0].detach())  # the differences went into the scratch
    assert N.sub_norms(before, params).tolist() == pytest.approx(expected, rel=1e-6)


def test_norms_module_imports_no_lightning() -> None:
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(N))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("lightning" in m for m in imported), imported


@pytest.mark.parametrize("shape", [(5, 7), (3, 4, 6), (2, 3, 4, 5), (2, 3, 4, 5, 2), (0, 6)])
def test_alive_units_is_any_nonzero_per_unit(shape: tuple[int, ...]) -> None:
    """A unit (channel of a 4-D+ output, else the last dim) fired iff any of its values is nonzero, NaN and
    negative values included (LeakyReLU); compared with a plain mask computation."""
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        x = torch.randn(*shape, generator=g)
        x = torch.where(torch.rand(shape, generator=g) < 0.7, torch.zeros(()), x)
        if x.numel() and trial % 5 == 0:
            x.view(-1)[0] = math.nan
        if x.numel() and trial % 7 == 0:
            x.view(-1)[-1] = -math.inf
        unit = 1 if x.dim() >= 4 else x.dim() - 1
        want = (x != 0).movedim(unit, -1).reshape(-1, x.shape[unit]).any(0)
        got = N.alive_units(x)
        assert got is not None and torch.equal(got, want), (shape, trial)
