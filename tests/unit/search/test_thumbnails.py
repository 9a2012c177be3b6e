"""Thumbnails: by id only, resized JPEGs of the indexed files, clear errors for unknown ids and unreadable files."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from normsoftmax.embedding.files import EmbeddingsFile
from normsoftmax.search import SearchIndex
from normsoftmax.search.thumbnails import Thumbnails


def test_thumbnails_of_indexed_files_only(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(photo)
    vectors = np.eye(2, 4, dtype=np.float32)
    index = SearchIndex.create(tmp_path / "ix", EmbeddingsFile(vectors, [str(photo), str(tmp_path / "gone.jpg")]))
    thumbnails = Thumbnails(index, capacity=1)
    data = thumbnails.jpeg(0, 100)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (100, 75)  # the longest side, aspect kept
    assert thumbnails.jpeg(0, 100) is data  # cached
    with pytest.raises(OSError):
        thumbnails.jpeg(1, 100)
    with pytest.raises(KeyError, match="no item 2"):
        thumbnails.jpeg(2, 100)
