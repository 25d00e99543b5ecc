"""Request ids: accept a well-formed incoming `X-Request-ID`, otherwise make one.

nginx sets the header (its own `$request_id` unless the client sent a well-formed one), so
behind the proxy the app sees the same id that nginx logs. Only short tokens of letters,
digits, `.`, `_` and `-` are accepted: anything else could forge log lines or blow up
log storage, and is replaced.
"""

from __future__ import annotations

import random
import re

__all__ = ["HEADER", "MAX_LENGTH", "accept_or_generate", "generate", "is_valid"]

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
