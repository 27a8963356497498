import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mkfkit.distill import KDLoss, kd_loss


def reference_kd(student, teacher, temperature, teacher_kind, weight=None):
    """Hand-written KL(teacher || student) * T^2 in Python floats: (batchmean value, per-row list)."""
    per_row = []
    for b in range(student.shape[0]):
        scaled = [float(v) / temperature for v in student[b]]
        top = max(scaled)
        log_norm = top + math.log(sum(math.exp(v - top) for v in scaled))
        log_q = [v - log_norm for v in scaled]
        if teacher_kind == "logits":
            t = [float(v) / temperature for v in teacher[b]]
            t_top = max(t)
            expd = [math.exp(v - t_top) for v in t]
        else:
            expd = [float(v) ** (1.0 / temperature) if float(v) > 0 else 0.0 for v in teacher[b]]
        p = [v / sum(expd) for v in expd]
        kl = sum(pc * (math.log(pc) - lq) for pc, lq in zip(p, log_q) if pc > 0)
        w = 1.0 if weight is None else float(weight[b])
        per_row.append(w * kl * temperature**2)
    rows = student.shape[0] if weight is None else sum(float(w) != 0 for w in weight)
    return sum(per_row) / max(rows, 1), per_row


def random_probs(batch, classes, dtype, device, zeros=True):
    probs = torch.rand(batch, classes, dtype=dtype, device=device)
    if zeros:
        probs[:, 0] = 0  # zero-probability entries must not produce NaN
    return probs / probs.sum(1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("teacher_kind", ["logits", "probs"])
@pytest.mark.parametrize("temperature", [1.0, 3.0, 0.5])
@pytest.mark.parametrize("weighting", [None, "mask", "float"])
def test_matches_hand_computed_kl(device, dtype, teacher_kind, temperature, weighting):
    student = torch.randn(6, 5, dtype=dtype, device=device) * 3
    if teacher_kind == "logits":
        teacher = torch.randn(6, 5, dtype=dtype, device=device) * 3
    else:
        teacher = random_probs(6, 5, dtype, device)
    weight = None
    if weighting == "mask":
        weight = torch.tensor([True, False, True, True, False, True], device=device)
    elif weighting == "float":
        weight = torch.tensor([0.5, 0.0, 1.0, 2.0, 0.25, 0.0], dtype=dtype, device=device)
    expected, per_row = reference_kd(student.cpu(), teacher.cpu(), temperature, teacher_kind, weight)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    got = kd_loss(student, teacher, temperature, teacher_kind=teacher_kind, weight=weight)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu(), torch.tensor(expected, dtype=dtype), **tol)
    rows = kd_loss(student, teacher, temperature, teacher_kind=teacher_kind, weight=weight, reduction="none")
    torch.testing.assert_close(rows.cpu(), torch.tensor(per_row, dtype=dtype), **tol)
    summed = kd_loss(student, teacher, temperature, teacher_kind=teacher_kind, weight=weight, reduction="sum")
    torch.testing.assert_close(summed.cpu(), torch.tensor(sum(per_row), dtype=dtype), **tol)


def test_equals_kl_div_batchmean_times_t_squared():
    # The textbook formula; `reduction="mean"` of F.kl_div would be C times smaller (deit#61).
    student, teacher = torch.randn(8, 10), torch.randn(8, 10)
    expected = F.kl_div(
        F.log_softmax(student / 4, 1), F.log_softmax(teacher / 4, 1), reduction="batchmean", log_target=True
    ) * 16
    torch.testing.assert_close(kd_loss(student, teacher, 4.0, teacher_kind="logits"), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about exactly this mistake
        wrong = F.kl_div(F.log_softmax(student / 4, 1), F.softmax(teacher / 4, 1), reduction="mean") * 16
    torch.testing.assert_close(wrong * 10, expected)


def test_probs_softening_is_softmax_of_log_probs():
    probs = random_probs(4, 7, torch.float64, "cpu", zeros=False)
    student = torch.randn(4, 7, dtype=torch.float64)
    for temperature in (0.5, 1.0, 2.0, 3.0):
        torch.testing.assert_close(
            kd_loss(student, probs, temperature, teacher_kind="probs"),
            kd_loss(student, probs.log() + 1.7, temperature, teacher_kind="logits"),
        )


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_zero_probability_entries_give_finite_gradients(device, temperature):
    student = torch.randn(3, 4, device=device, requires_grad=True)
    one_hot = F.one_hot(torch.tensor([0, 2, 3], device=device), 4).float().requires_grad_()
    loss = kd_loss(student, one_hot, temperature, teacher_kind="probs", detach_teacher=False)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all() and torch.isfinite(one_hot.grad).all()
    # A logits teacher whose softmax underflows to exact zeros is just as safe.
    extreme = torch.tensor([[0.0, -1e4, 1e4, 0.0]], device=device, requires_grad=True)
    s = torch.zeros(1, 4, device=device, requires_grad=True)
    kd_loss(s, extreme, temperature, teacher_kind="logits", detach_teacher=False).backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(extreme.grad).all()


@pytest.mark.parametrize("temperature", [0.05, 0.25, 0.5])
def test_confident_probability_teacher_below_t1_is_finite_and_exact(temperature):
    # p ** (1 / T) underflows for these rows (1e-30 ** 20 = 0 in float32); the log-space
    # softening keeps the value that the logits kind gives for logits log(p).
    probs = torch.tensor([[1.0 - 1e-6, 1e-6, 0.0], [1e-30, 1.0 - 1e-30, 0.0], [0.5, 0.5, 0.0]])
    student = torch.tensor([[3.0, -2.0, 0.5], [0.0, 1.0, -1.0], [2.0, 2.0, 2.0]], requires_grad=True)
    weight = torch.tensor([1.0, 0.0, 1.0])
    loss = kd_loss(student, probs, temperature, teacher_kind="probs", weight=weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert torch.equal(student.grad[1], torch.zeros(3))  # the masked row adds nothing
    expected, _ = reference_kd(student.detach().double(), probs.double(), temperature, "probs", weight)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


@given(
    temperature=st.one_of(st.floats(1e-30, 1e-3), st.floats(1e-3, 100.0)),
    kind=st.sampled_from(["logits", "probs"]),
    masked=st.booleans(),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_property_finite_and_accurate_at_extreme_temperatures(temperature, kind, masked, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(3, 4, generator=gen) * scale).requires_grad_()
    if kind == "logits":
        teacher = torch.randn(3, 4, generator=gen) * scale
    else:  # one-hot, peaked with a zero, uniform
        teacher = torch.tensor([[1.0, 0, 0, 0], [0.97, 0.03, 0.0, 0.0], [0.25] * 4])
    weight = torch.tensor([not masked, True, masked])
    loss = kd_loss(student, teacher, temperature, teacher_kind=kind, weight=weight)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    exact = kd_loss(student.detach().double(), teacher.double(), temperature, teacher_kind=kind, weight=weight)
    assert exact.item() >= 0
    # float32 carries about eps * T^2 of absolute error (see MAX_TEMPERATURE)
    tolerance = 1e-5 * abs(exact.item()) + 1e-6 * max(1.0, temperature**2)
    assert abs(loss.item() - exact.item()) <= tolerance


def test_bf16_probability_rows_within_their_tolerance_are_accepted():
    # Accepted by the bank and the fractions (2 eps of bf16 = 0.0156): 1.0078 is one ulp off.
    probs = torch.tensor([[0.5, 0.5078125], [0.25, 0.75]], dtype=torch.bfloat16)
    assert float(probs.float().sum(1)[0]) == 1.0078125
    loss = kd_loss(torch.zeros(2, 2), probs, teacher_kind="probs")
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"summing to 1 within 0.015625\), but got a row summing to 1.0625"):
        kd_loss(torch.zeros(1, 2), torch.tensor([[0.5, 0.5625]], dtype=torch.bfloat16), teacher_kind="probs")
    with pytest.raises(ValueError, match=r"within 0.001\), but got a row summing to 1.0078125"):
        kd_loss(torch.zeros(1, 2), probs[:1].float(), teacher_kind="probs")


def test_masked_rows_do_not_dilute_the_loss():
    student, probs = torch.randn(6, 5), random_probs(6, 5, torch.float32, "cpu")
    mask = torch.tensor([True, True, False, False, False, True])
    masked = kd_loss(student, probs, 2.0, teacher_kind="probs", weight=mask)
    only_kept = kd_loss(student[mask], probs[mask], 2.0, teacher_kind="probs")
    torch.testing.assert_close(masked, only_kept)
    # Rows without knowledge may hold anything (e.g. an empty bank row of zeros).
    garbage = probs.clone()
    garbage[~mask] = 1.0 / 5
    torch.testing.assert_close(kd_loss(student, garbage, 2.0, teacher_kind="probs", weight=mask), masked)


def test_all_rows_masked_gives_attached_zero():
    student = torch.randn(3, 4, requires_grad=True)
    loss = kd_loss(student, torch.randn(3, 4), teacher_kind="logits", weight=torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(student.grad, torch.zeros(3, 4))


@pytest.mark.parametrize("kind", ["logits", "probs"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_empty_batch_is_an_attached_zero(kind, reduction):
    student = torch.zeros(0, 3, requires_grad=True)
    loss = kd_loss(student, torch.zeros(0, 3), teacher_kind=kind, reduction=reduction)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert student.grad.shape == (0, 3)
    assert kd_loss(student, torch.zeros(0, 3), teacher_kind=kind, reduction="none").shape == (0,)


def test_teacher_detached_by_default():
    student = torch.randn(2, 3, requires_grad=True)
    teacher = torch.randn(2, 3, requires_grad=True)
    kd_loss(student, teacher, 2.0, teacher_kind="logits").backward()
    assert teacher.grad is None and student.grad is not None
    kd_loss(student, teacher, 2.0, teacher_kind="logits", detach_teacher=False).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


@pytest.mark.parametrize("teacher_kind", ["logits", "probs"])
def test_gradcheck(teacher_kind):
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = (
        torch.randn(3, 4, dtype=torch.float64)
        if teacher_kind == "logits"
        else random_probs(3, 4, torch.float64, "cpu", zeros=False)
    ).requires_grad_()
    weight = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)

    def loss(s, t):
        return kd_loss(s, t, 2.5, teacher_kind=teacher_kind, weight=weight, detach_teacher=False)

    assert torch.autograd.gradcheck(loss, (student, teacher))
    assert torch.autograd.gradgradcheck(loss, (student, teacher))


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_inputs_give_the_float32_value(device, half):
    # D-FINE#361 / torchdistill#386: fp16 logits fed to kl_div give a wrong loss.
    student = (torch.randn(16, 100, device=device) * 8).to(half)
    teacher = (torch.randn(16, 100, device=device) * 8).to(half)
    got = kd_loss(student, teacher, 4.0, teacher_kind="logits")
    assert got.dtype == torch.float32
    expected = kd_loss(student.float(), teacher.float(), 4.0, teacher_kind="logits")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_autocast_bf16_on_cpu():
    layer = torch.nn.Linear(8, 10)
    x, teacher = torch.randn(4, 8), torch.randn(4, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = layer(x)
        assert logits.dtype == torch.bfloat16
        loss = kd_loss(logits, teacher, 3.0, teacher_kind="logits")
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, kd_loss(logits.float(), teacher, 3.0, teacher_kind="logits"))
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


def test_module_equals_functional():
    student, teacher = torch.randn(5, 6), random_probs(5, 6, torch.float32, "cpu")
    weight = torch.tensor([True, False, True, True, True])
    module = KDLoss(2.0, teacher_kind="probs")
    torch.testing.assert_close(
        module(student, teacher, weight), kd_loss(student, teacher, 2.0, teacher_kind="probs", weight=weight)
    )
    assert "teacher_kind='probs'" in repr(module)


@given(
    batch=st.integers(1, 5),
    classes=st.integers(2, 6),
    temperature=st.sampled_from([0.25, 1.0, 2.0, 4.0]),
    shape=st.sampled_from(["one_hot", "uniform", "random"]),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(batch, classes, temperature, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * 5
    if shape == "one_hot":
        probs = F.one_hot(torch.randint(classes, (batch,), generator=gen), classes).double()
    elif shape == "uniform":
        probs = torch.full((batch, classes), 1.0 / classes, dtype=torch.float64)
    else:
        probs = torch.rand(batch, classes, generator=gen, dtype=torch.float64)
        probs /= probs.sum(1, keepdim=True)
    weight = torch.rand(batch, generator=gen, dtype=torch.float64).round()  # 0/1 weights
    expected, _ = reference_kd(student, probs, temperature, "probs", weight)
    got = kd_loss(student, probs, temperature, teacher_kind="probs", weight=weight)
    assert math.isclose(got.item(), expected, rel_tol=1e-9, abs_tol=1e-12)
    assert got.item() >= -1e-12  # KL is non-negative
    if shape == "uniform" and temperature == 1.0:
        # KL(u || q) = -log C - mean(log q)
        log_q = torch.log_softmax(student, 1)
        closed = ((-math.log(classes) - log_q.mean(1)) * weight).sum() / weight.count_nonzero().clamp_min(1)
        assert math.isclose(got.item(), closed.item(), rel_tol=1e-9, abs_tol=1e-12)


def test_errors():
    s, t = torch.randn(2, 3), torch.randn(2, 3)
    with pytest.raises(TypeError, match="teacher_kind"):
        kd_loss(s, t)
    with pytest.raises(ValueError, match=r"`teacher_kind` must be one of 'logits', 'probs', but got 'prob'"):
        kd_loss(s, t, teacher_kind="prob")
    with pytest.raises(ValueError, match=r"`teacher` must have the shape of `student_logits` \(2, 3\)"):
        kd_loss(s, torch.randn(2, 4), teacher_kind="logits")
    with pytest.raises(ValueError, match=r"`student_logits` must be a Tensor\[B, C\], but got shape \(6,\)"):
        kd_loss(s.flatten(), t.flatten(), teacher_kind="logits")
    with pytest.raises(ValueError, match=r"`temperature` must lie in \(0, 100\], but got 0"):
        kd_loss(s, t, 0.0, teacher_kind="logits")
    with pytest.raises(ValueError, match=r"`temperature` must lie in \(0, 100\], but got 100.00001"):
        kd_loss(s, t, 100.00001, teacher_kind="logits")
    with pytest.raises(ValueError, match=r"`student_logits` must have at least one class \(Tensor\[B, C\] with C >= 1\), but got shape \(2, 0\)"):
        kd_loss(torch.zeros(2, 0), torch.zeros(2, 0), teacher_kind="probs")
    with pytest.raises(TypeError, match="`student_logits` must have a floating-point dtype"):
        kd_loss(s.long(), t, teacher_kind="logits")
    with pytest.raises(ValueError, match=r"`weight` must be a Tensor\[B\] with B = 2, but got shape \(3,\)"):
        kd_loss(s, t, teacher_kind="logits", weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"`weight` must lie in \[0, inf\], but got -1"):
        kd_loss(s, t, teacher_kind="logits", weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(TypeError, match="`weight` must have a floating-point dtype"):
        kd_loss(s, t, teacher_kind="logits", weight=torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="`teacher` must hold probability rows"):
        kd_loss(s, t, teacher_kind="probs")
    with pytest.raises(ValueError, match=r"`reduction` must be one of 'batchmean', 'sum', 'none', but got 'mean'"):
        kd_loss(s, t, teacher_kind="logits", reduction="mean")
    with pytest.raises(TypeError, match="teacher_kind"):
        KDLoss(2.0)


def test_a_student_matching_its_teacher_gives_no_negative_loss():
    """Rounding made the float64 KL of a matching row -3.8e-119 (hypothesis found it at
    T = 0.125, logits of scale 30); a KL divergence is never negative."""
    gen = torch.Generator().manual_seed(43314)
    logits = torch.randn(64, 4, generator=gen, dtype=torch.float64) * 30
    for temperature in (0.125, 1.0, 3.0):
        rows = kd_loss(logits, logits, temperature, teacher_kind="logits", reduction="none")
        assert bool((rows >= 0).all()) and float(rows.max()) < 1e-12


@pytest.mark.parametrize("temperature, scale", [(1e-37, 50.0), (0.01, 1e37)])
def test_a_matching_student_costs_nothing_where_logits_over_t_overflow(temperature, scale):
    # Below T = 1 the row maximum is subtracted before the division: the top entry becomes 0,
    # the others -inf at worst, never +inf (inf - inf would be NaN).
    student = torch.tensor([[scale, 0.0, -scale]], requires_grad=True)
    loss = kd_loss(student, student.detach(), temperature, teacher_kind="logits")
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(student.grad, torch.zeros_like(student))


@pytest.mark.parametrize("student_dtype, teacher_dtype", [(torch.float64, torch.float32), (torch.float32, torch.float64)])
def test_either_float64_input_makes_the_math_float64(student_dtype, teacher_dtype):
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(student_dtype)
    teacher = torch.randn(4, 5, generator=gen, dtype=torch.float64).to(teacher_dtype)
    loss = kd_loss(student, teacher, 2.0, teacher_kind="logits")
    assert loss.dtype == torch.float64
    assert math.isclose(loss.item(), reference_kd(student, teacher, 2.0, "logits")[0], rel_tol=1e-12)


def test_a_float64_weight_leaves_float32_logits_float32():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    weight = torch.tensor([0.5, 0.0, 2.0], dtype=torch.float64)
    rows = kd_loss(student, teacher, 2.0, teacher_kind="logits", weight=weight, reduction="none")
    assert rows.dtype == torch.float32
    expected = reference_kd(student, teacher, 2.0, "logits", weight)[1]
    torch.testing.assert_close(rows, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"detach_teacher": False}, {"reduction": "sum"}, {"temperature": 2.5, "reduction": "none", "detach_teacher": False}],
)
def test_module_passes_every_argument_on_and_defaults_as_the_function(kwargs):
    gen = torch.Generator().manual_seed(2)
    student = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    twin = teacher.detach().clone().requires_grad_()
    kwargs = dict(kwargs)
    temperature = kwargs.pop("temperature", None)
    module = KDLoss(teacher_kind="logits", **kwargs) if temperature is None else KDLoss(
        temperature, teacher_kind="logits", **kwargs)
    got = module(student, teacher)
    expected = kd_loss(student, twin, *([] if temperature is None else [temperature]), teacher_kind="logits", **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0.0)
    got.sum().backward()
    expected.sum().backward()
    if twin.grad is None:
        assert teacher.grad is None
    else:
        torch.testing.assert_close(teacher.grad, twin.grad, rtol=1e-12, atol=0.0)
