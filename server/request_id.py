"""Request ids: accept a well-formed incoming `X-Request-ID`, otherwise make one.

nginx sets the header (its own `$request_id` unless the client sent a well-formed one), so
behind the proxy the app sees the same id that nginx logs. Only short tokens of letters,
digits, `.`, `_` and `-` are accepted: anything else could forge log lines or blow up
log storage, and is replaced.
"""

from __future__ import annotations

import random
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["HEADER", "MAX_LENGTH", "accept_or_generate", "for_scope", "generate", "is_valid"]

HEADER = b"x-request-id"
MAX_LENGTH = 128
_VALID = re.compile(rb"[A-Za-z0-9._-]{1,%d}" % MAX_LENGTH)


def generate() -> str:
    """A new id: 32 hex characters, like nginx's `$request_id`.

    An id correlates log lines; it is no secret, so the `random` module's generator does
    (`secrets` costs a getrandom(2) syscall per request). Python reseeds it in every
    forked worker, so workers never repeat each other's ids.
    """
    return f"{random.getrandbits(128):032x}"


def is_valid(value: bytes) -> bool:
    return _VALID.fullmatch(value) is not None


def accept_or_generate(value: bytes | None) -> str:
    """The incoming id when well-formed, else a fresh one."""
    if value is not None and _VALID.fullmatch(value) is not None:
        return value.decode("ascii")
    return generate()


def for_scope(scope: MutableMapping[str, Any]) -> tuple[str, bytes]:
    """The id of an http or websocket request: the incoming one when well-formed, else a
    fresh one, which then replaces the header so the app reads the id it is logged under.
    """
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    incoming = None
    for name, value in headers:
        if name == HEADER:
            incoming = value
            break
    rid = accept_or_generate(incoming)
    rid_bytes = rid.encode("ascii")
    if incoming != rid_bytes:
        scope["headers"] = [h for h in headers if h[0] != HEADER]
        scope["headers"].append((HEADER, rid_bytes))
    return rid, rid_bytes
