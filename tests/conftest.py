import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# CI has 2 cores: keep property tests short but meaningful; "thorough" for local deep runs.
settings.register_profile(
    "ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_generate_tests(metafunc):
    # `device` runs on every available device; CUDA-only cases skip cleanly without one.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            [
                "cpu",
                pytest.param(
                    "cuda",
                    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
                ),
            ],
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
