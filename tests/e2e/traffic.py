"""A bounded, paced stream of reads and writes through nginx that counts every failure.

Every zero-loss claim of the stack (reload, deploy, scale, certificate renewal, an
orchestrator's rolling update) is tested the same way: start `PacedTraffic` against the
stack's public HTTPS port, make the change, stop the traffic, and assert that `failures`
is empty and that enough requests went through for the claim to mean something.

- Paced: `streams` keep-alive clients (as browsers are) each send one request every
  `interval` seconds, alternating `GET /api/items/{id}` (200) and `POST /api/orders` (201),
  so the stream stays under the rate limit and the only failures it can see are the
  change's. POSTs matter: nginx never retries a non-idempotent request on another upstream.
- Bounded: it stops by itself after `duration` seconds or `max_requests` requests,
  whichever comes first, even if the test never calls `stop()`.
- Counted: each request is recorded with its start time, status, latency and request id
  (`X-Request-ID`), so a test can find it in nginx's and the app's logs (for example which
  upstream served it).
- Tests of a change that reloads nginx (scale, deploy, certificate, `make reload`) pass
  `retry_unanswered=True` and assert `lost(stack.nginx_request_ids()) == []`. A graceful
  reload closes nginx's idle HTTP/1.1 keep-alive connections, and a request sent on one
  at that instant gets no response: a race HTTP/1.1 cannot close (RFC 9112 9.3.1; HTTP/2
  has GOAWAY). Browsers retry such a request on a new connection; so does this client,
  once, and only when it went out on a reused connection and not one byte came back. The
  retry is safe only if the first attempt was never applied (RFC 9110 9.2.2, POST): `lost`
  holds the test to that, from nginx's access log (nginx logs every request it read). A
  request nginx read and did not answer is lost; so is any other failure. Measured on
  this host: 5 such races in 310 reloads with two streams (issue 8/9 note).
"""

from __future__ import annotations

import dataclasses
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import TracebackType

__all__ = ["Outcome", "PacedTraffic"]


@dataclass(frozen=True)
class Outcome:
    """One request of the stream."""

    started: float  # time.monotonic() when it was sent
    method: str
    path: str
    status: int | None  # None: no response (connection refused, reset, timeout)
    ok: bool
    seconds: float
    request_id: str
    error: str = ""
    retry_of: str = ""  # the request id of an unanswered first attempt (retry_unanswered)


@dataclass
class PacedTraffic:
    """Run GET/POST streams in threads until stopped or bounded; see the module docstring.

    `client_factory` returns a new httpx.Client with the base URL and TLS trust of the stack
    (`Stack.client`). Use as a context manager, or call `start()` and `stop()`.
    """

    client_factory: Callable[[], httpx.Client]
    streams: int = 2
    interval: float = 0.12  # per stream; 2 streams ~16 requests/s, under RATE_LIMIT 20r/s
    duration: float = 60.0
    max_requests: int = 2000
    retry_unanswered: bool = False  # see the module docstring; the test must check `lost`
    outcomes: list[Outcome] = field(default_factory=list)
    unanswered: list[Outcome] = field(default_factory=list)  # first attempts, retried
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _threads: list[threading.Thread] = field(default_factory=list, repr=False)

    # ── control ──────────────────────────────────────────────────────────────
    def start(self) -> PacedTraffic:
        deadline = time.monotonic() + self.duration
        self._threads = [
            threading.Thread(target=self._stream, args=(i, deadline), daemon=True)
            for i in range(self.streams)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> PacedTraffic:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self

    def __enter__(self) -> PacedTraffic:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def wait_for(self, count: int, timeout: float = 30) -> None:
        """Block until at least `count` more requests have completed (or fail)."""
        target = len(self.outcomes) + count
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"traffic stalled: {len(self.outcomes)}/{target} requests")
            time.sleep(0.05)

    # ── results ──────────────────────────────────────────────────────────────
    @property
    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]

    @property
    def succeeded(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.ok]

    def since(self, moment: float) -> list[Outcome]:
        """Requests sent at or after `moment` (a time.monotonic() value)."""
        with self._lock:
            return [o for o in self.outcomes if o.started >= moment]

    def lost(self, reached: set[str]) -> list[Outcome]:
        """Failed requests, and unanswered first attempts that reached nginx after all
        (`reached`: the request ids in nginx's access log): the retry was not safe."""
        with self._lock:
            retried = [o for o in self.unanswered if o.request_id in reached]
        return self.failures + retried

    def summary(self) -> str:
        fails = self.failures
        shown = "; ".join(f"{o.method} {o.path} -> {o.status or o.error}" for o in fails[:10])
        text = f"{len(self.outcomes)} requests, {len(fails)} failed" + (
            f": {shown}" if fails else ""
        )
        if self.unanswered:
            text += f"; {len(self.unanswered)} retried after an idle keep-alive close: " + (
                "; ".join(f"{o.method} {o.path} {o.request_id}" for o in self.unanswered[:10])
            )
        return text

    # ── the streams ──────────────────────────────────────────────────────────
    def _stream(self, index: int, deadline: float) -> None:
        with self.client_factory() as client:  # keep-alive, like a browser
            n = 0
            while not self._stop.is_set() and time.monotonic() < deadline:
                with self._lock:
                    if len(self.outcomes) >= self.max_requests:
                        return
                n += 1
                self._one(client, index, n)
                self._stop.wait(self.interval)

    def _one(self, client: httpx.Client, index: int, n: int) -> None:
        rid = f"traffic-{index}-{n}-{uuid.uuid4().hex[:8]}"
        item = (n % 50) + 1
        if n % 2:
            method, path, expected = "GET", f"/api/items/{item}", 200
            body = None
        else:
            method, path, expected = "POST", "/api/orders", 201
            body = {"item_id": item, "quantity": 1, "note": f"stream {index}"}
        outcome = self._attempt(client, method, path, body, expected, rid)
        if outcome.error.startswith("unanswered on a reused connection") and self.retry_unanswered:
            with self._lock:
                self.unanswered.append(outcome)
            retry = self._attempt(client, method, path, body, expected, f"{rid}-retry")
            outcome = dataclasses.replace(retry, started=outcome.started, retry_of=rid)
        with self._lock:
            self.outcomes.append(outcome)

    def _attempt(
        self,
        client: httpx.Client,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        expected: int,
        rid: str,
    ) -> Outcome:
        events: list[str] = []

        def trace(name: str, info: dict[str, Any]) -> None:
            events.append(name)

        kwargs: dict[str, Any] = {"headers": {"X-Request-ID": rid}, "extensions": {"trace": trace}}
        if body is not None:
            kwargs["json"] = body
        started = time.monotonic()
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            # The server closed a kept-alive connection as the request went out on it:
            # no new connection for this request and no response header came back.
            reused = not any(e.startswith("connection.connect_tcp") for e in events)
            unanswered = reused and isinstance(
                error, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
            )
            unanswered = unanswered and "http11.receive_response_headers.complete" not in events
            what = "unanswered on a reused connection: " if unanswered else ""
            return Outcome(
                started,
                method,
                path,
                None,
                False,
                time.monotonic() - started,
                rid,
                what + repr(error),
            )
        else:
            ok = response.status_code == expected
            outcome = Outcome(
                started,
                method,
                path,
                response.status_code,
                ok,
                time.monotonic() - started,
                rid,
                "" if ok else response.text[:200],
            )
        return outcome
