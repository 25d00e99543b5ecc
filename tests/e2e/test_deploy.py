"""`make deploy` and `make rollback` on a real stack, under a paced stream of reads and writes.

One stack for the module (each step builds on the one before, as on a server):

1. with no stack running, `make deploy` says so and exits 2;
2. deploy v1 → v2 with two replicas: no request fails, a second deploy started meanwhile
   is refused, and afterwards every request is answered by a v2 replica;
3. deploy v2 again with an invalid setting: it fails naming the setting, the new replicas
   are removed, no request fails, the v2 replicas still serve;
4. deploy a version whose readiness never succeeds (healthy, /readyz 503: the serving
   layer's stand-in for an app that does not import, with RELOAD on through a compose
   override): after DEPLOY_TIMEOUT it is removed, never in nginx's upstream, no request
   fails, the v2 replicas still serve;
5. `make rollback`: back to v1, no request fails.

A request is attributed to the replica that served it by its `X-Request-ID` in that
container's access log; a replica's version is the APP_VERSION baked into its image.
The figures (failed requests, deploy duration, seconds until a new replica is in nginx's
upstream) are printed in the session's e2e summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import TIMINGS, remove_images, run
from traffic import PacedTraffic

if TYPE_CHECKING:
    from collections.abc import Iterator

    from conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
REPLICAS = 2
SETTLE = 3.0  # seconds of traffic after a step, all of it answered by the replicas left
DEPLOY_TIMEOUT = 600  # the make command's own bound (a build included)
NEVER_READY_TIMEOUT = 20  # DEPLOY_TIMEOUT of the deploy that never gets ready (10 at least)


# ── helpers ────────────────────────────────────────────────────────────────────


def make_env(stack: Stack, **extra: str) -> dict[str, str]:
    return {**os.environ, **stack.env, "COMPOSE_PROJECT_NAME": stack.project, **extra}


def records(stdout: str) -> list[dict[str, Any]]:
    """The deploy's JSON lines (every line of its stdout must be one)."""
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def event(lines: list[dict[str, Any]], name: str) -> dict[str, Any]:
    found = [r for r in lines if r["event"] == name]
    assert found, f"no {name!r} line in {[r['event'] for r in lines]}"
    return found[-1]


class Make:
    """`make <target>` in the background, its JSON lines collected as they come."""

    def __init__(self, target: str, env: dict[str, str]) -> None:
        self.lines: list[dict[str, Any]] = []
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in finish()
        self.process = subprocess.Popen(
            ["make", "--no-print-directory", target],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.strip():
                try:
                    self.lines.append(json.loads(line))
                except json.JSONDecodeError:  # every stdout line must be JSON: fails below
                    self.lines.append({"event": "not JSON", "line": line})

    def wait_for(self, name: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not any(r["event"] == name for r in self.lines):
            assert self.process.poll() is None or self._reader.is_alive(), self.lines
            assert time.monotonic() < deadline, f"no {name!r} within {timeout}s: {self.lines}"
            time.sleep(0.1)

    def finish(self) -> int:
        self.process.wait(timeout=DEPLOY_TIMEOUT)
        self._reader.join(timeout=10)
        self._stderr.seek(0)
        self.stderr = self._stderr.read()
        self._stderr.close()
        assert not [r for r in self.lines if r["event"] == "not JSON"], self.lines
        return self.process.returncode


def app_containers(stack: Stack) -> list[dict[str, Any]]:
    ids = stack.compose("ps", "-a", "-q", "app").stdout.split()
    return list(json.loads(run(["docker", "inspect", *ids]).stdout)) if ids else []


def version_of(container: dict[str, Any]) -> str:
    env = dict(item.split("=", 1) for item in container["Config"]["Env"] if "=" in item)
    return env["APP_VERSION"]


def served_by(stack: Stack, containers: list[dict[str, Any]]) -> dict[str, str]:
    """request id -> the version of the replica whose access log has it."""
    found: dict[str, str] = {}
    for container in containers:
        logs = run(["docker", "logs", container["Id"]]).stdout.splitlines()
        for line in logs:
            if '"request_id"' in line:
                found[json.loads(line)["request_id"]] = version_of(container)
    return found


def upstream(stack: Stack) -> list[str]:
    return stack.exec("nginx", "nginx-upstreams").stdout.split()


def wait_for_upstream(stack: Stack, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(upstream(stack)) != count:
        assert time.monotonic() < deadline, f"nginx upstream never had {count}: {upstream(stack)}"
        time.sleep(0.5)


def failing_deploy(stack: Stack, env: dict[str, str]) -> tuple[Make, int, PacedTraffic]:
    """`make deploy` that must fail, under paced traffic that must lose nothing."""
    with PacedTraffic(
        stack.client, duration=240, max_requests=4000, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(20)
        deploy = Make("deploy", env)
        code = deploy.finish()
        time.sleep(SETTLE)
    assert traffic.lost(stack.nginx_request_ids()) == [], traffic.summary()
    assert code != 0, f"{deploy.lines}\n{deploy.stderr[-3000:]}"
    return deploy, code, traffic


# ── the stack ──────────────────────────────────────────────────────────────────


@pytest.fixture(scope="module")
def deploy_stack(stack_factory: StackFactory) -> Iterator[Stack]:
    # Its own image name: the deploy keeps `<APP_IMAGE>:previous`, which must not be
    # shared with other stacks (or other sessions) on this host.
    image = f"asgi-stack-e2e/deploy-{stack_factory.run_id}"
    stack = stack_factory.up("deploy", env={"APP_IMAGE": image})
    try:
        stack.compose("up", "-d", "--no-deps", "--no-recreate", "--scale", f"app={REPLICAS}", "app")
        wait_for_upstream(stack, REPLICAS)
        yield stack
    finally:
        stack_factory.down(stack)
        remove_images(image)


@pytest.fixture(scope="module")
def versions(deploy_stack: Stack) -> dict[str, str]:
    v1 = deploy_stack.env["APP_VERSION"]
    return {"v1": v1, "v2": f"{v1}-v2"}


# ── the steps ──────────────────────────────────────────────────────────────────


def test_deploy_without_a_running_stack_says_so(e2e_env: dict[str, str]) -> None:
    env = {**os.environ, **e2e_env, "COMPOSE_PROJECT_NAME": "e2e-no-such-stack"}
    proc = subprocess.run(
        ["make", "--no-print-directory", "deploy"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode != 0
    refused = event(records(proc.stdout), "deploy refused")
    assert "no running app container in project 'e2e-no-such-stack'" in refused["reason"]
    assert "make up" in refused["reason"]


def test_deploy_v1_to_v2_fails_no_request_and_refuses_a_second_one(
    deploy_stack: Stack, versions: dict[str, str], e2e_summary: list[str]
) -> None:
    stack = deploy_stack
    before = app_containers(stack)
    assert {version_of(c) for c in before} == {versions["v1"]}

    with PacedTraffic(
        stack.client, duration=240, max_requests=4000, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(20)
        deploy = Make("deploy", make_env(stack, APP_VERSION=versions["v2"]))
        deploy.wait_for("deploy started")
        # A second deploy while the first holds the lock: refused, nothing touched.
        second = subprocess.run(
            ["make", "--no-print-directory", "deploy"],
            cwd=ROOT,
            env=make_env(stack, APP_VERSION=versions["v2"]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert deploy.finish() == 0, f"{deploy.lines}\n{deploy.stderr[-3000:]}"
        done = time.monotonic()
        time.sleep(SETTLE)
    assert traffic.lost(stack.nginx_request_ids()) == [], traffic.summary()

    assert second.returncode != 0, second.stdout + second.stderr
    refused = event(records(second.stdout), "deploy refused")
    assert "another deploy of project" in refused["reason"]
    assert "`make deploy`, pid" in refused["reason"]

    after = app_containers(stack)
    assert len(after) == REPLICAS
    assert {version_of(c) for c in after} == {versions["v2"]}
    assert not {c["Id"] for c in before} & {c["Id"] for c in after}, "old replicas left"
    late = [o for o in traffic.succeeded if o.started > done]
    assert len(late) >= 10, traffic.summary()
    answered = served_by(stack, after)
    assert {answered.get(o.request_id) for o in late} == {versions["v2"]}

    finished = event(deploy.lines, "deploy done")
    removed = [r for r in deploy.lines if r["event"] == "replicas removed"]
    assert removed[-1]["left_upstream_before_exit"] is True, deploy.lines  # drained first
    TIMINGS["make deploy v1 -> v2"] = finished["seconds"]
    e2e_summary.append(
        f"deploy v1 -> v2 ({REPLICAS} replicas): {len(traffic.outcomes)} requests, "
        f"{len(traffic.failures)} failed; {finished['seconds']} s; new replicas in nginx's "
        f"upstream {finished['seconds_to_upstream']} s after their start"
    )


def test_deploy_with_an_invalid_setting_is_undone_and_v2_serves_on(
    deploy_stack: Stack, versions: dict[str, str], e2e_summary: list[str]
) -> None:
    stack = deploy_stack
    before = {c["Id"] for c in app_containers(stack)}
    env = make_env(stack, APP_VERSION=versions["v2"], WORKER_TIMEOUT="soon")
    deploy, code, traffic = failing_deploy(stack, env)
    failed = event(deploy.lines, "deploy failed")
    assert "WORKER_TIMEOUT='soon' is invalid" in failed["reason"], failed
    assert any("WORKER_TIMEOUT" in line for line in failed["last_lines"]), failed
    removed = event(deploy.lines, "replicas removed")
    assert removed["were_in_upstream"] is False  # never got a request
    after = app_containers(stack)
    assert {c["Id"] for c in after} == before, "the v2 replicas must be the ones serving"
    assert all(c["State"]["Running"] for c in after)
    assert {version_of(c) for c in after} == {versions["v2"]}
    e2e_summary.append(
        f"deploy with WORKER_TIMEOUT=soon: exit {code} naming it, {len(traffic.outcomes)} "
        f"requests, {len(traffic.failures)} failed"
    )


def test_deploy_that_never_gets_ready_is_undone_and_v2_serves_on(
    deploy_stack: Stack, versions: dict[str, str], e2e_summary: list[str], tmp_path: Path
) -> None:
    stack = deploy_stack
    before = {c["Id"] for c in app_containers(stack)}
    override = tmp_path / "never-ready.yml"
    override.write_text("services:\n  app:\n    environment:\n      - RELOAD=on\n")
    env = make_env(
        stack,
        APP_VERSION=versions["v2"],
        APP_MODULE="app.never_imported:app",
        DEPLOY_TIMEOUT=str(NEVER_READY_TIMEOUT),
        COMPOSE_FILE=f"{ROOT / 'docker-compose.yml'}:{override}",
    )
    deploy, code, traffic = failing_deploy(stack, env)
    failed = event(deploy.lines, "deploy failed")
    assert f"not ready within DEPLOY_TIMEOUT={NEVER_READY_TIMEOUT}s" in failed["reason"], failed
    assert "in nginx upstream: False" in failed["reason"], failed
    removed = event(deploy.lines, "replicas removed")
    assert removed["were_in_upstream"] is False
    after = app_containers(stack)
    assert {c["Id"] for c in after} == before, "the v2 replicas must be the ones serving"
    assert {version_of(c) for c in after} == {versions["v2"]}
    assert len(upstream(stack)) == REPLICAS
    e2e_summary.append(
        f"deploy never ready (/readyz 503): exit {code} after DEPLOY_TIMEOUT="
        f"{NEVER_READY_TIMEOUT}s, {len(traffic.outcomes)} requests, {len(traffic.failures)} failed"
    )


def test_rollback_returns_to_v1_without_failing_a_request(
    deploy_stack: Stack, versions: dict[str, str], e2e_summary: list[str]
) -> None:
    stack = deploy_stack
    with PacedTraffic(
        stack.client, duration=240, max_requests=4000, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(20)
        rollback = Make("rollback", make_env(stack, APP_VERSION=versions["v2"]))
        assert rollback.finish() == 0, f"{rollback.lines}\n{rollback.stderr[-3000:]}"
        done = time.monotonic()
        time.sleep(SETTLE)
    assert traffic.lost(stack.nginx_request_ids()) == [], traffic.summary()

    after = app_containers(stack)
    assert len(after) == REPLICAS
    assert {version_of(c) for c in after} == {versions["v1"]}
    late = [o for o in traffic.succeeded if o.started > done]
    answered = served_by(stack, after)
    assert {answered.get(o.request_id) for o in late} == {versions["v1"]}
    finished = event(rollback.lines, "rollback done")
    TIMINGS["make rollback v2 -> v1"] = finished["seconds"]
    e2e_summary.append(
        f"rollback v2 -> v1: {len(traffic.outcomes)} requests, {len(traffic.failures)} failed; "
        f"{finished['seconds']} s"
    )
