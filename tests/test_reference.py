"""Tests of the reference QP solver through cvxpylayers (mkfkit/reference.py): it agrees with
the exact solver of mkfkit/fraction.py, and it stays out of the product path."""

import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("cvxpylayers")

from mkfkit import reference  # noqa: E402
from mkfkit.fraction import QPFraction, qp_fraction  # noqa: E402
from mkfkit.reference import CvxpyQPFraction, cvxpy_qp_fraction  # noqa: E402
from test_fraction import make_instance  # noqa: E402


TIGHT_CLARABEL = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10}


@pytest.mark.parametrize("conic_solver, solver_args, atol", [("CLARABEL", TIGHT_CLARABEL, 1e-5), ("SCS", None, 2e-2)])
def test_cvxpylayers_agrees_with_exact(conic_solver, solver_args, atol):
    lam = torch.tensor([0.0, 0.15, 0.5, 0.85, 1.0], dtype=torch.float64)
    mixed, base_a, base_b, lam, _, _ = make_instance(15, 5, 6, "dirichlet", lam.numpy())
    exact = qp_fraction(mixed, base_a, base_b, lam)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # solver chatter about accuracy
        strategy = CvxpyQPFraction(conic_solver=conic_solver, solver_args=solver_args)
        layer = strategy(mixed, base_a, base_b, lam)
    torch.testing.assert_close(layer.a, exact.a, atol=atol, rtol=0)
    torch.testing.assert_close(layer.b, exact.b, atol=atol, rtol=0)
    assert torch.equal(layer.mask_a, exact.mask_a)


@pytest.mark.parametrize("needs_grad", [False, True])
def test_cvxpylayers_takes_diffcp_job_counts_with_and_without_gradients(needs_grad):
    # Without gradients the layer calls diffcp's solve-only path, which has no backward options.
    mixed, base_a, base_b, lam, _, _ = make_instance(17, 3, 4, "dirichlet", [0.3, 0.5, 0.8])
    mixed.requires_grad_(needs_grad)
    jobs = {"n_jobs_forward": 1, "n_jobs_backward": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cvxpy_qp_fraction(mixed, base_a, base_b, lam, solver_args=jobs)
    torch.testing.assert_close(out.a, qp_fraction(mixed, base_a, base_b, lam).a, atol=1e-4, rtol=0)
    assert out.a.requires_grad == needs_grad


def test_cvxpylayers_gradients_agree_with_exact():
    # float32 rows miss a sum of 1 by rounding: the layer path renormalises them to stay feasible.
    mixed, base_a, base_b, lam, _, _ = make_instance(16, 4, 5, "dirichlet", [0.3, 0.4, 0.6, 0.7], torch.float32)
    weights = torch.randn(4, 5)
    grads = []
    for solver in (qp_fraction, cvxpy_qp_fraction):
        source = mixed.clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = solver(source, base_a, base_b, lam)
        assert out.a.dtype == torch.float32
        (out.a * weights + out.b * weights.flip(0)).sum().backward()
        grads.append(source.grad)
    # Only perturbations that keep the rows summing to 1 are defined: compare the gradients'
    # components in that tangent space (the solvers differ along the all-ones direction).
    tangent = [grad - grad.mean(-1, keepdim=True) for grad in grads]
    torch.testing.assert_close(tangent[1], tangent[0], atol=1e-3, rtol=0)


def test_cvxpylayers_missing_names_the_qp_extra(monkeypatch):
    # cvxpy/cvxpylayers#117, #52, #72, #53: the layer is slow, so it is never the default; the
    # default QPFraction works without cvxpylayers installed.
    monkeypatch.setitem(sys.modules, "cvxpylayers", None)
    monkeypatch.setitem(sys.modules, "cvxpylayers.torch", None)
    reference._qp_layer.cache_clear()
    instance = make_instance(17, 2, 7, "dirichlet", 0.5)[:4]
    assert QPFraction()(*instance).a.shape == (2, 7)
    with pytest.raises(ImportError, match=r"pip install mkfkit\[qp\]"):
        cvxpy_qp_fraction(*instance)
    reference._qp_layer.cache_clear()


def test_conic_solver_is_checked():
    with pytest.raises(ValueError, match=r"`conic_solver` must be one of 'CLARABEL', 'SCS', but got 'ECOS'"):
        CvxpyQPFraction(conic_solver="ECOS")
    assert repr(CvxpyQPFraction()) == "CvxpyQPFraction(conic_solver='CLARABEL')"


def test_the_product_path_never_imports_the_reference_or_triton():
    code = "import sys, mkfkit; assert not {'mkfkit.reference', 'cvxpy', 'triton'} & set(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
