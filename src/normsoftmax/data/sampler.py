"""Class-balanced batches, as in the paper's recipe.

Each batch draws ``batch_size // images_per_class`` classes without
replacement, then ``images_per_class`` images of each drawn class with
replacement (classes with fewer images than that still fill their share); an
epoch is ``len(labels) // batch_size`` batches.

The sampler is a pure function of (seed, epoch): ``set_epoch`` re-seeds it, so
a resumed run replays exactly the batches it would have seen, and every rank
of a distributed run draws the same global batch and keeps its own slice
(``num_replicas``/``rank``), class groups kept together.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class ClassBalancedBatchSampler:
    def __init__(self, labels: Sequence[int] | np.ndarray, batch_size: int, images_per_class: int, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0):
        label_array = np.asarray(labels)
        if batch_size < 1 or images_per_class < 1:
            raise ValueError(f"batch_size ({batch_size}) and images_per_class ({images_per_class}) must be positive")
        if images_per_class > batch_size:
            raise ValueError(f"images_per_class ({images_per_class}) is larger than batch_size ({batch_size}): "
                             f"a batch could not hold even one class")
        self.classes_per_batch = batch_size // images_per_class
        classes, inverse = np.unique(label_array, return_inverse=True)
        if len(classes) < self.classes_per_batch:
            raise ValueError(f"a batch of {batch_size} with {images_per_class} images per class needs "
                             f"{self.classes_per_batch} distinct classes, but the labels hold only {len(classes)}; "
                             f"lower batch_size or raise images_per_class")
        if len(labels) < batch_size:
            raise ValueError(f"{len(labels)} images are fewer than one batch of {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside 0..{num_replicas - 1}")
        if self.classes_per_batch % num_replicas:
            raise ValueError(f"{self.classes_per_batch} classes per batch cannot be shared evenly by {num_replicas} "
                             "ranks")
        self.labels = label_array
        self.batch_size = batch_size
        self.images_per_class = images_per_class
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(np.bincount(inverse))
        self.indices_by_class = np.split(order, bounds[:-1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        generator = np.random.default_rng([self.seed, self.epoch])
        share = self.classes_per_batch // self.num_replicas
        for _ in range(len(self)):
            drawn = generator.choice(len(self.indices_by_class), self.classes_per_batch, replace=False)
            images = [generator.choice(self.indices_by_class[c], self.images_per_class, replace=True) for c in drawn]
            mine = images[self.rank * share:(self.rank + 1) * share]
            yield np.concatenate(mine).tolist()


def sample_seed(seed: int, epoch: int, batch: int, position: int) -> int:
    """The augmentation seed of one image of one batch: the same wherever and whenever it is loaded."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + batch) * 65_536 + position


class SeededBatches:
    """An epoch's batches of a deterministic batch sampler, each index paired with its augmentation seed.

    Seeds depend on (seed, epoch, batch number, position in the global batch) only, so the random crops
    and flips of an image do not depend on the number of loader workers, on which rank loads it, or on
    whether the epoch was resumed in the middle: ``start`` skips the batches a checkpoint already covered.
    ``offset`` is this rank's first position in the global batch.
    """

    def __init__(self, batches, seed: int, epoch: int = 0, start: int = 0, offset: int = 0):
        self.batches = batches
        self.seed = seed
        self.epoch = epoch
        self.start = start
        self.offset = offset

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.start)

    def __iter__(self):
        for number, batch in enumerate(self.batches):
            if number < self.start:
                continue
            yield [(int(index), sample_seed(self.seed, self.epoch, number, self.offset + position))
                   for position, index in enumerate(batch)]
