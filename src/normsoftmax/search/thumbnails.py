"""Small JPEGs of indexed images, looked up by id only: a request never names a file."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps

from ..data.images import to_rgb


class Thumbnails:
    """JPEG thumbnails (longest side ``size``) of the items of an index, generated on first use and kept in
    a least-recently-used cache of ``capacity`` entries."""

    def __init__(self, index, capacity: int = 2048, quality: int = 85):
        self.index = index
        self.capacity = capacity
        self.quality = quality
        self._cache: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def jpeg(self, item_id: int, size: int) -> bytes:
        """The thumbnail of ``item_id``; KeyError for an id outside the index, OSError when its file is unreadable."""
        path = self.index.path_of(item_id)  # the only way from a request to a file: an id the index knows
        key = (int(item_id), int(size))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = render_thumbnail(path, size, self.quality)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data


def render_thumbnail(path: str, size: int, quality: int = 85) -> bytes:
    """A JPEG of the image at ``path``, longest side ``size``; OSError when it cannot be read."""
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (size, size))  # JPEGs decode at a reduced scale: fast for large photos
            opened.load()
            image = to_rgb(ImageOps.exif_transpose(opened))
    except Exception as error:
        raise OSError(f"{type(error).__name__}: {error}") from None
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


__all__ = ["Thumbnails", "render_thumbnail"]
