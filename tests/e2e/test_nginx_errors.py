"""Every error nginx answers itself is the app's JSON shape, with the request id and headers.

On the shared stack, from the host: each status provoked the way a client would (a missing
static file, a wrong method, a URI or header over nginx's buffers, a malformed request, plain
HTTP on the TLS port, a malformed request on :80). 413 and 429 are in test_proxy.py, the
per-client 429 and 502-504 in test_hostile_clients.py, nginx's 500 in nginx/check.sh (no
client can make nginx fail on its own any more).
"""

from __future__ import annotations

import socket
import uuid
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

SECURITY = ("strict-transport-security", "x-content-type-options", "x-frame-options")


def rid() -> str:
    return f"err-{uuid.uuid4().hex[:12]}"


def assert_json_error(response: httpx.Response, status: int, detail: str) -> None:
    assert response.status_code == status, (response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    request_id = response.headers["x-request-id"]
    assert response.json() == {"detail": detail, "request_id": request_id}


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "detail"),
    [
        ("GET", "/static/nope.css", {}, 404, "not found"),
        ("POST", "/static/favicon.svg", {}, 405, "method not allowed"),
        ("GET", "/api/" + "a" * 9000, {}, 414, "request URI too long"),
        ("GET", "/api/hello", {"X-Big": "b" * 9000}, 431, "request header fields too large"),
    ],
    ids=["404", "405", "414", "431"],
)
def test_nginx_errors_are_json_with_id_and_headers(
    stack: Stack, method: str, path: str, headers: dict[str, str], status: int, detail: str
) -> None:
    request_id = rid()
    with stack.client() as client:
        response = client.request(method, path, headers={**headers, "X-Request-ID": request_id})
    assert_json_error(response, status, detail)
    if status not in (414, 431):  # the id header itself may be past the buffer that broke
        assert response.headers["x-request-id"] == request_id
    for name in SECURITY:
        assert name in response.headers, (name, response.headers)


def raw(sock: socket.socket, request: bytes) -> httpx.Response:
    """Send raw bytes, parse the one answer nginx sends before it closes."""
    sock.settimeout(15)
    sock.sendall(request)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(h.split(": ", 1)) for h in lines[1:]]
    return httpx.Response(int(lines[0].split()[1]), headers=headers, content=body)


def test_malformed_request_over_tls_is_a_json_400(stack: Stack) -> None:
    request = b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\nHost: b\r\n\r\n"
    plain = socket.create_connection(("127.0.0.1", stack.https_port), timeout=15)
    with stack.ssl_context().wrap_socket(plain, server_hostname="localhost") as tls:
        response = raw(tls, request)
    assert_json_error(response, 400, "bad request")
    assert "strict-transport-security" in response.headers


def test_plain_http_on_the_tls_port_is_a_json_400(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=15) as sock:
        response = raw(sock, b"GET /api/hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_json_error(response, 400, "bad request")


def test_malformed_request_on_port_80_is_a_json_400(stack: Stack) -> None:
    with socket.create_connection(("127.0.0.1", stack.http_port), timeout=15) as sock:
        response = raw(sock, b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: b\r\n\r\n")
    assert_json_error(response, 400, "bad request")


def test_the_app_errors_pass_through_untouched(stack: Stack) -> None:
    # proxy_intercept_errors stays off: the app's own 404 body reaches the client, not
    # nginx's "not found" (the app's 500 has the same shape: told apart by the upstream).
    with stack.client() as client:
        missing = client.get("/api/items/999999")
    assert missing.status_code == 404
    assert missing.json() == {"detail": "item not found"}
