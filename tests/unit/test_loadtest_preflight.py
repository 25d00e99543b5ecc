"""The load test preflight: a real HTTPS server on loopback with a throw-away certificate."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from loadtests.preflight import PreflightError, check_target, target_guard


def self_signed(directory: Path, names: list[str]) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(n) for n in names if not n[0].isdigit()]
    alt += [x509.IPAddress(ipaddress.ip_address(n)) for n in names if n[0].isdigit()]
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def serve_https(cert: Path, key: Path, status: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """An HTTPS server whose certificate covers localhost/127.0.0.1, and a stranger's cert."""
    cert, key = self_signed(tmp_path, ["localhost", "127.0.0.1"])
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other, _ = self_signed(other_dir, ["localhost"])
    httpd = serve_https(cert, key, 200)
    try:
        yield f"https://localhost:{httpd.server_address[1]}", cert, other
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_trusted_certificate_passes(tls_server: tuple[str, Path, Path]) -> None:
    url, cert, _ = tls_server
    result = check_target(url, cert)
    assert result.status == 200
    assert result.tls_version in ("TLSv1.2", "TLSv1.3")


def test_untrusted_certificate_fails_fast_and_says_what_to_set(
    tls_server: tuple[str, Path, Path],
) -> None:
    url, _, stranger = tls_server
    with pytest.raises(PreflightError) as excinfo:
        check_target(url, stranger)
    assert "TLS verification" in str(excinfo.value)
    assert "LOADTEST_CA_FILE" in str(excinfo.value)
    with pytest.raises(PreflightError, match="TLS verification"):
        check_target(url, None)  # the system store does not know a self-signed cert


def test_missing_ca_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match="LOADTEST_CA_FILE"):
        check_target("https://localhost:1", tmp_path / "absent.pem")


def test_down_target_fails_in_seconds() -> None:
    with pytest.raises(PreflightError, match="refused"):
        check_target("http://127.0.0.1:9", None)


def test_rate_limited_preflight_points_at_the_allow_list(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path, ["127.0.0.1"])
    httpd = serve_https(cert, key, 429)
    try:
        with pytest.raises(PreflightError, match="RATE_LIMIT_ALLOWLIST"):
            check_target(f"https://127.0.0.1:{httpd.server_address[1]}", cert)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_only_local_targets_unless_allowed() -> None:
    target_guard("https://localhost:443", allow_remote=False)
    target_guard("https://127.0.0.1:8443", allow_remote=False)
    target_guard("https://172.18.0.5:8443", allow_remote=False)  # a compose network
    with pytest.raises(PreflightError, match="LOADTEST_ALLOW_REMOTE"):
        target_guard("https://8.8.8.8", allow_remote=False)
    target_guard("https://8.8.8.8", allow_remote=True)  # resolves only, sends nothing
