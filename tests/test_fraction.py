"""Tests of the knowledge-fraction strategies (mkfkit/fraction.py)."""

from fractions import Fraction as Rational

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import mkfkit
from mkfkit.fraction import (
    DominantFraction,
    Fraction,
    LinearFraction,
    QPFraction,
    dominant_fraction,
    linear_fraction,
    qp_fraction,
)

KINDS = ("dirichlet", "peaked", "one_hot", "unrelated")
EXTREME_LAMS = (1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6)
TINY64 = torch.finfo(torch.float64).tiny
lams = st.one_of(st.sampled_from(EXTREME_LAMS), st.floats(0.0, 1.0))


def make_instance(seed, batch, num_classes, kind, lam, dtype=torch.float64):
    """A mixed pair: true responses p_a, p_b, bases K_a, K_b and mixed = lam p_a + (1-lam) p_b.

    kind: "dirichlet" (bases are noisy versions of the truth), "peaked" (sharp rows),
    "one_hot" (one-hot truth, Dirichlet bases), "unrelated" (bases independent of the truth).
    """
    rng = np.random.default_rng(seed)
    alpha = 0.05 if kind == "peaked" else 1.0

    def rows(concentration):
        return rng.dirichlet(np.full(num_classes, concentration), size=batch)

    if kind == "one_hot":
        p_a = np.eye(num_classes)[rng.integers(num_classes, size=batch)]
        p_b = np.eye(num_classes)[rng.integers(num_classes, size=batch)]
    else:
        p_a, p_b = rows(alpha), rows(alpha)
    if kind == "unrelated":
        base_a, base_b = rows(1.0), rows(1.0)
    else:
        base_a, base_b = 0.7 * p_a + 0.3 * rows(1.0), 0.7 * p_b + 0.3 * rows(1.0)
    lam = np.broadcast_to(np.asarray(lam, dtype=np.float64), (batch,)).copy()
    mixed = lam[:, None] * p_a + (1 - lam[:, None]) * p_b
    to = lambda x: torch.as_tensor(x, dtype=dtype)  # noqa: E731
    return to(mixed), to(base_a), to(base_b), to(lam), to(p_a), to(p_b)


def objective(a, b, base_a, base_b, lam):
    lam = lam[:, None]
    return (lam * (a - base_a) ** 2 + (1 - lam) * (b - base_b) ** 2).sum(-1)


def cvxpy_qp(mixed, base_a, base_b, lam):
    """Reference: the QP of one row, solved by Clarabel at tight tolerances (numpy float64).

    Solved in the contributions u = lam a and w = (1 - lam) b (the same QP after a change of
    variables: lam ||a - K_a||^2 = ||u - lam K_a||^2 / lam), whose mixing constraint u + w = mixed
    carries no weights; in a and b the solver's feasibility slack is amplified by 1 / lam and
    the reference loses its accuracy for lam near 0 or 1.

    cvxpy is a test dependency (CI has it); imported here, so that the other tests of this file
    also run where it is missing (the GPU machine of benchmarks/device_check.sh).
    """
    cp = pytest.importorskip("cvxpy")
    num_classes = mixed.shape[0]
    u, w = cp.Variable(num_classes), cp.Variable(num_classes)
    scaled = cp.sum_squares(u - lam * base_a) / lam + cp.sum_squares(w - (1 - lam) * base_b) / (1 - lam)
    constraints = [u + w == mixed, u >= 0, u <= lam, w >= 0, w <= 1 - lam, cp.sum(u) == lam, cp.sum(w) == 1 - lam]
    problem = cp.Problem(cp.Minimize(scaled), constraints)
    problem.solve(solver="CLARABEL", tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12, tol_ktratio=1e-10)
    return u.value / lam, w.value / (1 - lam)


def simplex_row(mixed):
    """``mixed`` clamped to [0, 1] and scaled to sum 1, written out here: the row the exact QP is
    solved for."""
    clamped = mixed.clamp(0, 1)
    return clamped / clamped.sum(-1, keepdim=True)


def variational_gap(fraction, mixed, base_a, base_b, lam):
    """Solver-free first-order optimality check of the QP, per row.

    With b = (mixed - lam a) / (1 - lam), the objective's gradient in a is proportional to
    g = (a - K_a) - (b - K_b), and the feasible set of a is {sum = 1, lo <= a <= hi} with the
    bounds that keep 0 <= b <= 1. `a` is optimal iff g.a <= min over that set of g.y; the
    minimum of this linear program is found greedily (fill the cheapest coordinates first).

    The bounds are those of `mixed` scaled onto the simplex, the row the QP is solved for: a row
    whose sum misses 1 by rounding admits no feasible pair at all, and divided by a weight of
    1e-6 its last-bit difference from the scaled row moves a bound by 1e-10.
    """
    lam_ = lam[:, None]
    target = simplex_row(mixed)
    g = (fraction.a - base_a) - (fraction.b - base_b)
    lo = ((target - (1 - lam_)) / lam_).clamp_min(0)
    hi = (target / lam_).clamp_max(1)
    order = g.argsort(-1)
    capacity = (hi - lo).gather(-1, order)
    left = 1 - lo.sum(-1, keepdim=True)
    filled = (left - (capacity.cumsum(-1) - capacity)).clamp(min=0)
    added = torch.minimum(filled, capacity)
    best = (g * lo).sum(-1) + (g.gather(-1, order) * added).sum(-1)
    return (g * fraction.a).sum(-1) - best


def assert_on_simplex(x, atol):
    assert bool((x >= 0).all()) and bool((x <= 1).all())
    torch.testing.assert_close(x.sum(-1), torch.ones_like(x[:, 0]), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------
# Exact QP: identity, simplex, optimality


@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(2, 1000),
    kind=st.sampled_from(KINDS),
    lam=lams,
)
@example(seed=0, num_classes=2, kind="one_hot", lam=2.2e-309)  # a subnormal weight, found once
@example(seed=1, num_classes=2, kind="peaked", lam=1e-6)  # a row summing to 1 - 2^-53, found once
def test_qp_mixing_identity_simplex_and_kkt(seed, num_classes, kind, lam):
    mixed, base_a, base_b, lam_t, _, _ = make_instance(seed, 4, num_classes, kind, lam)
    out = qp_fraction(mixed, base_a, base_b, lam_t)
    assert_on_simplex(out.a, 1e-12)
    assert_on_simplex(out.b, 1e-12)
    # A subnormal weight counts as 0 (positive_weights): side a keeps its base.
    if TINY64 <= lam < 1:
        identity = lam_t[:, None] * out.a + (1 - lam_t[:, None]) * out.b
        torch.testing.assert_close(identity, mixed, atol=1e-14, rtol=0)
        assert float(variational_gap(out, mixed, base_a, base_b, lam_t).max()) <= 1e-12


@settings(max_examples=12)
@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.sampled_from([2, 3, 10, 100, 1000]),
    kind=st.sampled_from(KINDS),
    lam=st.one_of(st.sampled_from(EXTREME_LAMS), st.floats(1e-6, 1 - 1e-6)),
)
def test_qp_matches_clarabel_and_never_has_a_worse_objective(seed, num_classes, kind, lam):
    mixed, base_a, base_b, lam_t, _, _ = make_instance(seed, 2, num_classes, kind, lam)
    out = qp_fraction(mixed, base_a, base_b, lam_t)
    for row in range(2):
        rows = [t[row : row + 1] for t in (mixed, base_a, base_b, lam_t)]
        ref_a, ref_b = (torch.from_numpy(x)[None] for x in cvxpy_qp(*(t[0].numpy() for t in rows[:3]), lam))
        # The reference resolves a side only up to its feasibility slack (up to 1e-9) divided
        # by that side's weight; the solver-free KKT test above is the tight check.
        torch.testing.assert_close(out.a[row : row + 1], ref_a, atol=1e-5 + 1e-9 / lam, rtol=0)
        torch.testing.assert_close(out.b[row : row + 1], ref_b, atol=1e-5 + 1e-9 / (1 - lam), rtol=0)
        # Never worse, beyond what the reference gains by violating the mixing identity and,
        # within its 1e-12 feasibility tolerance, the sum and box constraints (seen: 4e-12).
        slack = float((lam * ref_a + (1 - lam) * ref_b - rows[0]).abs().sum())
        mine = objective(out.a[row : row + 1], out.b[row : row + 1], rows[1], rows[2], rows[3])
        theirs = objective(ref_a, ref_b, rows[1], rows[2], rows[3])
        assert float(mine) <= float(theirs) + 1e-10 + 10 * slack


def test_qp_large_batch_extreme_weights_is_exact():
    # locuslab/qpth#32, #28: batched QP layers grow inaccurate or fail in their LU step. The
    # exact path needs no factorisation: a large float64 batch at extreme weights stays optimal.
    lam = torch.tensor(EXTREME_LAMS, dtype=torch.float64).repeat(103)[:512]
    mixed, base_a, base_b, lam, _, _ = make_instance(11, 512, 100, "unrelated", lam.numpy())
    out = qp_fraction(mixed, base_a, base_b, lam)
    torch.testing.assert_close(lam[:, None] * out.a + (1 - lam[:, None]) * out.b, mixed, atol=1e-14, rtol=0)
    assert float(variational_gap(out, mixed, base_a, base_b, lam).max()) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qp_of_rows_off_the_simplex_is_the_qp_of_the_row_scaled_onto_it(backend, dtype):
    # Rows of `mixed` are accepted up to distribution_tolerance off the simplex, where the
    # mixing identity and two rows on the simplex cannot hold together; the QP is solved for the
    # row clamped to [0, 1] and scaled to sum 1, by either backend (the kernel scales inside).
    lam = [0.0, 0.2, 0.5, 0.7, 0.95, 1.0]
    mixed, base_a, base_b, lam, _, _ = make_instance(5, 6, 10, "dirichlet", lam, dtype)
    off = mixed * torch.tensor([1 + 9e-4, 1 - 9e-4, 1, 1 + 5e-4, 1 - 5e-4, 1 + 9e-4], dtype=dtype)[:, None]
    low, high = off[2].argmin(), off[2].argmax()  # an entry below 0, the row's sum kept
    off[2, high] += off[2, low] + 4e-4
    off[2, low] = -4e-4
    off[3] = torch.zeros(10, dtype=dtype).index_put_((torch.arange(3),), torch.tensor([1 + 8e-4, 1e-4, -9e-4], dtype=dtype))
    scaled = simplex_row(off)
    out = qp_fraction(off, base_a, base_b, lam, backend=backend)
    atol = 1e-6 if dtype == torch.float32 else 1e-14
    for got, want in zip(out, qp_fraction(scaled, base_a, base_b, lam, backend="torch")):
        torch.testing.assert_close(got, want, atol=atol, rtol=0)
    assert_on_simplex(out.a, atol)
    assert_on_simplex(out.b, atol)
    torch.testing.assert_close(lam[:, None] * out.a + (1 - lam[:, None]) * out.b, scaled, atol=atol, rtol=0)
    if dtype == torch.float64:  # against a general-purpose solver, where both sides count
        for row in range(1, 5):
            ref_a, ref_b = cvxpy_qp(scaled[row].numpy(), base_a[row].numpy(), base_b[row].numpy(), float(lam[row]))
            torch.testing.assert_close(out.a[row], torch.from_numpy(ref_a), atol=1e-6, rtol=0)
            torch.testing.assert_close(out.b[row], torch.from_numpy(ref_b), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------
# Linear fraction (OPT2)


@given(seed=st.integers(0, 2**31 - 1), num_classes=st.integers(2, 200), kind=st.sampled_from(KINDS), lam=lams)
def test_linear_raw_is_the_paper_formula_and_projection_is_on_the_simplex(seed, num_classes, kind, lam):
    mixed, base_a, base_b, lam_t, _, _ = make_instance(seed, 3, num_classes, kind, lam)
    raw = linear_fraction(mixed, base_a, base_b, lam_t, project=False)
    projected = linear_fraction(mixed, base_a, base_b, lam_t)
    # Documented: weights below sqrt(finfo.tiny) divide as sqrt(finfo.tiny), keeping values finite.
    floor = TINY64**0.5
    if lam >= TINY64:
        torch.testing.assert_close(raw.a, (mixed - (1 - lam) * base_b) / max(lam, floor), atol=1e-12, rtol=1e-12)
    else:
        assert torch.equal(raw.a, base_a) and torch.equal(projected.a, base_a)
    if lam < 1:
        torch.testing.assert_close(raw.b, (mixed - lam * base_a) / (1 - lam), atol=1e-12, rtol=1e-12)
    else:
        assert torch.equal(raw.b, base_b) and torch.equal(projected.b, base_b)
    assert_on_simplex(projected.a, 1e-12)
    assert_on_simplex(projected.b, 1e-12)
    # Where OPT2 is already a distribution, the projection leaves it alone.
    for side in ("a", "b"):
        valid = ((getattr(raw, side) >= 0) & (getattr(raw, side) <= 1)).all(-1)
        torch.testing.assert_close(getattr(projected, side)[valid], getattr(raw, side)[valid], atol=1e-12, rtol=0)


def test_raw_linear_fraction_leaves_the_simplex():
    # Why the default projects: raw OPT2 rows get negative entries for unrelated bases.
    mixed, base_a, base_b, lam, _, _ = make_instance(0, 64, 100, "unrelated", 0.5)
    raw = linear_fraction(mixed, base_a, base_b, lam, project=False)
    assert float((raw.a < 0).any(-1).double().mean()) > 0.9


# ---------------------------------------------------------------------------------------------
# Properties shared by the strategies

STRATEGIES = {
    "linear": LinearFraction(),
    "linear_raw": LinearFraction(project=False),
    "qp": QPFraction(),
}


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("kind", KINDS)
def test_recovery_when_bases_are_the_truth(name, kind, device):
    lam = torch.tensor([0.0, 1e-6, 0.2, 0.5, 0.8, 1 - 1e-6, 1.0], dtype=torch.float64)
    mixed, _, _, lam, p_a, p_b = make_instance(2, 7, 30, kind, lam.numpy())
    out = STRATEGIES[name](mixed.to(device), p_a.to(device), p_b.to(device), lam.to(device))
    # OPT2 divides rounding errors by lam (1e-6 here); the QP returns the bases exactly (r = 0).
    atol = 1e-14 if name == "qp" else 1e-9
    torch.testing.assert_close(out.a.cpu(), p_a, atol=atol, rtol=0)
    torch.testing.assert_close(out.b.cpu(), p_b, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_symmetry_swapping_the_two_images(name):
    lam = torch.tensor([0.0, 1e-4, 0.25, 0.5, 0.75, 1 - 1e-4, 1.0], dtype=torch.float64)
    mixed, base_a, base_b, lam, _, _ = make_instance(3, 7, 50, "dirichlet", lam.numpy())
    strategy = STRATEGIES[name]
    out = strategy(mixed, base_a, base_b, lam)
    swapped = strategy(mixed, base_b, base_a, 1 - lam)
    torch.testing.assert_close(swapped.a, out.b, atol=1e-9, rtol=0)
    torch.testing.assert_close(swapped.b, out.a, atol=1e-9, rtol=0)
    assert torch.equal(swapped.mask_a, out.mask_b) and torch.equal(swapped.mask_b, out.mask_a)


@pytest.mark.parametrize("name", list(STRATEGIES) + ["dominant"])
def test_batch_equals_rows_one_by_one(name):
    strategy = STRATEGIES.get(name, DominantFraction())
    lam = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64)
    mixed, base_a, base_b, lam, _, _ = make_instance(4, 5, 20, "peaked", lam.numpy())
    batched = strategy(mixed, base_a, base_b, lam)
    for row in range(5):
        single = strategy(mixed[row : row + 1], base_a[row : row + 1], base_b[row : row + 1], float(lam[row]))
        for got, want in zip(single, batched):
            torch.testing.assert_close(got[0], want[row], atol=1e-15, rtol=0)


@pytest.mark.parametrize("name", list(STRATEGIES) + ["dominant"])
def test_float32_agrees_with_float64_on_device(name, device):
    strategy = STRATEGIES.get(name, DominantFraction())
    lam = torch.rand(256, dtype=torch.float64) * 0.8 + 0.1
    instance = make_instance(5, 256, 1000, "dirichlet", lam.numpy())
    out64 = strategy(*(t.to(device) for t in instance[:4]))
    out32 = strategy(*(t.to(device, torch.float32) for t in instance[:4]))
    assert out32.a.dtype == torch.float32 and out32.a.device.type == device
    atol = 1e-4 if name == "linear_raw" else 1e-5  # raw OPT2 amplifies rounding by 1/lam
    torch.testing.assert_close(out32.a.double(), out64.a, atol=atol, rtol=0)
    torch.testing.assert_close(out32.b.double(), out64.b, atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(STRATEGIES) + ["dominant"])
def test_module_equals_functional(name):
    functional = {
        "linear": lambda *x: linear_fraction(*x),
        "linear_raw": lambda *x: linear_fraction(*x, project=False),
        "qp": lambda *x: qp_fraction(*x),
        "dominant": lambda *x: dominant_fraction(*x),
    }[name]
    strategy = STRATEGIES.get(name, DominantFraction())
    instance = make_instance(6, 8, 10, "dirichlet", 0.3, torch.float32)[:4]
    for got, want in zip(strategy(*instance), functional(*instance)):
        assert torch.equal(got, want)
    assert isinstance(strategy(*instance), Fraction)


def test_masks_and_weight_zero_sides_keep_their_base():
    lam = torch.tensor([0.0, 0.3, 0.5, 1.0], dtype=torch.float64)
    mixed, base_a, base_b, lam, _, _ = make_instance(7, 4, 10, "dirichlet", lam.numpy())
    for strategy in STRATEGIES.values():
        out = strategy(mixed, base_a, base_b, lam)
        assert out.mask_a.tolist() == [False, True, True, True]
        assert out.mask_b.tolist() == [True, True, True, False]
        assert torch.equal(out.a[0], base_a[0]) and torch.equal(out.b[3], base_b[3])
        # The side of full weight is the mixed output itself.
        torch.testing.assert_close(out.b[0], mixed[0], atol=1e-15, rtol=0)
        torch.testing.assert_close(out.a[3], mixed[3], atol=1e-15, rtol=0)


def test_dominant_assigns_the_mixed_output_to_the_larger_weight():
    lam = torch.tensor([0.0, 0.49, 0.5, 1.0], dtype=torch.float64)
    mixed, base_a, base_b, lam, _, _ = make_instance(8, 4, 6, "dirichlet", lam.numpy())
    out = dominant_fraction(mixed, base_a, base_b, lam)
    assert out.mask_a.tolist() == [False, False, True, True]
    assert out.mask_b.tolist() == [True, True, False, False]
    expected_a = torch.where(out.mask_a[:, None], mixed, base_a)
    expected_b = torch.where(out.mask_b[:, None], mixed, base_b)
    assert torch.equal(out.a, expected_a) and torch.equal(out.b, expected_b)


# ---------------------------------------------------------------------------------------------
# Extreme weights in every dtype: exact or refused, never off the simplex

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@st.composite
def extreme_lams(draw, dtype):
    """A weight in [0, 1] representable in ``dtype``: tiny, subnormal, near 1, or anywhere."""
    finfo = torch.finfo(dtype)
    special = [0.0, finfo.smallest_normal, finfo.smallest_normal / 4, finfo.eps / 4, finfo.eps, 1e-8, 1e-19,
               1e-30, 1e-300, 1 - finfo.eps, 1 - finfo.eps / 2, 1.0]
    value = draw(st.one_of(st.sampled_from(special), st.floats(0, 1), st.floats(0, 1e-6)))
    return float(torch.tensor(value, dtype=torch.float64).to(dtype))


@st.composite
def fraction_inputs(draw):
    """Probability rows (Dirichlet, one-hot and uniform) in some dtype and weights for them."""
    dtype = draw(st.sampled_from(DTYPES))
    batch, num_classes = draw(st.integers(0, 4)), draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))

    def rows():
        kind = draw(st.sampled_from(("dirichlet", "peaked", "one_hot", "uniform")))
        if kind == "one_hot":
            return np.eye(num_classes)[rng.integers(num_classes, size=batch)]
        if kind == "uniform":
            return np.full((batch, num_classes), 1 / num_classes)
        return rng.dirichlet(np.full(num_classes, 0.05 if kind == "peaked" else 1.0), size=batch)

    lam = np.array([draw(extreme_lams(dtype)) for _ in range(batch)], dtype=np.float64)
    p_a, p_b, base_a, base_b = rows(), rows(), rows(), rows()
    mixed = lam[:, None] * p_a + (1 - lam[:, None]) * p_b
    to = lambda x: torch.as_tensor(x, dtype=torch.float64).to(dtype)  # noqa: E731
    return to(mixed), to(base_a), to(base_b), to(lam)


@settings(max_examples=150)
@given(inputs=fraction_inputs(), name=st.sampled_from(["linear", "qp", "dominant"]))
def test_every_weight_in_every_dtype_gives_rows_on_the_simplex(inputs, name):
    from mkfkit._checks import distribution_tolerance
    from mkfkit.fraction import positive_weights, side_weights

    mixed, base_a, base_b, lam = inputs
    out = STRATEGIES.get(name, DominantFraction())(mixed, base_a, base_b, lam)
    tolerance = distribution_tolerance(mixed.dtype)
    for rows in (out.a, out.b):
        assert rows.dtype == mixed.dtype and rows.shape == mixed.shape
        assert bool(torch.isfinite(rows).all()) and bool((rows >= 0).all()) and bool((rows <= 1).all())
        assert bool(((rows.double().sum(-1) - 1).abs() <= tolerance).all())
    if name != "dominant":
        # The one rule: a side counts from the smallest normal weight of the compute dtype on.
        compute = torch.float64 if lam.dtype == torch.float64 else torch.float32
        positive_a, positive_b = positive_weights(side_weights(lam.to(compute)))
        assert torch.equal(out.mask_a, positive_a) and torch.equal(out.mask_b, positive_b)
        assert torch.equal(out.a[~positive_a], base_a[~positive_a])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_weights_count_as_zero(dtype):
    tiny = torch.finfo(dtype).tiny
    lam = torch.tensor([0.0, tiny / 4, tiny, 1.0], dtype=dtype)
    mixed, base_a, base_b, _, _, _ = make_instance(23, 4, 6, "dirichlet", lam.double().numpy(), dtype)
    for name in ("linear", "qp"):
        out = STRATEGIES[name](mixed, base_a, base_b, lam)
        assert out.mask_a.tolist() == [False, False, True, True], name
        assert torch.equal(out.a[:2], base_a[:2]), name


def exact_simplex_projection(row):
    """The Euclidean projection of ``row`` (rationals) onto the simplex, in exact arithmetic:
    ``max(row + tau, 0)`` with ``tau = (1 - sum of the rho largest) / rho`` for the largest
    ``rho`` whose entry stays positive (the sort-based closed form)."""
    ordered, total, tau = sorted(row, reverse=True), Rational(0), None
    for rho, value in enumerate(ordered, start=1):
        total += value
        if value + (1 - total) / rho > 0:
            tau = (1 - total) / rho
    return [max(value + tau, Rational(0)) for value in row]


@given(
    seed=st.integers(0, 2**31 - 1),
    num_classes=st.integers(2, 30),
    kind=st.sampled_from(KINDS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    exponent=st.floats(-300.0, -6.0),
    true_base_b=st.booleans(),
)
@example(seed=24, num_classes=30, kind="unrelated", dtype=torch.float32, exponent=-8.0, true_base_b=False)
@example(seed=24, num_classes=30, kind="unrelated", dtype=torch.float32, exponent=-30.0, true_base_b=False)
@example(seed=24, num_classes=30, kind="unrelated", dtype=torch.float64, exponent=-19.0, true_base_b=False)
@example(seed=24, num_classes=30, kind="unrelated", dtype=torch.float64, exponent=-300.0, true_base_b=False)
@example(seed=1, num_classes=10, kind="dirichlet", dtype=torch.float64, exponent=-9.0, true_base_b=True)
@example(seed=0, num_classes=22, kind="dirichlet", dtype=torch.float32, exponent=-6.0, true_base_b=True)
def test_linear_projection_is_exact_for_tiny_weights(seed, num_classes, kind, dtype, exponent, true_base_b):
    # A tiny positive weight makes the raw OPT2 row huge (1 / lam); its projection must still
    # be the exact one, up to the rounding of numbers of order 1. Before the shift, float32 rows
    # summed to C - 1 from lam ~ 1e-8 on (float64: 1e-19). With the true base of image b the
    # raw row is p_a plus rounding / lam: for lam well above eps its projection has several
    # positive entries, not just the largest one.
    finfo = torch.finfo(dtype)
    lam = float(torch.tensor(max(10.0**exponent, finfo.tiny), dtype=dtype))
    mixed, base_a, base_b, lam_t, _, p_b = make_instance(seed, 2, num_classes, kind, lam, dtype)
    if true_base_b:
        base_b = p_b
    a = linear_fraction(mixed, base_a, base_b, lam_t).a
    # The sum of C entries each rounded once in `dtype` (the entries are checked against the
    # exact projection below): up to about C eps apart from 1 (7 eps seen at C = 22, lam 1e-6).
    assert_on_simplex(a, num_classes * finfo.eps)
    # The raw row as the documented formula computes it in `dtype`, divided (exactly) by the
    # weight, or by sqrt(finfo.tiny) below it (documented).
    numerator = mixed - (1 - lam_t[:, None]) * base_b
    divisor = Rational(max(lam, finfo.tiny**0.5))
    for got, raw in zip(a.tolist(), numerator.tolist()):
        expected = exact_simplex_projection([Rational(value) / divisor for value in raw])
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor([float(x) for x in expected], dtype=torch.float64), atol=8 * finfo.eps, rtol=0)


# ---------------------------------------------------------------------------------------------
# Gradients


def test_gradcheck_exact_qp_float64():
    mixed, base_a, base_b, lam, _, _ = make_instance(9, 3, 8, "dirichlet", [0.2, 0.5, 0.9])
    inputs = tuple(t.clone().requires_grad_(True) for t in (mixed, base_a, base_b, lam))

    def both(mixed, base_a, base_b, lam):
        with mkfkit.value_checks(False):  # gradcheck's perturbations leave the simplex slightly
            out = qp_fraction(mixed, base_a, base_b, lam)
        return out.a, out.b

    assert torch.autograd.gradcheck(both, inputs)


@pytest.mark.parametrize("project", [True, False])
def test_gradcheck_linear_float64(project):
    mixed, base_a, base_b, lam, _, _ = make_instance(10, 3, 8, "dirichlet", [0.2, 0.5, 0.9])
    inputs = tuple(t.clone().requires_grad_(True) for t in (mixed, base_a, base_b, lam))

    def both(*args):
        with mkfkit.value_checks(False):
            out = linear_fraction(*args, project=project)
        return out.a, out.b

    assert torch.autograd.gradcheck(both, inputs)


@pytest.mark.parametrize("name", list(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_and_gradients_finite_for_every_weight(name, dtype):
    tiny = torch.finfo(dtype).tiny
    # OPT2 stays finite down to subnormal weights; the QP's bound mixed / lam has a derivative
    # that truly overflows below sqrt(tiny) (documented), so its grid starts there.
    smallest = [tiny / 4, tiny, 1e-30] if name.startswith("linear") else [tiny**0.5, 1e-15]
    lam = torch.tensor([0.0, *smallest, 1e-7, 0.5, 1 - 1e-7, 1.0], dtype=torch.float64)
    instance = make_instance(12, len(lam), 50, "unrelated", lam.numpy(), dtype)
    mixed, base_a, base_b = (t.clone().requires_grad_(True) for t in instance[:3])
    lam = instance[3].clone().requires_grad_(True)
    out = STRATEGIES[name](mixed, base_a, base_b, lam)
    assert bool(torch.isfinite(out.a).all()) and bool(torch.isfinite(out.b).all())
    (out.a * torch.randn_like(out.a) + out.b * torch.randn_like(out.b)).sum().backward()
    for grad in (mixed.grad, base_a.grad, base_b.grad):
        assert bool(torch.isfinite(grad).all())
    # Rows of weight exactly 0 or 1 (the where-trap) give finite lam-gradients too.
    assert bool(torch.isfinite(lam.grad[[0, -1]]).all())


# ---------------------------------------------------------------------------------------------
# Half precision and autocast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_float32_and_cast_back(dtype):
    instance = make_instance(13, 16, 10, "dirichlet", 0.3, torch.float32)
    half = [t.to(dtype) for t in instance[:3]]
    out = qp_fraction(*half, 0.3)
    with mkfkit.value_checks(False):  # float32 rows of rounded values miss 1 by more than 1e-3
        reference = qp_fraction(*(t.float() for t in half), 0.3)
    assert out.a.dtype == dtype and out.b.dtype == dtype
    assert torch.equal(out.a, reference.a.to(dtype)) and torch.equal(out.b, reference.b.to(dtype))


def test_under_cpu_autocast():
    instance = make_instance(14, 16, 10, "dirichlet", 0.6, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = qp_fraction(*instance[:4])
    assert out.a.dtype == torch.float32
    torch.testing.assert_close(out.a, qp_fraction(*instance[:4]).a, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Backend dispatch


def test_forced_triton_without_triton_raises(monkeypatch):
    from mkfkit import kernels

    monkeypatch.setattr(kernels, "available", lambda device: False)
    instance = make_instance(18, 2, 5, "dirichlet", 0.5, torch.float32)[:4]
    with pytest.raises(RuntimeError, match="`backend` 'triton' needs Triton"):
        qp_fraction(*instance, backend="triton")
    assert qp_fraction(*instance, backend="auto").a.shape == (2, 5)


def test_backend_dispatch_uses_the_fused_kernels_and_keeps_masks(monkeypatch):
    pytest.importorskip("triton")
    from mkfkit import kernels
    from mkfkit.kernels import qp as qp_kernels

    calls = []

    def fake_qp(mixed, base_a, base_b, lam):
        calls.append(lam)
        return torch.full_like(mixed, 7.0), torch.full_like(mixed, 8.0)

    monkeypatch.setattr(kernels, "available", lambda device: True)
    monkeypatch.setattr(qp_kernels, "qp_pair", fake_qp)
    mixed, base_a, base_b, _, _, _ = make_instance(19, 3, 4, "dirichlet", 0.5, torch.float32)
    lam = torch.tensor([0.0, 0.5, 1.0])
    out = qp_fraction(mixed, base_a, base_b, lam, backend="triton")
    assert len(calls) == 1 and torch.equal(calls[0], lam)  # the weight of side a
    assert torch.equal(out.a[0], base_a[0]) and bool((out.a[1:] == 7).all())
    assert torch.equal(out.b[2], base_b[2]) and bool((out.b[:2] == 8).all())
    # "auto" keeps CPU tensors on the torch path.
    assert torch.equal(qp_fraction(mixed, base_a, base_b, lam, backend="auto").a, qp_fraction(mixed, base_a, base_b, lam, backend="torch").a)
    assert len(calls) == 1
    # The module keeps its backend, called directly and through a bank's update.
    assert bool((QPFraction(backend="triton")(mixed, base_a, base_b, lam).a[1:] == 7).all())
    assert len(calls) == 2
    bank = mkfkit.KnowledgeBank(6, 4, 1, backend="torch")
    bank.update(0, base_a, torch.tensor([0, 1, 2]))
    bank.update(0, mixed, torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 0.5, QPFraction(backend="triton"))
    assert len(calls) == 3


# ---------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_name_the_argument():
    mixed, base_a, base_b, lam, _, _ = make_instance(20, 2, 4, "dirichlet", 0.5, torch.float32)
    with pytest.raises(TypeError, match=r"`mixed` must be a torch.Tensor, but got"):
        qp_fraction(mixed.tolist(), base_a, base_b, 0.5)
    with pytest.raises(ValueError, match=r"`mixed` must be a Tensor\[B, C\], but got shape \(4,\)"):
        qp_fraction(mixed[0], base_a[0], base_b[0], 0.5)
    with pytest.raises(ValueError, match=r"`base_a` must have the shape of `mixed` \(2, 4\), but got \(2, 3\)"):
        linear_fraction(mixed, base_a[:, :3], base_b, 0.5)
    with pytest.raises(TypeError, match=r"`base_b` must have a floating-point dtype, but got torch.int64"):
        qp_fraction(mixed, base_a, base_b.long(), 0.5)
    with pytest.raises(TypeError, match=r"`base_b` must have the dtype of `mixed` \(torch.float32\), but got torch.float64"):
        dominant_fraction(mixed, base_a, base_b.double(), 0.5)
    with pytest.raises(ValueError, match=r"`base_a` must be on the device of `mixed` \(cpu\), but got meta"):
        qp_fraction(mixed, base_a.to("meta"), base_b, 0.5)
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 1.3"):
        qp_fraction(mixed, base_a, base_b, 1.3)
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got -0.1"):
        linear_fraction(mixed, base_a, base_b, torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match=r"`lam` must be a number or Tensor\[B\] with B = 2, but got shape \(3,\)"):
        qp_fraction(mixed, base_a, base_b, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match=r"`base_b` must be finite, but got 2 NaN/Inf entries"):
        qp_fraction(mixed, base_a, torch.where(torch.eye(2, 4).bool(), float("nan"), base_b), 0.5)
    with pytest.raises(ValueError, match=r"`mixed` must hold probability rows \(each summing to 1 within 0.001\)"):
        qp_fraction(mixed * 1.1, base_a, base_b, 0.5)
    with pytest.raises(ValueError, match=r"`base_a` must hold probability rows \(entries >= 0\), but got an entry -0.5"):
        qp_fraction(mixed, torch.tensor([[-0.5, 1.5, 0, 0], [0.25, 0.25, 0.25, 0.25]]), base_b, 0.5)
    with pytest.raises(ValueError, match=r"`backend` must be one of 'auto', 'torch', 'triton', but got 'cuda'"):
        qp_fraction(mixed, base_a, base_b, 0.5, backend="cuda")
    with pytest.raises(ValueError, match=r"`backend` must be one of 'auto', 'torch', 'triton', but got 'cuda'"):
        QPFraction(backend="cuda")


def test_value_checks_can_be_switched_off():
    mixed, base_a, base_b, _, _, _ = make_instance(21, 2, 4, "dirichlet", 0.5, torch.float32)
    with mkfkit.value_checks(False):
        out = linear_fraction(mixed * 1.1, base_a, base_b, torch.tensor([1.3, 1.3]), project=False)
    torch.testing.assert_close(out.a, (1.1 * mixed - (1 - 1.3) * base_b) / 1.3)


def test_repr():
    assert repr(QPFraction()) == "QPFraction(backend='auto')"
    assert repr(LinearFraction(project=False)) == "LinearFraction(project=False)"


@pytest.mark.parametrize("dtype, tiny", [(torch.float32, 1e-30), (torch.float32, 1e-38),
                                         (torch.float64, 1e-200), (torch.float64, 1e-300)])
@pytest.mark.parametrize("project", [False, True])
def test_linear_fraction_lam_gradient_is_finite_for_tiny_positive_lam(dtype, tiny, project):
    # OPT2 divides by lam and 1 - lam: at a tiny positive weight the gradient with respect to
    # lam must stay finite (checked here apart from lam = 0 and 1, which the tests above pin).
    generator = torch.Generator().manual_seed(0)
    mixed, base_a, base_b = (torch.rand(4, 5, generator=generator, dtype=dtype).softmax(1)
                             for _ in range(3))
    for lam_value in (tiny, 1 - tiny if dtype == torch.float64 else tiny):
        lam = torch.full((4,), lam_value, dtype=dtype, requires_grad=True)
        split = LinearFraction(project=project)(mixed, base_a, base_b, lam)
        (split.a.sum() + 2 * split.b.square().sum()).backward()
        assert torch.isfinite(lam.grad).all(), (lam_value, lam.grad)
        assert torch.isfinite(split.a).all() and torch.isfinite(split.b).all()
