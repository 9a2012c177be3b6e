"""Fixtures of the search tests: embeddings files made here, and faiss on one thread (two shared cores)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from normsoftmax.embedding.files import write_embeddings

DIGEST = "ab" * 32
OTHER_DIGEST = "cd" * 32


@pytest.fixture(autouse=True)
def one_faiss_thread():
    # Several OpenMP threads on two cores that other processes also use spin instead of working.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


def clustered(count: int, dim: int, classes: int, seed: int = 0, spread: float = 0.6):
    """(vectors, labels): class centres on the unit sphere plus per-item noise, like a trained model's."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = rng.integers(0, classes, size=count)
    vectors = centres[labels] / np.sqrt(dim) + spread * rng.normal(size=(count, dim)) / np.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), labels.astype(np.int64)


@pytest.fixture
def embeddings_file(tmp_path):
    """``make(name, vectors, labels=None, digest=DIGEST, label_names=None, paths=None)`` -> the path of an
    embeddings file as ``normsoftmax embed`` writes it."""

    def make(name, vectors, labels=None, digest=DIGEST, label_names=None, paths=None):
        file = tmp_path / name
        paths = paths if paths is not None else [f"/images/{name}/{i:05d}.jpg" for i in range(len(vectors))]
        metadata = {"model": {"checkpoint": "/runs/model/checkpoints/epoch_001.pt", "digest": digest,
                              "model_name": "resnet18", "dim": int(np.shape(vectors)[1]), "resize": 36, "crop": 32},
                    "source": {"kind": "folder"}, "label_names": label_names}
        write_embeddings(file, vectors, paths, labels, metadata)
        return file

    make.digest, make.other_digest = DIGEST, OTHER_DIGEST
    return make


@pytest.fixture
def clustered_vectors():
    """:func:`clustered`, for tests."""
    return clustered
