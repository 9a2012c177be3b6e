"""Where and how a job runs: device, worker processes, mixed precision, seeding, the distributed process
group and logging. One place for each, shared by training, evaluation, embedding and the demo."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

logger = logging.getLogger("normsoftmax")

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


# ----------------------------------------------------------------------------------------------- device, workers
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; a CUDA name without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, which containers and schedulers set)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(requested: int | None = None, limit: int | None = None) -> int:
    """``requested`` when given (>= 0); otherwise one per available core, at most ``limit``."""
    if requested is not None and requested >= 0:
        return requested
    cores = available_cpus()
    return min(limit, cores) if limit else cores


# Data-loading processes per job: more than 8 rarely helps one GPU and costs memory per process.
LOADER_WORKER_LIMIT = 8


def loader_workers(requested: int | None = None) -> int:
    return worker_count(requested, LOADER_WORKER_LIMIT)


def loader_settings(device: torch.device, workers: int, persistent: bool = False) -> dict:
    """DataLoader keywords for the device: pinned memory for GPUs; ``persistent`` workers outlive an epoch."""
    settings = {"num_workers": workers, "pin_memory": device.type == "cuda"}
    if workers > 0:
        settings.update(persistent_workers=persistent, prefetch_factor=4 if device.type == "cuda" else 2)
    return settings


def autocast(device: torch.device, amp: str):
    """Mixed precision for the forward pass: ``none``, ``bf16`` or ``fp16``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> str:
    """``auto``: bf16 where it is fast, else float32.

    GPUs: bf16 from Ampere on. CPUs: bf16 with AMX tiles; with AVX-512 BF16 but no AMX, only where a short
    probe (:func:`cpu_bf16_speedup`) trains in bf16 at least ``BF16_PROBE_MARGIN`` times faster than in
    float32: such CPUs differ (benchmarks/train_throughput.py: bf16 + channels-last 3.4x the reference on an
    AMD EPYC; slower than float32 on an Intel Xeon without AMX, whose batch-1 forward pass was 2.7x slower).
    A training run stores the resolved value, so its evaluations, embeddings and service all use it.
    """
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    if device.type != "cpu" or not bf16_is_native(device):
        return "none"
    if amx_is_available():
        return "bf16"
    return "bf16" if cpu_bf16_speedup() >= BF16_PROBE_MARGIN else "none"


# bf16 must beat float32 by this factor in the probe: a margin wide enough that timing noise cannot flip the
# choice between two runs on one machine (measured: 2.5x on an AMD EPYC, below 1 on an Intel Xeon without AMX).
BF16_PROBE_MARGIN = 1.5


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup() -> float:
    """float32 time over bf16 time of one training step of a ResNet stage's convolutions on this CPU.

    Two 3x3 convolutions, 64 channels, 8 x 56 x 56, channels-last, forward and backward; best of three
    steps after a warm-up, in each precision: about a second, once per process. The global random state is
    left as it was.
    """
    import time

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.ReLU(),
                                    torch.nn.Conv2d(64, 64, 3, padding=1, bias=False))
        block = block.to(memory_format=torch.channels_last)
        images = torch.randn(8, 64, 56, 56).contiguous(memory_format=torch.channels_last)

    def best_step(bf16: bool) -> float:
        times = []
        for _ in range(4):
            started = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = block(images)
            out.float().sum().backward()
            block.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - started)
        return min(times[1:])

    float32, bf16 = best_step(False), best_step(True)
    speedup = float32 / bf16
    logger.info("bf16 probe: a training step %.2fx %s in bf16 than in float32 on this CPU", max(speedup, 1 / speedup),
                "faster" if speedup >= 1 else "slower")
    return speedup


def amx_is_available() -> bool:
    try:
        return bool(torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the build
        return False


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively (not emulated) on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - depends on the build
        return False


# ----------------------------------------------------------------------------------------------- seeding
def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """One number per (seed, epoch, rank): each rank augments its own images differently."""
    return seed * 1_000_003 + epoch + rank * 7_919_000_003


def seed_everything(seed: int, epoch: int = 0, rank: int = 0) -> None:
    mixed = epoch_seed(seed, epoch, rank)
    random.seed(mixed)
    np.random.seed(mixed % 2**32)
    torch.manual_seed(mixed)


def rng_state() -> dict:
    """Every generator's state, in types that load with ``torch.load(weights_only=True)``."""
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    keys = np.asarray(keys, dtype=np.int64)
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys), int(position), int(has_gauss), float(cached)],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- distributed
@dataclass
class Distributed:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device_name: str = "auto") -> Distributed:
        """Join the process group torchrun describes in the environment (``WORLD_SIZE``, ``RANK``, ...)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        context = cls(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
        use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(context.local_rank)
        if not torch_dist.is_initialized():
            # Ranks may wait on each other through image verification and evaluation: far more than the
            # 10-minute default.
            torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(hours=4))
        return context

    def device(self, name: str) -> torch.device:
        """The device of this rank: its own GPU under torchrun."""
        device = resolve_device(name)
        if device.type == "cuda" and self.world_size > 1:
            device = torch.device("cuda", self.local_rank)
        return device

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        torch_dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list | None:
        """Every rank's ``value`` on rank 0, in rank order (``None`` elsewhere)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_main else None
        torch_dist.gather_object(value, gathered, dst=0)
        return gathered

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when ``flag`` is true on any rank."""
        if self.world_size == 1:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], device=device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def shard(self, count: int) -> range:
        """This rank's contiguous share of ``count`` items (the first ranks take one more when uneven)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


# ----------------------------------------------------------------------------------------------- logging
def setup_logging(log_file: Path | None = None, level: int = logging.INFO) -> None:
    """Log the package's messages to stderr (and ``log_file``), replacing earlier handlers of ours."""
    logger.setLevel(level)
    for handler in list(logger.handlers):
        if getattr(handler, "_normsoftmax", False):
            logger.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler._normsoftmax = True  # type: ignore[attr-defined]  # marks the handlers this function owns
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    logger.propagate = False


# ----------------------------------------------------------------------------------------------- commands shown
def shell_command(*args: object) -> str:
    """A ``normsoftmax`` command line that works pasted into a new shell, whatever is on its PATH: the
    ``normsoftmax`` script beside this interpreter by absolute path (``python -m normsoftmax`` without one),
    arguments quoted where needed."""
    import shlex

    script = Path(sys.executable).parent / "normsoftmax"
    program = [str(script)] if script.is_file() else [sys.executable, "-m", "normsoftmax"]
    return " ".join(shlex.quote(str(part)) for part in [*program, *args])
