"""Backbones by name, and the embedding head of the paper.

Embedder = backbone conv features -> global average pool -> LayerNorm without
affine parameters -> bias-free Linear to ``dim`` (only when ``dim`` differs
from the backbone width) -> L2 normalisation.

Backbones come from one registry (``register_backbone``); names not in it are
tried as timm model names when timm is installed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger(__name__)

BackboneFactory = Callable[[bool], tuple[nn.Module, int]]
_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str):
    """Decorator: ``factory(pretrained: bool) -> (module mapping images to NxCxHxW features, C)``."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


class ResNetTrunk(nn.Module):
    """A torchvision ResNet without its pooling and classifier.

    The submodules keep torchvision's names, so torchvision ResNet state dicts load as they are
    (their ``fc.*`` keys are reported as unexpected and ignored).
    """

    def __init__(self, resnet: Any):
        super().__init__()
        self.conv1: nn.Module = resnet.conv1
        self.bn1: nn.Module = resnet.bn1
        self.relu: nn.Module = resnet.relu
        self.maxpool: nn.Module = resnet.maxpool
        self.layer1: nn.Module = resnet.layer1
        self.layer2: nn.Module = resnet.layer2
        self.layer3: nn.Module = resnet.layer3
        self.layer4: nn.Module = resnet.layer4

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _torchvision_resnet(name: str, weights_enum: str) -> BackboneFactory:
    def factory(pretrained: bool) -> tuple[nn.Module, int]:
        import torchvision.models as models

        # IMAGENET1K_V1: the weights the paper's code used (torchvision's original release).
        weights = getattr(models, weights_enum).IMAGENET1K_V1 if pretrained else None
        resnet = getattr(models, name)(weights=weights)
        return ResNetTrunk(resnet), resnet.fc.in_features

    return factory


for _name, _enum in [("resnet18", "ResNet18_Weights"), ("resnet34", "ResNet34_Weights"),
                     ("resnet50", "ResNet50_Weights"), ("resnet101", "ResNet101_Weights")]:
    register_backbone(_name)(_torchvision_resnet(_name, _enum))


class TimmTrunk(nn.Module):
    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if features.dim() == 3:  # vision transformers: tokens (N, L, C) -> a (N, C, L, 1) map for the pool
            features = features.transpose(1, 2).unsqueeze(-1)
        return features


def create_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    if name in _REGISTRY:
        return _REGISTRY[name](pretrained)
    try:
        import timm
    except ImportError:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(available_backbones())} "
                         f"(install the 'timm' extra for timm model names)") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: neither registered ({', '.join(available_backbones())}) nor a "
                         "timm model")
    model: Any = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
    return TimmTrunk(model), int(model.num_features)


class EmbeddingHead(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.standardize = nn.LayerNorm(width, elementwise_affine=False)
        self.projection = nn.Linear(width, dim, bias=False) if dim != width else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.standardize(self.pool(features).flatten(1))
        if self.projection is not None:
            x = self.projection(x)
        return F.normalize(x.float(), dim=1)


class Embedder(nn.Module):
    """Images (N, 3, H, W) -> L2-normalised embeddings (N, dim)."""

    def __init__(self, backbone: nn.Module, width: int, dim: int, backbone_name: str = ""):
        super().__init__()
        self.backbone = backbone
        self.head = EmbeddingHead(width, dim)
        self.width = width
        self.dim = dim
        self.backbone_name = backbone_name
        # Set by normsoftmax.checkpoint.load_embedder: the run it came from, its file, its weights' digest.
        self.train_config: TrainConfig | None = None
        self.checkpoint: str | None = None
        self.digest: str | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not part of the (pretrained) backbone: trained alone in the warm-up epochs."""
        return list(self.head.parameters())


def create_embedder(backbone: str = "resnet50", dim: int = 2048, weights: str = "imagenet") -> Embedder:
    """The paper's embedder. ``weights``: ``imagenet`` (torchvision's published weights), ``none``, or a path.

    A path may hold a backbone state dict (e.g. a torchvision ResNet's) or a normsoftmax checkpoint;
    missing and unexpected keys are logged.
    """
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ValueError(f"weights must be 'imagenet', 'none' or an existing file; {weights!r} is none of these")
    trunk, width = create_backbone(backbone, pretrained=weights == "imagenet")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    model = Embedder(trunk, width, dim, backbone_name=backbone)
    if weights not in ("imagenet", "none"):
        load_weights(model, weights)
    return model


def load_weights(model: Embedder, path: str) -> tuple[list[str], list[str]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a state dict ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a normsoftmax checkpoint
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
    target = model if any(key.startswith(("backbone.", "head.")) for key in state) else model.backbone
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shapes that do not fit, e.g. another architecture's weights
        raise ValueError(f"{path}: does not fit {model.backbone_name or 'this model'}: {error}") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        logger.warning("%s: %d missing keys (left at their initial values): %s", path, len(missing),
                       ", ".join(missing[:10]))
    if unexpected:
        logger.warning("%s: %d unexpected keys (ignored): %s", path, len(unexpected), ", ".join(unexpected[:10]))
    if not missing and not unexpected:
        logger.info("%s: all keys loaded", path)
    return missing, unexpected
