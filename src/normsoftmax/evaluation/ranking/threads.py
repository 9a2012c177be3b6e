"""How many threads the ranking's torch operations use.

The matrix products use every intra-op thread; the bookkeeping between them (many small operations) runs
on one, which is faster than synchronising threads for small work and robust when other processes share
the cores."""

from __future__ import annotations

from contextlib import contextmanager

import torch


@contextmanager
def num_threads(n: int):
    """Run torch ops with ``n`` intra-op threads (CPU), then restore."""
    old = torch.get_num_threads()
    if n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
