"""The paper's schedule: which parameters train when, with which optimizer and learning rate.

Warm-up (``pretrain_epochs``): only the new parameters -- the head's projection and the proxies -- train,
at ``lr * lr_mult``, the backbone frozen. Main phase: all parameters, SGD (momentum 0.9, weight decay 1e-4),
``lr`` multiplied by ``gamma`` every ``epochs_per_step`` epochs (or a cosine decay, for from-scratch runs).
"""

from __future__ import annotations

import math

import torch

from ..config import TrainConfig


def phase_of(config: TrainConfig, epoch: int) -> str:
    """``"warmup"`` or ``"main"`` for 0-based ``epoch``."""
    return "warmup" if epoch < config.pretrain_epochs else "main"


def main_phase_epoch(config: TrainConfig, epoch_number: int) -> int | None:
    """The reference script's numbering of a 1-based epoch: main-phase epochs count 1..N, warm-up apart (None)."""
    return epoch_number - config.pretrain_epochs if epoch_number > config.pretrain_epochs else None


def learning_rate(config: TrainConfig, epoch: int, fraction: float = 0.0) -> float:
    """The learning rate at ``epoch`` (0-based, warm-up epochs first) and ``fraction`` of the way through it."""
    if epoch < config.pretrain_epochs:
        return config.lr * config.lr_mult
    main_epoch = epoch - config.pretrain_epochs
    if config.scheduler == "cosine":
        total = config.epochs_per_step * config.num_steps
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * (main_epoch + fraction) / total))
    return config.lr * config.gamma ** (main_epoch // config.epochs_per_step)


def trainable_parameters(phase: str, model, criterion, step_module) -> list[torch.nn.Parameter]:
    """Freeze or unfreeze the backbone for ``phase``; the parameters the phase's optimizer updates."""
    for parameter in model.backbone.parameters():
        parameter.requires_grad_(phase == "main")
    if phase == "warmup":
        return model.new_parameters() + list(criterion.parameters())
    return list(step_module.parameters())


def make_optimizer(config: TrainConfig, parameters: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(parameters, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def should_evaluate(config: TrainConfig, epoch: int) -> bool:
    """After each warm-up epoch, every ``test_every_n_epochs`` main epochs, and after the last (0-based)."""
    if epoch + 1 == config.total_epochs or epoch < config.pretrain_epochs:
        return True
    return (epoch + 1 - config.pretrain_epochs) % config.test_every_n_epochs == 0
