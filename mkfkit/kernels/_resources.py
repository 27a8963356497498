"""What the fused kernels compile to on real GPUs, found without one.

For a shape and dtype, :func:`launches` runs the kernels' own launchers (:mod:`mkfkit.kernels.qp`,
:mod:`mkfkit.kernels.bank`) on meta tensors, with each kernel swapped for a recorder, so the
launch rules and argument lists are the launchers' own: every :class:`Launch` is what that call
would launch on a GPU (grid, argument types, constexprs, warps). :func:`build` compiles a launch
ahead of time with Triton's compiler for a ``GPUTarget`` (sm_80, sm_90) and reads the
registers, spills and stack from the report of the ``ptxas`` that Triton runs (``-v``), and the
shared memory from the compiled kernel's metadata. :func:`occupancy` and :func:`traffic` turn
those into resident warps per SM and bytes moved.

Used by ``benchmarks/bench_kernels.py`` (and through it by tests/test_kernels_compile.py). It
needs Triton imported as a compiler: under ``TRITON_INTERPRET=1`` the kernels are interpreted
functions, which Triton cannot compile (:func:`unavailable` says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import math
import re
from typing import Callable, List, Optional, Tuple

import torch

from mkfkit.kernels import _import

__all__ = ["ARCHS", "GPUS", "GPU", "Launch", "Resources", "unavailable", "launches", "build",
           "calls", "occupancy", "traffic"]

# Compute capabilities built for: A100 (sm_80) and H100/H200 (sm_90).
ARCHS = (80, 90)


@dataclasses.dataclass(frozen=True)
class GPU:
    """The figures of one GPU that static occupancy and the traffic floor need.

    Per-SM limits are NVIDIA's (CUDA C++ Programming Guide, "Technical Specifications per
    Compute Capability"; the A100 and H100 whitepapers): 64K 32-bit registers, 64 resident
    warps, 32 resident blocks, registers allocated per warp in units of 256, and the shared
    memory one SM can give its blocks (1 KB of it reserved per block). Bandwidth is the
    datasheet's peak HBM bandwidth.
    """

    name: str
    arch: int
    sms: int
    bandwidth: float  # bytes/s
    shared_per_sm: int  # bytes usable by blocks
    registers_per_sm: int = 65536
    warps_per_sm: int = 64
    blocks_per_sm: int = 32


GPUS = (
    GPU("H100 SXM", 90, sms=132, bandwidth=3.35e12, shared_per_sm=228 * 1024),
    GPU("A100 80GB SXM", 80, sms=108, bandwidth=2.0e12, shared_per_sm=164 * 1024),
)


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as Triton would compile it: the kernel, its grid, the type (and
    alignment hint) of every runtime argument, the constexprs and the compile options."""

    name: str  # of the call, as :func:`calls` names it
    kernel: str
    grid: int
    signature: Tuple[Tuple[str, str], ...]
    hints: Tuple[int, ...]  # indices of the arguments Triton marks 16-byte divisible
    constexprs: Tuple[Tuple[str, object], ...]
    num_warps: int
    options: Tuple[Tuple[str, object], ...]
    shape: Tuple[int, int]  # (B, C) of the call
    dtype: torch.dtype

    @property
    def config(self) -> tuple:
        """What the compiled binary depends on: equal configs compile to the same kernel."""
        return self.kernel, self.signature, self.hints, self.constexprs, self.num_warps, self.options


@dataclasses.dataclass(frozen=True)
class Resources:
    """What ``ptxas -v`` reports for one compiled kernel, and its shared memory."""

    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    num_warps: int
    num_stages: int


def unavailable() -> Optional[str]:
    """Why kernels cannot be built ahead of time on this machine; None when they can (in a
    process that imports Triton as a compiler: see :func:`launches`)."""
    if _import.triton is None:
        return "Triton is not installed"
    from triton import knobs

    try:
        knobs.nvidia.ptxas  # finds ptxas (TRITON_PTXAS_PATH, else the wheel's) and runs it
    except RuntimeError as error:
        return f"Triton's ptxas cannot run here ({error}; TRITON_PTXAS_PATH names one)"
    return None


# ---------------------------------------------------------------------------------- recording


class _Recorder:
    """Stands in for a kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls: List[tuple]) -> None:
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid: Tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.calls.append((self.fn, grid, args, kwargs))


@contextlib.contextmanager
def _recording(calls: List[tuple]):
    from mkfkit.kernels import bank, qp

    kernels = [(module, name) for module in (qp, bank) for name in dir(module)
               if name.endswith("_kernel") and isinstance(getattr(module, name), _import.JITFunction)]
    saved = [getattr(module, name) for module, name in kernels]
    try:
        for (module, name), fn in zip(kernels, saved):
            setattr(module, name, _Recorder(fn, calls))
        yield
    finally:
        for (module, name), fn in zip(kernels, saved):
            setattr(module, name, fn)


def _launch(name: str, fn, grid: Tuple[int, ...], args: tuple, kwargs: dict, shape: Tuple[int, int],
            dtype: torch.dtype) -> Launch:
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    bound = dict(zip(fn.arg_names, args), **kwargs)
    signature, hints, constexprs = [], [], []
    for index, param in enumerate(fn.params):
        value = bound.pop(param.name)
        if param.is_constexpr:
            constexprs.append((param.name, value))
            continue
        # As the JIT specialises a launch: tensors on their 16-byte alignment (a CUDA
        # allocation always has it). Integers are built unspecialised: Triton also builds
        # variants for a value of 1 and for multiples of 16, which differ in address arithmetic.
        tensor = isinstance(value, torch.Tensor)
        kind, hint = native_specialize_impl(BaseBackend, value, False, tensor, tensor)
        signature.append((param.name, kind))
        if hint == "D":
            hints.append(index)
    num_warps = bound.pop("num_warps", 4)
    return Launch(name, fn.__name__, math.prod(grid), tuple(signature), tuple(hints), tuple(constexprs),
                  num_warps, tuple(sorted(bound.items())), shape, dtype)


def calls(n_rows: int, n_cols: int, dtype: torch.dtype,
          device: torch.device | str) -> List[Tuple[str, Callable[[], object]]]:
    """Every launch the fused kernels make for a batch of ``n_rows`` rows of ``n_cols`` classes
    in ``dtype``, as ``(name, call)`` on inputs made on ``device`` (probability rows, distinct
    bank rows): the QP fraction's forward (plain and counting its passes) and backward, and
    for a bank stored in ``dtype`` (float32, bfloat16, float16; not float64) its three reads
    (one row, both rows, the composite) and its write-back (all entries valid, or some).
    Each call runs one launcher of :mod:`mkfkit.kernels.qp` or :mod:`mkfkit.kernels.bank`."""
    from mkfkit.kernels import bank, qp

    def rows() -> torch.Tensor:
        return torch.randn(n_rows, n_cols, device=device).softmax(-1).to(dtype)

    mixed, base_a, base_b = rows(), rows(), rows()
    lam = torch.rand(n_rows, device=device).to(dtype)
    tau = qp._launch_forward(mixed, base_a, base_b, lam)[2]
    grads = [torch.randn(n_rows, n_cols, device=device).to(dtype) for _ in range(2)]
    found = [
        ("qp forward", lambda: qp._launch_forward(mixed, base_a, base_b, lam)),
        ("qp forward, counting", lambda: qp._launch_forward(mixed, base_a, base_b, lam, True)),
        ("qp backward", lambda: qp._launch_backward(*grads, mixed, base_a, base_b, lam, tau)),
    ]
    if dtype != torch.float64:
        store, seen = rows(), torch.rand(n_rows, device=device) < 0.5
        index_a, index_b = (torch.randperm(n_rows, device=device) for _ in range(2))
        weight = torch.rand(n_rows, device=device)
        estimates, valid = rows().float(), torch.rand(n_rows, device=device) < 0.9
        found += [
            ("bank read", lambda: bank.read(store, seen, index_a)),
            ("bank read, pairs", lambda: bank.read(store, seen, index_a, index_b)),
            ("bank read, mixed", lambda: bank.read(store, seen, index_a, index_b, weight)),
            ("bank write", lambda: bank.write(store, seen, index_a, estimates, None, 0.9)),
            ("bank write, some valid", lambda: bank.write(store, seen, index_a, estimates, valid, 0.9)),
        ]
    return found


def launches(n_rows: int, n_cols: int, dtype: torch.dtype) -> List[Launch]:
    """The launch of every call of :func:`calls`, recorded on meta tensors (nothing runs)."""
    if _import.INTERPRETED:
        raise RuntimeError("the kernels' launches are recorded to be compiled, but Triton was "
                           "imported as its interpreter (TRITON_INTERPRET=1); unset it")
    found: List[Launch] = []
    recorded: List[tuple] = []
    with _recording(recorded):
        for name, call in calls(n_rows, n_cols, dtype, "meta"):
            recorded.clear()
            call()
            (fn, grid, args, kwargs), = recorded
            found.append(_launch(name, fn, grid, args, kwargs, (n_rows, n_cols), dtype))
    return found


# ------------------------------------------------------------------------------------ building

_PTXAS_REPORT = re.compile(
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?Used (?P<registers>\d+) registers", re.S)


@functools.lru_cache(maxsize=None)
def build(config: tuple, arch: int) -> Resources:
    """Compile the launch ``config`` (:attr:`Launch.config`) for compute capability ``arch``.

    Triton's compiler runs as at a launch on that GPU; its ``ptxas`` prints its ``-v`` report
    (``TRITON_DUMP_PTXAS_LOG``), read here. Always compiled afresh, so that the report exists
    even where Triton's cache holds the kernel; cached per process.
    """
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from mkfkit.kernels import bank, qp

    name, signature, hints, constexprs, num_warps, options = config
    fn = next(getattr(module, name) for module in (qp, bank) if hasattr(module, name))
    source = ASTSource(fn, dict(signature, **{key: "constexpr" for key, _ in constexprs}),
                       dict(constexprs), {(index,): [["tt.divisibility", 16]] for index in hints})
    report = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(report):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options=dict(options, num_warps=num_warps))
    found = _PTXAS_REPORT.search(report.getvalue())
    if found is None:
        raise RuntimeError(f"no ptxas report for {name} on sm_{arch}:\n{report.getvalue()}")
    return Resources(int(found["registers"]), int(found["stores"]), int(found["loads"]),
                     int(found["stack"]), kernel.metadata.shared, kernel.metadata.num_warps,
                     kernel.metadata.num_stages)


# ---------------------------------------------------------------------------------- the figures


def occupancy(resources: Resources, gpu: GPU) -> int:
    """Programs of this kernel that one SM of ``gpu`` holds at once (static occupancy)."""
    warp_registers = math.ceil(resources.registers * 32 / 256) * 256
    by_registers = gpu.registers_per_sm // (warp_registers * resources.num_warps)
    by_shared = gpu.shared_per_sm // (resources.shared + 1024)
    return min(by_registers, by_shared, gpu.warps_per_sm // resources.num_warps, gpu.blocks_per_sm)


def traffic(launch: Launch) -> Tuple[int, int]:
    """Bytes the launch must read and write at the least (each element once; the bank's rows
    taken as distinct), as ``(read, written)``."""
    n_rows, n_cols = launch.shape
    size = torch.empty(0, dtype=launch.dtype).element_size()
    compute = 8 if launch.dtype == torch.float64 else 4
    constexprs = dict(launch.constexprs)
    table = n_rows * n_cols
    if launch.kernel == "_qp_fraction_fwd_kernel":
        counted = 4 * n_rows if constexprs["COUNT_ITERATIONS"] else 0
        return 3 * table * size + n_rows * size, 2 * table * size + 2 * n_rows * compute + counted
    if launch.kernel == "_qp_fraction_bwd_kernel":
        return 5 * table * size + n_rows * (size + 2 * compute), 3 * table * size + n_rows * size
    if launch.kernel == "_read_kernel":
        sides = 1 + constexprs["HAS_B"]
        read = sides * (table * size + n_rows * 9) + (4 * n_rows if constexprs["MIX"] else 0)
        written = (1 if constexprs["MIX"] else sides) * table * 4 + sides * n_rows
        return read, written
    if launch.kernel == "_write_kernel":
        # Sorted rows and order (int64), validity, the estimates, the old rows and seen flags.
        read = n_rows * 16 + (0 if constexprs["ALL_VALID"] else n_rows) + table * (4 + size) + n_rows
        return read, table * size + n_rows
    raise ValueError(f"`launch.kernel` must be a kernel of mkfkit.kernels, but got {launch.kernel}")
