"""The training recipe, top to bottom: build the run, then per epoch train, checkpoint and evaluate.

1. :func:`build_run` -- write the resolved config to the run directory (or find the unfinished run to
   continue), set up logging, read the dataset and verify every image decodes, build the loader, the
   embedder (backbone + head) and the normalized-softmax loss, restoring everything from a checkpoint when
   resuming.
2. :func:`enter_phase` -- warm-up (``pretrain_epochs``: only the new parameters, at ``lr * lr_mult``), then
   the main phase (all parameters, SGD, step decay); see :mod:`.schedule`.
3. :func:`train_one_epoch` -- the class-balanced batches of one epoch. The loss is summed on the device and
   read every ``log_every`` steps (TensorBoard, progress bar, the non-finite check, stop requests), so a GPU
   is never made to wait for the host in between.
4. :func:`end_of_epoch` -- a checkpoint holding all state, and every ``test_every_n_epochs`` main epochs
   (and after each warm-up epoch and the last epoch, as the reference script) an evaluation written as
   JSON plus the reference's ``R@1, R@2, ...`` lines; under torchrun every rank embeds its share.

Never losing a run: SIGTERM or SIGINT (a scheduler's pre-emption, Ctrl-C) finishes the current step,
writes a mid-epoch checkpoint and exits with the command that resumes; a second signal exits at once.
Mid-epoch checkpoints are also written every ``checkpoint_every_minutes``. Every source of randomness is a
function of (seed, epoch, position): the batches from the sampler, each image's augmentation from its own
seed (:class:`normsoftmax.data.sampler.SeededBatches`), the rest from RNG states saved in the checkpoint --
so a run resumed from any checkpoint continues exactly as the uninterrupted run would have. Under torchrun
each rank trains on its slice of the same class-balanced batch; only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.tensorboard import SummaryWriter

from ..checkpoint import (
    CheckpointSaver,
    find_checkpoint,
    find_resumable,
    load_checkpoint,
)
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
    collate_skipping,
    ignore_stop_signals,
    train_transform,
    verify_images,
)
from ..data.records import DatasetError, DatasetRecords
from ..data.registry import load_dataset
from ..data.sampler import ClassBalancedBatchSampler, SeededBatches
from ..evaluation import evaluate_model
from ..faults import failpoint
from ..loss import NormSoftmaxLoss
from ..model import Embedder, backbone_preprocessing, create_embedder
from ..runtime import (
    Distributed,
    autocast,
    epoch_seed,
    loader_settings,
    loader_workers,
    resolve_amp,
    restore_rng_state,
    rng_state,
    seed_everything,
    setup_logging,
    shell_command,
)
from .run_directory import (
    choose_run_dir,
    evaluation_path,
    finished,
    run_base_dir,
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
RESUME_OVERRIDES = ("device", "workers", "progress", "dataset_root", "keep_checkpoints", "eval_batch_size",
                    "checkpoint_every_minutes", "on_bad_image", "log_every")


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint; ``resume_command`` continues it."""

    def __init__(self, signal_name: str, checkpoint: Path | None, run_dir: Path):
        self.exit_code = 128 + getattr(signal, signal_name, signal.SIGTERM)
        self.resume_command = shell_command("train", "--resume", run_dir)
        where = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint (rank 0 writes them)"
        super().__init__(f"stopped by {signal_name} after writing {where}; continue with: {self.resume_command}")


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
    """Everything one training run holds between steps."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    run_dir: Path
    records: DatasetRecords
    transform: ImageTransformConfig
    cache: object
    loader: torch.utils.data.DataLoader
    batches: SeededBatches
    ks: list[int]
    model: Embedder
    criterion: NormSoftmaxLoss
    step_module: TrainStep
    scaler: torch.amp.GradScaler
    saver: CheckpointSaver  # used on rank 0 only: the other ranks never write
    writer: SummaryWriter | None = None
    start_epoch: int = 0
    start_step: int = 0  # steps of start_epoch's epoch a mid-epoch checkpoint already covered
    resume_state: dict | None = None
    phase: str | None = None
    optimizer: torch.optim.Optimizer | None = None
    wrapped: Callable[..., torch.Tensor] | None = None  # the train step as this phase runs it (DDP, compiled)
    stop_signal: str | None = None  # set by the signal handler
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    skipped_images: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def workers(self) -> int:
        return loader_workers(self.config.workers)

    @property
    def steps_per_epoch(self) -> int:
        limit = self.config.max_steps_per_epoch
        return min(len(self.batches.batches), limit) if limit else len(self.batches.batches)


# ---------------------------------------------------------------------------------------------------- the recipe
def train_embedder(config: TrainConfig) -> dict:
    """Train, evaluate and checkpoint as the config says; returns a summary with the run directory and last metrics.

    Raises :class:`Preempted` (after writing a checkpoint) when a signal stops the run.
    """
    run = build_run(config)
    if isinstance(run, Path):  # --resume auto on a run that already finished
        return _finished_summary(config, run)
    with _stop_on_signals(run):
        for epoch in range(run.start_epoch, run.config.total_epochs):
            enter_phase(run, epoch)
            mean_loss = train_one_epoch(run, epoch)
            end_of_epoch(run, epoch, mean_loss)
            if epoch + 1 < run.config.total_epochs and run.dist.any(run.stop_signal is not None, run.device):
                from ..checkpoint import checkpoint_path

                raise Preempted(run.stop_signal or "SIGTERM", checkpoint_path(run.run_dir, epoch + 1), run.run_dir)
    if run.writer is not None:
        run.writer.close()
    if run.dist.is_main and run.summary["evaluations"].get(run.config.total_epochs) is not None:
        write_final_metrics(run.run_dir, run.summary["last"])
    return run.summary


# ---------------------------------------------------------------------------------------------------- 1. the run
def build_run(config: TrainConfig) -> TrainingRun | Path:
    """Directory and config first, then data, model, loss; restored from the checkpoint when resuming."""
    config, resume_file, resume_state = _resolve_resume(resolve_inputs(config))
    if config is None:
        return resume_file  # --resume auto on a finished run: its folder
    config.validate()
    dist = Distributed.from_environment(config.device)
    device = dist.device(config.device)
    # every rank trains in rank 0's precision: on a CPU, ``auto`` may rest on a timing probe, run once
    amp = dist.broadcast(resolve_amp(config.amp, device) if dist.is_main else None)
    config = config_from_dict(TrainConfig, {**asdict(config), "amp": amp})
    run_dir = _run_directory(config, dist, resume_file, resume_state)

    seed_everything(config.seed, 0)
    records = load_dataset(config.dataset, config.dataset_root or default_dataset_root(config.dataset))
    for note in records.notes:
        logger.info("counts differ from the published dataset: %s", note)
    logger.info("dataset %s at %s: %s", records.name, records.root, json.dumps(records.counts()))
    if config.verify_images and dist.is_main:
        verify_images(records.all_paths(), workers=max(1, loader_workers(config.workers)), progress=config.progress)
        logger.info("all %d images decode", len(records.all_paths()))
    dist.barrier()
    transform = ImageTransformConfig.of(config)
    cache = find_cache(records, transform) if config.use_cache else None
    logger.info("images from %s", f"the pre-resized cache {cache}" if cache is not None else "decoded image files")
    loader, batches = build_train_loader(config, records, transform, cache, dist, device)

    model = create_embedder(config.model_name, config.dim, config.weights, weights_partial=config.weights_partial)
    criterion = NormSoftmaxLoss(records.train.num_classes, config.dim, config.temperature, config.class_sample_fraction)
    step_module = TrainStep(model, criterion).to(device)
    if config.channels_last:
        step_module.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        criterion.load_state_dict(resume_state["criterion"])
        scaler.load_state_dict(resume_state["scaler"])
    logger.info("model %s (width %d) -> dim %d, %d proxies, weights %s; images resized to %d, cropped to %d, "
                "normalised with mean %s, std %s", config.model_name, model.width, config.dim, criterion.num_classes,
                config.weights, config.resize, config.crop, config.mean, config.std)
    writer = None
    if dist.is_main:
        writer = SummaryWriter(str(run_dir / "tensorboard"))
    run = TrainingRun(config=config, dist=dist, device=device, run_dir=run_dir, records=records, transform=transform,
                      cache=cache, loader=loader, batches=batches, ks=config.ks or recall_ks(config.dataset),
                      model=model, criterion=criterion, step_module=step_module, scaler=scaler,
                      saver=CheckpointSaver(run_dir, config.keep_checkpoints), writer=writer,
                      start_epoch=resume_state["epoch"] if resume_state else 0,
                      start_step=resume_state.get("step", 0) if resume_state else 0, resume_state=resume_state,
                      summary={"run_dir": str(run_dir), "epochs": config.total_epochs, "evaluations": {},
                               "is_main": dist.is_main})
    _evaluate_lost_epoch(run)
    return run


def resolve_inputs(config: TrainConfig) -> TrainConfig:
    """The image size and normalisation the backbone expects, where the config leaves them to it: a crop of its
    input size, a resize of crop / 0.875, its mean and std. The resolved values are what config.json records and
    what embed, serve, export and evaluate reuse."""
    if config.crop is not None and config.resize is not None and config.mean and config.std:
        return config
    expected = backbone_preprocessing(config.model_name)
    crop = config.crop or expected.input_size
    resize = config.resize or expected.resize_for(crop)
    return dataclasses.replace(config, crop=crop, resize=resize, mean=list(config.mean or expected.mean),
                               std=list(config.std or expected.std))


def resumed_config(config: TrainConfig, state: dict) -> TrainConfig:
    defaults = TrainConfig()
    overrides = {key: getattr(config, key) for key in RESUME_OVERRIDES
                 if getattr(config, key) != getattr(defaults, key)}
    return config_from_dict(TrainConfig, {**state["config"], **overrides, "resume": config.resume})


def differing_fields(config: TrainConfig, stored: dict) -> list[str]:
    """The settings in which ``config`` differs from a run's stored config (those a resume may change aside)."""
    ignored = set(RESUME_OVERRIDES) | {"resume", "run_dir", "output"}
    current = asdict(config)
    if config.amp == "auto":  # stored runs hold the resolved value, which auto accepts
        ignored.add("amp")
    return sorted(key for key in current if key not in ignored and key in stored and stored[key] != current[key])


def _resolve_resume(config: TrainConfig):
    """(config, checkpoint file, state): what to start from. ``--resume auto`` and a re-run of the same command
    on an unfinished run directory continue that run; ``--resume PATH`` continues from PATH."""
    if config.resume and config.resume != "auto":
        file = find_checkpoint(config.resume)
        if Path(config.resume).is_dir():
            found = find_resumable(config.resume)
            if found is None:
                raise ValueError(f"{config.resume}: no usable checkpoint in this run directory")
            file, state = found
        else:
            state = load_checkpoint(file)
        return resumed_config(config, state), file, state
    runs = sibling_runs(run_base_dir(config))
    same = [folder for folder in runs if not differing_fields(config, _stored_config(folder))]
    unfinished = [folder for folder in same if not finished(folder)]
    if unfinished:  # the newest unfinished run of exactly these settings: continue it
        folder = unfinished[-1]
        found = find_resumable(folder)
        if found is None:  # stopped before its first checkpoint: start it again in the same folder
            return config_from_dict(TrainConfig, {**asdict(config), "run_dir": str(folder)}), None, None
        file, state = found
        continued = config_from_dict(TrainConfig, {**asdict(config), "resume": str(folder)})
        return resumed_config(continued, state), file, state
    if config.resume == "auto":
        if same:
            logger.info("%s holds a finished run of these settings; nothing to do", same[-1])
            return None, same[-1], None
        others = [folder for folder in runs if not finished(folder)]
        if others:
            stored = _stored_config(others[-1])
            listed = ", ".join(f"{key} ({stored[key]!r} there, {getattr(config, key)!r} now)"
                               for key in differing_fields(config, stored))
            raise ValueError(f"{others[-1]} holds an unfinished run with other settings: {listed}; resume it with "
                             f"--resume {others[-1]}, or choose another --run_dir")
    return config, None, None  # a new run: choose_run_dir picks a free folder


def sibling_runs(base: Path) -> list[Path]:
    """``base`` and its ``-2``, ``-3``, ... siblings that hold a run (config.json), oldest first."""
    found = [base] if (base / "config.json").exists() else []
    suffix = 2
    while (base.with_name(f"{base.name}-{suffix}") / "config.json").exists():
        found.append(base.with_name(f"{base.name}-{suffix}"))
        suffix += 1
    return found


def _stored_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {"resume": "unreadable"}  # differs from anything: never continued by accident


def _finished_summary(config: TrainConfig, folder: Path) -> dict:
    last = json.loads((folder / "final_metrics.json").read_text())
    return {"run_dir": str(folder), "epochs": config.total_epochs, "evaluations": {}, "last": last, "is_main": True}


def _run_directory(config: TrainConfig, dist: Distributed, resume_file: Path | None, resume_state: dict | None) -> Path:
    """The run's folder, created with config.json in it before anything else; logging to its train.log."""
    if resume_file is not None:
        if resume_file.parent.name != "checkpoints":
            raise ValueError(f"{resume_file}: resume from a checkpoint inside its run directory "
                             f"(RUN_DIR/checkpoints/epoch_NNN.pt) or from the run directory itself")
        run_dir = resume_file.parent.parent  # follows a run directory that was moved
        if dist.is_main and resume_state is not None:
            _set_aside_later_checkpoints(run_dir, resume_state)
    elif config.run_dir and (Path(config.run_dir) / "config.json").exists() and not finished(Path(config.run_dir)) \
            and not differing_fields(config, json.loads((Path(config.run_dir) / "config.json").read_text())):
        run_dir = Path(config.run_dir)  # an unfinished run that never reached a checkpoint: start it again
    else:
        run_dir = Path(dist.broadcast(str(choose_run_dir(config)) if dist.is_main else None))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            write_config(config, run_dir / "config.json")
        for leftover in (run_dir / "checkpoints").glob(".*.tmp") if (run_dir / "checkpoints").is_dir() else []:
            leftover.unlink()  # a write that a crash interrupted
    setup_logging(run_dir / "train.log" if dist.is_main else None, logging.INFO if dist.is_main else logging.WARNING)
    logger.info("run directory %s", run_dir)
    if resume_file is not None and resume_state is not None:
        logger.info("continuing the unfinished run in %s from %s (%d epochs%s done)", run_dir, resume_file.name,
                    resume_state["epoch"], f" and {resume_state['step']} steps" if resume_state.get("step") else "")
    return run_dir


def _set_aside_later_checkpoints(run_dir: Path, state: dict) -> None:
    """Resuming from an older checkpoint abandons the later ones: move them aside, so they are never mistaken
    for the continuation's (pruning, a later resume) and nothing is deleted."""
    from ..checkpoint import checkpoint_position, list_checkpoints

    position = (state["epoch"], state.get("step", 0))
    later = [file for file in list_checkpoints(run_dir) if (checkpoint_position(file) or (0, 0)) > position]
    if not later:
        return
    folder = run_dir / "checkpoints" / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    for file in later:
        for item in (file, file.with_name(file.name + ".sha256")):
            if item.exists():
                item.rename(folder / item.name)
    logger.warning("resuming from epoch %d step %d: moved the %d later checkpoints aside to %s", position[0],
                   position[1], len(later), folder)


def build_train_loader(config: TrainConfig, records: DatasetRecords, transform: ImageTransformConfig, cache,
                       dist: Distributed, device: torch.device):
    """The training loader over seeded batches: class-balanced (the recipe), or shuffled."""
    skip = config.on_bad_image == "skip"
    if cache is not None:
        dataset = ImageDataset(records.train.paths, records.train.labels, array_train_transform(transform), cache=cache,
                               skip_bad=skip)
    else:
        dataset = ImageDataset(records.train.paths, records.train.labels, train_transform(transform),
                               decode=records.decode, skip_bad=skip)
    sampler: ClassBalancedBatchSampler | ShuffledBatches
    if config.class_balancing:
        sampler = ClassBalancedBatchSampler(records.train.labels, config.batch_size, config.images_per_class,
                                            seed=config.seed, num_replicas=dist.world_size, rank=dist.rank)
        offset = dist.rank * (config.batch_size // config.images_per_class // dist.world_size) * config.images_per_class
    else:
        sampler = ShuffledBatches(len(records.train), config.batch_size, config.seed, dist.world_size, dist.rank)
        offset = dist.rank * (config.batch_size // dist.world_size)
    batches = SeededBatches(sampler, config.seed, offset=offset)
    # Persistent workers: no process start-up per epoch; each epoch's batches and seeds are read from
    # ``batches`` when the loader is iterated again.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate_skipping,
                                         worker_init_fn=ignore_stop_signals,
                                         **loader_settings(device, loader_workers(config.workers), persistent=True))
    return loader, batches


class ShuffledBatches:
    """Without class balancing: the training set shuffled per (seed, epoch), in batches shared by the ranks."""

    def __init__(self, size: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, self.size // self.batch_size)

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        share = self.batch_size // self.num_replicas
        for number in range(len(self)):
            batch = order[number * self.batch_size:(number + 1) * self.batch_size]
            yield batch[self.rank * share:(self.rank + 1) * share].tolist()


def _evaluate_lost_epoch(run: TrainingRun) -> None:
    """A run stopped between its checkpoint and that epoch's evaluation gets the evaluation now; a run stopped
    after its last evaluation but before final_metrics.json gets that file."""
    candidate = (run.resume_state is not None and run.start_step == 0 and run.start_epoch > 0
                 and should_evaluate(run.config, run.start_epoch - 1))
    if not candidate:
        return
    path = evaluation_path(run.run_dir, run.start_epoch)
    missing = run.dist.broadcast(not path.exists() if run.dist.is_main else None)  # every rank, or none, goes on
    if missing:
        logger.info("epoch %d was checkpointed but not evaluated; evaluating it now", run.start_epoch)
        evaluate_epoch(run, run.start_epoch)
    elif run.dist.is_main:
        result = json.loads(path.read_text())
        run.summary["evaluations"][run.start_epoch] = result
        run.summary["last"] = result
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
    wrapped: Callable[..., torch.Tensor] = run.step_module
    if run.dist.world_size > 1:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            run.step_module, device_ids=[run.device.index] if run.device.type == "cuda" else None)
    if run.config.compile:
        wrapped = torch.compile(wrapped)
    run.wrapped = wrapped
    logger.info("%s phase: training %d parameter tensors with %s", phase, len(trainable), run.config.optimizer)


# ---------------------------------------------------------------------------------------------------- 3. one epoch
@dataclass
class EpochTotals:
    """Running sums of an epoch: on the device between read-outs, so steps do not wait for the host."""

    loss_sum: torch.Tensor
    images: int = 0
    window_start: int = 0  # first step whose loss is not yet checked
    window_loss: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    started: float = field(default_factory=time.perf_counter)

    @classmethod
    def fresh(cls, device: torch.device, step: int = 0, loss_sum: float = 0.0, images: int = 0) -> EpochTotals:
        zero = torch.zeros((), dtype=torch.float64, device=device)
        return cls(loss_sum=zero + loss_sum, images=images, window_start=step, window_loss=zero.clone())


def train_one_epoch(run: TrainingRun, epoch: int) -> float:
    """The class-balanced batches of one epoch (from a mid-epoch position when resuming); the mean loss."""
    config, dist, device = run.config, run.dist, run.device
    start = run.start_step if epoch == run.start_epoch else 0
    if start and run.resume_state is not None:
        restore_rng_state(run.resume_state["rng"][dist.rank] if isinstance(run.resume_state["rng"], list)
                          else run.resume_state["rng"])
        carried = run.resume_state.get("epoch_totals", {})
        # the saved loss sum is every rank's: restored on rank 0 alone, as the epoch-end all-reduce adds them
        totals = EpochTotals.fresh(device, start, carried.get("loss_sum", 0.0) if dist.is_main else 0.0,
                                   carried.get("images", 0))
    else:
        seed_everything(config.seed, epoch + 1, dist.rank)
        totals = EpochTotals.fresh(device)
    run.batches.batches.set_epoch(epoch)
    run.batches.epoch, run.batches.start = epoch, start
    # The loader draws its workers' base seed when iterated: from its own generator, not the global one
    # that a resume restores (the images' augmentations have seeds of their own anyway).
    run.loader.generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, dist.rank))
    run.step_module.train()
    if config.freeze_bn:
        freeze_batch_norm(run.model.backbone)
    steps = run.steps_per_epoch
    progress = _progress_bar(run, epoch, steps, start)
    batches = iter(run.loader)
    alone = dist.world_size == 1  # a stop request needs no agreement between ranks: honour it at once
    for step in range(start, steps):
        try:
            images, labels, skipped = next(batches)
        except RuntimeError:
            if run.stop_signal is None or not alone:
                raise
            # a signal that reached the loader's workers anyway: checkpoint the steps done, then stop
            raise Preempted(run.stop_signal, save_mid_epoch(run, epoch, step, totals), run.run_dir) from None
        if skipped:
            _skipped(run, skipped)
        if images is None and not alone:  # the other ranks wait for this one's gradients: it cannot skip
            raise DatasetError(f"every image of rank {dist.rank}'s share of step {step + 1} is unreadable: "
                               f"{', '.join(skipped)}")
        if images is not None:
            _train_step(run, epoch, step, steps, images, labels, totals)
        failpoint("step")
        if (step + 1) % config.log_every == 0 or step + 1 == steps or (alone and run.stop_signal):
            _read_out(run, epoch, step, steps, totals, progress)
    del batches
    if progress is not None:
        progress.close()
    return _epoch_summary(run, epoch, totals)


def freeze_batch_norm(backbone: torch.nn.Module) -> int:
    """Put the backbone's BatchNorm layers in eval mode: they normalise with their pretrained statistics and keep
    them (their scale and shift still train). Returns how many layers."""
    layers = [module for module in backbone.modules() if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def _train_step(run: TrainingRun, epoch: int, step: int, steps: int, images, labels, totals: EpochTotals) -> None:
    config, device = run.config, run.device
    optimizer, wrapped = run.optimizer, run.wrapped
    if optimizer is None or wrapped is None:
        raise RuntimeError("a train step before enter_phase")
    lr = learning_rate(config, epoch, step / steps)
    for group in optimizer.param_groups:
        group["lr"] = lr
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if config.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(device, config.amp):
        loss = wrapped(images, labels)
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(optimizer)
    run.scaler.update()
    weighted = loss.detach().to(torch.float64) * len(labels)
    totals.loss_sum += weighted
    totals.window_loss += weighted
    totals.images += len(labels) * run.dist.world_size


def _read_out(run: TrainingRun, epoch: int, step: int, steps: int, totals: EpochTotals, progress) -> None:
    """Every ``log_every`` steps: the one host synchronisation -- loss check, logging, stop and save decisions."""
    window = float(totals.window_loss)
    if not math.isfinite(window):
        raise FloatingPointError(f"the loss became {window} at epoch {epoch + 1}, between steps "
                                 f"{totals.window_start + 1} and {step + 1}; the last checkpoint is intact; lower --lr")
    count = step + 1 - totals.window_start
    lr = learning_rate(run.config, epoch, step / steps)
    rate = totals.images / max(time.perf_counter() - totals.started, 1e-9)
    if progress is not None:
        progress.set_postfix(loss=f"{window / max(1, count * run.config.batch_size // run.dist.world_size):.3f}",
                             lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
        progress.update(count)
    if run.writer is not None:
        run.writer.add_scalar("train/loss", window / max(1, count * run.config.batch_size // run.dist.world_size),
                              epoch * steps + step)
        run.writer.add_scalar("train/lr", lr, epoch * steps + step)
    totals.window_loss.zero_()
    totals.window_start = step + 1
    due = run.config.checkpoint_every_minutes > 0 and \
        time.monotonic() - run.last_checkpoint_time >= 60 * run.config.checkpoint_every_minutes
    stop, save = run.dist.any(run.stop_signal is not None, run.device), run.dist.any(due, run.device)
    if (stop or save) and step + 1 < steps:
        path = save_mid_epoch(run, epoch, step + 1, totals)
        if stop:
            raise Preempted(run.stop_signal or "SIGTERM", path, run.run_dir)


def _epoch_summary(run: TrainingRun, epoch: int, totals: EpochTotals) -> float:
    loss_sum = totals.loss_sum
    if run.dist.world_size > 1:
        torch_dist.all_reduce(loss_sum)
    mean_loss = float(loss_sum) / max(totals.images, 1)
    elapsed = time.perf_counter() - totals.started
    lr = learning_rate(run.config, epoch, 1.0)
    logger.info("epoch %d/%d (%s): loss %.4f, lr %.3g, %.1f images/s, %.0f s", epoch + 1, run.config.total_epochs,
                run.phase, mean_loss, lr, totals.images / max(elapsed, 1e-9), elapsed)
    if run.writer is not None:
        run.writer.add_scalar("train/epoch_loss", mean_loss, epoch + 1)
        run.writer.add_scalar("train/images_per_second", totals.images / max(elapsed, 1e-9), epoch + 1)
    return mean_loss


def _progress_bar(run: TrainingRun, epoch: int, steps: int, start: int):
    if not (run.config.progress and run.dist.is_main):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, initial=start, desc=f"epoch {epoch + 1}/{run.config.total_epochs} ({run.phase})",
                unit="batch", leave=False, dynamic_ncols=True)


def _skipped(run: TrainingRun, paths: list[str]) -> None:
    """``--on_bad_image skip``: an image that stopped decoding after verification is left out and counted."""
    run.skipped_images.extend(paths)
    for path in paths:
        logger.warning("skipped an unreadable image (%d so far): %s", len(run.skipped_images), path)
    if run.dist.is_main:
        with open(run.run_dir / "skipped_images.txt", "a") as handle:
            handle.writelines(f"{path}\n" for path in paths)


# ---------------------------------------------------------------------------------------------------- 4. epoch end
def _state(run: TrainingRun) -> dict:
    broken = [name for name, value in run.step_module.state_dict().items()
              if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if broken:  # never let a checkpoint replace a good one with NaN or infinite weights
        raise FloatingPointError(f"non-finite values in {', '.join(broken[:5])}; no checkpoint written, the last one "
                                 f"is intact; lower --lr")
    rng = run.dist.gather(rng_state())  # every rank's generators: its own augmentation-free draws
    return {"phase": run.phase, "run_dir": str(run.run_dir), "config": asdict(run.config),
            "model": run.model.state_dict(), "criterion": run.criterion.state_dict(),
            "optimizer": run.optimizer.state_dict() if run.optimizer is not None else None,
            "scaler": run.scaler.state_dict(),
            "class_names": list(run.records.train.class_names),
            "rng": rng[0] if rng is not None and run.dist.world_size == 1 else rng}


def save_mid_epoch(run: TrainingRun, epoch: int, step: int, totals: EpochTotals) -> Path | None:
    """A checkpoint ``step`` steps into epoch ``epoch + 1`` (the sampler's position and every RNG included)."""
    state = _state(run)
    loss_sum = totals.loss_sum.clone()
    if run.dist.world_size > 1:
        torch_dist.all_reduce(loss_sum)
    path = None
    if run.dist.is_main:
        state["epoch_totals"] = {"loss_sum": float(loss_sum), "images": totals.images}
        path = run.saver.save(epoch, state, step=step)
        logger.info("checkpoint %s (%d of %d steps of epoch %d)", path.name, step, run.steps_per_epoch, epoch + 1)
    run.last_checkpoint_time = time.monotonic()
    run.dist.barrier()
    return path


def end_of_epoch(run: TrainingRun, epoch: int, mean_loss: float) -> None:
    """Checkpoint (rank 0), then evaluate (every rank embeds its share) when the schedule says so."""
    state = _state(run)
    if run.dist.is_main:
        run.saver.save(epoch + 1, state)
    run.last_checkpoint_time = time.monotonic()
    run.dist.barrier()
    if should_evaluate(run.config, epoch):
        evaluate_epoch(run, epoch + 1)
    run.dist.barrier()


def evaluate_epoch(run: TrainingRun, epoch_number: int) -> dict | None:
    """Embed the evaluated splits on every rank (each its share, gathered to rank 0), rank 0 ranks and writes."""
    config = run.config
    result, _ = evaluate_model(run.model, run.records, run.transform, run.ks,
                               config.eval_batch_size or config.batch_size,
                               run.device, run.workers, config.amp, config.channels_last, config.nmi, run.cache,
                               progress=config.progress, dist=run.dist)
    failpoint("evaluation")
    if result is None:  # ranks other than 0 embed their share and hand it over
        return None
    if run.skipped_images:
        result = {**result, "skipped_images": len(run.skipped_images)}
    main_epoch = main_phase_epoch(config, epoch_number)
    label = f"epoch {epoch_number}" + (f" (main-phase epoch {main_epoch})" if main_epoch else " (warm-up)")
    for line in write_evaluation(run.run_dir, epoch_number, result, main_epoch, run.writer):
        logger.info("%s %s", label, line)
    run.saver.mark_best(epoch_number, result["float"]["recall@1"])
    run.summary["evaluations"][epoch_number] = result
    run.summary["last"] = result
    return result


# ---------------------------------------------------------------------------------------------------- signals
@contextmanager
def _stop_on_signals(run: TrainingRun):
    """SIGTERM / SIGINT: finish the step, checkpoint, stop (see :func:`_read_out`); a second one exits at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(number, frame):
        if run.stop_signal is not None:
            logger.warning("second %s: exiting at once", signal.Signals(number).name)
            raise SystemExit(128 + number)
        run.stop_signal = signal.Signals(number).name
        logger.warning("%s received: finishing the current step, then writing a checkpoint", run.stop_signal)

    previous = {number: signal.signal(number, request_stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
