"""A run directory's files besides checkpoints: its location, evaluations, metrics and TensorBoard scalars.

```
config.json                 the full resolved config, written first
train.log                   everything logged
checkpoints/epoch_NNN.pt    see checkpoint.py
eval/epoch_NNN.json         the evaluation object
eval/epoch_NNN.eval         the reference's lines: "Raw Features: R@1, R@2, R@4, R@8: 65.36 & ..."
metrics.jsonl               one line per evaluation
tensorboard/                loss, lr, images/s and every metric
final_metrics.json          the last evaluation
```

Epochs count from 1 and include the warm-up: with one warm-up epoch, ``epoch_002`` is the reference
script's main-phase epoch 1 (``metrics.jsonl`` and the log give both numbers).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import TrainConfig
from ..evaluation import recall_report
from ..files import atomic_write


def run_base_dir(config: TrainConfig) -> Path:
    """``--run_dir``, or the reference layout output/<dataset>/<dim>/<model>_<batch>."""
    if config.run_dir:
        return Path(config.run_dir)
    return Path(config.output) / config.dataset / str(config.dim) / f"{config.model_name}_{config.batch_size}"


def finished(run_dir: Path) -> bool:
    """A run that reached its last evaluation (it wrote final_metrics.json)."""
    return (Path(run_dir) / "final_metrics.json").exists()


def choose_run_dir(config: TrainConfig) -> Path:
    """The run's base folder, or a new sibling (``-2``, ``-3``, ...) when it already holds a run."""
    base = run_base_dir(config)
    candidate, suffix = base, 1
    while (candidate / "config.json").exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    return candidate


def evaluation_path(run_dir: Path, epoch_number: int) -> Path:
    return Path(run_dir) / "eval" / f"epoch_{epoch_number:03d}.json"


def write_evaluation(run_dir: Path, epoch_number: int, result: dict, main_epoch: int | None, writer=None) -> list[str]:
    """eval/epoch_NNN.json (the evaluation object), eval/epoch_NNN.eval (the reference's lines), metrics.jsonl."""
    text = recall_report(result)
    atomic_write(evaluation_path(run_dir, epoch_number), json.dumps(result, indent=2) + "\n", durable=True)
    atomic_write(evaluation_path(run_dir, epoch_number).with_suffix(".eval"), "\n".join(text) + "\n")
    with open(Path(run_dir) / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"epoch": epoch_number, "main_epoch": main_epoch, **result}) + "\n")
    if writer is not None:
        for kind in ("float", "binary"):
            for name, value in result.get(kind, {}).items():
                if value is not None:
                    writer.add_scalar(f"eval/{kind}/{name}", value, epoch_number)
        writer.flush()
    return text


def write_final_metrics(run_dir: Path, result: dict) -> None:
    atomic_write(Path(run_dir) / "final_metrics.json", json.dumps(result, indent=2) + "\n", durable=True)
