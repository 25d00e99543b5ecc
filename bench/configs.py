"""The configurations the benchmark compares: how each server side starts, and with which
clients it is measured.

A Setup is a server side (one or more processes or containers) that is started for its
turn in a round and stopped after it; each of its Configs is one row of the report: the
setup measured by one client (wrk: HTTP/1.1 keep-alive; h2load: HTTP/2 multiplexed, or
HTTP/1.1 for a server without TLS). Starting each setup only for its turn keeps idle
servers off the measured core and lets several nginx on the host's network (same ports)
take turns.

Ours:
    ceiling         bare uvicorn (uvloop, httptools, no access log) + app.main:app: the
                    reference every ratio is taken to
    gunicorn        gunicorn -c server/gunicorn_conf.py, 1 worker: our worker class and
                    serving layer (request id, JSON access line, metrics)
    ours            the shipped nginx service (image, entrypoint, docker-compose.yml
                    settings) on the host's network in front of that gunicorn
    ours + OTLP     the same with OTEL_EXPORTER_OTLP_ENDPOINT set: a span per request
                    exported to a sink on loopback (bench/otlp_sink.py): the price of
                    span export (unset, the SDK is not even imported: that is `ours`)
    ours, off       the same with nginx's access log, the app's access lines and its
                    per-request HTTP metrics off: the price of those features
    compose         the compose stack as it runs: app and nginx containers, Docker's bridge
                    networks, the port published on 127.0.0.1
    compose, host   the same containers on the host's network: what Docker's networking adds
The peers, each as its users run it (bench/peers.py), in front of the same app.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import ssl
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.processes import (
    Server,
    docker_proxies,
    free_port,
    port_is_free,
    start_compose,
    start_host,
    wait_listening,
    wait_ready,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench.load import Run
    from bench.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE_TAG = "bench"  # APP_VERSION of the images `make bench` builds (asgi-stack/*:bench)
NGINX_PORTS = (8443, 8080, 8081)  # nginx/conf's listen ports: the host's, with network host
REQUEST_ID = "X-Request-ID: bench-0123456789abcdef"  # well-formed: accepted, not generated
DEFAULT_CONNECTION_LIMIT = 32  # nginx/docker-entrypoint.sh's CONNECTION_LIMIT default
# Backend and edge subnets of the bench's compose stack: free /24s of this range.
BENCH_SUBNETS = ipaddress.IPv4Network("10.243.0.0/16")

WRK, H2LOAD = "wrk", "h2load"


@dataclass
class Started:
    """A running setup: its parts (name -> server) and where to send the load."""

    parts: dict[str, Server]
    url: str
    cafile: Path | None = None
    # Run beside the server side, not part of it (not measured): the OTLP sink.
    helpers: dict[str, Server] = field(default_factory=dict)
    summary: Callable[[], str] | None = None  # a line for the report, after stop()

    def stop(self) -> str:
        """Stop the servers, then the helpers (the app's last span export still lands);
        the summary line, if any."""
        for server in reversed(self.parts.values()):
            server.stop()
        for helper in self.helpers.values():
            helper.stop()
        return self.summary() if self.summary else ""


@dataclass
class Config:
    """One row of the report: a setup measured by one client."""

    name: str
    # ceiling | gunicorn | no-log | ours | ours-otlp | ours-off | peer | compose | tree | raw
    role: str
    client: str = WRK
    headers: tuple[str, ...] = ()  # sent by the load generator besides Host
    runs: list[Run] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))

    @property
    def us_per_request(self) -> float:
        """Server CPU per request, µs (all of the server side's processes)."""
        eff = self.median("per_cpu_second")
        return 1e6 / eff if eff else 0.0


@dataclass
class Setup:
    name: str
    start: Callable[[Path], Started]  # in its own work directory
    configs: list[Config]


def connection_limit(settings: Settings) -> int:
    """nginx's per-client limit of requests in progress for the bench's one client (all of
    its connections, and each HTTP/2 stream, count): at least what the client keeps in
    flight, so the benchmark never measures the limiter's 429s."""
    return max(DEFAULT_CONNECTION_LIMIT, settings.connections * settings.streams)


UVICORN = [
    str(VENV_BIN / "uvicorn"),
    *("--loop", "uvloop", "--http", "httptools", "--no-access-log"),
    *("--log-level", "warning", "--host", "127.0.0.1"),
]
GUNICORN = [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"]


def server_env(work: Path, root: Path = ROOT, **extra: str) -> dict[str, str]:
    """The environment of a host server: this venv, its own metrics directory."""
    multiproc = work / "metrics"
    multiproc.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "WORKER_TMP_DIR": str(work),
        "LOG_FORMAT": "json",
        **extra,
    }


def gunicorn_env(work: Path, port: int, root: Path = ROOT, **extra: str) -> dict[str, str]:
    """One worker, no recycling, metrics on a free loopback port."""
    return server_env(
        work,
        root,
        HOST="127.0.0.1",
        PORT=str(port),
        METRICS_HOST="127.0.0.1",
        METRICS_PORT=str(free_port()),
        WEB_CONCURRENCY="1",
        # A worker restart (app import) every 10k requests would dominate a 10 s run.
        MAX_REQUESTS="0",
        **extra,
    )


def self_signed(directory: Path) -> Path:
    """A throw-away certificate for localhost, as fullchain.pem/privkey.pem (the nginx
    image's default names) in `directory`; returns the certificate to trust."""
    directory.mkdir(mode=0o755, exist_ok=True)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
    if cert.exists():
        return cert
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-new", "-nodes", "-sha256", "-days", "2"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    # nginx runs as uid 101 in its container: a throw-away key in a private temp dir.
    key.chmod(0o644)
    cert.chmod(0o644)
    return cert


def host(name: str, argv: list[str], env: dict[str, str], work: Path, settings: Settings) -> Server:
    log = work / f"{name.split(maxsplit=1)[0]}-{free_port()}.log"
    return start_host(name, argv, env, log, cpu=settings.server_cpu, cwd=ROOT)


def ensure_nginx_ports() -> None:
    busy = [port for port in NGINX_PORTS if not port_is_free(port)]
    if busy:
        raise RuntimeError(
            f"ports {busy} are in use on this host: nginx on the host's network listens on "
            f"{NGINX_PORTS} (nginx/conf); stop what holds them"
        )


# --- compose ----------------------------------------------------------------------------


def compose_env(project: str, settings: Settings, certs: Path, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "APP_VERSION": IMAGE_TAG,
        "BENCH_SERVER_CPU": str(settings.server_cpu),
        "BENCH_CERTS": str(certs),
        "CONNECTION_LIMIT": str(connection_limit(settings)),
        "WEB_CONCURRENCY": "1",
        "MAX_REQUESTS": "0",
        **extra,
    }


def _used_subnets() -> list[ipaddress.IPv4Network]:
    ids = subprocess.run(
        ["docker", "network", "ls", "--quiet"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.split()
    if not ids:
        return []
    out = subprocess.run(
        ["docker", "network", "inspect", *ids],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    found = []
    for network in json.loads(out):
        for entry in (network.get("IPAM") or {}).get("Config") or []:
            if "." in entry.get("Subnet", ""):
                found.append(ipaddress.IPv4Network(entry["Subnet"], strict=False))
    return found


def free_subnets(count: int) -> list[str]:
    used = _used_subnets()
    candidates = [
        net
        for net in BENCH_SUBNETS.subnets(new_prefix=24)
        if not any(net.overlaps(other) for other in used)
    ]
    if len(candidates) < count:
        raise RuntimeError(f"no {count} free /24 subnets left in {BENCH_SUBNETS}")
    return [str(net) for net in random.sample(candidates, count)]


def _compose(*overrides: str) -> list[str]:
    files = ["-f", str(COMPOSE_FILE)]
    for name in overrides:
        files += ["-f", str(HERE / name)]
    return ["docker", "compose", *files]


def start_otlp_sink(work: Path, settings: Settings) -> tuple[Server, str, Callable[[], str]]:
    """bench/otlp_sink.py on a free loopback port, pinned to the client core (it stands for
    a collector elsewhere: not the server side's CPU). Returns it, the endpoint for
    OTEL_EXPORTER_OTLP_ENDPOINT and what it received, as a line for the report."""
    port, counts = free_port(), work / "otlp-counts.json"
    argv = [sys.executable, "-m", "bench.otlp_sink", str(port), str(counts)]
    log = work / "otlp-sink.log"
    sink = start_host("otlp sink", argv, server_env(work), log, cpu=settings.client_cpu, cwd=ROOT)
    wait_listening(sink, port)

    def received() -> str:
        got = json.loads(counts.read_text()) if counts.exists() else {}
        return f"{got.get('spans', 0):,} spans in {got.get('exports', 0):,} exports"

    return sink, f"http://127.0.0.1:{port}", received


def start_ours(
    work: Path,
    settings: Settings,
    *,
    features: bool = True,
    otlp: bool = False,
    overrides: list[str] | None = None,
) -> Started:
    """Our gunicorn on the host, the shipped nginx service on the host's network; with
    `otlp`, the app exports a span per request to a sink on loopback; `overrides`: more
    compose files for nginx (paths; bench/ablate.py's variants)."""
    ensure_nginx_ports()
    port = free_port()
    helpers: dict[str, Server] = {}
    summary = None
    extra: dict[str, str] = {}
    if otlp:
        sink, endpoint, summary = start_otlp_sink(work, settings)
        helpers["otlp sink"] = sink
        extra["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
    if features:
        env = gunicorn_env(work, port, ROOT, LOG_LEVEL="info", **extra)
    else:
        env = gunicorn_env(work, port, LOG_LEVEL="warning", HTTP_METRICS="off")
    try:
        gunicorn = host("gunicorn", GUNICORN, env, work, settings)
    except BaseException:
        for helper in helpers.values():
            helper.stop()
        raise
    cafile = self_signed(work / "certs")
    files = ["compose.host-nginx.yml"] + ([] if features else ["compose.nginx-no-log.yml"])
    files += overrides or []
    project = f"bench-{os.getpid()}-nginx"
    env = compose_env(project, settings, cafile.parent, BENCH_APP_PORT=str(port))
    try:
        nginx = start_compose("nginx", _compose(*files), ["nginx"], env, work / "nginx.log")
    except BaseException:
        gunicorn.stop()
        for helper in helpers.values():
            helper.stop()
        raise
    return Started(
        {"nginx": nginx, "gunicorn": gunicorn},
        "https://localhost:8443/api/hello",
        cafile,
        helpers,
        summary,
    )


def start_stack(work: Path, settings: Settings, *, host_network: bool) -> Started:
    """The compose stack (app + nginx containers) on Docker's networks or the host's."""
    cafile = self_signed(work / "certs")
    project = f"bench-{os.getpid()}-stack"
    if host_network:
        ensure_nginx_ports()
        port = free_port()
        env = compose_env(
            project,
            settings,
            cafile.parent,
            BENCH_APP_PORT=str(port),
            BENCH_METRICS_PORT=str(free_port()),
        )
        compose = _compose("compose.host-nginx.yml", "compose.host-app.yml")
        url = "https://localhost:8443/api/hello"
    else:
        port = free_port()
        backend, edge = free_subnets(2)
        env = compose_env(
            project,
            settings,
            cafile.parent,
            HTTPS_PORT=str(port),
            HTTP_PORT=str(free_port()),
            HTTP_BIND="127.0.0.1",
            BACKEND_SUBNET=backend,
            EDGE_SUBNET=edge,
        )
        compose = _compose("compose.stack.yml")
        url = f"https://localhost:{port}/api/hello"
    log = work / "stack.log"
    nginx = start_compose("compose stack", compose, ["nginx", "app"], env, log)
    try:
        app = nginx.sibling("app")
    except BaseException:
        nginx.stop()
        raise
    parts = {"nginx": nginx, "app": app}
    if not host_network:
        proxies = docker_proxies(port, settings.server_cpu)
        if proxies.fixed:
            parts["docker-proxy"] = proxies
    # One project: stopping nginx (compose down) stops the app too.
    return Started(parts, url, cafile)


# --- what is compared -----------------------------------------------------------------------


def both(name: str, role: str) -> list[Config]:
    return [Config(name, role, WRK), Config(name, role, H2LOAD)]


def setups(settings: Settings) -> list[Setup]:
    from bench import peers

    def uvicorn_app(work: Path) -> Started:
        port = free_port()
        argv = [*UVICORN, "--port", str(port), "app.main:app"]
        server = host("uvicorn", argv, server_env(work), work, settings)
        return Started({"server": server}, f"http://127.0.0.1:{port}/api/hello")

    def raw(work: Path) -> Started:
        port = free_port()
        argv = [*UVICORN, "--port", str(port), "bench.asgi_app:app"]
        server = host("uvicorn", argv, server_env(work), work, settings)
        return Started({"server": server}, f"http://127.0.0.1:{port}/api/hello")

    def gunicorn(level: str) -> Callable[[Path], Started]:
        def start(work: Path) -> Started:
            port = free_port()
            env = gunicorn_env(work, port, LOG_LEVEL=level)
            server = host("gunicorn", GUNICORN, env, work, settings)
            return Started({"server": server}, f"http://127.0.0.1:{port}/api/hello")

        return start

    return [
        Setup("raw", raw, [Config("raw ASGI (uvicorn, information)", "raw")]),
        Setup("ceiling", uvicorn_app, both("bare uvicorn + app (the reference)", "ceiling")),
        Setup("gunicorn", gunicorn("info"), [Config("gunicorn + serving layer", "gunicorn")]),
        Setup("no-log", gunicorn("warning"), [Config("gunicorn, access log off", "no-log")]),
        *peers.setups(settings),
        Setup(
            "ours",
            lambda work: start_ours(work, settings),
            both("ours: nginx TLS -> gunicorn + serving layer", "ours"),
        ),
        Setup(
            "ours-otlp",
            lambda work: start_ours(work, settings, otlp=True),
            both("ours + OTLP span export to a sink on loopback", "ours-otlp"),
        ),
        Setup(
            "ours-off",
            lambda work: start_ours(work, settings, features=False),
            both("ours, access logs and HTTP metrics off", "ours-off"),
        ),
        Setup(
            "compose",
            lambda work: start_stack(work, settings, host_network=False),
            both("ours, compose stack (bridge networks, published port)", "compose"),
        ),
        Setup(
            "compose-host",
            lambda work: start_stack(work, settings, host_network=True),
            both("ours, compose stack on the host network", "compose-host"),
        ),
    ]


def wait_started(name: str, started: Started) -> None:
    context = None
    if started.url.startswith("https"):
        context = ssl.create_default_context(cafile=str(started.cafile))
    for server in started.parts.values():
        if server.exited():
            raise RuntimeError(f"{name}: {server.name} exited:\n{server.output()}")
    wait_ready(next(iter(started.parts.values())), started.url, context)


def start_setup(setup: Setup, work: Path) -> Started:
    directory = work / setup.name
    directory.mkdir(exist_ok=True)
    started = setup.start(directory)
    try:
        wait_started(setup.name, started)
    except BaseException:
        started.stop()
        raise
    return started


# --- --trees ---------------------------------------------------------------------------------


def _short_sha(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() or tree.name


def tree_setups(trees: list[Path], settings: Settings) -> list[Setup]:
    """The ceiling, then "gunicorn + serving layer, 1 worker" of each tree (e.g. a git
    worktree of an older commit: its server/ and app/, this venv), each without and with
    an X-Request-ID header (behind nginx the header is always there)."""

    def ceiling(work: Path) -> Started:
        port = free_port()
        argv = [*UVICORN, "--port", str(port), "app.main:app"]
        server = host("ceiling", argv, server_env(work), work, settings)
        return Started({"server": server}, f"http://127.0.0.1:{port}/api/hello")

    def tree_gunicorn(tree: Path) -> Callable[[Path], Started]:
        def start(work: Path) -> Started:
            port = free_port()
            env = gunicorn_env(work, port, tree, LOG_LEVEL="info")
            log = work / "gunicorn.log"
            # `gunicorn -c`: the oldest commits have no `python -m server`.
            server = start_host("gunicorn", GUNICORN, env, log, cpu=settings.server_cpu, cwd=tree)
            return Started({"server": server}, f"http://127.0.0.1:{port}/api/hello")

        return start

    result = [
        Setup(
            "ceiling",
            ceiling,
            [
                Config("ceiling: bare uvicorn + app.main", "ceiling"),
                Config("ceiling + X-Request-ID", "ceiling", headers=(REQUEST_ID,)),
            ],
        )
    ]
    for tree in trees:
        sha = _short_sha(tree)
        result.append(
            Setup(
                f"tree-{sha}",
                tree_gunicorn(tree),
                [
                    Config(f"gunicorn @{sha}", "tree"),
                    Config(f"gunicorn @{sha} + X-Request-ID", "tree", headers=(REQUEST_ID,)),
                ],
            )
        )
    return result


NOTES = [
    "ours: the shipped nginx service (image, entrypoint, docker-compose.yml settings) on the "
    "host's network (bench/compose.host-nginx.yml) in front of gunicorn -c "
    "server/gunicorn_conf.py from the project's venv; access log to Docker's json-file "
    "driver as in compose",
    "every gunicorn and uvicorn: 1 worker (one core), MAX_REQUESTS=0 (no recycling during "
    "a run); nginx's CONNECTION_LIMIT raised to the requests the one client keeps in flight",
    "ours, off: LOG_LEVEL=warning and HTTP_METRICS=off for the app, nginx's access-log.conf "
    "replaced by `access_log off` (bench/compose.nginx-no-log.yml)",
    "compose stack: both containers from docker-compose.yml pinned to the server core "
    "(bench/compose.stack.yml), WEB_CONCURRENCY=1; docker-proxy (the published port's "
    "userland proxy) is pinned there too and its CPU counted; on the host network: the same "
    "containers with network_mode host (bench/compose.host-app.yml)",
    "the peers' proxies log no access lines by default (Traefik, Caddy); uvicorn's and "
    "stock gunicorn's do",
]

TREE_NOTES = [
    "each tree: gunicorn -c server/gunicorn_conf.py with cwd and PYTHONPATH = the tree "
    "(its server/ and app/), this venv; 1 worker, MAX_REQUESTS=0, LOG_LEVEL=info",
    "the ceiling serves this checkout's app.main",
    f"`+ X-Request-ID`: wrk sends `{REQUEST_ID}` (well-formed: accepted, not generated); "
    "ratios of those rows are to the ceiling with the same header",
]
