"""What an uploaded query image must pass before it reaches the model.

* the request body is cut off past a size limit (:class:`BodySizeLimit`, 413) -- before FastAPI parses the
  multipart form, which would otherwise spool any size to disk first;
* the bytes must decode as an image (:func:`decode_upload`): unknown formats are 415, broken files 400;
* the declared width x height must stay under a pixel limit, checked from the header before any pixel is
  decoded, so a small file declaring a huge image (a decompression bomb) costs nothing and is refused (413).
  PIL's own ``DecompressionBombError`` (and its warning, when warnings are errors) become the same 413.

The decoded image is what :func:`normsoftmax.data.images.load_rgb` makes of a file (EXIF orientation,
8-bit RGB), so an uploaded copy of an indexed image embeds exactly as the index's copy did.
"""

from __future__ import annotations

import io
import json

from fastapi import HTTPException
from PIL import Image, ImageOps, UnidentifiedImageError

from ..data.images import to_rgb

# Multipart framing (boundaries, part headers) around the file itself.
MULTIPART_ALLOWANCE = 64 * 1024
# How much of an oversized body is read and thrown away so that the client gets its 413 (see BodySizeLimit).
DISCARD_LIMIT = 64 * 2**20


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """``data`` as an 8-bit RGB image, or an HTTPException (400, 413, 415) saying what is wrong with it."""
    if not data:
        raise HTTPException(400, "the uploaded file is empty")
    try:
        with Image.open(io.BytesIO(data)) as opened:
            width, height = opened.size
            if width * height > max_pixels:
                raise HTTPException(413, f"the image is {width} x {height} pixels; the limit is {max_pixels:,} pixels")
            opened.load()
            image = ImageOps.exif_transpose(opened)
        return to_rgb(image)
    except HTTPException:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise HTTPException(413, f"the image declares too many pixels ({error})") from None
    except UnidentifiedImageError:
        raise HTTPException(415, "the upload is not an image in a format this service reads "
                                 "(JPEG, PNG, GIF, BMP, TIFF, WebP, ...)") from None
    except Exception as error:  # truncated or corrupt data: PIL raises OSError, SyntaxError, ValueError, ...
        raise HTTPException(400, f"the image cannot be decoded ({type(error).__name__}: {error})") from None


class BodySizeLimit:
    """ASGI middleware: requests to ``paths`` whose body exceeds ``limit`` bytes get 413, and no more than
    ``limit`` bytes of their body ever reach the app.

    The rest of an oversized body is read and discarded (up to :data:`DISCARD_LIMIT` bytes) before the 413 is
    sent: closing a connection with unread data makes the kernel reset it, and the client would see a broken
    connection instead of the answer. Bodies declared larger than that are answered at once.
    """

    def __init__(self, app, limit: int, paths: tuple[str, ...] = ("/search",), detail: str | None = None):
        self.app = app
        self.limit = limit
        self.paths = paths
        self.detail = detail or f"the request is larger than {limit:,} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if int(declared) <= self.limit + DISCARD_LIMIT:
                await _discard(receive, self.limit + DISCARD_LIMIT)
            await self._refuse(send)
            return
        state = {"received": 0, "exceeded": False, "more_body": True, "started": False}

        async def limited_receive():
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                state["more_body"] = message.get("more_body", False)
                if state["received"] > self.limit:
                    state["exceeded"] = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            if state["exceeded"]:
                return  # whatever the app answers to a body we cut off, the answer is 413
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["exceeded"]:
                raise
        if state["exceeded"] and not state["started"]:
            if state["more_body"]:
                await _discard(receive, DISCARD_LIMIT)
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"detail": self.detail}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


async def _discard(receive, at_most: int) -> None:
    """Read and drop the rest of a request body, ``at_most`` bytes of it."""
    discarded = 0
    while discarded <= at_most:
        message = await receive()
        if message["type"] != "http.request":
            return
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _BodyTooLarge(Exception):
    pass


__all__ = ["decode_upload", "BodySizeLimit", "MULTIPART_ALLOWANCE"]
