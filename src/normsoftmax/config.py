"""One dataclass per command, and the paper's recipes as data.

The field names and defaults of :class:`TrainConfig` are the reference
script's (``metric_learning/train_classification.py``), so its command lines
mean the same here; the recipes hold the hyperparameters of the paper's
reproduction commands. A config is written to the run directory before
anything else happens.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

# The reference README's reproduction commands (ResNet50, dim 2048, batch 75, 15 epochs per step, 2 steps).
RECIPES: dict[str, dict] = {
    "cub200": dict(dataset="Cub200", lr=0.001, images_per_class=25),
    "cars196": dict(dataset="Cars196", lr=0.01, images_per_class=25),
    "sop": dict(dataset="StanfordOnlineProducts", lr=0.01, images_per_class=5),
    "inshop": dict(dataset="InShop", lr=0.01, images_per_class=5),
}
for _recipe in RECIPES.values():
    _recipe.update(dim=2048, model_name="resnet50", epochs_per_step=15, num_steps=2, test_every_n_epochs=5,
                   lr_mult=1.0, class_balancing=True, batch_size=75)

# Recall@K cut-offs reported per dataset (the reference code's table columns).
RECALL_KS = {"cub200": [1, 2, 4, 8], "cars196": [1, 2, 4, 8], "sop": [1, 10, 100, 1000],
             "inshop": [1, 10, 20, 30, 40, 50], "folder": [1, 2, 4, 8], "csv": [1, 2, 4, 8]}

# Where `normsoftmax prepare` puts each dataset by default, so the README's commands need no --dataset_root.
DEFAULT_DATASET_ROOTS = {"cub200": "data/cub200", "cars196": "data/cars196", "sop": "data/sop", "inshop": "data/inshop"}


@dataclass
class TrainConfig:
    # --- the reference script's flags, same names and defaults ---
    dataset: str = "StanfordOnlineProducts"
    dataset_root: str | None = None
    batch_size: int = 64
    model_name: str = "resnet50"
    lr: float = 0.01
    gamma: float = 0.1
    class_balancing: bool = False
    images_per_class: int = 5
    lr_mult: float = 1.0
    dim: int = 2048
    test_every_n_epochs: int = 2
    epochs_per_step: int = 4
    pretrain_epochs: int = 1
    num_steps: int = 3
    output: str = "runs"
    # --- additions ---
    recipe: str | None = None
    weights: str = "imagenet"
    device: str = "auto"
    workers: int = -1  # -1: one per CPU core, at most 8
    seed: int = 0
    temperature: float = 0.05
    class_sample_fraction: float | None = None
    optimizer: str = "sgd"  # "sgd" (the paper) or "adamw" (from-scratch training, e.g. the demo)
    scheduler: str = "step"  # "step" (lr x gamma every epochs_per_step) or "cosine"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    resize: int = 256
    crop: int = 224
    hflip: bool = True
    keep_aspect: bool = False  # Resize(resize) on the shorter side instead of Resize((resize, resize))
    amp: str = "none"  # "none", "bf16" or "fp16"
    channels_last: bool = False
    eval_batch_size: int = 0  # 0: same as batch_size
    ks: list[int] | None = None  # None: the dataset's usual cut-offs
    nmi: bool | None = None  # None: only when the evaluated set has at most 1,000 classes (k-means cost)
    verify_images: bool = True
    use_cache: bool = True
    resume: str | None = None
    run_dir: str | None = None  # None: output/<dataset>/<dim>/<model>_<batch>, as the reference script
    max_steps_per_epoch: int = 0  # 0: a full epoch; a positive number cuts epochs short (smoke tests)
    keep_checkpoints: int = 0  # 0: keep every epoch's checkpoint; N: only the newest N
    progress: bool = True

    @classmethod
    def from_recipe(cls, recipe: str, **overrides) -> "TrainConfig":
        """A benchmark recipe's hyperparameters, with ``overrides`` on top (as ``--recipe`` plus flags)."""
        return apply_recipe(cls(), {"recipe": recipe, **overrides})

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.epochs_per_step * self.num_steps

    def validate(self) -> None:
        from .data.benchmarks import canonical_dataset_name

        canonical_dataset_name(self.dataset)
        checks = [
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.images_per_class > 0, f"images_per_class must be positive, got {self.images_per_class}"),
            (self.dim > 0, f"dim must be positive, got {self.dim}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.epochs_per_step > 0 and self.num_steps >= 0 and self.pretrain_epochs >= 0, "epoch counts must not be negative"),
            (self.test_every_n_epochs > 0, f"test_every_n_epochs must be positive, got {self.test_every_n_epochs}"),
            (self.optimizer in ("sgd", "adamw"), f"optimizer must be sgd or adamw, got {self.optimizer!r}"),
            (self.scheduler in ("step", "cosine"), f"scheduler must be step or cosine, got {self.scheduler!r}"),
            (self.amp in ("none", "bf16", "fp16"), f"amp must be none, bf16 or fp16, got {self.amp!r}"),
            (self.crop <= self.resize, f"crop ({self.crop}) must not exceed resize ({self.resize})"),
            (self.max_steps_per_epoch >= 0, f"max_steps_per_epoch must not be negative, got {self.max_steps_per_epoch}"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints must not be negative, got {self.keep_checkpoints}"),
            (self.eval_batch_size >= 0, f"eval_batch_size must not be negative, got {self.eval_batch_size}"),
            (self.workers >= -1, f"workers must be -1 (automatic) or more, got {self.workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class EvaluateConfig:
    checkpoint: str | None = None
    embeddings: str | None = None  # an .npz of embeddings: evaluate without a model
    dataset: str | None = None  # None: the dataset the checkpoint was trained on
    dataset_root: str | None = None
    ks: list[int] | None = None
    batch_size: int = 64
    device: str = "auto"
    workers: int = -1
    amp: str = "none"
    binary: bool = True
    nmi: bool | None = None
    save_embeddings: str | None = None
    output_json: str | None = None
    print_json: bool = False
    use_cache: bool = True
    progress: bool = True


@dataclass
class DemoConfig:
    output: str = "demo_output"
    num_classes: int = 400
    images_per_class: int = 24
    image_size: int = 64
    epochs: int = 8
    seed: int = 0
    workers: int = -1
    device: str = "auto"
    progress: bool = True
    train_overrides: dict = field(default_factory=dict)


def apply_recipe(config: TrainConfig, explicit: dict) -> TrainConfig:
    """Recipe values over the defaults, then the explicitly given values over both."""
    values = {}
    if explicit.get("recipe"):
        name = explicit["recipe"]
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        values.update(RECIPES[name])
    values.update(explicit)
    return dataclasses.replace(config, **values)


def config_from_dict(cls, values: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def write_config(config, path: str | os.PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(str(path) + ".tmp")
    temporary.write_text(json.dumps(asdict(config), indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)
