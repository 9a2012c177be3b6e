"""One dataclass per command, and the paper's recipes as data.

Each field carries its command-line help (and allowed values) in its metadata; :mod:`normsoftmax.cli`
builds every command's parser from these dataclasses, and :func:`build_config` turns the flags a user
gave into a config the one same way for every command. The field names and defaults of
:class:`TrainConfig` are the reference script's (``metric_learning/train_classification.py``), so its
command lines mean the same here. A run writes its resolved config to its directory before anything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from .files import atomic_write

T = TypeVar("T")

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def option(default: Any = None, help: str = "", *, choices: Any = None, default_factory: Any = None,
           **cli: Any) -> Any:
    """A config field with its command-line help; ``cli`` holds argparse overrides (``flags``, ``nargs``,
    ``const``, ``action``, ``type``, ``metavar``, ``positional``) or ``cli=False`` for API-only fields.

    Typed ``Any`` as :func:`dataclasses.field` is: the class attribute holds the field's value type."""
    metadata = {"help": help, "choices": choices, **cli}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def required(value: T | None, what: str) -> T:
    """``value``, or a ValueError saying that ``what`` is missing (a field the command line takes positionally,
    which a config made in Python may leave out)."""
    if value is None:
        raise ValueError(f"{what} is required")
    return value


def field_choices(config_field: dataclasses.Field) -> list | None:
    choices = config_field.metadata.get("choices")
    return list(choices()) if callable(choices) else choices


def check_choices(config) -> None:
    """Refuse a value outside a field's allowed values, naming the field and the choices."""
    for config_field in fields(config):
        choices = field_choices(config_field)
        value = getattr(config, config_field.name)
        if choices and value is not None and value not in choices:
            raise ValueError(f"{config_field.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _recipe_names() -> list[str]:
    from .data.registry import registered_datasets

    return [spec.name for spec in registered_datasets() if spec.recipe]


def _dataset_names() -> list[str]:
    from .data.registry import registered_datasets

    return [spec.reference_name for spec in registered_datasets()]


# The reference README's reproduction commands share these (ResNet50, dim 2048, batch 75, 15 epochs per step,
# 2 steps); each benchmark's spec adds its lr and images_per_class.
COMMON_RECIPE = dict(dim=2048, model_name="resnet50", epochs_per_step=15, num_steps=2, test_every_n_epochs=5,
                     lr_mult=1.0, class_balancing=True, batch_size=75)


def recipe(name: str) -> dict:
    """The hyperparameters of the paper's reproduction command for benchmark ``name``."""
    from .data.registry import dataset_spec

    spec = dataset_spec(name)
    if not spec.recipe:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(_recipe_names())}")
    return {"dataset": spec.reference_name, **COMMON_RECIPE, **spec.recipe}


def recall_ks(dataset: str) -> list[int]:
    """The Recall@K cut-offs reported for ``dataset`` (the reference code's table columns)."""
    from .data.registry import dataset_spec

    return list(dataset_spec(dataset).recall_ks)


def default_dataset_root(dataset: str) -> str:
    """Where ``normsoftmax prepare`` puts ``dataset`` by default; datasets it does not prepare need a root."""
    from .data.registry import dataset_spec

    spec = dataset_spec(dataset)
    if spec.default_root is None:
        raise ValueError(f"--dataset {dataset} needs --dataset_root")
    return spec.default_root


@dataclass
class TrainConfig:
    # --- the reference script's flags, same names and defaults ---
    dataset: str = option("StanfordOnlineProducts", "Cub200, Cars196, StanfordOnlineProducts, InShop, folder or csv")
    dataset_root: str | None = option(None, "dataset folder (or CSV file for --dataset csv); default data/<name>")
    batch_size: int = option(64)
    model_name: str = option("resnet50", "resnet18, resnet50, resnet101, or a timm model name")
    lr: float = option(0.01)
    gamma: float = option(0.1, "lr factor at each step")
    class_balancing: bool = option(False, "class-balanced batches")
    images_per_class: int = option(5)
    lr_mult: float = option(1.0, "lr multiplier of the warm-up epochs (new parameters only)")
    dim: int = option(2048, "embedding dimension")
    test_every_n_epochs: int = option(2)
    epochs_per_step: int = option(4)
    pretrain_epochs: int = option(1, "warm-up epochs training only the new parameters")
    num_steps: int = option(3)
    output: str = option("runs", "runs go to OUTPUT/<dataset>/<dim>/<model>_<batch>")
    # --- additions ---
    recipe: str | None = option(None, "the paper's hyperparameters for a benchmark", choices=_recipe_names)
    weights: str = option("imagenet", "imagenet (the backbone's ImageNet weights), none, or a weights file: a "
                                      "torchvision or timm state dict (a classifier in it is ignored), under any "
                                      "module./model./backbone./encoder. prefix or a checkpoint's state_dict/model/"
                                      "ema key, .safetensors, or a normsoftmax checkpoint")
    weights_partial: bool = option(False, "accept a weights file that leaves some backbone tensors unloaded or holds "
                                          "some with other shapes (by default the run stops, naming them)")
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    workers: int = option(-1, "data-loading processes (default -1: one per available core, at most 8)")
    seed: int = option(0)
    temperature: float = option(0.05)
    class_sample_fraction: float | None = option(None, "score the batch's classes plus this fraction of the others")
    optimizer: str = option("sgd", "sgd (the paper) or adamw (from-scratch training, e.g. the demo)",
                            choices=("sgd", "adamw"))
    scheduler: str = option("step", "step (lr x gamma every epochs_per_step) or cosine", choices=("step", "cosine"))
    momentum: float = option(0.9)
    weight_decay: float = option(1e-4)
    resize: int | None = option(None, "resize to this square (default: the crop / 0.875, so 256 for a 224 crop)")
    crop: int | None = option(None, "crop side (default: the backbone's input size: 224 for ResNets)")
    mean: list[float] | None = option(None, "input normalisation mean, e.g. 0.5,0.5,0.5 (default: the backbone's own: "
                                            "ImageNet's for torchvision, the pretrained config's for timm)")
    std: list[float] | None = option(None, "input normalisation std (default: the backbone's own)")
    hflip: bool = option(True, "random horizontal flips")
    freeze_bn: bool = option(False, "keep the backbone's BatchNorm statistics from its pretraining (eval mode; scale "
                                    "and shift still train): for batches too small or too repetitive to estimate "
                                    "them, e.g. few images per class drawn with replacement")
    keep_aspect: bool = option(False, "resize the shorter side instead of to a square")
    amp: str = option("auto", "mixed precision: auto (bf16 on GPUs that have it, on CPUs with AMX, and on CPUs with "
                              "AVX-512 BF16 where a one-second probe finds it 1.5x faster; else float32), none, bf16, "
                              "fp16", choices=AMP_CHOICES)
    compile: bool = option(False, "torch.compile the training step (faster steps after a compilation of minutes)")
    channels_last: bool = option(True, "channels-last memory layout (faster convolutions on CPUs and GPUs)")
    eval_batch_size: int = option(0, "0: same as batch_size")
    ks: list[int] | None = option(None, "Recall@K cut-offs, e.g. 1,2,4,8 (default: the dataset's)")
    nmi: bool | None = option(None, "NMI (default: only when the evaluated set has at most 1,000 classes)")
    verify_images: bool = option(True, "decode every image before training")
    use_cache: bool = option(True, "use the dataset's pre-resized image cache when it matches")
    resume: str | None = option(None, "a checkpoint file or a run directory to continue, or auto: continue the "
                                      "unfinished run of this config in its run directory, if any")
    run_dir: str | None = option(None, "an explicit run directory instead of OUTPUT/<dataset>/<dim>/<model>_<batch>")
    max_steps_per_epoch: int = option(0, "0: a full epoch; N cuts epochs short (smoke tests)")
    keep_checkpoints: int = option(0, "0: keep every epoch's checkpoint; N: only the newest N (and the best)")
    checkpoint_every_minutes: float = option(10.0, "also checkpoint inside an epoch this often (0: never)")
    on_bad_image: str = option("error", "an image that fails to load during training: stop naming it, or skip "
                                        "it and count it", choices=("error", "skip"))
    log_every: int = option(10, "steps between reads of the loss on the host (TensorBoard, progress bar, the "
                                "non-finite check, stop requests): the device is not synchronised in between")
    progress: bool = option(True, "progress bars")

    @classmethod
    def from_recipe(cls, recipe_name: str, **overrides) -> TrainConfig:
        """A benchmark recipe's hyperparameters, with ``overrides`` on top (as ``--recipe`` plus flags)."""
        return build_config(cls, {"recipe": recipe_name, **overrides})

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.epochs_per_step * self.num_steps

    def validate(self) -> None:
        from .data.registry import dataset_spec

        dataset_spec(self.dataset)
        check_choices(self)
        checks = [
            (self.batch_size > 0, f"batch_size must be positive, got {self.batch_size}"),
            (self.images_per_class > 0, f"images_per_class must be positive, got {self.images_per_class}"),
            (self.dim > 0, f"dim must be positive, got {self.dim}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.epochs_per_step > 0 and self.num_steps >= 0 and self.pretrain_epochs >= 0,
             "epoch counts must not be negative"),
            (self.test_every_n_epochs > 0, f"test_every_n_epochs must be positive, got {self.test_every_n_epochs}"),
            (self.crop is None or self.resize is None or self.crop <= self.resize,
             f"crop ({self.crop}) must not exceed resize ({self.resize})"),
            (all(v is None or (len(v) == 3 and (v is self.mean or min(v) > 0)) for v in (self.mean, self.std)),
             f"mean and std take three values each, std positive (got {self.mean}, {self.std})"),
            (self.max_steps_per_epoch >= 0,
             f"max_steps_per_epoch must not be negative, got {self.max_steps_per_epoch}"),
            (self.keep_checkpoints >= 0, f"keep_checkpoints must not be negative, got {self.keep_checkpoints}"),
            (self.eval_batch_size >= 0, f"eval_batch_size must not be negative, got {self.eval_batch_size}"),
            (self.workers >= -1, f"workers must be -1 (automatic) or more, got {self.workers}"),
            (self.checkpoint_every_minutes >= 0, "checkpoint_every_minutes must not be negative"),
            (self.log_every > 0, f"log_every must be positive, got {self.log_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass
class EvaluateConfig:
    checkpoint: str | None = option(None, "a checkpoint file or run directory", positional=True, nargs="?")
    embeddings: str | None = option(None, "an .npz of embeddings to evaluate instead of a checkpoint")
    dataset: str | None = option(None, "default: the dataset the checkpoint was trained on")
    dataset_root: str | None = option(None)
    ks: list[int] | None = option(None, "Recall@K cut-offs, e.g. 1,2,4,8", flags=("--k", "--ks"))
    batch_size: int = option(64)
    device: str = option("auto")
    workers: int = option(-1)
    amp: str = option("none", choices=("none", "bf16", "fp16"))
    binary: bool = option(True, "also evaluate the sign bits under Hamming distance")
    nmi: bool | None = option(None)
    save_embeddings: str | None = option(None, "write the embeddings to this .npz")
    output_json: str | None = option(None, "write the evaluation object to this JSON file", flags=("--output",))
    print_json: bool = option(False, "print the evaluation object as JSON", flags=("--json",), action="store_true")
    use_cache: bool = option(True)
    progress: bool = option(True)


@dataclass
class DemoConfig:
    output: str = option("demo_output", "output folder")
    num_classes: int = option(400)
    images_per_class: int = option(24)
    image_size: int = option(64)
    epochs: int = option(8)
    seed: int = option(0)
    workers: int = option(-1)
    device: str = option("auto")
    progress: bool = option(True)
    transfer: bool = option(False, "instead: pretrain on one set of glyph classes, run the paper's SGD recipe from "
                                   "those weights on a second, evaluate both on a third")
    train_overrides: dict = option(help="TrainConfig fields to change in the demo's run", default_factory=dict,
                                   cli=False)


@dataclass
class PrepareConfig:
    """Everything ``normsoftmax prepare`` does."""

    dataset: str | None = option(None, "cub200, cars196, sop or inshop (omit with --check DIR)", positional=True,
                                 nargs="?")
    root: str | None = option(None, "where archives, data and manifest.json go (default data/<dataset>)")
    urls: list[str] = option(help="download from here instead (repeatable)", default_factory=list, flags=("--url",),
                             action="append")
    from_archives: list[str] = option(help="archives/files downloaded by hand", default_factory=list,
                                      flags=("--from-archive", "--from_archive"), nargs="+", action="extend")
    sha256: list[str] = option(help="expected SHA-256: HEX, or FILENAME=HEX (repeatable)", default_factory=list,
                               action="append")
    check: bool | str = option(False, "re-verify every image and the counts (of DIR, or of the prepared --root)",
                               nargs="?", const=True, type=str, metavar="DIR")
    cache: bool = option(False, "also write the pre-resized uint8 image cache")
    cache_keep_aspect: bool = option(False, "cache with the shorter side at --cache-size instead of a square")
    cache_size: int = option(256)
    workers: int | None = option(None, "processes for verification and caching (default: all available cores)")
    retries: int = option(5, "failed download attempts tolerated per file")
    backoff: float = option(1.0, "first retry delay in seconds, doubled per failure (max 60 s)")
    timeout: float = option(60.0, "seconds without data before a connection counts as failed")
    keep_archives: bool = option(True, "keep downloaded archives once verified")
    progress: bool = option(True)


@dataclass
class CalibrateConfig:
    """``normsoftmax calibrate``: match thresholds with known error rates, from labelled images."""

    source: str | None = option(None, "a run directory or checkpoint (its dataset's evaluated split is embedded), "
                                      "or an embeddings file with labels (.npz)", positional=True)
    dataset: str | None = option(None, "embed this dataset's split instead of the run's")
    dataset_root: str | None = option(None)
    split: str | None = option(None, "the split to calibrate on (default: test, or gallery for query/gallery data)",
                               choices=("train", "test", "query", "gallery"))
    target_precision: list[float] | None = option(None, "precision(s) to reach, e.g. 0.99 (default when no target "
                                                        "is given: 0.99)", flags=("--target-precision",
                                                                                  "--target_precision"))
    target_fmr: list[float] | None = option(None, "false match rate(s) not to exceed, e.g. 0.001",
                                            flags=("--target-fmr", "--target_fmr"))
    apply: str | None = option(None, "which target an index and the service apply when several are given "
                                     "(default: the first precision target, else the first FMR target)",
                               choices=("precision", "fmr"))
    binary: bool = option(True, "also calibrate the sign bits under Hamming distance")
    out: str | None = option(None, "where to write (default RUN_DIR/calibration.json, or FILE.calibration.json "
                                   "beside an embeddings file)")
    seed: int = option(0, "the class split's seed")
    batch_size: int = option(64)
    device: str = option("auto")
    workers: int = option(-1)
    progress: bool = option(True)


@dataclass
class EmbedConfig:
    """``normsoftmax embed``: images -> an embeddings file (resumable, sharded under torchrun)."""

    checkpoint: str | None = option(None, "a checkpoint file or run directory", positional=True)
    images: str | None = option(None, "a folder of images (searched recursively) or a CSV with a path column",
                                positional=True, nargs="?")
    dataset: str | None = option(None, "embed a dataset's split instead (Cub200, ..., folder, csv)")
    dataset_root: str | None = option(None)
    split: str = option("test", "the dataset split to embed", choices=("train", "test", "query", "gallery"))
    out: str | None = option(None, "the embeddings file to write (.npz)")
    batch_size: int = option(64)
    device: str = option("auto")
    workers: int = option(-1)
    amp: str = option("auto", "auto: the precision the run trained and evaluated with", choices=AMP_CHOICES)
    save_every: int = option(4096, "images between atomic writes of the partial result (resuming starts there)")
    progress: bool = option(True)


@dataclass
class IndexBuildConfig:
    """``normsoftmax index build``: an embeddings file -> a faiss index folder."""

    embeddings: str | None = option(None, "an embeddings file written by `normsoftmax embed`", positional=True)
    out: str | None = option(None, "the index folder to create (or a Milvus location, milvus://HOST:PORT/NAME)")
    backend: str = option("faiss", "faiss: an index folder (the embedded default); milvus: a Milvus collection "
                                   "(--uri, --collection)", choices=("faiss", "milvus"))
    uri: str | None = option(None, "Milvus: a server (http://HOST:19530) or a Milvus Lite file (PATH.db)")
    collection: str | None = option(None, "Milvus: the collection's name")
    milvus_index: str | None = option(None, "Milvus: the vector index type (default FLAT, exact; IVF_FLAT with "
                                            "--kind ivf; HNSW for large collections on a server)",
                                      choices=("FLAT", "IVF_FLAT", "HNSW"))
    calibration: str | None = option(None, "match thresholds to carry (a calibration.json of the same model; default: "
                                           "the model's run's, when it has one)")
    kind: str = option("flat", "flat: exact inner product (+ binary codes); binary: Hamming only; ivf: IVF-PQ "
                               "(+ binary codes), for millions of items", choices=("flat", "binary", "ivf"))
    nlist: int | None = option(None, "IVF lists (default: about 4 sqrt(N), printed)")
    nprobe: int | None = option(None, "IVF lists searched per query (default: about nlist / 16, printed)")
    pq_m: int | None = option(None, "PQ sub-quantizers (default: dim / 16, at least 8)")
    train_size: int = option(100_000, "vectors sampled to train IVF-PQ")
    seed: int = option(0)


@dataclass
class IndexAddConfig:
    """``normsoftmax index add``: append an embeddings file (same model) to an index folder."""

    index: str | None = option(None, "the index folder or Milvus location", positional=True)
    embeddings: str | None = option(None, "an embeddings file of the same model", positional=True)


@dataclass
class IndexRemoveConfig:
    """``normsoftmax index remove``: remove items by id, durably; a service using the index sees it at once."""

    index: str | None = option(None, "the index folder or Milvus location", positional=True)
    ids: list[int] | None = option(None, "ids to remove", positional=True, nargs="+", type=int)


@dataclass
class IndexCompactConfig:
    """``normsoftmax index compact``: fold an index folder's journal of changes into a new generation."""

    index: str | None = option(None, "the index folder", positional=True)


@dataclass
class DuplicatesConfig:
    """``normsoftmax duplicates``: every pair of items past a threshold, grouped; JSON, CSV and an HTML page."""

    index: str | None = option(None, "the index folder (or Milvus location)", positional=True)
    threshold: float | None = option(None, "cosine (float) or bit agreement 1 - Hamming / dim (binary) that a pair "
                                           "must reach")
    calibrated: bool = option(False, "use the index's calibrated threshold", action="store_true")
    kind: str = option("float", "float (cosine) or binary (Hamming on sign bits)", choices=("float", "binary"))
    out: str | None = option(None, "the JSON file (default INDEX/duplicates.json; .csv and .html beside it)")
    nprobe: int | None = option(None, "IVF lists searched per item (default: the index's)")
    method: str = option("auto", "binary: multi-index hashing, or faiss range search (auto: hashing where it pays)",
                         choices=("auto", "multi-index", "range-search"))
    html_groups: int = option(200, "groups shown on the HTML page")


@dataclass
class SearchConfig:
    """``normsoftmax index search``: embed query images, print their nearest neighbours."""

    index: str | None = option(None, "the index folder or Milvus location", positional=True)
    images: str | None = option(None, "an image file or a folder of images", positional=True)
    threshold: float | None = option(None, "decide match per neighbour at this score (default: the calibration's)")
    calibration: str | None = option(None, "a calibration.json of the model (default: the index's, else the run's)")
    k: int = option(10, "neighbours per query")
    kind: str = option("float", "float (cosine) or binary (Hamming on sign bits)", choices=("float", "binary"))
    checkpoint: str | None = option(None, "the model to embed with (default: the one recorded in the index)")
    print_json: bool = option(False, "print JSON", flags=("--json",), action="store_true")
    batch_size: int = option(64)
    device: str = option("auto")
    workers: int = option(0)
    nprobe: int | None = option(None, "IVF lists searched per query (default: the index's)")


@dataclass
class ServeConfig:
    """``normsoftmax serve``: a search service and page for an index."""

    checkpoint: str | None = option(None, "the run directory or checkpoint that embedded the index", positional=True)
    index: str | None = option(None, "the index folder, or a Milvus location (milvus://HOST:PORT/NAME, "
                                     "milvus:///PATH/FILE.db/NAME)", positional=True, nargs="?")
    index_location: str | None = option(None, "the same as the INDEX argument", flags=("--index",))
    calibration: str | None = option(None, "match thresholds (a calibration.json of the model; default: the index's, "
                                           "else the run's)")
    api_key_file: str | None = option(None, "keys, one per line: KEY read|write. Once given, writes need a write key; "
                                            "reads need a key when the file lists any read key")
    uploads: str | None = option(None, "where images added through POST /items are kept (default: the index "
                                       "folder's images/; a Milvus collection needs one to accept writes)")
    max_writes_per_second: float = option(20.0, "item writes (POST/DELETE /items) accepted per second, all clients "
                                                "together; more get 429")
    host: str = option("127.0.0.1", "address to bind (127.0.0.1: this machine only)")
    port: int = option(8000)
    max_upload_mb: float = option(10.0, "largest accepted upload")
    max_pixels: int = option(40_000_000, "largest accepted image (width x height): decompression bombs are refused")
    max_batch: int = option(32, "requests embedded together at most")
    batch_wait_ms: float = option(5.0, "how long a request waits for others to share its batch")
    device: str = option("auto")
    k: int = option(12, "default number of results")
    max_k: int = option(100, "largest number of results a request may ask for")
    threads: int | None = option(None, "CPU threads of the model's forward pass and of faiss (default: one less "
                                       "than the cores, leaving one to receive and decode requests)")


@dataclass
class ReportConfig:
    """``normsoftmax report``: one self-contained HTML page about a training run."""

    run_dir: str | None = option(None, "the run directory", positional=True)
    out: str | None = option(None, "the HTML file (default RUN_DIR/report.html)")
    queries: int = option(8, "sampled queries shown with their neighbours")
    worst: int = option(8, "worst queries shown")
    k: int = option(8, "neighbours per query in the grids")
    batch_size: int = option(64)
    device: str = option("auto")
    workers: int = option(0)
    seed: int = option(0)
    dataset_root: str | None = option(None, "where the run's dataset is now, when it moved (default: the run's)")


@dataclass
class ExportConfig:
    """``normsoftmax export``: the embedder alone as ONNX or TorchScript, checked against PyTorch."""

    checkpoint: str | None = option(None, "a checkpoint file or run directory", positional=True)
    format: str = option("onnx", choices=("onnx", "torchscript"))
    out: str | None = option(None, "the file to write")
    opset: int = option(18, "ONNX opset")
    check_batch: int = option(4, "sample images the export is checked on")


def build_config(cls, explicit: dict):
    """``cls``'s defaults, then a recipe's values when ``explicit`` names one, then the explicit values."""
    values = {}
    if explicit.get("recipe"):
        values.update(recipe(explicit["recipe"]))
    values.update(explicit)
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    return cls(**values)


def config_from_dict(cls, values: dict):
    """A config from a stored dict (a checkpoint's), ignoring fields this version does not know."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def write_config(config, path: str | os.PathLike) -> None:
    atomic_write(Path(path), json.dumps(asdict(config), indent=2, sort_keys=True) + "\n", durable=True)


__all__ = ["TrainConfig", "EvaluateConfig", "CalibrateConfig", "IndexRemoveConfig", "IndexCompactConfig",
           "DuplicatesConfig", "DemoConfig", "PrepareConfig", "EmbedConfig",
           "IndexBuildConfig",
           "IndexAddConfig", "SearchConfig", "ServeConfig", "ReportConfig", "ExportConfig", "build_config",
           "config_from_dict",
           "write_config", "recipe", "recall_ks", "default_dataset_root", "option", "check_choices", "COMMON_RECIPE"]
