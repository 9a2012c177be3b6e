"""What an index's ids mean: each item's image path, label and metadata.

:class:`Items` is the table of one committed generation, in id order (ids only grow, so the table stays sorted;
removed ids leave gaps). Paths and metadata are kept as UTF-8 bytes back to back with offsets, not as Python
strings or fixed-width numpy strings: a million paths of ~100 characters take ~100 MB, not 400 MB or more. File
names that are not valid UTF-8 survive (``surrogateescape``, as the OS gave them). :class:`ItemRecord` is one item
added since: the journal's unit, kept beside the table until the next generation folds it in.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_output


@dataclass
class ItemRecord:
    """One item: its id, image path, label name (or None), metadata (a JSON object, or None) and L2-normalised
    float32 vector."""

    id: int
    path: str
    label: str | None = None
    metadata: dict | None = None
    vector: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def describe(self) -> dict:
        entry: dict = {"id": self.id, "path": self.path}
        if self.label is not None:
            entry["label"] = self.label
        if self.metadata:
            entry["metadata"] = self.metadata
        return entry


def _packed(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [text.encode("utf-8", "surrogateescape") for text in texts]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


@dataclass
class Items:
    """The items of one generation, sorted by id."""

    ids: np.ndarray  # int64, ascending
    path_bytes: np.ndarray  # uint8
    offsets: np.ndarray  # int64, len(ids) + 1: path i is path_bytes[offsets[i]:offsets[i + 1]]
    labels: np.ndarray  # int64, -1: none
    label_names: list[str]
    meta_bytes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))
    meta_offsets: np.ndarray | None = None  # as offsets; an empty slice: no metadata

    @classmethod
    def empty(cls) -> Items:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(1, np.int64), np.zeros(0, np.int64), [])

    @classmethod
    def of(cls, records: list[ItemRecord]) -> Items:
        records = sorted(records, key=lambda record: record.id)
        names = sorted({r.label for r in records if r.label is not None})
        lookup = {name: i for i, name in enumerate(names)}
        path_bytes, offsets = _packed([r.path for r in records])
        meta_bytes, meta_offsets = _packed([json.dumps(r.metadata, sort_keys=True) if r.metadata else ""
                                            for r in records])
        return cls(np.array([r.id for r in records], dtype=np.int64), path_bytes, offsets,
                   np.array([lookup[r.label] if r.label is not None else -1 for r in records], dtype=np.int64),
                   names, meta_bytes, meta_offsets)

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, item_id: int) -> int | None:
        """Where ``item_id`` is in the table, or None."""
        position = int(np.searchsorted(self.ids, item_id))
        return position if position < len(self.ids) and self.ids[position] == item_id else None

    def record(self, row: int, vector: np.ndarray | None = None) -> ItemRecord:
        start, end = self.offsets[row], self.offsets[row + 1]
        path = self.path_bytes[start:end].tobytes().decode("utf-8", "surrogateescape")
        label = int(self.labels[row])
        metadata = None
        if self.meta_offsets is not None and self.meta_offsets[row + 1] > self.meta_offsets[row]:
            text = self.meta_bytes[self.meta_offsets[row]:self.meta_offsets[row + 1]].tobytes().decode("utf-8")
            metadata = json.loads(text)
        return ItemRecord(int(self.ids[row]), path, self.label_names[label] if label >= 0 else None, metadata,
                          vector if vector is not None else np.zeros(0, np.float32))

    def records(self) -> list[ItemRecord]:
        return [self.record(row) for row in range(len(self))]

    def merged(self, removed: set[int], added: dict[int, ItemRecord]) -> Items:
        """This table without ``removed``, followed by ``added`` (whose ids are all larger): the next
        generation's. Vectorised: a million items are merged in a fraction of a second."""
        kept = self._without(removed) if removed else self
        return kept.then(Items.of(list(added.values()))) if added else kept

    def _meta(self) -> np.ndarray:
        return self.meta_offsets if self.meta_offsets is not None else np.zeros(len(self) + 1, np.int64)

    def _without(self, removed: set[int]) -> Items:
        keep = ~np.isin(self.ids, np.fromiter(removed, dtype=np.int64, count=len(removed)))
        path_bytes, offsets = _select(self.path_bytes, self.offsets, keep)
        meta_bytes, meta_offsets = _select(self.meta_bytes, self._meta(), keep)
        return Items(self.ids[keep], path_bytes, offsets, self.labels[keep], self.label_names, meta_bytes, meta_offsets)

    def then(self, other: Items) -> Items:
        """These items followed by ``other``'s (whose ids are all larger), label names merged by name."""
        names = list(self.label_names)
        lookup = {name: i for i, name in enumerate(names)}
        for name in other.label_names:
            if name not in lookup:
                lookup[name] = len(names)
                names.append(name)
        mapping = np.array([lookup[name] for name in other.label_names] + [-1], dtype=np.int64)
        labels = np.concatenate([self.labels, mapping[other.labels]])  # -1 indexes the appended -1
        return Items(np.concatenate([self.ids, other.ids]), np.concatenate([self.path_bytes, other.path_bytes]),
                     np.concatenate([self.offsets, self.offsets[-1] + other.offsets[1:]]), labels, names,
                     np.concatenate([self.meta_bytes, other.meta_bytes]),
                     np.concatenate([self._meta(), self._meta()[-1] + other._meta()[1:]]))

    def write(self, file: Path) -> None:
        offsets = self.meta_offsets if self.meta_offsets is not None else np.zeros(len(self) + 1, np.int64)
        with atomic_output(file, durable=True) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, ids=self.ids, path_bytes=self.path_bytes, offsets=self.offsets, labels=self.labels,
                     label_names=np.asarray(self.label_names, dtype=str).reshape(-1), meta_bytes=self.meta_bytes,
                     meta_offsets=offsets)

    @classmethod
    def read(cls, file: Path, count: int) -> Items:
        try:
            with np.load(file, allow_pickle=False) as data:
                ids = data["ids"].astype(np.int64) if "ids" in data else np.arange(count, dtype=np.int64)
                items = cls(ids, data["path_bytes"], data["offsets"].astype(np.int64), data["labels"].astype(np.int64),
                            [str(n) for n in data["label_names"]],
                            data["meta_bytes"] if "meta_bytes" in data else np.zeros(0, np.uint8),
                            data["meta_offsets"].astype(np.int64) if "meta_offsets" in data else None)
        except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:
            raise ValueError(f"{file}: cannot be read as the index's items ({error})") from None
        consistent = (items.offsets.shape == (count + 1,) and items.labels.shape == (count,)
                      and items.ids.shape == (count,) and bool(np.all(np.diff(items.ids) > 0))
                      and items.offsets[0] == 0 and items.offsets[-1] == len(items.path_bytes)
                      and bool(np.all(np.diff(items.offsets) >= 0)))
        if not consistent:
            raise ValueError(f"{file}: does not hold the paths of {count} items; the index folder is damaged")
        return items


def _select(data: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments of ``data`` (split at ``offsets``) where ``keep`` is true, and their new offsets."""
    lengths = np.diff(offsets)
    owner = np.repeat(np.arange(len(lengths)), lengths)
    kept_lengths = lengths[keep]
    return data[keep[owner]] if len(data) else data, np.concatenate([[0], np.cumsum(kept_lengths)]).astype(np.int64)


__all__ = ["Items", "ItemRecord"]
