"""Locust scenario: what a mix of real clients does to the stack, through nginx over HTTPS.

One user class, weighted like a small shop's traffic: mostly catalogue reads, some orders
(a few of them invalid, answered 422 on purpose), page views that load the fingerprinted
CSS/JS nginx serves, a few 404s and an occasional slow call. Expected non-2xx answers are
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
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gevent
import gevent.ssl
from gevent.lock import Semaphore
from locust import FastHttpUser, events, task
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
