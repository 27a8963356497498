"""Train a small residual network with the baseline, MKF and KD-ATFF, and compare them.

This is the driver (arguments, data, torchrun, checkpoints, evaluation, the tables); the
training step of every method, the plain loop in which every mkfkit block is called by hand,
is in ``benchmarks/methods/``, one module per family: read ``methods/mkf.py`` for MKF and
``methods/branches.py`` for KD-ATFF.

    python benchmarks/train.py                        # digits, 4 methods x 3 seeds, a few minutes
    python benchmarks/train.py --dataset fashion-mnist --epochs 15 --train-subset 10000 \\
        --methods baseline mkf-opt2 mkf-qp mkf-nofraction mkf-nomix mix-only
    python benchmarks/train.py --dataset cifar100 --data-dir ~/data/cifar-100-python \\
        --blocks 5 5 5 --epochs 200 --batch-size 128 --lr 0.1

Methods (``--methods``; the first four run by default):

* ``baseline`` (``methods/baseline.py``): cross-entropy on the full network.
* ``mkf-opt2`` (``methods/mkf.py``): MKF (compound mixing, depth sub-networks, knowledge bank,
  distillation from the next larger group) with the paper's linear fraction OPT2.
* ``mkf-qp``: MKF with the exact QP fraction (the paper's OPT1, solved in closed form).
* ``kdatff`` (``methods/branches.py``): two branches with attention transfer, a feature-fusion
  teacher and online distillation; the accuracy reported (``top1``) is branch 0's, the network
  a user deploys (the baseline's size); the fused ensemble's and each branch's are in the JSON.
* ablations in the spirit of the MKF paper's Table 4: ``mkf-nofraction`` (the mixed output
  updates the dominant image's knowledge as is), ``mkf-nomix`` (no compound mixing),
  ``mix-only`` (compound mixing and cross-entropy, no distillation).
* ``st`` (``methods/st.py``): Stimulative Training, the MKF authors' earlier method and the
  control a reviewer asks for: every step the full network trains with cross-entropy, then one
  sub-network that drops a uniformly drawn number of trailing blocks per stage
  (``DepthSampler.draw_trailing``) trains with ``KL(full network's detached output ||
  sub-network)``, weight 1, temperature 1; no mixing, no stored knowledge, no cross-entropy on
  the sub-network.
* KD-ATFF's published controls and ablations (``methods/branches.py``, ``methods/dml.py``):
  ``dml`` (Deep Mutual Learning: independent networks of the baseline's size, each with CE plus
  KL to the others' detached outputs), ``one`` (ONE: the branches with ONE's gate as the
  ensemble teacher, no attention transfer), ``kdatff-noat`` (fusion teacher, no attention
  transfer), ``kdatff-nofusion`` (attention transfer, ONE's gate as teacher), ``multibranch``
  (the branches with CE only: capacity without distillation) and ``kdatff-mix`` (KD-ATFF with
  compound mixing, not in the paper).

KD-ATFF's choices (docs/METHOD.md, its table of open points), the paper's values by default:
``--branches`` (2), ``--shared-stages`` (all but the last), ``--online-temperature`` (3),
``--theta`` (1, the KL to the teacher), ``--attention-weight`` (1, the paper's beta),
``--attention-warmup`` (0: the attention term at full weight from the first step). Every
method shares the driver's SGD with cosine schedule (``--lr``, ``--epochs``), not the paper's
step schedule, so that all methods train alike.

The defaults are the configuration the Fashion-MNIST study chose on its validation images
(benchmarks/RESULTS.md, "Does MKF work?"): **one depth group** (``--groups 1``: no
sub-networks), the full network distilling from its own fractioned mixed knowledge
(``--full-teacher self``) with ``--beta 0.5``. The paper's configuration is ``--groups 3
--full-teacher none --beta 2`` (and the loop ``cycle``). Choices the paper leaves open
(docs/METHOD.md, "Open points of the training loop"):

* ``--groups T`` (default 1; the paper: 3): depth groups, the full network being group 0.
* ``--mkf-loop cycle`` (default; the paper's text): one sampled network per step, the group
  cycling 0 (full net), 1, 2, ..., so with T = 3 the full network trains on every third step
  (in the study that under-trains it at the same number of epochs); with T = 1 it trains on
  every step. ``joint`` (T >= 2): the full network trains on every step with the loss of group
  0, then one sampled sub-network (group 1 .. T - 1) on the same batch with its group's loss;
  both gradients are summed, at about two steps' cost per step.
* ``--full-teacher self`` (default): the full network distils from its own stored knowledge
  (the composite of the two mixed images' rows, as it teaches a sub-network); ``none`` (the
  paper names no teacher for the full network): group 0 gets cross-entropy only.
* ``--knowledge-from previous`` (default, the paper): group t > 0 distils from group t - 1;
  ``full``: from the full network's knowledge.
* ``--beta`` (0.5; the paper: 2 on CIFAR-100, 0.5 on ImageNet), ``--beta-ramp E`` (beta rises
  linearly from 0 over E epochs; 0, the paper, no ramp), ``--temperature`` (1; not stated),
  ``--max-age N`` (teach only with knowledge written at most N steps ago; 0: any age).
* BatchNorm statistics are re-estimated from 2,000 clean training images before every
  evaluation of MKF (any T) and ST (``recalibrate_batchnorm``): sub-network passes and mixed
  batches shift them.

Honest evaluation: ``--validation-size N`` holds out the last N of the selected training
images (``--train-offset``, ``--train-subset``); no run trains on them, and ``--evaluate
validation`` reports accuracy on them instead of the test set, so settings are chosen without
touching the test set. ``benchmarks/study.sh`` runs the Fashion-MNIST study that way.

Diagnostics, logged per epoch in the JSON: ``train_top1`` (the full network on 2,000 clean
training images: is it overfitting?), ``ce`` and ``kd`` (the mean loss terms; ``kd`` without
beta), ``knowledge_age`` (steps since the teaching knowledge was written, weighted by lam) and
``fraction_l1`` (how far the fraction moves the clean estimates from the stored bases, half
the L1 distance). The multi-network methods add ``teacher_ce``, ``attention`` (the weighted
attention term), ``disagreement_kl`` and ``disagreement_top1`` (how different the branches'
predictions are), and at evaluation ``ensemble_top1``, ``branchN_top1`` and
``ensemble_minus_best_branch``; every run records in ``deployment`` the parameters and FLOPs
per image of the network deployed (branch 0 alone) and of the whole ensemble.

Output: a progress bar, a table (top-1 mean and sample standard deviation over seeds, training
seconds per epoch, time relative to the baseline), and in ``--out`` a JSON file and a PNG plot
of the test accuracy curves. ``--checkpoint PATH`` saves the whole study (finished runs and
the state of the current one) after every epoch; ``--resume`` continues it exactly.

Several processes (one machine, gloo on the CPU, NCCL with one GPU per process)::

    torchrun --standalone --nproc_per_node 2 benchmarks/train.py --methods baseline mkf-qp

Each process trains on its share of every epoch (the same seeded permutation everywhere, the
k-th of every P indices for process k); ``--batch-size`` is the batch of one step over all
processes, so a study takes the same steps whatever their number. DistributedDataParallel
averages the gradients; every process draws the same augmentation parameters, mixing and
sub-networks (all random draws are made for the whole batch); the knowledge bank takes in the
rows of every process (``KnowledgeBank(sync="all_gather")``); evaluation is shared out and the
counts summed, after every process takes the first one's BatchNorm statistics; the first
process alone prints, checkpoints and writes the results. At the end of every run the processes
compare a SHA-256 of their whole state (``process_state_sha256`` in the JSON) and stop if they
differ. A process that loses contact with the others (one was killed, or a collective operation
waits longer than ``--collective-timeout``) stops with a one-line error. A checkpoint resumes
exactly with the same number of processes.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, NoReturn, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device_report, print_table, synchronize, write_json  # noqa: E402
from datasets import (  # noqa: E402
    DATASETS, FASHION_MNIST_DIR, DatasetError, ImageData, load_dataset,
)
from image_folder import FolderImages, FolderOptions, load_image_folder  # noqa: E402

from methods import ATTENTION_METHODS, METHODS, MULTI_NETWORK_METHODS  # noqa: E402
from methods.run import Run  # noqa: E402

from mkfkit.depth import DepthSampler, recalibrate_batchnorm  # noqa: E402
from mkfkit._devices import to_device  # noqa: E402
from mkfkit.models import ResNet  # noqa: E402

DEFAULT_METHODS = ["baseline", "mkf-opt2", "mkf-qp", "kdatff"]
ALL_METHODS = list(METHODS)
CHECKPOINT_MAGIC = b"mkfkit-train-checkpoint-v1\n"
OUT = Path(__file__).resolve().parent / "out"  # the default --out
Images = Union[Tensor, FolderImages]  # a dataset's images, in memory or read from their files


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, ``error: ...``, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        # Every process of a torchrun launch parses the same command line: one says it.
        if launched_processes()[0] == 0:
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, unless the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "(default: " in text else super()._get_help_string(action)


def launched_processes() -> Tuple[int, int, int]:
    """``(rank, local rank, number of processes)`` of this process as torchrun set them in the
    environment; ``(0, 0, 1)`` for a plain ``python`` run."""
    return tuple(int(os.environ.get(name, default))  # type: ignore[return-value]
                 for name, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add = parser.add_argument
    add("--dataset", default="digits", choices=DATASETS + ("folder",),
        help="the images to train on; folder: your own, in --data-dir")
    add("--data-dir", default=None, metavar="DIR",
        help="dataset folder: fashion-mnist's IDX files (default: "
             f"{FASHION_MNIST_DIR}), cifar100's pickle release (required), folder's images "
             "(required: one sub-folder a class, in DIR or in DIR/train and DIR/test or DIR/val); "
             "digits has none")
    # Your own images (--dataset folder): benchmarks/image_folder.py says how they are read.
    add("--image-size", type=int, default=None, metavar="N",
        help="folder: resize the shorter side to N and crop the centre N x N (default: keep the "
             "size, which must then be the same for all images)")
    add("--channels", type=int, default=None, choices=[1, 3],
        help="folder: convert every image to 1 (grayscale) or 3 (RGB) channels (default: as the "
             "images are, which must then be all grayscale or all colour)")
    add("--mean", type=float, nargs="+", default=None, metavar="M",
        help="folder: normalise with this mean per channel (or one for all) of pixels in [0, 1] "
             "(default: the training images')")
    add("--std", type=float, nargs="+", default=None, metavar="S",
        help="folder: and this standard deviation (with --mean)")
    add("--bad-images", default="stop", choices=["stop", "skip"],
        help="folder: stop at an unreadable image, or leave each one out with a note naming it")
    add("--cache", default="auto", choices=["auto", "memory", "none"],
        help="folder: decode the images once and hold them in memory, or decode every batch "
             "from the files (none); auto: memory when they take at most a quarter of it")
    add("--workers", type=int, default=0, metavar="N",
        help="folder: processes that decode images ahead of training (0: the training process)")
    add("--flip", action=argparse.BooleanOptionalAction, default=None,
        help="mirror half of the training images, drawn per image (default: cifar100 and "
             "folder; not digits and fashion-mnist, which are not mirror-symmetric)")
    add("--train-subset", type=int, default=None, metavar="N",
        help="use only the first N training images (default: all)")
    add("--train-offset", type=int, default=0, metavar="K",
        help="skip the first K training images (with --train-subset: images K .. K + N - 1)")
    add("--validation-size", type=int, default=0, metavar="N",
        help="hold out the last N of the training images; the runs never train on them")
    add("--evaluate", default="test", choices=["test", "validation"],
        help="report accuracy on the test set or on the held-out validation images")
    add("--methods", nargs="+", default=DEFAULT_METHODS, choices=ALL_METHODS, metavar="METHOD",
        help=f"the methods to compare, of {', '.join(ALL_METHODS)} (see the module docstring)")
    add("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED", help="one run per method and seed")
    add("--epochs", type=int, default=20, help="passes over the training images per run")
    add("--batch-size", type=int, default=64,
        help="images per optimiser step; under torchrun split evenly over the processes")
    add("--lr", type=float, default=0.05, help="peak learning rate of SGD (cosine schedule)")
    add("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    add("--blocks", nargs="+", type=int, default=[2, 2, 2], metavar="N", help="basic blocks per stage")
    add("--widths", nargs="+", type=int, default=[16, 32, 64], metavar="C", help="channels per stage")
    add("--beta", type=float, default=0.5,
        help="MKF: weight of the distillation loss (the paper: 2 on CIFAR-100, 0.5 on ImageNet)")
    add("--beta-ramp", type=float, default=0.0, metavar="EPOCHS",
        help="MKF: raise beta linearly from 0 over this many epochs (0: the paper, no ramp)")
    add("--temperature", type=float, default=1.0, help="MKF: distillation temperature")
    add("--knowledge-from", default="previous", choices=["previous", "full"],
        help="MKF: group t > 0 distils from group t - 1 (the paper) or from the full network")
    add("--max-age", type=int, default=0, metavar="STEPS",
        help="MKF: teach only with knowledge written at most this many steps ago (0: any age)")
    add("--bank-momentum", type=float, default=0.5, help="MKF: EMA weight of new knowledge")
    add("--groups", type=int, default=1, metavar="T",
        help="MKF: depth groups (T), the full network being group 0 (the paper: 3)")
    add("--warmup", type=float, default=0.1, help="fraction of the steps without mixing")
    add("--mkf-loop", default="cycle", choices=["cycle", "joint"],
        help="MKF: one sampled network per step, the group cycling 0, 1, ..., T-1 (the paper's "
             "text), or the full network on every step plus one sampled sub-network (T >= 2)")
    add("--full-teacher", default="self", choices=["self", "none"],
        help="MKF: the full network (group 0) distils from its own stored knowledge (chosen on "
             "validation images: benchmarks/RESULTS.md, 'Does MKF work?'), or gets none (the "
             "paper)")
    add("--branches", type=int, default=2, metavar="N",
        help="KD-ATFF and its controls: branches of the multi-branch network (dml: networks)")
    add("--shared-stages", type=int, default=None, metavar="S",
        help="multi-branch methods: lower stages the branches share (default: all but the "
             "last, as ONE and KD-ATFF split; 0: only the stem)")
    add("--online-temperature", type=float, default=3.0, metavar="T",
        help="multi-branch methods: temperature of the KL to the ensemble teacher (the paper: 3)")
    add("--theta", type=float, default=1.0,
        help="multi-branch methods: weight of the KL to the ensemble teacher (the paper: 1)")
    add("--attention-weight", type=float, default=1.0,
        help="KD-ATFF: weight of the attention transfer (the paper's beta: 1)")
    add("--attention-warmup", type=float, default=0.0, metavar="FRACTION",
        help="KD-ATFF: ramp the attention transfer in linearly over this fraction of the steps "
             "(0: none, as in the paper)")
    add("--device", default="auto",
        help="auto (cuda if there is one, else cpu), cpu, cuda or cuda:N; under torchrun "
             "each process takes the GPU of its local rank")
    # The demo's networks are small: torch's intra-op threads cost more than they gain there,
    # and on a 2-core machine shared with another job two threads ran 2.7x slower than one.
    add("--threads", type=int, default=1,
        help="CPU threads for torch per process (raise it for big models)")
    add("--out", default=None, metavar="DIR",
        help="folder for the JSON file and the plot (default: benchmarks/out; under torchrun "
             "with P processes benchmarks/out/torchrun-P, so that a multi-process run does not "
             "overwrite a single-process run's files)")
    add("--checkpoint", default=None, metavar="PATH", help="save the study here after every epoch")
    add("--resume", action="store_true", help="continue the study saved in --checkpoint")
    add("--checkpoint-every", type=int, default=None, metavar="N",
        help="also save every N steps (needs --checkpoint)")
    add("--stop-after", type=int, default=None, metavar="N",
        help="stop after N steps, to be continued with --resume (needs --checkpoint)")
    add("--eval-every", type=int, default=1, metavar="N",
        help="evaluate every N epochs (and after the last); diagnostics are logged every epoch")
    add("--collective-timeout", type=float, default=600.0, metavar="SECONDS",
        help="under torchrun: seconds a process waits for the others in a collective "
             "operation before it stops with an error")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None:
        processes = launched_processes()[2]
        args.out = str(OUT if processes == 1 else OUT / f"torchrun-{processes}")
    for problem in argument_problems(args):
        parser.error(problem)
    args.device = resolve_device(parser, args.device)
    args.processes = launched_processes()[2]
    return args


def argument_problems(args: argparse.Namespace) -> Iterator[str]:
    """What is wrong with the parsed arguments, one message each (checks that need no data)."""
    at_least = [("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                ("--threads", args.threads, 1), ("--eval-every", args.eval_every, 1),
                ("--train-subset", args.train_subset, 1), ("--train-offset", args.train_offset, 0),
                ("--validation-size", args.validation_size, 0), ("--max-age", args.max_age, 0),
                ("--groups", args.groups, 1), ("--checkpoint-every", args.checkpoint_every, 1),
                ("--stop-after", args.stop_after, 1), ("--image-size", args.image_size, 1),
                ("--workers", args.workers, 0)]
    at_least += [("--blocks", blocks, 1) for blocks in args.blocks]
    at_least += [("--widths", width, 1) for width in args.widths]
    for option, value, minimum in at_least:
        if value is not None and value < minimum:
            yield f"{option} must be >= {minimum}, but got {value}"
    positive = [("--lr", args.lr), ("--temperature", args.temperature),
                ("--online-temperature", args.online_temperature),
                ("--collective-timeout", args.collective_timeout)]
    for option, value in positive:
        if not value > 0:  # NaN too
            yield f"{option} must be > 0, but got {value}"
    for option, value in [("--weight-decay", args.weight_decay), ("--beta", args.beta),
                          ("--beta-ramp", args.beta_ramp), ("--theta", args.theta),
                          ("--attention-weight", args.attention_weight)]:
        if not value >= 0:
            yield f"{option} must be >= 0, but got {value}"
    if not 0 < args.bank_momentum <= 1:
        yield f"--bank-momentum must lie in (0, 1], but got {args.bank_momentum}"
    for option, value in [("--warmup", args.warmup), ("--attention-warmup", args.attention_warmup)]:
        if not 0 <= value <= 1:
            yield f"{option} must lie in [0, 1] (a fraction of the steps), but got {value}"
    multi = [method for method in args.methods if method in MULTI_NETWORK_METHODS]
    if multi and args.branches < 2:
        yield f"--branches must be >= 2 for {', '.join(multi)}, but got {args.branches}"
    if args.shared_stages is not None and not 0 <= args.shared_stages < len(args.blocks):
        yield (f"--shared-stages must lie in [0, {len(args.blocks) - 1}] (fewer than the "
               f"{len(args.blocks)} stages of --blocks), but got {args.shared_stages}")
    elif len(args.blocks) == len(args.widths):
        shared = len(args.blocks) - 1 if args.shared_stages is None else args.shared_stages
        own = sum(args.blocks[shared:])
        attention = [method for method in args.methods if method in ATTENTION_METHODS]
        if attention and own < 2:
            yield (f"{', '.join(attention)} transfer attention between consecutive blocks of a "
                   f"branch, but with --blocks {' '.join(map(str, args.blocks))} and "
                   f"--shared-stages {shared} each branch has {own} block: give the unshared "
                   "stages 2 blocks or more, or share fewer stages")
    for option, values in [("--methods", args.methods), ("--seeds", args.seeds)]:
        repeated = sorted({str(value) for value in values if values.count(value) > 1})
        if repeated:
            yield f"{option} names {', '.join(repeated)} more than once"
    if len(args.blocks) != len(args.widths):
        yield (f"--blocks and --widths need one value per stage each, but got {len(args.blocks)} "
               f"and {len(args.widths)} values")
    if args.dataset == "digits" and args.data_dir is not None:
        yield "--data-dir has no effect with --dataset digits (it comes with scikit-learn): drop it"
    if args.dataset == "folder" and args.data_dir is None:
        yield "--dataset folder needs --data-dir DIR: a folder with one sub-folder of images per class"
    folder_only = [("--image-size", args.image_size), ("--channels", args.channels),
                   ("--mean", args.mean), ("--std", args.std),
                   ("--bad-images", args.bad_images != "stop"), ("--cache", args.cache != "auto"),
                   ("--workers", args.workers)]
    for option, value in folder_only:
        if args.dataset != "folder" and value:
            yield f"{option} applies to --dataset folder only, but got --dataset {args.dataset}"
    if (args.mean is None) != (args.std is None):
        yield "--mean and --std go together: pass both or neither"
    for value in args.std or []:
        if not value > 0:
            yield f"--std must be > 0, but got {value}"
    if args.evaluate == "validation" and args.validation_size == 0:
        yield "--evaluate validation needs --validation-size N > 0"
    for option, given in [("--resume", args.resume), ("--checkpoint-every", args.checkpoint_every),
                          ("--stop-after", args.stop_after)]:
        if given and not args.checkpoint:
            yield f"{option} needs --checkpoint PATH"
    if args.checkpoint:
        folder = Path(args.checkpoint).resolve().parent
        if Path(args.checkpoint).is_dir():
            yield f"--checkpoint {args.checkpoint} is a folder; expected a file name"
        elif not folder.is_dir():
            yield f"--checkpoint {args.checkpoint}: the folder {folder} does not exist"
    if Path(args.out).exists() and not Path(args.out).is_dir():
        yield f"--out {args.out} is a file; expected a folder (created if missing)"
    if args.mkf_loop == "joint" and args.groups < 2 and any(
        method.startswith("mkf") for method in args.methods
    ):
        yield "--mkf-loop joint trains a sub-network besides the full one: it needs --groups >= 2"
    _, _, processes = launched_processes()
    if args.batch_size % processes:
        yield (f"--batch-size {args.batch_size} must be a multiple of the {processes} processes "
               "that torchrun started (each process takes an equal part of every batch)")
    if len(args.blocks) == len(args.widths) and min(args.blocks + args.widths) >= 1:
        yield from depth_problems(args)


def depth_problems(args: argparse.Namespace) -> Iterator[str]:
    """Whether the network of ``--blocks`` can be cut into ``--groups`` depth groups: the
    library's own rule, asked by building the depth sampler that MKF (and ST) would build."""
    model = ResNet(blocks=args.blocks, widths=args.widths)
    blocks = " ".join(map(str, args.blocks))
    if any(method.startswith("mkf") for method in args.methods):
        try:
            DepthSampler.from_model(model, num_groups=args.groups, seed=0)
        except ValueError as error:
            yield f"--groups {args.groups} does not fit --blocks {blocks}: {error}"
    if "st" in args.methods:
        try:
            DepthSampler.from_model(model, num_groups=1, seed=0)
        except ValueError as error:
            yield f"--blocks {blocks} leaves st no block to drop: {error}"


def resolve_device(parser: OneLineParser, device: str) -> str:
    """``--device`` checked against this torch build and machine; ``auto`` resolved and, under
    torchrun on CUDA, the GPU of this process's local rank chosen."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda") or (
        parsed.type == "cpu" and parsed.index is not None
    ):
        parser.error(f"--device must be auto, cpu, cuda or cuda:N, but got {device!r}")
    if parsed.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        build = "this torch build has no CUDA support" if torch.version.cuda is None else (
            "no CUDA device is visible")
        parser.error(f"--device {device}: {build} (torch {torch.__version__}); use --device cpu")
    visible = torch.cuda.device_count()
    _, local_rank, processes = launched_processes()
    if processes > 1:
        if parsed.index is not None:
            parser.error(f"--device {device}: under torchrun each process takes the GPU of its "
                         "local rank; pass --device cuda")
        if local_rank >= visible:
            parser.error(f"torchrun started more processes on this machine than the {visible} "
                         "visible GPU(s): pass --nproc_per_node at most that, or --device cpu")
        return f"cuda:{local_rank}"
    if parsed.index is not None and parsed.index >= visible:
        parser.error(f"--device {device}: only {visible} CUDA device(s) are visible "
                     f"(cuda:0 .. cuda:{visible - 1})")
    return device


# ---------------------------------------------------------------------------------------------
# Data: whole datasets live in memory as tensors; batches are slices of a seeded permutation.
# A folder of images too large for memory is a FolderImages instead, which decodes the images
# that a batch asks for (a slice of it is a FolderImages of those files).
# The random draws come from a CPU generator (the same stream on every device); on CUDA they
# reach the GPU through `to_device`, which does not make the host wait for the queued steps.
#
# Under torchrun every process holds the whole dataset and draws the same permutation; each
# takes its share of it (`share_of_epoch`) and an equal part of every batch. Every random draw
# is made for the batches of all processes together, the same on each, so the generators stay
# in step on every process and the first process's checkpoint resumes them all.


def share_of_epoch(order: Tensor) -> Tensor:
    """This process's share of an epoch's permutation: every P-th index from its rank on, after
    the last ``len % P`` are left out (P processes), so the shares are disjoint and equally long,
    and the k-th batches of all processes together hold the k-th ``--batch-size`` slice of the
    permutation, as the k-th batch of one process does."""
    rank, _, processes = launched_processes()
    return order[rank : len(order) - len(order) % processes : processes]


def draws_for_all_processes(size: int) -> Tuple[int, slice]:
    """How many draws to make for a batch of ``size`` images on each process, and which of them
    belong to this process's images."""
    rank, _, processes = launched_processes()
    return size * processes, slice(rank * size, (rank + 1) * size)


def random_crop(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Shift each image by up to ``padding`` pixels (zero padding), the standard augmentation."""
    size, channels, height, width = images.shape
    padded = F.pad(images, [padding] * 4)
    draws, mine = draws_for_all_processes(size)
    shifts = torch.randint(0, 2 * padding + 1, (2, draws, 1, 1, 1), generator=generator)[:, mine]
    shift_y, shift_x = to_device(shifts, images.device)
    rows = torch.arange(height, device=images.device).view(1, 1, height, 1) + shift_y
    cols = torch.arange(width, device=images.device).view(1, 1, 1, width) + shift_x
    batch = torch.arange(size, device=images.device).view(size, 1, 1, 1)
    channel = torch.arange(channels, device=images.device).view(1, channels, 1, 1)
    return padded[batch, channel, rows, cols]


def augment(images: Tensor, args: argparse.Namespace, generator: torch.Generator) -> Tensor:
    images = random_crop(images, padding=max(1, images.shape[-1] // 8), generator=generator)
    if flips(args):
        draws, mine = draws_for_all_processes(images.shape[0])
        flip = to_device(torch.rand(draws, generator=generator)[mine] < 0.5, images.device)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
    return images


def flips(args: argparse.Namespace) -> bool:
    """``--flip``, by default for the datasets whose images may be mirrored (digits and clothes
    are not mirror-symmetric)."""
    return args.flip if args.flip is not None else args.dataset in ("cifar100", "folder")


def in_batches(images: Images, batch_size: int = 1000) -> Iterator[Tensor]:
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        yield batch.load() if isinstance(batch, FolderImages) else batch


def epoch_batches(images: Images, batches: List[Tensor], workers: int) -> Iterator[Tensor]:
    """``images[indices]`` for each ``indices`` of ``batches``, when asked; images streamed
    from their files are decoded ahead by ``--workers`` processes."""
    if isinstance(images, FolderImages):
        return images.stream(batches, workers)
    return (images[indices] for indices in batches)


# ---------------------------------------------------------------------------------------------
# One run = one method with one seed. `Run` holds every stateful object of the training loop.


def build_run(method: str, seed: int, args: argparse.Namespace, data: ImageData) -> Run:
    torch.manual_seed(seed)  # the model's initial weights
    run = Run(method, seed, None, None, None, torch.Generator().manual_seed(seed),  # type: ignore
              steps=args.epochs * steps_per_epoch(data, args))
    METHODS[method].build(run, args, data)
    parameters = list(run.model.parameters())
    if run.teacher is not None:
        parameters += list(run.teacher.parameters())
    run.train_model, run.train_teacher = run.model, run.teacher  # replicate() wraps them
    run.optimizer = torch.optim.SGD(parameters, lr=args.lr, momentum=0.9, nesterov=True,
                                    weight_decay=args.weight_decay)
    run.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(run.optimizer, T_max=run.steps)
    return run


def replicate(run: Run) -> None:
    """Under torchrun: wrap the trained modules in DistributedDataParallel, which gives every
    process the first one's weights and averages the gradients over the processes."""
    device = next(run.model.parameters()).device
    device_ids = [device] if device.type == "cuda" else None
    # A sub-network leaves the dropped blocks' parameters unused, the same ones on every
    # process. find_unused_parameters lets DDP finish its reduction without them and leaves
    # their grad None, as in one process; SubNetwork.zero_touch would give them zero gradients
    # instead, which SGD's weight decay and momentum then act on. ST needs it too: its
    # sub-network's backward runs apart from the full network's.
    run.train_model = DistributedDataParallel(run.model, device_ids=device_ids,
                                              find_unused_parameters=run.sampler is not None)
    if run.teacher is not None:
        run.train_teacher = DistributedDataParallel(run.teacher, device_ids=device_ids)


def steps_per_epoch(data: ImageData, args: argparse.Namespace) -> int:
    processes = launched_processes()[2]
    share = len(data.train_labels) // processes
    return -(-share // (args.batch_size // processes))


# ---------------------------------------------------------------------------------------------
# Training steps: each method's own is in methods/ (the loop to read and copy).


def train_step(run: Run, images: Tensor, labels: Tensor, indices: Tensor,
               args: argparse.Namespace, per_epoch: int) -> Tensor:
    run.optimizer.zero_grad()
    loss = METHODS[run.method].step(run, images, labels, indices, args, per_epoch)
    run.optimizer.step()
    run.scheduler.step()
    run.step += 1
    return loss.detach()


TRAIN_ACCURACY_IMAGES = 2000  # clean training images on which the train accuracy is measured


@torch.no_grad()
def evaluate(run: Run, data: ImageData) -> Dict[str, float]:
    """Top-1 on the evaluation images (``data.test_*``: the test set or the validation
    images) and ``train_top1`` on the first clean training images, in percent.

    Under torchrun each process evaluates a share of the images and the counts are summed."""
    if run.sampler is not None:
        # Sub-network passes and mixed batches shifted the BatchNorm statistics; re-estimate them
        # for the full net (on every process from the same images).
        recalibrate_batchnorm(run.model, in_batches(data.train_images, 500), num_samples=2000)
    modules = [module for module in (run.model, run.teacher) if module is not None]
    for module in modules:
        if launched_processes()[2] > 1:
            # The processes share the weights but each kept the BatchNorm statistics of its own
            # last batch: all take the first process's, as DDP does before each training step.
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)
        module.eval()
    accuracy = accuracies(run, data.test_images, data.test_labels)
    train_images = data.train_images[:TRAIN_ACCURACY_IMAGES]
    train_labels = data.train_labels[:TRAIN_ACCURACY_IMAGES]
    accuracy["train_top1"] = accuracies(run, train_images, train_labels)["top1"]
    for module in modules:
        module.train()
    return accuracy


def accuracies(run: Run, images: Tensor, labels: Tensor) -> Dict[str, float]:
    """Top-1 in percent of every output the method evaluates (``top1``: the deployed network;
    multi-network methods add the ensemble and each branch, and ``ensemble_minus_best_branch``)."""
    outputs = METHODS[run.method].outputs
    correct: Optional[Tensor] = None  # on the device: one transfer at the end
    rank, _, processes = launched_processes()
    share = slice(rank, None, processes)
    for image_batch, label_batch in zip(in_batches(images[share]), in_batches(labels[share])):
        logits = outputs(run, image_batch)
        counts = torch.stack([(value.argmax(1) == label_batch).sum() for value in logits.values()])
        correct = counts if correct is None else correct + counts
    if processes > 1:
        dist.all_reduce(correct)
    result = {name: 100.0 * int(count) / len(labels) for name, count in zip(logits, correct)}
    branches = [value for name, value in result.items() if re.fullmatch(r"branch\d+_top1", name)]
    if branches:
        result["ensemble_minus_best_branch"] = result["ensemble_top1"] - max(branches)
    return result


# Diagnostics summed once per step, reported as their mean per step: the multi-network
# methods' teacher cross-entropy, attention term (weighted, ramp included) and the branches'
# disagreement (mkfkit.fusion.branch_disagreement: KL and share of differing predictions).
PER_STEP_DIAGNOSTICS = ("ce", "teacher_ce", "attention", "disagreement_kl", "disagreement_top1")


@torch.no_grad()
def deployment_cost(run: Run, data: ImageData) -> Dict[str, Dict[str, int]]:
    """Parameters and FLOPs per image (multiply-adds count 2, torch's FLOP counter) of what a
    user deploys: ``single``, the method's one network (for multi-network methods branch or
    network 0, the baseline's size), and ``ensemble``, everything evaluation runs (every
    network, and the ensemble teacher)."""
    from torch.utils.flop_counter import FlopCounterMode

    image = next(in_batches(data.test_images[:1]))
    single = METHODS[run.method].deployed(run)
    whole = [module for module in (run.model, run.teacher) if module is not None]
    cost = {}
    for name, modules, forward in (
        ("single", [single], lambda: single(image)),
        ("ensemble", whole, lambda: METHODS[run.method].outputs(run, image)),
    ):
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        with FlopCounterMode(display=False) as counter:
            forward()
        for module, mode in zip(modules, modes):
            module.train(mode)
        cost[name] = {"parameters": sum(p.numel() for m in modules for p in m.parameters()),
                      "flops": counter.get_total_flops()}
    return cost


def epoch_diagnostics(run: Run, per_epoch: int) -> Dict[str, float]:
    """This epoch's means: the loss terms per step (CE; KD unweighted by beta or theta; see
    PER_STEP_DIAGNOSTICS), the age in steps of the knowledge that taught, how far the fraction
    moved estimates from the stored bases."""
    stats = {name: float(value) for name, value in run.stats.items()}
    out = {name: stats[name] / per_epoch for name in PER_STEP_DIAGNOSTICS if name in stats}
    if stats.get("kd_steps"):
        out["kd"] = stats["kd"] / stats["kd_steps"]
    if stats.get("age_rows"):
        out["knowledge_age"] = stats["age_sum"] / stats["age_rows"]
    if stats.get("fraction_rows"):
        out["fraction_l1"] = stats["fraction_sum"] / stats["fraction_rows"]
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints: the whole study in one file, with a SHA-256 of its content. Everything is
# validated (and loaded into fresh objects) before training starts or anything is written.


class CheckpointError(Exception):
    """A checkpoint is missing, corrupted, or belongs to another configuration."""


CONFIG_KEYS = ["dataset", "train_subset", "train_offset", "validation_size", "evaluate",
               "methods", "seeds", "epochs", "batch_size", "lr", "weight_decay", "blocks",
               "widths", "beta", "beta_ramp", "temperature", "knowledge_from", "max_age",
               "bank_momentum", "groups", "warmup", "mkf_loop", "full_teacher", "processes",
               "branches", "shared_stages", "online_temperature", "theta", "attention_weight",
               "attention_warmup", "image_size", "channels", "mean", "std", "bad_images", "flip"]
# What checkpoints written before a setting was recorded ran with.
UNRECORDED_SETTINGS = {"processes": 1, "image_size": None, "channels": None, "mean": None,
                       "std": None, "bad_images": "stop", "flip": None}


def run_state(run: Run) -> Dict[str, Any]:
    """Everything needed to continue ``run`` exactly. Under torchrun every process calls it at
    the same point: the one state that differs between them, their own partial sums of this
    epoch's loss and diagnostics, is gathered into lists in rank order."""
    state = {name: obj.state_dict() for name, obj in run.stateful().items() if obj is not None}
    partial_sums = {"loss_sum": run.loss_sum.cpu(),
                    "stats": {name: value.cpu() for name, value in run.stats.items()}}
    processes = launched_processes()[2]
    if processes > 1:
        gathered: List[Any] = [None] * processes
        dist.all_gather_object(gathered, partial_sums)
        partial_sums = {name: [sums[name] for sums in gathered] for name in partial_sums}
    state.update(
        method=run.method, seed=run.seed, epoch=run.epoch, batch_in_epoch=run.batch_in_epoch,
        order=run.order, data_generator=run.data_generator.get_state(),
        train_seconds=run.train_seconds, history=run.history, torch_rng=torch.get_rng_state(),
        step=run.step, last_write=run.last_write, **partial_sums,
    )
    return state


def restore_run(run: Run, state: Dict[str, Any]) -> None:
    for name, obj in run.stateful().items():
        if obj is not None:
            obj.load_state_dict(state[name])
    run.data_generator.set_state(state["data_generator"])
    run.epoch, run.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
    run.order, run.train_seconds = state["order"], float(state["train_seconds"])
    loss_sum, stats = state["loss_sum"], state["stats"]
    rank, _, processes = launched_processes()
    if processes > 1:  # every process's own partial sums (see run_state)
        loss_sum, stats = loss_sum[rank], stats[rank]
    run.loss_sum, run.stats = loss_sum, dict(stats)
    run.history, run.step = list(state["history"]), int(state["step"])
    if run.last_write is not None:
        run.last_write.copy_(state["last_write"])
    torch.set_rng_state(state["torch_rng"])


def save_checkpoint(path: str, study: Dict[str, Any]) -> None:
    """Write ``study`` to ``path``; under torchrun only the first process writes (all of them
    hold the same state)."""
    if launched_processes()[0] != 0:
        return
    buffer = io.BytesIO()
    torch.save(study, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    temporary = f"{path}.tmp"
    with open(temporary, "wb") as file:
        file.write(CHECKPOINT_MAGIC + digest + b"\n" + payload)
    os.replace(temporary, path)  # atomic: an interruption never leaves a half-written file


def load_checkpoint(path: str, args: argparse.Namespace) -> Dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({error.strerror})") from None
    header = len(CHECKPOINT_MAGIC)
    digest, payload = raw[header : header + 64], raw[header + 65 :]
    if not raw.startswith(CHECKPOINT_MAGIC):
        raise CheckpointError(f"{path}: not a checkpoint of benchmarks/train.py")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path}: the checkpoint is corrupted (SHA-256 mismatch)")
    try:
        # On the CPU: generator states must stay there; load_state_dict moves the rest.
        study = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as error:  # a valid digest but unreadable content: another torch version
        raise CheckpointError(f"{path}: cannot load the checkpoint ({error})") from None
    if not isinstance(study, dict) or set(study) != {"config", "results", "steps_done", "current"}:
        raise CheckpointError(f"{path}: not a checkpoint of benchmarks/train.py")
    saved = {**UNRECORDED_SETTINGS, **study["config"]}
    given = config_of(args)
    different = [f"{setting_name(k)} {saved.get(k)} (saved) vs {given[k]} (given)"
                 for k in CONFIG_KEYS if saved.get(k) != given[k]]
    if different:
        raise CheckpointError(f"{path}: saved with other settings: " + "; ".join(different))
    return study


def setting_name(key: str) -> str:
    """How the user sets ``key``: an option, or torchrun's number of processes."""
    return "processes (torchrun --nproc_per_node)" if key == "processes" else (
        f"--{key.replace('_', '-')}")


def config_of(args: argparse.Namespace) -> Dict[str, Any]:
    return {key: getattr(args, key) for key in CONFIG_KEYS}


# ---------------------------------------------------------------------------------------------
# The study: every method with every seed, then a table, a JSON file and a plot.


def train_run(run: Run, data: ImageData, args: argparse.Namespace, study: Dict[str, Any],
              progress) -> bool:
    """Train ``run`` to the end (True) or until ``--stop-after`` steps (False)."""
    device = torch.device(args.device)
    per_epoch = steps_per_epoch(data, args)
    batch_size = args.batch_size // launched_processes()[2]  # this process's part of a batch
    while run.epoch < args.epochs:
        if run.order is None:
            run.order = torch.randperm(len(data.train_labels), generator=run.data_generator)
        start = time.perf_counter()
        # run.order stays on the CPU for the checkpoint
        order = to_device(share_of_epoch(run.order), device)
        # the epoch's remaining batches: a run resumed in mid-epoch continues with the next one
        batches = [order[first : first + batch_size]
                   for first in range(run.batch_in_epoch * batch_size, len(order), batch_size)]
        images_of = epoch_batches(data.train_images, batches, args.workers)
        while run.batch_in_epoch < per_epoch:
            first = run.batch_in_epoch * batch_size
            indices = order[first : first + batch_size]
            images = augment(next(images_of), args, run.data_generator)
            loss = train_step(run, images, data.train_labels[indices], indices, args, per_epoch)
            run.loss_sum = run.loss_sum + loss  # a tensor: no host synchronisation per step
            run.batch_in_epoch += 1
            progress.update(1)
            study["steps_done"] += 1
            if args.checkpoint_every and study["steps_done"] % args.checkpoint_every == 0:
                run.train_seconds += pause(start, device)
                save_checkpoint(args.checkpoint, {**study, "current": run_state(run)})
                start = time.perf_counter()
            if args.stop_after is not None and study["steps_done"] >= args.stop_after:
                run.train_seconds += pause(start, device)
                if args.checkpoint:
                    save_checkpoint(args.checkpoint, {**study, "current": run_state(run)})
                return False
        run.train_seconds += pause(start, device)
        sums = mean_over_processes({"loss": run.loss_sum, **run.stats}, device)
        mean_loss = float(sums.pop("loss")) / per_epoch
        run.stats = sums
        run.epoch, run.batch_in_epoch, run.order = run.epoch + 1, 0, None
        run.loss_sum = torch.zeros(())
        last = run.epoch == args.epochs
        accuracy = evaluate(run, data) if last or run.epoch % args.eval_every == 0 else {}
        run.history.append({"epoch": run.epoch, "train_loss": mean_loss, **accuracy,
                            **epoch_diagnostics(run, per_epoch)})
        run.stats = {}
        if accuracy:
            progress.set_postfix(method=run.method, epoch=run.epoch,
                                 top1=f"{accuracy['top1']:.2f}")
        if args.checkpoint:
            save_checkpoint(args.checkpoint, {**study, "current": run_state(run)})
    return True


def mean_over_processes(sums: Dict[str, Tensor], device: torch.device) -> Dict[str, Tensor]:
    """This epoch's sums (the loss, the diagnostics) averaged over the processes; alone, as
    they are. Every process has the same names: they all take the same paths through a step."""
    processes = launched_processes()[2]
    if processes == 1:
        return sums
    names = sorted(sums)
    values = torch.stack([sums[name].to(device, torch.float64) for name in names])
    dist.all_reduce(values)
    return dict(zip(names, (values / processes).cpu()))


def pause(start: float, device: torch.device) -> float:
    """Seconds since ``start``, after the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter() - start


def summarise(results: Dict[str, Dict[str, Any]], methods: List[str]) -> List[Dict[str, Any]]:
    rows = []
    for method in methods:
        runs = [r for r in results.values() if r["method"] == method]
        accuracy = [r["top1"] for r in runs]
        seconds = statistics.mean(r["seconds_per_epoch"] for r in runs)
        rows.append({"method": method, "top1_mean": statistics.mean(accuracy),
                     "top1_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                     "seeds": len(runs), "seconds_per_epoch": seconds})
    baseline = next((row for row in rows if row["method"] == "baseline"), None)
    for row in rows:
        row["time_vs_baseline"] = (row["seconds_per_epoch"] / baseline["seconds_per_epoch"]
                                   if baseline else None)
    return rows


TABLE = [
    ("method", "method", "<"),
    ("top-1 (%)", lambda row: f"{row['top1_mean']:.2f} ± {row['top1_std']:.2f}", ""),
    ("s/epoch", "seconds_per_epoch", ".3f"),
    ("x baseline", "time_vs_baseline", ".2f"),  # "-" without a baseline run
]


# Line styles and markers tell the methods apart where colours do not (print, colour blindness).
LINE_STYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
MARKED_POINTS = 10  # markers per line and panel: enough to follow a line, few enough to read


def accuracy_figure(results: Dict[str, Dict[str, Any]], methods: List[str], title: str):
    """The accuracy curves of every method: the mean over seeds with a band of one sample
    standard deviation (the table's spread), over all epochs and zoomed on the last third,
    where the y range is fitted to the curves so that the final differences show.

    Only evaluated epochs are plotted (``--eval-every``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(13, 4.5),
                                         gridspec_kw={"width_ratios": [3, 2]})
    seeds = set()
    zoomed: List[Tensor] = []
    for position, method in enumerate(methods):
        histories = [[h for h in r["history"] if "top1" in h]
                     for r in results.values() if r["method"] == method]
        seeds.add(len(histories))
        curves = torch.tensor([[h["top1"] for h in history] for history in histories])
        epochs = torch.tensor([h["epoch"] for h in histories[0]])
        mean = curves.mean(0)
        spread = curves.std(0) if len(histories) > 1 else torch.zeros_like(mean)
        last_third = epochs > epochs[-1] * 2 / 3
        last_third[-2:] = True  # two points at least: a line
        for axes, shown in ((whole, slice(None)), (zoom, last_third)):
            x, y, band = epochs[shown], mean[shown], spread[shown]
            axes.plot(x, y, label=method, color=f"C{position % 10}",
                      linestyle=LINE_STYLES[position % len(LINE_STYLES)],
                      marker=MARKERS[position % len(MARKERS)],
                      markevery=max(1, len(x) // MARKED_POINTS))
            axes.fill_between(x, y - band, y + band, color=f"C{position % 10}", alpha=0.15,
                              linewidth=0)
        zoomed += [mean[last_third] - spread[last_third], mean[last_third] + spread[last_third]]
    low, high = float(torch.cat(zoomed).min()), float(torch.cat(zoomed).max())
    margin = max(0.1 * (high - low), 0.5)  # half a point at least: a flat line stays visible
    zoom.set_ylim(low - margin, high + margin)
    whole.set(xlabel="epoch", ylabel="top-1 (%)", title="all epochs")
    zoom.set(xlabel="epoch", title="last third of the epochs, zoomed")
    for axes in (whole, zoom):
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(alpha=0.3)
    count = seeds.pop() if len(seeds) == 1 else f"{min(seeds)}-{max(seeds)}"
    spread_text = ("line: the one seed" if count == 1 else
                   f"line: mean over {count} seeds\nband: ± 1 sample standard deviation")
    # beside the panels: inside, it would hide the ends of the curves
    zoom.legend(title=spread_text, fontsize="small", title_fontsize="small", loc="upper left",
                bbox_to_anchor=(1.02, 1), alignment="left")
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot(results: Dict[str, Dict[str, Any]], methods: List[str], path: Path, title: str) -> None:
    """Save :func:`accuracy_figure` as a PNG file at ``path``."""
    import matplotlib.pyplot as plt

    figure = accuracy_figure(results, methods, title)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def state_digest(state: Any) -> str:
    """SHA-256 of a nested state: dicts, lists, tensors (bit for bit), other values by repr."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, Tensor):
            digest.update(f"tensor {value.dtype} {tuple(value.shape)}".encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            digest.update(f"dict {len(value)}".encode())
            for key in sorted(value, key=repr):
                digest.update(repr(key).encode())
                feed(value[key])
        elif isinstance(value, (list, tuple)):
            digest.update(f"list {len(value)}".encode())
            for item in value:
                feed(item)
        else:
            digest.update(repr(value).encode())

    feed(state)
    return digest.hexdigest()


def process_state_digest(run: Run) -> str:
    """SHA-256 of everything this process holds of ``run`` but the time it trained."""
    state = run_state(run)
    del state["train_seconds"]
    return state_digest(state)


def agreed_state_digests(run: Run, key: str) -> List[str]:
    """Every process's :func:`process_state_digest` of ``run``, in rank order, after checking
    that they are equal: the processes must end a run with the same state, bit for bit."""
    digests: List[Optional[str]] = [None] * launched_processes()[2]
    dist.all_gather_object(digests, process_state_digest(run))
    if len(set(digests)) > 1:
        raise RuntimeError(f"the processes ended {key} with different states (SHA-256 by rank: "
                           f"{digests}): a bug in train.py")
    return digests  # type: ignore[return-value]


def split(data: ImageData, args: argparse.Namespace) -> ImageData:
    """The training images ``--train-offset``.. (``--train-subset`` of them), less the last
    ``--validation-size``, which replace the test set when ``--evaluate validation``."""
    available = len(data.train_labels)
    if args.train_subset and args.train_offset + args.train_subset > available:
        raise DatasetError(
            f"--train-offset {args.train_offset} with --train-subset {args.train_subset} needs "
            f"{args.train_offset + args.train_subset} training images, but {args.dataset} has "
            f"{available}"
        )
    if args.train_offset >= available:
        raise DatasetError(f"--train-offset {args.train_offset} skips every training image: "
                           f"{args.dataset} has {available}")
    end = args.train_offset + args.train_subset if args.train_subset else None
    images = data.train_images[args.train_offset : end]
    labels = data.train_labels[args.train_offset : end]
    if args.validation_size >= len(labels):
        raise DatasetError(f"--validation-size {args.validation_size} leaves no training images "
                           f"of the {len(labels)} selected")
    keep = len(labels) - args.validation_size
    if keep < args.processes:
        raise DatasetError(f"the {keep} training images cannot be shared by {args.processes} "
                           "processes: pass more images or start fewer processes")
    data = data._replace(train_images=images[:keep], train_labels=labels[:keep])
    if args.evaluate == "validation":
        data = data._replace(test_images=images[keep:], test_labels=labels[keep:])
    return data


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.processes == 1:
        return study_main(args)
    join_processes(args)
    status = study_main(args)
    # Destroyed only after a clean finish, and only once every process has got here, so that
    # none leaves while another still sends. After a failure `exit_now` skips this.
    dist.barrier()
    dist.destroy_process_group()
    return status


def join_processes(args: argparse.Namespace) -> None:
    """Join the other processes of a torchrun launch: gloo on the CPU, NCCL on CUDA (one GPU
    per process). A collective that waits longer than ``--collective-timeout`` fails."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.collective_timeout))


def load_data(args: argparse.Namespace) -> ImageData:
    """The dataset of ``--dataset``, a built-in one or the folder of ``--data-dir``."""
    if args.dataset != "folder":
        return load_dataset(args.dataset, args.data_dir)
    options = FolderOptions(args.image_size, args.channels, args.mean, args.std, args.bad_images,
                            args.cache, args.workers, launched_processes()[2])
    return load_image_folder(args.data_dir, options)


def study_main(args: argparse.Namespace) -> int:
    """Every method with every seed; under torchrun the first process reports."""
    first_process = launched_processes()[0] == 0
    data = split(load_data(args), args)
    data = ImageData(*(tensor.to(args.device) for tensor in data))

    study = {"config": config_of(args), "results": {}, "steps_done": 0, "current": None}
    current = None
    if args.resume:
        study = load_checkpoint(args.checkpoint, args)
        if study["current"] is not None:
            state = study["current"]
            try:
                current = build_run(state["method"], state["seed"], args, data)
                restore_run(current, state)
            except (KeyError, ValueError, RuntimeError, TypeError) as error:
                raise CheckpointError(
                    f"{args.checkpoint}: the saved run does not fit this configuration ({error})"
                ) from None
    elif args.checkpoint and Path(args.checkpoint).exists():
        raise CheckpointError(f"{args.checkpoint} exists: pass --resume to continue it, or "
                              "remove it to start over")

    runs = [(method, seed) for method in args.methods for seed in args.seeds]
    total = len(runs) * args.epochs * steps_per_epoch(data, args)
    progress = tqdm(total=total, initial=study["steps_done"], unit="step",
                    disable=args.no_progress or not first_process, dynamic_ncols=True)
    for method, seed in runs:
        key = f"{method}/seed{seed}"
        if key in study["results"]:
            continue
        if current is not None and (current.method, current.seed) == (method, seed):
            run = current
        else:
            run = build_run(method, seed, args, data)
        if args.processes > 1:
            replicate(run)
        finished = train_run(run, data, args, study, progress)
        if not finished:
            progress.close()
            if first_process:
                print(f"stopped after {study['steps_done']} steps; continue with --resume")
            return 0
        study["results"][key] = {
            "method": method, "seed": seed, "history": run.history,
            "top1": run.history[-1]["top1"], "seconds_per_epoch": run.train_seconds / args.epochs,
            "deployment": deployment_cost(run, data),
        }
        if args.processes > 1:
            study["results"][key]["process_state_sha256"] = agreed_state_digests(run, key)
        if args.checkpoint:
            save_checkpoint(args.checkpoint, {**study, "current": run_state(run)})
    progress.close()
    if not first_process:
        return 0

    rows = summarise(study["results"], args.methods)
    print_table(rows, TABLE, title=f"{args.dataset}, {args.epochs} epoch(s), top-1 on the "
                f"{args.evaluate} images")
    print(f"(mean ± sample standard deviation over {rows[0]['seeds']} seed(s))")
    report = {"device": device_report(args.device), "config": config_of(args),
              "summary": rows, "runs": list(study["results"].values())}
    print(f"device: {report['device']}")
    out = Path(args.out)
    write_json(out / f"train_{args.dataset}.json", report)  # also creates the folder --out
    png_path = out / f"train_{args.dataset}.png"
    plot(study["results"], args.methods, png_path,
         f"{args.dataset}: top-1 on the {args.evaluate} images")
    print(f"wrote {png_path}")
    return 0


def lost_contact(error: RuntimeError) -> Optional[str]:
    """What went wrong, in one line, if ``error`` says that a collective operation failed (the
    other processes stopped, were killed or stopped answering); else None."""
    if launched_processes()[2] == 1 or not (
        isinstance(error, dist.DistError) or "gloo" in str(error) or "NCCL" in str(error)
    ):
        return None
    first_line = (str(error).splitlines() or [type(error).__name__])[0]
    # gloo starts with its source location and ends with advice: keep what happened
    return re.sub(r"^\[[^\]]*\]\s*", "", first_line).split(". ")[0]


def exit_now(status: int) -> NoReturn:
    """Exit with ``status``; a process of a torchrun launch without the interpreter's teardown.

    That teardown can abort a process that used gloo (SIGABRT, "terminate called without an
    active exception", in the main thread after its last Python frame), after a failure when
    another process is gone, and now and then after a clean finish and
    ``destroy_process_group`` too: the exit status would be lost, and with it a finished study.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if launched_processes()[2] > 1:
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    try:
        status = main()
    except (DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        exit_now(2)
    except RuntimeError as error:
        what = lost_contact(error)
        if what is None:
            traceback.print_exc()
            exit_now(1)
        rank, _, processes = launched_processes()
        print(f"error: process {rank} of {processes} lost contact with the others ({what}); one "
              "of them failed, was killed or stopped answering: see its output", file=sys.stderr)
        exit_now(1)
    exit_now(status)
