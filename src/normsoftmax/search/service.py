"""The search service: a FastAPI app over one model and one collection.

* ``POST /search`` -- a query image (multipart field ``image``) or an item of the collection (``?id=``), with ``k``,
  ``kind`` (float: cosine; binary: Hamming on sign bits) and optionally ``threshold`` -> the top-k items with their
  scores, and ``match`` per item when a threshold is known (the request's, else the calibration's);
* ``POST /items`` -- add an image (multipart ``image``, optional ``label`` and JSON ``metadata``): embedded, stored
  and committed durably before the answer, which gives the new id; ``GET /items/{id}`` -- an item's record;
  ``DELETE /items/{id}`` -- remove it (ids are never reused);
* ``GET /thumbnail/{id}`` -- a JPEG of an item's image, by id only; ``GET /healthz``; ``GET /`` -- the page;
  FastAPI adds ``/openapi.json`` and ``/docs``.

Query images are decoded and transformed by a few worker threads, then embedded and searched in batches
(:class:`MicroBatcher`): requests that arrive together share one forward pass and one search. Writes are applied by
one writer thread, under the collection's lock, so a search sees the collection before or after a write, never in
between; changes made by other processes (``normsoftmax index add/remove``) are picked up before every batch. With
``--api_key_file``, writes need a write key and reads a key when the file says so (:mod:`.keys`).
"""

from __future__ import annotations

import asyncio
import importlib.resources
import io
import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path as FilePath
from typing import Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, File, Form, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel

from ..checkpoint import run_config_of
from ..config import ServeConfig
from ..data.images import ImageTransformConfig, eval_transform
from ..embedding.embed import run_amp
from ..files import NotEnoughSpaceError, atomic_write, fsync_directory
from ..model import Embedder
from ..runtime import autocast, available_cpus
from .batching import MicroBatcher
from .command import decide
from .keys import ApiKeys
from .thumbnails import Thumbnails
from .uploads import MULTIPART_ALLOWANCE, BodySizeLimit, decode_upload
from .vectors import SCORE_NAMES

IMAGE_SUFFIXES = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp",
                  "PPM": ".ppm"}
MAX_METADATA_BYTES = 16 * 1024


# ------------------------------------------------------------------------------------------ batch work
@dataclass
class SearchJob:
    """One request's query: preprocessed pixels (3 x crop x crop) or an indexed item's id; ``embed_only``: a write's
    image, whose vector is the answer."""

    k: int
    kind: str
    pixels: torch.Tensor | None = None
    item_id: int | None = None
    embed_only: bool = False


class BatchSearch:
    """Embeds the images of a batch in one forward pass, then searches each kind's queries at once."""

    def __init__(self, model: Embedder, index):
        self.model = model
        self.index = index
        self.device = next(model.parameters()).device
        config = model.train_config
        self.channels_last = bool(getattr(config, "channels_last", False))
        # the precision the index was embedded with (the run's by default), so queries match their twins
        self.amp = (index.model or {}).get("amp") or run_amp(model, "auto", self.device)

    @torch.inference_mode()
    def embed(self, pixels: list[torch.Tensor]) -> np.ndarray:
        images = torch.stack(pixels).to(self.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.amp):
            return self.model(images).float().cpu().numpy()

    def __call__(self, jobs: list[SearchJob]) -> list[Any]:
        """Each job's hits, in order: one forward pass for all uploaded images, then per kind one search of the
        images and one of the indexed items (with the largest k asked, each job trimmed to its own). A job that
        only embeds gets its vector."""
        self.index.refresh()  # what other processes changed is seen by this batch
        results: list[Any] = [[] for _ in jobs]
        uploads = [(i, job.pixels) for i, job in enumerate(jobs) if job.pixels is not None]
        embedded = self.embed([pixels for _, pixels in uploads]) if uploads else np.zeros((0, 0), np.float32)
        vectors = dict(zip([i for i, _ in uploads], embedded, strict=True))
        searching = [i for i, job in enumerate(jobs) if not job.embed_only]
        for i, job in enumerate(jobs):
            if job.embed_only:
                results[i] = vectors[i]
        for kind in sorted({jobs[i].kind for i in searching}):
            k = max(jobs[i].k for i in searching if jobs[i].kind == kind)
            images = [i for i in searching if jobs[i].kind == kind and i in vectors]
            items = [i for i in searching if jobs[i].kind == kind and i not in vectors]
            if images:
                self._answer(results, jobs, images, self.index.search(np.stack([vectors[i] for i in images]), k, kind))
            if items:
                self._answer(results, jobs, items, self.index.search_items([jobs[i].item_id for i in items], k, kind))
        return results

    def _answer(self, results: list, jobs: list[SearchJob], rows: list[int], found) -> None:
        for position, row in enumerate(rows):
            results[row] = self.index.hits(found, position, jobs[row].k)


# ------------------------------------------------------------------------------------------ API types
class Hit(BaseModel):
    id: int
    path: str
    score: float
    label: str | None = None
    metadata: dict | None = None
    hamming: int | None = None
    match: bool | None = None


class SearchAnswer(BaseModel):
    kind: Literal["float", "binary"]
    score: str
    query: dict
    neighbours: list[Hit]
    threshold: float | None = None
    threshold_hamming: int | None = None
    threshold_source: str | None = None


class Item(BaseModel):
    id: int
    path: str
    label: str | None = None
    metadata: dict | None = None


class AnnounceSearches:
    """ASGI middleware: every ``POST /search`` is announced to the batcher as soon as its headers arrive, so a
    batch being collected waits for requests whose bodies are still coming in (``scope["state"]["arrival"]``,
    closed when the endpoint submits its job or the request ends)."""

    def __init__(self, app, batcher: MicroBatcher):
        self.app = app
        self.batcher = batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/search" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        with self.batcher.arrival() as arrival:
            scope.setdefault("state", {})["arrival"] = arrival
            await self.app(scope, receive, send)


class WriteRate:
    """At most ``per_second`` writes a second on average, bursts of a second's worth (a token bucket)."""

    def __init__(self, per_second: float):
        self.per_second = per_second
        self.tokens = max(1.0, per_second)
        self.updated = time.monotonic()
        self._lock = threading.Lock()

    def take(self) -> None:
        with self._lock:
            now = time.monotonic()
            self.tokens = min(max(1.0, self.per_second), self.tokens + (now - self.updated) * self.per_second)
            self.updated = now
            if self.tokens < 1.0:
                raise HTTPException(429, f"at most {self.per_second:g} writes a second; try again shortly",
                                    headers={"Retry-After": "1"})
            self.tokens -= 1.0


def _page() -> str:
    return importlib.resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def _favicon() -> bytes:
    """A 32 x 32 PNG: the page's accent colour with a white dot (so browsers get an icon, not a 404)."""
    image = Image.new("RGB", (32, 32), (36, 86, 199))
    for x in range(32):
        for y in range(32):
            if (x - 16) ** 2 + (y - 16) ** 2 < 49:
                image.putpixel((x, y), (255, 255, 255))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _transform(model: Embedder) -> Callable[[Image.Image], torch.Tensor]:
    return eval_transform(ImageTransformConfig.of(run_config_of(model)))


# ------------------------------------------------------------------------------------------ the app
class SearchService:
    """What the routes share: the model, the collection, the batcher, decoders, the writer and the settings."""

    def __init__(self, model: Embedder, index, config: ServeConfig, thresholds: dict | None = None,
                 keys: ApiKeys | None = None, images_dir: FilePath | None = None):
        index.check_model(model)
        self.model, self.index, self.config = model, index, config
        self.thresholds = thresholds
        self.keys = keys or ApiKeys()
        self.images_dir = images_dir
        self.transform = _transform(model)
        self.batcher = MicroBatcher(BatchSearch(model, index), max_batch=config.max_batch,
                                    wait_ms=config.batch_wait_ms)
        self.thumbnails = Thumbnails(index)
        self.max_bytes = int(config.max_upload_mb * 2**20)
        # Uploads are decoded by a few threads, not one per request: dozens of threads contending for the GIL
        # would stall the batch thread's forward pass every time it needs the GIL back.
        self.decoders = ThreadPoolExecutor(max_workers=min(4, available_cpus()), thread_name_prefix="decode")
        # One writer: writes are applied in the order they were embedded; each fsyncs before it is answered.
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self.write_rate = WriteRate(config.max_writes_per_second)

    def prepare(self, data: bytes) -> torch.Tensor:
        """An upload as the model's input (3 x crop x crop), or an HTTPException saying why not."""
        return self.transform(decode_upload(data, self.config.max_pixels))

    async def read_upload(self, image: UploadFile) -> bytes:
        data = await image.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"the image is larger than {self.config.max_upload_mb:g} MB")
        return data

    async def job(self, image: UploadFile | None, item_id: int | None, k: int, kind: str) -> tuple[SearchJob, dict]:
        """The batch job of a request (decoded pixels, or an indexed item) and how to describe its query."""
        if (image is None) == (item_id is None):
            raise HTTPException(400, "send either an image (multipart field 'image') or ?id= of an indexed item")
        if kind not in self.index.kinds:
            raise HTTPException(400, f"this index holds only {', '.join(self.index.kinds)} codes")
        if item_id is not None:
            return SearchJob(k, kind, item_id=item_id), self.record(item_id)
        assert image is not None  # exactly one of the two, checked above
        data = await self.read_upload(image)
        pixels = await asyncio.get_running_loop().run_in_executor(self.decoders, self.prepare, data)
        return SearchJob(k, kind, pixels=pixels), {"upload": True, "bytes": len(data)}

    def record(self, item_id: int) -> dict:
        self.index.refresh()
        try:
            return self.index.item(item_id)
        except KeyError as error:
            raise HTTPException(404, str(error).strip("'\"")) from None

    # -------------------------------------------------------------------------------------- writes
    async def add(self, image: UploadFile, label: str | None, metadata: str | None) -> dict:
        self.write_rate.take()
        details = _metadata(metadata)
        data = await self.read_upload(image)
        loop = asyncio.get_running_loop()
        pixels, suffix = await loop.run_in_executor(self.decoders, self._prepare_write, data)
        vector = await self.batcher.submit(SearchJob(1, "float", pixels=pixels, embed_only=True))
        return await loop.run_in_executor(self.writer, self._commit, vector, data, suffix, label, details,
                                          image.filename)

    def _prepare_write(self, data: bytes) -> tuple[torch.Tensor, str]:
        pixels = self.prepare(data)  # refuses what is not an image (415), broken (400) or too large (413)
        with Image.open(io.BytesIO(data)) as opened:
            suffix = IMAGE_SUFFIXES.get(opened.format or "", ".img")
        return pixels, suffix

    def _commit(self, vector: np.ndarray, data: bytes, suffix: str, label: str | None, metadata: dict | None,
                filename: str | None) -> dict:
        if self.images_dir is None:
            raise HTTPException(501, "this collection has no folder for uploaded images; serve it with --uploads")
        folder = self.images_dir
        stored: list[FilePath] = []

        def store(ids: list[int]) -> list[str]:
            created = not folder.is_dir()
            folder.mkdir(parents=True, exist_ok=True)
            if created:  # the folder's own entry, once; each file's entry is synced by the durable write
                fsync_directory(folder.parent)
            path = folder / f"{ids[0]}{suffix}"
            atomic_write(path, data, durable=True)  # the image is on disk before the item is committed
            stored.append(path)
            return [str(path)]

        details = dict(metadata or {})
        if filename:
            details.setdefault("filename", filename)
        try:
            ids = self.index.add_items(vector[None], ["(uploading)"], [label], [details or None], before_commit=store)
        except NotEnoughSpaceError:
            for path in stored:
                path.unlink(missing_ok=True)
            raise HTTPException(507, "the server's disk is full: the item was not added, the collection is as it "
                                     "was") from None
        except BaseException:
            for path in stored:
                path.unlink(missing_ok=True)
            raise
        return self.index.item(ids[0])

    def remove(self, item_id: int) -> dict:
        self.write_rate.take()
        try:
            self.index.remove([item_id])
        except KeyError as error:
            raise HTTPException(404, str(error).strip("'\"")) from None
        except NotEnoughSpaceError:
            raise HTTPException(507, "the server's disk is full: the item was not removed") from None
        return {"removed": item_id, "items": self.index.count}

    def health(self) -> dict:
        config = self.config
        self.index.refresh()
        thresholds = {kind: {key: value for key, value in decision.items() if key != "held_out"}
                      for kind, decision in (self.thresholds or {}).items() if kind in ("float", "binary")}
        return {"status": "ok", "items": self.index.count, "kinds": list(self.index.kinds),
                "index_kind": self.index.kind, "dim": self.index.dim, "location": str(self.index.location),
                "model": {"digest": self.index.digest, "checkpoint": getattr(self.model, "checkpoint", None)},
                "default_k": config.k, "max_k": config.max_k, "thresholds": thresholds,
                "writes": self.images_dir is not None,
                "keys": {"writes": self.keys.enabled, "reads": self.keys.reads_need_a_key},
                "batching": {"max_batch": config.max_batch, "batch_wait_ms": config.batch_wait_ms,
                             **asdict(self.batcher.stats)}}


def _metadata(text: str | None) -> dict | None:
    if not text:
        return None
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise HTTPException(413, f"metadata is limited to {MAX_METADATA_BYTES // 1024} KB")
    try:
        value = json.loads(text)
    except ValueError as error:
        raise HTTPException(400, f"metadata must be a JSON object ({error})") from None
    if not isinstance(value, dict):
        raise HTTPException(400, "metadata must be a JSON object")
    return value


def create_app(model: Embedder, index, config: ServeConfig, thresholds: dict | None = None,
               keys: ApiKeys | None = None, images_dir: FilePath | str | None = None) -> FastAPI:
    """The service for ``index``; refuses a ``model`` other than the one that embedded the index. ``thresholds``
    decide ``match``; ``keys`` guard it; uploaded items are stored in ``images_dir`` (default: the index folder's
    ``images/``; none for a Milvus collection unless given)."""
    if images_dir is None and not str(getattr(index, "location", "")).startswith("milvus"):
        images_dir = FilePath(index.location) / "images"
    service = SearchService(model, index, config, thresholds, keys, FilePath(images_dir) if images_dir else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.decoders.shutdown(wait=False, cancel_futures=True)
            service.writer.shutdown(wait=True)

    app = FastAPI(title="normsoftmax search", lifespan=lifespan,
                  description=f"Nearest images in a collection of {index.count} items ({', '.join(index.kinds)}).")
    app.add_middleware(BodySizeLimit, limit=service.max_bytes + MULTIPART_ALLOWANCE, paths=("/search", "/items"),
                       detail=f"uploads are limited to {config.max_upload_mb:g} MB")
    app.add_middleware(AnnounceSearches, batcher=service.batcher)
    app.state.service = service
    _add_search_route(app, service)
    _add_item_routes(app, service)
    _add_other_routes(app, service)
    return app


def _add_search_route(app: FastAPI, service: SearchService) -> None:
    config = service.config

    @app.post("/search", response_model=SearchAnswer, response_model_exclude_none=True,
              responses={400: {"description": "no query, or an image that does not decode"},
                         401: {"description": "a key is needed"}, 404: {"description": "no such id"},
                         413: {"description": "upload too large"}, 415: {"description": "not an image"}})
    async def search(request: Request, response: Response,
                     image: UploadFile | None = File(None, description="the query image"),  # noqa: B008
                     item_id: int | None = Query(None, alias="id", ge=0, description="search with this indexed item"),
                     k: int = Query(config.k, ge=1, le=config.max_k),
                     kind: Literal["float", "binary"] = Query("float"),
                     threshold: float | None = Query(None, ge=-1.0, le=1.0,
                                                     description="decide match at this score (default: calibrated)")):
        service.keys.require(request, "read")
        received = time.perf_counter()
        job, query = await service.job(image, item_id, k, kind)
        arrival = getattr(request.state, "arrival", None)
        prepared = time.perf_counter()
        neighbours = await service.batcher.submit(job, arrival)
        # Where the time went (the standard Server-Timing header: browsers' developer tools show it).
        timings = [("receive", arrival.started if arrival else received, received), ("decode", received, prepared),
                   ("batch", prepared, time.perf_counter())]
        response.headers["Server-Timing"] = ", ".join(f"{name};dur={(end - start) * 1000:.1f}"
                                                      for name, start, end in timings)
        decided = decide(neighbours, kind, threshold, service.thresholds, service.index.dim)
        return {"kind": kind, "score": SCORE_NAMES[kind], "query": query, **decided}


def _add_item_routes(app: FastAPI, service: SearchService) -> None:
    @app.post("/items", response_model=Item, response_model_exclude_none=True,
              responses={401: {"description": "a write key is needed"}, 403: {"description": "a read-only key"},
                         413: {"description": "upload too large"}, 415: {"description": "not an image"},
                         429: {"description": "too many writes"}, 507: {"description": "the disk is full"}})
    async def add_item(request: Request,
                       image: UploadFile = File(..., description="the image to add"),  # noqa: B008
                       label: str | None = Form(None, max_length=1024),
                       metadata: str | None = Form(None, description="a JSON object kept with the item")):
        """Add an image: embedded, stored and committed durably before this answers; the answer gives its id."""
        service.keys.require(request, "write")
        return await service.add(image, label, metadata)

    @app.get("/items/{item_id}", response_model=Item, response_model_exclude_none=True)
    def get_item(request: Request, item_id: int = Path(ge=0)):
        service.keys.require(request, "read")
        return service.record(item_id)

    @app.delete("/items/{item_id}", responses={404: {"description": "no such item"}})
    async def delete_item(request: Request, item_id: int = Path(ge=0)):
        """Remove an item, durably; its id is never given to another item."""
        service.keys.require(request, "write")
        return await asyncio.get_running_loop().run_in_executor(service.writer, service.remove, item_id)


def _add_other_routes(app: FastAPI, service: SearchService) -> None:
    page = _page()
    icon = _favicon()

    @app.get("/thumbnail/{item_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such id, or unreadable"}})
    def thumbnail(request: Request, item_id: int = Path(ge=0), size: int = Query(192, ge=16, le=512)):
        service.keys.require(request, "read")
        service.index.refresh()
        try:
            data = service.thumbnails.jpeg(item_id, size)
        except KeyError as error:
            raise HTTPException(404, str(error).strip("'\"")) from None
        except OSError:
            raise HTTPException(404, f"the image of item {item_id} cannot be read on the server") from None
        # an id always means the same image (ids are never reused): caching it is safe
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/healthz")
    async def healthz():
        return service.health()

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(icon, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page():
        return HTMLResponse(page)


__all__ = ["create_app", "SearchService", "BatchSearch", "SearchJob", "AnnounceSearches", "WriteRate"]
