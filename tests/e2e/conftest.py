"""The real compose stack for the e2e layer: built from this repo, on free ports, then removed.

Session flow: make sure `docker compose` (v2.20+), the base images and the wheelhouse are
there (scripts/), then `docker compose -p e2e-<id> up -d --build --wait` with free high
host ports, a free backend subnet and loopback-only published ports; tests talk to it
through nginx like a user; at the end `down -v --remove-orphans` for that project only.

Environment knobs:
  E2E_BASE_IMAGES=local|official  local (default): build on localbase/*:trixie from
                                  scripts/base-images.sh (no registry needed); official:
                                  the Dockerfiles' defaults (python:3.13-slim, nginx:1.27, ...)
  E2E_PROFILES=                   compose profiles of the shared stack (comma-separated; default
                                  none: tests that need a profile start their own stack)
  E2E_WHEELHOUSE=1                install the app's wheels from .cache/wheelhouse (0: from PyPI)
  E2E_KEEP=1                      leave the stacks running after the session (debugging)
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import socket
import ssl
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ACCESS_LOG_CONF = ROOT / "nginx" / "conf" / "logging" / "access-log.conf"
SCRIPTS = ROOT / "scripts"

# The CI base images (scripts/base-images.sh) for every base-image build arg.
LOCAL_BASE_IMAGES = {
    "PYTHON_IMAGE": "localbase/python:trixie",
    "NGINX_IMAGE": "localbase/nginx:trixie",
    "PROMETHEUS_IMAGE": "localbase/prometheus:trixie",
    "NGINX_EXPORTER_IMAGE": "localbase/nginx-exporter:trixie",
    "ALERTMANAGER_IMAGE": "localbase/alertmanager:trixie",
    "BLACKBOX_EXPORTER_IMAGE": "localbase/blackbox-exporter:trixie",
    "ACME_BASE_IMAGE": "localbase/acme:trixie",
    "PEBBLE_BASE_IMAGE": "localbase/pebble:trixie",  # tests/e2e/acme/ (test CA, e2e only)
}
# Backend subnets for test stacks: /24s of this range that no docker network or host
# route uses (10.240.0.0/24 is the compose default, left to a real stack).
TEST_SUBNETS = ipaddress.IPv4Network("10.240.0.0/16")
UP_TIMEOUT = 420  # build (cold: about 2 min on 2 cores) + start + healthy
# Errors of `up` that a retry with other ports / another subnet fixes (a race with
# another stack on this host).
RETRYABLE = (
    "port is already allocated",
    "address already in use",
    "Pool overlaps",
    "overlaps with",
)

# What the session measured, printed at the end (pytest_terminal_summary below).
TIMINGS: dict[str, float] = {}
NOTES: list[str] = []


# ── helpers ────────────────────────────────────────────────────────────────────


def run(
    cmd: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command, output captured; on failure (check) raise with its output."""
    proc = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def remove_images(repository: str) -> None:
    """Every tag of `repository`, an image name a test made its own (e.g. for `make deploy`,
    which keeps `<APP_IMAGE>:previous`)."""
    tags = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}", repository])
    for tag in tags.stdout.split():
        run(["docker", "image", "rm", tag], check=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_variables() -> list[str]:
    """Variables that set published host ports in docker-compose.yml (HTTP_PORT, ...)."""
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    names: set[str] = set()
    for service in (spec.get("services") or {}).values():
        for entry in service.get("ports") or []:
            text = entry if isinstance(entry, str) else json.dumps(entry)
            names.update(re.findall(r"\$\{([A-Z][A-Z0-9_]*)(?::?-[^}]*)?\}", text))
    return sorted(n for n in names if n.endswith("PORT"))


def used_subnets() -> list[ipaddress.IPv4Network]:
    """Every IPv4 subnet of a docker network or a host route: a new stack must avoid them."""
    nets: list[ipaddress.IPv4Network] = []
    ids = run(["docker", "network", "ls", "-q"]).stdout.split()
    if ids:
        out = run(
            [
                "docker",
                "network",
                "inspect",
                "--format",
                "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
                *ids,
            ],
            check=False,
        ).stdout
        for word in out.split():
            try:
                net = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if isinstance(net, ipaddress.IPv4Network):
                nets.append(net)
    routes = run(["ip", "-4", "route"], check=False).stdout if shutil.which("ip") else ""
    for word in re.findall(r"^(\d+\.\d+\.\d+\.\d+/\d+)", routes, flags=re.MULTILINE):
        nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets


def free_subnet() -> str:
    taken = used_subnets()
    candidates: list[ipaddress.IPv4Network] = list(TEST_SUBNETS.subnets(new_prefix=24))[1:]
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(other) for other in taken):
            return str(net)
    raise RuntimeError(f"no free /24 left in {TEST_SUBNETS} for a test stack")


# ── the stack ──────────────────────────────────────────────────────────────────


@dataclass
class Stack:
    """One running compose project: its ports, environment, containers and logs."""

    project: str
    env: dict[str, str] = field(repr=False)
    profiles: tuple[str, ...]
    http_port: int
    https_port: int
    ports: dict[str, int]
    started: tuple[str, ...] = ()  # services `up` was asked for (all of the profiles' if empty)
    skipped: tuple[str, ...] = ()  # services left out: their image can only be pulled
    cafile: Path | None = None
    up_seconds: float = 0.0
    # Compose files, in order; the first one's folder is the project directory (relative
    # paths, build contexts). Default: the repository's production file.
    files: tuple[Path, ...] = (COMPOSE_FILE,)

    # compose and docker
    def compose(
        self, *args: str, timeout: float = 180, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        profiles = [a for p in self.profiles for a in ("--profile", p)]
        files = [arg for f in self.files for arg in ("-f", str(f))]
        cmd = ["docker", "compose", *files, "-p", self.project, *profiles, *args]
        return run(cmd, env=self.env, timeout=timeout, check=check)

    def services(self) -> list[str]:
        """Services with a container in this project (running or not)."""
        out = self.compose("ps", "-a", "--format", "{{.Service}}").stdout
        return sorted(set(out.split()))

    def container_id(self, service: str) -> str:
        ids = self.compose("ps", "-a", "-q", service).stdout.split()
        assert ids, f"no container for service {service!r} in project {self.project}"
        return ids[0]

    def inspect(self, service: str) -> dict[str, Any]:
        out = run(["docker", "inspect", self.container_id(service)]).stdout
        return dict(json.loads(out)[0])

    def environment(self, service: str) -> dict[str, str]:
        """The variables set in the service's container. Compose's pass-through entries
        (`- NAME`) that were unset appear in `Config.Env` as a bare NAME: not set, skipped."""
        env = self.inspect(service)["Config"]["Env"]
        return dict(item.split("=", 1) for item in env if "=" in item)

    def exec(
        self,
        service: str,
        *cmd: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the service's running container (as its user unless `user`)."""
        args = ["docker", "exec", *(["--user", user] if user else []), self.container_id(service)]
        return run([*args, *cmd], timeout=timeout, check=check)

    def make(self, target: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`make <target>` of the repository, aimed at this stack's project."""
        return subprocess.run(
            ["make", "--no-print-directory", target],
            cwd=ROOT,
            env={**os.environ, **self.env, "COMPOSE_PROJECT_NAME": self.project},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def nginx_worker_pids(self) -> set[str]:
        """The pids of nginx's worker processes (old ones included, while they drain)."""
        out = self.exec(
            "nginx",
            "sh",
            "-c",
            'for d in /proc/[0-9]*; do grep -qs "worker process" "$d/cmdline" '
            '&& echo "${d#/proc/}"; done; true',
        ).stdout
        return set(out.split())

    def logs(self, service: str) -> list[str]:
        """The service's log lines, stdout and stderr interleaved, as Docker stored them."""
        proc = subprocess.run(
            ["docker", "logs", self.container_id(service)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]

    def records(self, service: str) -> list[dict[str, Any]]:
        """The service's log lines that are JSON objects, parsed."""
        found = []
        for line in self.logs(service):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                found.append(value)
        return found

    def nginx_request_ids(self) -> set[str]:
        """Request ids of nginx's access log: every request nginx read, answered or not
        (PacedTraffic.lost). Read after the access log's flush interval, so a buffered line
        of the last requests is there too: an absent id must mean nginx never read it."""
        time.sleep(access_log_flush_seconds() + 0.5)
        return {
            str(r["request_id"])
            for r in self.records("nginx")
            if r.get("logger") == "nginx.access" and "request_id" in r
        }

    # through nginx, like a client
    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def ssl_context(self) -> ssl.SSLContext:
        """Trusts the stack's own self-signed certificate (and nothing else)."""
        assert self.cafile is not None, "the stack's certificate was not copied out"
        return ssl.create_default_context(cafile=str(self.cafile))

    def client(self, **kwargs: Any) -> httpx.Client:
        """An httpx client on https://127.0.0.1:<HTTPS_PORT> that verifies the certificate."""
        kwargs.setdefault("timeout", 15)
        return httpx.Client(base_url=self.url, verify=self.ssl_context(), **kwargs)


class StackFactory:
    """Brings stacks up (each its own project, ports and subnet) and removes them at the end."""

    def __init__(self, base_env: dict[str, str], certs_dir: Path) -> None:
        self.base_env = base_env
        self.certs_dir = certs_dir
        self.stacks: list[Stack] = []
        self.run_id = uuid.uuid4().hex[:8]

    def up(
        self,
        name: str,
        profiles: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        attempts: int = 3,
        files: tuple[Path, ...] = (COMPOSE_FILE,),
    ) -> Stack:
        last_error = ""
        for attempt in range(1, attempts + 1):
            stack = self._new(name, profiles, env or {}, files)
            self._select_services(stack)
            self.stacks.append(stack)
            start = time.monotonic()
            proc = stack.compose(
                "up",
                "-d",
                "--build",
                "--wait",
                "--wait-timeout",
                str(UP_TIMEOUT - 60),
                *stack.started,
                timeout=UP_TIMEOUT,
                check=False,
            )
            if proc.returncode == 0:
                stack.up_seconds = time.monotonic() - start
                TIMINGS[f"compose up --build --wait ({name})"] = stack.up_seconds
                stack.cafile = self._copy_certificate(stack)
                return stack
            last_error = proc.stdout[-3000:] + proc.stderr[-3000:]
            diagnostics = self._diagnostics(stack)
            self.down(stack)
            if attempt < attempts and any(marker in last_error for marker in RETRYABLE):
                continue
            pytest.fail(
                f"`docker compose up` of project {stack.project} failed:\n{last_error}\n"
                f"{diagnostics}",
                pytrace=False,
            )
        raise AssertionError("unreachable")

    def down(self, stack: Stack) -> None:
        if os.environ.get("E2E_KEEP") == "1":
            return
        stack.compose("down", "-v", "--remove-orphans", "--timeout", "45", timeout=180, check=False)
        if stack in self.stacks:
            self.stacks.remove(stack)

    def close(self) -> None:
        for stack in list(self.stacks):
            self.down(stack)
        self._retag_images()

    def _retag_images(self) -> None:
        """This session's images (tag e2e-<run id>) become `:e2e`, the next session's cache.

        A tag per session keeps concurrent sessions (other checkouts on this host) from
        swapping images under each other; the stable tag keeps the layer cache warm.
        """
        if os.environ.get("E2E_KEEP") == "1":
            return
        tag = self.base_env["APP_VERSION"]
        refs = run(["docker", "image", "ls", "--format", "{{.Repository}}:{{.Tag}}"]).stdout
        for ref in refs.split():
            if ref.endswith(f":{tag}"):
                repo = ref.rsplit(":", 1)[0]
                run(["docker", "tag", ref, f"{repo}:e2e"], check=False)
                run(["docker", "image", "rm", ref], check=False)

    def _new(
        self, name: str, profiles: tuple[str, ...], extra: dict[str, str], files: tuple[Path, ...]
    ) -> Stack:
        ports = {var: free_port() for var in port_variables()}
        env = dict(self.base_env)
        env.update({var: str(port) for var, port in ports.items()})
        env["BACKEND_SUBNET"] = free_subnet()
        env["EDGE_SUBNET"] = free_subnet()
        while env["EDGE_SUBNET"] == env["BACKEND_SUBNET"]:
            env["EDGE_SUBNET"] = free_subnet()
        # From the host, requests reach nginx from the edge network's gateway, which the
        # default allow-list exempts: list loopback only, so the limiter can be observed.
        env.setdefault("RATE_LIMIT_ALLOWLIST", "127.0.0.1/32")
        env.update(extra)
        project = f"e2e-{self.run_id}-{name}"
        return Stack(
            project=project,
            env=env,
            profiles=profiles,
            http_port=int(env["HTTP_PORT"]),
            https_port=int(env["HTTPS_PORT"]),
            ports={var: int(env[var]) for var in ports},
            files=files,
        )

    def _select_services(self, stack: Stack) -> None:
        """Leave out services whose image is neither built here nor present locally.

        Nothing can be pulled on a machine without a registry (CI here): e.g. Grafana has no
        Debian package to build a local base from. With official base images, all run.
        """
        if self.base_env.get("E2E_BASE_IMAGES_MODE") != "local":
            return
        config = json.loads(stack.compose("config", "--format", "json").stdout)
        keep: list[str] = []
        skip: list[str] = []
        for name, service in sorted(config["services"].items()):
            image = service.get("image", "")
            pullable_only = (
                "build" not in service
                and run(["docker", "image", "inspect", image], check=False).returncode != 0
            )
            (skip if pullable_only else keep).append(name)
        if skip:
            stack.started, stack.skipped = tuple(keep), tuple(skip)
            NOTES.append(f"{stack.project}: not started (image must be pulled): {', '.join(skip)}")

    def _copy_certificate(self, stack: Stack) -> Path:
        """nginx's certificate from its volume, so clients verify TLS instead of skipping it."""
        pem = stack.exec("nginx", "cat", "/etc/nginx/certs/fullchain.pem").stdout
        assert "BEGIN CERTIFICATE" in pem, "nginx has no certificate at /etc/nginx/certs"
        path = self.certs_dir / f"{stack.project}.pem"
        path.write_text(pem)
        return path

    @staticmethod
    def _diagnostics(stack: Stack) -> str:
        ps = stack.compose("ps", "-a", check=False).stdout
        logs = stack.compose("logs", "--no-color", "--tail", "60", check=False).stdout
        return f"--- compose ps ---\n{ps}\n--- compose logs (tail) ---\n{logs[-8000:]}"


# ── fixtures ───────────────────────────────────────────────────────────────────


def _script(name: str, *args: str, timeout: float = 900) -> None:
    start = time.monotonic()
    run(["bash", str(SCRIPTS / name), *args], timeout=timeout)
    TIMINGS[f"scripts/{name}"] = time.monotonic() - start


def access_log_flush_seconds(conf: Path = ACCESS_LOG_CONF) -> float:
    """At the latest after this nginx writes a buffered access line (`flush=`; 0: unbuffered)."""
    match = re.search(r"^access_log\s[^;]*\bflush=(\d+)s", conf.read_text(), re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture(scope="session")
def e2e_env() -> dict[str, str]:
    """Prerequisites (compose plugin, base images, wheelhouse) and the compose environment."""
    base = os.environ.get("E2E_BASE_IMAGES", "local")
    if base not in ("local", "official"):
        pytest.fail(f"E2E_BASE_IMAGES={base!r}: expected 'local' or 'official'", pytrace=False)
    _script("ensure-compose.sh", timeout=300)
    if base == "local":
        _script("base-images.sh")
    if os.environ.get("E2E_WHEELHOUSE", "1") == "1":
        _script("wheelhouse.sh", timeout=300)
    else:
        run(["bash", str(SCRIPTS / "wheelhouse.sh"), "--clean"])

    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    env.update(
        {
            "HTTP_BIND": "127.0.0.1",  # test stacks are reachable from this host only
            # Image tags are `<repo>:${APP_VERSION}` in docker-compose.yml: one per session.
            "APP_VERSION": f"e2e-{uuid.uuid4().hex[:8]}",
            "APP_IMAGE": "asgi-stack-e2e/app",
            "NGINX_IMAGE_NAME": "asgi-stack-e2e/nginx",
            "PROMETHEUS_IMAGE_NAME": "asgi-stack-e2e/prometheus",
            "LOCUST_IMAGE": "asgi-stack-e2e/locust",
            "ACME_IMAGE": "asgi-stack-e2e/acme",
            "PEBBLE_IMAGE": "asgi-stack-e2e/pebble",
        }
    )
    if base == "local":
        env.update(LOCAL_BASE_IMAGES)
    env["E2E_BASE_IMAGES_MODE"] = base
    return env


@pytest.fixture(scope="session")
def stack_factory(
    e2e_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[StackFactory]:
    """Start extra stacks (e.g. one a test may stop); all are removed at session end."""
    factory = StackFactory(e2e_env, tmp_path_factory.mktemp("e2e-certs"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def stack(stack_factory: StackFactory) -> Stack:
    """The shared stack (core services + E2E_PROFILES), up and healthy.

    Tests must leave it running: one that stops or reconfigures services uses its own
    stack from `stack_factory`.
    """
    profiles = tuple(p for p in os.environ.get("E2E_PROFILES", "").split(",") if p)
    return stack_factory.up("main", profiles=profiles)


@pytest.fixture(scope="session")
def e2e_summary() -> list[str]:
    """Lines a test wants in the session's closing "e2e" section (sizes, timings)."""
    return NOTES


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if TIMINGS or NOTES:
        terminalreporter.section("e2e")
        for what, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{seconds:7.1f} s  {what}")
        for line in NOTES:
            terminalreporter.write_line(line)
