"""Per-query rows of sorted thresholds, searched for many candidates at once.

Each query's thresholds (its positives' scores, best first) form a non-increasing row. Mapping row q's keys
to ``q * stride + span - key`` lays all rows out as one ascending sequence, so a per-row binary search for
many (query, value) candidates is a single ``torch.searchsorted``."""

from __future__ import annotations

import torch


def ordered_int(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 with the same order (``<``, ``==``) as the floats (no NaN)."""
    x = x.to(torch.float32) + 0.0  # -0.0 -> +0.0: they compare equal
    bits = x.view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)


def row_keys(desc: torch.Tensor, span: int) -> tuple[torch.Tensor, int]:
    """Flatten per-row non-increasing int64 keys in ``[-span, span]`` into one ascending sequence.

    Row q becomes ``q * stride + span - key``, so a per-row ``searchsorted`` is one global
    ``torch.searchsorted`` with the candidate's value mapped the same way (``_row_query``).
    """
    stride = 2 * span + 2
    rows = torch.arange(desc.shape[0], device=desc.device, dtype=torch.int64)[:, None]
    return (rows * stride + (span - desc)).reshape(-1), stride


def row_count(flat: torch.Tensor, stride: int, width: int, span: int, q: torch.Tensor,
               key: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per candidate: number of entries of row q (non-increasing keys) ``>= key`` (``> key`` if strict)."""
    v = q * stride + (span - key)
    return torch.searchsorted(flat, v, right=not strict) - q * width
