"""What does MKF cost? Time of one training step, MKF variants against the baseline.

One step = forward, backward and optimiser step of the same model on the same batch, exactly
as ``benchmarks/train.py`` runs it (its ``train_step``). Variants:

* ``baseline``: cross-entropy on the full network.
* ``mkf-opt2`` / ``mkf-qp`` / ``mkf-qp-triton`` / ``mkf-cvxpylayers``: one MKF step on the full
  network (group 0, teacher: its own stored knowledge), every batch mixed (the fraction runs on
  every step: the worst case), knowledge bank, distillation, fraction with OPT2, the exact QP
  in plain torch, the exact QP as a fused Triton kernel (CUDA only), or the cvxpylayers QP (slow:
  only at small sizes). The ratio to the baseline is MKF's overhead at equal depth.
* ``mkf-qp, T=3 cycle``: the average over a cycle of groups 0, 1, 2 (the sub-networks of
  groups 1 and 2 are shallower, so this is what a training epoch costs on average).
* ``baseline compiled`` / ``mkf-qp compiled`` and ``... reduce-overhead``: the same steps under
  ``torch.compile`` (``mode="default"`` and ``mode="reduce-overhead"``, CUDA graphs), in the
  pattern of docs/METHOD.md ("One MKF step under torch.compile"): the mixing on the host, the
  model's forward with the loss compiled (for MKF with the bank's teacher), the backward, then
  the bank update compiled apart; the optimiser step stays eager. Their ratio is to
  ``baseline compiled`` of the same mode. The compile itself happens in the warm-up round.

Settings: on the CPU a CIFAR ResNet-20 at 32x32 (batch 64, 10 and 100 classes); on CUDA a
torchvision ResNet-50 at 32x32 (batch 256, 100 and 1000 classes, float32; batch 64 float32;
batch 256 bf16 autocast), at 224x224 (batch 256, bf16, 1000 classes, a bank of 1.28M rows in
bfloat16) and a ViT-S/16 at 224x224 (timm, else torchvision). What cannot run is skipped with
the reason. Value checks are switched off (``mkfkit.set_value_checks(False)``), as in a tuned
training run: they synchronise the GPU.

``--small`` (CPU): a ResNet with two blocks per stage on 8x8 images, batch 8, for a smoke run.

    python benchmarks/bench_step.py [--quick] [--small] [--device auto|cpu|cuda] [--threads N]
                                    [--only TEXT] [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train  # noqa: E402  (the training step being measured)
from _common import synchronize, device_report, write_json  # noqa: E402

import mkfkit  # noqa: E402
from mkfkit.bank import KnowledgeBank  # noqa: E402
from mkfkit.depth import DepthSampler  # noqa: E402
from mkfkit.distill import kd_loss  # noqa: E402
from mkfkit.fraction import LinearFraction, QPFraction  # noqa: E402
from mkfkit.mixing import CompoundMix, mixed_cross_entropy  # noqa: E402
from mkfkit.models import ResNet  # noqa: E402

STEP_ARGS = argparse.Namespace(beta=2.0, beta_ramp=0, temperature=4.0, max_age=0, full_teacher="self",
                               knowledge_from="previous", mkf_loop="cycle")
COMPILE_MODES = {"compiled": "default", "reduce-overhead": "reduce-overhead"}


def split_mode(variant: str) -> tuple:
    """``(eager variant, compile suffix or None)``: "mkf-qp compiled" -> ("mkf-qp", "compiled")."""
    base, _, suffix = variant.rpartition(" ")
    return (base, suffix) if suffix in COMPILE_MODES else (variant, None)


class Skip(Exception):
    """A variant cannot run here; the message says why."""


# ---------------------------------------------------------------------------------------------
# Settings


def cpu_settings(quick: bool, small: bool = False) -> List[Dict]:
    if small:
        return [dict(name="ResNet-14 8x8 b8 C10", model=lambda: ResNet(10, 3, blocks=(2, 2, 2)),
                     classes=10, batch=8, size=8, samples=64, cvxpylayers=False)]
    resnet20 = lambda classes: ResNet(classes, 3, blocks=(3, 3, 3))  # noqa: E731
    settings = [dict(name="ResNet-20 32x32 b64 C10", model=lambda: resnet20(10), classes=10,
                     batch=64, size=32, samples=50_000, cvxpylayers=True)]
    if not quick:
        settings.append(dict(name="ResNet-20 32x32 b64 C100", model=lambda: resnet20(100),
                             classes=100, batch=64, size=32, samples=50_000, cvxpylayers=True))
    return settings


def cuda_settings(quick: bool) -> List[Dict]:
    def resnet50(classes: int) -> Callable[[], nn.Module]:
        def build() -> nn.Module:
            try:
                import torchvision
            except ImportError:
                raise Skip("torchvision is not installed") from None
            return torchvision.models.resnet50(num_classes=classes)
        return build

    settings = [
        dict(name="ResNet-50 32x32 b256 C100 fp32", model=resnet50(100), classes=100, batch=256,
             size=32, samples=50_000, cvxpylayers=False),
        dict(name="ResNet-50 32x32 b256 C1000 fp32", model=resnet50(1000), classes=1000,
             batch=256, size=32, samples=50_000, cvxpylayers=False),
    ]
    if quick:
        return settings
    return settings + [
        dict(name="ResNet-50 32x32 b64 C100 fp32", model=resnet50(100), classes=100, batch=64,
             size=32, samples=50_000, cvxpylayers=True),
        dict(name="ResNet-50 32x32 b256 C100 bf16", model=resnet50(100), classes=100,
             batch=256, size=32, samples=50_000, cvxpylayers=False, bf16=True),
        dict(name="ResNet-50 224x224 b256 C1000 bf16, 1.28M-row bank", model=resnet50(1000),
             classes=1000, batch=256, size=224, samples=1_281_167, cvxpylayers=False, bf16=True,
             storage="bfloat16"),
        dict(name="ViT-S/16 224x224 b256 C1000 bf16", model=vit_small, classes=1000, batch=256,
             size=224, samples=1_281_167, cvxpylayers=False, bf16=True, storage="bfloat16"),
    ]


def vit_small() -> nn.Module:
    try:
        import timm

        return timm.create_model("vit_small_patch16_224", num_classes=1000)
    except ImportError:
        pass
    try:
        from torchvision.models import VisionTransformer
    except ImportError:
        raise Skip("neither timm nor torchvision is installed") from None
    return VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=6,
                             hidden_dim=384, mlp_dim=1536, num_classes=1000)


# ---------------------------------------------------------------------------------------------
# Variants: a train.Run with the blocks of each method, on a given model


def fraction_for(variant: str, device: torch.device):
    if variant == "mkf-opt2":
        return LinearFraction()
    if variant in ("mkf-qp", "mkf-qp, T=3 cycle"):
        return QPFraction(backend="torch")
    if variant == "mkf-qp-triton":
        from mkfkit import kernels

        if not kernels.available(device):
            raise Skip(f"the Triton kernels do not run on {device.type}")
        return QPFraction(backend="triton")
    if variant == "mkf-cvxpylayers":
        try:
            from mkfkit.reference import CvxpyQPFraction
        except ImportError:
            raise Skip("cvxpylayers is not installed (pip install mkfkit[qp])") from None
        return CvxpyQPFraction()
    raise ValueError(variant)


def make_run(variant: str, model: nn.Module, setting: Dict, device: torch.device) -> train.Run:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10**6)
    # train.py's step of the method (its fraction is set below, whichever the variant names)
    method = "baseline" if variant.startswith("baseline") else "mkf-qp"
    run = train.Run(method, 0, model, optimizer, scheduler, torch.Generator().manual_seed(0))
    run.train_model = model  # one process: the step calls the model itself (no DDP wrapper)
    if method != "baseline":
        groups = 3 if variant.endswith("cycle") else 1
        run.mix = CompoundMix(mix_prob=1.0, generator=torch.Generator().manual_seed(1))
        run.sampler = DepthSampler.from_model(model, num_groups=groups, seed=2)
        run.bank = KnowledgeBank(setting["samples"], setting["classes"], groups,
                                 storage=setting.get("storage", "float32"), device=device)
        run.fraction = fraction_for(split_mode(variant)[0], device)
        run.last_write = torch.full((groups, setting["samples"]), -1, device=device)
    return run


def compiled_loss(model: nn.Module, bank: Optional[KnowledgeBank], images, batch) -> torch.Tensor:
    """The loss of one step (group 0 teaching itself for MKF), the graph compiled with the model;
    returns the loss and the logits."""
    logits = model(images)
    if bank is None:
        return nn.functional.cross_entropy(logits, batch), logits
    teacher = bank.target(0, batch.index_a, batch.index_b, batch.lam)
    kd = kd_loss(logits, teacher.probs, STEP_ARGS.temperature, teacher_kind="probs", weight=teacher.mask)
    return mixed_cross_entropy(logits, batch) + STEP_ARGS.beta * kd, logits


def compiled_update(bank: KnowledgeBank, fraction, logits: torch.Tensor, batch) -> None:
    bank.update(0, logits.detach().float().softmax(1), batch.index_a, batch.index_b, batch.lam, fraction)


class CompiledStep:
    """A training step with the loss and the bank update under ``torch.compile`` (``mode``)."""

    def __init__(self, run: train.Run, mode: str) -> None:
        self.run = run
        self.loss = torch.compile(functools.partial(compiled_loss, run.model, run.bank), mode=mode)
        self.update = (None if run.bank is None else torch.compile(
            functools.partial(compiled_update, run.bank, run.fraction), mode=mode, fullgraph=True))

    def __call__(self, images, labels, indices) -> None:
        run = self.run
        run.optimizer.zero_grad()
        batch = labels if run.mix is None else run.mix(images, labels, indices)
        loss, logits = self.loss(images if run.mix is None else batch.images, batch)
        loss.backward()
        if self.update is not None:
            self.update(logits, batch)
        run.optimizer.step()
        run.scheduler.step()


def fill_bank(bank: KnowledgeBank, indices: torch.Tensor) -> None:
    """Give the rows the batches will touch some knowledge, so no update is skipped."""
    generator = torch.Generator(device=indices.device).manual_seed(3)
    for group in range(bank.num_groups):
        for chunk in indices.unique().split(65536):
            logits = torch.randn(len(chunk), bank.num_classes, device=indices.device,
                                 generator=generator)
            bank.update(group, logits.softmax(1), chunk)


# ---------------------------------------------------------------------------------------------
# Timing


class Stepper:
    """One variant ready to step: its model, blocks, batch and dataset indices."""

    def __init__(self, variant: str, setting: Dict, device: torch.device, total_steps: int):
        torch.manual_seed(0)  # every variant starts from the same weights and batch
        self.run = make_run(variant, setting["model"]().to(device), setting, device)
        suffix = split_mode(variant)[1]
        self.compiled = None if suffix is None else CompiledStep(self.run, COMPILE_MODES[suffix])
        batch, size, classes = setting["batch"], setting["size"], setting["classes"]
        self.images = torch.randn(batch, 3, size, size, device=device)
        self.labels = torch.randint(0, classes, (batch,), device=device)
        self.indices = torch.randint(0, setting["samples"], (total_steps, batch), device=device)
        if self.run.bank is not None:
            fill_bank(self.run.bank, self.indices.flatten())
        self.bf16 = setting.get("bf16", False)
        self.device = device
        self.done = 0

    def steps(self, count: int) -> float:
        """Run ``count`` training steps; seconds per step."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(count):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                if self.compiled is None:
                    train.train_step(self.run, self.images, self.labels, self.indices[self.done],
                                     STEP_ARGS, per_epoch=1)
                else:
                    self.compiled(self.images, self.labels, self.indices[self.done])
            self.done += 1
        synchronize(self.device)
        return (time.perf_counter() - start) / count


def time_setting(setting: Dict, variants: List[str], device: torch.device, repeats: int,
                 steps: int) -> Dict[str, object]:
    """Seconds per step of each variant (or the reason it was skipped).

    The variants take turns, ``steps`` steps each, ``repeats`` rounds after one warm-up round
    (allocator, cuDNN autotuning, Triton compilation); the median round counts. Taking turns
    spreads any drift of the machine's load evenly over the variants.
    """
    steppers: Dict[str, Stepper] = {}
    result: Dict[str, object] = {}
    for variant in variants:
        cheap = variant == "mkf-cvxpylayers"  # seconds per step: two short rounds only
        try:
            if cheap and not setting["cvxpylayers"]:
                raise Skip("cvxpylayers is measured only at small sizes (it is slow)")
            steppers[variant] = Stepper(variant, setting, device, (repeats + 1) * steps)
        except Skip as reason:
            result[variant] = Skip(str(reason))
    times: Dict[str, List[float]] = {variant: [] for variant in steppers}
    for round_ in range(repeats + 1):
        for variant, stepper in steppers.items():
            cheap = variant == "mkf-cvxpylayers"
            if cheap and round_ > 1:
                continue
            seconds = stepper.steps(1 if cheap else steps)
            if round_ > 0:
                times[variant].append(seconds)
    for variant in steppers:
        result[variant] = statistics.median(times[variant])
    return {variant: result[variant] for variant in variants}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer settings and repeats")
    parser.add_argument("--small", action="store_true", help="one tiny CPU setting (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled variants")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    parser.add_argument("--only", default="", help="only the settings whose name contains this text")
    default_json = Path(__file__).resolve().parent / "out" / "step.json"
    parser.add_argument("--json", default=str(default_json))
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    mkfkit.set_value_checks(False)
    repeats, steps = (3, 3) if args.quick else (5, 10)
    settings = cuda_settings(args.quick) if device.type == "cuda" else cpu_settings(args.quick, args.small)
    settings = [setting for setting in settings if args.only in setting["name"]]
    variants = ["baseline", "mkf-opt2", "mkf-qp", "mkf-qp-triton", "mkf-cvxpylayers",
                "mkf-qp, T=3 cycle"]
    if not args.no_compile:
        variants += [f"{name} {mode}" for mode in COMPILE_MODES for name in ("baseline", "mkf-qp")]

    print(f"device: {device_report(device)}")
    rows = []
    for setting in settings:
        print(f"\n{setting['name']}")
        print(f"  {'variant':<28}{'ms/step':>10}{'x baseline':>12}")
        try:
            measured = time_setting(setting, variants, device, repeats, steps)
        except Skip as reason:  # the setting's model cannot be built here
            measured = {variant: reason for variant in variants}
        except torch.cuda.OutOfMemoryError:
            measured = {variant: Skip("out of GPU memory") for variant in variants}
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next setting's models start from a clean slate
        for variant, seconds in measured.items():
            suffix = split_mode(variant)[1]
            baseline = measured["baseline" if suffix is None else f"baseline {suffix}"]
            row = {"setting": setting["name"], "variant": variant}
            if isinstance(seconds, Exception):
                row["skipped"] = str(seconds)
                print(f"  {variant:<28}  skipped: {seconds}")
            else:
                ratio = seconds / baseline if isinstance(baseline, float) else None
                row.update(ms_per_step=1000 * seconds, ratio=ratio)
                ratio_text = f"{ratio:.3f}" if ratio is not None else "-"
                print(f"  {variant:<28}{1000 * seconds:>10.2f}{ratio_text:>12}")
            rows.append(row)

    write_json(args.json, {"device": device_report(device), "quick": args.quick,
                           "value_checks": False, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
