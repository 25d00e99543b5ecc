"""The containers themselves: users, filesystems, privileges, ports, health, logs, shutdown.

Runs against the real compose stack from tests/e2e/conftest.py and reads what the kernel
and Docker say about the running containers (/proc/1/status, `docker inspect`), not what
the compose file claims. The graceful-shutdown test stops a stack of its own, last.
Compose file: docker-compose.yml; images: Dockerfile, nginx/Dockerfile.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from typing import TYPE_CHECKING, Any

import httpx
import pytest

if TYPE_CHECKING:
    from conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

CORE = ("app", "nginx")
UID = {"app": 10001, "nginx": 101}
# Ports that only the backend network may reach.
INTERNAL_PORTS = ("8000/tcp", "9000/tcp")
# The app image on the CI base (localbase/python:trixie, 117 MB): at most 150 MB. What the
# Dockerfile adds on top of any base (venv with stripped extensions, code): at most 34 MB
# (33.5 today), so the official python:3.13-slim base gets the same scrutiny. Size is not
# time: a hard limit.
APP_IMAGE_BUDGET_MB = 150
APP_LAYERS_BUDGET_MB = 34
SLOW_SECONDS = 5
SLOW_REQUESTS = 4


def proc_status(stack: Stack, service: str, pid: str = "1") -> dict[str, str]:
    """/proc/<pid>/status of a process in the service's container, as a dict."""
    out = stack.exec(service, "cat", f"/proc/{pid}/status").stdout
    return {
        k: v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line)
    }


def container_uids(stack: Stack, service: str) -> set[int]:
    """Real, effective, saved and fs uid of every process in the container."""
    out = stack.exec(
        service, "sh", "-c", 'for f in /proc/[0-9]*/status; do grep "^Uid:" "$f"; done'
    ).stdout
    return {int(uid) for line in out.splitlines() for uid in line.split()[1:]}


# ── identity and privileges ────────────────────────────────────────────────────


@pytest.mark.parametrize("service", CORE)
def test_processes_run_as_the_images_non_root_user(stack: Stack, service: str) -> None:
    config_user = stack.inspect(service)["Config"]["User"]
    assert config_user, "the image sets no USER"
    assert config_user.split(":")[0] not in ("0", "root"), config_user
    status = proc_status(stack, service)
    assert status["Uid"].split() == [str(UID[service])] * 4, status["Uid"]
    assert container_uids(stack, service) == {UID[service]}, "a process runs as another user"


@pytest.mark.parametrize("service", CORE)
def test_root_filesystem_is_read_only_and_tmp_is_writable(stack: Stack, service: str) -> None:
    assert stack.inspect(service)["HostConfig"]["ReadonlyRootfs"] is True
    for path in ("/probe", "/etc/probe", "/usr/local/probe"):
        proc = stack.exec(service, "sh", "-c", f"echo x > {path}", user="0", check=False)
        assert proc.returncode != 0, f"root could write {path}"
        assert "Read-only file system" in proc.stderr, proc.stderr
    ok = stack.exec(service, "sh", "-c", "echo x > /tmp/probe && cat /tmp/probe && rm /tmp/probe")
    assert ok.stdout.strip() == "x"
    mounts = stack.exec(service, "cat", "/proc/mounts").stdout
    assert re.search(r"^tmpfs /tmp tmpfs ", mounts, flags=re.MULTILINE), mounts


@pytest.mark.parametrize("service", CORE)
def test_no_capabilities_and_no_new_privileges(stack: Stack, service: str) -> None:
    host_config = stack.inspect(service)["HostConfig"]
    assert "ALL" in (host_config["CapDrop"] or [])
    assert "no-new-privileges:true" in (host_config["SecurityOpt"] or [])
    status = proc_status(stack, service)
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == 0, f"{field}={status[field]}"
    assert status["NoNewPrivs"] == "1"


@pytest.mark.parametrize("service", CORE)
def test_memory_cpu_and_pid_limits_are_set(stack: Stack, service: str) -> None:
    host_config = stack.inspect(service)["HostConfig"]
    assert host_config["Memory"] > 0, "no memory limit"
    assert host_config["NanoCpus"] > 0 or host_config["CpuQuota"] > 0, "no CPU limit"
    assert (host_config["PidsLimit"] or 0) > 0, "no pids limit"
    # The kernel enforces them (cgroup v1 and v2 paths both tried).
    limit = stack.exec(
        service,
        "sh",
        "-c",
        "cat /sys/fs/cgroup/memory.max 2>/dev/null"
        " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes",
    ).stdout.strip()
    assert int(limit) == host_config["Memory"]


# ── network exposure ───────────────────────────────────────────────────────────


def test_app_and_metrics_ports_are_not_published(stack: Stack) -> None:
    for service in stack.services():
        ports = stack.inspect(service)["NetworkSettings"]["Ports"] or {}
        for port in INTERNAL_PORTS:
            assert not ports.get(port), f"{service} publishes {port}: {ports[port]}"
    app = stack.inspect("app")
    assert not any((app["NetworkSettings"]["Ports"] or {}).values()), "the app publishes a port"
    nginx_ports = {
        port: [b["HostIp"] for b in bindings]
        for port, bindings in (stack.inspect("nginx")["NetworkSettings"]["Ports"] or {}).items()
        if bindings
    }
    assert set(nginx_ports) == {"8080/tcp", "8443/tcp"}, nginx_ports


def test_app_is_only_on_the_internal_backend_network(stack: Stack) -> None:
    networks = stack.inspect("app")["NetworkSettings"]["Networks"]
    assert len(networks) == 1, list(networks)
    (name,) = networks
    assert name == f"{stack.project}_backend"
    info = json.loads(
        subprocess.run(
            ["docker", "network", "inspect", name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )[0]
    assert info["Internal"] is True, "backend network has a route out"
    subnet = info["IPAM"]["Config"][0]["Subnet"]
    assert subnet == stack.env["BACKEND_SUBNET"]
    env = stack.environment("app")
    assert env["FORWARDED_ALLOW_IPS"] == subnet, "the app must trust only the backend subnet"


# ── images ─────────────────────────────────────────────────────────────────────


def image_info(image: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, text=True, check=True
    ).stdout
    info: dict[str, Any] = json.loads(out)[0]
    return info


def test_image_sizes_and_no_build_tools_in_the_app_image(
    stack: Stack, e2e_env: dict[str, str], e2e_summary: list[str]
) -> None:
    sizes: dict[str, float] = {}
    for service in stack.services():
        image = stack.inspect(service)["Image"]
        info = image_info(image)
        sizes[service] = info["Size"] / 1e6
        tag = (info.get("RepoTags") or [image[:19]])[0]
        e2e_summary.append(f"image {service:<16} {sizes[service]:7.1f} MB  {tag}")
        print(f"{service}: {tag} {sizes[service]:.1f} MB")
    base = e2e_env.get("PYTHON_IMAGE", "python:3.13-slim")  # the Dockerfile's default
    own = sizes["app"] - image_info(base)["Size"] / 1e6
    e2e_summary.append(f"image app: {own:.1f} MB on top of {base}")
    assert own <= APP_LAYERS_BUDGET_MB, f"the app's layers on {base} are {own:.1f} MB"
    if e2e_env["E2E_BASE_IMAGES_MODE"] == "local":
        assert sizes["app"] <= APP_IMAGE_BUDGET_MB, f"app image is {sizes['app']:.1f} MB"
    leftovers = stack.exec(
        "app",
        "sh",
        "-c",
        "for t in gcc cc c++ make ld strip; do command -v $t; done; "
        "ls -d /opt/venv/bin/pip* /opt/venv/lib/python3*/site-packages/pip "
        "/opt/venv/lib/python3*/site-packages/setuptools /root/.cache/pip /tmp/build "
        "2>/dev/null; true",
        user="0",
    ).stdout.split()
    assert leftovers == [], f"build leftovers in the app image: {leftovers}"


# ── health and logs ────────────────────────────────────────────────────────────


def test_healthchecks_are_defined_and_healthy(stack: Stack) -> None:
    for service in CORE:
        config = stack.inspect(service)["Config"].get("Healthcheck") or {}
        assert config.get("Test"), f"{service} has no healthcheck"
        assert config["Test"][0] != "NONE", f"{service} has its healthcheck disabled"
    for service in stack.services():
        state = stack.inspect(service)["State"]
        if "Health" not in state:
            continue
        assert state["Health"]["Status"] == "healthy", (service, state["Health"]["Log"][-1:])
        assert state["Health"]["Log"][-1]["ExitCode"] == 0, (service, state["Health"]["Log"][-1])


@pytest.mark.parametrize("service", CORE)
def test_every_log_line_is_a_json_object(stack: Stack, service: str) -> None:
    with stack.client() as client:  # make sure there are access lines, too
        for path in ("/api/hello", "/api/items/9999", "/api/boom"):
            client.get(path)
    time.sleep(0.5)  # docker's log driver is asynchronous
    lines = stack.logs(service)
    assert lines, f"{service} wrote no log lines"
    bad: list[str] = []
    for line in lines:
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            bad.append(line)
            continue
        if (
            not isinstance(record, dict)
            or not {"timestamp", "level"} <= record.keys()
            or not ("event" in record or "msg" in record)
        ):
            bad.append(line)
    assert not bad, (
        f"{len(bad)} of {len(lines)} {service} log lines are not JSON records "
        f"with timestamp/level/event:\n" + "\n".join(bad[:10])
    )


def test_compose_file_validates(stack: Stack) -> None:
    proc = stack.compose("config", "--quiet", check=False)
    assert proc.returncode == 0, proc.stderr


# ── graceful shutdown (its own stack; keep this test last) ─────────────────────


def in_progress(stack: Stack) -> float:
    """The app's http_requests_in_progress, read from its metrics port inside the container."""
    out = stack.exec(
        "app",
        "python",
        "-c",
        "import urllib.request; print(urllib.request.urlopen("
        "'http://127.0.0.1:9000/metrics', timeout=3).read().decode())",
    ).stdout
    match = re.search(r"^http_requests_in_progress(?:\{[^}]*\})? (\S+)$", out, flags=re.MULTILINE)
    assert match, "http_requests_in_progress is missing from the app's metrics"
    return float(match.group(1))


def test_compose_stop_lets_in_flight_requests_finish(stack_factory: StackFactory) -> None:
    stack = stack_factory.up("stop")
    results: list[tuple[int, Any, float] | BaseException] = []
    lock = threading.Lock()

    def slow_request() -> None:
        start = time.monotonic()
        try:
            with stack.client(timeout=60) as client:
                response = client.get("/api/slow", params={"seconds": SLOW_SECONDS})
            outcome: tuple[int, Any, float] | BaseException = (
                response.status_code,
                response.json(),
                time.monotonic() - start,
            )
        except (httpx.HTTPError, ValueError) as error:
            outcome = error
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=slow_request) for _ in range(SLOW_REQUESTS)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while in_progress(stack) < SLOW_REQUESTS:
        assert time.monotonic() < deadline, "the slow requests never reached the app"
        time.sleep(0.2)

    start = time.monotonic()
    stack.compose("stop", timeout=120)
    stop_seconds = time.monotonic() - start
    for thread in threads:
        thread.join(timeout=60)

    assert len(results) == SLOW_REQUESTS
    for outcome in results:
        assert not isinstance(outcome, BaseException), f"request failed during stop: {outcome!r}"
        status, body, seconds = outcome
        assert status == 200, (status, body)
        assert body == {"slept": SLOW_SECONDS}
        assert seconds >= SLOW_SECONDS
    assert stop_seconds < 40, f"stop took {stop_seconds:.1f}s: something waited for SIGKILL"
    for service in CORE:
        state = stack.inspect(service)["State"]
        assert state["Running"] is False
        assert state["ExitCode"] == 0, f"{service} exited {state['ExitCode']} (137 = SIGKILL)"
        assert state["OOMKilled"] is False
    stack_factory.down(stack)
