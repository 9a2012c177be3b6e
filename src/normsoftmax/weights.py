"""Weight files as users have them, matched to a module: every tensor the module has is loaded, or the load stops.

A file may be a torchvision or timm model's ``state_dict()`` (its classifier included, which is ignored), the same
under a ``module.`` / ``model.`` / ``backbone.`` / ``encoder.`` / ``_orig_mod.`` prefix (DataParallel, wrappers,
``torch.compile``), a training checkpoint holding it under ``state_dict``, ``model``, ``module`` or an EMA key, or
a ``.safetensors`` file. The prefix is found by matching key names against the module's own, so no naming
convention has to be guessed by the user. A load that leaves any of the module's tensors at its initial values,
or finds one with another shape, raises :class:`WeightsMismatchError` naming the first few keys of each kind --
unless ``partial=True`` says that is intended -- because a run that silently trains from random weights while its
user believes it pretrained is the worst outcome.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Where checkpoints keep the weights, in the order they are tried (EMA weights only when nothing else is there).
CONTAINER_KEYS = ("state_dict", "model", "module", "net", "network", "state_dict_ema", "model_ema", "ema")
# Prefixes that wrappers add to every key; up to three of them are stripped, in any order.
WRAPPER_PREFIXES = ("module.", "model.", "backbone.", "encoder.", "_orig_mod.")
_SHOWN = 5  # keys named per kind in a message


class WeightsMismatchError(ValueError):
    """A weights file that does not cover the module it is loaded into (or covers it with other shapes)."""


@dataclass
class LoadReport:
    """What a load did: ``loaded`` of ``total`` tensors, the file's prefix and container, what was left out."""

    path: str
    loaded: int
    total: int
    prefix: str = ""
    container: str = ""
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file (a, b), module (c, d)"
    ignored: list[str] = field(default_factory=list)  # the file's tensors that are not the module's

    @property
    def complete(self) -> bool:
        return not self.missing and not self.mismatched

    def summary(self, what: str) -> str:
        where = f" (under {self.container!r})" if self.container else ""
        prefix = f"; prefix {self.prefix!r} removed" if self.prefix else ""
        ignored = (f"; ignored {len(self.ignored)} tensors that are not part of the {what}: "
                   f"{_listed(self.ignored)}") if self.ignored else ""
        return f"loaded {self.loaded} of {self.total} {what} tensors from {self.path}{where}{prefix}{ignored}"


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors a weights file holds (``.safetensors``, or anything ``torch.load`` reads without running
    code), and the container key they were found under (``""`` at the top level)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path))
        else:
            # weights_only: a weights file cannot run code when it is read.
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # every reader's failure means the same to the user: not a weights file
        raise ValueError(f"{path}: cannot be read as a state dict ({type(error).__name__}: {error})") from None
    container = []
    while isinstance(state, dict) and not _tensors_of(state):
        inner = next((key for key in CONTAINER_KEYS if isinstance(state.get(key), dict)), None)
        if inner is None:
            break
        container.append(inner)
        state = state[inner]
    tensors = _tensors_of(state) if isinstance(state, dict) else {}
    if not tensors:
        kind = type(state).__name__ if not isinstance(state, dict) else f"a dict of {', '.join(list(state)[:6])}"
        raise ValueError(f"{path}: holds no tensors by name (found {kind}); expected a state dict or a checkpoint "
                         f"with one under {', '.join(CONTAINER_KEYS)}")
    return tensors, "/".join(container)


def _tensors_of(state: dict) -> dict[str, torch.Tensor]:
    return {str(key): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def best_prefix(keys: list[str], expected: set[str]) -> str:
    """The wrapper prefix whose removal makes the most of ``keys`` names of ``expected`` (the shortest on a tie)."""
    candidates = {""}
    for depth in (1, 2, 3):
        candidates.update("".join(parts) for parts in itertools.product(WRAPPER_PREFIXES, repeat=depth))
    # A key's own leading parts are candidates too (e.g. "backbone.model."), when they are made of wrappers.
    scores = {prefix: sum(key.startswith(prefix) and key[len(prefix):] in expected for key in keys)
              for prefix in candidates}
    return max(sorted(scores, key=len), key=lambda prefix: scores[prefix])


def load_into(module: nn.Module, state: dict[str, torch.Tensor], *, path: str, what: str, partial: bool = False,
              container: str = "", prefix: str | None = None) -> LoadReport:
    """Copy ``state`` into ``module`` after removing the best-matching wrapper prefix; refuse (unless
    ``partial``) a file that leaves any of the module's tensors unloaded or holds one with another shape."""
    own = module.state_dict()
    # BatchNorm's batch counter is bookkeeping, not a weight: files often leave it out.
    required = {key for key in own if not key.endswith("num_batches_tracked")}
    if prefix is None:
        prefix = best_prefix(list(state), set(own))
    renamed = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    matched = {key: value for key, value in renamed.items() if key in own}
    mismatched = [f"{key}: file {tuple(value.shape)}, {what} {tuple(own[key].shape)}"
                  for key, value in matched.items() if value.shape != own[key].shape]
    fitting = {key: value for key, value in matched.items() if value.shape == own[key].shape}
    ignored = sorted(key for key in state if not key.startswith(prefix) or key[len(prefix):] not in own)
    report = LoadReport(path=path, loaded=len(set(fitting) & required), total=len(required), prefix=prefix,
                        container=container, missing=sorted(required - set(matched)), mismatched=mismatched,
                        ignored=ignored)
    if not set(fitting) & required:  # a scalar batch counter fits anything: it does not count
        raise WeightsMismatchError(f"{path}: none of its {len(state)} tensors fits the {what} "
                                   f"({_listed(sorted(state))} against {_listed(sorted(own))}): another architecture?")
    if not report.complete and not partial:
        raise WeightsMismatchError(_mismatch_message(report, what))
    module.load_state_dict(fitting, strict=False)
    if report.complete:
        logger.info("%s", report.summary(what))
    else:
        logger.warning("%s; --weights_partial: %s", report.summary(what), _gaps(report, what))
    return report


def _mismatch_message(report: LoadReport, what: str) -> str:
    return (f"{report.path}: does not fit the {what}: {_gaps(report, what)}. Loaded, it would leave the rest at "
            f"random initial values; if a partial load is what you want, pass --weights_partial "
            f"(weights_partial=True)")


def _gaps(report: LoadReport, what: str) -> str:
    parts = []
    if report.missing:
        parts.append(f"{len(report.missing)} of {report.total} {what} tensors are not in the file "
                     f"({_listed(report.missing)})")
    if report.mismatched:
        parts.append(f"{len(report.mismatched)} have another shape ({_listed(report.mismatched)})")
    return "; ".join(parts)


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


__all__ = ["WeightsMismatchError", "LoadReport", "read_state_dict", "load_into", "best_prefix"]
