"""fcn-train: train FCN-32s/16s/8s and write the served weights file.

Two presets. ``paper`` is the reference recipe: batch 1, summed (unnormalised) loss, SGD with
momentum 0.99, learning rates 1e-10 / 1e-12 / 1e-14 for 32s / 16s / 8s, biases at twice the
rate and without weight decay, staged 32s -> 16s -> 8s. ``modern`` averages the loss over
labelled pixels, uses AdamW with warm-up and a cosine (or poly) schedule, batches of padded
random crops, and bf16 autocast on CUDA.

Runs as one process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on
CUDA). Every epoch ends with a checkpoint that resumes exactly: each epoch reseeds from
(seed, stage, epoch), so an interrupted run replays the same batches and augmentations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from fcn_core.data import DATASETS, build_dataset, pad_collate, train_transforms
from fcn_core.evaluate import evaluate
from fcn_core.hardware import cpu_model
from fcn_core.losses import median_frequency_weights, segmentation_loss
from fcn_core.metrics import scores
from fcn_core.models import ARCHITECTURES, BACKBONES, build_model
from fcn_core.models.backbones import default_normalization
from fcn_core.weights import WeightsError, WeightsMetadata, load_weights, save_weights

PAPER_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14}

PRESETS: dict[str, dict] = {
    "paper": dict(
        optimizer="sgd",
        momentum=0.99,
        weight_decay=5e-4,
        batch_size=1,
        loss_reduction="sum",
        schedule="constant",
        warmup_iters=0,
        stages=["fcn32s", "fcn16s", "fcn8s"],
        crop=None,
        scale=[1.0, 1.0],
        flip=False,
        bias_lr_mult=2.0,
        amp=False,
    ),
    "modern": dict(
        optimizer="adamw",
        momentum=0.9,
        weight_decay=1e-4,
        batch_size=8,
        loss_reduction="mean",
        schedule="cosine",
        warmup_iters=100,
        lr=1e-3,
        stages=None,
        crop=[320, 320],
        scale=[0.5, 2.0],
        flip=True,
        bias_lr_mult=1.0,
        amp=True,
    ),
}


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg.startswith("cuda") and torch.cuda.is_available()
    if world > 1:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if want_cuda else "gloo")
        ctx = Dist(dist.get_rank(), dist.get_world_size(), local)
        if want_cuda:
            torch.cuda.set_device(local)
            return ctx, torch.device("cuda", local)
        return ctx, torch.device("cpu")
    return Dist(), torch.device(
        device_arg if want_cuda or not device_arg.startswith("cuda") else "cpu"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fcn-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", help="data set root (VOC2012 folder or a parent, CamVid, folder)")
    p.add_argument(
        "--sbd-root", help="VOC only: SBD's benchmark_RELEASE, for the paper's train set"
    )
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val")
    p.add_argument("--num-classes", type=int, help="folder / synthetic data sets only")
    p.add_argument("--arch", default="fcn8s", choices=list(ARCHITECTURES))
    p.add_argument("--backbone", default="vgg16", choices=BACKBONES)
    p.add_argument(
        "--no-pretrained",
        dest="pretrained",
        action="store_false",
        help="start from random weights instead of the ImageNet ones",
    )
    p.add_argument("--init-from", type=Path, help="weights file of a coarser trained net (staged)")
    p.add_argument("--learnable-upsampling", action="store_true")
    p.add_argument("--at-once", action="store_true", help="FCN-8s-at-once (scaled skips)")
    p.add_argument("--preset", default="modern", choices=list(PRESETS))
    p.add_argument(
        "--stages",
        nargs="+",
        choices=list(ARCHITECTURES),
        help="train these archs in turn, each from the last (paper: 32s 16s 8s)",
    )
    p.add_argument("--epochs", type=int, default=50, help="per stage")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["sgd", "adamw"])
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", choices=["constant", "poly", "cosine"])
    p.add_argument("--warmup-iters", type=int)
    p.add_argument("--loss-reduction", choices=["mean", "sum"])
    p.add_argument("--class-weights", choices=["none", "median-freq"], default="none")
    p.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"))
    p.add_argument("--no-crop", action="store_true", help="train on whole images")
    p.add_argument("--scale", type=float, nargs=2, metavar=("MIN", "MAX"))
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs/train"),
        help="checkpoints (last.pt, best.pt) and metrics.jsonl",
    )
    p.add_argument("--output", type=Path, help="the final weights file (.safetensors)")
    p.add_argument("--resume", type=Path, help="a last.pt checkpoint to continue exactly")
    p.add_argument("--max-iters", type=int, help="stop each stage after this many iterations")
    p.add_argument(
        "--stop-after-epochs",
        type=int,
        help="end this run after N epochs, leaving last.pt to --resume (time-boxed jobs)",
    )
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key in ("crop", "scale", "flip", "amp", "stages"):
            continue
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.stages is None:
        args.stages = preset["stages"] or [args.arch]
    args.crop = None if args.no_crop else (args.crop or preset["crop"])
    args.scale = args.scale or preset["scale"]
    args.flip = preset["flip"] and not args.no_flip
    args.amp = preset["amp"] and not args.no_amp
    return args


def stage_lr(args: argparse.Namespace, arch: str) -> float:
    if args.lr is not None:
        return args.lr
    return PAPER_LR[arch]


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, bias_lr_mult: float
) -> list[dict]:
    """Biases and norm parameters: no weight decay; biases at ``bias_lr_mult`` x lr (paper: 2)."""
    decay, no_decay, biases = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith(".bias"):
            biases.append(param)
        elif param.ndim <= 1:
            no_decay.append(param)
        else:
            decay.append(param)
    return [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        {"params": biases, "lr": lr * bias_lr_mult, "weight_decay": 0.0},
    ]


def lr_lambda(schedule: str, warmup: int, total: int):
    def factor(it: int) -> float:
        if warmup and it < warmup:
            return (it + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (it - warmup) / max(1, total - warmup))
        if schedule == "poly":
            return (1 - progress) ** 0.9
        return 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def seed_epoch(seed: int, stage: int, epoch: int) -> torch.Generator:
    """Reseed everything an epoch draws from; returns the sampler's generator."""
    base = seed * 1_000_003 + stage * 10_007 + epoch
    torch.manual_seed(base)
    g = torch.Generator()
    g.manual_seed(base)
    return g


def atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def all_reduce_(t: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.world > 1:
        dist.all_reduce(t)
    return t


def hardware() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU: {cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def train(args: argparse.Namespace) -> Path | None:
    ctx, device = setup_distributed(args.device)
    use_amp = args.amp and device.type == "cuda"
    train_ds = build_dataset(
        args.dataset,
        args.data_root,
        args.train_split,
        transform=train_transforms(args.crop, tuple(args.scale), args.flip),
        num_classes=args.num_classes,
        sbd_root=args.sbd_root,
    )
    val_ds = build_dataset(
        args.dataset, args.data_root, args.val_split, num_classes=args.num_classes
    )
    if ctx.main:
        train_ds.validate()
        val_ds.validate()
    num_classes = train_ds.num_classes
    normalization = default_normalization(args.backbone)
    class_weight = None
    if args.class_weights == "median-freq":
        class_weight = median_frequency_weights(train_ds).to(device)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    log_path = args.out_dir / "metrics.jsonl"
    writer = None
    if args.tensorboard and ctx.main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.out_dir / "tb"))

    state = None
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
    start_stage = state["stage"] if state else 0
    best = {"mean_iu": -1.0}
    best_state: dict | None = None
    model: nn.Module | None = None
    started = time.time()
    epochs_run = 0

    for stage, arch in enumerate(args.stages):
        if stage < start_stage:
            continue
        torch.manual_seed(args.seed + stage)  # new layers' random init replays on resume
        model = make_stage_model(args, arch, stage, model, num_classes)
        if state and stage == start_stage:
            model.load_state_dict(state["model"])
        model.to(device)
        net = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
        if ctx.world > 1:
            sampler = DistributedSampler(
                train_ds, ctx.world, ctx.rank, shuffle=True, seed=args.seed
            )
        else:
            sampler = None
        steps_per_epoch = math.ceil(len(train_ds) / (args.batch_size * ctx.world))
        total = steps_per_epoch * args.epochs
        if args.max_iters:
            total = min(total, args.max_iters)
        lr = stage_lr(args, arch)
        groups = param_groups(model, lr, args.weight_decay, args.bias_lr_mult)
        if args.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=args.momentum)
        else:
            opt = torch.optim.AdamW(groups, lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(args.schedule, args.warmup_iters, total)
        )
        first_epoch = 0
        iteration = 0
        if state and stage == start_stage:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            first_epoch, iteration = state["epoch"] + 1, state["iteration"]
            best = state["best"]
            best_state = state.get("best_model")
            torch.set_rng_state(state["rng"])

        for epoch in range(first_epoch, args.epochs):
            if iteration >= total:
                break
            g = seed_epoch(args.seed, stage, epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(
                train_ds,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                sampler=sampler or RandomSampler(train_ds, generator=g),
                generator=g,
                collate_fn=pad_collate,
                drop_last=False,
                persistent_workers=False,
            )
            net.train()
            t0 = time.time()
            loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
            bar = loader
            if ctx.main and not args.no_progress:
                from tqdm import tqdm

                bar = tqdm(loader, desc=f"{arch} epoch {epoch + 1}/{args.epochs}", leave=False)
            for images, masks in bar:
                images, masks = (
                    images.to(device, non_blocking=True),
                    masks.to(device, non_blocking=True),
                )
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                    logits = net(normalization(images))
                loss = segmentation_loss(logits, masks, class_weight, args.loss_reduction)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                iteration += 1
                loss_sum += torch.tensor([loss.item(), 1.0], dtype=torch.float64, device=device)
                if iteration >= total:
                    break
            all_reduce_(loss_sum, ctx)
            record = {
                "stage": stage,
                "arch": arch,
                "epoch": epoch + 1,
                "iteration": iteration,
                "train_loss": float(loss_sum[0] / max(loss_sum[1], 1)),
                "lr": opt.param_groups[0]["lr"],
                "epoch_seconds": round(time.time() - t0, 2),
            }
            last_epoch = epoch + 1 == args.epochs or iteration >= total
            if (epoch + 1) % args.eval_every == 0 or last_epoch:
                indices = range(ctx.rank, len(val_ds), ctx.world)
                hist, _, secs = evaluate(
                    model,
                    val_ds,
                    num_classes,
                    normalization,
                    device,
                    args.eval_batch_size,
                    indices=indices,
                )
                result = scores(all_reduce_(hist, ctx))
                record.update(
                    {k: result[k] for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu")},
                    iu=result["iu"],
                    eval_seconds=round(secs, 2),
                )
                if stage == len(args.stages) - 1 and result["mean_iu"] > best["mean_iu"]:
                    best = {**result, "epoch": epoch + 1, "stage": stage}
                    best_state = {
                        k: v.detach().cpu().clone() for k, v in model.state_dict().items()
                    }
            if ctx.main:
                print(
                    json.dumps(
                        {
                            k: (round(v, 5) if isinstance(v, float) else v)
                            for k, v in record.items()
                            if k != "iu"
                        }
                    ),
                    flush=True,
                )
                with log_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                if writer:
                    for k, v in record.items():
                        if isinstance(v, (int, float)):
                            writer.add_scalar(f"{arch}/{k}", v, iteration)
                ckpt = {
                    "stage": stage,
                    "epoch": epoch,
                    "iteration": iteration,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "best": best,
                    "rng": torch.get_rng_state(),
                }
                if best_state is not None:
                    ckpt["best_model"] = best_state
                atomic_save(ckpt, args.out_dir / "last.pt")
            epochs_run += 1
            if args.stop_after_epochs and epochs_run >= args.stop_after_epochs:
                if ctx.world > 1:
                    dist.destroy_process_group()
                return None
        state = None

    elapsed = time.time() - started
    if writer:
        writer.close()
    out = None
    if ctx.main and args.output and model is not None:
        if best_state is not None:
            model.load_state_dict(best_state)
        meta = WeightsMetadata(
            arch=args.stages[-1],
            backbone=args.backbone,
            class_names=train_ds.class_names,
            palette=train_ds.palette,
            normalization=normalization,
            at_once=args.at_once,
            dataset=f"{train_ds.name} ({len(train_ds)} images)",
            metrics={
                k: best[k] for k in ("pixel_acc", "mean_acc", "mean_iu", "fw_iu", "iu") if k in best
            },
            metrics_split=f"{args.dataset}/{args.val_split} ({len(val_ds)} images)",
            command="fcn-train " + shlex.join(sys.argv[1:] if args.argv is None else args.argv),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            notes=(
                f"best epoch {best.get('epoch')}; trained {elapsed / 60:.1f} min on "
                f"{hardware()} x {ctx.world} process(es); torch {torch.__version__}"
            ),
        )
        save_weights(args.output, model.cpu(), meta)
        out = args.output
        print(
            f"wrote {args.output} (val mean IU {best.get('mean_iu', float('nan')):.4f}, "
            f"{elapsed / 60:.1f} min)",
            flush=True,
        )
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def make_stage_model(
    args: argparse.Namespace, arch: str, stage: int, previous: nn.Module | None, num_classes: int
) -> nn.Module:
    opts = dict(learnable_upsampling=args.learnable_upsampling, at_once=args.at_once)
    cls = ARCHITECTURES[arch]
    if previous is not None:
        return cls.from_coarser(previous.cpu(), learnable_upsampling=args.learnable_upsampling)
    if stage == 0 and args.init_from:
        loaded = load_weights(args.init_from)
        if loaded.meta.num_classes != num_classes:
            raise ValueError(
                f"{args.init_from} has {loaded.meta.num_classes} classes, the data {num_classes}"
            )
        if loaded.meta.arch == arch:
            return loaded.model.train()
        return cls.from_coarser(loaded.model, learnable_upsampling=args.learnable_upsampling)
    return build_model(arch, num_classes, args.backbone, pretrained=args.pretrained, **opts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.argv = None if argv is None else list(argv)
    try:
        train(args)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"fcn-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
