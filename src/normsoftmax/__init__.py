"""normsoftmax: image embeddings by classification (Zhai & Wu, "Classification is a Strong Baseline for Deep
Metric Learning", BMVC 2019), from dataset archive to evaluation.

The public API; the ``normsoftmax`` command line calls exactly these. Names load on first use, so
``import normsoftmax`` stays cheap for the command line.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "NormSoftmaxLoss": "loss",
    "ClassBalancedBatchSampler": "data.sampler",
    "create_embedder": "model", "Embedder": "model", "register_backbone": "model",
    "evaluate_embeddings": "evaluate",
    "load_dataset": "data.benchmarks",
    "DatasetRecords": "data.records", "ImageSet": "data.records", "DatasetError": "data.records",
    "TrainConfig": "config", "EvaluateConfig": "config", "DemoConfig": "config",
    "train": "training",
    "run_evaluation": "evaluate_command",
    "run_demo": "demo",
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
