"""MKF's bookkeeping inside a compiled training step (issue 18).

The pattern (docs/METHOD.md, "One MKF step under torch.compile"): the host-side draws (the
mixing, the depth) stay outside; the compiled functions take the mixed batch, its ``lam`` tensor
and indices, and the group as a Python int, so there is one graph per group and none per step.
The bank update is compiled apart from the loss and runs after the backward: in one graph with
the loss, torch 2.14's partitioner may save the bank's buffer for the backward, recompute the
teacher from it there after the update has changed it, and return wrong gradients
(test_update_in_the_differentiated_graph_is_refused_by_autograd).
"""

import functools

import pytest
import torch
from torch import nn

import mkfkit
from mkfkit._projection import project_box_simplex
from mkfkit.bank import KnowledgeBank
from mkfkit.distill import kd_loss
from mkfkit.fraction import LinearFraction, QPFraction
from mkfkit.mixing import CompoundMix, mixed_cross_entropy

BATCH, CLASSES, SAMPLES, GROUPS = 8, 10, 32, 3
FRACTIONS = {"linear": LinearFraction, "qp": lambda: QPFraction(backend="torch")}


def mkf_loss(model, bank, batch, group):
    """The loss of one MKF step: the sub-network's logits, the composite teacher of the group,
    mixed CE + KD. Returns the loss and the logits."""
    logits = model(batch.images)
    teacher = bank.target(group, batch.index_a, batch.index_b, batch.lam)
    loss = mixed_cross_entropy(logits, batch) + kd_loss(
        logits, teacher.probs, 4.0, teacher_kind="probs", weight=teacher.mask)
    return loss, logits


def mkf_update(bank, fraction, logits, batch, group):
    """The step's bank update, after its backward."""
    bank.update(group, logits.detach().softmax(1), batch.index_a, batch.index_b, batch.lam, fraction)


def batches(count, seed=0):
    """Mixed batches as CompoundMix draws them (mixup, cutmix and unmixed), on the host."""
    generator = torch.Generator().manual_seed(seed)
    mix = CompoundMix(mix_prob=0.8, generator=generator)
    return [
        mix(torch.randn(BATCH, 3, 4, 4, generator=generator),
            torch.randint(0, CLASSES, (BATCH,), generator=generator),
            torch.randperm(SAMPLES, generator=generator)[:BATCH])
        for _ in range(count)
    ]


def blocks(storage, seed=0):
    """A tiny model and a bank whose rows mostly hold knowledge, the same for every seed."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, CLASSES))
    bank = KnowledgeBank(SAMPLES, CLASSES, GROUPS, storage=storage, backend="torch")
    generator = torch.Generator().manual_seed(seed)
    for group in range(GROUPS):
        seen = torch.randperm(SAMPLES, generator=generator)[: SAMPLES - 4]
        bank.update(group, torch.randn(len(seen), CLASSES, generator=generator).softmax(1), seen)
    return model, bank


def run(compile, storage, fraction, steps):
    """Loss, gradient and bank after each step, groups cycling, with ``mkf_loss`` and
    ``mkf_update`` passed through ``compile``."""
    loss_of, update = compile(mkf_loss), compile(mkf_update)
    model, bank = blocks(storage)
    strategy = FRACTIONS[fraction]()
    results = []
    for number, batch in enumerate(batches(steps)):
        model.zero_grad()
        loss, logits = loss_of(model, bank, batch, number % GROUPS)
        loss.backward()
        update(bank, strategy, logits, batch, number % GROUPS)
        results.append((loss.detach(), model[1].weight.grad.clone(), bank.knowledge.float().clone(), bank.seen.clone()))
    return results


def test_bookkeeping_traces_into_one_graph_without_breaks():
    model, bank = blocks("float32")
    (batch,) = batches(1)
    with mkfkit.value_checks(True):  # skipped by themselves while tracing
        loss = torch._dynamo.explain(mkf_loss)(model, bank, batch, 1)
        update = torch._dynamo.explain(mkf_update)(bank, QPFraction(backend="torch"), model(batch.images), batch, 1)
    for explained in (loss, update):
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


@pytest.mark.parametrize("search", ["sort", "table", "newton"])
def test_every_projection_search_is_one_graph_with_the_eager_results(search):
    # The step above takes the table (small rows); the others must trace as well: no host
    # read, no data-dependent shape (the Newton search's passes unroll), the same values and
    # gradients.
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(16, 40, generator=generator, dtype=torch.float64) / 40**0.5
    lo = torch.rand(16, 40, generator=generator, dtype=torch.float64) / 100
    hi = lo + 0.1 + torch.rand(16, 40, generator=generator, dtype=torch.float64) / 10
    project = functools.partial(project_box_simplex, search=search)
    explained = torch._dynamo.explain(project)(v, lo, hi)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(project, backend="aot_eager", fullgraph=True)
    weights = torch.randn(v.shape, generator=generator, dtype=torch.float64)
    results = []
    for run in (project, compiled):
        inputs = [t.clone().requires_grad_(True) for t in (v, lo, hi)]
        x = run(*inputs)
        results.append((x.detach(), *torch.autograd.grad((x * weights).sum(), inputs)))
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, atol=1e-14, rtol=0)


def test_one_graph_per_group_whatever_lam_and_the_mixing():
    torch._dynamo.reset()
    graphs = []

    def backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    compile = lambda fn: torch.compile(fn, backend=backend, fullgraph=True)  # noqa: E731
    results = run(compile, "float32", "linear", 4 * GROUPS)  # a new lam and new indices every step
    assert len(results) == 4 * GROUPS
    # The loss and the update of each group: lam, indices and CutMix boxes are no constants.
    assert len(graphs) == 2 * GROUPS


def test_update_in_the_differentiated_graph_is_refused_by_autograd():
    # Why the update is a graph of its own. With the partitioner inductor uses, the backward
    # reads the bank's buffer, which the update in the same graph has changed: autograd's
    # version counter catches it here; inductor returns wrong gradients without a word.
    torch._dynamo.reset()

    def step(model, bank, fraction, batch, group):
        loss, logits = mkf_loss(model, bank, batch, group)
        mkf_update(bank, fraction, logits, batch, group)
        return loss

    model, bank = blocks("float32")
    (batch,) = batches(1)
    loss = torch.compile(step, backend="aot_eager_decomp_partition", fullgraph=True)(model, bank, LinearFraction(), batch, 0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("fraction,storage", [("linear", "bfloat16"), ("qp", "float32")])
def test_compiled_step_equals_eager(fraction, storage):
    # Each fraction and each bank layout once: an inductor compile takes 15-30 s on one core.
    torch._dynamo.reset()
    steps = 1
    with mkfkit.value_checks(False):
        eager = run(lambda fn: fn, storage, fraction, steps)
        compiled = run(lambda fn: torch.compile(fn, fullgraph=True), storage, fraction, steps)  # inductor
    # bf16 rows hold 8 bits: a float32 rounding difference may flip the last one.
    atol = 1e-5 if storage == "float32" else 1e-2
    for (loss, grad, knowledge, seen), (loss_c, grad_c, knowledge_c, seen_c) in zip(eager, compiled):
        torch.testing.assert_close(loss_c, loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_c, grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(knowledge_c, knowledge, atol=atol, rtol=0)
        assert torch.equal(seen_c, seen)


@pytest.mark.slow
def test_duplicates_average_left_to_right_eager_and_compiled():
    # A row named several times takes the mean of its valid estimates summed left to right (the
    # fused kernel's order): the same bits whatever else is in the batch. Compiled, the
    # segmented sum is the same ATen kernel and the rest moves integers: the same bits again.
    from mkfkit.bank import _mean_per_row

    rows = torch.tensor([5, 1, 5, 0, 5, 1, 5, 7, 3, 3])
    valid = torch.tensor([True, True, False, True, True, True, True, False, False, False])
    estimates = torch.softmax(3 * torch.randn(10, CLASSES, generator=torch.Generator().manual_seed(3)), 1)
    torch._dynamo.reset()
    for mean, written in (_mean_per_row(rows, estimates, valid),
                          torch.compile(_mean_per_row, fullgraph=True)(rows, estimates, valid)):
        assert written.tolist() == [True, True, True, True, True, True, True, False, False, False]
        for entry in range(6):
            taken = estimates[(rows == rows[entry]) & valid]
            total = taken[0]
            for estimate in taken[1:]:
                total = total + estimate
            assert torch.equal(mean[entry], total / taken.shape[0]), entry
