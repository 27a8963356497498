"""Train a small residual network on scikit-learn's 8x8 digits with MKF, KD-ATFF or plain
cross-entropy, and print the test accuracy after every epoch.

A training loop to copy: it uses only mkfkit's public API (``benchmarks/train.py`` is the
study harness, with method x seed grids, checkpoints and plots). The digits come with
scikit-learn (``pip install -e ".[demo]"``); nothing is downloaded.

    python examples/train_digits.py                    # MKF, about a minute on one CPU core
    python examples/train_digits.py --method kdatff
    python examples/train_digits.py --method baseline --epochs 10

MKF as benchmarks/RESULTS.md recommends (chosen on validation images): on every step the full
network trains with the mixed cross-entropy plus beta = 0.5 times the distillation from its own
stored knowledge of the two mixed images (the composite ``lam * K_a + (1 - lam) * K_b``); its
output is split back into per-image knowledge (the fraction) and folded into the bank. With
``--groups T`` >= 2 one sampled depth sub-network (group t > 0) also trains on every step,
distilling from the knowledge of group t - 1, the next larger network, as in the paper.
"""

import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import mkfkit
from mkfkit.models import MultiBranchResNet, ResNet


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--method", default="mkf", choices=["mkf", "kdatff", "baseline"])
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--groups", type=positive_int, default=1,
                        help="MKF: depth groups, the full network and T - 1 sub-networks")
    parser.add_argument("--beta", type=float, default=0.5, help="MKF: weight of the KD loss")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def load_data(device):
    """Normalised images Tensor[N, 1, 8, 8] and labels; a fixed 80/20 train/test split."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[: len(order) // 5], order[len(order) // 5 :]
    mean, std = images[train].mean(), images[train].std()
    images = ((images - mean) / std).to(device)
    return images[train], labels[train].to(device), images[test], labels[test].to(device)


def random_shift(images, generator):
    """Shift every image by up to one pixel in each direction (zero padding)."""
    size, _, height, width = images.shape
    padded = F.pad(images, [1, 1, 1, 1])
    dy, dx = torch.randint(0, 3, (2, size), generator=generator).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + height, dx[i] : dx[i] + width]
                        for i in range(size)])


def mkf_loss(logits, batch, group, bank, fraction, beta):
    """Mixed cross-entropy plus the distillation from the composite knowledge of group t - 1
    (the full network, group 0, from its own); then the output updates group t's knowledge."""
    teacher = bank.target(max(group - 1, 0), batch.index_a, batch.index_b, batch.lam)
    # Rows whose knowledge is not written yet (mask False) get no teacher.
    loss = mkfkit.mixed_cross_entropy(logits, batch) + beta * mkfkit.kd_loss(
        logits, teacher.probs, teacher_kind="probs", weight=teacher.mask)
    bank.update(group, logits.softmax(dim=1), batch.index_a, batch.index_b, batch.lam, fraction)
    return loss


def mkf_step(model, images, labels, ids, mix, sampler, bank, fraction, beta):
    batch = mix(images, labels, ids)  # unmixed batches come back with lam = 1
    loss = mkf_loss(model(batch.images), batch, 0, bank, fraction, beta)
    loss.backward()
    if sampler.num_groups > 1:
        with sampler.sample(include_full=False) as subnet:  # nested sub-networks, groups 1 .. T-1
            sub_loss = mkf_loss(model(batch.images), batch, subnet.group, bank, fraction, beta)
            sub_loss.backward()
        loss = loss + sub_loss
    return loss


def ensemble_logits(fusion, out):
    """The fused teacher's logits from every branch's last block and logits."""
    teacher_logits, _ = fusion([branch_features[-1] for branch_features in out.features],
                               out.logits)
    return teacher_logits


def kdatff_step(model, images, labels, attention, fusion):
    out = model(images)  # every branch's logits and the output of each of its blocks
    attention_loss = sum(attention(branch_features) for branch_features in out.features)
    loss = mkfkit.online_distillation_loss(out.logits, ensemble_logits(fusion, out), labels,
                                           attention_loss=attention_loss).total
    loss.backward()  # also advances the attention loss's warm-up ramp, once per backward
    return loss


def percent_correct(logits, labels):
    return logits.argmax(1).eq(labels).float().mean().item() * 100


@torch.no_grad()
def accuracies(model, fusion, images, labels):
    """Test top-1 in %: the network's (branch 0's for KD-ATFF) and the fused ensemble's."""
    model.eval()
    if fusion is None:
        result = {"accuracy": percent_correct(model(images), labels)}
    else:
        fusion.eval()
        out = model(images)
        result = {"accuracy": percent_correct(out.logits[0], labels),
                  "ensemble": percent_correct(ensemble_logits(fusion, out), labels)}
        fusion.train()
    model.train()
    return result


def main():
    args = parse_args()
    # These networks are tiny: more intra-op threads cost more than they gain on a CPU.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_images, train_labels, test_images, test_labels = load_data(device)
    steps_per_epoch = -(-len(train_labels) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    shape = dict(num_classes=10, in_channels=1, blocks=(2, 2, 2), widths=(16, 32, 64))

    if args.method == "kdatff":
        model = MultiBranchResNet(num_branches=2, **shape).to(device)
        fusion = mkfkit.FeatureFusionTeacher(model.feature_channels, model.num_branches).to(device)
        attention = mkfkit.AttentionTransferLoss(warmup_steps=total_steps // 10)
        parameters = list(model.parameters()) + list(fusion.parameters())
    else:
        model, fusion = ResNet(**shape).to(device), None
        parameters = list(model.parameters())
    if args.method == "mkf":
        mix = mkfkit.CompoundMix(warmup_steps=total_steps // 10,
                                 generator=torch.Generator().manual_seed(args.seed + 1))
        sampler = mkfkit.DepthSampler.from_model(model, num_groups=args.groups, seed=args.seed + 2)
        bank = mkfkit.KnowledgeBank(len(train_labels), 10, args.groups, device=device)
        fraction = mkfkit.LinearFraction()  # the paper's OPT2; mkfkit.QPFraction() is OPT1
    optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    data_generator = torch.Generator().manual_seed(args.seed)  # shuffling and shifts

    print(f"{args.method} on {len(train_labels)} training and {len(test_labels)} test digits, "
          f"{args.epochs} epoch(s) of {steps_per_epoch} steps, device {device}")
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(train_labels), generator=data_generator).to(device)
        loss_sum = 0.0
        for first in range(0, len(order), args.batch_size):
            ids = order[first : first + args.batch_size]
            images, labels = random_shift(train_images[ids], data_generator), train_labels[ids]
            optimizer.zero_grad()
            if args.method == "mkf":
                loss = mkf_step(model, images, labels, ids, mix, sampler, bank, fraction,
                                args.beta)
            elif args.method == "kdatff":
                loss = kdatff_step(model, images, labels, attention, fusion)
            else:
                loss = F.cross_entropy(model(images), labels)
                loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item()
        if args.method == "mkf":
            # Mixed batches (and sub-network passes) shifted the BatchNorm statistics:
            # re-estimate them for the full network from clean training images.
            mkfkit.recalibrate_batchnorm(model, train_images.split(500), num_samples=2000)
        scores = accuracies(model, fusion, test_images, test_labels)
        print(f"epoch {epoch:3d}/{args.epochs}  train loss {loss_sum / steps_per_epoch:.4f}  "
              + "  ".join(f"{name} {value:.2f} %" for name, value in scores.items()))


if __name__ == "__main__":
    main()
