"""Tests of the exact projection onto {sum = 1, lo <= x <= hi} (mkfkit/_projection.py)."""

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mkfkit._projection import project_box_simplex


def bisection_projection(v, lo, hi, iterations=200):
    """Independent reference: bisection on tau for sum(clip(v + tau, lo, hi)) = 1, in float64."""
    v, lo, hi = v.double(), lo.double(), hi.double()
    left = (lo - v).min(-1, keepdim=True).values - 1
    right = (hi - v).max(-1, keepdim=True).values + 1
    for _ in range(iterations):
        middle = (left + right) / 2
        below = torch.clamp(v + middle, lo, hi).sum(-1, keepdim=True) < 1
        left, right = torch.where(below, middle, left), torch.where(below, right, middle)
    return torch.clamp(v + (left + right) / 2, lo, hi)


def random_box(generator, batch, num_classes, dtype, device="cpu"):
    """Random points with feasible boxes: sum(lo) <= 1 <= sum(hi)."""
    kwargs = dict(generator=generator, dtype=torch.float64)
    v = torch.randn(batch, num_classes, **kwargs) / num_classes**0.5
    lo = torch.rand(batch, num_classes, **kwargs) / num_classes * torch.rand(batch, 1, **kwargs)
    hi = lo + torch.rand(batch, num_classes, **kwargs) * 4 / num_classes + 1e-3
    hi = torch.minimum(hi, torch.ones_like(hi))
    # Widen the rows whose upper bounds cannot reach a sum of 1.
    hi = torch.where(hi.sum(-1, keepdim=True) < 1, torch.ones_like(hi), hi)
    return tuple(t.to(device=device, dtype=dtype) for t in (v, lo, hi))


@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 8),
    num_classes=st.integers(1, 300),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_matches_bisection_and_is_feasible(seed, batch, num_classes, dtype):
    generator = torch.Generator().manual_seed(seed)
    v, lo, hi = random_box(generator, batch, num_classes, dtype)
    x = project_box_simplex(v, lo, hi)
    assert x.dtype == dtype and x.shape == v.shape
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(x.double(), bisection_projection(v, lo, hi), atol=atol, rtol=0)
    torch.testing.assert_close(x.sum(-1).double(), torch.ones(batch, dtype=torch.float64), atol=atol * num_classes**0.5, rtol=0)
    assert bool((x >= lo).all()) and bool((x <= hi).all())


def test_matches_bisection_on_device(device):
    generator = torch.Generator().manual_seed(1)
    v, lo, hi = random_box(generator, 64, 50, torch.float64)
    x = project_box_simplex(v.to(device), lo.to(device), hi.to(device))
    assert x.device.type == device
    torch.testing.assert_close(x.cpu(), bisection_projection(v, lo, hi), atol=1e-12, rtol=0)


def test_known_values_and_simplex_identity_on_valid_rows():
    v = torch.tensor([[0.8, 0.5, -0.1], [0.2, 0.3, 0.5]], dtype=torch.float64)
    x = project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v))
    expected = torch.tensor([[0.65, 0.35, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(x, expected, atol=1e-15, rtol=0)


def test_ties_one_hot_and_constant_rows():
    # Many equal breakpoints: one-hot and constant rows, on the plain simplex.
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -1.0, -1.0]], dtype=torch.float64)
    x = project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v))
    expected = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(x, expected, atol=1e-15, rtol=0)


def test_degenerate_and_infeasible_rows_are_finite_with_finite_gradients():
    lo = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    hi = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.2, 0.3], [0.9, 0.9, 0.9]], dtype=torch.float64)
    lo.requires_grad_(True)
    hi.requires_grad_(True)
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = project_box_simplex(v, lo, hi)
    # Row 0: lo == hi with sum 1, no free coordinate. Row 1: sum(hi) < 1 -> hi. Row 2: sum(lo) > 1 -> lo.
    torch.testing.assert_close(x, torch.stack([lo[0], hi[1], lo[2]]).detach(), atol=0, rtol=0)
    (x * torch.randn_like(x)).sum().backward()
    for grad in (v.grad, lo.grad, hi.grad):
        assert bool(torch.isfinite(grad).all())
    assert bool((v.grad == 0).all())  # every coordinate sits at a bound


def test_jacobian_is_the_closed_form():
    generator = torch.Generator().manual_seed(3)
    v, lo, hi = random_box(generator, 1, 12, torch.float64)
    x = project_box_simplex(v, lo, hi)[0]
    free = (x > lo[0] + 1e-9) & (x < hi[0] - 1e-9)
    assert 0 < int(free.sum()) < 12  # the instance exercises both kinds of coordinates
    jacobian = torch.autograd.functional.jacobian(lambda t: project_box_simplex(t, lo, hi)[0], v)[:, 0]
    f = free.double()
    expected = (torch.diag(f) - torch.outer(f, f) / f.sum())
    torch.testing.assert_close(jacobian, expected, atol=1e-15, rtol=0)


def test_gradcheck_in_v_lo_hi():
    generator = torch.Generator().manual_seed(4)
    v, lo, hi = random_box(generator, 3, 9, torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (v, lo, hi))
    assert torch.autograd.gradcheck(project_box_simplex, inputs)
    assert torch.autograd.gradgradcheck(project_box_simplex, inputs)


def test_float32_agrees_with_float64():
    generator = torch.Generator().manual_seed(5)
    v, lo, hi = random_box(generator, 256, 1000, torch.float64)
    x64 = project_box_simplex(v, lo, hi)
    x32 = project_box_simplex(v.float(), lo.float(), hi.float())
    torch.testing.assert_close(x32.double(), x64, atol=1e-6, rtol=0)


def test_batch_equals_rows_one_by_one():
    generator = torch.Generator().manual_seed(6)
    v, lo, hi = random_box(generator, 16, 40, torch.float64)
    batched = project_box_simplex(v, lo, hi)
    rows = torch.cat([project_box_simplex(v[i : i + 1], lo[i : i + 1], hi[i : i + 1]) for i in range(16)])
    torch.testing.assert_close(batched, rows, atol=0, rtol=0)


def test_projection_is_invariant_to_shifting_v():
    generator = torch.Generator().manual_seed(7)
    v, lo, hi = random_box(generator, 8, 30, torch.float64)
    shift = torch.from_numpy(np.linspace(-2, 2, 8))[:, None]
    torch.testing.assert_close(project_box_simplex(v + shift, lo, hi), project_box_simplex(v, lo, hi), atol=1e-14, rtol=0)
