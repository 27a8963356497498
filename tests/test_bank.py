import io
from collections import defaultdict

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mkfkit
from mkfkit.bank import BankTarget, KnowledgeBank
from mkfkit.fraction import DominantFraction, LinearFraction, QPFraction

LAYOUTS = [("float32", None), ("bfloat16", None), ("float16", None), ("topk", 3)]
LAYOUT_IDS = [storage for storage, _ in LAYOUTS]
# Reference and bank round the same float32 rows to the storage; a last-bit difference in the
# float32 mean (summation order of 3+ duplicates) can flip one rounding, so allow a few ulps.
TOLERANCE = {"float32": 1e-6, "bfloat16": 8e-3, "float16": 1e-3, "topk": 1e-3}
FRACTIONS = {"linear": LinearFraction(), "qp": QPFraction(), "dominant": DominantFraction()}


def random_probs(rows, classes, generator, device="cpu", scale=3.0):
    logits = scale * torch.randn(rows, classes, generator=generator)
    return torch.softmax(logits, dim=1).to(device)


class ReferenceBank:
    """Naive per-row bank: one stored row per (group, sample), loops over entries and rows."""

    def __init__(self, num_samples, num_classes, num_groups, momentum, storage, k):
        self.classes, self.momentum, self.storage, self.k = num_classes, momentum, storage, k
        self.rows = {}
        self.num_samples, self.num_groups = num_samples, num_groups

    def _encode(self, row):
        if self.storage == "topk":
            values, ids = torch.topk(row, self.k)
            return values.half(), ids
        return row.to(getattr(torch, self.storage))

    def _decode(self, stored):
        if self.storage == "float32":
            return stored.clone()
        if self.storage == "topk":
            values, ids = stored
            rest = max(0.0, 1.0 - sum(float(v) for v in values)) / max(self.classes - self.k, 1)
            row = torch.full((self.classes,), rest)
            for value, class_id in zip(values.float(), ids.tolist()):
                row[class_id] = value
            return row / row.sum()
        row = stored.float()
        return row / row.sum()

    def read(self, group, sample):
        stored = self.rows.get((group, sample))
        return None if stored is None else self._decode(stored)

    def update(self, group, probs, index_a, index_b=None, lam=None, fraction=None):
        probs = probs.detach().float().cpu()
        index_a = index_a.tolist()
        entries = []
        if index_b is None or not index_a:
            entries = [(row, probs[i]) for i, row in enumerate(index_a)]
        else:
            index_b = index_b.tolist()
            lam = torch.as_tensor(lam, dtype=torch.float32).expand(len(index_a)).cpu()
            uniform = torch.full((self.classes,), 1.0 / self.classes)
            bases_a = [self.read(group, i) for i in index_a]
            bases_b = [self.read(group, i) for i in index_b]
            split = fraction(
                probs,
                torch.stack([uniform if k is None else k for k in bases_a]),
                torch.stack([uniform if k is None else k for k in bases_b]),
                lam,
            )
            for i in range(len(index_a)):
                both = bases_a[i] is not None and bases_b[i] is not None
                if split.mask_a[i] and (lam[i] == 1 or both):
                    entries.append((index_a[i], probs[i] if lam[i] == 1 else split.a[i].float()))
            for i in range(len(index_a)):
                both = bases_a[i] is not None and bases_b[i] is not None
                if split.mask_b[i] and (lam[i] == 0 or both):
                    entries.append((index_b[i], probs[i] if lam[i] == 0 else split.b[i].float()))
        estimates = defaultdict(list)
        for row, estimate in entries:
            estimates[row].append(estimate)
        updates = {}
        for row, values in estimates.items():
            mean = sum(values[1:], values[0].clone()) / len(values)
            old = self.read(group, row)
            m = self.momentum
            updates[row] = mean if old is None else m * mean + (1 - m) * old
        for row, new in updates.items():
            self.rows[(group, row)] = self._encode(new)

    def assert_matches(self, bank):
        tolerance = TOLERANCE[self.storage]
        # The torch path serves a caller on any device (this CPU one); the fused path reads on
        # the bank's device.
        everything = torch.arange(self.num_samples, device="cpu" if bank.backend == "torch" else bank.device)
        for group in range(self.num_groups):
            known = bank.target(group, everything)
            for sample in range(self.num_samples):
                expected = self.read(group, sample)
                assert bool(known.mask[sample]) == (expected is not None), (group, sample)
                if expected is not None:
                    torch.testing.assert_close(
                        known.probs[sample].cpu(), expected, atol=tolerance, rtol=0
                    )


def snapshot(bank):
    return {name: value.clone() for name, value in bank.state_dict().items() if name != "_extra_state"}


def assert_same_state(bank, state):
    for name, value in snapshot(bank).items():
        assert torch.equal(value, state[name]), name


def make_pair(storage, k, device, samples=12, classes=5, groups=2, momentum=0.5, backend="auto"):
    bank = KnowledgeBank(samples, classes, groups, momentum, storage=storage, k=k, device=device, backend=backend)
    reference = ReferenceBank(samples, classes, groups, momentum, storage, k)
    return bank, reference


@pytest.fixture
def backend(backend, request):
    # The bank's tests run on both paths (conftest.py); the fused one serves the dense layouts.
    if backend == "triton" and "k" in request.fixturenames and request.getfixturevalue("k") is not None:
        pytest.skip("the fused path serves the dense layouts only")
    return backend


# ----------------------------------------------------------------------------- reference paths


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_unmixed_updates_match_reference(storage, k, device, backend):
    bank, reference = make_pair(storage, k, device, momentum=0.3, backend=backend)
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        index = torch.randint(0, 12, (9,), generator=generator)  # duplicates included
        probs = random_probs(9, 5, generator, device)
        bank.update(step % 2, probs, index.to(device))
        reference.update(step % 2, probs, index)
    reference.assert_matches(bank)


@pytest.mark.parametrize("fraction", list(FRACTIONS), ids=list(FRACTIONS))
@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_mixed_updates_match_reference(storage, k, fraction, device, backend):
    bank, reference = make_pair(storage, k, device, backend=backend)
    strategy = FRACTIONS[fraction]
    generator = torch.Generator().manual_seed(2)
    # Some rows stay unseen, so pairs with an unknown partner occur.
    first = torch.arange(0, 12, 2)
    probs = random_probs(6, 5, generator)
    bank.update(0, probs.to(device), first.to(device))
    reference.update(0, probs, first)
    for _ in range(3):
        index_a = torch.randint(0, 12, (8,), generator=generator)
        index_b = index_a[torch.randperm(8, generator=generator)]
        lam = torch.rand(8, generator=generator)
        lam[:3] = torch.tensor([0.0, 1.0, 0.5])
        probs = random_probs(8, 5, generator)
        bank.update(0, probs.to(device), index_a.to(device), index_b.to(device), lam.to(device), strategy)
        reference.update(0, probs, index_a, index_b, lam, strategy)
    reference.assert_matches(bank)


def test_cvxpylayers_fraction_plugs_in():
    pytest.importorskip("cvxpylayers")
    from mkfkit.reference import CvxpyQPFraction

    bank, reference = make_pair("float32", None, "cpu", samples=4, classes=3, groups=1)
    strategy = CvxpyQPFraction()
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3]])
    index = torch.tensor([0, 1, 2])
    for target in (bank, reference):
        target.update(0, probs, index)
    mixed = 0.3 * probs[0] + 0.7 * probs[1]
    args = (mixed[None], torch.tensor([0]), torch.tensor([1]), torch.tensor([0.3]), strategy)
    bank.update(0, *args)
    reference.update(0, *args)
    # Bank and reference solve separately; CLARABEL agrees with itself far below 1e-6.
    reference.assert_matches(bank)
    assert bank.seen[0].tolist() == [True, True, True, False]


@given(
    samples=st.integers(1, 9),
    classes=st.integers(2, 6),
    batch=st.integers(0, 10),
    layout=st.sampled_from(LAYOUTS),
    mixed=st.booleans(),
    special=st.sampled_from(["random", "zero", "one", "half"]),
    seed=st.integers(0, 2**16),
)
def test_random_calls_match_reference(samples, classes, batch, layout, mixed, special, seed):
    storage, k = layout
    if k is not None:
        k = min(k, classes)
    bank, reference = make_pair(storage, k, "cpu", samples, classes, groups=2, momentum=0.7)
    generator = torch.Generator().manual_seed(seed)
    for step in range(3):
        index_a = torch.randint(0, samples, (batch,), generator=generator)
        probs = random_probs(batch, classes, generator)
        if not mixed or step == 0:
            bank.update(1, probs, index_a)
            reference.update(1, probs, index_a)
            continue
        index_b = torch.randint(0, samples, (batch,), generator=generator)
        lam = {
            "random": torch.rand(batch, generator=generator),
            "zero": torch.zeros(batch),
            "one": torch.ones(batch),
            "half": torch.full((batch,), 0.5),
        }[special]
        bank.update(1, probs, index_a, index_b, lam)
        reference.update(1, probs, index_a, index_b, lam, LinearFraction())
    reference.assert_matches(bank)
    assert not bank.seen[0].any()


# ----------------------------------------------------------------------------- exact semantics


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_lam_one_through_mixed_path_is_bitwise_the_unmixed_update(storage, k, device, backend):
    generator = torch.Generator().manual_seed(3)
    plain = KnowledgeBank(10, 6, 1, storage=storage, k=k, device=device, backend=backend)
    through_mix = KnowledgeBank(10, 6, 1, storage=storage, k=k, device=device, backend=backend)
    for step in range(3):
        # row 3 four times, row 7 three times: the mean of 3+ estimates is order-sensitive
        index = torch.tensor([3, 7, 3, 1, 7, 3, 7, 3, 0]) if step else torch.arange(0, 10, 2)
        index_b = torch.randint(0, 10, (index.shape[0],), generator=generator)
        probs = random_probs(index.shape[0], 6, generator, device)
        plain.update(0, probs, index.to(device))
        through_mix.update(0, probs, index.to(device), index_b.to(device), 1.0, QPFraction())
    assert_same_state(through_mix, snapshot(plain))


def test_duplicates_take_one_step_with_the_mean(device, backend):
    # USER-REPORTS (pytorch#25162): DistributedSampler repeats get one documented meaning.
    bank = KnowledgeBank(4, 3, 1, momentum=0.25, device=device, backend=backend)
    old = torch.tensor([[0.2, 0.3, 0.5]], device=device)
    bank.update(0, old, torch.tensor([2], device=device))
    estimates = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], device=device)
    # DistributedSampler-style repeat: sample 2 twice in one batch
    bank.update(0, estimates, torch.tensor([2, 2], device=device))
    mean = (estimates[0] + estimates[1]) / 2
    expected = 0.25 * mean + (1 - 0.25) * old[0]
    assert torch.equal(bank.target(0, torch.tensor([2], device=device)).probs[0], expected)


def test_mixed_pair_naming_one_row_twice_averages_both_sides(backend):
    bank = KnowledgeBank(3, 3, 1, momentum=0.5, backend=backend)
    base = torch.tensor([[0.5, 0.25, 0.25]])
    bank.update(0, base, torch.tensor([1]))
    mixed = torch.tensor([[0.25, 0.25, 0.5]])
    # Image 1 mixed with itself: both estimates are for row 1.
    bank.update(0, mixed, torch.tensor([1]), torch.tensor([1]), 0.5, DominantFraction())
    # Dominant gives side a (lam >= 0.5) the mixed output; side b is skipped.
    assert torch.equal(bank.target(0, torch.tensor([1])).probs, 0.5 * mixed + 0.5 * base)
    known = 0.5 * mixed + 0.5 * base
    split = LinearFraction()(mixed, known, known, 0.5)
    bank.update(0, mixed, torch.tensor([1]), torch.tensor([1]), 0.5, LinearFraction())
    expected = 0.5 * ((split.a + split.b) / 2) + 0.5 * known
    torch.testing.assert_close(bank.target(0, torch.tensor([1])).probs, expected, atol=1e-7, rtol=0)


@given(
    lam=st.floats(min_value=2.0**-149, max_value=2.0**-20, width=32),
    fraction=st.sampled_from(sorted(FRACTIONS)),
)
@example(lam=2.0**-127, fraction="qp")  # the largest subnormal weights and the smallest normal one
@example(lam=2.0**-126, fraction="qp")
def test_a_tiny_weight_counts_from_the_smallest_normal_float32_on(lam, fraction):
    # docs/METHOD.md, "Rows never written": a side of weight 0 needs no knowledge and teaches
    # nothing, and its partner is the mixed output itself; a subnormal float32 weight counts as
    # 0, a positive normal one (>= 2^-126), however small, as a weight. Rows 0, 2, 3 are known,
    # row 1 is not; the pairs are (a=1, b=0) and (a=2, b=3).
    weightless = lam < 2.0**-126
    m = 0.5
    bank = KnowledgeBank(4, 3, 1, momentum=m)
    known = torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [0.125, 0.125, 0.75]])
    bank.update(0, known, torch.tensor([0, 2, 3]))
    index_a, index_b = torch.tensor([1, 2]), torch.tensor([0, 3])
    assert bank.target(0, index_a, index_b, lam).mask.tolist() == [weightless, True]
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.1, 0.3]])
    bank.update(0, probs, index_a, index_b, lam, FRACTIONS[fraction])
    after = bank.target(0, torch.arange(4))
    assert after.mask.tolist() == [True, False, True, True]  # row 1 is never written
    if weightless:
        # Side b is the mixed output, written with or without a known partner; side a is not.
        expected = torch.stack((m * probs[0] + (1 - m) * known[0], known[1], m * probs[1] + (1 - m) * known[2]))
        torch.testing.assert_close(after.probs[[0, 2, 3]], expected, atol=1e-7, rtol=0)
    else:
        # The pair with an unknown partner is skipped; in the other, side a is written (not by
        # DominantFraction, which gives everything to the larger weight) and side b, of weight
        # 1 - lam ~ 1, estimates the mixed output to within lam / (1 - lam).
        assert torch.equal(after.probs[0], known[0])
        assert torch.equal(after.probs[2], known[1]) == (fraction == "dominant")
        torch.testing.assert_close(after.probs[3], m * probs[1] + (1 - m) * known[2], atol=1e-6, rtol=0)


def test_row_result_does_not_depend_on_the_rest_of_the_batch(backend):
    generator = torch.Generator().manual_seed(4)
    lone, crowded = KnowledgeBank(30, 5, 1, backend=backend), KnowledgeBank(30, 5, 1, backend=backend)
    estimates = random_probs(5, 5, generator)
    others = random_probs(11, 5, generator)
    lone.update(0, estimates, torch.full((5,), 4))
    crowd = torch.cat((others[:3], estimates, others[3:]))
    crowd_index = torch.cat((torch.tensor([0, 1, 1]), torch.full((5,), 4), torch.arange(20, 28)))
    crowded.update(0, crowd, crowd_index)
    row = torch.tensor([4])
    assert torch.equal(lone.target(0, row).probs, crowded.target(0, row).probs)


def test_first_write_stores_the_estimate_and_unknown_partners_are_skipped(backend):
    bank = KnowledgeBank(6, 3, 1, momentum=0.5, backend=backend)
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]])
    # Nothing seen: lam strictly inside (0, 1) updates nothing.
    bank.update(0, probs, torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0.4, 1.0, 0.0]))
    everything = bank.target(0, torch.arange(6))
    # lam = 1: side a takes the mixed output as its first write; lam = 0: side b does.
    assert everything.mask.tolist() == [False, True, False, False, False, True]
    assert torch.equal(everything.probs[1], probs[1])
    assert torch.equal(everything.probs[5], probs[2])
    # Row 1 is known, its partner 2 is not: the pair is skipped on both sides.
    before = snapshot(bank)
    bank.update(0, probs[:1], torch.tensor([1]), torch.tensor([2]), 0.5)
    assert_same_state(bank, before)


def test_target_is_the_lam_mix_of_stored_rows(device, backend):
    # The torch path serves a caller on another device (a CPU bank here); the fused path reads
    # and writes on the bank's own device.
    home = "cpu" if backend == "torch" else device
    bank = KnowledgeBank(5, 3, 2, storage="bfloat16", device=home, backend=backend)
    rows = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]])
    bank.update(1, rows.to(home), torch.tensor([0, 3], device=home))
    index_a = torch.tensor([0, 3, 0, 2], device=device)
    index_b = torch.tensor([3, 0, 2, 2], device=device)
    lam = torch.tensor([0.3, 1.0, 1.0, 0.5], device=device, dtype=torch.float64)
    target = bank.target(1, index_a, index_b, lam)
    assert isinstance(target, BankTarget)
    assert target.probs.dtype == torch.float32 and target.probs.device.type == torch.device(device).type
    expected = torch.stack([0.3 * rows[0] + 0.7 * rows[1], rows[1], rows[0]])
    torch.testing.assert_close(target.probs[:3].cpu(), expected)
    assert target.mask.tolist() == [True, True, True, False]
    torch.testing.assert_close(target.probs.sum(1).cpu(), torch.ones(4))
    if home == "cpu":
        on_cpu = bank.target(1, index_a, device="cpu")
        assert on_cpu.probs.device.type == "cpu" and on_cpu.mask.tolist() == [True, True, True, False]


def test_groups_are_independent(backend):
    bank = KnowledgeBank(4, 3, 3, backend=backend)
    bank.update(2, torch.tensor([[0.2, 0.2, 0.6]]), torch.tensor([1]))
    assert bank.seen.tolist() == [[False] * 4, [False] * 4, [False, True, False, False]]
    assert torch.equal(bank.target(0, torch.arange(4)).probs, torch.full((4, 3), 1 / 3))


def test_empty_batch_is_a_no_op(backend):
    bank = KnowledgeBank(4, 3, 1, backend=backend)
    before = snapshot(bank)
    bank.update(0, torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    bank.update(0, torch.empty(0, 3), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0.5)
    assert_same_state(bank, before)
    assert bank.target(0, torch.empty(0, dtype=torch.long)).probs.shape == (0, 3)


def test_probs_are_detached_and_autocast_outputs_work(backend):
    bank = KnowledgeBank(8, 4, 1, backend=backend)
    layer = torch.nn.Linear(6, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs = torch.softmax(layer(torch.randn(8, 6)), dim=1)
    bank.update(0, probs, torch.arange(8))
    assert not any(buffer.requires_grad for buffer in bank.buffers())
    expected = probs.detach().float()
    if probs.dtype != torch.float32:  # half-precision rows are renormalised in float32
        expected = expected / expected.sum(1, keepdim=True)
    assert torch.equal(bank.target(0, torch.arange(8)).probs, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_any_float_dtype_of_probs_is_used_in_float32(dtype, device, backend):
    generator = torch.Generator().manual_seed(10)
    probs = random_probs(6, 5, generator).to(dtype)
    as_float32 = probs.float() / (probs.float().sum(1, keepdim=True) if dtype in (torch.bfloat16, torch.float16) else 1)
    banks = [KnowledgeBank(8, 5, 1, device=device, backend=backend) for _ in range(2)]
    index_a, index_b = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([5, 4, 3, 2, 1, 0])
    for bank, rows in zip(banks, (probs, as_float32)):
        bank.update(0, rows.to(device), index_a.to(device))
        lam = torch.linspace(0, 1, 6, device=device, dtype=dtype)
        bank.update(0, rows.to(device), index_a.to(device), index_b.to(device), lam)
    assert_same_state(banks[0], snapshot(banks[1]))


def test_half_precision_probs_are_renormalised_in_float32(backend):
    bank = KnowledgeBank(4, 10, 1, backend=backend)
    # softmax computed in bfloat16: each entry rounded, rows sum to 1 only within ~3e-3
    probs = torch.softmax(torch.tensor([[6.0] + [0.5] * 9, [0.3] * 9 + [4.0]]).bfloat16(), dim=1)
    assert (probs.float().sum(1) - 1).abs().max() > 1e-3
    bank.update(0, probs, torch.tensor([0, 1]))
    bank.update(0, probs, torch.tensor([2, 3]), torch.tensor([0, 1]), 0.5, QPFraction())
    expected = probs.float() / probs.float().sum(1, keepdim=True)
    assert torch.equal(bank.target(0, torch.tensor([0, 1])).probs, expected)
    torch.testing.assert_close(bank.target(0, torch.arange(4)).probs.sum(1), torch.ones(4))


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_half_storage_runs_the_ema_in_float32(storage, backend):
    # USER-REPORTS (sd_dreambooth_extension#1415, ram#6): EMA in float32, rows renormalised.
    if backend == "triton" and storage == "bfloat16":
        pytest.skip("Triton's interpreter (this CPU-only case) truncates float32 to bfloat16")
    dtype = getattr(torch, storage)
    generator = torch.Generator().manual_seed(5)
    bank = KnowledgeBank(64, 100, 1, momentum=0.1, storage=storage, backend=backend)
    first, second = random_probs(64, 100, generator), random_probs(64, 100, generator)
    index = torch.arange(64)
    bank.update(0, first, index)
    old = bank.target(0, index).probs  # decoded: float32, renormalised
    torch.testing.assert_close(old.sum(1), torch.ones(64), atol=1e-6, rtol=0)
    bank.update(0, second, index)
    assert torch.equal(bank.knowledge[0], (0.1 * second + 0.9 * old).to(dtype))
    # The same EMA in half precision rounds each product first and lands elsewhere.
    in_half = 0.1 * second.to(dtype) + 0.9 * old.to(dtype)
    assert not torch.equal(bank.knowledge[0], in_half)


def test_topk_layout_keeps_the_largest_entries_and_spreads_the_rest():
    bank = KnowledgeBank(2, 6, 1, storage="topk", k=2)
    row = torch.tensor([[0.05, 0.5, 0.1, 0.25, 0.06, 0.04]])
    bank.update(0, row, torch.tensor([1]))
    assert bank.ids.dtype == torch.int16 and bank.values.dtype == torch.float16
    decoded = bank.target(0, torch.tensor([1])).probs[0]
    rest = (1 - 0.5 - 0.25) / 4
    torch.testing.assert_close(decoded, torch.tensor([rest, 0.5, rest, 0.25, rest, rest]), atol=1e-4, rtol=0)
    assert KnowledgeBank(1, 32767, 1, storage="topk", k=2).ids.dtype == torch.int16
    # The documented bound, 32,767 classes, is part of the checkpoint format (the ids' dtype).
    assert KnowledgeBank(1, 32768, 1, storage="topk", k=2).ids.dtype == torch.int32
    assert KnowledgeBank(1, 40000, 1, storage="topk", k=2).ids.dtype == torch.int32


def test_topk_state_names_a_class_stored_twice_in_a_row():
    bank = KnowledgeBank(2, 5, 1, storage="topk", k=3)
    state = bank.state_dict()
    state["ids"] = torch.tensor([[[0, 1, 2], [4, 3, 4]]], dtype=torch.int16)
    with pytest.raises(ValueError, match=r"`state_dict\['ids'\]` must name each class at most once per row, but got class 4 twice$"):
        bank.load_state_dict(state)


def test_topk_state_rows_may_sum_to_one_within_the_tolerance():
    bank = KnowledgeBank(1, 3, 1, storage="topk", k=2)
    state = bank.state_dict()
    state["values"] = torch.tensor([[[0.5, 0.5 + 2**-9]]], dtype=torch.float16)  # 1 + 2^-9 exactly
    bank.load_state_dict(state)
    assert torch.equal(bank.values, state["values"])
    # Read back, the row is renormalised: its kept values sum past 1.
    torch.testing.assert_close(bank.target(0, torch.tensor([0])).probs.sum(), torch.tensor(1.0), atol=1e-7, rtol=0)


def test_loaded_state_is_copied_not_shared():
    bank, source = KnowledgeBank(4, 3, 1), KnowledgeBank(4, 3, 1)
    source.update(0, torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([1]))
    state = source.state_dict()
    bank.load_state_dict(state)
    state["knowledge"].fill_(0.0)
    assert bank.knowledge[0, 1].tolist() == [0.5, 0.25, 0.25]


def test_state_that_is_not_a_dict_is_refused_clearly():
    message = r"^`state_dict` must come from a KnowledgeBank \(it holds no layout description under '_extra_state'\)$"
    with pytest.raises(ValueError, match=message):
        KnowledgeBank(4, 3, 1).load_state_dict([("knowledge", torch.zeros(1))])


def test_topk_state_values_are_read_only_with_value_checks_on():
    bank = KnowledgeBank(2, 5, 1, storage="topk", k=2)
    state = bank.state_dict()
    state["values"] = torch.full_like(state["values"], 0.75)  # rows summing to 1.5
    with mkfkit.value_checks(False):
        bank.load_state_dict(state)
    assert torch.equal(bank.values, state["values"])


def classifier_rows(rows, classes, generator):
    """Softmax outputs shaped like a classifier's: noise of varying width plus one class
    standing out by a random margin, from nearly flat rows to top-1 probabilities near 1."""
    logits = torch.linspace(0.5, 3.0, rows)[:, None] * torch.randn(rows, classes, generator=generator)
    label = torch.randint(0, classes, (rows,), generator=generator)
    logits[torch.arange(rows), label] += 12.0 * torch.rand(rows, generator=generator)
    return torch.softmax(logits, dim=1)


def write_and_read(rows, storage, k):
    """``rows`` written once into a fresh bank of that layout, read back through ``target``."""
    index = torch.arange(rows.shape[0])
    bank = KnowledgeBank(rows.shape[0], rows.shape[1], 1, storage=storage, k=k)
    bank.update(0, rows, index)  # a first write stores the estimate itself (no EMA)
    return bank.target(0, index).probs


@pytest.mark.parametrize("storage", ["bfloat16", "float16"])
def test_half_storage_error_is_bounded_by_its_rounding(storage):
    # USER-REPORTS (PS-KD, relabel_imagenet#8): compact layouts with a known error.
    # Each entry is rounded to p (1 + d) with |d| <= u (unit roundoff, eps / 2: 2^-8 for
    # bfloat16, 2^-11 for float16); the rounded row sums to S with |S - 1| <= u, and dividing by
    # it moves the entry by at most as much again: |decoded - p| <= 2u / (1 - u) * p. Entries
    # below float16's smallest normal number are rounded on a fixed grid instead: an absolute
    # error of half its spacing, tiny * eps / 2, doubled like the rest for the renormalisation.
    probs = classifier_rows(256, 1000, torch.Generator().manual_seed(11))
    reference = write_and_read(probs, "float32", None)
    assert torch.equal(reference, probs)  # float32 storage is exact: the baseline
    decoded = write_and_read(probs, storage, None)
    finfo = torch.finfo(getattr(torch, storage))
    unit = finfo.eps / 2
    error = (decoded - reference).abs()
    bound = 2 * unit / (1 - unit) * reference + finfo.tiny * finfo.eps
    assert (error <= bound).all(), float((error / bound).max())
    assert 0 < error.max() <= 2 * unit * reference.max()  # lossy, and at most 0.8% of the top-1
    torch.testing.assert_close(decoded.sum(1), torch.ones(256), atol=1e-6, rtol=0)


def test_topk_error_is_bounded_by_the_tail_mass():
    # USER-REPORTS (PS-KD, relabel_imagenet#8): top-k keeps the k largest entries (float16,
    # relative rounding 2^-11) and spreads the tail mass T (everything outside them) evenly
    # over the other C - k classes. A tail entry p_i <= p_(k+1) becomes T / (C - k), so it
    # moves by at most max(p_(k+1), T / (C - k)) <= T; a kept entry moves by its rounding plus
    # the renormalisation, within 2^-10 p_(1) (and float16's subnormal grid, 2^-25). Summed
    # over a row: at most T + T for the tail and 2^-10 for the kept entries.
    classes, k = 1000, 32
    probs = classifier_rows(256, classes, torch.Generator().manual_seed(11))
    reference = write_and_read(probs, "float32", None)
    decoded = write_and_read(probs, "topk", k)
    ordered = reference.sort(dim=1, descending=True).values
    tail = ordered[:, k:].sum(1)
    error = (decoded - reference).abs()
    row_bound = torch.maximum(ordered[:, k], tail / (classes - k)) + 2**-10 * ordered[:, 0] + 2**-25
    assert (error.max(1).values <= row_bound).all()
    assert (error.sum(1) <= 2 * tail + 2**-10).all()
    assert (error.max(1).values <= tail + 2**-10 * ordered[:, 0] + 2**-25).all()  # the tail mass
    # The bound is not loose: on some row the error reaches most of it.
    assert (error.max(1).values / row_bound).max() > 0.5
    # Confident rows (top-1 >= 0.9) keep almost everything: error below 1e-3 per entry.
    confident = ordered[:, 0] >= 0.9
    assert confident.any() and error[confident].max() < 1e-3


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_memory_bytes_is_what_gets_allocated(storage, k):
    # USER-REPORTS (PS-KD, relabel_imagenet#8): the size of a bank is known before allocating it.
    bank = KnowledgeBank(50, 7, 3, storage=storage, k=k)
    assert bank.nbytes == KnowledgeBank.memory_bytes(50, 7, 3, storage, k)


def test_memory_bytes_defaults_and_refusals():
    assert KnowledgeBank.memory_bytes(10, 3) == KnowledgeBank.memory_bytes(10, 3, 3, "float32") == 3 * 10 * (12 + 1)
    for position, name in enumerate(("num_samples", "num_classes", "num_groups")):
        arguments = [10, 3, 3]
        arguments[position] = 0
        with pytest.raises(ValueError, match=rf"`{name}` must be an int >= 1, but got 0"):
            KnowledgeBank.memory_bytes(*arguments)


def test_memory_bytes_for_imagenet():
    imagenet = (1_281_167, 1000, 3)
    assert KnowledgeBank.memory_bytes(*imagenet, "float32") == 3 * 1_281_167 * (4000 + 1)
    assert KnowledgeBank.memory_bytes(*imagenet, "bfloat16") == 3 * 1_281_167 * (2000 + 1)
    assert KnowledgeBank.memory_bytes(*imagenet, "topk", k=32) < 0.5e9
    assert KnowledgeBank.memory_bytes(*imagenet, "topk", k=64) < 1e9


def test_parent_half_moves_but_never_converts_the_bank():
    model = torch.nn.Module()
    model.bank = KnowledgeBank(4, 3, 1)
    model.bank.update(0, torch.tensor([[0.1, 0.2, 0.7]]), torch.tensor([0]))
    model.half()
    assert model.bank.knowledge.dtype == torch.float32
    assert torch.equal(model.bank.knowledge[0, 0], torch.tensor([0.1, 0.2, 0.7]))
    model.to(torch.float64)
    assert model.bank.knowledge.dtype == torch.float32 and model.bank.seen.dtype == torch.bool
    # A move and a conversion at once: the move applies to every buffer, the conversion to none
    # (the meta device stands in for another device).
    model.to("meta", torch.float64)
    assert model.bank.knowledge.device.type == model.bank.seen.device.type == "meta"
    assert model.bank.knowledge.dtype == torch.float32


# ----------------------------------------------------------------------------- devices


def test_cpu_bank_serves_a_cuda_caller():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator().manual_seed(6)
    on_cpu = KnowledgeBank(20, 8, 1, storage="topk", k=3)
    on_gpu = KnowledgeBank(20, 8, 1, storage="topk", k=3, device="cuda")
    for step in range(3):
        index_a = torch.randint(0, 20, (16,), generator=generator)
        index_b = index_a.flip(0)
        lam = torch.ones(16) if step == 0 else torch.rand(16, generator=generator)
        probs = random_probs(16, 8, generator)
        on_cpu.update(0, probs.cuda(), index_a, index_b, lam.cuda(), DominantFraction())
        on_gpu.update(0, probs.cuda(), index_a.cuda(), index_b.cuda(), lam.cuda(), DominantFraction())
    assert on_cpu.device.type == "cpu"
    target = on_cpu.target(0, torch.arange(20), device="cuda")
    assert target.probs.device.type == "cuda"
    assert torch.equal(target.probs, on_gpu.target(0, torch.arange(20, device="cuda")).probs)
    # A mixed batch's lam on the device named without its index ("cuda" is cuda:0 here).
    lam = torch.rand(20, generator=generator).cuda()
    mixed = on_cpu.target(0, torch.arange(20), torch.arange(20).flip(0), lam, device="cuda")
    ids = torch.arange(20, device="cuda")
    assert torch.equal(mixed.probs, on_gpu.target(0, ids, ids.flip(0), lam).probs)
    for name, value in snapshot(on_gpu).items():
        assert torch.equal(value.cpu(), snapshot(on_cpu)[name]), name


def test_cpu_and_cuda_give_the_same_bits():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    generator = torch.Generator().manual_seed(7)
    # The torch path is the same code on both devices (the fused path is compared with it in
    # test_kernels_bank.py).
    banks = {device: KnowledgeBank(16, 10, 1, device=device, backend="torch") for device in ("cpu", "cuda")}
    for step in range(4):
        index_a = torch.randint(0, 16, (24,), generator=generator)  # many duplicates
        index_b = torch.randint(0, 16, (24,), generator=generator)
        lam = (torch.rand(24, generator=generator) * 4).round() / 4  # 0, 1 and halves included
        probs = random_probs(24, 10, generator)
        for device, bank in banks.items():
            args = (probs.to(device), index_a.to(device), index_b.to(device), lam.to(device))
            bank.update(0, *args[:2]) if step == 0 else bank.update(0, *args, DominantFraction())
    for name, value in snapshot(banks["cuda"]).items():
        assert torch.equal(value.cpu(), snapshot(banks["cpu"])[name]), name


def test_target_on_another_device_moves_the_rows():
    # The meta device stands in for any device other than the bank's (and other than CUDA,
    # which has its own pinned-memory path).
    bank = KnowledgeBank(4, 3, 1)
    bank.update(0, torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([2]))
    target = bank.target(0, torch.tensor([2, 0]), device="meta")
    assert target.probs.device.type == "meta" and target.probs.shape == (2, 3)
    assert target.mask.device.type == "meta" and target.mask.shape == (2,)


def test_state_dict_describes_the_layout():
    # The layout description saved with every checkpoint; loading compares it key by key.
    state = KnowledgeBank(4, 3, 2, storage="topk", k=2).state_dict()
    assert state["_extra_state"] == {"num_samples": 4, "num_classes": 3, "num_groups": 2, "storage": "topk", "k": 2}


def test_module_to_moves_the_storage(device):
    bank = KnowledgeBank(3, 2, 1, storage="topk", k=1).to(device)
    assert bank.values.device.type == torch.device(device).type == bank.device.type
    bank.update(0, torch.tensor([[0.9, 0.1]], device=device), torch.tensor([2], device=device))
    assert bank.target(0, torch.tensor([2], device=device)).mask.tolist() == [True]


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_state_dict_round_trips_exactly(storage, k, backend):
    generator = torch.Generator().manual_seed(8)
    bank = KnowledgeBank(10, 4, 2, storage=storage, k=k, backend=backend)
    bank.update(1, random_probs(5, 4, generator), torch.tensor([0, 2, 4, 6, 8]))
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = KnowledgeBank(10, 4, 2, storage=storage, k=k, backend=backend)
    restored.load_state_dict(torch.load(buffer))
    assert_same_state(restored, snapshot(bank))
    assert restored.seen[1].tolist() == [True, False] * 5
    probs, index = random_probs(6, 4, generator), torch.tensor([0, 1, 2, 3, 0, 9])
    bank.update(1, probs, index)
    restored.update(1, probs, index)
    assert_same_state(restored, snapshot(bank))


@pytest.mark.parametrize(
    "other",
    [
        dict(num_samples=11, num_classes=4, num_groups=2),
        dict(num_samples=10, num_classes=5, num_groups=2),
        dict(num_samples=10, num_classes=4, num_groups=3),
        dict(num_samples=10, num_classes=4, num_groups=2, storage="bfloat16"),
        dict(num_samples=10, num_classes=4, num_groups=2, storage="topk", k=2),
    ],
)
def test_loading_another_layout_fails_clearly(other):
    source = KnowledgeBank(10, 4, 2, storage="topk", k=3)
    target = KnowledgeBank(**other)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"`state_dict` must describe a bank of this layout .* but got"):
        target.load_state_dict(source.state_dict())
    assert_same_state(target, before)
    with pytest.raises(ValueError, match="must come from a KnowledgeBank"):
        target.load_state_dict({"seen": target.seen})


BAD_UPDATES = [
    (dict(group=2), ValueError, r"`group` must be an int in \[0, 1\], but got 2"),
    (dict(group=-1), ValueError, r"`group` must be an int >= 0, but got -1"),
    (dict(group=1.0), TypeError, r"`group` must be an int"),
    (dict(index_a=torch.tensor([0, 9, 10])), ValueError, r"`index_a` must hold indices in \[0, 9\], but got 10"),
    (dict(index_a=torch.tensor([0.0, 1.0, 2.0])), TypeError, r"`index_a` must have an integer dtype"),
    (dict(index_a=torch.tensor([0, 1])), ValueError, r"`index_a` must be a Tensor\[B\] with B = 3"),
    (dict(index_b=torch.tensor([0, 1, -1]), lam=0.5), ValueError, r"`index_b` must hold indices in \[0, 9\], but got -1"),
    (dict(probs=torch.full((3, 5), 0.2)), ValueError, r"`probs` must be a Tensor\[B, C\] with C = 4"),
    (dict(probs=torch.tensor([[0.5, 0.5, 0.0, float("nan")]] * 3)), ValueError, r"`probs` must be finite"),
    (dict(probs=torch.tensor([[0.5, 0.5, 0.5, float("inf")]] * 3)), ValueError, r"`probs` must be finite"),
    (dict(probs=torch.tensor([[2.0, -1.0, 0.0, 0.0]] * 3)), ValueError, r"`probs` must hold probability rows"),
    (dict(probs=torch.ones(3, 4)), ValueError, r"`probs` must hold probability rows"),
    (dict(index_b=torch.tensor([1, 2, 3]), lam=1.3), ValueError, r"`lam` must lie in \[0, 1\], but got 1.3"),
    (dict(index_b=torch.tensor([1, 2, 3]), lam=torch.tensor([0.5, -0.1, 1.0])), ValueError, r"`lam` must lie in \[0, 1\], but got -0.1"),
    (dict(index_b=torch.tensor([1, 2])), ValueError, r"^`index_b` must be a Tensor\[B\] with B = 3, but got shape \(2,\)$"),
    (dict(index_b=torch.tensor([1, 2, 3])), ValueError, r"^`lam` must be given with `index_b`, but got None$"),
    (dict(lam=0.5), ValueError, r"^`lam` must be None when `index_b` is None, but got 0.5 \(float\)$"),
    (
        dict(index_b=torch.tensor([1, 2, 3]), lam=0.5, fraction=LinearFraction(project=False)),
        ValueError,
        r"`fraction` must return probability rows for the bank to store, but got "
        r"LinearFraction\(project=False\)",
    ),
]


@pytest.mark.parametrize("change,error,message", BAD_UPDATES)
def test_rejected_update_leaves_the_bank_unchanged(change, error, message):
    bank = KnowledgeBank(10, 4, 2, storage="topk", k=2)
    bank.update(0, torch.full((4, 4), 0.25), torch.tensor([0, 1, 2, 3]))
    before = snapshot(bank)
    arguments = dict(group=0, probs=torch.full((3, 4), 0.25), index_a=torch.tensor([0, 4, 9]))
    arguments.update(change)
    with pytest.raises(error, match=message):
        bank.update(**arguments)
    assert_same_state(bank, before)


def test_bad_target_and_constructor_arguments():
    bank = KnowledgeBank(10, 4, 2)
    with pytest.raises(ValueError, match=r"`index_a` must hold indices in \[0, 9\], but got 12"):
        bank.target(0, torch.tensor([12]))
    with pytest.raises(ValueError, match=r"`group` must be an int in \[0, 1\], but got 5"):
        bank.target(5, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"`lam` must lie in \[0, 1\], but got 2"):
        bank.target(0, torch.tensor([1]), torch.tensor([2]), 2.0)
    with pytest.raises(ValueError, match=r"`storage` must be one of 'float32', 'bfloat16', 'float16', 'topk', but got 'int8'"):
        KnowledgeBank(10, 4, storage="int8")
    with pytest.raises(ValueError, match=r"^`k` must be given for storage='topk', but got None$"):
        KnowledgeBank(10, 4, storage="topk")
    with pytest.raises(ValueError, match=r"`k` must be at most num_classes = 4, but got 5"):
        KnowledgeBank(10, 4, storage="topk", k=5)
    with pytest.raises(ValueError, match=r"`k` must be None unless storage='topk', but got 3"):
        KnowledgeBank(10, 4, k=3)
    with pytest.raises(ValueError, match=r"`momentum` must lie in \(0, 1\], but got 0"):
        KnowledgeBank(10, 4, momentum=0.0)
    with pytest.raises(ValueError, match=r"`sync` must be one of 'none', 'all_gather', but got 'ddp'"):
        KnowledgeBank(10, 4, sync="ddp")
    with pytest.raises(ValueError, match=r"`backend` must be one of 'auto', 'torch', 'triton', but got 'cuda'"):
        KnowledgeBank(4, 3, backend="cuda")
    message = r"^`backend` 'triton' needs a dense storage \(float32, bfloat16, float16\), but got storage='topk'$"
    with pytest.raises(ValueError, match=message):
        KnowledgeBank(4, 3, storage="topk", k=2, backend="triton")


def test_all_gather_mode_without_a_process_group_is_a_single_process(backend):
    generator = torch.Generator().manual_seed(9)
    local, synced = KnowledgeBank(8, 3, 1, backend=backend), KnowledgeBank(8, 3, 1, sync="all_gather", backend=backend)
    for bank in (local, synced):
        bank.update(0, random_probs(8, 3, torch.Generator().manual_seed(1)), torch.arange(8))
    probs, index = random_probs(5, 3, generator), torch.tensor([1, 1, 4, 6, 7])
    for bank in (local, synced):
        bank.update(0, probs, index, index.flip(0), torch.linspace(0, 1, 5))
    assert_same_state(synced, snapshot(local))


# ----------------------------------------------------------------------------- issue 30's properties


@given(classes=st.integers(2, 48), seed=st.integers(0, 2**16), scale=st.sampled_from([0.0, 1.0, 8.0, 60.0]),
       data=st.data())
def test_decoded_rows_sum_to_one_in_every_storage(classes, seed, scale, data):
    # Rounded storage (float16, bfloat16, top-k in float16) must decode to rows that sum to 1 to
    # float32 precision, not to a loose tolerance: at k = C in float16 the kept values alone sum
    # to 1 +- 3e-4. Scales 0 and 60 give uniform and one-hot rows.
    storage, k = data.draw(st.sampled_from(LAYOUTS))
    if storage == "topk":
        k = data.draw(st.integers(1, classes))
    bank = KnowledgeBank(6, classes, 1, storage=storage, k=k)
    generator = torch.Generator().manual_seed(seed)
    rows = (scale * torch.randn(6, classes, generator=generator, dtype=torch.float64)).softmax(1)
    bank.update(0, rows.float(), torch.arange(6))
    sums = bank.target(0, torch.arange(6)).probs.double().sum(1)
    assert float((sums - 1).abs().max()) <= classes * 2.0**-24, (storage, k, sums)


class UniformFraction(torch.nn.Module):
    """A fraction that ignores the mixed row: both estimates uniform, both sides informative."""

    def forward(self, mixed, base_a, base_b, lam):
        uniform = torch.full_like(mixed, 1 / mixed.shape[1])
        every = torch.ones(mixed.shape[0], dtype=torch.bool, device=mixed.device)
        return mkfkit.fraction.Fraction(uniform, uniform, every, every)


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_a_side_of_weight_one_is_the_mixed_row_whatever_the_fraction_says(storage, k):
    # docs/METHOD.md: where lam == 1, side a is the mixed output itself and side b is left
    # alone, whatever the strategy returns; the other rows follow the strategy.
    generator = torch.Generator().manual_seed(5)
    plain = KnowledgeBank(8, 5, 1, storage=storage, k=k)
    mixed_path = KnowledgeBank(8, 5, 1, storage=storage, k=k)
    seed_rows = random_probs(8, 5, generator)
    for bank in (plain, mixed_path):  # every row known: the fraction's estimates are used
        bank.update(0, seed_rows, torch.arange(8))
    probs = random_probs(3, 5, generator)
    index_a, index_b = torch.tensor([0, 1, 2]), torch.tensor([5, 6, 7])
    lam = torch.tensor([1.0, 1.0, 0.5])
    mixed_path.update(0, probs, index_a, index_b, lam, UniformFraction())
    plain.update(0, probs[:2], index_a[:2])  # the two rows of weight 1, as unmixed
    plain.update(0, torch.full((2, 5), 0.2), torch.tensor([2, 7]))  # the fraction's pair
    assert_same_state(mixed_path, snapshot(plain))


# ----------------------------------------------------------------------------- found by mutation testing


def test_constructor_defaults():
    bank = KnowledgeBank(4, 3)
    assert (bank.num_groups, bank.momentum, bank.storage, bank.k, bank.sync, bank.backend) == (3, 0.5, "float32", None, "none", "auto")
    assert bank.knowledge.shape == (3, 4, 3) and bank.seen.shape == (3, 4)
    synced = KnowledgeBank(4, 3, 2, momentum=0.25, storage="topk", k=2, sync="all_gather")
    expected = "num_samples=4, num_classes=3, num_groups=2, momentum=0.25, storage='topk', k=2, sync='all_gather'"
    assert repr(synced) == f"KnowledgeBank({expected})"
    dense = "num_samples=4, num_classes=3, num_groups=3, momentum=0.5, storage='float32', sync='none'"
    assert repr(bank) == f"KnowledgeBank({dense})"  # no k for a dense storage


BAD_CONSTRUCTIONS = [
    (dict(num_samples=0), ValueError, r"^`num_samples` must be an int >= 1, but got 0$"),
    (dict(num_classes=0), ValueError, r"^`num_classes` must be an int >= 1, but got 0$"),
    (dict(num_groups=0), ValueError, r"^`num_groups` must be an int >= 1, but got 0$"),
    # In range, but a tensor: the bank keeps a Python number.
    (dict(momentum=torch.tensor(0.5)), TypeError, r"^`momentum` must be a number, but got Tensor of shape \(\), dtype torch.float32 on cpu$"),
    (dict(storage="topk", k=0), ValueError, r"^`k` must be an int >= 1, but got 0$"),
]


@pytest.mark.parametrize("change,error,message", BAD_CONSTRUCTIONS)
def test_constructor_arguments_are_named_in_their_errors(change, error, message):
    with pytest.raises(error, match=message):
        KnowledgeBank(**{**dict(num_samples=10, num_classes=4, num_groups=2), **change})


BAD_TARGETS = [
    (dict(index_a=[1, 2]), TypeError, r"^`index_a` must be a torch.Tensor, but got \[1, 2\] \(list\)$"),
    (dict(index_b=torch.tensor([3])), ValueError, r"^`index_b` must be a Tensor\[B\] with B = 2, but got shape \(1,\)$"),
]


@pytest.mark.parametrize("change,error,message", BAD_TARGETS)
def test_bad_target_arguments_are_refused_clearly(change, error, message):
    bank = KnowledgeBank(10, 4, 2)
    arguments = dict(group=0, index_a=torch.tensor([0, 1]), index_b=torch.tensor([2, 3]), lam=0.5)
    with pytest.raises(error, match=message):
        bank.target(**{**arguments, **change})


def test_target_mask_needs_every_side_with_a_positive_weight(backend):
    # Row 0 is known, row 1 is not; on both paths a pair is known only where each side with a
    # positive weight is.
    bank = KnowledgeBank(3, 3, 1, backend=backend)
    bank.update(0, torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([0]))
    index_a, index_b = torch.tensor([0, 0, 1, 1, 0]), torch.tensor([1, 1, 0, 0, 0])
    lam = torch.tensor([0.5, 1.0, 0.0, 0.5, 0.5])
    assert bank.target(0, index_a, index_b, lam).mask.tolist() == [False, True, True, False, True]


@pytest.mark.parametrize("choice", ["torch", "triton"])
def test_triton_backend_reads_and_writes_with_the_fused_kernels(choice, kernel_device, monkeypatch):
    from mkfkit.kernels import bank as bank_kernels

    calls = []
    for name in ("read", "write"):
        kernel = getattr(bank_kernels, name)
        monkeypatch.setattr(bank_kernels, name, lambda *args, _kernel=kernel, _name=name: calls.append(_name) or _kernel(*args))
    bank = KnowledgeBank(4, 3, 1, device=kernel_device, backend=choice)
    rows = torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]], device=kernel_device)
    index = torch.tensor([0, 1], device=kernel_device)
    bank.update(0, rows, index)  # unmixed: a write
    bank.update(0, rows[:1], index[:1], index[1:], 0.5)  # mixed: a read, a write
    bank.target(0, index)  # a read
    assert calls == ([] if choice == "torch" else ["write", "read", "write", "read"])
    assert bank.seen[0].tolist() == [True, True, False, False]


def test_triton_backend_refuses_a_batch_off_the_banks_device(kernel_device):
    # The bank on the meta device, the batch where the kernels could run.
    bank = KnowledgeBank(4, 3, 1, device="meta", backend="triton")
    index = torch.tensor([1], device=kernel_device)
    message = (
        r"^`backend` 'triton' needs Triton and a CUDA device \(or TRITON_INTERPRET=1 on CPU\), a dense "
        rf"storage and the batch on the bank's device \(meta\), but got {index.device}; use backend='auto' or 'torch'$"
    )
    with pytest.raises(RuntimeError, match=message):
        bank.target(0, index)
    with pytest.raises(RuntimeError, match=message):
        bank.update(0, torch.tensor([[0.5, 0.25, 0.25]], device=kernel_device), index)


def test_all_gather_mode_asks_its_process_group_for_the_world_size(monkeypatch):
    asked = []
    monkeypatch.setattr(mkfkit.bank, "distributed_world_size", lambda group: asked.append(group) or 1)
    group = object()
    for sync in ("none", "all_gather"):
        bank = KnowledgeBank(4, 3, 1, sync=sync, process_group=group)
        bank.update(0, torch.tensor([[0.5, 0.25, 0.25]]), torch.tensor([1]))
    assert len(asked) == 1 and asked[0] is group  # only the synced bank asks, and asks its group


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("materialise", ["to_empty", "assign"])
def test_bank_made_on_the_meta_device_is_materialised_by_loading(storage, k, materialise):
    # Deferred initialisation: the bank is made without memory, then given a checkpoint's.
    source = KnowledgeBank(4, 3, 2, storage=storage, k=k)
    source.update(1, torch.tensor([[0.5, 0.25, 0.25], [0.125, 0.125, 0.75]]), torch.tensor([0, 3]))
    state = source.state_dict()
    bank = KnowledgeBank(4, 3, 2, storage=storage, k=k, device="meta")
    assert {buffer.device.type for buffer in bank.buffers()} == {"meta"} and bank.device.type == "meta"
    if materialise == "to_empty":
        bank.to_empty(device="cpu")
        bank.load_state_dict(state)
    else:
        bank.load_state_dict(state, assign=True)
        assert all(getattr(bank, name) is state[name] for name in state if name != "_extra_state")
    assert bank.device.type == "cpu"
    assert_same_state(bank, snapshot(source))
    assert torch.equal(bank.target(1, torch.arange(4)).probs, source.target(1, torch.arange(4)).probs)


@pytest.mark.parametrize("value_checks", [True, False])
def test_a_state_torch_cannot_copy_is_refused_by_torchs_loader(value_checks):
    # A tensor on the meta device holds no values: the bank's value checks pass over it, with
    # value checks on or off; torch's copy then fails and reports it as torch does.
    bank = KnowledgeBank(4, 3, 1)
    before = snapshot(bank)
    state = {**bank.state_dict(), "knowledge": bank.knowledge.to("meta")}
    with mkfkit.value_checks(value_checks), pytest.raises(RuntimeError, match=r"^Error\(s\) in loading state_dict for KnowledgeBank:\n\tWhile copying the parameter named \"knowledge\""):
        bank.load_state_dict(state)
    assert_same_state(bank, before)


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=LAYOUT_IDS)
def test_a_meta_bank_takes_a_meta_state(storage, k):
    # Shapes without memory end to end (e.g. to plan a model's size): the value checks skip the
    # meta tensors, the checks of layout, dtype and shape still run.
    state = {name: value.to("meta") if isinstance(value, torch.Tensor) else value
             for name, value in KnowledgeBank(4, 3, 2, storage=storage, k=k).state_dict().items()}
    bank = KnowledgeBank(4, 3, 2, storage=storage, k=k, device="meta")
    bank.load_state_dict(state, assign=True)
    assert all(getattr(bank, name) is state[name] for name in state if name != "_extra_state")
    with pytest.raises(ValueError, match=r"^`state_dict\['seen'\]` must have shape \(2, 4\), but got \(1, 4\)$"):
        bank.load_state_dict({**state, "seen": state["seen"][:1]}, assign=True)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
def test_topk_state_rows_just_past_the_tolerance_are_refused(default_dtype):
    # 0.5 + (0.5 + 5 * 2^-11) = 1 + 2^-9 + 2^-11 in float32, past 1 + 2^-9; a float16 sum
    # would round it to 1 + 2^-9 (ties to even) and accept it. The sum is printed in its
    # shortest float32 form whatever torch's default dtype.
    bank = KnowledgeBank(1, 3, 1, storage="topk", k=2)
    state = bank.state_dict()
    state["values"] = torch.tensor([[[0.5, 0.5 + 5 * 2**-11]]], dtype=torch.float16)
    message = r"^`state_dict\['values'\]` must hold rows summing to at most 1 \(within 0.00195312\), but got a row summing to 1.0024414$"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with pytest.raises(ValueError, match=message):
            bank.load_state_dict(state)
    finally:
        torch.set_default_dtype(previous)


def test_topk_with_one_class_left_out_gives_it_the_whole_rest():
    bank = KnowledgeBank(1, 3, 1, storage="topk", k=2)
    row = torch.tensor([[0.625, 0.25, 0.125]])  # exact in float16
    bank.update(0, row, torch.tensor([0]))
    assert torch.equal(bank.target(0, torch.tensor([0])).probs, row)
