"""W3C Trace Context: continue a well-formed incoming `traceparent`, otherwise start a trace.

nginx sends every request a `traceparent` (the client's when well-formed, else one it makes
with its 32-hex `$request_id` as the trace id), so behind the proxy the app continues the
trace nginx logged. The app is one span of that trace: it makes its own span id, binds
`trace_id` and `span_id` in the log context, passes `00-<trace>-<its span>-<flags>` on to
the app (so an outgoing call made from the request's headers is its child) and returns it.

A malformed header (wrong length, upper case, all-zero ids, version ff) is never trusted:
a new trace starts and the `tracestate` that came with it is dropped, as the spec says.
https://www.w3.org/TR/trace-context/#traceparent-header
"""

from __future__ import annotations

import random
import re
from typing import NamedTuple

__all__ = [
    "HEADER",
    "STATE_HEADER",
    "Span",
    "TraceParent",
    "begin",
    "format_header",
    "is_trace_id",
    "new_span_id",
    "new_trace_id",
    "parse",
]

HEADER = b"traceparent"
STATE_HEADER = b"tracestate"
# Version 00 is exactly 55 characters; a later version may append "-<more>" (spec 3.2.4).
# No header of ours needs more than this; longer ones are not worth a regex.
_MAX_LENGTH = 256
_FORMAT = re.compile(
    rb"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})"
    rb"-(?P<flags>[0-9a-f]{2})(?P<rest>-[\x21-\x7e]*)?"
)
_HEX32 = re.compile(r"[0-9a-f]{32}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_SAMPLED = 0x01


class TraceParent(NamedTuple):
    """What a valid incoming `traceparent` says."""

    trace_id: str
    parent_id: str  # the caller's span
    sampled: bool


def parse(value: bytes | None) -> TraceParent | None:
    """The incoming header when valid per the spec, else None (start a new trace)."""
    if value is None or len(value) > _MAX_LENGTH:
        return None
    match = _FORMAT.fullmatch(value)
    if match is None:
        return None
    version = match["version"]
    if version == b"ff" or (version == b"00" and match["rest"] is not None):
        return None
    trace_id = match["trace_id"].decode()
    parent_id = match["parent_id"].decode()
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, parent_id, bool(int(match["flags"], 16) & _SAMPLED))


def new_trace_id() -> str:
    """32 hex digits, never all zero. Not a secret: `random` is enough (see request_id)."""
    return f"{random.getrandbits(128) or 1:032x}"


def new_span_id() -> str:
    """16 hex digits, never all zero."""
    return f"{random.getrandbits(64) or 1:016x}"


def format_header(trace_id: str, span_id: str, sampled: bool) -> bytes:
    """`traceparent` version 00 for a span of ours."""
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}".encode("ascii")


def is_trace_id(value: str) -> bool:
    """Whether a string can serve as a trace id as it is (nginx's $request_id can)."""
    return len(value) == 32 and value != _ZERO_TRACE and _HEX32.fullmatch(value) is not None


class Span(NamedTuple):
    """This request's span: its ids, and whether the incoming context was kept."""

    trace_id: str
    span_id: str
    sampled: bool
    parent: TraceParent | None  # None: the trace starts here

    @property
    def header(self) -> bytes:
        return format_header(self.trace_id, self.span_id, self.sampled)


def begin(incoming: bytes | None, request_id: str) -> Span:
    """The span of a request: continues a valid incoming trace, else starts one.

    A new trace takes the request id as its trace id when it is one (32 hex, as nginx's
    and ours are), so without nginx in front one id still finds both; else a fresh id.
    """
    parent = parse(incoming)
    if parent is None:
        trace_id = request_id if is_trace_id(request_id) else new_trace_id()
        return Span(trace_id, new_span_id(), True, None)
    return Span(parent.trace_id, new_span_id(), parent.sampled, parent)
