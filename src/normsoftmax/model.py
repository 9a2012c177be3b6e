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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .weights import LoadReport, load_into, read_state_dict

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger(__name__)

BackboneFactory = Callable[[bool], tuple[nn.Module, int]]
# The share of the resized square a crop keeps (224 of 256): the paper's geometry, and timm's default crop_pct.
CROP_FRACTION = 0.875


@dataclass(frozen=True)
class Preprocessing:
    """What a backbone's pretrained weights expect of their input: the normalisation and the side of the
    square it was trained on. torchvision's ImageNet models: ImageNet's mean/std at 224; timm models: their
    ``pretrained_cfg`` (EfficientNet-Lite: mean = std = 0.5; ViT-384: 0.5 and 384)."""

    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_size: int = 224

    @staticmethod
    def resize_for(crop: int) -> int:
        """The square a crop is taken from: the crop keeps 0.875 of it (224 of 256, the paper's geometry)."""
        return max(crop, int(round(crop / CROP_FRACTION)))


@dataclass(frozen=True)
class _Registered:
    factory: BackboneFactory
    preprocessing: Preprocessing
    weights_url: str | None = None  # where ``--weights imagenet`` comes from, for the offline message


_REGISTRY: dict[str, _Registered] = {}


def register_backbone(name: str, preprocessing: Preprocessing | None = None, weights_url: str | None = None):
    """Decorator: ``factory(pretrained: bool) -> (module mapping images to NxCxHxW features, C)``; its input
    normalisation (default: ImageNet's, 224 pixels) goes with it."""

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        _REGISTRY[name] = _Registered(factory, preprocessing or Preprocessing(), weights_url)
        return factory

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_preprocessing(name: str) -> Preprocessing:
    """The input a backbone's pretrained weights expect: registered names carry it, timm names read their
    pretrained config."""
    if name in _REGISTRY:
        return _REGISTRY[name].preprocessing
    cfg = _timm_pretrained_cfg(name)
    if cfg is None:
        return Preprocessing()
    size = cfg.input_size[-1] if cfg.input_size else 224
    return Preprocessing(mean=tuple(float(v) for v in cfg.mean), std=tuple(float(v) for v in cfg.std),
                         input_size=int(size))


def _timm_pretrained_cfg(name: str) -> Any:
    _timm(name)  # a clear error for a name timm does not know
    from timm.models import get_pretrained_cfg

    return get_pretrained_cfg(name)


def _timm(name: str) -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError(f"unknown backbone {name!r}; registered: {', '.join(available_backbones())} "
                         f"(install the 'timm' extra for timm model names)") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: neither registered ({', '.join(available_backbones())}) nor a "
                         "timm model")
    return timm


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


# torchvision's IMAGENET1K_V1 files (the URLs of its weight enums, written out so that naming the file to fetch
# needs no import of torchvision's model zoo).
_TORCHVISION_RESNETS = {
    "resnet18": ("ResNet18_Weights", "https://download.pytorch.org/models/resnet18-f37072fd.pth"),
    "resnet34": ("ResNet34_Weights", "https://download.pytorch.org/models/resnet34-b627a593.pth"),
    "resnet50": ("ResNet50_Weights", "https://download.pytorch.org/models/resnet50-0676ba61.pth"),
    "resnet101": ("ResNet101_Weights", "https://download.pytorch.org/models/resnet101-63fe2227.pth"),
}
for _name, (_enum, _url) in _TORCHVISION_RESNETS.items():
    register_backbone(_name, weights_url=_url)(_torchvision_resnet(_name, _enum))


class TimmTrunk(nn.Module):
    """A timm model's feature extractor; a timm ``state_dict()`` is the state of ``self.model``."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def weights_module(self) -> nn.Module:
        return self.model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(images)
        if features.dim() == 3:  # vision transformers: tokens (N, L, C) -> a (N, C, L, 1) map for the pool
            features = features.transpose(1, 2).unsqueeze(-1)
        return features


def create_backbone(name: str, pretrained: bool) -> tuple[nn.Module, int]:
    """The backbone ``name`` (registered, or a timm model), with its ImageNet weights when ``pretrained``.

    torchvision and timm download those weights on first use into their caches (torch hub, Hugging Face);
    where that fails -- no internet -- the error names the file, where the library looks for it, and the
    ``--weights PATH`` alternative. A file already in those caches is used without any network.
    """
    registered = _REGISTRY.get(name)
    try:
        if registered is not None:
            return registered.factory(pretrained)
        timm = _timm(name)
        model: Any = timm.create_model(name, pretrained=pretrained, num_classes=0, global_pool="")
        return TimmTrunk(model), int(model.num_features)
    except OSError as error:  # urllib's URLError, huggingface_hub's LocalEntryNotFoundError, connection errors
        if not pretrained:
            raise
        raise PretrainedWeightsUnavailable(_offline_message(name, registered, error)) from None


class PretrainedWeightsUnavailable(ValueError):
    """``--weights imagenet`` could not be downloaded, and no cached copy exists."""


def _offline_message(name: str, registered: _Registered | None, error: OSError) -> str:
    reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else error}"
    if registered is not None and registered.weights_url:
        import torch.hub

        target = Path(torch.hub.get_dir()) / "checkpoints" / registered.weights_url.rsplit("/", 1)[-1]
        return (f"the ImageNet weights of {name} could not be downloaded ({reason}). Fetch "
                f"{registered.weights_url} on a machine with internet and put it at {target} (torch hub's cache: "
                f"$TORCH_HOME/hub/checkpoints, ~/.cache/torch by default), where it is used without a download; "
                f"or pass --weights PATH with any {name} state dict (torchvision's, or a checkpoint holding one)")
    if registered is not None:
        return (f"the pretrained weights of the registered backbone {name} could not be loaded ({reason}); pass "
                f"--weights PATH with its state dict")
    cfg = _timm_pretrained_cfg(name)
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub.constants import HF_HUB_CACHE

        repo = hub_id.split("@")[0]
        folder = Path(HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
        return (f"the ImageNet weights of {name} could not be downloaded from the Hugging Face hub ({reason}). Fetch "
                f"https://huggingface.co/{repo}/resolve/main/model.safetensors on a machine with internet and pass "
                f"it as --weights PATH; or copy that machine's cache of the model ({folder.name}, made by "
                f"`huggingface-cli download {repo}`) to {folder}, where timm finds it (set HF_HUB_OFFLINE=1 to skip "
                f"the network attempts)")
    url = getattr(cfg, "url", None) or "its weights file"
    return (f"the ImageNet weights of {name} could not be downloaded ({reason}). Fetch {url} and pass it as "
            f"--weights PATH")


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
        # The input the backbone expects (create_embedder sets the backbone's own).
        self.preprocessing = Preprocessing()
        # Set by normsoftmax.checkpoint.load_embedder: the run it came from, its file, its weights' digest.
        self.train_config: TrainConfig | None = None
        self.checkpoint: str | None = None
        self.digest: str | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters that are not part of the (pretrained) backbone: trained alone in the warm-up epochs."""
        return list(self.head.parameters())


def create_embedder(backbone: str = "resnet50", dim: int = 2048, weights: str = "imagenet",
                    weights_partial: bool = False) -> Embedder:
    """The paper's embedder. ``weights``: ``imagenet`` (the backbone's published ImageNet weights), ``none``, or
    a weights file (see :mod:`normsoftmax.weights`: a torchvision or timm state dict, under any wrapper prefix or
    checkpoint key, ``.safetensors``, or a normsoftmax checkpoint). A file must cover every backbone tensor with
    the right shape, else :class:`~normsoftmax.weights.WeightsMismatchError` -- unless ``weights_partial``.
    """
    if weights not in ("imagenet", "none") and not os.path.isfile(weights):
        raise ValueError(f"weights must be 'imagenet', 'none' or an existing file; {weights!r} is none of these")
    if dim < 1:
        raise ValueError(f"dim must be positive, got {dim}")
    trunk, width = create_backbone(backbone, pretrained=weights == "imagenet")
    model = Embedder(trunk, width, dim, backbone_name=backbone)
    model.preprocessing = backbone_preprocessing(backbone)
    if weights not in ("imagenet", "none"):
        load_weights(model, weights, partial=weights_partial)
    return model


def load_weights(model: Embedder, path: str | os.PathLike, partial: bool = False) -> LoadReport:
    """Load a weights file into ``model``'s backbone (and its head, when the file is a normsoftmax embedder
    with the same head); see :func:`create_embedder`. Logs "loaded N of M backbone tensors"."""
    state, container = read_state_dict(path)
    target = _weights_module(model.backbone)
    what = f"{model.backbone_name or 'backbone'} backbone"
    report = load_into(target, state, path=str(path), what=what, partial=partial, container=container)
    head_prefix = _head_prefix(report.prefix, target is not model.backbone)
    if head_prefix is not None:
        head = {key[len(head_prefix):]: value for key, value in state.items() if key.startswith(head_prefix)}
        own = model.head.state_dict()
        if head and set(head) == set(own) and all(head[k].shape == own[k].shape for k in own):
            model.head.load_state_dict(head)
            logger.info("%s: the embedding head (projection to dim %d) loaded too", path, model.dim)
        elif head:
            logger.info("%s: its embedding head does not fit dim %d; the head starts new", path, model.dim)
    return report


def _weights_module(backbone: nn.Module) -> nn.Module:
    """The module whose ``state_dict()`` a user's weights file holds (a timm model inside its trunk)."""
    if isinstance(backbone, TimmTrunk):
        return backbone.weights_module()
    return backbone


def _head_prefix(prefix: str, inner: bool) -> str | None:
    """Where the head's keys are when the matched prefix shows a normsoftmax embedder (``backbone.`` or
    ``backbone.model.``)."""
    marker = "backbone.model." if inner else "backbone."
    if not prefix.endswith(marker):
        return None
    return prefix[: -len(marker)] + "head."


__all__ = ["Embedder", "EmbeddingHead", "Preprocessing", "PretrainedWeightsUnavailable", "available_backbones",
           "backbone_preprocessing", "create_backbone", "create_embedder", "load_weights", "register_backbone"]
