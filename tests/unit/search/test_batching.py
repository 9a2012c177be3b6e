"""The micro-batcher: concurrent jobs share batches, each caller gets its own result, errors reach callers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from normsoftmax.search.batching import MicroBatcher


def _run(coroutine):
    return asyncio.run(coroutine)


class Recorder:
    """run_batch that records the batches it saw (and the thread it ran in)."""

    def __init__(self, fail_on=None):
        self.batches = []
        self.threads = set()
        self.fail_on = fail_on

    def __call__(self, jobs):
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(jobs))
        if self.fail_on in jobs:
            raise RuntimeError(f"job {self.fail_on} is bad")
        return [job * 10 for job in jobs]


async def _submit_all(batcher, jobs):
    await batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(job) for job in jobs), return_exceptions=True)
    finally:
        await batcher.stop()


def test_jobs_that_arrive_together_share_batches_up_to_max_batch():
    recorder = Recorder()
    results = _run(_submit_all(MicroBatcher(recorder, max_batch=4, wait_ms=50), list(range(10))))
    assert results == [job * 10 for job in range(10)]
    assert [len(batch) for batch in recorder.batches] == [4, 4, 2]
    assert sorted(job for batch in recorder.batches for job in batch) == list(range(10))
    assert len(recorder.threads) == 1 and not recorder.threads & {threading.current_thread().name}


def test_max_batch_one_runs_every_job_alone():
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch=1, wait_ms=50)
    assert _run(_submit_all(batcher, list(range(5)))) == [0, 10, 20, 30, 40]
    assert [len(batch) for batch in recorder.batches] == [1] * 5
    assert (batcher.stats.batches, batcher.stats.jobs, batcher.stats.largest) == (5, 5, 1)


def test_a_batch_waits_only_for_announced_jobs_and_at_most_wait_ms():
    recorder = Recorder()

    async def scenario():
        batcher = MicroBatcher(recorder, max_batch=32, wait_ms=300)
        await batcher.start()
        loop = asyncio.get_running_loop()
        timings = {}

        started = loop.time()
        assert await batcher.submit(1) == 10  # alone, nothing announced: no waiting
        timings["lone"] = loop.time() - started

        async def late_arrival():
            arrival = batcher.arrival()
            await asyncio.sleep(0.05)  # e.g. receiving and decoding its image
            return await batcher.submit(3, arrival)

        started = loop.time()
        arrival = asyncio.create_task(late_arrival())
        await asyncio.sleep(0)  # the late job is announced before job 2 is queued
        assert await asyncio.gather(batcher.submit(2), arrival) == [20, 30]
        timings["shared"] = loop.time() - started

        async def never_arrives():
            with batcher.arrival():  # e.g. a request whose upload is refused
                await asyncio.sleep(1.0)

        started = loop.time()
        absent = asyncio.create_task(never_arrives())
        await asyncio.sleep(0)
        assert await batcher.submit(4) == 40
        timings["bounded"] = loop.time() - started
        absent.cancel()
        await batcher.stop()
        return timings

    timings = _run(scenario())
    assert [sorted(batch) for batch in recorder.batches] == [[1], [2, 3], [4]]
    assert timings["lone"] < 0.1 and 0.04 < timings["shared"] < 0.29 and 0.29 <= timings["bounded"] < 0.9


def test_a_failing_batch_fails_its_callers_and_the_batcher_goes_on():
    recorder = Recorder(fail_on=3)

    async def scenario():
        batcher = MicroBatcher(recorder, max_batch=8, wait_ms=30)
        await batcher.start()
        first = await asyncio.gather(*(batcher.submit(job) for job in range(5)), return_exceptions=True)
        after = await batcher.submit(5)
        await batcher.stop()
        return first, after

    first, after = _run(scenario())
    assert all(isinstance(result, RuntimeError) and "job 3 is bad" in str(result) for result in first)
    assert after == 50


def test_submit_before_start_is_refused_and_bad_settings_are_named():
    with pytest.raises(RuntimeError, match="not running"):
        _run(MicroBatcher(Recorder()).submit(1))
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(Recorder(), max_batch=0)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        MicroBatcher(Recorder(), wait_ms=-1)
