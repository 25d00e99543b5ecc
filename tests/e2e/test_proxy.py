"""nginx at the edge, end to end: what a client sees through the published ports.

Runs against the real compose stack (tests/e2e/conftest.py brings it up). Every check
talks to nginx from the host the way a user would (TLS with the stack's own certificate,
verified), and reads the nginx and app containers' logs to prove who answered.
Config: nginx/ (one concern per file); settings: nginx/docker-entrypoint.sh.
"""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "app" / "static"
GENERATED_ID = re.compile(r"[0-9a-f]{32}")
SECURITY_HEADERS = {
    "strict-transport-security": "max-age=63072000",  # includeSubDomains is opt-in
    "x-content-type-options": "nosniff",
    "content-security-policy": "frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "referrer-policy": "strict-origin-when-cross-origin",
}
IMMUTABLE = "public, max-age=31536000, immutable"
# nginx/docker-entrypoint.sh's default, unless the stack sets RATE_LIMIT_BURST.
DEFAULT_RATE_LIMIT_BURST = 40


# ── the stack, seen from nginx's side ───────────────────────────────────────


@dataclass
class Edge:
    """nginx of the shared stack (tests/e2e/conftest.py `stack`), plus what these tests need:
    waiting for a log record, commands fed on stdin, ALPN, SNI `localhost` by default."""

    stack: Stack

    @property
    def http_port(self) -> int:
        return self.stack.http_port

    @property
    def https_port(self) -> int:
        return self.stack.https_port

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def container(self, service: str) -> str:
        return self.stack.container_id(service)

    def exec(self, service: str, *cmd: str, stdin: str | None = None) -> str:
        proc = subprocess.run(
            ["docker", "exec", "-i", self.container(service), *cmd],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"{cmd} in {service} failed: {proc.stderr}"
        return proc.stdout

    def records(self, service: str) -> list[dict[str, Any]]:
        return self.stack.records(service)

    def wait_record(
        self, service: str, match: Callable[[dict[str, Any]], bool], timeout: float = 10
    ) -> dict[str, Any]:
        """The first log record of `service` that `match`es, waiting for it to be written."""
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.records(service) if match(r)]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no {service} log record matched within {timeout}s")
            time.sleep(0.2)

    def env(self, service: str) -> dict[str, str]:
        return self.stack.environment(service)

    @property
    def burst(self) -> int:
        return int(self.env("nginx").get("RATE_LIMIT_BURST") or DEFAULT_RATE_LIMIT_BURST)

    def ssl_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        ctx = self.stack.ssl_context()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), timeout=15, **kwargs)


def ports_of(edge: Edge, service: str) -> str:
    proc = subprocess.run(
        ["docker", "port", edge.container(service)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return proc.stdout


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Edge:
    return Edge(stack)


@pytest.fixture
def client(edge: Edge) -> Iterator[httpx.Client]:
    with edge.client() as c:
        yield c


def new_id() -> str:
    return f"test-{uuid.uuid4().hex}"


def by_id(rid: str) -> Callable[[dict[str, Any]], bool]:
    """A log-record matcher for one request id."""
    return lambda record: record.get("request_id") == rid


def static_asset(directory: str, suffix: str) -> str:
    """The URL path of the fingerprinted asset in app/static/<directory>/."""
    (path,) = sorted((STATIC / directory).glob(f"*{suffix}"))
    return "/static/" + path.relative_to(STATIC).as_posix()


def tls_handshake(
    edge: Edge, ctx: ssl.SSLContext, server_hostname: str | None = "localhost"
) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", edge.https_port), timeout=10)
    try:
        return ctx.wrap_socket(sock, server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise


def raw_exchange(sock: socket.socket, request: bytes, timeout: float = 10) -> bytes:
    """Send a request, read until the server closes (or `timeout`): all it answered."""
    sock.settimeout(timeout)
    sock.sendall(request)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, ssl.SSLError):
        pass
    return b"".join(chunks)


def legacy_client_context(version: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that offers only `version`, with OpenSSL's client-side floor removed
    (@SECLEVEL=0), so a refusal can only come from the server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
        ctx.maximum_version = version
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


# ── routing: the app behind nginx, static files from nginx ─────────────────


def test_api_is_proxied_to_the_app(edge: Edge, client: httpx.Client) -> None:
    rid = new_id()
    r = client.get("/api/hello", headers={"X-Request-ID": rid})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["message"] == "hello"
    line = edge.wait_record("nginx", by_id(rid))
    assert line["upstream_addr"].endswith(":8000"), line
    assert line["upstream_status"] == "200"


@pytest.mark.parametrize("path", ["/docs", "/openapi.json", "/healthz", "/readyz"])
def test_app_routes_are_proxied(edge: Edge, client: httpx.Client, path: str) -> None:
    rid = new_id()
    r = client.get(path, headers={"X-Request-ID": rid})
    assert r.status_code == 200, r.text
    line = edge.wait_record("nginx", by_id(rid))
    assert line["upstream_addr"].endswith(":8000"), line


def test_static_files_come_from_nginx_never_the_app(edge: Edge, client: httpx.Client) -> None:
    css, js = static_asset("css", ".css"), static_asset("js", ".js")
    cases = {
        "/": ("text/html", "<title>"),
        css: ("text/css", None),
        js: ("javascript", None),
        "/static/favicon.svg": ("image/svg+xml", "<svg"),
    }
    ids = {}
    for path, (content_type, marker) in cases.items():
        rid = ids[path] = new_id()
        r = client.get(path, headers={"X-Request-ID": rid})
        assert r.status_code == 200, path
        assert content_type in r.headers["content-type"], (path, r.headers)
        expected = (
            (STATIC / "index.html") if path == "/" else STATIC / path.removeprefix("/static/")
        )
        assert r.content == expected.read_bytes(), f"{path} is not the file from app/static"
        if marker:
            assert marker in r.text
    missing = ids["/static/missing.css"] = new_id()
    assert client.get("/static/missing.css", headers={"X-Request-ID": missing}).status_code == 404

    # Positive control: an API request in the same window does show up in the app's log.
    control = new_id()
    assert client.get("/api/hello", headers={"X-Request-ID": control}).status_code == 200
    edge.wait_record("app", by_id(control))

    for path, rid in ids.items():
        line = edge.wait_record("nginx", by_id(rid))
        assert line["upstream_addr"] == "", f"nginx proxied {path}: {line}"
    app_ids = {rec.get("request_id") for rec in edge.records("app")}
    assert not app_ids & set(ids.values()), "the app saw a static request"


# ── TLS, HTTP/2, redirect ───────────────────────────────────────────────────


def test_http_redirects_to_https_with_308(edge: Edge) -> None:
    with httpx.Client(timeout=10, follow_redirects=False) as plain:
        r = plain.get(f"http://127.0.0.1:{edge.http_port}/api/hello?x=1")
        assert r.status_code == 308
        assert r.headers["location"] == f"https://127.0.0.1:{edge.https_port}/api/hello?x=1"
        assert GENERATED_ID.fullmatch(r.headers["x-request-id"])
        # 308 keeps the method: a POST is redirected as a POST, not turned into a GET.
        post = plain.post(f"http://localhost:{edge.http_port}/api/orders", json={"item_id": 1})
        assert post.status_code == 308
        assert post.headers["location"] == f"https://localhost:{edge.https_port}/api/orders"
        # The health check path stays on plain HTTP.
        assert plain.get(f"http://127.0.0.1:{edge.http_port}/nginx-health").status_code == 204
    # The Location works: the redirect target answers over verified TLS.
    with edge.client() as c:
        assert c.get(r.headers["location"].replace("127.0.0.1", "localhost")).status_code == 200


def test_http2_is_negotiated_with_alpn(edge: Edge) -> None:
    with tls_handshake(edge, edge.ssl_context(["h2", "http/1.1"])) as tls:
        assert tls.selected_alpn_protocol() == "h2"
        # nginx really speaks HTTP/2: the connection preface and an empty SETTINGS
        # frame are answered with nginx's own SETTINGS frame (type 0x4, stream 0).
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0]))
        header = tls.recv(9)
        assert header[3] == 0x4, header
        assert int.from_bytes(header[5:9], "big") == 0
    with tls_handshake(edge, edge.ssl_context(["http/1.1"])) as tls:
        assert tls.selected_alpn_protocol() == "http/1.1"


def test_certificate_covers_localhost_and_the_ip(edge: Edge) -> None:
    # Verified against the stack's certificate; an IP literal sends no SNI (RFC 6066)
    # and must still be served (SERVER_NAMES has 127.0.0.1).
    for name in ("localhost", "127.0.0.1"):
        with tls_handshake(edge, edge.ssl_context(), server_hostname=name) as tls:
            assert tls.version() == "TLSv1.3"
            response = raw_exchange(
                tls,
                f"GET /api/hello HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode(),
            )
            assert response.startswith(b"HTTP/1.1 200"), response[:200]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_old_tls_versions_are_refused_by_the_server(edge: Edge, version: ssl.TLSVersion) -> None:
    with pytest.raises(ssl.SSLError) as refused:
        tls_handshake(edge, legacy_client_context(version)).close()
    # The server's alert, not a client-side "no protocols available".
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value).upper().replace(" ", "_"), refused.value


def test_tls12_and_tls13_are_accepted_with_aead_ciphers_only(edge: Edge) -> None:
    # The same permissive client as the refusal test connects with TLS 1.2 and 1.3.
    with tls_handshake(edge, legacy_client_context(ssl.TLSVersion.TLSv1_2)) as tls:
        assert tls.version() == "TLSv1.2"
        negotiated = tls.cipher()
        assert negotiated is not None
        cipher = negotiated[0]
        assert cipher.startswith("ECDHE-"), cipher
        assert "GCM" in cipher or "CHACHA20" in cipher, cipher
    with tls_handshake(edge, legacy_client_context(ssl.TLSVersion.TLSv1_3)) as tls:
        assert tls.version() == "TLSv1.3"
    # TLS 1.2 offering only CBC (non-AEAD) or static-RSA suites: no shared cipher.
    weak = legacy_client_context(ssl.TLSVersion.TLSv1_2)
    weak.set_ciphers(
        "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA:ECDHE-ECDSA-AES128-SHA256:"
        "ECDHE-RSA-AES128-SHA256:AES128-GCM-SHA256:AES128-SHA:@SECLEVEL=0"
    )
    with pytest.raises(ssl.SSLError):
        tls_handshake(edge, weak).close()


# ── headers and request ids ────────────────────────────────────────────────


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get_list(name) == [value], (response.url, name, response.headers)
    assert response.headers["server"] == "nginx", "server_tokens must hide the version"
    assert len(response.headers.get_list("x-request-id")) == 1


def test_security_headers_on_every_kind_of_response(client: httpx.Client) -> None:
    responses = {
        "static": client.get("/"),
        "proxied": client.get("/api/hello"),
        "app 404": client.get("/api/items/999999"),
        "nginx 404": client.get("/static/nope.css"),
        "metrics 404": client.get("/metrics"),
    }
    assert [r.status_code for r in responses.values()] == [200, 200, 404, 404, 404]
    for response in responses.values():
        assert_security_headers(response)


def test_request_id_is_the_same_in_response_nginx_log_and_app_log(
    edge: Edge, client: httpx.Client
) -> None:
    r = client.get("/api/hello", headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(rid), rid
    nginx_line = edge.wait_record("nginx", by_id(rid))
    app_line = edge.wait_record("app", by_id(rid))
    assert nginx_line["uri"] == "/api/hello"
    assert nginx_line["status"] == 200
    assert nginx_line["ssl_protocol"].startswith("TLSv1.")
    for key in (
        "timestamp",
        "remote_addr",
        "method",
        "bytes",
        "request_time",
        "upstream_addr",
        "upstream_response_time",
        "upstream_status",
        "http_user_agent",
        "host",
        "protocol",
    ):
        assert key in nginx_line, key
    assert app_line["path"] == "/api/hello"
    # nginx is the edge: the client's own X-Forwarded-For is overwritten, and the app
    # (trusting nginx) sees the address nginx saw.
    assert app_line["client"] == nginx_line["remote_addr"] != "203.0.113.9"


def test_nginx_starts_the_trace_with_its_request_id(edge: Edge, client: httpx.Client) -> None:
    r = client.get("/api/hello", headers={"traceparent": "00-" + "0" * 32 + "-00f067aa0ba902b7-01"})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    # nginx's $request_id is the trace id; the app returns its own span of that trace.
    returned = re.fullmatch(rf"00-{rid}-([0-9a-f]{{16}})-01", r.headers["traceparent"])
    assert returned, r.headers["traceparent"]
    nginx_line = edge.wait_record("nginx", by_id(rid))
    app_line = edge.wait_record("app", by_id(rid))
    assert nginx_line["trace_id"] == app_line["trace_id"] == rid
    assert app_line["span_id"] == returned[1]


def test_a_valid_incoming_trace_is_continued_through_nginx(
    edge: Edge, client: httpx.Client
) -> None:
    trace_id = uuid.uuid4().hex
    r = client.get(
        "/api/hello",
        headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-00", "tracestate": "a=b"},
    )
    assert r.status_code == 200
    assert re.fullmatch(rf"00-{trace_id}-[0-9a-f]{{16}}-00", r.headers["traceparent"])
    rid = r.headers["x-request-id"]
    assert rid != trace_id
    assert edge.wait_record("nginx", by_id(rid))["trace_id"] == trace_id
    assert edge.wait_record("app", by_id(rid))["trace_id"] == trace_id


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc.DEF_123-xyz", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("has space", False),
        ('quote"brace{', False),
        ("", False),
    ],
)
def test_incoming_request_id_is_kept_only_when_well_formed(
    edge: Edge, client: httpx.Client, incoming: str, kept: bool
) -> None:
    r = client.get("/api/hello", headers={"X-Request-ID": incoming})
    assert r.status_code == 200
    rid = r.headers["x-request-id"]
    if kept:
        assert rid == incoming
    else:
        assert GENERATED_ID.fullmatch(rid), rid
    app_line = edge.wait_record("app", by_id(rid))
    assert app_line["path"] == "/api/hello"


# ── limits ──────────────────────────────────────────────────────────────────


def test_oversized_body_is_refused_with_413_before_the_app(
    edge: Edge, client: httpx.Client
) -> None:
    rid = new_id()
    body = b'{"item_id": 1, "quantity": 1, "note": "' + b"x" * (1024 * 1024 + 1) + b'"}'
    r = client.post(
        "/api/orders",
        content=body,
        headers={"X-Request-ID": rid, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert r.headers["x-request-id"] == rid
    # The app's error shape, from nginx.
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"detail": "request body too large", "request_id": rid}
    assert_security_headers(r)
    line = edge.wait_record("nginx", by_id(rid))
    assert line["status"] == 413
    assert line["method"] == "POST"  # not the GET of nginx's internal error-page redirect
    assert line["upstream_addr"] == ""
    # A body just under the limit does reach the app (its 422 for the bad note, not ours).
    small = client.post("/api/orders", json={"item_id": 1, "quantity": 1, "note": "x" * 1000})
    assert small.status_code in (201, 422), small.text


def test_rate_limit_answers_429_past_the_burst(edge: Edge) -> None:
    # The host's requests arrive from the edge network's gateway, not in the default
    # allow-list (127.0.0.1/32). One keep-alive connection, a bounded burst.
    statuses = []
    limited: httpx.Response | None = None
    time.sleep(3)  # start with a full bucket, whatever the tests before this one sent
    with edge.client() as c:
        for _ in range(3 * edge.burst):
            r = c.get("/static/favicon.svg")
            statuses.append(r.status_code)
            if r.status_code == 429 and limited is None:
                limited = r
    time.sleep(3)  # let the bucket drain (burst 40 at 20r/s) for the tests after this one
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= edge.burst, statuses
    assert limited is not None, "no 429 after three times the burst"
    assert GENERATED_ID.fullmatch(limited.headers["x-request-id"])
    assert limited.json() == {
        "detail": "too many requests",
        "request_id": limited.headers["x-request-id"],
    }
    assert_security_headers(limited)


BURST_SCRIPT = r"""
# $1: address to connect to, $2: number of requests, pipelined on one TLS connection.
# Prints how many answers had each status.
{
    i=1
    while [ $i -lt "$2" ]; do
        printf 'GET /static/favicon.svg HTTP/1.1\r\nHost: localhost\r\n\r\n'
        i=$((i + 1))
    done
    printf 'GET /static/favicon.svg HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n'
    sleep 2
} | timeout 15 openssl s_client -quiet -connect "$1:8443" -servername localhost 2>/dev/null \
  | grep -a '^HTTP/1.1 ' | cut -d' ' -f2 | sort | uniq -c
"""


def _burst_from_inside(edge: Edge, address: str) -> dict[int, int]:
    requests = 3 * edge.burst
    out = edge.exec("nginx", "sh", "-s", address, str(requests), stdin=BURST_SCRIPT)
    counts = {int(status): int(n) for n, status in (line.split() for line in out.splitlines())}
    assert sum(counts.values()) == requests, out
    return counts


def test_rate_limit_allowlist_exempts_listed_clients(edge: Edge) -> None:
    # From inside the nginx container: over loopback the client is 127.0.0.1 (in the
    # default RATE_LIMIT_ALLOWLIST): never limited. Over the container's own network
    # address the client is not listed: limited like anyone else.
    allowlist = edge.env("nginx").get("RATE_LIMIT_ALLOWLIST", "127.0.0.1/32")
    assert "127.0.0.1" in allowlist, f"the test needs 127.0.0.1 allow-listed: {allowlist!r}"
    assert _burst_from_inside(edge, "127.0.0.1") == {200: 3 * edge.burst}
    time.sleep(3)
    own_address = edge.exec("nginx", "hostname", "-i").split()[0]
    counts = _burst_from_inside(edge, own_address)
    time.sleep(3)
    assert counts.get(429, 0) > 0, counts
    assert counts.get(200, 0) >= edge.burst, counts


def test_slow_client_headers_time_out(edge: Edge) -> None:
    # A client that never finishes its headers is disconnected after
    # client_header_timeout (10s), with nothing sent back.
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=30) as sock:
        started = time.monotonic()
        answer = raw_exchange(sock, b"GET / HTTP/1.1\r\nHost: localhost\r\n", timeout=30)
        waited = time.monotonic() - started
    assert answer == b""
    assert 8 <= waited <= 20, waited


# ── what must not get through ───────────────────────────────────────────────


def test_unknown_host_on_http_is_dropped_without_response(edge: Edge) -> None:
    for host in ("evil.example", "app", "app:9000"):
        with socket.create_connection(("127.0.0.1", edge.http_port), timeout=10) as sock:
            answer = raw_exchange(sock, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        assert answer == b"", (host, answer[:100])
    # Without a Host header at all (HTTP/1.0): dropped too.
    with socket.create_connection(("127.0.0.1", edge.http_port), timeout=10) as sock:
        assert raw_exchange(sock, b"GET / HTTP/1.0\r\n\r\n") == b""


def test_unknown_sni_is_refused_in_the_tls_handshake(edge: Edge) -> None:
    ctx = edge.ssl_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ssl.SSLError) as refused:
        tls_handshake(edge, ctx, server_hostname="evil.example").close()
    assert "UNRECOGNIZED_NAME" in str(refused.value).upper(), refused.value


def test_unknown_host_over_tls_is_dropped_without_response(edge: Edge) -> None:
    # A known SNI (or none) but a foreign Host header: no answer either.
    for sni in ("localhost", "127.0.0.1"):
        for host in ("evil.example", "app:9000"):
            with tls_handshake(edge, edge.ssl_context(), server_hostname=sni) as tls:
                answer = raw_exchange(tls, f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            assert answer == b"", (sni, host, answer[:100])


def test_metrics_are_not_reachable_through_nginx(edge: Edge, client: httpx.Client) -> None:
    for path in ("/metrics", "/metrics/", "/metrics?format=prometheus"):
        rid = new_id()
        r = client.get(path, headers={"X-Request-ID": rid})
        assert r.status_code == 404, path
        assert "http_requests_total" not in r.text
        line = edge.wait_record("nginx", by_id(rid))
        assert line["upstream_addr"] == "", f"{path} was proxied"
    # Neither app port is published; nginx publishes only its two public ports.
    app_ports = ports_of(edge, "app").strip()
    assert app_ports == "", app_ports
    published = {line.split("/")[0] for line in ports_of(edge, "nginx").splitlines()}
    assert published == {"8080", "8443"}, published


def test_stub_status_is_served_on_the_internal_port_only(edge: Edge) -> None:
    probe = (
        "exec 3<>/dev/tcp/127.0.0.1/8081; "
        "printf 'GET /stub_status HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
    )
    out = edge.exec("nginx", "bash", "-c", probe)
    assert out.startswith("HTTP/1.1 200"), out
    assert "Active connections:" in out
    with edge.client() as c:
        assert c.get("/stub_status").status_code == 404  # the public site has no such page


# ── compression and caching ─────────────────────────────────────────────────


@pytest.mark.parametrize(
    "path", ["/", "/api/items", "css", "js"], ids=["html", "json", "css", "js"]
)
def test_text_is_gzipped(client: httpx.Client, path: str) -> None:
    if path in ("css", "js"):
        path = static_asset(path, f".{path}")
    r = client.get(path, headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200
    assert r.headers.get("content-encoding") == "gzip", r.headers
    assert "accept-encoding" in r.headers.get("vary", "").lower()
    assert r.num_bytes_downloaded < len(r.content)
    plain = client.get(path, headers={"Accept-Encoding": "identity"})
    assert "content-encoding" not in plain.headers
    assert plain.content == r.content


def test_cache_headers(client: httpx.Client) -> None:
    for asset in (static_asset("css", ".css"), static_asset("js", ".js")):
        r = client.get(asset)
        assert r.headers["cache-control"] == IMMUTABLE, asset
    index = client.get("/")
    assert index.headers["cache-control"] == "no-cache"
    assert "etag" in index.headers
    revalidated = client.get("/", headers={"If-None-Match": index.headers["etag"]})
    assert revalidated.status_code == 304
    favicon = client.get("/static/favicon.svg")  # not fingerprinted: short
    assert favicon.headers["cache-control"] == "public, max-age=300"
    missing = client.get("/static/app.0123456789.css")  # an error is never cached a year
    assert missing.status_code == 404
    assert "immutable" not in missing.headers.get("cache-control", "")
    api = client.get("/api/hello")
    assert "immutable" not in api.headers.get("cache-control", "")


# ── the config itself ───────────────────────────────────────────────────────


def test_running_config_passes_nginx_t(edge: Edge) -> None:
    edge.exec("nginx", "nginx", "-t", "-q", "-e", "stderr")
