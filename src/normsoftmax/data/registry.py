"""Datasets by name: one :class:`DatasetSpec` per dataset, registered the way backbones are.

A spec says everything the package needs to know about a dataset -- how to read it, the names the
reference script and users call it by, its Recall@K cut-offs, the published counts, the paper's
hyperparameters for it, and where its official files come from. The recipes, the ``--dataset``
and ``--recipe`` choices, ``prepare``'s sources and the count checks are all derived from the specs,
so a new dataset is added in one place: a reader and its spec. The built-in specs are registered once, by
the package (``normsoftmax/data/__init__.py``, from an explicit list); users call ``register_dataset``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .records import DatasetError, DatasetRecords


@dataclass(frozen=True)
class SourceFile:
    """One file a dataset is made of, and what is known about the official copy of it."""

    filename: str
    urls: tuple[str, ...] = ()          # official locations, tried in order
    sha256: str | None = None           # pinned digests of the official file (None: unknown)
    md5: str | None = None
    size: int | None = None
    checksum_source: str = ""           # where the pinned digests come from
    extract: bool = True                # an archive, extracted into the root; else copied to `place`
    place: str | None = None            # destination of a loose file, relative to the root


@dataclass(frozen=True)
class DatasetSpec:
    name: str                                       # short name: prepare's argument, recipe name
    title: str
    read: Callable[[str | os.PathLike], DatasetRecords]
    aliases: tuple[str, ...] = ()                   # other accepted names; the first is the reference script's
    recall_ks: tuple[int, ...] = (1, 2, 4, 8)
    reference_counts: dict | None = None            # split -> {"images": n, "classes": n}, as published
    recipe: dict | None = None                      # the paper's per-dataset hyperparameters (lr, images_per_class)
    decode: str = "robust"                          # "reference": PIL open + convert("RGB"), as the reference code
    # Obtaining it (``normsoftmax prepare``):
    homepage: str = ""
    files: tuple[SourceFile, ...] = ()
    dataset_root: str = "."                         # where the reader finds the data, relative to prepare's root
    instructions: str = ""                          # shown when there is no automatic download
    layout_markers: tuple[str, ...] = ()            # files that identify the layout in a folder
    notes: dict = field(default_factory=dict)

    @property
    def reference_name(self) -> str:
        """The reference script's ``--dataset`` value (``Cub200``), else the short name."""
        return self.aliases[0] if self.aliases else self.name

    @property
    def default_root(self) -> str | None:
        """Where ``normsoftmax prepare`` puts the dataset by default (for datasets it can prepare)."""
        return f"data/{self.name}" if self.files else None

    @property
    def preparable(self) -> bool:
        return bool(self.files)


_REGISTRY: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` under its name and aliases (case-insensitive)."""
    for key in (spec.name, *spec.aliases):
        owner = _ALIASES.get(key.lower())
        if owner is not None and owner != spec.name:
            raise ValueError(f"dataset name {key!r} is already taken by {owner}")
    _REGISTRY[spec.name] = spec
    for key in (spec.name, *spec.aliases):
        _ALIASES[key.lower()] = spec.name
    return spec


def registered_datasets() -> list[DatasetSpec]:
    return list(_REGISTRY.values())


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` or one of its aliases (any case)."""
    try:
        return _REGISTRY[_ALIASES[name.lower()]]
    except KeyError:
        known = ", ".join(spec.reference_name for spec in _REGISTRY.values())
        raise DatasetError(f"unknown dataset {name!r}; choose one of {known}") from None


def canonical_dataset_name(name: str) -> str:
    return dataset_spec(name).name


def load_dataset(name: str, root: str | os.PathLike) -> DatasetRecords:
    """Read any registered dataset by name (reference-script or short name) into the common form."""
    spec = dataset_spec(name)
    records = spec.read(root)
    records.decode = spec.decode
    records.check_trainable(str(records.root))
    records.notes.extend(compare_with_reference(spec.name, records))
    return records


def compare_with_reference(name: str, records: DatasetRecords) -> list[str]:
    """Human-readable differences between the loaded counts and the published ones (empty when equal)."""
    expected_counts = dataset_spec(name).reference_counts or {}
    differences = []
    counts = records.counts()
    for split, expected in expected_counts.items():
        found = counts.get(split, {"images": 0, "classes": 0})
        differences += [f"{name} {split}: {found[key]} {key}, the reference count is {expected[key]}"
                        for key in ("images", "classes") if found[key] != expected[key]]
    return differences


__all__ = ["DatasetSpec", "SourceFile", "register_dataset", "registered_datasets", "dataset_spec",
           "canonical_dataset_name", "load_dataset", "compare_with_reference"]
