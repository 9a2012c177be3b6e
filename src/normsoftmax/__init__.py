"""normsoftmax: image embeddings by classification (Zhai & Wu, "Classification is a Strong Baseline for Deep
Metric Learning", BMVC 2019), from dataset archive to evaluation.

The public API, one style: functions are verb_object (``load_dataset``, ``train_embedder``,
``embed_images``, ...) and every command takes its config dataclass. The ``normsoftmax`` command line
calls exactly these. Names load on first use, so ``import normsoftmax`` stays cheap for the command line.
"""

from importlib import import_module

from .version import __version__ as __version__

_EXPORTS = {
    # reading data
    "load_dataset": "data.registry", "register_dataset": "data.registry", "DatasetSpec": "data.registry",
    "DatasetRecords": "data.records", "ImageSet": "data.records", "DatasetError": "data.records",
    "ClassBalancedBatchSampler": "data.sampler",
    # preparing data
    "prepare_dataset": "prepare", "check_prepared": "prepare",
    # model and loss
    "create_embedder": "model", "register_backbone": "model", "Embedder": "model",
    "NormSoftmaxLoss": "loss",
    # training
    "train_embedder": "training", "load_embedder": "checkpoint", "load_checkpoint": "checkpoint",
    # embeddings and evaluation
    "embed_images": "embedding", "save_embeddings_npz": "embedding", "load_embeddings_npz": "embedding",
    "evaluate_embeddings": "evaluation", "evaluate_checkpoint": "evaluation",
    # decisions
    "calibrate_thresholds": "calibration", "calibrate_checkpoint": "calibration", "find_duplicates": "search",
    # the demo
    "run_demo": "demo",
    # configs
    "TrainConfig": "config", "EvaluateConfig": "config", "DemoConfig": "config", "PrepareConfig": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'normsoftmax' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
