"""Running the search service under uvicorn: ``normsoftmax serve`` (:func:`serve_index`), and a server in a
background thread on a free local port (:class:`BackgroundServer`) for tests and benchmarks."""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from typing import Any

from ..config import ServeConfig

logger = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_index(config: ServeConfig) -> None:
    """Load the index and the model (refusing a model other than the index's) and serve until interrupted."""
    import faiss
    import torch
    import uvicorn

    from ..runtime import available_cpus, resolve_device, setup_logging
    from .backends import open_index
    from .command import load_model_for, match_thresholds
    from .keys import ApiKeys
    from .service import create_app

    location = config.index or config.index_location
    if not config.checkpoint or not location:
        raise ValueError("serve needs the run directory (or checkpoint) and the index (a folder, or --index "
                         "milvus://...)")
    if config.max_batch < 1 or config.max_k < 1 or config.k < 1 or config.max_upload_mb <= 0 or config.max_pixels < 1:
        raise ValueError("max_batch, k, max_k, max_upload_mb and max_pixels must be positive")
    setup_logging()
    threads = config.threads if config.threads is not None else max(1, available_cpus() - 1)
    if threads < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    # Threads of one forward pass spin while they wait for each other; if they occupy every core, the event loop
    # and the decoding threads that feed the next batch wait for them, and on a busy machine all of them crawl.
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    index = open_index(location)
    model = load_model_for(index, config.checkpoint, resolve_device(config.device))
    thresholds = match_thresholds(index, model, config.calibration)
    keys = ApiKeys.read_file(config.api_key_file) if config.api_key_file else None
    app = create_app(model, index, config, thresholds, keys, config.uploads)
    if not is_loopback(config.host) and keys is None:
        logger.warning("serving on %s without --api_key_file: anyone who can reach this address can search the "
                       "collection, read its images, and add and remove items", config.host)
    if thresholds:
        logger.info("match decisions: %s", ", ".join(f"{kind} at {thresholds[kind]['threshold']:.4f}"
                                                     for kind in ("float", "binary") if kind in thresholds))
    logger.info("index %s: %d items (%s); %d threads; page at http://%s:%d/", index.location, index.count,
                ", ".join(index.kinds), threads, config.host, config.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info")


class BackgroundServer:
    """``with BackgroundServer(app) as server:`` serves ``app`` with uvicorn in a thread, on a port bound
    before the thread starts (no race for a free port); ``server.url`` is its base URL."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.app = app
        self.host = host
        self.port = port
        self.log_level = log_level
        self._server: Any = None  # a uvicorn.Server once started (uvicorn is imported on first use)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        import uvicorn

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        self.port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, lifespan="on"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True,
                                  name=f"uvicorn-{self.port}")
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


__all__ = ["serve_index", "BackgroundServer", "is_loopback"]
