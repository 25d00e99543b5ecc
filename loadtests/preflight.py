"""Preflight: one verified HTTPS request before any load, so a down or mis-certified target
fails in seconds with a message that says what to do, not after a minute of 100 % errors.

Also the guard that keeps load on our own machine: the target must resolve to loopback or a
private address (the compose network) unless LOADTEST_ALLOW_REMOTE=1 says otherwise.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import subprocess
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loadtests.compose import ComposeLookupError, running_containers

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["PreflightError", "check_target", "copy_ca_from_compose", "ssl_context", "target_guard"]

TIMEOUT_S = 5.0


class PreflightError(Exception):
    """The target cannot take the load test; the message says why and what to do."""


@dataclass(frozen=True)
class PreflightResult:
    status: int
    server: str
    tls_version: str | None
    elapsed_ms: float


def ssl_context(ca_file: Path | None) -> ssl.SSLContext:
    """A verifying client context trusting `ca_file` (the stack's self-signed certificate)."""
    if ca_file is not None and not ca_file.is_file():
        raise PreflightError(f"LOADTEST_CA_FILE={ca_file} does not exist")
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def target_guard(base_url: str, allow_remote: bool) -> None:
    """Refuse a target outside loopback / private networks unless explicitly allowed."""
    host = urllib.parse.urlsplit(base_url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PreflightError(
            f"cannot resolve {host!r} from LOADTEST_HOST={base_url}: {exc}"
        ) from None
    addresses = {ipaddress.ip_address(info[4][0]) for info in infos}
    public = sorted(str(a) for a in addresses if not (a.is_loopback or a.is_private))
    if public and not allow_remote:
        raise PreflightError(
            f"refusing to load {base_url}: {host} resolves to non-local {', '.join(public)}. "
            "Load tests target your own stack; set LOADTEST_ALLOW_REMOTE=1 only for a host you own."
        )


class _ServerNameHTTPSConnection(http.client.HTTPSConnection):
    """Connects to `address` but speaks TLS (SNI, certificate check) and HTTP (Host) as
    `server_name`: `https://nginx:8443` inside compose for a certificate made for localhost."""

    def __init__(self, address: str, server_name: str, port: int, context: ssl.SSLContext) -> None:
        super().__init__(server_name, port, timeout=TIMEOUT_S, context=context)
        self.address = address
        self.tls_context = context

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls_context.wrap_socket(sock, server_hostname=self.host)


def check_target(
    base_url: str, ca_file: Path | None, path: str = "/api/hello", server_name: str | None = None
) -> PreflightResult:
    """GET base_url+path with verified TLS and a short timeout; raise PreflightError on failure."""
    parts = urllib.parse.urlsplit(base_url)
    host, scheme = parts.hostname or "", parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    hint_ca = (
        "Point LOADTEST_CA_FILE at the stack's certificate (`make loadtest` copies it out of the "
        "nginx container), and make sure its subjectAltName covers the host you target "
        "(or set LOADTEST_SERVER_NAME to a name it covers)."
    )
    conn: http.client.HTTPConnection
    if scheme == "https":
        context = ssl_context(ca_file)
        conn = _ServerNameHTTPSConnection(host, server_name or host, port, context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    headers = {"User-Agent": "loadtest-preflight"}
    if server_name:
        headers["Host"] = server_name
    started = time.monotonic()
    try:
        conn.request("GET", path, headers=headers)
        sock = conn.sock  # gone once a "Connection: close" response is read
        tls = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        response = conn.getresponse()
        response.read()
    except ssl.SSLCertVerificationError as exc:
        raise PreflightError(
            f"TLS verification of {base_url} failed: {str(exc.verify_message or exc).rstrip('.')}. "
            f"{hint_ca}"
        ) from None
    except ssl.SSLError as exc:
        raise PreflightError(
            f"TLS handshake with {base_url} failed: {exc}. Is it really HTTPS?"
        ) from None
    except ConnectionRefusedError:
        raise PreflightError(
            f"{base_url} refused the connection: the stack is down or listens elsewhere. "
            "Start it (`docker compose up -d --wait`) or set LOADTEST_HOST / HTTPS_PORT."
        ) from None
    except TimeoutError:
        raise PreflightError(f"{base_url}{path} did not answer within {TIMEOUT_S:.0f}s") from None
    except OSError as exc:
        raise PreflightError(f"cannot reach {base_url}: {exc}") from None
    finally:
        conn.close()
    elapsed = (time.monotonic() - started) * 1000
    if response.status != 200:
        raise PreflightError(
            f"GET {base_url}{path} answered {response.status} {response.reason}, expected 200"
            + (
                " (rate limited: is the load generator on RATE_LIMIT_ALLOWLIST?)"
                if response.status == 429
                else ""
            )
        )
    return PreflightResult(response.status, response.getheader("Server", ""), tls, elapsed)


def copy_ca_from_compose(project: str, cert_path: str, dest: Path, service: str = "nginx") -> Path:
    """`docker cp` the certificate out of the project's running nginx container into `dest`."""
    try:
        ids = running_containers(project, service)
    except ComposeLookupError as error:
        raise PreflightError(
            f"LOADTEST_CA_FILE is not set and the certificate cannot be copied: {error}"
        ) from None
    if not ids:
        raise PreflightError(
            f"LOADTEST_CA_FILE is not set and no running {service!r} container of compose project "
            f"{project!r} to copy the certificate from "
            "(set LOADTEST_COMPOSE_PROJECT or LOADTEST_CA_FILE)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    copied = subprocess.run(
        ["docker", "cp", "-L", f"{ids[0]}:{cert_path}", str(dest)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if copied.returncode != 0:
        raise PreflightError(
            f"could not copy {cert_path} out of {service} ({copied.stderr.strip()}); "
            "set LOADTEST_NGINX_CERT_PATH or LOADTEST_CA_FILE"
        )
    return dest
