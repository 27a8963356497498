"""Reference solvers: the paper's QP through ``cvxpylayers``, for tests and benchmarks.

The paper solves its QP (OPT1) with a differentiable conic-program layer. :class:`QPFraction
<mkfkit.fraction.QPFraction>` solves the same QP exactly, in closed form, about 1,000 times
faster; this module keeps the paper's route as an oracle to check it against and to time it
(``benchmarks/bench_fraction.py``, ``benchmarks/bench_step.py``). It is not part of the product
path: nothing in mkfkit imports it. Needs ``pip install mkfkit[qp]`` (cvxpy, cvxpylayers,
Clarabel, SCS).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mkfkit._checks import check_choice
from mkfkit.fraction import Fraction, _cast, _finish, _prepare, side_weights

__all__ = ["CvxpyQPFraction", "cvxpy_qp_fraction"]

CONIC_SOLVERS = ("CLARABEL", "SCS")


def cvxpy_qp_fraction(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor], *,
    conic_solver: str = "CLARABEL", solver_args: Optional[dict[str, Any]] = None,
) -> Fraction:
    """:func:`mkfkit.qp_fraction` through cvxpylayers (float64 on the CPU inside): the same
    arguments, checks and result, for reference.

    Args:
        conic_solver: ``"CLARABEL"`` (default; an interior-point method, accurate to about
            1e-8) or ``"SCS"`` (cvxpylayers' default, first-order, accurate to about 1e-4).
        solver_args: extra keyword arguments of the conic solver (e.g. ``{"eps": 1e-8}`` for
            SCS; diffcp's ``n_jobs_forward``/``n_jobs_backward``).
    """
    check_choice(conic_solver, "conic_solver", CONIC_SOLVERS)
    mixed, base_a, base_b, lam, dtype = _prepare(mixed, base_a, base_b, lam)
    pair = torch.stack(_cvxpylayers_qp(mixed, base_a, base_b, lam, conic_solver, dict(solver_args or {})))
    return _cast(_finish(pair, torch.stack((base_a, base_b)), side_weights(lam)), dtype)


class CvxpyQPFraction(nn.Module):
    """Module twin of :func:`cvxpy_qp_fraction`; arguments as there."""

    def __init__(self, conic_solver: str = "CLARABEL", solver_args: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        check_choice(conic_solver, "conic_solver", CONIC_SOLVERS)
        self.conic_solver = conic_solver
        self.solver_args = dict(solver_args or {})

    def forward(self, mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Union[float, Tensor]) -> Fraction:
        return cvxpy_qp_fraction(
            mixed, base_a, base_b, lam, conic_solver=self.conic_solver, solver_args=self.solver_args
        )

    def extra_repr(self) -> str:
        return f"conic_solver={self.conic_solver!r}"


@functools.lru_cache(maxsize=None)
def _qp_layer(num_classes: int):
    """The QP as a ``CvxpyLayer`` for ``num_classes`` classes, built once per size.

    ``lam * ||a - K_a||^2`` is not DPP (a parameter times a quadratic in the variable), so the
    objective is written as ``||sqrt(lam) * a - sqrt(lam) * K_a||^2`` with ``sqrt(lam)`` and
    ``sqrt(lam) * K_a`` as parameters.
    """
    try:
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer
    except ImportError as error:
        raise ImportError(
            "the reference QP solver needs cvxpy and cvxpylayers; install them with "
            "`pip install mkfkit[qp]`, or use mkfkit.QPFraction (the exact solver)"
        ) from error
    a, b = cp.Variable(num_classes), cp.Variable(num_classes)
    lam, one_minus_lam = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
    root_a, root_b = cp.Parameter(nonneg=True), cp.Parameter(nonneg=True)
    scaled_base_a, scaled_base_b = cp.Parameter(num_classes), cp.Parameter(num_classes)
    mixed = cp.Parameter(num_classes)
    objective = cp.sum_squares(root_a * a - scaled_base_a) + cp.sum_squares(root_b * b - scaled_base_b)
    constraints = [
        lam * a + one_minus_lam * b == mixed,
        a >= 0, a <= 1, b >= 0, b <= 1,
        cp.sum(a) == 1, cp.sum(b) == 1,
    ]
    problem = cp.Problem(cp.Minimize(objective), constraints)
    parameters = [lam, one_minus_lam, root_a, root_b, scaled_base_a, scaled_base_b, mixed]
    return CvxpyLayer(problem, parameters=parameters, variables=[a, b])


def _cvxpylayers_qp(
    mixed: Tensor, base_a: Tensor, base_b: Tensor, lam: Tensor, conic_solver: str, solver_args: dict
) -> tuple[Tensor, Tensor]:
    """The QP through cvxpylayers (float64 on the CPU inside, where its conic solvers run)."""
    layer = _qp_layer(mixed.shape[1])
    mixed64, base_a64, base_b64, lam_host = (t.double().cpu() for t in (mixed, base_a, base_b, lam))
    # The layer's equality constraints are infeasible unless each row of `mixed` sums to 1
    # exactly; rows within the input tolerance are renormalised (in float64) first.
    mixed64 = mixed64 / mixed64.sum(-1, keepdim=True)
    # Weights 0 and 1 make sqrt's gradient infinite and the QP degenerate, and their answer is
    # known (below): solve a harmless stand-in on those rows.
    lam64 = torch.where((lam_host > 0) & (lam_host < 1), lam_host, 0.5)
    root_a, root_b = lam64.sqrt(), (1 - lam64).sqrt()
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (mixed, base_a, base_b, lam))):
        # The layer then calls diffcp's solve-only entry point, which rejects backward options.
        solver_args = {key: value for key, value in solver_args.items() if key != "n_jobs_backward"}
    a, b = layer(
        lam64,
        1 - lam64,
        root_a,
        root_b,
        root_a[:, None] * base_a64,
        root_b[:, None] * base_b64,
        mixed64,
        solver_args={"solve_method": conic_solver, **solver_args},
    )
    # A side of full weight is the mixed output itself (the other side keeps its base later).
    a = torch.where((lam_host == 1)[:, None], mixed64, a)
    b = torch.where((lam_host == 0)[:, None], mixed64, b)
    return a.to(mixed.device, mixed.dtype), b.to(mixed.device, mixed.dtype)
