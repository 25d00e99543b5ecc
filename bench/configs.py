"""The configurations the benchmark compares: how each server side is started.

    raw ASGI        uvicorn + bench/asgi_app.py (same bytes as /api/hello): information
    ceiling         bare uvicorn (uvloop, httptools, no access log) + app.main:app, no
                    serving layer: the same endpoint, the same FastAPI work; the reference
    gunicorn        gunicorn -c server/gunicorn_conf.py, 1 worker: our worker class,
                    request-id/access-log/metrics middleware, JSON logs
    gunicorn, no access log   the same with LOG_LEVEL=warning: what the access line costs
    nginx TLS -> gunicorn     the shipped nginx service (its image, entrypoint and
                    docker-compose.yml settings) on the host's network, pinned to the same
                    core, in front of that gunicorn: HTTPS with keep-alive, as compose runs it

`--trees` instead: the ceiling and "gunicorn + serving layer" of each given checkout.
"""

from __future__ import annotations

import os
import ssl
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench.processes import (
    Server,
    free_port,
    port_is_free,
    say,
    start_container_of,
    start_host,
    wait_ready,
)

if TYPE_CHECKING:
    from bench.load import Run
    from bench.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
HOST_NGINX = Path(__file__).with_name("compose.host-nginx.yml")
IMAGE_TAG = "bench"  # APP_VERSION of the images `make bench` builds (asgi-stack/*:bench)
NGINX_PORTS = (8443, 8080, 8081)  # nginx/conf's listen ports: the host's, with network host
REQUEST_ID = "X-Request-ID: bench-0123456789abcdef"  # well-formed: accepted, not generated
DEFAULT_CONNECTION_LIMIT = 32  # nginx/docker-entrypoint.sh's CONNECTION_LIMIT default


def connection_limit(settings: Settings) -> int:
    """nginx's per-client limit of requests in progress for the bench's one client (all of
    its connections, and each HTTP/2 stream, count): at least what the client keeps in
    flight, so the benchmark never measures the limiter's 429s."""
    return max(DEFAULT_CONNECTION_LIMIT, settings.connections * settings.streams)


@dataclass
class Config:
    name: str
    url: str
    server: Server
    runs: list[Run] = field(default_factory=list)
    upstream: Server | None = None  # the gunicorn behind nginx: its CPU counts too
    headers: tuple[str, ...] = ()  # sent by the load generator besides Host
    role: str = ""  # ceiling | gunicorn | no-log | nginx | raw | tree (for the summary)
    cafile: Path | None = None  # https: the certificate to trust

    def parts(self) -> dict[str, Server]:
        if self.upstream is None:
            return {"server": self.server}
        return {"nginx": self.server, "gunicorn": self.upstream}

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))

    @property
    def us_per_request(self) -> float:
        """Server CPU per request, µs (all of the server side's processes)."""
        eff = self.median("per_cpu_second")
        return 1e6 / eff if eff else 0.0


UVICORN = [
    str(VENV_BIN / "uvicorn"),
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--log-level",
    "warning",
    "--host",
    "127.0.0.1",
]


def server_env(work: Path, root: Path = ROOT, **extra: str) -> dict[str, str]:
    """The environment of a host server: this venv, its own metrics directory."""
    multiproc = work / "metrics" / str(len(list(work.glob("metrics/*"))))
    multiproc.mkdir(parents=True)
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
    directory.mkdir(mode=0o755)
    cert, key = directory / "fullchain.pem", directory / "privkey.pem"
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


def compose_env(project: str, settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "APP_VERSION": IMAGE_TAG,
        "BENCH_SERVER_CPU": str(settings.server_cpu),
        "CONNECTION_LIMIT": str(connection_limit(settings)),
        **extra,
    }


def start_host_nginx(
    work: Path, settings: Settings, upstream_port: int, project: str
) -> tuple[Server, Path]:
    """The shipped nginx service on the host's network in front of 127.0.0.1:upstream_port."""
    busy = [port for port in NGINX_PORTS if not port_is_free(port)]
    if busy:
        raise RuntimeError(
            f"ports {busy} are in use on this host: nginx on the host's network listens on "
            f"{NGINX_PORTS} (nginx/conf); stop what holds them"
        )
    cafile = self_signed(work / "certs")
    env = compose_env(
        project, settings, BENCH_APP_PORT=str(upstream_port), BENCH_CERTS=str(cafile.parent)
    )
    files = ["-f", str(COMPOSE_FILE), "-f", str(HOST_NGINX)]
    server = start_container_of(
        "nginx (host network)", ["docker", "compose", *files], "nginx", env, work / "nginx.log"
    )
    return server, cafile


def start_all(work: Path, configs: list[Config], settings: Settings) -> list[str]:
    """Start every server (appending to `configs` as it goes, for the caller's cleanup)."""
    cpu = settings.server_cpu

    def add(name: str, argv: list[str], env: dict[str, str], port: int, role: str) -> Server:
        server = start_host(name, argv, env, work / f"{len(configs)}.log", cpu=cpu, cwd=ROOT)
        url = f"http://127.0.0.1:{port}/api/hello"
        configs.append(Config(name, url, server, role=role))
        return server

    port = free_port()
    argv = [*UVICORN, "--port", str(port), "bench.asgi_app:app"]
    add("raw ASGI (uvicorn, info)", argv, server_env(work), port, "raw")
    port = free_port()
    argv = [*UVICORN, "--port", str(port), "app.main:app"]
    add("ceiling: bare uvicorn + app.main", argv, server_env(work), port, "ceiling")
    gunicorn = [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"]
    upstream_port = free_port()
    upstream = add(
        "gunicorn + serving layer",
        gunicorn,
        gunicorn_env(work, upstream_port, LOG_LEVEL="info"),
        upstream_port,
        "gunicorn",
    )
    port = free_port()
    env = gunicorn_env(work, port, LOG_LEVEL="warning")
    add("gunicorn, access log off", gunicorn, env, port, "no-log")
    nginx, cafile = start_host_nginx(work, settings, upstream_port, f"bench-{os.getpid()}")
    configs.append(
        Config(
            "nginx TLS -> gunicorn (TCP keep-alive)",
            "https://localhost:8443/api/hello",
            nginx,
            upstream=upstream,
            role="nginx",
            cafile=cafile,
        )
    )
    wait_all(configs)
    return [
        "nginx: the shipped image and entrypoint (docker-compose.yml's nginx service, "
        f"bench/compose.host-nginx.yml: host network, cpuset {cpu}), access log to "
        f"Docker's json-file driver as in compose; CONNECTION_LIMIT={connection_limit(settings)}",
        "gunicorn: 1 worker, MAX_REQUESTS=0 (no recycling during the run)",
    ]


def wait_all(configs: list[Config]) -> None:
    for config in configs:
        context = None
        if config.url.startswith("https"):
            context = ssl.create_default_context(cafile=str(config.cafile))
        wait_ready(config.server, config.url, context)
    say("every server answers")


def _short_sha(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() or tree.name


def start_trees(
    work: Path, configs: list[Config], trees: list[Path], settings: Settings
) -> list[str]:
    """The ceiling, then "gunicorn + serving layer, 1 worker" of each tree (e.g. a git
    worktree of an older commit: its server/ and app/, this venv), each without and with
    an X-Request-ID header (behind nginx the header is always there)."""
    cpu = settings.server_cpu
    port = free_port()
    argv = [*UVICORN, "--port", str(port), "app.main:app"]
    ceiling = start_host("ceiling", argv, server_env(work), work / "ceiling.log", cpu=cpu, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/api/hello"
    configs.append(Config("ceiling: bare uvicorn + app.main", url, ceiling, role="ceiling"))
    configs.append(
        Config("ceiling + X-Request-ID", url, ceiling, headers=(REQUEST_ID,), role="ceiling")
    )
    for tree in trees:
        sha = _short_sha(tree)
        port = free_port()
        server = start_host(
            f"gunicorn @{sha}",
            # `gunicorn -c`: the oldest commits have no `python -m server`.
            [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"],
            gunicorn_env(work, port, tree, LOG_LEVEL="info"),
            work / f"{sha}.log",
            cpu=cpu,
            cwd=tree,
        )
        url = f"http://127.0.0.1:{port}/api/hello"
        configs.append(Config(f"gunicorn @{sha}", url, server, role="tree"))
        configs.append(
            Config(
                f"gunicorn @{sha} + X-Request-ID", url, server, headers=(REQUEST_ID,), role="tree"
            )
        )
    wait_all(configs)
    return [
        "each tree: gunicorn -c server/gunicorn_conf.py with cwd and PYTHONPATH = the tree "
        "(its server/ and app/), this venv; 1 worker, MAX_REQUESTS=0, LOG_LEVEL=info",
        "the ceiling serves this checkout's app.main",
        f"`+ X-Request-ID`: wrk sends `{REQUEST_ID}` (well-formed: accepted, not generated); "
        "ratios of those rows are to the ceiling with the same header",
    ]
