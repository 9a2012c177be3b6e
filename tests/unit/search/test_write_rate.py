"""The bound on writes: a token bucket of a second's worth, refilled at the configured rate; past it, 429."""

import pytest
from fastapi import HTTPException

from normsoftmax.search import service


def test_writes_past_the_rate_get_429_until_the_bucket_refills(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(service.time, "monotonic", lambda: now[0])
    rate = service.WriteRate(2)
    rate.take()
    rate.take()  # a burst of a second's worth
    with pytest.raises(HTTPException) as refused:
        rate.take()
    assert refused.value.status_code == 429 and refused.value.headers == {"Retry-After": "1"}
    now[0] += 0.5  # half a second at 2 a second: one more
    rate.take()
    with pytest.raises(HTTPException):
        rate.take()


def test_a_rate_below_one_a_second_still_allows_one_write():
    rate = service.WriteRate(0.1)
    rate.take()
    with pytest.raises(HTTPException):
        rate.take()
