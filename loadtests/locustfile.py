"""Locust scenario: what a mix of real clients does to the stack, through nginx over HTTPS.

Three user classes. Most users are shop clients, weighted like a small shop's traffic: mostly
catalogue reads, some orders (a few of them invalid, answered 422 on purpose), page views
that load the fingerprinted CSS/JS nginx serves, a few 404s and an occasional slow call. A
few hold WebSocket sessions on /ws/echo (connect, echo round trips, clean close, each timed
and named "/ws/echo [connect]", "/ws/echo [echo]", "/ws/echo [session]"; with request type
WS, which the cross-check leaves out: they are not HTTP requests) and a few consume
server-sent events from /api/events (timed until the stream begins, failed unless every
event arrives in order). Expected non-2xx answers are
marked as successes (`catch_response`), anything else as a failure naming what was expected.
Requests are named by route template ("/api/items/{item_id}"), with a tag for the expected
non-2xx variant ("/api/orders [422]"), so `loadtests.gate` can tell which reach the app.

TLS is verified against the stack's certificate (--ca-file / LOADTEST_CA_FILE), never off.

Bounded however it is started (`python -m loadtests`, the compose web UI, plain `locust`):
- requests: each worker stops its users after its share of --max-requests
  (LOADTEST_MAX_REQUESTS), and the master stops the test when the total reaches it;
- time: the master stops the test --time-limit (LOADTEST_DURATION) after it started, plus a
  grace in headless mode where --run-time normally ends it first.
Custom options are sent by the master to its workers, so they are configured in one place.
"""

from __future__ import annotations

import logging
import math
import random
import re
import ssl
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
import gevent.ssl
import websocket  # websocket-client: blocking sockets, which gevent makes cooperative
from gevent.lock import Semaphore
from locust import FastHttpUser, User, events, task
from locust.exception import StopUser
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, WorkerRunner

if __package__ in (None, ""):  # loaded by path (`locust -f`): make `loadtests` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.settings import RunSettings, SettingsError, load_settings, parse_duration

if TYPE_CHECKING:
    from locust.env import Environment

log = logging.getLogger("loadtest")

ITEM_IDS = range(1, 51)  # the example catalogue (contract: ids 1..50)
UNKNOWN_ITEM_ID = 999_999
WS_PATH = "/ws/echo"
WS_REQUEST_TYPE = "WS"  # Locust's "method" column for WebSocket steps (gate.NOT_HTTP)
WS_MESSAGES = 10  # echo round trips per session
# Close codes after which a session counts as a success (RFC 6455 7.4.1): normal closure,
# going away, and the service restart a deploy or reload sends (the user reconnects).
WS_CLEAN_CLOSES = frozenset({1000, 1001, 1012})
SSE_EVENTS = 5  # events per stream
SSE_INTERVAL = 0.02  # seconds between them: a stream is over before a stopping test waits
HEADLESS_GRACE_S = 15  # --run-time ends a headless run; the guard is only the safety net


class _Process:
    """What this Locust process (master, worker or local) keeps between events."""

    environment: Environment | None = None
    sent = 0  # requests made by this process (a worker: against its share of the budget)
    assets: dict[str, list[str]] | None = None  # /static/ files linked from index.html


_process = _Process()


def _defaults() -> RunSettings:
    """The run parameters from their one loader (slo.toml, then LOADTEST_* overrides)."""
    try:
        return load_settings().run
    except SettingsError as exc:
        raise SystemExit(f"loadtest: invalid setting: {exc}") from None


def _add_options(parser: Any) -> None:
    """The locustfile's own options. Their defaults come from loadtests.settings, the one
    parser of slo.toml and the LOADTEST_* variables (`python -m loadtests` passes them
    explicitly; a plain `locust -f` gets the same values); the master sends them to its
    workers."""
    run = _defaults()
    parser.add_argument(
        "--ca-file",
        default=str(run.ca_file or ""),
        help="PEM file of the CA / self-signed certificate to trust for the target",
    )
    parser.add_argument(
        "--server-name",
        default=run.server_name or "",
        help="Host header, TLS SNI and certificate name when --host names another address "
        "(e.g. --host https://nginx:8443 --server-name localhost inside compose)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=run.max_requests,
        help="Stop the test after this many requests in total",
    )
    parser.add_argument(
        "--time-limit",
        type=parse_duration,
        default=run.duration_s,
        help="Stop the test this long after it started (also in web UI mode)",
    )
    parser.add_argument(
        "--wait-min",
        type=float,
        default=run.wait_min,
        help="Minimum think time between a user's tasks, seconds",
    )
    parser.add_argument(
        "--wait-max",
        type=float,
        default=run.wait_max,
        help="Maximum think time between a user's tasks, seconds",
    )
    parser.add_argument(
        "--slow-seconds",
        type=float,
        default=run.slow_seconds,
        help="Delay the occasional /api/slow call asks for",
    )


def _options() -> Any:
    environment = _process.environment
    if environment is None or environment.parsed_options is None:
        raise RuntimeError("locustfile options read before Locust's init event")
    return environment.parsed_options


def _on_init(environment: Environment, **_: Any) -> None:
    _process.environment = environment


# --- the request budget -------------------------------------------------------------------


def _count(**_: Any) -> None:
    _process.sent += 1


def _share_of_budget() -> int:
    """This process' share: the whole budget locally, 1/expected-workers on a worker."""
    opts = _options()
    runner = _process.environment.runner if _process.environment else None
    budget = int(opts.max_requests)
    if isinstance(runner, WorkerRunner):
        return math.ceil(budget / max(1, int(getattr(opts, "expect_workers", 1) or 1)))
    return budget


def _stop_test(environment: Environment, reason: str) -> None:
    runner = environment.runner
    if runner is None:
        return
    log.warning("%s, stopping the test", reason)
    if environment.parsed_options is not None and environment.parsed_options.headless:
        runner.quit()
    else:
        runner.stop()  # web UI: stop the load, keep the report


def _guard(environment: Environment) -> None:
    """Master (or a local run): stop at the request budget or past the time limit."""
    opts = environment.parsed_options
    runner = environment.runner
    if opts is None or runner is None:
        return
    limit_s = opts.time_limit + (HEADLESS_GRACE_S if opts.headless else 0)
    started = time.monotonic()
    while runner.state not in (STATE_STOPPING, STATE_STOPPED, STATE_CLEANUP):
        if runner.stats.total.num_requests >= opts.max_requests:
            _stop_test(environment, f"request budget of {opts.max_requests} reached")
            return
        if time.monotonic() - started > limit_s:
            _stop_test(environment, f"time limit of {limit_s}s reached")
            return
        gevent.sleep(0.5)


def _on_test_start(environment: Environment, **_: Any) -> None:
    _process.sent = 0  # a new test (the web UI allows several) gets a fresh budget
    if not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(_guard, environment)


# --- TLS and the static assets -----------------------------------------------------------


class _ServerNameContext(gevent.ssl.SSLContext):  # type: ignore[misc]
    """Sends `server_name` as SNI and verifies the certificate against it, whatever address
    the connection goes to (geventhttpclient would use the URL's host)."""

    server_name: str | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        if self.server_name:
            kwargs["server_hostname"] = self.server_name
        return super().wrap_socket(sock, *args, **kwargs)


def _ssl_context(cafile: str | None = None, **_: Any) -> gevent.ssl.SSLContext:
    """Verifying context that trusts the stack's certificate (geventhttpclient passes its
    default bundle as `cafile`; ours replaces it). Same defaults as create_default_context."""
    del cafile
    opts = _options()
    context = _ServerNameContext(gevent.ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    if opts.ca_file:
        context.load_verify_locations(cafile=opts.ca_file)
    else:
        context.load_default_certs()
    context.server_name = opts.server_name or None
    return context


_assets_lock = Semaphore()
_ASSET_RE = re.compile(r"""(?:href|src)\s*=\s*["'](/static/[^"'?#\s]+)""")


def discover_assets(index_html: str) -> dict[str, list[str]]:
    """The /static/ files index.html links, grouped: {"css": [...], "js": [...], "other": [...]}."""
    found: dict[str, list[str]] = {"css": [], "js": [], "other": []}
    for path in dict.fromkeys(_ASSET_RE.findall(index_html)):
        kind = "css" if path.endswith(".css") else "js" if path.endswith(".js") else "other"
        found[kind].append(path)
    return found


def _load_assets(client: Any, host: str) -> dict[str, list[str]]:
    """Fetch index.html once per process and remember the assets it links.

    Through the user's client, so it is verified like every other request and counted in
    Locust's stats as "/ [discovery]" (once per process): the cross-check still adds up when
    the app itself serves "/" (no nginx in front).
    """
    with _assets_lock:
        if _process.assets is None:
            response = client.get("/", name="/ [discovery]")
            response.raise_for_status()
            assets = discover_assets(response.text or "")
            if not (assets["css"] or assets["js"]):
                log.warning("index.html at %s links no /static/ CSS or JS: pages load / only", host)
            else:
                log.info("static assets linked from index.html: %s", assets)
            _process.assets = assets
        return _process.assets


def _asset_name(path: str) -> str:
    """Fingerprints change every build; name the request by its kind."""
    if path.startswith("/static/css/"):
        return "/static/css/{asset}"
    if path.startswith("/static/js/"):
        return "/static/js/{asset}"
    return "/static/{asset}"


# Locust's event hooks, registered through Any: EventHook.add_listener is untyped.
_events: Any = events
_events.init_command_line_parser.add_listener(_add_options)
_events.init.add_listener(_on_init)
_events.request.add_listener(_count)
_events.test_start.add_listener(_on_test_start)


def _describe(response: Any) -> str:
    """Status plus a JSON body's start (error pages of nginx are HTML: status only)."""
    if not response.status_code:
        return f"no response ({response.error})"
    text = " ".join((response.text or "").split())
    return (
        f"{response.status_code} {text[:100]}"
        if text.startswith("{")
        else str(response.status_code)
    )


# --- the user -----------------------------------------------------------------------------


class ShopUser(FastHttpUser):
    """A client of the example shop, through nginx like any browser or API consumer."""

    # Every user but the WebSocket and event-stream users' fixed_count.

    insecure = False  # verify certificates and host names
    ssl_context_factory = staticmethod(_ssl_context)
    network_timeout = 40.0  # above nginx's proxy_read_timeout (35 s): nginx answers first
    connection_timeout = 5.0
    default_headers = {"User-Agent": "locust-loadtest"}  # noqa: RUF012 - Locust's attribute

    def __init__(self, environment: Environment) -> None:
        server_name = _options().server_name
        if server_name:  # the TLS side is _ServerNameContext's
            self.default_headers = {**self.default_headers, "Host": server_name}
        super().__init__(environment)

    def wait_time(self) -> float:
        opts = _options()
        return random.uniform(opts.wait_min, opts.wait_max)

    def on_start(self) -> None:
        self.assets = _load_assets(self.client, self.host or "")

    def _expect(self, method: str, path: str, name: str, status: int, **kwargs: Any) -> Any:
        if _process.sent >= _share_of_budget():
            raise StopUser()
        with self.client.request(
            method, path, name=name, catch_response=True, **kwargs
        ) as response:
            if response.status_code == status:
                response.success()
            else:
                response.failure(f"expected {status}, got {_describe(response)}")
            return response

    # Weights: relative frequency of each task; a page view makes 1 + len(assets) requests.

    @task(20)
    def hello(self) -> None:
        self._expect("GET", "/api/hello", "/api/hello", 200)

    @task(10)
    def list_items(self) -> None:
        self._expect("GET", "/api/items", "/api/items", 200)

    @task(25)
    def get_item(self) -> None:
        item_id = random.choice(ITEM_IDS)
        self._expect("GET", f"/api/items/{item_id}", "/api/items/{item_id}", 200)

    @task(8)
    def place_order(self) -> None:
        order = {"item_id": random.choice(ITEM_IDS), "quantity": random.randint(1, 5)}
        self._expect("POST", "/api/orders", "/api/orders", 201, json=order)

    @task(2)
    def place_invalid_order(self) -> None:
        order = {"item_id": 0, "quantity": 1000}  # both fields out of range
        self._expect("POST", "/api/orders", "/api/orders [422]", 422, json=order)

    @task(6)
    def page_view(self) -> None:
        self._expect("GET", "/", "/", 200)
        for path in self.assets["css"] + self.assets["js"]:
            self._expect("GET", path, _asset_name(path), 200)

    @task(2)
    def unknown_item(self) -> None:
        self._expect("GET", f"/api/items/{UNKNOWN_ITEM_ID}", "/api/items/{item_id} [404]", 404)

    @task(1)
    def missing_static_file(self) -> None:
        self._expect("GET", "/static/css/missing.00000000.css", "/static/{asset} [404]", 404)

    @task(1)
    def slow(self) -> None:
        seconds = _options().slow_seconds
        self._expect("GET", f"/api/slow?seconds={seconds:g}", "/api/slow", 200)


# --- long-lived connections ---------------------------------------------------------------


def _fire(name: str, started: float, exception: Exception | None = None, length: int = 0) -> None:
    """Report one WebSocket step to Locust's statistics."""
    environment = _process.environment
    if environment is None:
        return
    environment.events.request.fire(  # type: ignore[no-untyped-call]
        request_type=WS_REQUEST_TYPE,
        name=name,
        response_time=(time.perf_counter() - started) * 1000,
        response_length=length,
        exception=exception,
        context={},
    )


class WebSocketSessionError(Exception):
    """A session that did not end cleanly: the message says how."""


class WebSocketUser(User):
    """A WebSocket client of /ws/echo: opens a session, makes WS_MESSAGES echo round trips
    (one per task, think time between them), closes it normally; then the next session.
    One round trip per task keeps a stopping test quick: Locust lets a user finish its task.

    The client is websocket-client (blocking sockets; Locust's gevent makes them
    cooperative), with the same verified TLS, SNI and Host as the shop users.
    """

    fixed_count = 2  # of LOADTEST_USERS, whatever their number

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.ws: websocket.WebSocket | None = None
        self.session_started = 0.0
        self.echoes = 0

    def wait_time(self) -> float:
        opts = _options()
        return random.uniform(opts.wait_min, opts.wait_max)

    def _url(self) -> str:
        host = (self.host or "").rstrip("/")
        return re.sub(r"^http", "ws", host, count=1) + WS_PATH

    def _open(self) -> None:
        opts = _options()
        sslopt: dict[str, Any] = {}
        if self._url().startswith("wss:"):
            sslopt = {"context": ssl.create_default_context(cafile=opts.ca_file or None)}
            if opts.server_name:
                sslopt["server_hostname"] = opts.server_name
        self.session_started = started = time.perf_counter()
        self.echoes = 0
        try:
            self.ws = websocket.create_connection(
                self._url(),
                timeout=ShopUser.network_timeout,
                sslopt=sslopt,
                host=opts.server_name or None,
                header={"User-Agent": "locust-loadtest"},
            )
        except Exception as error:  # noqa: BLE001 - every way to fail counts, with its reason
            _fire(f"{WS_PATH} [connect]", started, error)
            self._end(WebSocketSessionError(f"handshake failed: {error!r}"))
            return
        _fire(f"{WS_PATH} [connect]", started)

    def _end(self, failure: Exception | None) -> None:
        """The session is over: report it, drop the connection."""
        _fire(f"{WS_PATH} [session]", self.session_started, failure)
        if self.ws is not None:
            self.ws.shutdown()  # type: ignore[no-untyped-call]
            self.ws = None

    def _close(self) -> None:
        """Close normally (1000) and wait for the server's close frame."""
        if self.ws is None:
            return
        try:
            self.ws.close(status=websocket.STATUS_NORMAL)
        except Exception as error:  # noqa: BLE001 - a close that fails fails the session
            self._end(WebSocketSessionError(f"close failed: {error!r}"))
            return
        self._end(None)

    @task
    def echo(self) -> None:
        if _process.sent >= _share_of_budget():
            raise StopUser()
        if self.ws is None:
            self._open()
            if self.ws is None:
                return
        text = f"locust {self.echoes} {random.getrandbits(64):016x}"
        started = time.perf_counter()
        try:
            self.ws.send(text)
            answer = _receive(self.ws)
        except Exception as error:  # noqa: BLE001 - timeouts, resets
            self._end(WebSocketSessionError(repr(error)))
            return
        if isinstance(answer, int):  # the server closed the session
            clean = answer in WS_CLEAN_CLOSES
            self._end(None if clean else WebSocketSessionError(f"closed by the server: {answer}"))
            return
        if answer != text:
            self._end(WebSocketSessionError(f"echo {answer!r} for {text!r}"))
            return
        _fire(f"{WS_PATH} [echo]", started, length=len(answer))
        self.echoes += 1
        if self.echoes >= WS_MESSAGES:
            self._close()

    def on_stop(self) -> None:
        if self.ws is not None:
            self._close()


def _receive(ws: websocket.WebSocket) -> str | int:
    """The next text message, or the close code if the server closed the session (pings
    are answered on the way)."""
    opcode, frame = ws.recv_data_frame()
    if opcode == websocket.ABNF.OPCODE_CLOSE:
        data = frame.data or b""
        return int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
    return bytes(frame.data).decode("utf-8")


class EventStreamUser(FastHttpUser):
    """A consumer of server-sent events: one stream of SSE_EVENTS events at a time, timed
    until the stream begins; it fails unless every event arrives, in order."""

    fixed_count = 2  # of LOADTEST_USERS
    insecure = False
    ssl_context_factory = staticmethod(_ssl_context)
    network_timeout = ShopUser.network_timeout
    connection_timeout = ShopUser.connection_timeout
    default_headers = ShopUser.default_headers

    def __init__(self, environment: Environment) -> None:
        server_name = _options().server_name
        if server_name:
            self.default_headers = {**self.default_headers, "Host": server_name}
        super().__init__(environment)

    def wait_time(self) -> float:
        opts = _options()
        return random.uniform(opts.wait_min, opts.wait_max)

    @task
    def stream(self) -> None:
        if _process.sent >= _share_of_budget():
            raise StopUser()
        path = f"/api/events?count={SSE_EVENTS}&interval={SSE_INTERVAL:g}"
        with self.client.get(path, name="/api/events", stream=True, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"expected 200, got {_describe(r)}")
                return
            body = b"".join(r.iter_content(chunk_size=4096, decode_content=False))
            lines = body.decode("utf-8", "replace").splitlines()
            ids = [line.removeprefix("id:").strip() for line in lines if line.startswith("id:")]
            if ids != [str(n) for n in range(SSE_EVENTS)]:
                r.failure(f"events {ids}, expected ids 0..{SSE_EVENTS - 1}")
            else:
                r.success()
