"""nginx's supervisor (nginx/supervisor.sh): JSON error log, replicas and certificate followed.

One private stack for the module (it scales the app, stops it and swaps the certificate);
the tests run in file order on it:

1. error log: 2,000 requests that each make nginx write one error line (413, body too
   large), from 8 clients at once: exactly 2,000 JSON lines, each request's line once.
2. scale 1 → 3 under paced GET+POST traffic (`docker compose up -d --scale app=3`,
   nothing else): every new replica serves within 10 s of being healthy, 0 failed.
3. scale 3 → 1 under traffic: the stopped replicas drain (/readyz 503 for SHUTDOWN_DELAY,
   the watcher drops them), 0 failed.
4. certificate: a new pair written into the volume is served without a failed request; a
   key that does not match is refused with a JSON error line, the good one keeps serving.
5. app down: nginx's 502/504 lines (connect() refused / timed out) are JSON with the
   upstream and errno,
   and the watcher keeps the last set (never an empty upstream).
6. every line nginx's container wrote on stderr during all this is a JSON object with the
   core keys (timestamp, level, logger, event).
Replicas are told apart by the access log's upstream_addr (their backend IPs).
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from traffic import PacedTraffic

if TYPE_CHECKING:
    from pathlib import Path

    from conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

CORE_KEYS = {"timestamp", "level", "logger", "event"}
FLOOD_REQUESTS, FLOOD_CLIENTS = 2_000, 8
SERVE_WITHIN_S = 10.0
SCALED = 3


@pytest.fixture(scope="module")
def edge(stack_factory: StackFactory) -> Stack:
    return stack_factory.up("edge")


# ── helpers ────────────────────────────────────────────────────────────────────


def stderr_lines(stack: Stack, service: str = "nginx") -> list[str]:
    """What the service's container wrote on stderr, as Docker stored it."""
    proc = subprocess.run(
        ["docker", "logs", stack.container_id(service)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line for line in proc.stderr.splitlines() if line.strip()]


def stderr_records(stack: Stack) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr_lines(stack)]


def access_records(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in stack.records("nginx") if r.get("logger") == "nginx.access"]


def app_addresses(stack: Stack) -> dict[str, str]:
    """Backend IP -> container name of every running app replica."""
    ids = stack.compose("ps", "-q", "app").stdout.split()
    found = {}
    for info in json.loads(
        subprocess.run(
            ["docker", "inspect", *ids], capture_output=True, text=True, check=True
        ).stdout
    ):
        for name, net in info["NetworkSettings"]["Networks"].items():
            if name.endswith("_backend"):
                found[net["IPAddress"]] = info["Name"].lstrip("/")
    return found


def upstreams(stack: Stack) -> list[str]:
    """`nginx-upstreams` in the nginx container: the interface `make deploy` waits on."""
    return stack.exec("nginx", "nginx-upstreams").stdout.split()


def upstream_changes(stack: Stack) -> int:
    """How many times the supervisor applied a new upstream (one reload each)."""
    return sum(1 for r in stderr_records(stack) if r.get("event", "").startswith("upstream app:"))


def wait_until(what: str, check: Any, timeout: float, interval: float = 0.2) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"{what}: not within {timeout}s"
        time.sleep(interval)
    return time.monotonic() - start


def served_certificate(stack: Stack) -> bytes:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", stack.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return der


# ── 1. the error log under a flood ─────────────────────────────────────────────


def too_large(stack: Stack, path: str) -> int:
    """One request declaring a body over CLIENT_MAX_BODY_SIZE: nginx answers 413 and
    writes one error line ("client intended to send too large body")."""
    context = stack.ssl_context()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        "Content-Length: 4194304\r\nConnection: close\r\n\r\n"
    ).encode()
    with (
        socket.create_connection(("127.0.0.1", stack.https_port), timeout=15) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(request)
        status = tls.recv(64).split(b" ", 2)[1]
    return int(status)


def test_every_error_line_is_one_json_object_under_a_flood(edge: Stack) -> None:
    token = uuid.uuid4().hex[:10]
    statuses: list[int] = []
    lock = threading.Lock()

    def client(index: int) -> None:
        for n in range(index, FLOOD_REQUESTS, FLOOD_CLIENTS):
            status = too_large(edge, f"/api/orders?flood={token}&n={n}")
            with lock:
                statuses.append(status)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(FLOOD_CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    seconds = time.monotonic() - start
    assert statuses.count(413) == FLOOD_REQUESTS, sorted(set(statuses))

    def flood_lines() -> list[dict[str, Any]]:
        return [r for r in stderr_records(edge) if f"flood={token}" in r.get("request", "")]

    wait_until(
        "all 2,000 error lines in docker's log", lambda: len(flood_lines()) >= FLOOD_REQUESTS, 30
    )
    lines = flood_lines()
    numbers = sorted(int(r["request"].split("&n=")[1].split()[0]) for r in lines)
    assert numbers == list(range(FLOOD_REQUESTS)), "a line was lost, merged or doubled"
    for record in lines:
        assert record["level"] == "error"
        assert record["logger"] == "nginx.error"
        assert record["event"].startswith("client intended to send too large body: 4194304")
        assert isinstance(record["pid"], int)
        assert isinstance(record["connection"], int)
        assert record["server"] == "localhost"
        assert record["host"] == "localhost"
        assert record["client"]
    print(f"error-log flood: {FLOOD_REQUESTS} requests in {seconds:.1f}s, {len(lines)} lines")


# ── 2. and 3. scaling ─────────────────────────────────────────────────────────


def test_scale_up_each_replica_serves_within_seconds(edge: Stack) -> None:
    before = app_addresses(edge)
    assert len(before) == 1, before
    changes = upstream_changes(edge)
    with PacedTraffic(
        edge.client, duration=90, max_requests=1500, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(20)
        asked = time.monotonic()
        edge.compose(
            "up", "-d", "--scale", f"app={SCALED}", "--wait", "--wait-timeout", "120", timeout=180
        )
        healthy = time.monotonic()
        replicas = app_addresses(edge)
        assert len(replicas) == SCALED, replicas

        def first_served() -> dict[str, float]:
            by_id = {r["request_id"]: r["upstream_addr"] for r in access_records(edge)}
            firsts: dict[str, float] = {}
            for outcome in traffic.since(healthy):
                ip = by_id.get(outcome.request_id, "").rsplit(":", 1)[0]
                if ip in replicas and ip not in firsts:
                    firsts[ip] = outcome.started - healthy
            return firsts

        wait_until(
            "every replica serves",
            lambda: set(first_served()) == set(replicas),
            SERVE_WITHIN_S + 5,
            interval=0.5,
        )
        traffic.wait_for(30)
    firsts = first_served()
    assert max(firsts.values()) <= SERVE_WITHIN_S, firsts
    assert sorted(upstreams(edge)) == sorted(f"{ip}:8000" for ip in replicas)
    assert traffic.lost(edge.nginx_request_ids()) == [], traffic.summary()
    print(
        f"scale 1→{SCALED}: {traffic.summary()}; {upstream_changes(edge) - changes} reload(s); "
        f"`up --wait` took {healthy - asked:.1f}s, "
        f"first request of each new replica after it (s): "
        + ", ".join(f"{ip} {t:.2f}" for ip, t in sorted(firsts.items()))
    )


def test_scale_down_fails_no_request(edge: Stack) -> None:
    assert len(app_addresses(edge)) == SCALED
    changes = upstream_changes(edge)
    with PacedTraffic(
        edge.client, duration=120, max_requests=2000, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(20)
        start = time.monotonic()
        edge.compose("up", "-d", "--scale", "app=1", "--wait", timeout=180)
        seconds = time.monotonic() - start
        traffic.wait_for(30)
    remaining = app_addresses(edge)
    assert len(remaining) == 1, remaining
    assert upstreams(edge) == [f"{ip}:8000" for ip in remaining]
    assert traffic.lost(edge.nginx_request_ids()) == [], traffic.summary()
    assert len(traffic.succeeded) >= 50, traffic.summary()
    print(
        f"scale {SCALED}→1 in {seconds:.1f}s: {traffic.summary()}; "
        f"{upstream_changes(edge) - changes} reload(s)"
    )


# ── 4. certificate ─────────────────────────────────────────────────────────────


def new_pair(stack: Stack, name: str) -> str:
    """A fresh self-signed pair made in the nginx container's /tmp; returns the cert PEM."""
    stack.exec(
        "nginx",
        "openssl",
        "req",
        "-x509",
        "-new",
        "-nodes",
        "-days",
        "30",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-subj",
        "/CN=localhost",
        "-addext",
        "subjectAltName=DNS:localhost,IP:127.0.0.1",
        "-keyout",
        f"/tmp/{name}.key",
        "-out",
        f"/tmp/{name}.pem",
    )
    return stack.exec("nginx", "cat", f"/tmp/{name}.pem").stdout


def install(stack: Stack, name: str) -> None:
    """What a renewal does: write the files into the volume (key first, then the chain)."""
    stack.exec(
        "nginx",
        "sh",
        "-c",
        f"cp /tmp/{name}.key /etc/nginx/certs/privkey.pem"
        f" && cp /tmp/{name}.pem /etc/nginx/certs/fullchain.pem",
    )


def test_certificate_change_is_served_without_a_failed_request(edge: Stack, tmp_path: Path) -> None:
    old_pem = edge.exec("nginx", "cat", "/etc/nginx/certs/fullchain.pem").stdout
    new_pem = new_pair(edge, "renewed")
    new_der = ssl.PEM_cert_to_DER_cert(new_pem)
    assert served_certificate(edge) == ssl.PEM_cert_to_DER_cert(old_pem)
    trust = tmp_path / "both.pem"
    trust.write_text(old_pem + new_pem)  # clients that trust both, as during a real renewal

    def client() -> httpx.Client:
        return httpx.Client(
            base_url=edge.url, verify=ssl.create_default_context(cafile=str(trust)), timeout=15
        )

    with PacedTraffic(client, duration=60, max_requests=1000, retry_unanswered=True) as traffic:
        traffic.wait_for(20)
        install(edge, "renewed")
        took = wait_until(
            "the new certificate is served", lambda: served_certificate(edge) == new_der, 15
        )
        traffic.wait_for(20)
    assert traffic.lost(edge.nginx_request_ids()) == [], traffic.summary()
    print(f"certificate change: served after {took:.1f}s; {traffic.summary()}")

    # A key that does not belong to the certificate: refused, the renewed pair stays.
    edge.exec(
        "nginx",
        "sh",
        "-c",
        "openssl genpkey -algorithm EC -pkeyopt "
        "ec_paramgen_curve:P-256 -out /etc/nginx/certs/privkey.pem",
    )

    def refused() -> bool:
        return any(
            r.get("level") == "error" and "certificate change refused" in r.get("event", "")
            for r in stderr_records(edge)
        )

    wait_until("the bad key is refused", refused, 15)
    assert served_certificate(edge) == new_der
    edge.exec("nginx", "cp", "/tmp/renewed.key", "/etc/nginx/certs/privkey.pem")
    assert edge.cafile is not None
    edge.cafile.write_text(new_pem)  # the stack's certificate from now on


# ── 5. app down: 502 lines, last set kept ─────────────────────────────────────


def test_app_down_gives_json_502_lines_and_keeps_the_upstream(edge: Stack) -> None:
    # A stopped container's address is gone from the network: nginx's connect() is either
    # refused (111, 502) or times out after proxy_connect_timeout (110, 504).
    kept = upstreams(edge)
    edge.compose("stop", "app", timeout=120)
    try:
        with edge.client() as client:
            for _ in range(2):
                response = client.get("/api/hello")
                assert response.status_code in (502, 504), response.text
        time.sleep(3)  # several watcher turns with nothing ready
        assert upstreams(edge) == kept, "the watcher emptied or changed the upstream"
        records = stderr_records(edge)
        failed = [r for r in records if r.get("errno") in (110, 111) and "upstream" in r]
        assert failed, "no connect() refused / timed out line"
        for record in failed:
            assert record["level"] == "error"
            assert record["upstream"].startswith("http://")
            assert "while connecting to upstream" in record["event"]
        assert any("keeping the last set" in r.get("event", "") for r in records)
    finally:
        edge.compose("start", "app", timeout=120)


# ── 6. every stderr line ──────────────────────────────────────────────────────


def test_every_stderr_line_of_nginx_is_json_with_the_core_keys(edge: Stack) -> None:
    lines = stderr_lines(edge)
    bad = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if not isinstance(record, dict) or not record.keys() >= CORE_KEYS:
            bad.append(line)
    assert not bad, f"{len(bad)} of {len(lines)} lines:\n" + "\n".join(bad[:10])
    loggers = {json.loads(line)["logger"] for line in lines}
    assert {"nginx.entrypoint", "nginx.supervisor", "nginx.error"} <= loggers, loggers
