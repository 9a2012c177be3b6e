"""The common form every dataset reader produces.

A reader turns a dataset's own metadata into :class:`DatasetRecords`: absolute
image paths, integer labels remapped to ``0..C-1`` per split, and the class
names behind those labels. Everything downstream (sampler, loaders, evaluation,
preparation checks) only ever sees this form.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


class DatasetError(ValueError):
    """Bad dataset input: the message names the file (and line) at fault."""


@dataclass
class ImageSet:
    """Images of one split: ``labels[i]`` indexes ``class_names``."""

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @classmethod
    def from_raw(cls, paths: Sequence[str], raw_labels: Sequence, names: dict | None = None) -> ImageSet:
        """Remap arbitrary labels (ints or strings) to ``0..C-1`` in sorted order of the raw label."""
        return remap_shared([(paths, raw_labels)], names)[0]


def remap_shared(sets: Iterable[tuple[Sequence[str], Sequence]], names: dict | None = None) -> list[ImageSet]:
    """Remap several splits into ONE label space (In-Shop query and gallery; CSV query/gallery)."""
    listed = [(list(p), list(lab)) for p, lab in sets]
    ordered = sorted({value for _, labels in listed for value in labels}, key=_sort_key)
    index = {value: i for i, value in enumerate(ordered)}
    class_names = [str(names[value]) if names and value in names else str(value) for value in ordered]
    return [ImageSet(paths, np.array([index[v] for v in labels], dtype=np.int64), class_names)
            for paths, labels in listed]


def _sort_key(value):
    # Integer labels sort numerically, strings lexically; mixing both never happens within one reader.
    return (0, value, "") if isinstance(value, (int, np.integer)) else (1, 0, str(value))


@dataclass
class DatasetRecords:
    """A dataset in the common form.

    Evaluation is leave-one-out over ``test`` (CUB, Cars, SOP, folder/CSV) or
    ``query`` against ``gallery`` (In-Shop, CSV with query/gallery splits);
    exactly one of the two is set.
    """

    name: str
    root: str
    train: ImageSet
    test: ImageSet | None = None
    query: ImageSet | None = None
    gallery: ImageSet | None = None
    notes: list[str] = field(default_factory=list)
    decode: str = "robust"  # how images become pixels: "robust" or "reference" (see data.images.DECODERS)

    def __post_init__(self) -> None:
        if (self.test is None) == (self.query is None or self.gallery is None):
            raise ValueError("a dataset needs either a test split or both query and gallery splits")

    @property
    def query_gallery(self) -> bool:
        return self.test is None

    def split(self, name: str) -> ImageSet:
        """The split called ``name`` (train, test, query or gallery); an error naming the ones there are."""
        found = self.splits().get(name)
        if found is None:
            raise DatasetError(f"{self.name} has no {name} split; it has {', '.join(self.splits())}")
        return found

    def splits(self) -> dict[str, ImageSet]:
        named = {"train": self.train, "test": self.test, "query": self.query, "gallery": self.gallery}
        return {name: split for name, split in named.items() if split is not None}

    def all_paths(self) -> list[str]:
        return [path for split in self.splits().values() for path in split.paths]

    def counts(self) -> dict[str, dict[str, int]]:
        """Images and classes per split, the numbers compared against the reference counts."""
        return {name: {"images": len(split), "classes": int(len(np.unique(split.labels)))}
                for name, split in self.splits().items()}

    def check_trainable(self, source: str) -> None:
        """Refuse label sets that cannot train or evaluate, naming where they came from."""
        if self.train.num_classes < 2:
            raise DatasetError(f"{source}: the training split has {self.train.num_classes} class(es); at least 2 are "
                               "needed")
        evaluated = self.test if self.test is not None else self.query
        if evaluated is not None and len(evaluated) == 0:
            raise DatasetError(f"{source}: the evaluation split is empty")
