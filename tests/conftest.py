import os

import pytest
import torch

# Triton reads TRITON_INTERPRET once, when it is first imported. Without CUDA, choose its
# interpreter here, before any test module imports it, so that the fused kernels run on CPU
# tensors (slowly) and their tests run everywhere; with CUDA they run compiled. Subprocesses
# that should run plainly drop the variable from their environment.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI has 2 cores: keep property tests short but meaningful, and the same draws on every run
# (derandomize), so that a red CI means a change broke something. New draws come from
# "thorough", the local deep run (HYPOTHESIS_PROFILE=thorough python -m pytest): each run
# draws afresh, and what it finds is kept as an @example.
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
# benchmarks/mutation.sh: each mutant reruns the property tests; fewer examples fit one core.
settings.register_profile(
    "mutation", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _kernels_skip_reason(device):
    """Why the fused Triton kernels cannot run on ``device`` here; None when they can."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs CUDA"
    from mkfkit import kernels  # imports Triton, in the mode chosen above

    if kernels.available(device):
        return None
    return (
        f"the fused kernels cannot run on {device} here: Triton is missing, or it was imported "
        "compiled (without TRITON_INTERPRET=1) on a machine without CUDA"
    )


def _on(device, reason):
    return pytest.param(device, marks=() if reason is None else pytest.mark.skip(reason=reason))


def pytest_generate_tests(metafunc):
    # `device` runs on every available device; CUDA-only cases skip cleanly without one.
    if "device" in metafunc.fixturenames:
        reason = None if torch.cuda.is_available() else "needs CUDA"
        metafunc.parametrize("device", [_on("cpu", None), _on("cuda", reason)])
    # `kernel_device`: where the fused kernels run (CUDA compiled, CPU under the interpreter).
    if "kernel_device" in metafunc.fixturenames:
        metafunc.parametrize(
            "kernel_device", [_on(device, _kernels_skip_reason(device)) for device in ("cpu", "cuda")]
        )


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """A block's ``backend``: the torch path, and the fused Triton kernels where they can run
    on the test's ``device`` (the CPU when it has none)."""
    if request.param == "triton":
        device = request.getfixturevalue("device") if "device" in request.fixturenames else "cpu"
        reason = _kernels_skip_reason(device)
        if reason is not None:
            pytest.skip(reason)
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
