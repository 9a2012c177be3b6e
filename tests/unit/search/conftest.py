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


@pytest.fixture(scope="session")
def search_run(tmp_path_factory):
    """A tiny trained run whose embeddings spread out (dim 64; the shared ``trained_run`` model, dim 16, maps
    all its images to nearly one point and one sign pattern), its images, and their embeddings file:
    ``(run_dir, data_root, embeddings_file)``."""
    from fixtures import tiny_config, write_folder

    from normsoftmax import train_embedder
    from normsoftmax.config import EmbedConfig
    from normsoftmax.embedding import embed_files

    base = tmp_path_factory.mktemp("search_run")
    root = write_folder(base / "data", num_classes=8, images_per_class=6)
    train_embedder(tiny_config(root, base / "run", dataset="folder", num_steps=1, dim=64, lr=0.01))
    embed_files(EmbedConfig(checkpoint=str(base / "run"), images=str(root), out=str(base / "all.npz"), workers=0,
                            progress=False))
    return base / "run", root, base / "all.npz"
