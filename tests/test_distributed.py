"""Two gloo processes on the CPU: uneven all-gather, a bank kept identical on every rank, and
attention transfer through DistributedDataParallel."""

import pytest
from _gloo import leave_process_group
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mkfkit.attention import AttentionTransferLoss
from mkfkit.bank import KnowledgeBank
from mkfkit.distributed import all_gather_uneven, distributed_world_size
from mkfkit.fraction import QPFraction

WORLD = 2
SAMPLES, CLASSES, GROUPS = 16, 6, 2
LAYOUTS = [("float32", None), ("topk", 3)]
# Local batch sizes per step and rank: uneven, one empty, one step where the ranks share rows.
SIZES = [(6, 6), (5, 3), (4, 0), (7, 7), (2, 5)]


def rank_batch(rank, step):
    """The batch rank `rank` sees at `step`: (group, probs, index_a, index_b, lam) or unmixed."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    size = SIZES[step][rank]
    probs = torch.softmax(3 * torch.randn(size, CLASSES, generator=generator), dim=1)
    if step == 3:  # both ranks update the same rows (DistributedSampler-style repeats)
        index_a = torch.arange(size) % 4
    else:
        index_a = torch.randint(0, SAMPLES, (size,), generator=generator)
    group = step % GROUPS
    if step == 0 or (step + rank) % 2 == 0:  # ranks mix independently of each other
        return group, probs, index_a, None, None
    index_b = index_a[torch.randperm(size, generator=generator)]
    lam = torch.rand(size, generator=generator)
    lam[:1] = 1.0
    return group, probs, index_a, index_b, lam


def gathered_batch(step):
    """All ranks' batches at `step` in rank order; unmixed ones as mixed with lam = 1."""
    parts = []
    for rank in range(WORLD):
        group, probs, index_a, index_b, lam = rank_batch(rank, step)
        if index_b is None:
            index_b, lam = index_a, torch.ones(index_a.shape[0])
        parts.append((probs, index_a, index_b, lam))
    return group, *(torch.cat(column) for column in zip(*parts))


class TwoBlocks(nn.Module):
    """A toy network whose forward returns the feature maps of its two blocks (8x8, 4x4)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU())

    def forward(self, x):
        first = self.first(x)
        return [first, self.second(first)]


def attention_setup():
    """The same model and loss (weight 2, a quarter into its warm-up) wherever it is built."""
    torch.manual_seed(7)
    loss_fn = AttentionTransferLoss(loss_weight=2.0, warmup_steps=4)
    loss_fn.num_steps = 1
    return TwoBlocks(), loss_fn


def attention_batch(rank):
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(50 + rank))


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {"world": distributed_world_size()}

    size = [3, 0][rank]
    rows = torch.arange(2 * size).view(size, 2) + 100 * rank
    values = torch.full((size,), 0.5 + rank, dtype=torch.bfloat16)
    results["gathered"] = all_gather_uneven([rows, values])

    for storage, k in LAYOUTS:
        bank = KnowledgeBank(SAMPLES, CLASSES, GROUPS, 0.5, storage, k, sync="all_gather")
        for step in range(len(SIZES)):
            group, probs, index_a, index_b, lam = rank_batch(rank, step)
            bank.update(group, probs, index_a, index_b, lam, QPFraction())
        results[storage] = bank.state_dict()

    bank = KnowledgeBank(SAMPLES, CLASSES, GROUPS, sync="all_gather")
    before = {name: value.clone() for name, value in bank.state_dict().items() if name != "_extra_state"}
    try:
        bank.update(rank, torch.full((2, CLASSES), 1 / CLASSES), torch.tensor([0, 1]))
    except ValueError as error:
        results["group_error"] = str(error)
    results["unchanged"] = all(torch.equal(value, before[name]) for name, value in bank.state_dict().items() if name in before)

    model, loss_fn = attention_setup()
    ddp = DistributedDataParallel(model)  # kept alive: its reducer runs during backward
    loss = loss_fn(ddp(attention_batch(rank)))
    loss.backward()  # DDP averages the gradients over the ranks
    results["attention_loss"] = loss.detach()
    results["attention_grads"] = [parameter.grad.clone() for parameter in model.parameters()]
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    leave_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gloo")
    mp.spawn(_worker, args=(str(directory / "init"), str(directory)), nprocs=WORLD, join=True)
    return [torch.load(directory / f"rank{rank}.pt") for rank in range(WORLD)]


def test_uneven_all_gather_concatenates_in_rank_order(rank_results):
    for results in rank_results:
        assert results["world"] == WORLD
        rows, values = results["gathered"]
        assert torch.equal(rows, torch.arange(6).view(3, 2))
        assert values.dtype == torch.bfloat16 and values.tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("storage,k", LAYOUTS, ids=[s for s, _ in LAYOUTS])
def test_replicas_are_identical_and_equal_one_process(rank_results, storage, k):
    # USER-REPORTS (PS-KD's all-gather + Python loop): every rank applies all ranks' rows in one
    # vectorised update, and the replicas agree bit for bit.
    single = KnowledgeBank(SAMPLES, CLASSES, GROUPS, 0.5, storage, k)
    for step in range(len(SIZES)):
        group, probs, index_a, index_b, lam = gathered_batch(step)
        single.update(group, probs, index_a, index_b, lam, QPFraction())
    expected = single.state_dict()
    assert expected["seen"].any() and not expected["seen"].all()
    for results in rank_results:
        for name, value in results[storage].items():
            if name != "_extra_state":
                assert torch.equal(value, expected[name]), (storage, name)


def test_ranks_disagreeing_on_the_group_are_rejected_everywhere(rank_results):
    for results in rank_results:
        assert "`group` must be the same on every rank under sync='all_gather', but got [0, 1]" == results["group_error"]
        assert results["unchanged"]


def test_attention_transfer_under_ddp_matches_one_process_per_rank(rank_results):
    # USER-REPORTS (mdistiller#7, #42: results vary with the GPU count): the loss holds no
    # state shared across ranks and runs no collective of its own. Each rank's loss is what one
    # process computes on that rank's batch, and the DDP gradients, the same on every rank,
    # are the mean of the one-process gradients of the ranks' batches.
    losses, grads = [], []
    for rank in range(WORLD):
        model, loss_fn = attention_setup()
        loss = loss_fn(model(attention_batch(rank)))
        loss.backward()
        losses.append(loss.detach())
        grads.append([parameter.grad for parameter in model.parameters()])
    assert not torch.allclose(losses[0], losses[1])  # the ranks' batches really differ
    for rank, results in enumerate(rank_results):
        torch.testing.assert_close(results["attention_loss"], losses[rank])
        for got, one, other in zip(results["attention_grads"], *grads):
            torch.testing.assert_close(got, (one + other) / 2)
    for got, other in zip(rank_results[0]["attention_grads"], rank_results[1]["attention_grads"]):
        assert torch.equal(got, other)


def test_without_a_process_group_tensors_come_back_unchanged():
    tensor = torch.arange(4)
    assert distributed_world_size() == 1
    assert all_gather_uneven([tensor])[0] is tensor
    with pytest.raises(ValueError, match=r"`tensors\[1\]` must have the first dimension of `tensors\[0\]` \(4\), but got shape \(3,\)"):
        all_gather_uneven([tensor, torch.arange(3)])
    with pytest.raises(ValueError, match="`tensors` must hold at least one tensor"):
        all_gather_uneven([])
