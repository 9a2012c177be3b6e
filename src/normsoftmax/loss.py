"""Normalized softmax: cross-entropy over cosine similarities to class proxies, divided by a temperature.

One L2-normalised proxy per training class, no bias, temperature 0.05, proxies
initialised uniform(-1/sqrt(dim), 1/sqrt(dim)) as in Zhai & Wu (2019).

Class subsampling (``class_sample_fraction``, the paper's 1%-10% on SOP): each
step scores the batch's own classes plus a random fraction of the other
classes, so the softmax over 11k proxies costs a few hundred columns.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormSoftmaxLoss(nn.Module):
    def __init__(self, num_classes: int, dim: int, temperature: float = 0.05,
                 class_sample_fraction: float | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if class_sample_fraction is not None and not 0 < class_sample_fraction <= 1:
            raise ValueError(f"class_sample_fraction must be in (0, 1], got {class_sample_fraction}")
        self.num_classes = num_classes
        self.dim = dim
        self.temperature = temperature
        self.class_sample_fraction = class_sample_fraction
        bound = 1.0 / math.sqrt(dim)
        self.proxies = nn.Parameter(torch.empty(num_classes, dim).uniform_(-bound, bound))

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Cosine similarity to every proxy over the temperature, (N, num_classes)."""
        return F.normalize(embeddings.float(), dim=1) @ F.normalize(self.proxies.float(), dim=1).t() / self.temperature

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.class_sample_fraction is None or not self.training:
            return F.cross_entropy(self.logits(embeddings), labels)
        classes, targets = self.sample_classes(labels)
        proxies = F.normalize(self.proxies[classes].float(), dim=1)
        logits = F.normalize(embeddings.float(), dim=1) @ proxies.t() / self.temperature
        return F.cross_entropy(logits, targets)

    def sample_classes(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The scored classes (the batch's own first, then a random fraction of the rest) and remapped targets."""
        present = torch.unique(labels)
        fraction = self.class_sample_fraction or 0.0
        num_extra = int(round(fraction * (self.num_classes - len(present))))
        others = torch.ones(self.num_classes, dtype=torch.bool, device=labels.device)
        others[present] = False
        candidates = others.nonzero().squeeze(1)
        extra = candidates[torch.randperm(len(candidates), device=labels.device)[:num_extra]]
        classes = torch.cat([present, extra])
        targets = torch.searchsorted(present, labels)
        return classes, targets
