"""fcn-train: train FCN-32s/16s/8s and write the served weights file.

Two presets. ``paper`` is the reference recipe: batch 1, summed (unnormalised) loss, SGD with
momentum 0.99, learning rates 1e-10 / 1e-12 / 1e-14 for 32s / 16s / 8s, biases at twice the
rate and without weight decay, staged 32s -> 16s -> 8s. ``modern`` averages the loss over
labelled pixels, uses AdamW with warm-up and a cosine (or poly) schedule, batches of padded
random crops, and bf16 autocast on CUDA.

Runs as one process or under ``torchrun`` (DistributedDataParallel; gloo on CPU, nccl on
CUDA). ``--ema-decay`` evaluates, selects and exports a moving average of the weights instead
of the weights themselves. Every epoch ends with a checkpoint that resumes exactly: each epoch
reseeds from (seed, stage, epoch), so an interrupted run replays the same batches and
augmentations.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import (
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    WeightedRandomSampler,
)

from fcn_core.data import (
    SegmentationDataset,
    SyntheticScenes,
    build_dataset,
    pad_collate,
    train_transforms,
)
from fcn_core.distill import (
    DistillationLoss,
    TeacherLabelledPhotos,
    find_photos,
    label_photos,
    repeat_factors,
    teacher_cache_dir,
)
from fcn_core.engine import (
    Best,
    Dist,
    RunLog,
    WeightAverage,
    evaluate_sharded,
    hardware,
    lr_lambda,
    param_groups,
    save_checkpoint,
    seed_epoch,
    setup_distributed,
    train_one_epoch,
)
from fcn_core.evaluate import evaluate
from fcn_core.files import sha256_file
from fcn_core.losses import median_frequency_weights, segmentation_loss
from fcn_core.metrics import scores
from fcn_core.models import ARCHITECTURES, build_model
from fcn_core.models.backbones import default_normalization
from fcn_core.preprocess import Normalization
from fcn_core.teacher_weights import init_from_deeplab
from fcn_core.train_config import PAPER_LR, TrainConfig, parse_args
from fcn_core.weights import WeightsError, WeightsMetadata, load_weights, save_weights

DEEPLAB_NORM_BATCHES = 4
"""Batches of training crops on which a DeepLab-started net's batch norms are measured."""

__all__ = ["TrainConfig", "main", "parse_args", "stage_lr", "train"]


def stage_lr(cfg: TrainConfig, arch: str) -> float:
    if cfg.lr is not None:
        return cfg.lr
    return PAPER_LR[arch]


def build_datasets(
    cfg: TrainConfig, ctx: Dist
) -> tuple[Dataset, SegmentationDataset | SyntheticScenes]:
    """The training set (labelled, or photos labelled by the teacher) and the validation set.
    With a teacher, the main process labels the photos not yet in the cache, first."""
    val_ds = build_dataset(
        cfg.dataset,
        cfg.data_root,
        cfg.val_split,
        num_classes=cfg.num_classes,
        class_names=cfg.class_names,
    )
    if cfg.teacher is None:
        train_ds = build_dataset(
            cfg.dataset,
            cfg.data_root,
            cfg.train_split,
            transform=train_transforms(cfg.crop, cfg.scale, cfg.flip),
            num_classes=cfg.num_classes,
            sbd_root=cfg.sbd_root,
            class_names=cfg.class_names,
        )
        return train_ds, val_ds
    if not cfg.photos:
        raise ValueError("--teacher needs --photos: a folder of unlabelled photos")
    roots = [p.resolve() for p in cfg.photos]
    photos = [photo for r in roots for photo in find_photos(r)]
    # Cached logits are named by their path under the folders' common parent: unique
    # across folders, and the folder itself when there is one.
    root = Path(os.path.commonpath(roots)) if len(roots) > 1 else roots[0]
    cache = teacher_cache_dir(cfg.teacher_cache or cfg.out_dir / "teacher", cfg.teacher)
    if ctx.main:
        label_photos(cfg.teacher, root, photos, cache, cfg.teacher_processes)
    if ctx.world > 1:
        dist.barrier()  # the teacher's labels are on disk before anyone reads them
    return (
        TeacherLabelledPhotos(
            root,
            photos,
            cache,
            val_ds.class_names,
            val_ds.palette,
            cfg.crop,
            cfg.scale,
            cfg.flip,
            cfg.mosaic,
        ),
        val_ds,
    )


def sampling_weights(cfg: TrainConfig, train_ds: Dataset, ctx: Dist) -> torch.Tensor | None:
    """Per-photo draw weights for repeat-factor sampling, or None to draw uniformly."""
    if cfg.repeat_threshold is None:
        return None
    if not isinstance(train_ds, TeacherLabelledPhotos):
        raise ValueError("--repeat-threshold applies to a teacher's photos (--teacher)")
    if ctx.world > 1:
        raise ValueError("--repeat-threshold runs in one process (no DistributedSampler)")
    factors = repeat_factors(train_ds.class_presence(), cfg.repeat_threshold)
    if ctx.main:
        print(f"repeat factors: mean {factors.mean():.2f}, max {factors.max():.2f}", flush=True)
    return torch.as_tensor(factors, dtype=torch.double)


def epoch_sampler(
    train_ds: Dataset, weights: torch.Tensor | None, g: torch.Generator
) -> RandomSampler | WeightedRandomSampler:
    """An epoch's draw: a permutation, or as many weighted draws (with replacement)."""
    if weights is None:
        return RandomSampler(train_ds, generator=g)
    return WeightedRandomSampler(weights, len(train_ds), replacement=True, generator=g)


def build_criterion(
    cfg: TrainConfig, train_ds: Dataset, device: torch.device
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if cfg.teacher is not None:
        if cfg.class_weights != "none":
            raise ValueError("--class-weights needs masks; a teacher gives logits")
        return DistillationLoss(cfg.confidence, cfg.kd_weight, cfg.temperature, cfg.kd_stride)
    weight = None
    if cfg.class_weights == "median-freq":
        weight = median_frequency_weights(train_ds).to(device)
    return functools.partial(segmentation_loss, weight=weight, reduction=cfg.loss_reduction)


def build_optimizer(
    cfg: TrainConfig, model: nn.Module, lr: float, total: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    groups = param_groups(model, lr, cfg.weight_decay, cfg.bias_lr_mult)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.schedule, cfg.warmup_iters, total))
    return opt, sched


def export_weights(
    cfg: TrainConfig,
    model: nn.Module,
    best: Best,
    train_ds: Dataset,
    val_ds: Dataset,
    normalization: Normalization,
    minutes: float,
    world: int,
) -> Path:
    """The best weights, with metadata saying what they are and how they were made."""
    assert cfg.output is not None
    if best.state is not None:
        model.load_state_dict(best.state)
    model = model.cpu()
    evaluations = {}
    for spec in cfg.also_eval:
        name, root = spec.split("=", 1) if "=" in spec else (spec, None)
        dataset, split = name.split("/", 1) if "/" in name else (name, "val")
        extra = build_dataset(dataset, root, split, class_names=train_ds.class_names)
        hist, n, _ = evaluate(model, extra, train_ds.num_classes, normalization, "cpu", 1)
        evaluations[f"{dataset}/{split} ({n} images)"] = scores(hist)
    teacher = ""
    if cfg.teacher is not None:
        teacher = f"{cfg.teacher.name} (sha256 {sha256_file(cfg.teacher)})"
        if cfg.teacher_note:
            teacher += f"; {cfg.teacher_note}"
    meta = WeightsMetadata(
        arch=cfg.stages[-1],
        backbone=cfg.backbone,
        class_names=train_ds.class_names,
        palette=train_ds.palette,
        normalization=normalization,
        at_once=cfg.at_once,
        dataset=f"{train_ds.name} ({len(train_ds)} images)",
        metrics={
            k: best.result[k]
            for k in ("pixel_acc", "mean_acc", "mean_iu", "mean_iu_present", "fw_iu", "iu")
            if k in best.result
        },
        metrics_split=f"{cfg.dataset}/{cfg.val_split} ({len(val_ds)} images)",
        evaluations=evaluations,
        teacher=teacher,
        command="fcn-train " + shlex.join(cfg.argv),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=(
            f"best epoch {best.result.get('epoch')}; trained {minutes:.1f} min on "
            f"{hardware()} x {world} process(es); torch {torch.__version__}"
        ),
    )
    save_weights(cfg.output, model, meta)
    print(
        f"wrote {cfg.output} (val mean IU {best.result.get('mean_iu', float('nan')):.4f}, "
        f"{minutes:.1f} min)",
        flush=True,
    )
    return cfg.output


def train(cfg: TrainConfig) -> Path | None:
    ctx, device = setup_distributed(cfg.device)
    train_ds, val_ds = build_datasets(cfg, ctx)
    if ctx.main:
        train_ds.validate()
        val_ds.validate()
    num_classes = train_ds.num_classes
    normalization = default_normalization(cfg.backbone)
    criterion = build_criterion(cfg, train_ds, device)
    weights = sampling_weights(cfg, train_ds, ctx)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(cfg.out_dir, ctx.main, cfg.tensorboard)
    resume = torch.load(cfg.resume, map_location="cpu", weights_only=True) if cfg.resume else None
    start_stage = resume["stage"] if resume else 0
    best = Best()
    model: nn.Module | None = None
    started = time.time()
    epochs_run = 0

    for stage, arch in enumerate(cfg.stages):
        if stage < start_stage:
            continue
        torch.manual_seed(cfg.seed + stage)  # new layers' random init replays on resume
        model = make_stage_model(cfg, arch, stage, model, num_classes)
        if stage == 0 and cfg.init_from_deeplab and not resume:
            copied = start_from_deeplab(cfg.init_from_deeplab, cfg, model, train_ds, normalization)
            if ctx.main:
                print(f"started from {cfg.init_from_deeplab.name}: {copied}", flush=True)
        if cfg.frozen_backbone:
            model.backbone.requires_grad_(False)
        if resume and stage == start_stage:
            model.load_state_dict(resume["model"])
        model.to(device, memory_format=torch.channels_last)
        net = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
        sampler = (
            DistributedSampler(train_ds, ctx.world, ctx.rank, shuffle=True, seed=cfg.seed)
            if ctx.world > 1
            else None
        )
        steps_per_epoch = math.ceil(len(train_ds) / (cfg.batch_size * ctx.world))
        total = steps_per_epoch * cfg.epochs
        if cfg.max_iters:
            total = min(total, cfg.max_iters)
        opt, sched = build_optimizer(cfg, model, stage_lr(cfg, arch), total)
        average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay else None
        first_epoch = iteration = 0
        if resume and stage == start_stage:
            if average is not None:
                if "average" not in resume:
                    raise ValueError(f"{cfg.resume} has no weight average: resume without it")
                average.load_state_dict(resume["average"])
            try:
                opt.load_state_dict(resume["optimizer"])
            except ValueError as exc:
                raise ValueError(
                    f"{cfg.resume}: its optimizer trained other parameters than this run "
                    "would (resume with the same --frozen-backbone and architecture)"
                ) from exc
            sched.load_state_dict(resume["scheduler"])
            first_epoch, iteration = resume["epoch"] + 1, resume["iteration"]
            best = Best(resume["best"], resume.get("best_model"))
            torch.set_rng_state(resume["rng"])

        for epoch in range(first_epoch, cfg.epochs):
            if iteration >= total:
                break
            g = seed_epoch(cfg.seed, stage, epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            loader = DataLoader(
                train_ds,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                sampler=sampler or epoch_sampler(train_ds, weights, g),
                generator=g,
                collate_fn=pad_collate,
            )
            t0 = time.time()
            loss, iteration = train_one_epoch(
                net,
                loader,
                criterion,
                opt,
                sched,
                normalization,
                device,
                ctx,
                iteration,
                total,
                amp=cfg.amp and device.type == "cuda",
                desc=None if cfg.no_progress else f"{arch} epoch {epoch + 1}/{cfg.epochs}",
                average=average,
                frozen=model.backbone if cfg.frozen_backbone else None,
            )
            record = {
                "stage": stage,
                "arch": arch,
                "epoch": epoch + 1,
                "iteration": iteration,
                "train_loss": loss,
                "lr": opt.param_groups[0]["lr"],
                "epoch_seconds": round(time.time() - t0, 2),
            }
            last_epoch = epoch + 1 == cfg.epochs or iteration >= total
            if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
                scored = average.module if average is not None else model
                result = evaluate_sharded(
                    scored, val_ds, num_classes, normalization, device, cfg.eval_batch_size, ctx
                )
                record.update(
                    {k: v for k, v in result.items() if not isinstance(v, list)}, iu=result["iu"]
                )
                if stage == len(cfg.stages) - 1:
                    best.offer(result, scored, epoch + 1, stage)
            log.write(record)
            if ctx.main:
                save_checkpoint(
                    cfg.out_dir / "last.pt",
                    stage,
                    epoch,
                    iteration,
                    model,
                    opt,
                    sched,
                    best,
                    average,
                )
            epochs_run += 1
            if cfg.stop_after_epochs and epochs_run >= cfg.stop_after_epochs:
                if ctx.world > 1:
                    dist.destroy_process_group()
                return None
        resume = None

    log.close()
    out = None
    if ctx.main and cfg.output and model is not None:
        out = export_weights(
            cfg,
            model,
            best,
            train_ds,
            val_ds,
            normalization,
            (time.time() - started) / 60,
            ctx.world,
        )
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def make_stage_model(
    cfg: TrainConfig, arch: str, stage: int, previous: nn.Module | None, num_classes: int
) -> nn.Module:
    opts = dict(learnable_upsampling=cfg.learnable_upsampling, at_once=cfg.at_once)
    cls = ARCHITECTURES[arch]
    if previous is not None:
        return cls.from_coarser(previous.cpu(), learnable_upsampling=cfg.learnable_upsampling)
    if stage == 0 and cfg.init_from:
        loaded = load_weights(cfg.init_from)
        if loaded.meta.num_classes != num_classes:
            raise ValueError(
                f"{cfg.init_from} has {loaded.meta.num_classes} classes, the data {num_classes}"
            )
        if loaded.meta.arch == arch:
            return loaded.model.train()
        return cls.from_coarser(loaded.model, learnable_upsampling=cfg.learnable_upsampling)
    pretrained = cfg.pretrained and not cfg.init_from_deeplab  # that brings its own
    return build_model(arch, num_classes, cfg.backbone, pretrained=pretrained, **opts)


def start_from_deeplab(
    path: Path,
    cfg: TrainConfig,
    model: nn.Module,
    train_ds: Dataset,
    normalization: Normalization,
) -> str:
    """``--init-from-deeplab``: a trained DeepLab's weights, its batch norms measured on the
    first few training crops (epoch 0's augmentation, so a resumed run does not need them).
    Says what was copied."""
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=RandomSampler(train_ds, generator=seed_epoch(cfg.seed, 0, 0)),
        collate_fn=pad_collate,
    )
    batches = (normalization(x) for x, _ in itertools.islice(loader, DEEPLAB_NORM_BATCHES))
    return ", ".join(init_from_deeplab(model, path, batches))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        train(cfg)
    except (FileNotFoundError, ValueError, WeightsError) as exc:
        print(f"fcn-train: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
