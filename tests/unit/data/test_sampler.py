import numpy as np
import pytest

from normsoftmax import ClassBalancedBatchSampler


def labels_with_uneven_classes():
    rng = np.random.default_rng(0)
    return np.repeat(np.arange(30), rng.integers(1, 12, size=30))


def test_batches_hold_distinct_classes_with_fixed_images_each():
    labels = labels_with_uneven_classes()
    sampler = ClassBalancedBatchSampler(labels, batch_size=20, images_per_class=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == len(labels) // 20
    for batch in batches:
        assert len(batch) == 20
        groups = [labels[batch[i:i + 4]] for i in range(0, 20, 4)]
        assert all(len(set(g)) == 1 for g in groups)  # each block of 4 is one class
        assert len({g[0] for g in groups}) == 5  # classes drawn without replacement


def test_batch_size_not_a_multiple_uses_whole_classes():
    labels = labels_with_uneven_classes()
    sampler = ClassBalancedBatchSampler(labels, batch_size=75, images_per_class=25, seed=0)
    assert sampler.classes_per_batch == 3
    assert all(len(batch) == 75 for batch in sampler)


def test_deterministic_per_seed_and_epoch():
    labels = labels_with_uneven_classes()
    first = ClassBalancedBatchSampler(labels, 20, 4, seed=7)
    second = ClassBalancedBatchSampler(labels, 20, 4, seed=7)
    assert list(first) == list(second)
    epoch0 = list(first)
    first.set_epoch(1)
    assert list(first) != epoch0
    other_seed = ClassBalancedBatchSampler(labels, 20, 4, seed=8)
    assert list(other_seed) != epoch0


def test_images_drawn_with_replacement_for_small_classes():
    labels = np.array([0] * 1 + [1] * 1 + [2] * 30)
    sampler = ClassBalancedBatchSampler(labels, batch_size=15, images_per_class=5, seed=0)
    batch = next(iter(sampler))
    assert sorted(set(labels[batch])) == [0, 1, 2]
    assert batch.count(0) == 5 and batch.count(1) == 5


def test_ranks_split_the_same_global_batch():
    labels = labels_with_uneven_classes()
    whole = list(ClassBalancedBatchSampler(labels, 24, 4, seed=3))
    shards = [list(ClassBalancedBatchSampler(labels, 24, 4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    for b, batch in enumerate(whole):
        assert shards[0][b] + shards[1][b] == batch
        assert not set(labels[shards[0][b]]) & set(labels[shards[1][b]])


def test_refuses_impossible_settings():
    labels = np.repeat(np.arange(3), 10)
    with pytest.raises(ValueError, match="larger than batch_size"):
        ClassBalancedBatchSampler(labels, batch_size=4, images_per_class=5)
    with pytest.raises(ValueError, match="needs 5 distinct classes"):
        ClassBalancedBatchSampler(labels, batch_size=10, images_per_class=2)
    with pytest.raises(ValueError, match="shared evenly"):
        ClassBalancedBatchSampler(labels, batch_size=6, images_per_class=2, num_replicas=2)
