"""What both demos share: the cut-offs they report, the table they print, and the from-scratch glyph recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import DemoConfig, TrainConfig

DEMO_KS = [1, 2, 4, 8]


def demo_train_config(config: DemoConfig, dataset_root: Path, run_dir: Path) -> TrainConfig:
    crop = config.image_size - config.image_size // 8
    classes_per_batch = min(20, config.num_classes // 2)  # 20 classes x 4 images, fewer for a small demo
    values: dict[str, Any] = dict(
        dataset="folder", dataset_root=str(dataset_root), run_dir=str(run_dir), model_name="resnet18", weights="none",
        dim=512, optimizer="adamw", lr=1e-3, weight_decay=5e-4, scheduler="cosine", pretrain_epochs=0,
        epochs_per_step=config.epochs, num_steps=1, test_every_n_epochs=config.epochs, class_balancing=True,
        batch_size=4 * classes_per_batch, images_per_class=4, resize=config.image_size, crop=crop, hflip=False,
        amp="auto", channels_last=True, seed=config.seed, device=config.device, workers=config.workers, ks=DEMO_KS,
        nmi=True, progress=config.progress, keep_checkpoints=1)
    values.update(config.train_overrides)
    return TrainConfig(**values)


def results_table(results: dict) -> str:
    width = max(14, *(len(name) + 1 for name in results))
    header = (f"{'embedding':<{width}}" + "".join(f"{'R@' + str(k):>8}" for k in DEMO_KS) + f"{'MAP@R':>8}"
              + "   | binary " + "".join(f"{'R@' + str(k):>8}" for k in DEMO_KS))
    rows = [header, "-" * len(header)]
    for name, result in results.items():
        row = (f"{name:<{width}}" + "".join(f"{result['float'][f'recall@{k}']:8.2f}" for k in DEMO_KS)
               + f"{result['float']['map@r']:8.2f}")
        row += "   |        " + "".join(f"{result['binary'][f'recall@{k}']:8.2f}" for k in DEMO_KS)
        rows.append(row)
    return "\n".join(rows)
