import pytest
import torch

import mkfkit
from mkfkit import _checks


def test_in_range_number_message():
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 1.3"):
        _checks.check_in_range(1.3, "lam", 0.0, 1.0)


def test_in_range_tensor_message_and_nan():
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got -0.5"):
        _checks.check_in_range(torch.tensor([0.2, -0.5]), "lam", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got nan"):
        _checks.check_in_range(torch.tensor([float("nan")]), "lam", 0.0, 1.0)


def test_value_checks_switch():
    bad = torch.tensor([2.0])
    with mkfkit.value_checks(False):
        _checks.check_in_range(bad, "lam", 0.0, 1.0)  # skipped: no host sync
    with pytest.raises(ValueError):
        _checks.check_in_range(bad, "lam", 0.0, 1.0)


def test_shape_and_type_messages():
    with pytest.raises(ValueError, match=r"`x` must be a Tensor\[B, C\], but got shape \(3,\)"):
        _checks.check_shape(torch.zeros(3), "x", (None, None), "Tensor[B, C]")
    with pytest.raises(TypeError, match=r"`x` must be a torch.Tensor, but got 3 \(int\)"):
        _checks.check_tensor(3, "x")
    with pytest.raises(TypeError, match=r"`i` must have an integer dtype, but got torch.float32"):
        _checks.check_index(torch.zeros(2), "i", 5)
    with pytest.raises(ValueError, match=r"`i` must hold indices in \[0, 4\], but got 5"):
        _checks.check_index(torch.tensor([0, 5]), "i", 5)


def test_distribution_rows():
    _checks.check_distribution_rows(torch.full((2, 4), 0.25), "p")
    with pytest.raises(ValueError, match=r"`p` must hold probability rows \(each summing to 1"):
        _checks.check_distribution_rows(torch.full((2, 4), 0.5), "p")
    with pytest.raises(ValueError, match=r"`p` must be finite, but got 1 NaN/Inf entries"):
        _checks.check_distribution_rows(torch.tensor([[float("inf"), 0.0]]), "p")


def test_as_lam_broadcasts_number_and_checks_tensor():
    like = torch.zeros(3, 2, dtype=torch.float64)
    lam = _checks.as_lam(0.25, 3, like)
    assert lam.dtype == torch.float64 and lam.tolist() == [0.25] * 3
    with pytest.raises(ValueError, match=r"`lam` must be a number or Tensor\[B\] with B = 3"):
        _checks.as_lam(torch.zeros(2), 3, like)
