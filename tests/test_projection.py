"""Tests of the exact projection onto {sum = 1, lo <= x <= hi} (mkfkit/_projection.py)."""

import functools
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mkfkit import _projection
from mkfkit._projection import project_box_simplex
from mkfkit.fraction import _feasible_target, _qp_side, linear_fraction, qp_fraction, side_weights

# Every way of finding the active sets must give the same projection.
SEARCHES = ["sort", "table", "newton"]
# The table holds Tensor[rows, 2C, C]: keep its instances small.
SCALABLE_SEARCHES = ["sort", "newton"]


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
    search=st.sampled_from(SEARCHES),
)
def test_matches_bisection_and_is_feasible(seed, batch, num_classes, dtype, search):
    generator = torch.Generator().manual_seed(seed)
    v, lo, hi = random_box(generator, batch, num_classes, dtype)
    x = project_box_simplex(v, lo, hi, search=search)
    assert x.dtype == dtype and x.shape == v.shape
    atol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(x.double(), bisection_projection(v, lo, hi), atol=atol, rtol=0)
    torch.testing.assert_close(x.sum(-1).double(), torch.ones(batch, dtype=torch.float64), atol=atol * num_classes**0.5, rtol=0)
    assert bool((x >= lo).all()) and bool((x <= hi).all())


@pytest.mark.parametrize("search", SEARCHES)
def test_matches_bisection_on_device(device, search):
    generator = torch.Generator().manual_seed(1)
    v, lo, hi = random_box(generator, 64, 50, torch.float64)
    x = project_box_simplex(v.to(device), lo.to(device), hi.to(device), search=search)
    assert x.device.type == device
    torch.testing.assert_close(x.cpu(), bisection_projection(v, lo, hi), atol=1e-12, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_known_values_and_simplex_identity_on_valid_rows(search):
    v = torch.tensor([[0.8, 0.5, -0.1], [0.2, 0.3, 0.5]], dtype=torch.float64)
    x = project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v), search=search)
    expected = torch.tensor([[0.65, 0.35, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(x, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_ties_one_hot_and_constant_rows(search):
    # Many equal breakpoints: one-hot and constant rows, on the plain simplex.
    v = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [3.0, 3.0, -1.0, -1.0]], dtype=torch.float64)
    x = project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v), search=search)
    expected = torch.tensor([[1.0, 0, 0, 0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0, 0]], dtype=torch.float64)
    torch.testing.assert_close(x, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_degenerate_and_infeasible_rows_are_finite_with_finite_gradients(search):
    lo = torch.tensor([[0.2, 0.3, 0.5], [0.0, 0.0, 0.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    hi = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.2, 0.3], [0.9, 0.9, 0.9]], dtype=torch.float64)
    lo.requires_grad_(True)
    hi.requires_grad_(True)
    v = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    x = project_box_simplex(v, lo, hi, search=search)
    # Row 0: lo == hi with sum 1, no free coordinate. Row 1: sum(hi) < 1 -> hi. Row 2: sum(lo) > 1 -> lo.
    torch.testing.assert_close(x, torch.stack([lo[0], hi[1], lo[2]]).detach(), atol=0, rtol=0)
    (x * torch.randn_like(x)).sum().backward()
    for grad in (v.grad, lo.grad, hi.grad):
        assert bool(torch.isfinite(grad).all())
    assert bool((v.grad == 0).all())  # every coordinate sits at a bound


@pytest.mark.parametrize("search", SEARCHES)
def test_jacobian_is_the_closed_form(search):
    generator = torch.Generator().manual_seed(3)
    v, lo, hi = random_box(generator, 1, 12, torch.float64)
    x = project_box_simplex(v, lo, hi, search=search)[0]
    free = (x > lo[0] + 1e-9) & (x < hi[0] - 1e-9)
    assert 0 < int(free.sum()) < 12  # the instance exercises both kinds of coordinates
    jacobian = torch.autograd.functional.jacobian(lambda t: project_box_simplex(t, lo, hi, search=search)[0], v)[:, 0]
    f = free.double()
    expected = (torch.diag(f) - torch.outer(f, f) / f.sum())
    torch.testing.assert_close(jacobian, expected, atol=1e-15, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_gradient_masks_rather_than_multiplies(search):
    # An infinite output gradient on a clamped coordinate must not turn the gradients of v on
    # the free ones (or of the inactive bounds) into NaN: the sets select, they do not scale.
    v = torch.tensor([[0.8, 0.5, -0.1]], dtype=torch.float64, requires_grad=True)
    lo, hi = torch.zeros_like(v, requires_grad=True), torch.ones_like(v, requires_grad=True)
    x = project_box_simplex(v, lo, hi, search=search)  # [0.65, 0.35, 0]: coordinate 2 at lo
    x.backward(torch.tensor([[1.0, 0.0, float("inf")]], dtype=torch.float64))
    assert v.grad.tolist() == [[0.5, -0.5, 0.0]]
    assert hi.grad.tolist() == [[0.0, 0.0, 0.0]] and lo.grad[0, :2].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("search", SEARCHES)
def test_gradcheck_in_v_lo_hi(search):
    generator = torch.Generator().manual_seed(4)
    v, lo, hi = random_box(generator, 3, 9, torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (v, lo, hi))
    project = functools.partial(project_box_simplex, search=search)
    assert torch.autograd.gradcheck(project, inputs)
    assert torch.autograd.gradgradcheck(project, inputs)


@pytest.mark.parametrize("search", SEARCHES)
def test_gradient_with_a_single_free_coordinate(search):
    # x = (0.4, lo, hi): one free coordinate, whose own gradient cancels (tau absorbs it) and
    # whose output gradient is subtracted from the active bounds' (the mean over F = {0}).
    v = torch.tensor([[0.5, 0.3, 0.3]], dtype=torch.float64)
    lo = torch.tensor([[0.0, 0.5, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[1.0, 1.0, 0.1]], dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_(True) for t in (v, lo, hi))
    x = project_box_simplex(*inputs, search=search)
    torch.testing.assert_close(x, torch.tensor([[0.4, 0.5, 0.1]], dtype=torch.float64), atol=1e-15, rtol=0)
    x.backward(torch.tensor([[3.0, 1.0, 2.0]], dtype=torch.float64))
    assert inputs[0].grad.tolist() == [[0.0, 0.0, 0.0]]
    assert inputs[1].grad.tolist() == [[0.0, -2.0, 0.0]] and inputs[2].grad.tolist() == [[0.0, 0.0, -1.0]]
    assert torch.autograd.gradcheck(functools.partial(project_box_simplex, search=search), inputs)


@pytest.mark.parametrize("search", SEARCHES)
def test_float32_agrees_with_float64(search):
    generator = torch.Generator().manual_seed(5)
    v, lo, hi = random_box(generator, 256, 1000 if search in SCALABLE_SEARCHES else 64, torch.float64)
    x64 = project_box_simplex(v, lo, hi, search=search)
    x32 = project_box_simplex(v.float(), lo.float(), hi.float(), search=search)
    torch.testing.assert_close(x32.double(), x64, atol=1e-6, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_batch_equals_rows_one_by_one(search):
    generator = torch.Generator().manual_seed(6)
    v, lo, hi = random_box(generator, 16, 40, torch.float64)
    batched = project_box_simplex(v, lo, hi, search=search)
    rows = torch.cat([project_box_simplex(v[i : i + 1], lo[i : i + 1], hi[i : i + 1], search=search) for i in range(16)])
    torch.testing.assert_close(batched, rows, atol=0, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_leading_dimensions_are_rows(search):
    generator = torch.Generator().manual_seed(10)
    v, lo, hi = random_box(generator, 24, 40, torch.float64)
    flat = project_box_simplex(v, lo, hi, search=search)
    stacked = project_box_simplex(*(t.view(2, 3, 4, 40) for t in (v, lo, hi)), search=search)
    torch.testing.assert_close(stacked, flat.view(2, 3, 4, 40), atol=0, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_projection_is_invariant_to_shifting_v(search):
    generator = torch.Generator().manual_seed(7)
    v, lo, hi = random_box(generator, 8, 30, torch.float64)
    shift = torch.from_numpy(np.linspace(-2, 2, 8))[:, None]
    torch.testing.assert_close(project_box_simplex(v + shift, lo, hi, search=search), project_box_simplex(v, lo, hi, search=search), atol=1e-14, rtol=0)


def fraction_like_box(generator, batch, num_classes):
    """The exact QP fraction's points and boxes (both sides, 2B rows) for peaked, one-hot and
    unrelated rows; built by the library's own box formula, since only the search is under test."""

    def rows(scale):
        logits = torch.randn(batch, num_classes, generator=generator, dtype=torch.float64)
        return torch.softmax(scale * logits, -1)

    mixed, base_a, base_b = rows(2.0), rows(4.0), rows(1.0)
    base_a[::3] = torch.nn.functional.one_hot(torch.arange(0, batch, 3) % num_classes, num_classes).double()
    lam = torch.rand(batch, generator=generator, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    target, bases, weights = _feasible_target(mixed), torch.stack((base_a, base_b)), side_weights(lam).unsqueeze(-1)
    sides = [_qp_side(target, bases, weights, torch.full((len(lam), 1), side_a, device=lam.device)) for side_a in (True, False)]
    return torch.cat([side[0] for side in sides]), *torch.cat([side[1] for side in sides], 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("num_classes", [1, 2, 10, 1000])
def test_searches_agree(dtype, num_classes):
    generator = torch.Generator().manual_seed(8)
    atol = 1e-13 if dtype == torch.float64 else 1e-6
    searches = SEARCHES if num_classes <= 100 else SCALABLE_SEARCHES
    generic = random_box(generator, 64, num_classes, torch.float64)
    for v, lo, hi in (generic, fraction_like_box(generator, 64, num_classes)):
        v, lo, hi = (t.to(dtype) for t in (v, lo, hi))
        by_sort, *others = (project_box_simplex(v, lo, hi, search=search) for search in searches)
        for other in others or [bisection_projection(v, lo, hi).to(dtype)]:  # wide rows: sort alone
            torch.testing.assert_close(other, by_sort, atol=atol, rtol=0)
    # Gradients agree away from kinks. Fraction boxes with C = 2 and every box with C = 1 put
    # rows on a kink (two coordinates at bounds whose sum is exactly 1), where the searches may
    # pick different, equally valid one-sided derivatives; the generic boxes have none.
    if num_classes > 1:
        v, lo, hi = (t.to(dtype).requires_grad_(True) for t in generic)
        weights = torch.randn(v.shape, generator=generator, dtype=torch.float64).to(dtype)
        by_sort, *others = (
            torch.autograd.grad((project_box_simplex(v, lo, hi, search=search) * weights).sum(), (v, lo, hi))
            for search in searches
        )
        for other in others:
            for grad_other, grad_sort in zip(other, by_sort):
                torch.testing.assert_close(grad_other, grad_sort, atol=atol, rtol=0)


@pytest.mark.parametrize("search", SEARCHES)
def test_non_finite_row_terminates_and_leaves_other_rows_alone(search):
    # Callers validate their inputs; with checks off, a NaN row must still not hang the search.
    v = torch.tensor([[0.2, float("nan"), 0.3], [0.5, 0.5, 0.0]])
    x = project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v), search=search)
    torch.testing.assert_close(x[1], v[1])


def newton_passes_needed(v, lo, hi, atol):
    """The fewest passes of the "newton" search after which every row matches the sort (None
    when even ``_NEWTON_PASSES`` do not)."""
    by_sort = project_box_simplex(v, lo, hi, search="sort")
    for passes in range(1, _projection._NEWTON_PASSES + 1):
        with mock.patch.object(_projection, "_NEWTON_PASSES", passes):
            by_newton = project_box_simplex(v, lo, hi, search="newton")
        if torch.allclose(by_newton, by_sort, atol=atol, rtol=0):
            return passes
    return None


def test_newton_pass_count_keeps_a_margin_over_the_hardest_rows():
    # The pass count is empirical (a Newton step may cross one breakpoint at a time): it must
    # exceed, by two, what the hardest of 20,000 random rows needs (10 passes for this sample).
    # Fewer passes fail here first; a change to the iteration that makes it converge more
    # slowly too.
    generator = torch.Generator().manual_seed(2)
    needed = newton_passes_needed(*random_box(generator, 20000, 30, torch.float64), atol=1e-12)
    assert needed is not None and needed >= 8  # the sample holds rows that need many passes
    assert _projection._NEWTON_PASSES >= needed + 2


def fraction_rows(draw, batch, num_classes, kind):
    """Probability rows of one kind, float64 numpy, for the edge-row test."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "one_hot":
        return np.eye(num_classes)[rng.integers(num_classes, size=batch)]
    if kind == "uniform":
        return np.full((batch, num_classes), 1 / num_classes)
    if kind == "ties":  # a few repeated values: many equal breakpoints
        rows = rng.integers(0, 3, size=(batch, num_classes)).astype(float) + (np.arange(num_classes) == 0)
        return rows / rows.sum(-1, keepdims=True)
    return rng.dirichlet(np.full(num_classes, 0.05), size=batch)  # peaked


@st.composite
def edge_instances(draw):
    batch, num_classes = draw(st.integers(1, 40)), draw(st.integers(1, 400))
    kinds = st.sampled_from(["one_hot", "uniform", "ties", "peaked"])
    mixed, base_a, base_b = (fraction_rows(draw, batch, num_classes, draw(kinds)) for _ in range(3))
    weights = st.sampled_from([0.0, 1e-300, 1e-30, 1e-12, 1e-6, 0.5, 1 - 1e-6, 1 - 1e-12, 1.0]) | st.floats(0, 1)
    lam = np.array([draw(weights) for _ in range(batch)])
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return tuple(torch.from_numpy(t).to(dtype) for t in (mixed, base_a, base_b, lam))


@settings(max_examples=60, deadline=None)
@given(instance=edge_instances())
def test_newton_matches_the_sort_on_fraction_edge_rows(instance):
    # Both fractions end to end, every search forced in turn: one-hot, uniform and tied rows,
    # weights at and near 0 and 1 (the boxes collapse to points or open to [0, 1]), every dtype.
    mixed, base_a, base_b, lam = instance
    # float64 is the tight check. Both searches end on g - 1, a sum of C terms of order 1,
    # divided by the size of the free set (a single coordinate in peaked rows): in float32
    # they may differ by C roundings. bfloat16 is computed in float32 and rounded back, one
    # bfloat16 step at 1 apart at most.
    rounding = mixed.shape[1] * torch.finfo(torch.float32).eps
    atol = {torch.float64: 1e-12, torch.float32: max(2e-6, rounding), torch.bfloat16: 2**-8}[mixed.dtype]
    for fraction in (qp_fraction, linear_fraction):
        by_search = {}
        for search in ("sort", "newton"):
            with mock.patch.object(_projection, "_pick_search", lambda v, _, search=search: search):
                by_search[search] = fraction(mixed, base_a, base_b, lam)
        for side in ("a", "b"):
            newton, sort = (getattr(by_search[search], side).double() for search in ("newton", "sort"))
            torch.testing.assert_close(newton, sort, atol=atol, rtol=0)


def test_auto_search_rule():
    pick = functools.partial(_projection._pick_search, search="auto")
    # The table while it holds at most _TABLE_MAX_ENTRIES entries (2 * rows * C * C), on any device.
    assert pick(torch.zeros(2048, 16)) == "table" and pick(torch.zeros(2048, 16, device="meta")) == "table"
    assert pick(torch.zeros(2, 512)) == "table" and pick(torch.zeros(2, 513)) == "sort"
    # Beyond it, on a CPU, the Newton passes from _NEWTON_MIN_ELEMENTS elements on.
    assert pick(torch.zeros(8, 512)) == "newton" and pick(torch.zeros(7, 585)) == "sort"
    assert pick(torch.zeros(256, 64)) == "newton" and pick(torch.zeros(8, 1000)) == "newton"
    # Elsewhere the sort.
    assert pick(torch.zeros(256, 64, device="meta")) == "sort" and pick(torch.zeros(8, 1000, device="meta")) == "sort"
    assert all(_projection._pick_search(torch.zeros(2, 2), search) == search for search in SEARCHES)


def test_default_search_is_auto():
    v = torch.tensor([[0.8, 0.5, -0.1]])
    zeros, ones = torch.zeros_like(v), torch.ones_like(v)
    assert torch.equal(project_box_simplex(v, zeros, ones), project_box_simplex(v, zeros, ones, search="auto"))


def test_unknown_search_is_rejected():
    v = torch.full((1, 2), 0.5)
    with pytest.raises(ValueError, match=r"`search` must be one of \('auto', 'sort', 'table', 'newton'\), but got 'bisect'"):
        project_box_simplex(v, torch.zeros_like(v), torch.ones_like(v), search="bisect")


def test_auto_search_rule_counts_leading_dimensions_as_rows():
    # The table's size is 2 * numel * C, with C the last dimension: 4 x 512 rows of C = 16 hold
    # exactly _TABLE_MAX_ENTRIES entries; 2 x 2 rows of C = 513 are too few for the Newton passes.
    pick = functools.partial(_projection._pick_search, search="auto")
    assert pick(torch.zeros(4, 512, 16)) == "table" and pick(torch.zeros(4, 512, 17)) == "newton"
    assert pick(torch.zeros(2, 2, 513)) == "sort"


@pytest.mark.parametrize("search", SEARCHES)
def test_gradient_counts_a_coordinate_exactly_at_lo_as_free(search):
    # x = v = (0.75, 0.25, 0): the root tau = 0 is coordinate 2's breakpoint (it sits exactly at
    # lo). The documented convention counts it as free: every coordinate is in F, and the
    # gradient of v is the output gradient minus its mean; the bounds get none.
    v = torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64, requires_grad=True)
    lo, hi = torch.zeros_like(v, requires_grad=True), torch.ones_like(v, requires_grad=True)
    x = project_box_simplex(v, lo, hi, search=search)
    assert x.tolist() == [[0.75, 0.25, 0.0]]
    x.backward(torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64))
    assert v.grad.tolist() == [[-2.0, -1.0, 3.0]]
    assert lo.grad.tolist() == [[0.0, 0.0, 0.0]] and hi.grad.tolist() == [[0.0, 0.0, 0.0]]


@pytest.mark.parametrize("search", SEARCHES)
def test_lower_bounds_summing_to_exactly_one_give_lo_and_each_searchs_one_sided_gradient(search):
    # sum(lo) = 1: the box's only feasible point is lo, a kink. The sort and the table stop on the
    # first breakpoint (coordinate 0, exactly at lo, counts as free, so lo_0's gradient goes to
    # the others); the Newton search maps the row to its corner lo (every coordinate at lo).
    v = torch.tensor([[0.75, 0.25, 0.0]], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64, requires_grad=True)
    hi = torch.ones_like(v, requires_grad=True)
    x = project_box_simplex(v, lo, hi, search=search)
    assert x.tolist() == [[0.5, 0.25, 0.25]]
    x.backward(torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64))
    assert v.grad.tolist() == [[0.0, 0.0, 0.0]] and hi.grad.tolist() == [[0.0, 0.0, 0.0]]
    assert lo.grad.tolist() == ([[1.0, 2.0, 6.0]] if search == "newton" else [[0.0, 1.0, 5.0]])


def test_newton_steps_on_until_the_sum_is_within_four_eps():
    # Exact dyadic data (float64, eps = 2**-52): the first pass starts at tau = 0.125 with
    # coordinate 2 below lo by 4.5 eps, so g - 1 = 4.5 eps, above the 4 eps at which the bracket
    # closes. One more (exact) Newton step lands on the root: the result is the exact
    # projection to rounding, and sums to 1.
    eps = 2.0**-52
    v = torch.tensor([[0.5 + 4.5 * eps, 0.25, -0.125 - 4.5 * eps]], dtype=torch.float64)
    lo, hi = torch.zeros_like(v), torch.ones_like(v)
    assert v.sum().item() == 0.625  # tau = (1 - 0.625) / 3 = 0.125 exactly, where g - 1 = 4.5 eps
    x = project_box_simplex(v, lo, hi, search="newton")
    exact = torch.tensor([[0.625 + 2.25 * eps, 0.375 - 2.25 * eps, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(x, exact, atol=eps / 2, rtol=0)
    assert abs(x.sum().item() - 1) <= eps


def test_newton_converges_on_rows_with_a_far_coordinate():
    # One coordinate 100 below the others: the unconstrained root -offset / C starts the passes
    # near the root's segment; a start far from it needs more passes than there are.
    generator = torch.Generator().manual_seed(0)
    v, lo, hi = random_box(generator, 256, 8, torch.float64)
    v[:, 0] -= 100
    x = project_box_simplex(v, lo, hi, search="newton")
    torch.testing.assert_close(x, bisection_projection(v, lo, hi), atol=1e-12, rtol=0)


def test_newton_reaches_a_root_within_rounding_of_a_bracket_end():
    # Bounds that sum to 1 within an eps or two put the root within rounding of a breakpoint that
    # becomes an end of the search's bracket. The exact Newton step lands on that end; a pass
    # that refused it would bisect towards the root for the remaining passes without reaching
    # it (a found case: x1 = 0.51928 for 0.51895, sum(lo) = 1 - 1.1e-16).
    v = torch.tensor([[-0.9185833258931866, 1.776940086458914]], dtype=torch.float64)
    lo = torch.tensor([[0.48104512450084114, 0.5189548754991588]], dtype=torch.float64)
    hi = torch.ones_like(v)
    expected = project_box_simplex(v, lo, hi, search="sort")
    torch.testing.assert_close(project_box_simplex(v, lo, hi, search="newton"), expected, atol=1e-15, rtol=0)
    generator = torch.Generator().manual_seed(3)
    v = 10 * torch.randn(512, 6, generator=generator, dtype=torch.float64)
    lo = torch.softmax(torch.randn(512, 6, generator=generator, dtype=torch.float64), -1)
    lo = lo * (1 - torch.randint(1, 4, (512, 1), generator=generator) * torch.finfo(torch.float64).eps)
    hi = torch.ones_like(v)
    expected = project_box_simplex(v, lo, hi, search="sort")
    torch.testing.assert_close(project_box_simplex(v, lo, hi, search="newton"), expected, atol=1e-12, rtol=0)
    # The mirror case: upper bounds that sum to 1 + k eps.
    lo, hi = torch.zeros_like(v), torch.softmax(torch.randn(512, 6, generator=generator, dtype=torch.float64), -1)
    hi = hi * (1 + torch.randint(1, 4, (512, 1), generator=generator) * torch.finfo(torch.float64).eps)
    expected = project_box_simplex(v, lo, hi, search="sort")
    torch.testing.assert_close(project_box_simplex(v, lo, hi, search="newton"), expected, atol=1e-12, rtol=0)
