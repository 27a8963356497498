import types

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


def test_in_range_tensor_entries_must_be_finite_even_in_an_unbounded_interval():
    with pytest.raises(ValueError, match=r"`weight` must lie in \[0, inf\], but got inf"):
        _checks.check_in_range(torch.tensor([1.0, float("inf")]), "weight", 0.0, float("inf"))
    _checks.check_in_range(torch.tensor([0.0, 3.0]), "weight", 0.0, float("inf"))


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
    lam = _checks.as_lam(0.25, 3, torch.device("cpu"), torch.float64)
    assert lam.dtype == torch.float64 and lam.tolist() == [0.25] * 3
    assert _checks.as_lam(torch.tensor(0.5), 2, torch.device("cpu"), torch.float32).tolist() == [0.5] * 2
    with pytest.raises(ValueError, match=r"`lam` must be a number or Tensor\[B\] with B = 3"):
        _checks.as_lam(torch.zeros(2), 3, torch.device("cpu"), torch.float64)
    with pytest.raises(ValueError, match=r"`lam` must be on cpu, the device of the batch, but got meta"):
        _checks.as_lam(torch.zeros(3, device="meta"), 3, torch.device("cpu"), torch.float32)


def test_tensor_list_returns_a_list_of_the_same_tensors():
    a, b = torch.zeros(2, 3), torch.ones(2, 3)
    checked = _checks.check_tensor_list((a, b), "xs", "Tensor[B, K]", 2, same="shape")
    assert isinstance(checked, list) and len(checked) == 2
    assert checked[0] is a and checked[1] is b
    # any_iterable accepts a generator; without spec only the container and count are checked
    generated = _checks.check_tensor_list((t for t in (a, b)), "xs", any_iterable=True)
    assert generated[0] is a and generated[1] is b
    assert _checks.check_tensor_list([torch.zeros(3, dtype=torch.long)], "xs", count=1)[0].dtype == torch.long


def test_tensor_list_container_and_count_messages():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"`xs` must be a list or tuple of tensors, but got Tensor"):
        _checks.check_tensor_list(x, "xs")
    with pytest.raises(TypeError, match=r"`xs` must be a list or tuple of Tensor\[B, K\], but got"):
        _checks.check_tensor_list((t for t in [x]), "xs", "Tensor[B, K]", 2)
    with pytest.raises(TypeError, match=r"`xs` must be a sequence of tensors, but got 3 \(int\)"):
        _checks.check_tensor_list(3, "xs", any_iterable=True)
    with pytest.raises(ValueError, match=r"`xs` must hold at least one tensor, but got 0"):
        _checks.check_tensor_list([], "xs")
    with pytest.raises(ValueError, match=r"`xs` must hold at least 3 maps, but got 2"):
        _checks.check_tensor_list([x, x], "xs", item="map", minimum=3)
    with pytest.raises(ValueError, match=r"`xs` must hold one tensor per head \(2\), but got 1"):
        _checks.check_tensor_list([x], "xs", count=2, per="head")


def test_tensor_list_entry_messages():
    x = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"`xs\[1\]` must be a torch.Tensor, but got 1.0 \(float\)"):
        _checks.check_tensor_list([x, 1.0], "xs", "Tensor[B, K]", 2)
    with pytest.raises(TypeError, match=r"`xs\[0\]` must have a floating-point dtype, but got torch.int64"):
        _checks.check_tensor_list([x.long()], "xs", "Tensor[B, K]", 2)
    with pytest.raises(ValueError, match=r"`xs\[1\]` must be a Tensor\[B, K\], but got shape \(3,\)"):
        _checks.check_tensor_list([x, x[0]], "xs", "Tensor[B, K]", 2)
    with pytest.raises(ValueError, match=r"`xs\[1\]` must have the shape of `xs\[0\]` \(2, 3\), but got \(2, 4\)"):
        _checks.check_tensor_list([x, torch.zeros(2, 4)], "xs", "Tensor[B, K]", 2, same="shape")
    with pytest.raises(ValueError, match=r"`xs\[1\]` must have the batch size of `xs\[0\]` \(2\), but got 5"):
        _checks.check_tensor_list([x, torch.zeros(5, 4)], "xs", "Tensor[B, K]", 2, same="batch")
    # same="batch" lets the other sizes differ; same=None lets the batch size differ too
    assert len(_checks.check_tensor_list([x, torch.zeros(2, 4)], "xs", "Tensor[B, K]", 2, same="batch")) == 2
    assert len(_checks.check_tensor_list([x, torch.zeros(5, 4)], "xs", "Tensor[B, K]", 2)) == 2
    with pytest.raises(ValueError, match=r"`same` must be one of None, 'batch', 'shape', but got 'size'"):
        _checks.check_tensor_list([x], "xs", "Tensor[B, K]", 2, same="size")


def test_tensor_list_device_message():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"`xs\[1\]` must be on the device of `xs\[0\]` \(cpu\), but got meta"):
        _checks.check_tensor_list([x, x.to("meta")], "xs", "Tensor[B, K]", 2, same="shape")


def test_numpy_scalars_are_numbers_and_ints():
    np = pytest.importorskip("numpy")
    assert _checks.check_number(np.float32(0.5), "lam") == 0.5
    assert type(_checks.check_number(np.int64(3), "x")) is float
    _checks.check_in_range(np.float64(0.25), "lam", 0.0, 1.0)
    size = _checks.check_positive_int(np.int64(10), "num_samples")
    assert size == 10 and type(size) is int
    assert _checks.check_positive_int(np.uint8(0), "warmup_steps", minimum=0) == 0
    with pytest.raises(TypeError, match=r"`flag` must be a number, but got True \(bool\)"):
        _checks.check_number(True, "flag")
    with pytest.raises(TypeError, match=r"`flag` must be a number, but got .*True.* \(bool_?\)"):
        _checks.check_number(np.bool_(True), "flag")
    with pytest.raises(TypeError, match=r"`n` must be an int, but got .*3.0.* \(float64\)"):
        _checks.check_positive_int(np.float64(3.0), "n")
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 1.5"):
        _checks.as_lam(np.float32(1.5), 2, torch.device("cpu"), torch.float32)


def test_messages_show_enough_digits_to_see_the_fault():
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 1.000001$"):
        _checks.check_in_range(1 + 1e-6, "lam", 0.0, 1.0)
    with pytest.raises(ValueError, match=r"but got 1.0000000000000002$"):
        _checks.check_in_range(1 + 2**-52, "lam", 0.0, 1.0)
    # a float32 entry prints as float32, not with the digits of its float64 widening
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 1.0000001$"):
        _checks.check_in_range(torch.tensor([0.5, 1.0000001]), "lam", 0.0, 1.0)
    assert _checks.format_number(1.3) == "1.3" and _checks.format_number(2.0) == "2"
    assert _checks.format_number(torch.tensor(1.3).item(), torch.float32) == "1.3"
    assert _checks.format_number(float("-inf")) == "-inf"


@pytest.mark.parametrize(
    "dtype, tolerance", [(torch.float32, 1e-3), (torch.float64, 1e-3), (torch.bfloat16, 2**-6), (torch.float16, 2e-3)]
)
def test_distribution_tolerance_follows_the_dtype(dtype, tolerance):
    assert _checks.distribution_tolerance(dtype) == pytest.approx(tolerance, rel=0.03)
    row_sum = 1 + 0.9 * tolerance
    _checks.check_distribution_rows(torch.tensor([[row_sum, 0.0]], dtype=dtype), "p")
    with pytest.raises(ValueError, match=r"`p` must hold probability rows \(each summing to 1 within"):
        _checks.check_distribution_rows(torch.tensor([[1 + 3 * tolerance, 0.0]], dtype=dtype), "p")


def test_a_device_named_without_index_resolves_to_the_one_it_means():
    from mkfkit._devices import resolved

    assert resolved("cpu") == torch.device("cpu") and resolved(torch.device("meta")) == torch.device("meta")
    if torch.cuda.is_available():
        assert resolved("cuda") == torch.zeros(1, device="cuda").device
        assert resolved("cuda:0") == torch.device("cuda", 0)


# What each check must tell apart, beyond the messages above (the survivors of mutation
# testing: RESULTS, "Mutation testing").


def test_value_checks_are_skipped_while_compiling_and_while_capturing_a_cuda_graph(monkeypatch):
    nan = torch.tensor([float("nan")])
    assert _checks.value_checks_enabled(nan)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _checks.value_checks_enabled(nan)
    _checks.check_finite(nan, "x")  # no host synchronisation while tracing
    monkeypatch.undo()
    # capture: only for CUDA tensors (a stand-in: value_checks_enabled reads only `is_meta` and
    # `is_cuda`)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert _checks.value_checks_enabled(nan)
    assert not _checks.value_checks_enabled(nan, types.SimpleNamespace(is_meta=False, is_cuda=True))


def test_format_number_stops_at_the_first_length_that_reads_back_in_the_dtype():
    # six digits are enough for this bfloat16 value; seven would print "1.007812"
    assert _checks.format_number(1.0078125, torch.bfloat16) == "1.00781"
    # a float32 value checked as float64 needs all of its float64 digits
    assert _checks.format_number(torch.tensor(1.3).item(), torch.float64) == "1.2999999523162842"


def test_integer_shape_and_dtype_checks_name_the_argument():
    with pytest.raises(TypeError, match=r"^`ids` must be a torch.Tensor, but got \[1\] \(list\)$"):
        _checks.check_integer([1], "ids")
    with pytest.raises(TypeError, match=r"^`ids` must have an integer dtype, but got torch.bool$"):
        _checks.check_integer(torch.tensor([True]), "ids")
    assert _checks.check_integer(torch.tensor([1], dtype=torch.uint8), "ids").dtype == torch.uint8
    with pytest.raises(TypeError, match=r"^`x` must be a torch.Tensor, but got 3 \(int\)$"):
        _checks.check_shape(3, "x", (None,), "Tensor[B]")
    with pytest.raises(TypeError, match=r"^`b` must have the dtype of `a` \(torch.float32\), but got "
                       r"torch.float64$"):
        _checks.check_same_dtype(torch.zeros(1, dtype=torch.float64), "b", torch.zeros(1), "a")


def test_check_finite_counts_the_bad_entries_and_passes_finite_ones():
    _checks.check_finite(torch.tensor([0.0, -1.0, 3.0]), "x")
    with pytest.raises(ValueError, match=r"^`x` must be finite, but got 2 NaN/Inf entries$"):
        _checks.check_finite(torch.tensor([0.0, float("nan"), 1.0, float("-inf"), 2.0]), "x")
    with mkfkit.value_checks(False):
        _checks.check_finite(torch.tensor([float("nan")]), "x")


@pytest.mark.parametrize("bound, low_open, high_open, interval",
                         [(0.0, True, False, r"\(0, 1\]"), (1.0, False, True, r"\[0, 1\)")])
def test_open_bounds_exclude_their_end_in_tensors(bound, low_open, high_open, interval):
    entries = torch.tensor([0.5, bound])
    with pytest.raises(ValueError, match=rf"^`p` must lie in {interval}, but got {bound:g}$"):
        _checks.check_in_range(entries, "p", 0.0, 1.0, low_open=low_open, high_open=high_open)
    _checks.check_in_range(entries, "p", 0.0, 1.0)  # closed: the end belongs to the interval


def test_out_of_range_entries_print_in_their_own_dtype():
    with pytest.raises(ValueError, match=r"but got 1.00781$"):
        _checks.check_in_range(torch.tensor([1.0078125], dtype=torch.bfloat16), "p", 0.0, 1.0)


def test_check_device_takes_devices_strings_and_indices_but_not_bools():
    assert _checks.check_device("cpu", "device") == torch.device("cpu")
    assert _checks.check_device(torch.device("meta"), "device") == torch.device("meta")
    assert _checks.check_device(1, "device") == torch.device(1)
    with pytest.raises(ValueError, match=r"^`device` must be a torch.device or a device string such "
                       r"as 'cpu' or 'cuda:0', but got True \(bool\)$"):
        _checks.check_device(True, "device")


def test_distribution_rows_sum_in_float64_and_report_the_worst_row_in_their_dtype():
    # bfloat16 would round this row's sum 1.0186 to 1.015625, exactly at the tolerance 2 eps
    with pytest.raises(ValueError, match=r"but got a row summing to 1.0185546875$"):
        _checks.check_distribution_rows(torch.tensor([[1.0, 0.0186]], dtype=torch.bfloat16), "p")
    with pytest.raises(ValueError, match=r"^`p` must hold probability rows \(entries >= 0\), but got an "
                       r"entry -0.0185547$"):
        _checks.check_distribution_rows(torch.tensor([[1.0186, -0.0186]], dtype=torch.bfloat16), "p")
    _checks.check_distribution_rows(torch.tensor([[-0.001, 1.001]], dtype=torch.float64), "p")  # = -atol
    # a float32 row's sum prints as float32 (1.1), not as its float64 widening
    with pytest.raises(ValueError, match=r"summing to 1.1$"):
        _checks.check_distribution_rows(torch.tensor([[0.5, 0.6]]), "p")


@pytest.mark.parametrize("sums, worst", [((1.125, 0.875), "1.125"), ((1.0078125, 0.875), "0.875"),
                                         ((1.125, 0.9921875), "1.125")])
def test_distribution_rows_report_the_row_furthest_from_one(sums, worst):
    rows = torch.tensor([[0.5, total - 0.5] for total in sums], dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"but got a row summing to {worst}$"):
        _checks.check_distribution_rows(rows, "p")


def test_index_shape_messages_and_a_single_bad_index():
    with pytest.raises(ValueError, match=r"^`i` must be a Tensor\[B\], but got shape \(2, 2\)$"):
        _checks.check_index(torch.zeros(2, 2, dtype=torch.long), "i", 5)
    with pytest.raises(ValueError, match=r"^`i` must be a Tensor\[B\] with B = 3, but got shape \(2,\)$"):
        _checks.check_index(torch.zeros(2, dtype=torch.long), "i", 5, length=3)
    with pytest.raises(ValueError, match=r"^`i` must hold indices in \[0, 2\], but got 5$"):
        _checks.check_index(torch.tensor([5]), "i", 3)


def test_as_lam_names_its_argument_casts_and_builds_on_the_batch_device():
    cpu = torch.device("cpu")
    with pytest.raises(TypeError, match=r"^`weights` must have a floating-point dtype, but got torch.int64$"):
        _checks.as_lam(torch.zeros(2, dtype=torch.long), 2, cpu, torch.float32, name="weights")
    with pytest.raises(ValueError, match=r"^`weights` must lie in \[0, 1\], but got 1.5$"):
        _checks.as_lam(torch.tensor([0.5, 1.5]), 2, cpu, torch.float32, name="weights")
    cast = _checks.as_lam(torch.tensor([0.25, 1.0], dtype=torch.float64), 2, cpu, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and cast.tolist() == [0.25, 1.0]
    meta = torch.device("meta")
    assert _checks.as_lam(0.5, 3, meta, torch.float32).device == meta


def test_state_keys_message_lists_missing_and_unexpected_entries():
    with pytest.raises(ValueError, match=r"^`state` must hold exactly the entries \['a', 'b'\], but got "
                       r"missing \['b'\] and unexpected \['z'\]$"):
        _checks.check_state_keys({"a": 1, "z": 2}, "state", ["a", "b"])


def test_generator_state_is_checked_and_returned_as_a_copy():
    with pytest.raises(TypeError, match=r"^`state` must be a uint8 Tensor\[N\] from "
                       r"torch.Generator.get_state\(\), but got Tensor of shape \(3,\), dtype torch.float32 "
                       r"on cpu$"):
        _checks.check_generator_state(torch.zeros(3), "state")
    state = torch.Generator().manual_seed(1).get_state()
    checked = _checks.check_generator_state(state, "state")
    assert torch.equal(checked, state) and checked.data_ptr() != state.data_ptr()


def test_value_checks_skip_meta_tensors_and_a_meta_generator_state_is_refused():
    # A meta tensor holds no values to check (nor to read: torch would raise a bare error).
    out_of_range = torch.full((1, 2), 2.0, device="meta")
    assert not _checks.value_checks_enabled(out_of_range, torch.zeros(1))
    _checks.check_in_range(out_of_range, "p", 0.0, 1.0)
    _checks.check_finite(out_of_range, "p")
    _checks.check_distribution_rows(out_of_range, "p")
    _checks.check_index(torch.full((2,), 9, device="meta"), "i", 3)
    with pytest.raises(ValueError, match=r"^`i` must be a Tensor\[B\], but got shape \(1, 2\)$"):
        _checks.check_index(out_of_range.long(), "i", 3)  # shapes are still checked
    meta_state = torch.Generator().get_state().to("meta")
    with pytest.raises(ValueError, match=r"^`state` must be a CPU torch.Generator state, but got one on the "
                       r"meta device, which holds no values$"):
        _checks.check_generator_state(meta_state, "state")
