"""The training recipe, top to bottom: build the run, then per epoch train, checkpoint and evaluate.

1. :func:`build_run` -- write the resolved config to the run directory, set up logging, read the dataset
   and verify every image decodes, build the loader, the embedder (backbone + head) and the
   normalized-softmax loss, restoring them from a checkpoint when resuming.
2. :func:`enter_phase` -- warm-up (``pretrain_epochs``: only the new parameters, at ``lr * lr_mult``), then
   the main phase (all parameters, SGD, step decay); see :mod:`.schedule`.
3. :func:`train_one_epoch` -- the class-balanced batches of one epoch.
4. :func:`end_of_epoch` -- a checkpoint holding all state, and every ``test_every_n_epochs`` main epochs
   (and after each warm-up epoch and the last epoch, as the reference script) an evaluation written as
   JSON plus the reference's ``R@1, R@2, ...`` lines.

Every source of randomness is re-seeded from (seed, epoch) at the start of an epoch, so a run resumed from
any epoch's checkpoint continues exactly as the uninterrupted run would have. Under torchrun each rank
trains on its slice of the same class-balanced batch; only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist

from ..config import (
    TrainConfig,
    config_from_dict,
    default_dataset_root,
    recall_ks,
    write_config,
)
from ..data.cache import array_train_transform, find_cache
from ..data.images import (
    ImageDataset,
    ImageTransformConfig,
    train_transform,
    verify_images,
)
from ..data.records import DatasetRecords
from ..data.registry import load_dataset
from ..data.sampler import ClassBalancedBatchSampler
from ..evaluation import evaluate_model
from ..loss import NormSoftmaxLoss
from ..model import Embedder, create_embedder
from ..runtime import (
    Distributed,
    autocast,
    epoch_seed,
    loader_settings,
    loader_workers,
    rng_state,
    seed_everything,
    setup_logging,
)
from .checkpoint import CheckpointSaver, find_checkpoint, load_checkpoint
from .run_directory import (
    choose_run_dir,
    evaluation_path,
    write_evaluation,
    write_final_metrics,
)
from .schedule import (
    learning_rate,
    main_phase_epoch,
    make_optimizer,
    phase_of,
    should_evaluate,
    trainable_parameters,
)

logger = logging.getLogger("normsoftmax")

# Settings a resumed run may change; everything else comes from the checkpoint so the run continues unchanged.
RESUME_OVERRIDES = ("device", "workers", "progress", "dataset_root", "keep_checkpoints", "eval_batch_size")


class TrainStep(torch.nn.Module):
    """Model and loss as one module, so DistributedDataParallel synchronises the proxies too."""

    def __init__(self, model: Embedder, criterion: NormSoftmaxLoss):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images), labels)


@dataclass
class TrainingRun:
    """Everything one training run holds between epochs."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    run_dir: Path
    records: DatasetRecords
    transform: ImageTransformConfig
    cache: object
    loader: torch.utils.data.DataLoader
    sampler: object
    ks: list[int]
    model: Embedder
    criterion: NormSoftmaxLoss
    step_module: TrainStep
    scaler: torch.amp.GradScaler
    saver: CheckpointSaver | None
    writer: object = None
    start_epoch: int = 0
    resume_state: dict | None = None
    phase: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    wrapped: torch.nn.Module | None = None
    summary: dict = field(default_factory=dict)

    @property
    def workers(self) -> int:
        return loader_workers(self.config.workers)

    @property
    def steps_per_epoch(self) -> int:
        limit = self.config.max_steps_per_epoch
        return min(len(self.loader), limit) if limit else len(self.loader)


# ---------------------------------------------------------------------------------------------------- the recipe
def train_embedder(config: TrainConfig) -> dict:
    """Train, evaluate and checkpoint as the config says; returns a summary with the run directory and last metrics."""
    run = build_run(config)
    for epoch in range(run.start_epoch, run.config.total_epochs):
        enter_phase(run, epoch)
        mean_loss = train_one_epoch(run, epoch)
        end_of_epoch(run, epoch, mean_loss)
    if run.writer is not None:
        run.writer.close()
    if run.dist.is_main and run.summary["evaluations"].get(run.config.total_epochs) is not None:
        write_final_metrics(run.run_dir, run.summary["last"])
    return run.summary


# ---------------------------------------------------------------------------------------------------- 1. the run
def build_run(config: TrainConfig) -> TrainingRun:
    """Directory and config first, then data, model, loss; restored from the checkpoint when resuming."""
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume)
        config = resumed_config(config, resume_state)
    config.validate()
    dist = Distributed.from_environment(config.device)
    device = dist.device(config.device)
    run_dir = _run_directory(config, dist, resume_state)

    seed_everything(config.seed, 0)
    records = load_dataset(config.dataset, config.dataset_root or default_dataset_root(config.dataset))
    for note in records.notes:
        logger.info("counts differ from the published dataset: %s", note)
    logger.info("dataset %s at %s: %s", records.name, records.root, json.dumps(records.counts()))
    if config.verify_images and dist.is_main:
        verify_images(records.all_paths(), workers=max(1, loader_workers(config.workers)), progress=config.progress)
        logger.info("all %d images decode", len(records.all_paths()))
    dist.barrier()
    transform = image_transform(config)
    cache = find_cache(records, transform) if config.use_cache else None
    logger.info("images from %s", f"the pre-resized cache {cache}" if cache is not None else "decoded image files")
    loader, sampler = build_train_loader(config, records, transform, cache, dist, loader_workers(config.workers), device)

    model = create_embedder(config.model_name, config.dim, config.weights)
    criterion = NormSoftmaxLoss(records.train.num_classes, config.dim, config.temperature, config.class_sample_fraction)
    step_module = TrainStep(model, criterion).to(device)
    if config.channels_last:
        step_module.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        criterion.load_state_dict(resume_state["criterion"])
        scaler.load_state_dict(resume_state["scaler"])
    logger.info("model %s (width %d) -> dim %d, %d proxies, weights %s", config.model_name, model.width, config.dim,
                criterion.num_classes, config.weights)
    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))
    run = TrainingRun(config=config, dist=dist, device=device, run_dir=run_dir, records=records, transform=transform,
                      cache=cache, loader=loader, sampler=sampler, ks=config.ks or recall_ks(config.dataset),
                      model=model, criterion=criterion, step_module=step_module, scaler=scaler,
                      saver=CheckpointSaver(run_dir, config.keep_checkpoints) if dist.is_main else None, writer=writer,
                      start_epoch=resume_state["epoch"] if resume_state else 0, resume_state=resume_state,
                      summary={"run_dir": str(run_dir), "epochs": config.total_epochs, "evaluations": {},
                               "is_main": dist.is_main})
    _evaluate_lost_epoch(run)
    return run


def resumed_config(config: TrainConfig, state: dict) -> TrainConfig:
    defaults = TrainConfig()
    overrides = {key: getattr(config, key) for key in RESUME_OVERRIDES if getattr(config, key) != getattr(defaults, key)}
    return config_from_dict(TrainConfig, {**state["config"], **overrides, "resume": config.resume})


def _run_directory(config: TrainConfig, dist: Distributed, resume_state: dict | None) -> Path:
    """The run's folder, created with config.json in it before anything else; logging to its train.log."""
    if resume_state is not None:
        checkpoint_file = find_checkpoint(config.resume)
        if checkpoint_file.parent.name != "checkpoints":
            raise ValueError(f"{checkpoint_file}: resume from a checkpoint inside its run directory "
                             f"(RUN_DIR/checkpoints/epoch_NNN.pt) or from the run directory itself")
        run_dir = checkpoint_file.parent.parent  # follows a run directory that was moved
    else:
        run_dir = dist.broadcast(choose_run_dir(config) if dist.is_main else None)
        run_dir = Path(run_dir)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            write_config(config, run_dir / "config.json")
    setup_logging(run_dir / "train.log" if dist.is_main else None, logging.INFO if dist.is_main else logging.WARNING)
    logger.info("run directory %s", run_dir)
    if resume_state is not None:
        logger.info("resuming from %s after epoch %d", find_checkpoint(config.resume), resume_state["epoch"])
    return run_dir


def image_transform(config: TrainConfig) -> ImageTransformConfig:
    """The geometry a run trains and evaluates with."""
    return ImageTransformConfig(resize=config.resize, crop=config.crop, keep_aspect=config.keep_aspect, hflip=config.hflip)


def build_train_loader(config: TrainConfig, records: DatasetRecords, transform: ImageTransformConfig, cache,
                       dist: Distributed, workers: int, device: torch.device):
    if cache is not None:
        dataset = ImageDataset(records.train.paths, records.train.labels, array_train_transform(transform), cache=cache)
    else:
        dataset = ImageDataset(records.train.paths, records.train.labels, train_transform(transform),
                               decode=records.decode)
    common = loader_settings(device, workers)
    if config.class_balancing:
        sampler = ClassBalancedBatchSampler(records.train.labels, config.batch_size, config.images_per_class,
                                            seed=config.seed, num_replicas=dist.world_size, rank=dist.rank)
        return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, **common), sampler
    if dist.world_size > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, dist.world_size, dist.rank, shuffle=True,
                                                                  seed=config.seed)
        return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size // dist.world_size, sampler=sampler,
                                           drop_last=False, **common), sampler
    return torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=False, **common), None


def _evaluate_lost_epoch(run: TrainingRun) -> None:
    """A run stopped between its checkpoint and that epoch's evaluation gets the evaluation now."""
    if (run.resume_state is not None and run.dist.is_main and run.start_epoch > 0
            and should_evaluate(run.config, run.start_epoch - 1)
            and not evaluation_path(run.run_dir, run.start_epoch).exists()):
        logger.info("epoch %d was checkpointed but not evaluated; evaluating it now", run.start_epoch)
        evaluate_epoch(run, run.start_epoch)
    run.dist.barrier()


# ---------------------------------------------------------------------------------------------------- 2. the phase
def enter_phase(run: TrainingRun, epoch: int) -> None:
    """At the first epoch of a phase: freeze or unfreeze, a new optimizer (restored when resuming), DDP."""
    phase = phase_of(run.config, epoch)
    if phase == run.phase:
        return
    run.phase = phase
    trainable = trainable_parameters(phase, run.model, run.criterion, run.step_module)
    run.optimizer = make_optimizer(run.config, trainable, learning_rate(run.config, epoch))
    state = run.resume_state
    if state is not None and state.get("optimizer") is not None and state.get("phase") == phase:
        run.optimizer.load_state_dict(state["optimizer"])
    if state is not None:
        state["optimizer"] = None  # restored at most once
    run.wrapped = run.step_module
    if run.dist.world_size > 1:
        run.wrapped = torch.nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    logger.info("%s phase: training %d parameter tensors with %s", phase, len(trainable), run.config.optimizer)


# ---------------------------------------------------------------------------------------------------- 3. one epoch
def train_one_epoch(run: TrainingRun, epoch: int) -> float:
    """The class-balanced batches of one epoch; returns the mean loss over all ranks."""
    config, dist, device = run.config, run.dist, run.device
    seed_everything(config.seed, epoch + 1, dist.rank)
    if run.sampler is not None:
        run.sampler.set_epoch(epoch)
    # DataLoader workers draw their seeds from this generator; the main process from the global RNG.
    run.loader.generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, dist.rank))
    run.step_module.train()
    steps = run.steps_per_epoch
    epoch_loss, epoch_images, started = 0.0, 0, time.perf_counter()
    batches = iter(run.loader)
    progress = None
    if config.progress and dist.is_main:
        from tqdm import tqdm

        progress = tqdm(total=steps, desc=f"epoch {epoch + 1}/{config.total_epochs} ({run.phase})", unit="batch",
                        leave=False, dynamic_ncols=True)
    lr = learning_rate(config, epoch)
    for step in range(steps):
        images, labels = next(batches)
        lr = learning_rate(config, epoch, step / steps)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, config.amp):
            loss = run.wrapped(images, labels)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; lower --lr")
        epoch_loss += loss_value * len(labels)
        epoch_images += len(labels) * dist.world_size
        rate = epoch_images / max(time.perf_counter() - started, 1e-9)
        if progress is not None:
            progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
            progress.update()
        if run.writer is not None:
            run.writer.add_scalar("train/loss", loss_value, epoch * steps + step)
            run.writer.add_scalar("train/lr", lr, epoch * steps + step)
    del batches
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - started
    if dist.world_size > 1:
        total = torch.tensor([epoch_loss], dtype=torch.float64, device=device)
        torch_dist.all_reduce(total)
        epoch_loss = total.item()
    mean_loss = epoch_loss / max(epoch_images, 1)
    logger.info("epoch %d/%d (%s): loss %.4f, lr %.3g, %.1f images/s, %.0f s", epoch + 1, config.total_epochs, run.phase,
                mean_loss, lr, epoch_images / max(elapsed, 1e-9), elapsed)
    if run.writer is not None:
        run.writer.add_scalar("train/epoch_loss", mean_loss, epoch + 1)
        run.writer.add_scalar("train/images_per_second", epoch_images / max(elapsed, 1e-9), epoch + 1)
    return mean_loss


# ---------------------------------------------------------------------------------------------------- 4. epoch end
def end_of_epoch(run: TrainingRun, epoch: int, mean_loss: float) -> None:
    """Checkpoint (rank 0), then evaluate when the schedule says so."""
    if run.dist.is_main:
        run.saver.save(epoch + 1, {
            "phase": run.phase, "run_dir": str(run.run_dir), "config": asdict(run.config),
            "model": run.model.state_dict(), "criterion": run.criterion.state_dict(),
            "optimizer": run.optimizer.state_dict(), "scaler": run.scaler.state_dict(),
            "class_names": list(run.records.train.class_names), "rng": rng_state(),
        })
        if should_evaluate(run.config, epoch):
            evaluate_epoch(run, epoch + 1)
    run.dist.barrier()


def evaluate_epoch(run: TrainingRun, epoch_number: int) -> dict:
    config = run.config
    result, _ = evaluate_model(run.model, run.records, run.transform, run.ks, config.eval_batch_size or config.batch_size,
                               run.device, run.workers, config.amp, config.channels_last, config.nmi, run.cache,
                               progress=config.progress)
    main_epoch = main_phase_epoch(config, epoch_number)
    label = f"epoch {epoch_number}" + (f" (main-phase epoch {main_epoch})" if main_epoch else " (warm-up)")
    for line in write_evaluation(run.run_dir, epoch_number, result, main_epoch, run.writer):
        logger.info("%s %s", label, line)
    run.summary["evaluations"][epoch_number] = result
    run.summary["last"] = result
    return result
