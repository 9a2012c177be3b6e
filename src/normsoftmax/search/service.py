"""The search service: a FastAPI app over one model and one index.

* ``POST /search`` -- a query image (multipart field ``image``) or an item of the index (``?id=``), with
  ``k`` and ``kind`` (float: cosine; binary: Hamming on sign bits) -> the top-k ids, paths and scores;
* ``GET /thumbnail/{id}`` -- a JPEG of an indexed image, by id only;
* ``GET /healthz`` -- the index, the model and the batcher's counters;
* ``GET /`` -- the search page; FastAPI adds ``/openapi.json`` and ``/docs``.

Query images are decoded and transformed in the request's worker thread, then embedded and searched in
batches (:class:`MicroBatcher`): requests that arrive together share one forward pass and one faiss search.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Path, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, Response
from PIL import Image
from pydantic import BaseModel

from ..checkpoint import run_config_of
from ..config import ServeConfig
from ..data.images import ImageTransformConfig, eval_transform
from ..embedding.embed import run_amp
from ..model import Embedder
from ..runtime import autocast, available_cpus
from .batching import MicroBatcher
from .index import SCORE_NAMES, SearchIndex
from .thumbnails import Thumbnails
from .uploads import MULTIPART_ALLOWANCE, BodySizeLimit, decode_upload


# ------------------------------------------------------------------------------------------ batch work
@dataclass
class SearchJob:
    """One request's query: preprocessed pixels (3 x crop x crop) or an indexed item's id."""

    k: int
    kind: str
    pixels: torch.Tensor | None = None
    item_id: int | None = None


class BatchSearch:
    """Embeds the image queries of a batch in one forward pass, then searches each kind's queries at once."""

    def __init__(self, model: torch.nn.Module, index: SearchIndex):
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

    def __call__(self, jobs: list[SearchJob]) -> list[list[dict]]:
        """Each job's hits, in order: one forward pass for all uploaded images, then per kind one faiss search
        of the images and one of the indexed items (with the largest k asked, each job trimmed to its own)."""
        results: list[list[dict]] = [[] for _ in jobs]
        uploads = [(i, job.pixels) for i, job in enumerate(jobs) if job.pixels is not None]
        image_jobs = [i for i, _ in uploads]
        embedded = self.embed([pixels for _, pixels in uploads]) if uploads else np.zeros((0, 0), np.float32)
        vectors = dict(zip(image_jobs, embedded, strict=True))
        for kind in sorted({job.kind for job in jobs}):
            k = max(job.k for job in jobs if job.kind == kind)
            images = [i for i in image_jobs if jobs[i].kind == kind]
            items = [i for i, job in enumerate(jobs) if job.kind == kind and job.pixels is None]
            if images:
                found = self.index.search(np.stack([vectors[i] for i in images]), k, kind)
                results = self._answer(results, jobs, images, found)
            if items:
                found = self.index.search_items([jobs[i].item_id for i in items], k, kind)
                results = self._answer(results, jobs, items, found)
        return results

    def _answer(self, results: list, jobs: list[SearchJob], rows: list[int], found) -> list:
        for position, row in enumerate(rows):
            results[row] = self.index.hits(found, position, jobs[row].k)
        return results


# ------------------------------------------------------------------------------------------ API types
class Hit(BaseModel):
    id: int
    path: str
    score: float
    label: str | None = None
    hamming: int | None = None


class SearchAnswer(BaseModel):
    kind: Literal["float", "binary"]
    score: str
    query: dict
    neighbours: list[Hit]


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


def _page() -> str:
    return importlib.resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def _transform(model: Embedder) -> Callable[[Image.Image], torch.Tensor]:
    return eval_transform(ImageTransformConfig.of(run_config_of(model)))


# ------------------------------------------------------------------------------------------ the app
class SearchService:
    """What the routes share: the model, the index, the batcher, the upload decoders and the settings."""

    def __init__(self, model: Embedder, index: SearchIndex, config: ServeConfig):
        index.check_model(model)
        self.model, self.index, self.config = model, index, config
        self.transform = _transform(model)
        self.batcher = MicroBatcher(BatchSearch(model, index), max_batch=config.max_batch,
                                    wait_ms=config.batch_wait_ms)
        self.thumbnails = Thumbnails(index)
        self.max_bytes = int(config.max_upload_mb * 2**20)
        # Uploads are decoded by a few threads, not one per request: dozens of threads contending for the GIL
        # would stall the batch thread's forward pass every time it needs the GIL back.
        self.decoders = ThreadPoolExecutor(max_workers=min(4, available_cpus()), thread_name_prefix="decode")

    def prepare(self, data: bytes) -> torch.Tensor:
        """An upload as the model's input (3 x crop x crop), or an HTTPException saying why not."""
        return self.transform(decode_upload(data, self.config.max_pixels))

    async def job(self, image: UploadFile | None, item_id: int | None, k: int, kind: str) -> tuple[SearchJob, dict]:
        """The batch job of a request (decoded pixels, or an indexed item) and how to describe its query."""
        if (image is None) == (item_id is None):
            raise HTTPException(400, "send either an image (multipart field 'image') or ?id= of an indexed item")
        if kind not in self.index.kinds:
            raise HTTPException(400, f"this index holds only {', '.join(self.index.kinds)} codes")
        if item_id is not None:
            if item_id >= self.index.count:
                raise HTTPException(404, f"no item {item_id}: the index holds ids 0 to {self.index.count - 1}")
            return SearchJob(k, kind, item_id=item_id), self.index.item(item_id)
        assert image is not None  # exactly one of the two, checked above
        data = await image.read(self.max_bytes + 1)
        if len(data) > self.max_bytes:
            raise HTTPException(413, f"the image is larger than {self.config.max_upload_mb:g} MB")
        pixels = await asyncio.get_running_loop().run_in_executor(self.decoders, self.prepare, data)
        return SearchJob(k, kind, pixels=pixels), {"upload": True, "bytes": len(data)}

    def health(self) -> dict:
        config = self.config
        return {"status": "ok", "items": self.index.count, "kinds": list(self.index.kinds),
                "index_kind": self.index.kind, "dim": self.index.dim,
                "model": {"digest": self.index.digest, "checkpoint": getattr(self.model, "checkpoint", None)},
                "default_k": config.k, "max_k": config.max_k,
                "batching": {"max_batch": config.max_batch, "batch_wait_ms": config.batch_wait_ms,
                             **asdict(self.batcher.stats)}}


def create_app(model: Embedder, index: SearchIndex, config: ServeConfig) -> FastAPI:
    """The service for ``index``; refuses a ``model`` other than the one that embedded the index."""
    service = SearchService(model, index, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        try:
            yield
        finally:
            await service.batcher.stop()
            service.decoders.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="normsoftmax search", lifespan=lifespan,
                  description=f"Nearest images in an index of {index.count} items ({', '.join(index.kinds)}).")
    app.add_middleware(BodySizeLimit, limit=service.max_bytes + MULTIPART_ALLOWANCE, paths=("/search",),
                       detail=f"uploads are limited to {config.max_upload_mb:g} MB")
    app.add_middleware(AnnounceSearches, batcher=service.batcher)
    app.state.service = service
    _add_search_route(app, service)
    _add_other_routes(app, service)
    return app


def _add_search_route(app: FastAPI, service: SearchService) -> None:
    config = service.config

    @app.post("/search", response_model=SearchAnswer, response_model_exclude_none=True,
              responses={400: {"description": "no query, or an image that does not decode"},
                         404: {"description": "no such id"}, 413: {"description": "upload too large"},
                         415: {"description": "not an image"}})
    async def search(request: Request, response: Response,
                     image: UploadFile | None = File(None, description="the query image"),  # noqa: B008
                     item_id: int | None = Query(None, alias="id", ge=0, description="search with this indexed item"),
                     k: int = Query(config.k, ge=1, le=config.max_k),
                     kind: Literal["float", "binary"] = Query("float")):
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
        return {"kind": kind, "score": SCORE_NAMES[kind], "query": query, "neighbours": neighbours}


def _add_other_routes(app: FastAPI, service: SearchService) -> None:
    page = _page()
    count = service.index.count

    @app.get("/thumbnail/{item_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}}, 404: {"description": "no such id, or unreadable"}})
    def thumbnail(item_id: int = Path(ge=0), size: int = Query(192, ge=16, le=512)):
        try:
            data = service.thumbnails.jpeg(item_id, size)
        except KeyError:
            raise HTTPException(404, f"no item {item_id}: the index holds ids 0 to {count - 1}") from None
        except OSError:
            raise HTTPException(404, f"the image of item {item_id} cannot be read on the server") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/healthz")
    async def healthz():
        return service.health()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def search_page():
        return HTMLResponse(page)


__all__ = ["create_app", "SearchService", "BatchSearch", "SearchJob", "AnnounceSearches"]
