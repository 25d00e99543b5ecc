"""deploy/swarm live: a single-node swarm, the stack deployed, updated, hurt and scaled.

The engine is put in swarm mode for this module only and ALWAYS taken out again
(`docker swarm leave --force`): in the fixture's `finally`, and by `atexit` should the
interpreter end some other way. Swarm mode is state of the whole engine, so two runs of
this module on one host (two checkouts, CI beside a developer) take turns: the fixture
holds an exclusive flock on SWARM_LOCK from before it looks at the engine until it has
left, and waits at most SWARM_LOCK_TIMEOUT for another run to finish. A swarm this module
did not create is never touched: if the engine is in one once the lock is held, the tests
fail and say so, and leaving checks that the node is still the one `swarm init` made.

What runs, in order, on one deployment (deploy/swarm/deploy.sh, the images this session
built, a certificate made here as a versioned config + secret):

- the stack answers over HTTPS (the certificate verified) and redirects :80;
- `docker service update --image` to a second build under paced GET+POST traffic
  (tests/e2e/traffic.py): start-first, gated by the healthcheck; 0 failed requests;
- a killed app task is replaced (time measured: kill → a new task healthy);
- scaled to 3, every replica serves requests that came through nginx.

This machine has no IPVS: the app runs `endpoint_mode: dnsrr`, nginx publishes in host
mode and follows `tasks.app` with its replica watcher (deploy/swarm/stack.yml).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import fcntl
import json
import os
import ssl
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import NOTES, ROOT, TIMINGS, free_port, run
from swarm import DEPLOY, access_log_ids, build_images, certificate, free_pool
from traffic import PacedTraffic

if TYPE_CHECKING:
    from collections.abc import Iterator

# The first test's setup builds the images, may wait SWARM_LOCK_TIMEOUT for another run,
# then deploys: more than pytest's default 600 s when it has to wait.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

CONVERGE_TIMEOUT = 240  # an update: per task start (healthy ~5-10 s) + delay 5 s, monitor 30 s
REPLICA_FOLLOW_TIMEOUT = 30
# One swarm test per engine at a time. /tmp, not $TMPDIR: every checkout on this host
# must find the same file. The wait covers one whole run of this module after its image
# builds (deploy, update, kill, scale, leave: about 3 min, measured; twice that on a
# busy 2-core host).
SWARM_LOCK = Path("/tmp/asgi-stack-e2e-swarm.lock")
SWARM_LOCK_TIMEOUT = 420


# ── the swarm, its stack, and leaving it ──────────────────────────────────────────────


def _swarm_state() -> str:
    return run(["docker", "info", "--format", "{{.Swarm.LocalNodeState}}"]).stdout.strip()


def _swarm_node_id() -> str:
    """This engine's swarm node id: new with every `swarm init`, empty outside a swarm."""
    return run(["docker", "info", "--format", "{{.Swarm.NodeID}}"]).stdout.strip()


@contextlib.contextmanager
def _swarm_lock(timeout: float = SWARM_LOCK_TIMEOUT) -> Iterator[None]:
    """Hold the host's swarm-test lock (flock: freed on any exit, even a kill -9)."""
    handle = SWARM_LOCK.open("a+")
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                handle.close()
                pytest.fail(
                    f"another swarm test on this engine still holds {SWARM_LOCK} after "
                    f"{timeout:.0f} s ({holder}): swarm mode is engine-wide, run one at a time",
                    pytrace=False,
                )
            time.sleep(2)
    try:
        handle.seek(0)
        handle.truncate()
        now = datetime.datetime.now(datetime.UTC)
        handle.write(f"pid {os.getpid()} in {ROOT}, since {now:%H:%M:%S} UTC")
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


@dataclass
class SwarmStack:
    name: str
    env: dict[str, str] = field(repr=False)
    https_port: int
    http_port: int
    cafile: Path
    images: dict[str, str]

    def service(self, short: str) -> str:
        return f"{self.name}_{short}"

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 15)
        return httpx.Client(
            base_url=f"https://localhost:{self.https_port}",
            verify=ssl.create_default_context(cafile=str(self.cafile)),
            **kwargs,
        )

    def tasks(self, short: str) -> list[dict[str, Any]]:
        """Containers of the service's running tasks on this node, newest first."""
        ids = run(
            [
                "docker",
                "ps",
                "-q",
                "--filter",
                f"label=com.docker.swarm.service.name={self.service(short)}",
            ]
        ).stdout.split()
        if not ids:
            return []
        found = json.loads(run(["docker", "inspect", *ids]).stdout)
        return sorted(found, key=lambda c: c["Created"], reverse=True)

    def healthy(self, short: str) -> list[dict[str, Any]]:
        return [
            c for c in self.tasks(short) if c["State"].get("Health", {}).get("Status") == "healthy"
        ]

    def wait_healthy(self, short: str, count: int, timeout: float = CONVERGE_TIMEOUT) -> float:
        """Seconds until exactly `count` healthy tasks run (and no other)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            tasks = self.tasks(short)
            if len(tasks) == count and len(self.healthy(short)) == count:
                return time.monotonic() - start
            time.sleep(0.5)
        ps = run(["docker", "service", "ps", "--no-trunc", self.service(short)], check=False)
        raise AssertionError(f"{self.service(short)}: not {count} healthy tasks\n{ps.stdout}")

    def wait_update_done(self, short: str, timeout: float = CONVERGE_TIMEOUT) -> dict[str, Any]:
        """The service's UpdateStatus once the update left `updating` (completed, paused,
        rolled back)."""
        deadline = time.monotonic() + timeout
        while True:
            spec = json.loads(run(["docker", "service", "inspect", self.service(short)]).stdout)
            status: dict[str, Any] = spec[0].get("UpdateStatus") or {}
            if status.get("State") != "updating" or time.monotonic() > deadline:
                return status
            time.sleep(1)

    def nginx_request_ids(self) -> set[str]:
        """Request ids nginx logged (PacedTraffic.lost): every request it read."""
        return {i for task in self.tasks("nginx") for i in access_log_ids(self.logs(task["Id"]))}

    def logs(self, container_id: str) -> str:
        proc = subprocess.run(
            ["docker", "logs", container_id],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return proc.stdout + proc.stderr


def _leave(stack_name: str, node_id: str, created_gwbridge: bool) -> None:
    """Remove the stack and leave the swarm that made `node_id`; safe to call twice."""
    if _swarm_state() == "inactive" or _swarm_node_id() != node_id:
        return  # left already, or another swarm (not ours): never touched
    run(["docker", "stack", "rm", stack_name], check=False, timeout=120)
    deadline = time.monotonic() + 60  # containers stop gracefully (stop_grace_period 40 s)
    while time.monotonic() < deadline:
        left = run(
            ["docker", "ps", "-aq", "--filter", f"label=com.docker.stack.namespace={stack_name}"],
            check=False,
        ).stdout.split()
        if not left:
            break
        time.sleep(1)
    run(["docker", "swarm", "leave", "--force"], check=False, timeout=120)
    if created_gwbridge:  # its endpoints go a moment after the node leaves
        for _ in range(30):
            if run(["docker", "network", "rm", "docker_gwbridge"], check=False).returncode == 0:
                break
            time.sleep(1)


@pytest.fixture(scope="module")
def swarm(
    e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SwarmStack]:
    tag = e2e_env["APP_VERSION"]
    name = f"e2e-{tag.removeprefix('e2e-')}-swarm"
    env = dict(e2e_env)
    # The images a stack cannot build: this session's, plus a second app build to update to.
    images = build_images(env, name, v2=True)
    cert_file, key_file = certificate(tmp_path_factory.mktemp("swarm-certs"))
    try:
        lock_start = time.monotonic()
        with _swarm_lock():
            TIMINGS["swarm: waited for the host's swarm lock"] = time.monotonic() - lock_start
            yield from _swarm_stack(name, env, images, cert_file, key_file)
    finally:
        run(["docker", "image", "rm", images["app-v2"]], check=False)


def _swarm_stack(
    name: str, env: dict[str, str], images: dict[str, str], cert_file: Path, key_file: Path
) -> Iterator[SwarmStack]:
    """Under the lock: a swarm of our own, the stack on it, and always leaving it."""
    state = _swarm_state()
    if state != "inactive":
        pytest.fail(
            f"the engine is already in swarm mode ({state}) though this run holds "
            f"{SWARM_LOCK}: this test creates its own single-node swarm and would not "
            "touch another one (`docker swarm leave --force` if it is a leftover)",
            pytrace=False,
        )
    pool = free_pool()
    backend = list(pool.subnets(new_prefix=24))[-1]
    https_port, http_port = free_port(), free_port()
    env = {
        **env,
        "STACK_NAME": name,
        "TLS_CERT_FILE": str(cert_file),
        "TLS_KEY_FILE": str(key_file),
        "HTTPS_PORT": str(https_port),
        "HTTP_PORT": str(http_port),
        "BACKEND_SUBNET": str(backend),
        "SERVER_NAMES": "localhost",
    }
    had_gwbridge = (
        run(["docker", "network", "inspect", "docker_gwbridge"], check=False).returncode == 0
    )
    start = time.monotonic()
    run(
        [
            "docker",
            "swarm",
            "init",
            "--advertise-addr",
            "127.0.0.1",
            "--listen-addr",
            "127.0.0.1:2377",
            "--default-addr-pool",
            str(pool),
        ],
        timeout=120,
    )  # a failed init (another swarm raced in) raises here: nothing of ours to leave
    node_id = _swarm_node_id()
    leave = atexit.register(_leave, name, node_id, not had_gwbridge)
    try:
        run(["bash", str(DEPLOY), name], env=env, timeout=300)
        stack = SwarmStack(name, env, https_port, http_port, cert_file, images)
        stack.wait_healthy("app", 2)
        stack.wait_healthy("nginx", 1)
        _wait_serving(stack)
        TIMINGS["swarm: init + stack deploy until HTTPS answers"] = time.monotonic() - start
        yield stack
    finally:
        _leave(name, node_id, not had_gwbridge)
        atexit.unregister(leave)
    assert _swarm_node_id() != node_id, "the engine is still in the swarm this test made"


def _wait_serving(stack: SwarmStack, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    with stack.client() as client:
        while time.monotonic() < deadline:
            try:
                if client.get("/api/items/1").status_code == 200:
                    return
            except httpx.HTTPError as error:
                last = repr(error)
            time.sleep(0.5)
    raise AssertionError(f"the stack does not answer over HTTPS: {last}")


# ── the tests (in this order: each leaves the stack serving) ─────────────────────────────


def test_stack_serves_https_and_redirects(swarm: SwarmStack) -> None:
    with swarm.client() as client:
        response = client.get("/api/items/1")
    assert response.status_code == 200
    assert response.json()["id"] == 1
    plain = httpx.get(f"http://localhost:{swarm.http_port}/api/items/1", timeout=10)
    assert plain.status_code == 308
    assert plain.headers["location"] == f"https://localhost:{swarm.https_port}/api/items/1"
    for short in ("app", "nginx"):
        for task in swarm.tasks(short):
            host = task["HostConfig"]
            assert host["ReadonlyRootfs"] is True, short
            assert host["CapDrop"] == ["ALL"], short
            assert task["Config"]["User"] not in ("", "0", "root"), short


def test_image_update_under_load_fails_no_request(swarm: SwarmStack) -> None:
    service = swarm.service("app")
    old = {t["Id"] for t in swarm.tasks("app")}
    # nginx reloads as tasks come and go: retry an unanswered request on a reused
    # keep-alive connection, and check nginx never read it (traffic.py).
    with PacedTraffic(
        swarm.client, duration=240, max_requests=4000, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(30)
        start = time.monotonic()
        update = run(
            [
                "docker",
                "service",
                "update",
                "--detach=false",
                "--image",
                swarm.images["app-v2"],
                service,
            ],
            check=False,
            timeout=CONVERGE_TIMEOUT,
        )
        seconds = time.monotonic() - start
        assert update.returncode == 0, update.stdout + update.stderr
        # The CLI returns once the tasks converged; Swarm calls the update completed
        # after the last task's `monitor` window (30 s) without a failure: traffic on.
        status = swarm.wait_update_done("app")
        traffic.wait_for(30)  # and a few seconds on the new tasks alone
    TIMINGS["swarm: docker service update --image (2 tasks, start-first)"] = seconds
    TIMINGS["swarm: ... until UpdateStatus completed (monitor 30 s)"] = time.monotonic() - start
    NOTES.append(f"swarm update under paced traffic: {traffic.summary()}")
    assert status["State"] == "completed", status
    assert traffic.lost(swarm.nginx_request_ids()) == [], traffic.summary()
    assert len(traffic.succeeded) >= 200, traffic.summary()
    tasks = swarm.tasks("app")
    assert len(tasks) == 2
    assert not old & {t["Id"] for t in tasks}, "old tasks still run"
    assert {t["Config"]["Image"].split("@")[0] for t in tasks} == {swarm.images["app-v2"]}


def test_killed_task_is_replaced(swarm: SwarmStack) -> None:
    victim = swarm.healthy("app")[0]["Id"]
    start = time.monotonic()
    run(["docker", "kill", victim])
    while time.monotonic() - start < CONVERGE_TIMEOUT:
        healthy = swarm.healthy("app")
        if len(healthy) == 2 and victim not in {t["Id"] for t in healthy}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the killed task was not replaced by a healthy one")
    seconds = time.monotonic() - start
    TIMINGS["swarm: killed app task → replacement healthy"] = seconds
    NOTES.append(f"swarm: a killed app task was replaced, healthy after {seconds:.1f} s")
    _wait_serving(swarm)


def test_scaled_to_three_every_replica_serves(swarm: SwarmStack) -> None:
    run(["docker", "service", "scale", "--detach=false", f"{swarm.service('app')}=3"], timeout=300)
    swarm.wait_healthy("app", 3)
    tasks = swarm.tasks("app")
    seen: dict[str, int] = {}
    deadline = time.monotonic() + REPLICA_FOLLOW_TIMEOUT
    with PacedTraffic(
        swarm.client, duration=REPLICA_FOLLOW_TIMEOUT, max_requests=600, retry_unanswered=True
    ) as traffic:
        while time.monotonic() < deadline:
            time.sleep(2)
            ids = [o.request_id for o in traffic.succeeded]
            seen = {t["Id"][:12]: sum(rid in swarm.logs(t["Id"]) for rid in ids) for t in tasks}
            if all(seen.values()):
                break
    assert traffic.lost(swarm.nginx_request_ids()) == [], traffic.summary()
    assert all(seen.values()), f"requests served per replica: {seen}"
    NOTES.append(f"swarm: scaled to 3, requests per replica {sorted(seen.values())}")
