"""ACME end to end: the `acme` profile against a real test CA, Pebble, on the stack's networks.

One stack for the module (docker-compose.yml + tests/e2e/acme/compose.yml, profiles acme and
monitoring): Pebble and its mock DNS (pebble-challtestsrv, every name -> nginx on `edge`)
from Debian's `pebble` package, the acme client pointed at Pebble (ACME_DIRECTORY, and
ACME_CA_BUNDLE for the test CA this module makes for Pebble's own TLS). Pebble issues
certificates for tests/e2e/acme/pebble-config.json's `certificateValidityPeriod` (90 s), so
the client renews every minute while the module runs. In the order they run:

- first issuance: the certificate nginx serves for SERVER_NAMES chains to Pebble's root
  (fetched from Pebble's management API) with a verifying client;
- the acme container is locked down (non-root, read-only, no capabilities, no Docker socket);
- sslyze: the ACME-served certificate passes Mozilla's intermediate profile;
- the expiry metric: Prometheus' probe_ssl_earliest_cert_expiry (blackbox exporter) and
  acme_certificate_not_after_seconds equal the served certificate's notAfter;
- renewal under paced traffic: a new certificate is served, no request fails;
- failure: the name resolves elsewhere (challtestsrv), so validation fails: one `acme_failed`
  JSON line naming the cause, retries with a doubling back-off, the previous certificate
  keeps serving; DNS fixed + SIGHUP: the next attempt succeeds at once.

Figures (issuance time, serials, requests, the failure's line) go to the session summary.
https://github.com/letsencrypt/pebble  https://go-acme.github.io/lego/
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import re
import shutil
import socket
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.e2e.conftest import COMPOSE_FILE, ROOT, free_port, run
from tests.e2e.tls_scan import intermediate_issues, scan
from tests.e2e.traffic import PacedTraffic
from tests.monitoring import promql

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from tests.e2e.conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

PEBBLE_DIR = ROOT / "tests/e2e/acme"
PEBBLE_CONFIG = json.loads((PEBBLE_DIR / "pebble-config.json").read_text())["pebble"]
LIFETIME = float(PEBBLE_CONFIG["certificateValidityPeriod"])  # seconds, every certificate
DOMAIN = "shop.acme.test"  # what challtestsrv resolves to nginx; SERVER_NAMES' first name
SCRAPE_INTERVAL = 10.0  # monitoring/prometheus/prometheus.yml
# The first order waits for nothing but lego and Pebble; a renewal is due after two thirds
# of the lifetime (acme/client.py); give each the lifetime again on a busy machine.
ISSUE_TIMEOUT = 120.0
RENEW_TIMEOUT = LIFETIME * 2 / 3 + LIFETIME


# ── the served certificate, as a client sees it ─────────────────────────────


@dataclass(frozen=True)
class Served:
    serial: int
    not_after: float  # Unix seconds
    issuer: str
    der: bytes

    @classmethod
    def of(cls, der: bytes) -> Served:
        cert = x509.load_der_x509_certificate(der)
        return cls(
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc.timestamp(),
            issuer=cert.issuer.rfc4514_string(),
            der=der,
        )

    def describe(self) -> str:
        after = dt.datetime.fromtimestamp(self.not_after, dt.UTC).isoformat(timespec="seconds")
        return f"serial {self.serial:X}, notAfter {after}"


def served(stack: Stack, root_pem: str | None = None) -> Served:
    """The leaf nginx serves for DOMAIN (SNI). With `root_pem`, the handshake verifies the
    chain and the name against that root only, like a browser that trusts Pebble."""
    if root_pem is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=DOMAIN) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der, "nginx sent no certificate"
    return Served.of(der)


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll `check` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f}s", pytrace=False)
        time.sleep(interval)


def acme_events(stack: Stack, event: str) -> list[dict[str, Any]]:
    return [r for r in stack.records("acme") if r.get("event") == event]


def https_client(stack: Stack, root_pem: str) -> httpx.Client:
    """A keep-alive client of https://DOMAIN through the published port: SNI and Host are
    the name, the chain is verified against Pebble's root."""

    def sni(request: httpx.Request) -> None:
        request.extensions["sni_hostname"] = DOMAIN

    return httpx.Client(
        base_url=stack.url,
        verify=ssl.create_default_context(cadata=root_pem),
        headers={"Host": DOMAIN},
        event_hooks={"request": [sni]},
        timeout=15,
    )


# ── Pebble's TLS (its ACME API is HTTPS, signed by a CA made here) ──────────


def _write_test_ca(folder: Path) -> None:
    """ca.pem (ACME_CA_BUNDLE) and pebble.pem/pebble.key for Pebble's HTTPS listeners,
    valid for `pebble` (the client's URL) and 127.0.0.1 (the published management port)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "e2e test CA for Pebble")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("pebble"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (folder / "ca.pem").write_bytes(ca.public_bytes(pem))
    (folder / "pebble.pem").write_bytes(leaf.public_bytes(pem))
    (folder / "pebble.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    # Read by Pebble (nobody) and the acme client (uid 101) through bind mounts.
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


@pytest.fixture(scope="module")
def pebble_tls() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="e2e-pebble-tls-"))
    try:
        _write_test_ca(folder)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ── the stack ───────────────────────────────────────────────────────────────


@dataclass
class Pebble:
    """Pebble's and challtestsrv's management APIs, on loopback ports of this stack."""

    management: str  # https://127.0.0.1:<port>
    challtestsrv: str  # http://127.0.0.1:<port>
    ca_file: Path  # trusts Pebble's HTTPS certificate

    def root(self) -> str:
        """The root of the chains Pebble issues (made anew each time Pebble starts)."""
        trust = ssl.create_default_context(cafile=self.ca_file)
        response = httpx.get(f"{self.management}/roots/0", verify=trust, timeout=10)
        response.raise_for_status()
        assert "BEGIN CERTIFICATE" in response.text, response.text[:200]
        return response.text

    def dns(self, path: str, body: dict[str, Any]) -> None:
        response = httpx.post(f"{self.challtestsrv}/{path}", json=body, timeout=10)
        response.raise_for_status()


@pytest.fixture(scope="module")
def acme_stack(stack_factory: StackFactory, pebble_tls: Path) -> Stack:
    return stack_factory.up(
        "acme",
        profiles=("acme", "monitoring"),
        files=(COMPOSE_FILE, PEBBLE_DIR / "compose.yml"),
        env={
            "SERVER_NAMES": f"{DOMAIN} localhost 127.0.0.1",
            "ACME_EMAIL": "e2e@example.com",
            "ACME_DIRECTORY": "https://pebble:14000/dir",
            "ACME_CA_BUNDLE": "/run/pebble-ca.pem",  # tests/e2e/acme/compose.yml mounts it
            "ACME_E2E_TLS_DIR": str(pebble_tls),
            "ACME_E2E_PEBBLE_MANAGEMENT_PORT": str(free_port()),
            "ACME_E2E_CHALLTESTSRV_PORT": str(free_port()),
            # Required by the monitoring profile; alerts are not this module's subject and
            # go nowhere (nothing listens there, in Alertmanager's own container).
            "ALERTMANAGER_WEBHOOK_URL": "http://127.0.0.1:9/alerts",
        },
    )


@pytest.fixture(scope="module")
def pebble(acme_stack: Stack, pebble_tls: Path) -> Pebble:
    env = acme_stack.env
    return Pebble(
        management=f"https://127.0.0.1:{env['ACME_E2E_PEBBLE_MANAGEMENT_PORT']}",
        challtestsrv=f"http://127.0.0.1:{env['ACME_E2E_CHALLTESTSRV_PORT']}",
        ca_file=pebble_tls / "ca.pem",
    )


@pytest.fixture(scope="module")
def first(acme_stack: Stack, pebble: Pebble, e2e_summary: list[str]) -> Served:
    """The first certificate Pebble issued, once nginx serves it (timed)."""
    start = time.monotonic()

    def issued() -> Served | None:
        now = served(acme_stack)
        return now if "Pebble" in now.issuer else None

    cert = wait_until("nginx serving a certificate from Pebble", issued, ISSUE_TIMEOUT)
    seconds = time.monotonic() - start
    (obtained,) = acme_events(acme_stack, "certificate_obtained")[:1]
    (started,) = acme_events(acme_stack, "acme_started")[:1]
    lego = _ts(obtained["timestamp"]) - _ts(started["timestamp"])
    e2e_summary.append(
        f"acme: first issuance {lego:.1f} s (acme_started -> certificate_obtained), served "
        f"{seconds:.1f} s after `up` returned: {cert.describe()}, issuer {cert.issuer}"
    )
    return cert


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ── first issuance ──────────────────────────────────────────────────────────


def test_first_certificate_chains_to_pebbles_root(
    acme_stack: Stack, pebble: Pebble, first: Served
) -> None:
    root = pebble.root()
    verified = served(acme_stack, root_pem=root)  # raises SSLCertVerificationError if not
    assert "Pebble" in verified.issuer
    cert = x509.load_der_x509_certificate(verified.der)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # localhost and 127.0.0.1 cannot be proven over HTTP-01: the client leaves them out.
    assert names.get_values_for_type(x509.DNSName) == [DOMAIN]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.total_seconds() - LIFETIME) <= 2, lifetime
    # A client that trusts only the system's roots refuses it: the trust is Pebble's.
    with pytest.raises(ssl.SSLCertVerificationError):
        served(acme_stack, root_pem=pebble.ca_file.read_text())
    # And the path a user takes works too, with the name and the verified chain.
    with https_client(acme_stack, root) as client:
        response = client.get("/api/items/1")
    assert response.status_code == 200, response.text


def test_acme_container_is_locked_down(acme_stack: Stack) -> None:
    info = acme_stack.inspect("acme")
    host = info["HostConfig"]
    user = info["Config"]["User"]
    assert user, "no USER: runs as root"
    assert user.split(":")[0] not in ("0", "root"), f"runs as {user!r}"
    uid = acme_stack.exec("acme", "id", "-u").stdout.strip()
    assert uid != "0", uid
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"], host["CapDrop"]
    assert not host.get("CapAdd")
    assert host["Privileged"] is False
    assert "no-new-privileges:true" in (host.get("SecurityOpt") or [])
    mounts = {m["Destination"]: m for m in info["Mounts"]}
    sockets = [
        m for m in info["Mounts"] if "docker.sock" in (m.get("Source", "") + m["Destination"])
    ]
    assert not sockets, sockets
    assert set(mounts) == {
        "/var/lib/acme",
        "/var/www/acme",
        "/etc/nginx/certs",
        "/run/pebble-ca.pem",
    }, sorted(mounts)
    # The root filesystem refuses a write: only the volumes and /tmp take them.
    probe = acme_stack.exec("acme", "sh", "-c", "touch /opt/acme/x", check=False)
    assert probe.returncode != 0, probe
    assert "Read-only file system" in probe.stderr, probe


def test_acme_served_certificate_is_mozilla_intermediate(
    acme_stack: Stack, pebble: Pebble, first: Served, tmp_path: Path
) -> None:
    root = tmp_path / "pebble-root.pem"
    root.write_text(pebble.root())
    result = scan(DOMAIN, acme_stack.https_port, root)
    deployments = result.scan_result.certificate_info.result.certificate_deployments  # type: ignore[union-attr]
    leaf = deployments[0].received_certificate_chain[0]
    assert "Pebble" in leaf.issuer.rfc4514_string(), "sslyze saw another certificate"
    issues = intermediate_issues(result)
    assert not issues, f"not Mozilla intermediate with the ACME certificate: {issues}"


# ── the expiry metric ───────────────────────────────────────────────────────


def _prometheus(stack: Stack, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{stack.ports['PROMETHEUS_PORT']}/api/v1/query"
    body = httpx.get(url, params={"query": expr}, timeout=10).json()
    assert body["status"] == "success", body
    results: list[dict[str, Any]] = body["data"]["result"]
    return results


def test_expiry_metric_equals_the_served_not_after(
    acme_stack: Stack, first: Served, e2e_summary: list[str]
) -> None:
    """Certificates change every minute here: compare one served certificate with the
    metrics once Prometheus has scraped them after it was served (a few scrape intervals)."""

    def agree() -> tuple[Served, float, float] | None:
        cert = served(acme_stack)
        probe = _prometheus(acme_stack, 'probe_ssl_earliest_cert_expiry{job="tls"}')
        held = _prometheus(acme_stack, 'acme_certificate_not_after_seconds{job="acme"}')
        if len(probe) != 1 or len(held) != 1:
            return None
        probed, client = float(probe[0]["value"][1]), float(held[0]["value"][1])
        return (cert, probed, client) if probed == client == cert.not_after else None

    cert, probed, client = wait_until(
        "probe_ssl_earliest_cert_expiry and acme_certificate_not_after_seconds == notAfter",
        agree,
        timeout=SCRAPE_INTERVAL * 6,
        interval=1,
    )
    e2e_summary.append(
        f"acme: expiry metric {probed:.0f} == acme_certificate_not_after_seconds {client:.0f} "
        f"== served notAfter ({cert.describe()})"
    )
    names = set(
        httpx.get(
            f"http://127.0.0.1:{acme_stack.ports['PROMETHEUS_PORT']}/api/v1/label/__name__/values",
            timeout=10,
        ).json()["data"]
    )
    assert names >= promql.ACME_METRICS, sorted(promql.ACME_METRICS - names)
    (managing,) = _prometheus(acme_stack, "acme_managing")
    assert managing["value"][1] == "1"


# ── renewal under load ──────────────────────────────────────────────────────


def test_renewal_is_served_without_a_failed_request(
    acme_stack: Stack, pebble: Pebble, first: Served, e2e_summary: list[str]
) -> None:
    root = pebble.root()
    before = served(acme_stack, root_pem=root)
    traffic = PacedTraffic(
        lambda: https_client(acme_stack, root),
        duration=RENEW_TIMEOUT + 60,
        max_requests=5000,
        retry_unanswered=True,  # nginx's reload closes idle keep-alives (traffic.py)
    )
    with traffic:
        traffic.wait_for(20)
        after = wait_until(
            "a renewed certificate served",
            lambda: (now := served(acme_stack)).serial != before.serial and now,
            RENEW_TIMEOUT,
        )
        changed = time.monotonic()
        traffic.wait_for(40)  # the reload's old workers drain while these run
    assert traffic.lost(acme_stack.nginx_request_ids()) == [], traffic.summary()
    assert len(traffic.since(changed)) >= 40
    verified = served(acme_stack, root_pem=root)  # the new one verifies too
    assert verified.not_after > before.not_after
    # nginx's certificate watcher installed it and reloaded gracefully (nginx/supervisor.sh).
    reloaded = {
        int(match[1], 16)
        for r in acme_stack.records("nginx")
        if (match := re.search(r"certificate reloaded: serial=([0-9A-F]+)", r.get("event", "")))
    }
    assert after.serial in reloaded, f"no reload logged for {after.describe()}"
    e2e_summary.append(
        f"acme: renewal under load: {before.describe()} -> {after.describe()}; {traffic.summary()}"
    )


# ── failure ─────────────────────────────────────────────────────────────────


def test_failed_issuance_logs_the_cause_backs_off_and_keeps_serving(
    acme_stack: Stack, pebble: Pebble, first: Served, e2e_summary: list[str]
) -> None:
    """The name resolves to an address where nothing answers (127.0.0.1 of Pebble's own
    container): validation fails as it does when DNS points at another host."""
    assert_running(acme_stack, "pebble")  # a CA gone for another reason is not this test's
    earlier = len(acme_events(acme_stack, "acme_failed"))
    before = served(acme_stack)
    pebble.dns("add-a", {"host": DOMAIN, "addresses": ["127.0.0.1"]})
    try:
        failures = wait_until(
            "two failed attempts logged",
            lambda: (found := acme_events(acme_stack, "acme_failed")[earlier:])[1:] and found,
            RENEW_TIMEOUT + LIFETIME / 6,
        )
        during = served(acme_stack)
    finally:
        pebble.dns("clear-a", {"host": DOMAIN})
    one, two = failures[:2]
    e2e_summary.append(f"acme: failure line: {json.dumps(one)}")
    # One line that names the cause: the ACME error type, the name, the CA, what is served.
    assert one["level"] == "error"
    assert one["cause"] == "connection", one
    assert DOMAIN in one["detail"], one
    assert one["domains"] == [DOMAIN]
    assert one["directory"] == "https://pebble:14000/dir"
    assert int(one["serving"].split()[1].rstrip(","), 16) == before.serial, one
    # Back-off: the second attempt waited at least the first delay, which then doubles.
    assert (one["consecutive_failures"], two["consecutive_failures"]) == (1, 2)
    assert one["retry_in_seconds"] > 0
    assert two["retry_in_seconds"] == pytest.approx(2 * one["retry_in_seconds"], rel=0.01)
    assert _ts(two["timestamp"]) - _ts(one["timestamp"]) >= one["retry_in_seconds"]
    # The previous certificate kept serving (nginx's files untouched).
    assert during.serial == before.serial
    # DNS fixed: SIGHUP retries at once (README), without waiting out the back-off.
    obtained = len(acme_events(acme_stack, "certificate_obtained"))
    run(["docker", "kill", "--signal", "HUP", acme_stack.container_id("acme")])
    wait_until(
        "a certificate after the fix",
        lambda: len(acme_events(acme_stack, "certificate_obtained")) > obtained,
        timeout=two["retry_in_seconds"] + LIFETIME / 3,
    )
    recovered = wait_until(
        "nginx serving the certificate obtained after the fix",
        lambda: (now := served(acme_stack, root_pem=pebble.root())).serial != before.serial and now,
        timeout=30,
    )
    e2e_summary.append(f"acme: after the fix + SIGHUP: {recovered.describe()}")
    assert "acme_consecutive_failures 0" in acme_metrics(acme_stack).splitlines()


def assert_running(stack: Stack, service: str) -> None:
    state = stack.inspect(service)["State"]
    if state["Status"] != "running":
        tail = "\n".join(stack.logs(service)[-20:])
        pytest.fail(f"{service} is {state}, its last log lines:\n{tail}", pytrace=False)


def acme_metrics(stack: Stack) -> str:
    """The client's own /metrics, read inside its container (backend only, no port)."""
    return stack.exec(
        "acme",
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:9102/metrics', timeout=5).read().decode())",
    ).stdout
