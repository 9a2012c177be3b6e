"""The write-ahead journal of an index folder: the changes made since its last complete generation.

One change is one line -- ``NSJ1 <first 16 hex digits of its SHA-256> <JSON>`` -- appended and fsynced before the
change is acknowledged, so an acknowledged change survives a crash or a power cut. A line is either whole and
checked or it does not count: a crash in the middle of an append leaves a torn last line, which readers stop at
(the change was never acknowledged) and the next writer cuts off. Vectors travel as base64 of their float32 bytes.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import NotEnoughSpaceError, fsync_directory
from .items import ItemRecord

MAGIC = b"NSJ1"


@dataclass
class Change:
    """``add`` (``records``) or ``remove`` (``ids``)."""

    op: str
    records: list[ItemRecord]
    ids: list[int]


def encode(change: Change) -> bytes:
    if change.op == "add":
        body: dict = {"op": "add", "items": [
            {"id": r.id, "path": r.path, "label": r.label, "metadata": r.metadata,
             "vector": base64.b64encode(np.ascontiguousarray(r.vector, dtype="<f4").tobytes()).decode("ascii")}
            for r in change.records]}
    else:
        body = {"op": "remove", "ids": [int(i) for i in change.ids]}
    payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return MAGIC + b" " + hashlib.sha256(payload).hexdigest()[:16].encode() + b" " + payload + b"\n"


def _decode(line: bytes) -> Change | None:
    """The change of one complete line, or None when the line is not whole (torn, or damaged)."""
    parts = line.rstrip(b"\n").split(b" ", 2)
    if len(parts) != 3 or parts[0] != MAGIC or hashlib.sha256(parts[2]).hexdigest()[:16].encode() != parts[1]:
        return None
    body = json.loads(parts[2].decode("utf-8"))
    if body["op"] == "add":
        records = [ItemRecord(int(item["id"]), item["path"], item.get("label"), item.get("metadata"),
                              np.frombuffer(base64.b64decode(item["vector"]), dtype="<f4").astype(np.float32))
                   for item in body["items"]]
        return Change("add", records, [r.id for r in records])
    return Change("remove", [], [int(i) for i in body["ids"]])


def read(path: Path, offset: int = 0) -> tuple[list[Change], int]:
    """The whole, checked changes of ``path`` from byte ``offset`` on, and the offset after the last of them."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except FileNotFoundError:
        return [], offset
    changes, position = [], 0
    while True:
        end = data.find(b"\n", position)
        if end < 0:
            break
        change = _decode(data[position:end + 1])
        if change is None:
            break  # a torn or damaged line: nothing after it was acknowledged either
        changes.append(change)
        position = end + 1
    return changes, offset + position


def append(path: Path, change: Change, valid_end: int) -> int:
    """Append ``change`` durably after the first ``valid_end`` bytes (cutting off a torn tail); the new end.

    A full disk (or any failed write) leaves the file as it was and raises; :class:`NotEnoughSpaceError` for a
    full disk.
    """
    line = encode(change)
    created = not path.exists()
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.ftruncate(descriptor, valid_end)
        try:
            os.lseek(descriptor, valid_end, os.SEEK_SET)
            view = memoryview(line)
            while view:
                written = os.write(descriptor, view)
                view = view[written:]
            os.fsync(descriptor)
        except OSError as error:
            os.ftruncate(descriptor, valid_end)
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NotEnoughSpaceError(error.errno, f"no space left to record the change in {path}") from None
            raise
    finally:
        os.close(descriptor)
    if created:
        fsync_directory(path.parent)
    return valid_end + len(line)


__all__ = ["Change", "read", "append", "encode", "MAGIC"]
