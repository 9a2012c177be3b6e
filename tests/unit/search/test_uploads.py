"""Upload checks: images decode as the index's files did; non-images, broken files and bombs are refused."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from fastapi import HTTPException
from PIL import Image

from normsoftmax.data.images import load_rgb
from normsoftmax.search.uploads import decode_upload


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with a few bytes of (truncated) data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
            + chunk(b"IEND", b""))


def _status(data: bytes, max_pixels: int = 1_000_000) -> int:
    with pytest.raises(HTTPException) as refused:
        decode_upload(data, max_pixels)
    return refused.value.status_code


def test_an_upload_decodes_exactly_as_the_file_does(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 255, size=(30, 40, 4), dtype=np.uint8)
    file = tmp_path / "rgba.png"
    Image.fromarray(pixels, "RGBA").save(file)  # alpha is composited onto white by both
    decoded = decode_upload(file.read_bytes(), 1_000_000)
    assert decoded.mode == "RGB" and np.array_equal(np.asarray(decoded), np.asarray(load_rgb(file)))


def test_non_images_broken_images_and_bombs_are_refused_with_4xx():
    assert _status(b"") == 400
    assert _status(b"%PDF-1.4 definitely not an image") == 415
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
    assert _status(buffer.getvalue()[:300]) == 400  # truncated JPEG: never decoded as a grey tail
    assert _status(png_declaring(2000, 1000)) == 413  # over our limit, under PIL's
    assert _status(png_declaring(100_000, 100_000)) == 413  # over PIL's own bomb limit (DecompressionBombError)
    assert decode_upload(buffer.getvalue(), 64 * 64).size == (64, 64)  # exactly at the limit is fine
