"""The training recipe, top to bottom.

1. Write the resolved config to the run directory, then set up logging.
2. Read the dataset into the common form and verify every image decodes.
3. Build the embedder (backbone + head) and the normalized-softmax loss.
4. Warm-up: ``pretrain_epochs`` epochs training only the new parameters
   (head projection and proxies) at ``lr * lr_mult``.
5. Main phase: all parameters, SGD (momentum 0.9, weight decay 1e-4), ``lr``
   multiplied by ``gamma`` every ``epochs_per_step`` epochs, ``num_steps`` steps.
6. After every epoch a checkpoint holding all state (model, proxies,
   optimizer, scaler, epoch, RNG); every ``test_every_n_epochs`` main epochs
   (and after each warm-up epoch and the last epoch, as the reference script)
   an evaluation written as JSON plus the reference's ``R@1, R@2, ...`` lines.

Every source of randomness is re-seeded from (seed, epoch) at the start of an
epoch, so a run resumed from any epoch's checkpoint continues exactly as the
uninterrupted run would have. Under torchrun each rank trains on its slice of
the same class-balanced batch; only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from .config import DEFAULT_DATASET_ROOTS, RECALL_KS, TrainConfig, config_from_dict, write_config
from .data.benchmarks import canonical_dataset_name, load_dataset
from .data.images import ImageDataset, ImageTransformConfig, train_transform, verify_images
from .data.records import DatasetRecords
from .data.sampler import ClassBalancedBatchSampler
from .embed import autocast, compute_embeddings, make_eval_dataset, resolve_device, resolve_workers
from .evaluate import evaluate_embeddings, format_recall_lines
from .loss import NormSoftmaxLoss
from .model import Embedder, create_embedder

logger = logging.getLogger("normsoftmax")

CHECKPOINT_FORMAT = 1


# ----------------------------------------------------------------------------------------------------------
# Distributed context
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str) -> "Distributed":
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        context = cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(context.local_rank)
        if not torch_dist.is_initialized():
            # Other ranks wait while rank 0 verifies images and evaluates: allow far more than the 10-minute default.
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=4))
        return context

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


# ----------------------------------------------------------------------------------------------------------
# Helpers of the recipe
# ----------------------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One number per (seed, epoch, rank): each rank augments its own images differently."""
    return seed * 1_000_003 + epoch + rank * 7_919_000_003


def seed_everything(seed: int, epoch: int, rank: int = 0) -> None:
    mixed = epoch_seed(seed, epoch, rank)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def default_dataset_root(config: TrainConfig) -> str:
    if config.dataset_root:
        return config.dataset_root
    canonical = canonical_dataset_name(config.dataset)
    if canonical not in DEFAULT_DATASET_ROOTS:
        raise ValueError(f"--dataset {config.dataset} needs --dataset_root")
    return DEFAULT_DATASET_ROOTS[canonical]


def choose_run_dir(config: TrainConfig) -> Path:
    """The reference layout output/<dataset>/<dim>/<model>_<batch>; never reuses a folder that holds a run."""
    base = Path(config.run_dir) if config.run_dir else Path(config.output) / config.dataset / str(config.dim) / f"{config.model_name}_{config.batch_size}"
    candidate, suffix = base, 1
    while (candidate / "config.json").exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def setup_logging(run_dir: Path | None, level: int = logging.INFO) -> None:
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_normsoftmax", False):
            logger.removeHandler(handler)
            handler.close()
    handlers = [logging.StreamHandler(sys.stderr)]
    if run_dir is not None:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    for handler in handlers:
        handler._normsoftmax = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


def image_transform(config: TrainConfig) -> ImageTransformConfig:
    """The geometry a run trains and evaluates with."""
    return ImageTransformConfig(resize=config.resize, crop=config.crop, keep_aspect=config.keep_aspect, hflip=config.hflip)


def open_cache(records: DatasetRecords, transform_config: ImageTransformConfig, enabled: bool = True):
    """The dataset's pre-resized image cache when enabled, present and matching the transform, else None."""
    if not enabled:
        return None
    from .data.cache import find_cache

    return find_cache(records, transform_config)


def learning_rate(config: TrainConfig, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate at ``epoch`` (0-based, warm-up epochs first) and ``fraction`` of the way through it."""
    if epoch < config.pretrain_epochs:
        return config.lr * config.lr_mult
    main_epoch = epoch - config.pretrain_epochs
    if config.scheduler == "cosine":
        total = config.epochs_per_step * config.num_steps
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * (main_epoch + fraction) / total))
    return config.lr * config.gamma ** (main_epoch // config.epochs_per_step)


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def should_evaluate(config: TrainConfig, epoch: int) -> bool:
    if epoch + 1 == config.total_epochs or epoch < config.pretrain_epochs:
        return True
    return (epoch + 1 - config.pretrain_epochs) % config.test_every_n_epochs == 0


class TrainStep(torch.nn.Module):
    """Model and loss as one module, so DistributedDataParallel synchronises the proxies too."""

    def __init__(self, model: Embedder, criterion: NormSoftmaxLoss):
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.criterion(self.model(images), labels)


def build_train_loader(config: TrainConfig, records: DatasetRecords, transform_config: ImageTransformConfig, cache,
                       dist: Distributed, workers: int, device: torch.device):
    if cache is not None:
        from .data.cache import array_train_transform

        dataset = ImageDataset(records.train.paths, records.train.labels, array_train_transform(transform_config), cache=cache)
    else:
        dataset = ImageDataset(records.train.paths, records.train.labels, train_transform(transform_config))
    common = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=False)
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


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
def checkpoint_path(run_dir: Path, epoch: int) -> Path:
    return run_dir / "checkpoints" / f"epoch_{epoch:03d}.pt"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the newest one of a run directory."""
    path = Path(path)
    if path.is_file():
        return path
    found = sorted((path / "checkpoints").glob("epoch_*.pt")) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path}: no checkpoint file, and no run directory with checkpoints/epoch_*.pt")
    return found[-1]


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".pt.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a truncated checkpoint behind


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    if keep > 0:
        for old in sorted((run_dir / "checkpoints").glob("epoch_*.pt"))[:-keep]:
            old.unlink()


def load_checkpoint(path: str | os.PathLike) -> dict:
    file = find_checkpoint(path)
    try:
        # weights_only: a checkpoint handed to `evaluate` cannot run code; it holds only tensors and plain values.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{file}: cannot be read as a normsoftmax checkpoint ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{file}: not a normsoftmax checkpoint")
    return state


def rng_state() -> dict:
    """Every generator's state, in types that load with ``weights_only=True``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def embedder_from_checkpoint(state: dict) -> tuple[Embedder, TrainConfig]:
    config = config_from_dict(TrainConfig, state["config"])
    model = create_embedder(config.model_name, config.dim, weights="none")
    model.load_state_dict(state["model"])
    return model, config


# Settings a resumed run may change; everything else comes from the checkpoint so the run continues unchanged.
RESUME_OVERRIDES = ("device", "workers", "progress", "dataset_root", "keep_checkpoints", "eval_batch_size")


def resumed_config(config: TrainConfig, state: dict) -> TrainConfig:
    defaults = TrainConfig()
    overrides = {key: getattr(config, key) for key in RESUME_OVERRIDES if getattr(config, key) != getattr(defaults, key)}
    return config_from_dict(TrainConfig, {**state["config"], **overrides, "resume": config.resume})


# ----------------------------------------------------------------------------------------------------------
# Evaluation during training
# ----------------------------------------------------------------------------------------------------------
def evaluate_model(model: Embedder, records: DatasetRecords, transform_config: ImageTransformConfig, ks: list[int],
                   batch_size: int, device: torch.device, workers: int, amp: str = "none", channels_last: bool = False,
                   nmi: bool | None = None, cache=None, progress: bool = False, binary: bool = True) -> tuple[dict, dict]:
    """(evaluation object, embeddings by split) for the dataset's evaluation protocol."""

    def embed(split):
        dataset = make_eval_dataset(split.paths, split.labels, transform_config, cache)
        return compute_embeddings(model, dataset, batch_size, device, workers, amp, channels_last, progress)

    if records.query_gallery:
        query, gallery = embed(records.query), embed(records.gallery)
        evaluated_classes = records.query.num_classes
        use_nmi = nmi if nmi is not None else evaluated_classes <= 1000
        result = evaluate_embeddings(query_embeddings=query, query_labels=records.query.labels, gallery_embeddings=gallery,
                                     gallery_labels=records.gallery.labels, ks=ks, nmi=use_nmi, binary=binary,
                                     device=device)
        return result, {"query": query, "gallery": gallery}
    test = embed(records.test)
    use_nmi = nmi if nmi is not None else records.test.num_classes <= 1000
    result = evaluate_embeddings(test, records.test.labels, ks=ks, nmi=use_nmi, binary=binary, device=device)
    return result, {"test": test}


def recall_report(result: dict) -> list[str]:
    """The reference README's lines: ``Raw Features: R@1, R@2, R@4, R@8: 65.36 & ...`` and ``Binary Features: ...``."""
    lines = format_recall_lines(result)
    return [f"Raw Features: {lines['float']}"] + ([f"Binary Features: {lines['binary']}"] if "binary" in lines else [])


def write_evaluation(run_dir: Path, epoch: int, result: dict, writer=None) -> list[str]:
    """eval/epoch_NNN.json (the evaluation object), eval/epoch_NNN.eval (the reference's lines), metrics.jsonl."""
    text = recall_report(result)
    folder = run_dir / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"epoch_{epoch:03d}.json").write_text(json.dumps(result, indent=2) + "\n")
    (folder / f"epoch_{epoch:03d}.eval").write_text("\n".join(text) + "\n")
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": epoch, **result}) + "\n")
    if writer is not None:
        for kind in ("float", "binary"):
            for name, value in result.get(kind, {}).items():
                if value is not None:
                    writer.add_scalar(f"eval/{kind}/{name}", value, epoch)
        writer.flush()
    return text


# ----------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------
def train(config: TrainConfig) -> dict:
    """Train, evaluate and checkpoint as the config says; returns a summary with the run directory and last metrics."""
    resume_state = None
    if config.resume:
        resume_state = load_checkpoint(config.resume)
        config = resumed_config(config, resume_state)
    config.validate()
    dist = Distributed.from_environment(config.device)
    device = resolve_device(config.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    workers = resolve_workers(config.workers)

    # 1. run directory, config first
    if resume_state is not None:
        checkpoint_file = find_checkpoint(config.resume)
        if checkpoint_file.parent.name != "checkpoints":
            raise ValueError(f"{checkpoint_file}: resume from a checkpoint inside its run directory "
                             f"(RUN_DIR/checkpoints/epoch_NNN.pt) or from the run directory itself")
        run_dir = checkpoint_file.parent.parent  # follows a run directory that was moved
    else:
        run_dir = choose_run_dir(config) if dist.is_main else None
        if dist.world_size > 1:
            shared = [str(run_dir) if run_dir else None]
            torch_dist.broadcast_object_list(shared, src=0)
            run_dir = Path(shared[0])
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_state is None:
            write_config(config, run_dir / "config.json")
    setup_logging(run_dir if dist.is_main else None, logging.INFO if dist.is_main else logging.WARNING)
    logger.info("run directory %s", run_dir)
    if resume_state is not None:
        logger.info("resuming from %s after epoch %d", find_checkpoint(config.resume), resume_state["epoch"])

    # 2. data
    seed_everything(config.seed, 0)
    records = load_dataset(config.dataset, default_dataset_root(config))
    for note in records.notes:
        logger.info("counts differ from the published dataset: %s", note)
    logger.info("dataset %s at %s: %s", records.name, records.root, json.dumps(records.counts()))
    if config.verify_images and dist.is_main:
        verify_images(records.all_paths(), workers=max(1, workers), progress=config.progress)
        logger.info("all %d images decode", len(records.all_paths()))
    dist.barrier()
    transform_config = image_transform(config)
    cache = open_cache(records, transform_config, config.use_cache)
    logger.info("images from %s", f"the pre-resized cache {cache}" if cache is not None else "decoded image files")
    train_loader, sampler = build_train_loader(config, records, transform_config, cache, dist, workers, device)
    ks = config.ks or RECALL_KS[canonical_dataset_name(config.dataset)]

    # 3. model and loss
    model = create_embedder(config.model_name, config.dim, config.weights)
    criterion = NormSoftmaxLoss(records.train.num_classes, config.dim, config.temperature, config.class_sample_fraction)
    step_module = TrainStep(model, criterion).to(device)
    if config.channels_last:
        step_module.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    start_epoch, optimizer_state = 0, None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        criterion.load_state_dict(resume_state["criterion"])
        scaler.load_state_dict(resume_state["scaler"])
        start_epoch = resume_state["epoch"]
        optimizer_state = resume_state["optimizer"]
    logger.info("model %s (width %d) -> dim %d, %d proxies, weights %s", config.model_name, model.width, config.dim,
                criterion.num_classes, config.weights)

    writer = None
    if dist.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"))

    summary = {"run_dir": str(run_dir), "epochs": config.total_epochs, "evaluations": {}, "is_main": dist.is_main}

    def evaluate_epoch(epoch_number: int) -> None:
        result, _ = evaluate_model(model, records, transform_config, ks, config.eval_batch_size or config.batch_size,
                                   device, workers, config.amp, config.channels_last, config.nmi, cache,
                                   progress=config.progress)
        for line in write_evaluation(run_dir, epoch_number, result, writer):
            logger.info("epoch %d %s", epoch_number, line)
        summary["evaluations"][epoch_number] = result
        summary["last"] = result

    # A run stopped between its checkpoint and that epoch's evaluation gets the evaluation now.
    if (resume_state is not None and dist.is_main and start_epoch > 0 and should_evaluate(config, start_epoch - 1)
            and not (run_dir / "eval" / f"epoch_{start_epoch:03d}.json").exists()):
        logger.info("epoch %d was checkpointed but not evaluated; evaluating it now", start_epoch)
        evaluate_epoch(start_epoch)
    dist.barrier()

    # 4-6. warm-up, then the main phase
    optimizer, phase, wrapped = None, None, step_module
    steps_per_epoch = len(train_loader) if not config.max_steps_per_epoch else min(len(train_loader), config.max_steps_per_epoch)
    for epoch in range(start_epoch, config.total_epochs):
        epoch_phase = "warmup" if epoch < config.pretrain_epochs else "main"
        if epoch_phase != phase:
            phase = epoch_phase
            trainable = model.new_parameters() + list(criterion.parameters()) if phase == "warmup" else list(step_module.parameters())
            for parameter in model.backbone.parameters():
                parameter.requires_grad_(phase == "main")
            optimizer = make_optimizer(config, trainable, learning_rate(config, epoch))
            if optimizer_state is not None and resume_state.get("phase") == phase:
                optimizer.load_state_dict(optimizer_state)
            optimizer_state = None
            wrapped = step_module
            if dist.world_size > 1:
                wrapped = torch.nn.parallel.DistributedDataParallel(
                    step_module, device_ids=[device.index] if device.type == "cuda" else None)
            logger.info("%s phase: training %d parameter tensors with %s", phase, len(trainable), config.optimizer)

        seed_everything(config.seed, epoch + 1, dist.rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        # DataLoader workers draw their seeds from this generator; the main process from the global RNG.
        train_loader.generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, dist.rank))
        step_module.train()
        epoch_loss, epoch_images, started = 0.0, 0, time.perf_counter()
        batches = iter(train_loader)
        progress = None
        if config.progress and dist.is_main:
            from tqdm import tqdm

            progress = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{config.total_epochs} ({phase})", unit="batch",
                            leave=False, dynamic_ncols=True)
        for step in range(steps_per_epoch):
            images, labels = next(batches)
            lr = learning_rate(config, epoch, step / steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast(device, config.amp):
                loss = wrapped(images, labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at epoch {epoch + 1}, step {step + 1}; lower --lr")
            epoch_loss += loss_value * len(labels)
            epoch_images += len(labels) * dist.world_size
            global_step = epoch * steps_per_epoch + step
            rate = epoch_images / max(time.perf_counter() - started, 1e-9)
            if progress is not None:
                progress.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                progress.update()
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, global_step)
                writer.add_scalar("train/lr", lr, global_step)
        del batches
        if progress is not None:
            progress.close()
        elapsed = time.perf_counter() - started
        if dist.world_size > 1:
            total = torch.tensor([epoch_loss], dtype=torch.float64, device=device)
            torch_dist.all_reduce(total)
            epoch_loss = total.item()
        mean_loss = epoch_loss / max(epoch_images, 1)
        logger.info("epoch %d/%d (%s): loss %.4f, lr %.3g, %.1f images/s, %.0f s", epoch + 1, config.total_epochs, phase,
                    mean_loss, lr, epoch_images / max(elapsed, 1e-9), elapsed)
        if writer is not None:
            writer.add_scalar("train/epoch_loss", mean_loss, epoch + 1)
            writer.add_scalar("train/images_per_second", epoch_images / max(elapsed, 1e-9), epoch + 1)

        if dist.is_main:
            save_checkpoint(checkpoint_path(run_dir, epoch + 1), {
                "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "phase": phase, "run_dir": str(run_dir),
                "config": asdict(config), "model": model.state_dict(), "criterion": criterion.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "class_names": list(records.train.class_names), "rng": rng_state(),
            })
            prune_checkpoints(run_dir, config.keep_checkpoints)
            if should_evaluate(config, epoch):
                evaluate_epoch(epoch + 1)
        dist.barrier()

    if writer is not None:
        writer.close()
    if dist.is_main and "last" in summary and summary["evaluations"].get(config.total_epochs) is not None:
        (run_dir / "final_metrics.json").write_text(json.dumps(summary["last"], indent=2) + "\n")
    return summary
