"""The training steps of benchmarks/methods/: each method's loss is the one its docstring
states, computed here again from torch's functional ops and mkfkit's tested losses."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import train  # noqa: E402
from methods import METHODS, MULTI_NETWORK_METHODS  # noqa: E402

from mkfkit.fusion import BranchGate, FeatureFusionTeacher  # noqa: E402
from mkfkit.models import MultiBranchResNet, ResNet  # noqa: E402

TINY = ["--device", "cpu", "--train-subset", "64", "--batch-size", "16", "--epochs", "1",
        "--blocks", "1", "2", "--widths", "4", "8", "--warmup", "0"]


@pytest.fixture(scope="module")
def data():
    return train.load_dataset("digits")


def fresh_run(method, data, *options):
    args = train.parse_args(TINY + ["--methods", method, *options])
    return train.build_run(method, 0, args, train.split(data, args)), args


def kl(student, teacher, temperature):
    """T^2 KL(softmax(teacher / T) || softmax(student / T)), the mean over the batch."""
    log_p = F.log_softmax(teacher / temperature, 1)
    log_q = F.log_softmax(student / temperature, 1)
    return temperature ** 2 * (log_p.exp() * (log_p - log_q)).sum(1).mean()


def a_batch(data, size=16):
    return data.train_images[:size], data.train_labels[:size], torch.arange(size)


def step_loss(run, args, images, labels, indices):
    torch.manual_seed(1)  # any dropout-free network is deterministic; the seed is for safety
    return METHODS[run.method].step(run, images, labels, indices, args, 1)


def test_every_method_is_registered_once_and_in_the_cli():
    assert list(METHODS) == train.ALL_METHODS
    assert set(MULTI_NETWORK_METHODS) <= set(METHODS)


@pytest.mark.parametrize("method, teacher, attention", [
    ("kdatff", FeatureFusionTeacher, True),
    ("kdatff-noat", FeatureFusionTeacher, False),
    ("kdatff-nofusion", BranchGate, True),
    ("one", BranchGate, False),
    ("multibranch", type(None), False),
])
def test_branch_methods_build_what_their_table_says(data, method, teacher, attention):
    run, _ = fresh_run(method, data)
    assert isinstance(run.model, MultiBranchResNet) and run.model.num_branches == 2
    assert isinstance(run.teacher, teacher)
    assert (run.attention is not None) == attention and run.mix is None
    taught = {id(p) for p in run.model.parameters()}
    if run.teacher is not None:
        taught |= {id(p) for p in run.teacher.parameters()}
    optimised = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert optimised == taught  # the teacher trains with the branches


@pytest.mark.parametrize("method", ["kdatff", "one", "kdatff-noat", "kdatff-nofusion"])
def test_branch_loss_is_ce_teacher_ce_kl_and_attention(data, method):
    run, args = fresh_run(method, data, "--online-temperature", "2", "--theta", "0.5",
                          "--attention-weight", "3")
    images, labels, indices = a_batch(data)
    loss = step_loss(run, args, images, labels, indices)
    torch.manual_seed(1)
    out = run.model(images)
    if isinstance(run.teacher, FeatureFusionTeacher):
        teacher = run.teacher([blocks[-1] for blocks in out.features], out.logits)[0]
    else:
        teacher = run.teacher(out.shared, out.logits)[0]
    expected = sum(F.cross_entropy(z, labels) + 0.5 * kl(z, teacher.detach(), 2.0)
                   for z in out.logits) + F.cross_entropy(teacher, labels)
    if run.attention is not None:  # the attention loss's ramp is 1: no warm-up by default
        expected = expected + 3 * sum(run.attention(blocks) for blocks in out.features)
    torch.testing.assert_close(loss, expected.detach())
    assert all(p.grad is not None for p in run.model.parameters())


def test_multibranch_loss_is_the_branches_cross_entropy(data):
    run, args = fresh_run("multibranch", data)
    images, labels, indices = a_batch(data)
    loss = step_loss(run, args, images, labels, indices)
    out = run.model(images)
    torch.testing.assert_close(loss, sum(F.cross_entropy(z, labels) for z in out.logits).detach())


def test_kdatff_mix_uses_the_mixed_targets(data):
    run, args = fresh_run("kdatff-mix", data, "--theta", "0", "--attention-weight", "0")
    assert run.mix is not None
    images, labels, indices = a_batch(data)
    state = run.mix.state_dict()
    loss = step_loss(run, args, images, labels, indices)
    run.mix.load_state_dict(state)
    batch = run.mix(images, labels, indices)
    assert batch.op != "none"  # --warmup 0 and this seed: the batch is mixed
    out = run.model(batch.images)
    teacher = run.teacher([blocks[-1] for blocks in out.features], out.logits)[0]
    lam = batch.lam
    def mixed_ce(z):
        per_sample = (lam * F.cross_entropy(z, batch.targets_a, reduction="none")
                      + (1 - lam) * F.cross_entropy(z, batch.targets_b, reduction="none"))
        return per_sample.mean()
    expected = sum(mixed_ce(z) for z in out.logits) + mixed_ce(teacher)
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("branches", [2, 3])
def test_dml_loss_is_ce_plus_mean_kl_to_the_other_networks(data, branches):
    run, args = fresh_run("dml", data, "--branches", str(branches))
    assert all(isinstance(network, ResNet) for network in run.model) and len(run.model) == branches
    images, labels, indices = a_batch(data)
    loss = step_loss(run, args, images, labels, indices)
    logits = [network(images) for network in run.model]
    expected = 0
    for i, own in enumerate(logits):
        others = [kl(own, other.detach(), 1.0) for j, other in enumerate(logits) if j != i]
        expected = expected + F.cross_entropy(own, labels) + sum(others) / (branches - 1)
    torch.testing.assert_close(loss, expected.detach())


@pytest.mark.parametrize("method", ["kdatff", "dml", "multibranch"])
def test_deployed_network_is_network_zero_and_the_ensemble_its_mean_or_teacher(data, method):
    run, _ = fresh_run(method, data)
    for module in (run.model, run.teacher):
        if module is not None:
            module.eval()
    images = data.test_images[:8]
    outputs = METHODS[method].outputs(run, images)
    deployed = METHODS[method].deployed(run)
    assert isinstance(deployed, ResNet)
    torch.testing.assert_close(deployed(images), outputs["top1"])
    torch.testing.assert_close(outputs["top1"], outputs["branch0_top1"])
    if method != "kdatff":  # no teacher: the mean of the logits
        mean = torch.stack([outputs["branch0_top1"], outputs["branch1_top1"]]).mean(0)
        torch.testing.assert_close(outputs["ensemble_top1"], mean)
