"""Requests that arrive together are answered by one batch: an asyncio micro-batcher.

A network on a CPU or GPU answers 32 images in one forward pass far faster than in 32 passes, and a search
service gets its requests one by one. :class:`MicroBatcher` queues them; its loop takes the first waiting
job, collects more for up to ``wait_ms`` (or until ``max_batch``), runs the whole batch once in its single
worker thread (the event loop keeps accepting requests meanwhile, so jobs arriving during a batch form the
next one) and hands every caller its own result. ``max_batch=1`` turns batching off.

Waiting only pays when more jobs are on their way. A caller announces its job as early as it can
(``arrival = batcher.arrival()`` when a request comes in, ``submit(job, arrival)`` once its image is
decoded); when the queue is empty and no job is announced, the batch starts at once, so a lone request
never waits ``wait_ms`` for company that is not coming.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    largest: int = 0
    busy_seconds: float = 0.0


class MicroBatcher:
    """Runs ``run_batch(jobs) -> results`` (one result per job, in order) on batches of concurrent jobs."""

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch: int = 32,
                 wait_ms: float = 5.0):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if wait_ms < 0:
            raise ValueError(f"batch_wait_ms cannot be negative, got {wait_ms}")
        self.run_batch = run_batch
        self.max_batch = int(max_batch)
        self.wait = float(wait_ms) / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._arriving = 0

    def arrival(self) -> Arrival:
        """Announce a job that is on its way: the batch being collected waits for it (up to ``wait_ms``)
        until it is submitted or the announcement is closed."""
        return Arrival(self)

    async def start(self) -> None:
        """Start the batching loop on the running event loop (an app's startup)."""
        self._queue = asyncio.Queue()
        # One thread: batches run one after another, each using every core through the model's own threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch")
        self._task = asyncio.create_task(self._loop(), name="micro-batcher")

    async def stop(self) -> None:
        """Stop the loop; jobs still waiting fail with RuntimeError."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            _, future = self._queue.get_nowait()
            if not future.done():
                future.set_exception(RuntimeError("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = self._executor = None

    async def submit(self, job, arrival: Arrival | None = None) -> Any:
        """``job``'s result, computed in a batch with whatever other jobs arrive together."""
        if arrival is not None:
            arrival.close()
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (start() it in the app's lifespan)")
        future = asyncio.get_running_loop().create_future()
        self._started_queue().put_nowait((job, future))  # with the announcement closed above: no await in between
        return await future

    def _started_queue(self) -> asyncio.Queue:
        if self._queue is None:
            raise RuntimeError("the batcher is not running (start() it in the app's lifespan)")
        return self._queue

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        """The next batch: the first waiting job, then what is queued or announced and arrives within ``wait``
        seconds, up to max_batch."""
        queue = self._started_queue()
        batch = [await queue.get()]
        deadline = asyncio.get_running_loop().time() + self.wait
        while len(batch) < self.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            if not self._arriving:
                break  # nobody else is on the way: waiting would only delay this batch
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [(job, future) for job, future in batch if not future.done()]  # callers that gave up are skipped

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            jobs = [job for job, _ in batch]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, jobs)
                if len(results) != len(jobs):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(jobs)} jobs")
            except Exception as error:  # every caller of the batch gets the error; the loop goes on
                logger.exception("a batch of %d jobs failed", len(jobs))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - started
            self.stats.batches += 1
            self.stats.jobs += len(jobs)
            self.stats.largest = max(self.stats.largest, len(jobs))
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class Arrival:
    """A job announced to a :class:`MicroBatcher` and not submitted yet (closing it twice is harmless)."""

    def __init__(self, batcher: MicroBatcher):
        self._batcher = batcher
        self._open = True
        self.started = time.perf_counter()
        batcher._arriving += 1

    def close(self) -> None:
        if self._open:
            self._open = False
            self._batcher._arriving -= 1

    def __enter__(self) -> Arrival:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["MicroBatcher", "BatchStats", "Arrival"]
