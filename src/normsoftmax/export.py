"""``normsoftmax export``: the embedder alone (no loss, no proxies) as an ONNX or TorchScript file, checked
against PyTorch before it is kept.

The exported model maps images (N, 3, crop, crop) float32, ImageNet-normalised at the run's crop size, to
L2-normalised embeddings (N, dim) float32, with a dynamic batch dimension. ONNX goes through torch's
default ``torch.export``-based exporter (``dynamo=True``); the TorchScript-based exporter is only a fallback
for models ``torch.export`` cannot capture. TorchScript is ``torch.jit.trace``: the embedder has no
data-dependent control flow, and the numeric check below catches a trace that baked one in.

Every file is written to a temporary sibling first (:func:`normsoftmax.files.atomic_output`), reloaded,
run on sample images with a batch size different from the export's example (proving the batch is
dynamic) and compared with the PyTorch model; only when the largest absolute difference is within
:data:`TOLERANCE` does it replace ``--out``. Otherwise the command refuses and leaves no file behind.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import ExportConfig
from .files import atomic_output

logger = logging.getLogger(__name__)

TOLERANCE = 1e-4  # largest absolute difference from PyTorch an exported embedder may show
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}  # default file names: <run_dir>/embedder<suffix>
# A suffix of the other format is surely a mistake (``--format torchscript --out model.onnx``).
FOREIGN_SUFFIXES = {"onnx": {".pt", ".pth", ".ts", ".torchscript"}, "torchscript": {".onnx"}}
METADATA_FILE = "normsoftmax.json"  # the TorchScript archive's extra file holding the metadata


class ExportError(ValueError):
    """An export that cannot be made or does not match PyTorch; the message names the file."""


def export_embedder(config: ExportConfig) -> dict:
    """Export the embedder of ``config.checkpoint`` (a checkpoint file or run directory) to ``config.out``.

    Returns ``path``, ``format``, ``exporter``, ``checked_images``, ``check_source``, ``max_abs_diff``,
    ``bytes``, ``seconds`` and the ``metadata`` stored in the file.
    """
    from .checkpoint import find_checkpoint, load_embedder

    if config.format not in SUFFIXES:
        raise ValueError(f"format must be one of {', '.join(SUFFIXES)}, got {config.format!r}")
    if config.check_batch < 1:
        raise ValueError(f"check_batch must be at least 1, got {config.check_batch}")
    if not config.checkpoint:
        raise ValueError("export needs a checkpoint file or run directory")
    checkpoint = find_checkpoint(config.checkpoint).resolve()
    out = Path(config.out) if config.out else default_out_path(checkpoint, config.format)
    check_out_path(out, config.format, checkpoint)
    model = load_embedder(checkpoint, "cpu")
    images, source = sample_images(model.train_config, config.check_batch)
    return export_module(model, config.format, out, check_images=images, check_source=source,
                         metadata=embedder_metadata(model), opset=config.opset)


def default_out_path(checkpoint: Path, format: str) -> Path:
    """``<run_dir>/embedder.onnx`` or ``.pt``; a checkpoint outside ``checkpoints/`` counts its folder as the run."""
    from .checkpoint import CHECKPOINT_FOLDER

    run_dir = checkpoint.parent.parent if checkpoint.parent.name == CHECKPOINT_FOLDER else checkpoint.parent
    return run_dir / f"embedder{SUFFIXES[format]}"


def check_out_path(out: Path, format: str, checkpoint: Path | None = None) -> None:
    """Refuse, before the (slow) export, an output path that cannot or should not be written."""
    if out.suffix.lower() in FOREIGN_SUFFIXES[format]:
        raise ValueError(f"{out}: a {out.suffix} file name for a {format} export; "
                         f"use a {SUFFIXES[format]} name or the other --format")
    if out.is_dir():
        raise ValueError(f"{out}: is a folder; --out needs a file name, e.g. {out / ('embedder' + SUFFIXES[format])}")
    if checkpoint is not None and out.resolve() == checkpoint.resolve():
        raise ValueError(f"{out}: is the checkpoint being exported; choose another --out")
    folder = out.parent
    while not folder.exists() and folder != folder.parent:  # atomic_output creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{out}: cannot be created because {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{out}: cannot be written (no write permission in {folder})")


def embedder_metadata(model) -> dict[str, str]:
    """What a user of the exported file needs to feed it and trust it; strings, as ONNX metadata requires."""
    from .checkpoint import model_digest
    from .data.images import ImageTransformConfig
    from .version import __version__

    config = model.train_config
    transform = ImageTransformConfig.of(config)
    crop = config.crop
    return {
        "normsoftmax_version": __version__,
        "model_digest": getattr(model, "digest", None) or model_digest(model),
        "checkpoint": str(getattr(model, "checkpoint", "")),
        "backbone": model.backbone_name,
        "dim": str(model.dim),
        "input_name": INPUT_NAME,
        "input_shape": f"N,3,{crop},{crop}",
        "input_format": "float32 RGB NCHW, pixels in [0, 1] then normalised: (x - mean) / std",
        "input_size": str(crop),
        "mean": json.dumps(list(transform.mean)),
        "std": json.dumps(list(transform.std)),
        # The run's evaluation geometry: Resize((resize, resize)) (shorter side when keep_aspect), CenterCrop(crop).
        "resize": str(config.resize),
        "keep_aspect": json.dumps(config.keep_aspect),
        "output_name": OUTPUT_NAME,
        "output_shape": f"N,{model.dim}",
        "output_l2_normalized": "true",
    }


def sample_images(train_config, count: int) -> tuple[torch.Tensor, str]:
    """``count`` images of the run's dataset in its evaluation transform, or random normalised tensors when the
    dataset cannot be read here; with a description of which it is."""
    from .data.images import ImageTransformConfig

    try:
        return _dataset_images(train_config, count)
    except Exception as error:  # noqa: BLE001 -- whatever keeps the dataset from being read, random images still check
        logger.info("the run's dataset is not readable here (%s); checking on random images", _first_line(error))
    crop = train_config.crop
    pixels = torch.rand(count, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    transform = ImageTransformConfig.of(train_config)
    mean, std = torch.tensor(transform.mean).view(1, 3, 1, 1), torch.tensor(transform.std).view(1, 3, 1, 1)
    return (pixels - mean) / std, f"{count} random normalised images"


def _dataset_images(train_config, count: int) -> tuple[torch.Tensor, str]:
    """The first ``count`` images of the run's evaluation split (test, else query), as the run evaluates them."""
    from .data.images import ImageDataset, ImageTransformConfig, eval_transform
    from .data.registry import load_dataset

    if not train_config.dataset_root:
        raise FileNotFoundError("the run names no dataset root")
    records = load_dataset(train_config.dataset, train_config.dataset_root)
    split_name = "test" if records.test is not None else "query"
    split = records.splits()[split_name]
    dataset = ImageDataset(split.paths[:count], split.labels[:count],
                           eval_transform(ImageTransformConfig.of(train_config)),
                           decode=records.decode)
    images = torch.stack([dataset[index][0] for index in range(len(dataset))])
    return images, f"{len(images)} images of {records.name}'s {split_name} split"


def export_module(model: torch.nn.Module, format: str, out: str | os.PathLike, *, check_images: torch.Tensor,
                  metadata: dict[str, str], opset: int = 18, check_source: str = "given images",
                  tolerance: float = TOLERANCE) -> dict:
    """Export ``model`` (images -> embeddings) to ``out`` and keep the file only when, reloaded and run on
    ``check_images``, it matches the PyTorch model within ``tolerance``. The export's example input has a
    batch size different from ``check_images``', so the check also proves the batch dimension is dynamic.
    ``model`` is put in eval mode, float32 and the default memory format, in place."""
    if format not in SUFFIXES:
        raise ValueError(f"format must be one of {', '.join(SUFFIXES)}, got {format!r}")
    out = Path(out)
    started = time.perf_counter()
    # Exporters and the check need plain float32 NCHW weights (a channels_last run would bake strides in).
    model = model.float().to(memory_format=torch.contiguous_format).eval()
    check_images = check_images.float().contiguous()
    example = torch.zeros(_example_batch(len(check_images)), *check_images.shape[1:])
    with torch.no_grad():
        expected = model(check_images).numpy()
    try:
        with atomic_output(out) as temporary:
            if format == "onnx":
                exporter = write_onnx(model, example, temporary, opset, metadata)
            else:
                exporter = write_torchscript(model, example, temporary, metadata)
            actual = _run_exported(format, temporary, check_images)
            difference = max_abs_diff(actual, expected)
            if not difference <= tolerance:  # also refuses NaN
                raise ExportError(f"the {format} model differs from PyTorch by up to {difference:.3g} "
                                  f"on {check_source} (allowed: {tolerance:g})")
            size = temporary.stat().st_size
    except ExportError as error:  # raised on the temporary file: name the one the user asked for
        raise ExportError(f"{out}: not written: {error}") from None
    except OSError as error:
        raise ExportError(f"{out}: cannot be written ({error})") from error
    seconds = time.perf_counter() - started
    logger.info("%s: %s export via %s, %d bytes, max |difference| %.2e on %s, %.1f s",
                out, format, exporter, size, difference, check_source, seconds)
    return {"path": str(out), "format": format, "exporter": exporter, "checked_images": len(check_images),
            "check_source": check_source, "example_batch": len(example), "max_abs_diff": difference,
            "bytes": size, "seconds": seconds, "metadata": dict(metadata)}


def _run_exported(format: str, path: Path, images: torch.Tensor) -> np.ndarray:
    try:
        return run_onnx(path, images) if format == "onnx" else run_torchscript(path, images)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 -- onnxruntime and TorchScript raise their own kinds
        raise ExportError(f"the exported {format} model does not run on a batch of {len(images)} images "
                          f"({_first_line(error)})") from None


def _example_batch(check_batch: int) -> int:
    # 2, not 1: torch.export specialises a size-1 dimension to a constant.
    return 3 if check_batch == 2 else 2


def max_abs_diff(actual: np.ndarray, expected: np.ndarray) -> float:
    if actual.shape != expected.shape:
        raise ExportError(f"the exported model gives shape {actual.shape}, PyTorch {expected.shape}")
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0))


# ------------------------------------------------------------------------------------------------------- ONNX
def write_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, metadata: dict) -> str:
    """Write ``model`` as ONNX with a dynamic batch, stamp ``metadata`` and check the file; returns the
    exporter used: ``torch.onnx.export(dynamo=True)`` (torch.export-based, the default) or
    ``torch.onnx.export(dynamo=False)`` (the TorchScript-based fallback)."""
    import onnx

    try:
        _onnx_via_dynamo(model, example, path, opset)
        exporter = "torch.onnx.export(dynamo=True)"
    except Exception as dynamo_error:  # noqa: BLE001 -- any capture failure: try the older exporter
        logger.warning("the torch.export-based ONNX exporter failed (%s); falling back to the "
                       "TorchScript-based exporter", _first_line(dynamo_error))
        try:
            _onnx_via_torchscript(model, example, path, opset)
        except Exception as legacy_error:  # noqa: BLE001
            raise ExportError(f"neither ONNX exporter could export the model: torch.export-based: "
                              f"{_first_line(dynamo_error)}; TorchScript-based: {_first_line(legacy_error)}") from None
        exporter = "torch.onnx.export(dynamo=False)"
    proto = onnx.load(str(path))
    stamped = {**metadata, "exporter": f"{exporter}, torch {torch.__version__}"}
    del proto.metadata_props[:]
    for key, value in stamped.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = (f"normsoftmax embedder ({metadata.get('backbone')}, dim {metadata.get('dim')}): "
                        f"{INPUT_NAME} (N,3,H,W) ImageNet-normalised -> L2-normalised {OUTPUT_NAME} (N,dim)")
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as error:  # noqa: BLE001 -- onnx raises several kinds of checker errors
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {_first_line(error)}") from None
    return exporter


def _onnx_via_dynamo(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(model, (example,), dynamo=True, verbose=False, opset_version=opset,
                                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                dynamic_shapes=({0: batch},))
    if program is None:  # dynamo=True always returns the program; None is the TorchScript exporter's answer
        raise ExportError("torch.onnx.export returned no program")
    shape = program.model.graph.inputs[0].shape
    # torch's exporter quietly pins a dimension when the model's code does (refining the shapes torch.export
    # suggests); a fixed batch is a failed export here, which the TorchScript-based exporter may still manage.
    batch_size = shape[0] if shape is not None else None
    if isinstance(batch_size, int):
        raise ExportError(f"torch.export fixed the batch dimension at {batch_size}: the model's code depends on it")
    # One self-contained file (ONNX's protobuf limit: 2 GiB, far above the backbones here).
    program.save(str(path), external_data=False)


def _onnx_via_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # we chose it knowingly, as a fallback
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    """``images`` through the ONNX file in onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the threads torch was allowed, not every core
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]


# ------------------------------------------------------------------------------------------------ TorchScript
def write_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path, metadata: dict) -> str:
    """Trace ``model`` and save it with ``metadata`` as the extra file ``normsoftmax.json``; returns the exporter."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        try:
            # check_trace=False: the reloaded file is compared with the model afterwards, on another batch size.
            traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as error:  # noqa: BLE001 -- tracing fails in many ways, all the model's
            raise ExportError(f"torch.jit.trace cannot trace the model: {_first_line(error)}") from None
        stamped = {**metadata, "exporter": f"torch.jit.trace, torch {torch.__version__}"}
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(stamped, indent=2)})
    return "torch.jit.trace"


def run_torchscript(path: Path, images: torch.Tensor) -> np.ndarray:
    """``images`` through the TorchScript file, reloaded with ``torch.jit.load``."""
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    if not extra[METADATA_FILE]:
        raise ExportError(f"the reloaded TorchScript file lost its {METADATA_FILE}")
    with torch.no_grad():
        return loaded(images).numpy()


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata an exported file (``.onnx`` or TorchScript) carries."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        import onnx

        return {entry.key: entry.value for entry in onnx.load(str(path), load_external_data=False).metadata_props}
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


__all__ = [
    "TOLERANCE",
    "ExportError",
    "check_out_path",
    "default_out_path",
    "embedder_metadata",
    "export_embedder",
    "export_module",
    "read_metadata",
    "sample_images",
]
