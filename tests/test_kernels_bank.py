"""Tests of what only the fused knowledge-bank kernels (mkfkit/kernels/bank.py) promise: reads
that round as the torch path does (bit for bit in float32), duplicates summed in their order,
the forced backend's errors, large banks and CUDA graph capture. What the bank does on either
path is tested in tests/test_bank.py, over both backends.

The kernels run compiled on CUDA tensors and, without a GPU, under Triton's interpreter on CPU
tensors (tests/conftest.py chooses it before Triton is imported).
"""

import pytest
import torch

pytest.importorskip("triton")

import mkfkit  # noqa: E402
from mkfkit.bank import KnowledgeBank  # noqa: E402
from mkfkit.fraction import DominantFraction, QPFraction  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Fused knowledge-bank paths (KnowledgeBank(backend="triton"))


def _banks(kernel_device, storage, num_classes=9, samples=12):
    """A torch-path bank and a fused one in the same state, some rows seen, some not."""
    torch_bank = KnowledgeBank(samples, num_classes, 2, storage=storage, device=kernel_device, backend="torch")
    fused_bank = KnowledgeBank(samples, num_classes, 2, storage=storage, device=kernel_device, backend="triton")
    gen = torch.Generator().manual_seed(1)
    first = torch.randperm(samples, generator=gen)[: samples // 2].to(kernel_device)
    probs = torch.softmax(2 * torch.randn(first.shape[0], num_classes, generator=gen), 1)
    torch_bank.update(0, probs.to(kernel_device), first)
    fused_bank.load_state_dict(torch_bank.state_dict())
    return torch_bank, fused_bank


def _mixed_batch(kernel_device, samples=12, num_classes=9, seed=2):
    """A permutation-paired batch (every sample named twice) plus repeats; lam with 0 and 1."""
    gen = torch.Generator().manual_seed(seed)
    index_a = torch.cat((torch.randperm(samples, generator=gen)[:8], torch.tensor([3, 3])))
    index_b = index_a[torch.randperm(index_a.shape[0], generator=gen)]
    lam = torch.rand(index_a.shape[0], generator=gen)
    lam[:3] = torch.tensor([0.0, 1.0, 1.0])
    probs = torch.softmax(2 * torch.randn(index_a.shape[0], num_classes, generator=gen), 1)
    return [t.to(kernel_device) for t in (probs, index_a, index_b, lam)]


def _assert_banks_close(fused_bank, torch_bank, storage, atol=1e-6):
    assert torch.equal(fused_bank.seen, torch_bank.seen)
    # float32: rounding of the sums only; half storage: one unit in the last place at most.
    tol = dict(atol=atol, rtol=0) if storage == "float32" else dict(atol=0, rtol=torch.finfo(getattr(torch, storage)).eps)
    torch.testing.assert_close(fused_bank.knowledge.float(), torch_bank.knowledge.float(), **tol)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fused_bank_target_matches_torch_path(kernel_device, storage):
    torch_bank, fused_bank = _banks(kernel_device, storage)
    _, index_a, index_b, lam = _mixed_batch(kernel_device)
    for args in ((index_a,), (index_a, index_b, lam), (index_a, index_b, 0.25)):
        fused, plain = fused_bank.target(0, *args), torch_bank.target(0, *args)
        assert fused.probs.dtype == torch.float32 and torch.equal(fused.mask, plain.mask)
        if storage == "float32":  # the same operations in the same order: bit for bit
            assert torch.equal(fused.probs, plain.probs)
        else:
            torch.testing.assert_close(fused.probs, plain.probs, atol=1e-6, rtol=0)


def test_fused_bank_duplicates_are_a_sequential_mean_bitwise(kernel_device):
    # Row r named k times takes one EMA step with (e_1 + ... + e_k) / k summed left to right:
    # the same bits on every device, whatever else is in the batch, and on the torch path.
    torch_bank, fused_bank = _banks(kernel_device, "float32")
    index = torch.tensor([5, 1, 5, 0, 5, 1, 5, 7], device=kernel_device)
    probs = torch.softmax(3 * torch.randn(8, 9, generator=torch.Generator().manual_seed(3)), 1)
    probs = probs.to(kernel_device)
    old, seen = fused_bank.knowledge[0].clone(), fused_bank.seen[0].clone()
    momentum = fused_bank.momentum
    fused_bank.update(0, probs, index)
    for row in index.unique().tolist():
        entries = probs[index == row]
        total = entries[0]
        for estimate in entries[1:]:
            total = total + estimate
        mean = total / entries.shape[0]
        want = momentum * mean + (1 - momentum) * old[row] if seen[row] else mean
        assert torch.equal(fused_bank.knowledge[0, row], want), row
    torch_bank.update(0, probs, index)
    assert torch.equal(fused_bank.knowledge, torch_bank.knowledge)
    assert torch.equal(fused_bank.seen, torch_bank.seen)


def test_fused_bank_backend_errors(kernel_device):
    # The constructor's backend checks need no Triton: they live in test_bank.py.
    bank = KnowledgeBank(4, 3, device=kernel_device, backend="triton")
    probs = torch.full((2, 3), 1 / 3, device=kernel_device)
    index = torch.tensor([0, 1], device=kernel_device)
    # Any fraction plugs into the fused path: the fraction decides its own kernel.
    bank.update(0, probs, index)
    before = bank.knowledge.clone()
    bank.update(0, torch.tensor([[0.5, 0.3, 0.2]] * 2, device=kernel_device), index, index.flip(0), 0.5, DominantFraction())
    assert not torch.equal(bank.knowledge, before)
    elsewhere = "meta" if kernel_device == "cpu" else "cpu"
    with pytest.raises(RuntimeError, match=r"`backend` 'triton' needs Triton and a CUDA device .*, a dense storage and the batch on the bank's device"):
        bank.target(0, index, device=elsewhere)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("storage", ["float32", "float16"])
def test_fused_bank_large_and_graph_capturable_on_cuda(storage):
    samples, classes, batch = 4096, 1000, 512
    gen = torch.Generator().manual_seed(4)
    banks = [KnowledgeBank(samples, classes, 1, storage=storage, device="cuda", backend=b) for b in ("torch", "triton")]
    warm = torch.softmax(torch.randn(samples, classes, generator=gen), 1).cuda()
    index_a = torch.randperm(samples, generator=gen)[:batch].cuda()
    index_b = index_a[torch.randperm(batch, generator=gen).cuda()]
    lam = torch.rand(batch, generator=gen).cuda()
    probs = torch.softmax(3 * torch.randn(batch, classes, generator=gen), 1).cuda()
    for bank in banks:
        bank.update(0, warm[: samples // 2], torch.arange(samples // 2, device="cuda"))
        bank.update(0, probs, index_a, index_b, lam, QPFraction())
    # The two exact QP solvers agree to a few 1e-6 at this size (test_large_on_cuda).
    _assert_banks_close(banks[1], banks[0], storage, atol=5e-6)
    torch.testing.assert_close(banks[1].target(0, index_a, index_b, lam).probs,
                               banks[0].target(0, index_a, index_b, lam).probs, atol=5e-6, rtol=0)
    # No host synchronisation: the fused update and target can be captured in a CUDA graph.
    eager = KnowledgeBank(samples, classes, 1, storage=storage, device="cuda", backend="triton")
    eager.load_state_dict(banks[1].state_dict())
    with mkfkit.value_checks(False):
        eager.update(0, probs, index_a, index_b, lam, QPFraction())
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            banks[1].target(0, index_a, index_b, lam)  # compile and warm up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            banks[1].update(0, probs, index_a, index_b, lam, QPFraction())
            captured_target = banks[1].target(0, index_a, index_b, lam)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(banks[1].knowledge, eager.knowledge) and torch.equal(banks[1].seen, eager.seen)
    assert torch.equal(captured_target.probs, eager.target(0, index_a, index_b, lam).probs)
