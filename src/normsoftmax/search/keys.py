"""Who may do what: API keys with a role.

A key file has one key per line, then its role, ``read`` or ``write`` (a write key reads too); ``#`` starts a
comment. Once keys are configured, every write (adding or removing items) needs a write key. Reads -- searches,
items, thumbnails -- need a key (of either role) exactly when the file lists at least one ``read`` key; a file of
write keys alone leaves searching open to anyone who can reach the service.

Clients send a key as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. Keys are compared in constant time (all
of them, every time: the time taken says nothing about which key came close) and never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request

ROLES = ("read", "write")
MIN_KEY_LENGTH = 16


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the configured keys with their roles (the keys themselves are not kept)."""

    entries: tuple[tuple[bytes, str], ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    @property
    def reads_need_a_key(self) -> bool:
        return any(role == "read" for _, role in self.entries)

    @classmethod
    def read_file(cls, path: str | Path) -> ApiKeys:
        path = Path(path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ValueError(f"{path}: the key file cannot be read ({error.strerror})") from None
        entries = []
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            if len(parts) != 2 or parts[1] not in ROLES:
                raise ValueError(f"{path}, line {number}: expected 'KEY read' or 'KEY write'")
            if len(parts[0]) < MIN_KEY_LENGTH:
                raise ValueError(f"{path}, line {number}: keys have at least {MIN_KEY_LENGTH} characters "
                                 f"(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
            entries.append((_digest(parts[0]), parts[1]))
        if not entries:
            raise ValueError(f"{path}: no keys")
        return cls(tuple(entries))

    def role_of(self, key: str | None) -> str | None:
        """The role of ``key``, or None; every configured key is compared, in constant time."""
        if key is None:
            return None
        offered = _digest(key)
        found = None
        for digest, role in self.entries:
            if hmac.compare_digest(offered, digest) and found != "write":
                found = role
        return found

    def require(self, request: Request, role: str) -> None:
        """Raise 401 (no or unknown key) or 403 (a read key for a write) unless ``request`` may act as ``role``."""
        if not self.enabled or (role == "read" and not self.reads_need_a_key):
            return
        key = _offered_key(request)
        granted = self.role_of(key)
        if granted is None:
            raise HTTPException(401, "this service needs an API key (Authorization: Bearer KEY)" if key is None
                                else "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        if role == "write" and granted != "write":
            raise HTTPException(403, "this API key may read, not write")


def _offered_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("x-api-key") or None


def _digest(key: str) -> bytes:
    # Equal-length values for compare_digest, whatever the keys' lengths.
    return hashlib.sha256(key.encode("utf-8")).digest()


__all__ = ["ApiKeys", "ROLES"]
