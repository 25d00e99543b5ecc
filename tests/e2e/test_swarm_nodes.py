"""deploy/swarm on two nodes: Debian docker.io engines in containers, and one of them lost.

The host engine stays out of it (no swarm mode here, so no SWARM_LOCK): each node is a
container of localbase/swarm-node (scripts/base-images.sh: Debian's docker.io) running
tests/e2e/swarm-node.sh, on a bridge network this module creates. The images are loaded
into every node (`docker save | docker load`), node 1 runs `swarm init` and node 2 joins
as a worker; the overlay networks span both nodes (VXLAN between the containers), the
app runs `endpoint_mode: dnsrr` and nginx runs on each node in host mode, as on real
hosts. deploy/swarm/deploy.sh deploys unchanged, aimed at node 1 by DOCKER_HOST.

The test: with paced GET+POST traffic through node 1's nginx, node 2 is killed (its
container, at once: no drain, as a power loss). Measured and asserted: the manager marks
it down, the app task it ran is rescheduled on node 1 and healthy, the service answers
throughout, failures are at most the requests in flight when the node died, and none
after the replacement. Everything this module started is removed at the end (the node
containers with their volumes, and with them both engines and their swarm).
"""

from __future__ import annotations

import json
import ssl
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import NOTES, SCRIPTS, TIMINGS, free_subnet, run
from swarm import DEPLOY, access_log_ids, build_images, certificate, free_pool
from traffic import PacedTraffic

if TYPE_CHECKING:
    from collections.abc import Iterator

# The fixture builds the node image when its recipe changed (~1.5 min on 2 cores) and
# forms the cluster before the test's own ~1 min: more than the default 600 s on a busy
# host.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

NODE_IMAGE = "localbase/swarm-node:trixie"
NODE_ENTRYPOINT = Path(__file__).with_name("swarm-node.sh")
# What a node container may do (swarm-node.sh says why not --privileged).
NODE_RIGHTS = [
    "--cap-add=ALL",
    "--cap-drop=SYS_RESOURCE",
    "--security-opt=seccomp=unconfined",
    "--security-opt=apparmor=unconfined",
    "--security-opt=systempaths=unconfined",
    "--device-cgroup-rule=a *:* rwm",
]
ENGINE_TIMEOUT = 60
# Node down: a few missed heartbeats (dispatcher period 5 s); then a new task starts
# and passes its healthcheck (interval 5 s).
RESCHEDULE_TIMEOUT = 120


@dataclass
class Node:
    container: str
    hostname: str
    ip: str

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> Any:
        return run(["docker", "-H", f"tcp://{self.ip}:2375", *args], timeout=timeout, check=check)


@dataclass
class Cluster:
    stack: str
    nodes: list[Node]
    cafile: Path
    started: list[str] = field(default_factory=list)

    @property
    def manager(self) -> Node:
        return self.nodes[0]

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 15)
        return httpx.Client(
            base_url=f"https://{self.manager.ip}",
            verify=ssl.create_default_context(cafile=str(self.cafile)),
            **kwargs,
        )

    def app_tasks(self) -> list[dict[str, Any]]:
        """The app's tasks Swarm wants running: node and state."""
        out = self.manager.docker(
            "service",
            "ps",
            f"{self.stack}_app",
            "--filter",
            "desired-state=running",
            "--format",
            "{{json .}}",
        ).stdout
        return [json.loads(line) for line in out.splitlines()]

    def healthy_app_containers(self, node: Node) -> int:
        out = node.docker(
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.swarm.service.name={self.stack}_app",
            "--filter",
            "health=healthy",
        ).stdout
        return len(out.split())

    def nginx_request_ids(self) -> set[str]:
        """Request ids the manager's nginx logged (PacedTraffic.lost): every request it read."""
        ids = self.manager.docker(
            "ps", "-q", "--filter", f"label=com.docker.swarm.service.name={self.stack}_nginx"
        ).stdout.split()
        found: set[str] = set()
        for container in ids:
            logs = self.manager.docker("logs", container, timeout=60)
            found |= access_log_ids(logs.stdout + logs.stderr)
        return found

    def node_status(self, hostname: str) -> str:
        out = self.manager.docker("node", "ls", "--format", "{{.Hostname}} {{.Status}}").stdout
        return dict(line.split(" ", 1) for line in out.splitlines()).get(hostname, "")


def _start_node(name: str, network: str) -> Node:
    run(
        [
            "docker",
            "run",
            "--detach",
            "--name",
            name,
            "--hostname",
            name,
            "--network",
            network,
            *NODE_RIGHTS,
            "--volume",
            "/var/lib/docker",  # overlay2 needs a real filesystem below it
            "--volume",
            f"{NODE_ENTRYPOINT}:/usr/local/bin/swarm-node:ro",
            "--label",
            "asgi-stack.e2e=swarm-node",
            NODE_IMAGE,
            "/usr/local/bin/swarm-node",
        ]
    )
    ip = run(
        [
            "docker",
            "inspect",
            "--format",
            f'{{{{(index .NetworkSettings.Networks "{network}").IPAddress}}}}',
            name,
        ]
    ).stdout.strip()
    node = Node(name, name, ip)
    deadline = time.monotonic() + ENGINE_TIMEOUT
    while node.docker("version", check=False, timeout=10).returncode != 0:
        if time.monotonic() > deadline:
            logs = run(["docker", "logs", "--tail", "30", name], check=False)
            raise AssertionError(f"node {name}: dockerd does not answer\n{logs.stderr}")
        time.sleep(1)
    return node


def _load_images(nodes: list[Node], images: list[str]) -> None:
    """`docker save | docker load` into every node, in parallel."""
    errors: list[str] = []

    def load(node: Node) -> None:
        save = subprocess.Popen(["docker", "save", *images], stdout=subprocess.PIPE)
        loaded = subprocess.run(
            ["docker", "-H", f"tcp://{node.ip}:2375", "load"],
            stdin=save.stdout,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        save.wait(timeout=60)
        if loaded.returncode or save.returncode:
            errors.append(f"{node.hostname}: {loaded.stderr[-2000:]}")

    threads = [threading.Thread(target=load, args=(n,)) for n in nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors


@pytest.fixture(scope="module")
def cluster(e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tag = e2e_env["APP_VERSION"]
    name = f"e2e-{tag.removeprefix('e2e-')}-nodes"
    start = time.monotonic()
    run(["bash", str(SCRIPTS / "base-images.sh"), "swarm-node"], timeout=900)
    images = build_images(dict(e2e_env), name)
    TIMINGS["swarm nodes: node image + app/nginx images"] = time.monotonic() - start
    network = f"{name}-{uuid.uuid4().hex[:4]}"
    for attempt in range(3):  # another stack may take the same free /24 meanwhile
        created = run(
            ["docker", "network", "create", "--subnet", free_subnet(), network], check=False
        )
        if created.returncode == 0:
            break
        if attempt == 2 or "overlap" not in created.stderr:
            raise RuntimeError(f"docker network create {network}: {created.stderr}")
    containers = [f"{network}-node{i}" for i in (1, 2)]
    try:
        start = time.monotonic()
        nodes = [_start_node(c, network) for c in containers]
        _load_images(nodes, list(images.values()))
        manager, worker = nodes
        pool = free_pool()
        manager.docker(
            "swarm",
            "init",
            "--advertise-addr",
            manager.ip,
            "--default-addr-pool",
            str(pool),
        )
        token = manager.docker("swarm", "join-token", "-q", "worker").stdout.strip()
        worker.docker("swarm", "join", "--token", token, f"{manager.ip}:2377")
        TIMINGS["swarm nodes: 2 engines up, images loaded, swarm formed"] = time.monotonic() - start
        cert_file, key_file = certificate(
            tmp_path_factory.mktemp("swarm-nodes-certs"), tuple(n.ip for n in nodes)
        )
        env = {
            **e2e_env,
            "DOCKER_HOST": f"tcp://{manager.ip}:2375",
            "STACK_NAME": name,
            "TLS_CERT_FILE": str(cert_file),
            "TLS_KEY_FILE": str(key_file),
            "HTTPS_PORT": "443",  # the nodes' own ports: nothing on this host is published
            "HTTP_PORT": "80",
            "BACKEND_SUBNET": str(list(pool.subnets(new_prefix=24))[-1]),
            "SERVER_NAMES": " ".join(["localhost", *(n.ip for n in nodes)]),
        }
        start = time.monotonic()
        run(["bash", str(DEPLOY), name], env=env, timeout=300)
        cluster = Cluster(name, nodes, cert_file)
        _wait(
            lambda: sum(cluster.healthy_app_containers(n) for n in nodes) == 2,
            240,
            "2 healthy app tasks",
        )
        _wait(lambda: _serves(cluster), 60, "the stack to answer over HTTPS")
        TIMINGS["swarm nodes: stack deploy until HTTPS answers"] = time.monotonic() - start
        yield cluster
    finally:
        for container in containers:
            run(["docker", "rm", "--force", "--volumes", container], check=False, timeout=120)
        run(["docker", "network", "rm", network], check=False)


def _wait(condition: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"no {what} after {timeout:.0f} s")
        time.sleep(0.5)
    return time.monotonic() - start


def _serves(cluster: Cluster) -> bool:
    try:
        with cluster.client() as client:
            return client.get("/api/items/1").status_code == 200
    except httpx.HTTPError:
        return False


def test_node_loss_reschedules_its_tasks(cluster: Cluster) -> None:
    manager, worker = cluster.nodes
    placed = sorted(t["Node"] for t in cluster.app_tasks())
    assert placed == sorted([manager.hostname, worker.hostname]), placed  # spread
    # nginx reloads when the lost task leaves its upstream: an unanswered request on a
    # reused keep-alive connection is retried once, and checked against nginx's log.
    with PacedTraffic(
        cluster.client, duration=240, max_requests=3600, retry_unanswered=True
    ) as traffic:
        traffic.wait_for(30)
        killed = time.monotonic()
        run(["docker", "kill", worker.container])
        down = _wait(
            lambda: cluster.node_status(worker.hostname) == "Down",
            RESCHEDULE_TIMEOUT,
            f"{worker.hostname} marked Down",
        )
        replaced = (
            _wait(
                lambda: cluster.healthy_app_containers(manager) == 2,
                RESCHEDULE_TIMEOUT,
                f"second healthy app task on {manager.hostname}",
            )
            + down
        )
        traffic.wait_for(30)  # and the service on the survivor alone
    TIMINGS["swarm nodes: node killed → marked Down"] = down
    TIMINGS["swarm nodes: node killed → its task healthy on the survivor"] = replaced
    NOTES.append(
        f"swarm nodes: node lost, Down after {down:.1f} s, task replaced and healthy after "
        f"{replaced:.1f} s; paced traffic {traffic.summary()}"
    )
    assert all(t["Node"] == manager.hostname for t in cluster.app_tasks())
    during = [o for o in traffic.since(killed) if o.started < killed + replaced]
    assert sum(o.ok for o in during) >= 20, traffic.summary()  # served throughout
    lost = traffic.lost(cluster.nginx_request_ids())
    assert len(lost) <= traffic.streams, traffic.summary()  # only those in flight
    assert not [o for o in lost if o.started >= killed + replaced], traffic.summary()
