"""`make bench`: what each layer of the stack costs, side by side, on this machine.

A benchmark, not a test: it prints numbers and writes them down, it does not pass or fail.
The server side is pinned to one core (BENCH_SERVER_CPU, default 0) and the load generator,
wrk, to another (BENCH_CLIENT_CPU, default 1), so every configuration gets the same CPU
budget and the generator never competes with the server. All on loopback.

    raw ASGI        uvicorn + loadtests/bench_app.py (same bytes as /api/hello): information
    ceiling         bare uvicorn (uvloop, httptools, no access log) + app.main:app, no
                    serving layer: the same endpoint, the same FastAPI work; the reference
    gunicorn        gunicorn -c server/gunicorn_conf.py, 1 worker: our worker class,
                    request-id/access-log/metrics middleware, JSON logs
    gunicorn, no access log   the same with LOG_LEVEL=warning: what the access line costs
    nginx TLS -> gunicorn (TCP keep-alive)   nginx (the repo's nginx/conf, rendered for
                    the host) in front of that gunicorn, HTTPS with keep-alive; nginx shares
                    the server core; upstream `server 127.0.0.1:<port>` as in compose
    nginx TLS -> gunicorn (unix socket)   the same nginx config, upstream
                    `server unix:<tmp>/sock/gunicorn.sock` (keep-alive still on): the same
                    gunicorn also binds that socket (`--bind` twice on its command line
                    replaces the config file's list, so the TCP bind is given again). uvicorn
                    sees a unix-socket peer as client None, which only FORWARDED_ALLOW_IPS="*"
                    trusts, so both gunicorns run with "*"

`--trees DIR...` instead compares the ceiling with "gunicorn + serving layer, 1 worker" of
each checkout (git worktrees of older commits: cwd and PYTHONPATH = the tree, this venv),
each without and with an `X-Request-ID` header, into loadtests/reports/bench-commits-*.md.

Each run is bounded: BENCH_SECONDS (default 10) of wrk after a 2 s warm-up, a request cap
(a wrk Lua script stops at BENCH_MAX_REQUESTS) and a hard timeout. Rounds are interleaved
(BENCH_ROUNDS, default 3) and the median kept, because this machine is shared. Server and
generator CPU use are reported so a starved run shows. `--profile` adds a py-spy profile of
the gunicorn worker under load: where the time goes in the serving layer.

Installs what it lacks: wrk and nginx from Debian (apt-get), py-spy from PyPI into
.cache/bench-tools (not the project's venv). The table goes to stdout and
loadtests/reports/bench-<UTC timestamp>.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
REPORTS = Path(__file__).with_name("reports")
TOOLS = ROOT / ".cache" / "bench-tools"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

SERVER_CPU = os.environ.get("BENCH_SERVER_CPU", "0")
CLIENT_CPU = os.environ.get("BENCH_CLIENT_CPU", "1")
SECONDS = int(os.environ.get("BENCH_SECONDS", "10"))
WARMUP_SECONDS = 2
CONNECTIONS = int(os.environ.get("BENCH_CONNECTIONS", "32"))
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MAX_REQUESTS = int(os.environ.get("BENCH_MAX_REQUESTS", "400000"))

CAP_LUA = """\
-- Stop this wrk thread after BENCH_MAX_REQUESTS responses: the run is bounded in requests
-- as well as in time (wrk's -d).
local max = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
local seen = 0
function response(status, headers, body)
  seen = seen + 1
  if max > 0 and seen >= max then wrk.thread:stop() end
end
"""


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


# --- tools -----------------------------------------------------------------------------


def ensure_debian_packages(commands: dict[str, str]) -> None:
    """apt-get install the packages whose commands are missing (command -> package)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    say(f"installing {', '.join(missing)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, check=False, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, timeout=600)
        subprocess.run(install, env=env, check=True, timeout=600)


def ensure_py_spy() -> Path:
    binary = TOOLS / "bin" / "py-spy"
    if not binary.exists():
        say(f"installing py-spy from PyPI into {TOOLS}")
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                str(TOOLS),
                "py-spy",
            ],
            check=True,
            timeout=600,
        )
    return binary


def nginx_version() -> tuple[int, ...]:
    out = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(x) for x in match.groups()) if match else (0, 0, 0)


# --- processes ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                found += _children(int(child))
    return found


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def pids(self) -> list[int]:
        try:
            return _children(self.process.pid)
        except OSError:
            return []

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)  # the group we started
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def start(name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT) -> Server:
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU, *argv],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, process, log)


def wait_ready(
    server: Server, url: str, context: ssl.SSLContext | None, timeout: float = 40
) -> None:
    deadline = time.monotonic() + timeout
    if not url.startswith(("http://", "https://")):
        raise ValueError(url)
    request = urllib.request.Request(url, headers={"Host": "localhost"})  # noqa: S310
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited:\n{server.log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(request, timeout=2, context=context) as response,  # noqa: S310
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"{server.name} not ready after {timeout}s:\n{server.log.read_text()[-2000:]}"
    )


# --- the load generator ------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int
    server_cpu: float  # share of one core
    client_cpu: float
    capped: bool
    parts_cpu: dict[str, float] = field(default_factory=dict)  # by process group

    @property
    def per_cpu_second(self) -> float:
        """Requests per second of server CPU: capacity, whatever else took the core."""
        return self.rps / self.server_cpu if self.server_cpu > 0 else 0.0


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s)", text.strip())
    if not match:
        raise ValueError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> tuple[float, float, float, int, int]:
    """req/s, p50 ms, p99 ms, requests, errors (non-2xx/3xx + socket errors) from wrk."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    errors = 0
    if non_2xx := re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output):
        errors += int(non_2xx.group(1))
    if sock := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    ):
        errors += sum(int(x) for x in sock.groups())
    return rps, p50, p99, requests, errors


def wrk(
    url: str,
    seconds: int,
    lua: Path,
    parts: dict[str, list[int]],
    headers: tuple[str, ...] = (),
) -> Run:
    """One bounded wrk run pinned to the client core; CPU of both sides measured (the
    server side by process group, e.g. nginx and gunicorn)."""
    extra = [arg for header in headers for arg in ("-H", header)]
    argv = [
        "taskset",
        "-c",
        CLIENT_CPU,
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{seconds}s",
        "--latency",
        "-H",
        "Host: localhost",
        *extra,
        "-s",
        str(lua),
        url,
    ]
    env = {**os.environ, "BENCH_MAX_REQUESTS": str(MAX_REQUESTS)}
    before = {name: _cpu_seconds(pids) for name, pids in parts.items()}
    client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=seconds + 30, check=True
    )
    wall = time.monotonic() - started
    client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    parts_cpu = {
        name: max(0.0, _cpu_seconds(pids) - before[name]) / wall for name, pids in parts.items()
    }
    client_cpu = (
        client_after.ru_utime
        + client_after.ru_stime
        - client_before.ru_utime
        - client_before.ru_stime
    ) / wall
    rps, p50, p99, requests, errors = parse_wrk(done.stdout)
    capped = requests >= MAX_REQUESTS
    server_cpu = sum(parts_cpu.values())
    return Run(rps, p50, p99, requests, errors, server_cpu, client_cpu, capped, parts_cpu)


# --- nginx with the repository's configuration, on the host ----------------------------


def self_signed(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-sha256",
            "-days",
            "2",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    key.chmod(0o644)  # nginx workers run as nobody; a throw-away key in a private temp dir
    return cert, key


def prepare_nginx(work: Path, upstream: str) -> tuple[Path, int, list[str]]:
    """nginx/conf rendered for a host nginx: paths under `work`, free ports, one worker.

    `upstream` is what follows `server` in the upstream block: `127.0.0.1:<port>` or
    `unix:<path>`. The same settings files the container's entrypoint writes; notes list
    what differs.
    """
    notes: list[str] = []
    conf = work / "conf"
    shutil.copytree(ROOT / "nginx" / "conf", conf)
    shutil.copy("/etc/nginx/mime.types", conf / "mime.types")
    shutil.copytree(ROOT / "app" / "static", work / "share" / "static")
    run_dir = work / "run"
    (run_dir / "settings").mkdir(parents=True)
    https_port, http_port, status_port = free_port(), free_port(), free_port()
    cert, key = self_signed(work)
    old_nginx = nginx_version() < (1, 25, 1)
    for path in conf.rglob("*.conf"):
        text = path.read_text()
        text = text.replace("/tmp/nginx/", f"{run_dir}/")  # noqa: S108 - the image's path
        text = text.replace("/usr/share/nginx/static", f"{work}/share/static")
        text = text.replace("root /usr/share/nginx;", f"root {work}/share;")
        text = re.sub(r"listen 8443\b", f"listen {https_port}", text)
        text = re.sub(r"listen 8080\b", f"listen {http_port}", text)
        text = re.sub(r"listen 8081\b", f"listen {status_port}", text)
        text = text.replace("access_log /dev/stdout json", f"access_log {work}/access.log json")
        text = text.replace("worker_processes auto;", "worker_processes 1;")
        if old_nginx and "http2 on;" in text:
            text = text.replace("http2 on;", "")
        path.write_text(text)
    if old_nginx:
        notes.append(
            f"host nginx {'.'.join(map(str, nginx_version()))} < 1.25.1: `http2 on` "
            "dropped (wrk speaks HTTP/1.1 either way)"
        )
    notes.append("nginx: 1 worker, access log to a file instead of stdout")
    notes.append("gunicorn: 1 worker, MAX_REQUESTS=0 (no recycling during the run)")
    settings = {
        "server-names.conf": "server_name localhost 127.0.0.1;\n",
        "upstream-server.conf": f"server {upstream};\n",
        "client-max-body-size.conf": "client_max_body_size 1m;\n",
        "tls-certificate.conf": f"ssl_certificate {cert};\nssl_certificate_key {key};\n",
        "rate-limit-zone.conf": "limit_req_zone $rate_limit_key zone=per_client:10m rate=20r/s;\n",
        "rate-limit.conf": "limit_req zone=per_client burst=40 nodelay;\n",
        # wrk on loopback is the allow-listed load generator (RATE_LIMIT_ALLOWLIST default)
        "rate-limit-allowlist.conf": "127.0.0.1/32 1;\n",
        "https-redirect.conf": f"return 308 https://$host:{https_port}$request_uri;\n",
    }
    for name, text in settings.items():
        (run_dir / "settings" / name).write_text(text)
    for path in [work, *work.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)
    test = subprocess.run(
        ["nginx", "-t", "-q", "-e", "stderr", "-p", str(work), "-c", str(conf / "nginx.conf")],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if test.returncode != 0:
        raise RuntimeError(f"the repo's nginx config does not load on this nginx:\n{test.stderr}")
    return conf / "nginx.conf", https_port, notes


# --- the benchmark -----------------------------------------------------------------------


REQUEST_ID = "X-Request-ID: bench-0123456789abcdef"  # well-formed: accepted, not generated


@dataclass
class Config:
    name: str
    url: str
    server: Server
    runs: list[Run] = field(default_factory=list)
    upstream: Server | None = None  # the gunicorn behind nginx: its CPU counts too
    headers: tuple[str, ...] = ()  # sent by wrk besides Host
    role: str = ""  # ceiling | gunicorn | no-log | nginx | nginx-unix | tree (for the summary)
    cafile: Path | None = None  # https: the self-signed certificate to trust

    def parts(self) -> dict[str, list[int]]:
        if self.upstream is None:
            return {"server": self.server.pids()}
        return {"nginx": self.server.pids(), "gunicorn": self.upstream.pids()}

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))

    @property
    def us_per_request(self) -> float:
        """Server CPU per request, µs (all of the server side's processes)."""
        eff = self.median("per_cpu_second")
        return 1e6 / eff if eff else 0.0


def server_env(work: Path, root: Path = ROOT, **extra: str) -> dict[str, str]:
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


def _wait_all(configs: list[Config]) -> None:
    for config in configs:
        context = None
        if config.url.startswith("https"):
            context = ssl.create_default_context(cafile=str(config.cafile))
        wait_ready(config.server, config.url, context)


def _start_nginx(work: Path, name: str, upstream: str) -> tuple[Server, int, Path, list[str]]:
    conf, https_port, notes = prepare_nginx(work, upstream)
    nginx = start(
        name,
        ["nginx", "-e", "stderr", "-p", str(work), "-c", str(conf), "-g", "daemon off;"],
        dict(os.environ),
        work.parent / f"{work.name}.log",
    )
    return nginx, https_port, work / "cert.pem", notes


def start_all(work: Path, configs: list[Config]) -> list[str]:
    """Start every server (appending to `configs` as it goes, for the caller's cleanup)."""

    def add(name: str, argv: list[str], env: dict[str, str], url: str, role: str) -> Server:
        server = start(name, argv, env, work / f"{len(configs)}.log")
        configs.append(Config(name, url, server, role=role))
        return server

    port = free_port()
    add(
        "raw ASGI (uvicorn, info)",
        [*UVICORN, "--port", str(port), "loadtests.bench_app:app"],
        server_env(work),
        f"http://127.0.0.1:{port}/api/hello",
        "raw",
    )
    port = free_port()
    add(
        "ceiling: bare uvicorn + app.main",
        [*UVICORN, "--port", str(port), "app.main:app"],
        server_env(work),
        f"http://127.0.0.1:{port}/api/hello",
        "ceiling",
    )
    # The gunicorn behind nginx also listens on a unix socket (nginx workers run as nobody:
    # the socket's directory must be reachable). The TCP bind stays: health checks and the
    # direct runs use it. gunicorn's --bind on the command line replaces the config file's
    # list, so both are given here.
    sock_dir = work / "sock"
    sock_dir.mkdir()
    sock_dir.chmod(0o777)
    work.chmod(0o711)
    sock = sock_dir / "gunicorn.sock"
    gunicorn = [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"]
    upstream_port = 0
    for label, level, role in (
        ("gunicorn + serving layer", "info", "gunicorn"),
        ("gunicorn, access log off", "warning", "no-log"),
    ):
        port = free_port()
        argv = gunicorn
        if role == "gunicorn":
            upstream_port = port
            argv = [*gunicorn, "--bind", f"127.0.0.1:{port}", "--bind", f"unix:{sock}"]
        # "*": uvicorn sees a unix-socket peer as client None, which no IP/CIDR (nor a
        # "unix:" literal) matches; the same value on both so they do the same work.
        env = gunicorn_env(work, port, LOG_LEVEL=level, FORWARDED_ALLOW_IPS="*")
        add(label, argv, env, f"http://127.0.0.1:{port}/api/hello", role)
    upstream = configs[2].server
    notes: list[str] = []
    for name, role, target in (
        ("nginx TLS -> gunicorn (TCP keep-alive)", "nginx", f"127.0.0.1:{upstream_port}"),
        ("nginx TLS -> gunicorn (unix socket)", "nginx-unix", f"unix:{sock}"),
    ):
        nginx, https_port, cafile, more = _start_nginx(work / role, name, target)
        notes += [n for n in more if n not in notes]
        url = f"https://localhost:{https_port}/api/hello"
        configs.append(Config(name, url, nginx, upstream=upstream, role=role, cafile=cafile))
    notes.append(
        "gunicorn + serving layer binds 127.0.0.1:<port> and a unix socket; "
        "FORWARDED_ALLOW_IPS=* on both gunicorns"
    )
    _wait_all(configs)
    return notes


def _short_sha(tree: Path) -> str:
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() or tree.name


def start_trees(work: Path, configs: list[Config], trees: list[Path]) -> list[str]:
    """The ceiling, then "gunicorn + serving layer, 1 worker" of each tree (e.g. a git
    worktree of an older commit: its server/ and app/, this venv), each without and with
    an X-Request-ID header (behind nginx the header is always there)."""
    port = free_port()
    ceiling = start(
        "ceiling",
        [*UVICORN, "--port", str(port), "app.main:app"],
        server_env(work),
        work / "ceiling.log",
    )
    url = f"http://127.0.0.1:{port}/api/hello"
    configs.append(Config("ceiling: bare uvicorn + app.main", url, ceiling, role="ceiling"))
    configs.append(
        Config("ceiling + X-Request-ID", url, ceiling, headers=(REQUEST_ID,), role="ceiling")
    )
    for tree in trees:
        sha = _short_sha(tree)
        port = free_port()
        server = start(
            f"gunicorn @{sha}",
            # `gunicorn -c`: the oldest commits have no `python -m server`.
            [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"],
            gunicorn_env(work, port, tree, LOG_LEVEL="info"),
            work / f"{sha}.log",
            cwd=tree,
        )
        url = f"http://127.0.0.1:{port}/api/hello"
        configs.append(Config(f"gunicorn @{sha}", url, server, role="tree"))
        configs.append(
            Config(
                f"gunicorn @{sha} + X-Request-ID",
                url,
                server,
                headers=(REQUEST_ID,),
                role="tree",
            )
        )
    _wait_all(configs)
    return [
        "each tree: gunicorn -c server/gunicorn_conf.py with cwd and PYTHONPATH = the tree "
        "(its server/ and app/), this venv; 1 worker, MAX_REQUESTS=0, LOG_LEVEL=info",
        "the ceiling serves this checkout's app.main",
        f"`+ X-Request-ID`: wrk sends `{REQUEST_ID}` (well-formed: accepted, not generated); "
        "ratios of those rows are to the ceiling with the same header",
    ]


def _ceiling_for(config: Config, configs: list[Config]) -> Config:
    ceilings = [c for c in configs if c.role == "ceiling"]
    same = [c for c in ceilings if c.headers == config.headers]
    return (same or ceilings)[0]


def _table(configs: list[Config]) -> list[str]:
    lines = [
        "| configuration | req/s | ÷ ceiling | req per server CPU-s | ÷ ceiling "
        "| server CPU µs/req | p50 ms | x ceiling | p99 ms | x ceiling | server CPU "
        "| wrk CPU | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        ceiling = _ceiling_for(config, configs)
        c_rps, c_eff = ceiling.median("rps"), ceiling.median("per_cpu_second")
        c_p50, c_p99 = ceiling.median("p50_ms"), ceiling.median("p99_ms")
        rps, p50, p99 = config.median("rps"), config.median("p50_ms"), config.median("p99_ms")
        eff = config.median("per_cpu_second")
        capped = " (request cap hit)" if any(r.capped for r in config.runs) else ""
        lines.append(
            f"| {config.name}{capped} | {rps:,.0f} | {rps / c_rps:.0%} | {eff:,.0f} "
            f"| {eff / c_eff:.0%} | {config.us_per_request:.0f} "
            f"| {p50:.2f} | {p50 / c_p50:.2f} | {p99:.2f} | {p99 / c_p99:.2f} "
            f"| {config.median('server_cpu'):.0%} | {config.median('client_cpu'):.0%} "
            f"| {sum(r.errors for r in config.runs)} |"
        )
    return lines


def _header(configs: list[Config], title: str) -> list[str]:
    rounds = max(len(c.runs) for c in configs)
    load = os.getloadavg()
    return [
        f"# {title} {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: GET /api/hello",
        "",
        f"Server side pinned to CPU {SERVER_CPU}, wrk (1 thread, {CONNECTIONS} keep-alive "
        f"connections) to CPU {CLIENT_CPU}; {SECONDS} s per run after {WARMUP_SECONDS} s warm-up; "
        f"median of {rounds} interleaved round(s). Ratios are to the ceiling. "
        f"Host: {os.cpu_count()} CPUs, load average {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1/5/15 min) at the end.",
        "",
    ]


def _rounds(configs: list[Config]) -> str:
    return "Per round, req/s (req per server CPU-s): " + "; ".join(
        f"{c.name}: " + ", ".join(f"{r.rps:,.0f} ({r.per_cpu_second:,.0f})" for r in c.runs)
        for c in configs
    )


SERVER_CPU_NOTE = (
    "- server CPU: share of one core the server's processes used during the run. A server "
    "that is the bottleneck uses ~100 %; less means other load on the host took the core "
    "(a shared machine), and req/s understates capacity. Requests per server CPU-second "
    "does not depend on that: compare configurations by it when server CPU is low."
)


def render_trees(configs: list[Config], notes: list[str]) -> str:
    lines = [*_header(configs, "Benchmark by commit"), *_table(configs), ""]
    for headers in ((), (REQUEST_ID,)):
        trees = [c for c in configs if c.role == "tree" and c.headers == headers]
        for before, after in itertools.pairwise(trees):
            ceiling = _ceiling_for(after, configs)
            c_eff = ceiling.median("per_cpu_second")
            gain = (after.median("per_cpu_second") - before.median("per_cpu_second")) / c_eff
            lines.append(
                f"- {before.name} -> {after.name}: {gain:+.0%} of the ceiling per CPU-second, "
                f"{after.us_per_request - before.us_per_request:+.0f} µs of server CPU "
                f"per request ({before.us_per_request:.0f} -> {after.us_per_request:.0f}; "
                f"ceiling {ceiling.us_per_request:.0f})"
            )
    lines += ["", _rounds(configs), "", *[f"- {note}" for note in notes], SERVER_CPU_NOTE]
    return "\n".join(lines) + "\n"


def render(configs: list[Config], notes: list[str], profile: str) -> str:
    by_role = {c.role: c for c in configs}
    ceiling = by_role["ceiling"]
    c_rps, c_p99 = ceiling.median("rps"), ceiling.median("p99_ms")
    c_eff = ceiling.median("per_cpu_second")
    full, gunicorn, no_log = by_role["nginx"], by_role["gunicorn"], by_role["no-log"]
    lines = [*_header(configs, "Benchmark"), *_table(configs)]
    lines += [
        "",
        "Targets: full stack ≥ 70 % of the ceiling's req/s, p99 ≤ 2 x the ceiling's. Measured "
        "(nginx TLS -> gunicorn over TCP, as in compose): "
        f"req/s **{full.median('rps') / c_rps:.0%}** (per server CPU-second "
        f"**{full.median('per_cpu_second') / c_eff:.0%}**), p99 "
        f"**{full.median('p99_ms') / c_p99:.2f} x**. Access line (gunicorn with vs without): "
        f"**{1 - gunicorn.median('per_cpu_second') / no_log.median('per_cpu_second'):.0%}** "
        "of the CPU-normalised throughput.",
    ]
    if unix := by_role.get("nginx-unix"):
        lines.append(
            "Unix socket instead of TCP keep-alive between nginx and gunicorn: per server "
            f"CPU-second **{unix.median('per_cpu_second') / c_eff:.0%}** vs "
            f"{full.median('per_cpu_second') / c_eff:.0%} of the ceiling "
            f"({unix.us_per_request - full.us_per_request:+.0f} µs per request), p99 "
            f"{unix.median('p99_ms') / c_p99:.2f} x vs {full.median('p99_ms') / c_p99:.2f} x."
        )
    lines += ["", _rounds(configs), "", *[f"- {note}" for note in notes], SERVER_CPU_NOTE]
    for config in configs:
        if config.upstream is None:
            continue
        per_request = {
            name: statistics.median(r.parts_cpu[name] / r.rps * 1e6 for r in config.runs if r.rps)
            for name in config.runs[0].parts_cpu
        }
        lines.append(
            f"- {config.name}: server CPU per request "
            + " + ".join(f"{name} {us:.0f} µs" for name, us in per_request.items())
            + f" (gunicorn alone, without nginx: {gunicorn.us_per_request:.0f} µs; the ceiling: "
            f"{ceiling.us_per_request:.0f} µs)"
        )
    if profile:
        lines += ["", profile]
    return "\n".join(lines) + "\n"


# --- profile -------------------------------------------------------------------------------

# The serving layer's nesting, outermost first, as (function, file suffix) of each layer's
# entry frame in py-spy's output. A layer's own cost = its inclusive share minus the next's.
LAYERS = [
    ("uvicorn ProxyHeadersMiddleware (X-Forwarded-*)", "__call__", "proxy_headers.py"),
    ("server.health.HealthMiddleware", "__call__", "server/health.py"),
    ("server.middleware.ObservabilityMiddleware", "__call__", "server/middleware.py"),
    (
        "the app: FastAPI + Starlette, incl. writing the response",
        "__call__",
        "(fastapi|starlette)/applications.py",
    ),
]
# Inside ObservabilityMiddleware (its own cost), by concern.
CONCERNS = {
    "access line: log_access (render + write)": ("log_access", "server/logs.py"),
    "  of which the write(2): _write_line": ("_write_line", "server/logs.py"),
    "metrics: HttpMetrics.started + observe": ("observe|started", "server/metrics.py"),
    "metrics: HttpMetrics.flush (mmap files)": ("flush", "server/metrics.py"),
    "request id: accept_or_generate": ("accept_or_generate", "server/request_id.py"),
    "structlog bind/reset_contextvars": ("bind_contextvars|reset_contextvars", "contextvars.py"),
    "route_template": ("route_template", "server/middleware.py"),
}

_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:()]+)(?::\d+)?\)$")


def _share(stacks: list[tuple[list[tuple[str, str]], int]], funcs: str, file: str) -> int:
    """Samples with a frame of one of `funcs` (regex) in a file ending in `file` (regex)."""
    func_re = re.compile(rf"^(?:.*\.)?(?:{funcs})$")
    file_re = re.compile(rf"(?:^|/)(?:{file})$")
    return sum(
        count
        for frames, count in stacks
        if any(func_re.match(f) and file_re.search(fl) for f, fl in frames)
    )


def analyse_profile(raw: str) -> str:
    """Each layer's own share of the worker's CPU, the middleware's concerns, top self time."""
    stacks: list[tuple[list[tuple[str, str]], int]] = []
    for line in raw.splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        frames = []
        for frame in stack.split(";"):
            match = _FRAME.match(frame.strip())
            frames.append((match["func"], match["file"]) if match else (frame, ""))
        stacks.append((frames, int(samples)))
    total: int = sum(c for _, c in stacks) or 1
    inclusive = [_share(stacks, funcs, suffix) for _, funcs, suffix in LAYERS]
    rows = [
        f"| uvicorn: HTTP parsing, event loop, transport (outside the ASGI app) "
        f"| {(total - inclusive[0]) / total:.1%} |"
    ]
    for index, (label, _, _) in enumerate(LAYERS):
        inner = inclusive[index + 1] if index + 1 < len(inclusive) else 0
        own = max(0, inclusive[index] - inner)  # sampling can make it dip below 0
        rows.append(f"| {label} | {own / total:.1%} |")
    concern_rows = [
        f"| {label} | {_share(stacks, funcs, suffix) / total:.1%} |"
        for label, (funcs, suffix) in CONCERNS.items()
    ]
    self_time: Counter[str] = Counter()
    for frames, count in stacks:
        func, file = frames[-1]
        self_time[f"{func} ({Path(file).name})"] += count
    top = [f"| {name} | {count / total:.1%} |" for name, count in self_time.most_common(15)]
    return "\n".join(
        [
            "## Profile: gunicorn worker under wrk load (py-spy, on-CPU samples)",
            "",
            f"{total} samples. Own share of the worker's CPU time, outermost layer first:",
            "",
            "| layer | share |",
            "|---|---:|",
            *rows,
            "",
            "Inside ObservabilityMiddleware, by concern (inclusive):",
            "",
            "| concern | share |",
            "|---|---:|",
            *concern_rows,
            "",
            "Top self time (the frame on top of the stack):",
            "",
            "| function | share |",
            "|---|---:|",
            *top,
        ]
    )


def profile_worker(config: Config, lua: Path, work: Path) -> str:
    py_spy = ensure_py_spy()
    workers = [p for p in config.server.pids() if p != config.server.process.pid]
    if not workers:
        return "(profile skipped: no gunicorn worker found)"
    out = work / "profile.txt"
    seconds = min(SECONDS, 10)
    record = subprocess.Popen(
        [
            "taskset",
            "-c",
            CLIENT_CPU,
            str(py_spy),
            "record",
            "--pid",
            str(workers[-1]),
            # Blocking (the default): py-spy pauses the worker for each sample. Slower, but
            # --nonblocking reads torn stacks out of a running asyncio worker.
            "--rate",
            "200",
            "--duration",
            str(seconds - 2),
            "--format",
            "raw",
            "--output",
            str(out),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    wrk(config.url, seconds, lua, config.parts())
    _, err = record.communicate(timeout=60)
    if record.returncode != 0 or not out.exists():
        return f"(profile failed: {err.decode(errors='replace')[-500:]})"
    shutil.copy(out, REPORTS / f"profile-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.txt")
    return analyse_profile(out.read_text())


def _unusable(args: argparse.Namespace) -> str:
    """Why these arguments cannot run here ("" if they can)."""
    if len(os.sched_getaffinity(0)) < 2:
        return "needs two CPUs (server and load generator on different cores)"
    if args.trees and (args.profile or args.profile_only):
        return "--trees does not profile"
    for tree in args.trees or []:
        if not (tree / "server" / "gunicorn_conf.py").is_file():
            return f"{tree} has no server/gunicorn_conf.py"
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", action="store_true", help="also profile the gunicorn worker")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the profile, no benchmark rounds"
    )
    parser.add_argument(
        "--trees",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="instead: the ceiling vs `gunicorn + serving layer` of each checkout (e.g. git "
        "worktrees of older commits), without and with an X-Request-ID header",
    )
    args = parser.parse_args(argv)
    rounds = 0 if args.profile_only else ROUNDS
    if problem := _unusable(args):
        say(problem)
        return 2
    ensure_debian_packages({"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"})
    REPORTS.mkdir(exist_ok=True)
    # Metrics files, logs and nginx's temp files on tmpfs, like the containers' /tmp.
    shm = Path("/dev/shm")  # noqa: S108 - tmpfs, like the containers' /tmp
    profile = ""
    with tempfile.TemporaryDirectory(prefix="bench-", dir=shm) as tmp:
        work = Path(tmp)
        lua = work / "cap.lua"
        lua.write_text(CAP_LUA)
        lua.chmod(0o644)
        configs: list[Config] = []
        try:
            if args.trees:
                notes = start_trees(work, configs, [t.resolve() for t in args.trees])
            else:
                notes = start_all(work, configs)
            for round_no in range(1, rounds + 1):
                for config in configs:
                    say(f"round {round_no}/{rounds}: {config.name}")
                    wrk(config.url, WARMUP_SECONDS, lua, config.parts(), config.headers)
                    config.runs.append(
                        wrk(config.url, SECONDS, lua, config.parts(), config.headers)
                    )
            if args.profile or args.profile_only:
                gunicorn = next(c for c in configs if c.role == "gunicorn")
                profile = profile_worker(gunicorn, lua, work)
        finally:
            for config in reversed(configs):
                config.server.stop()
    if args.profile_only:
        print(profile)
        return 0
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    if args.trees:
        report = render_trees(configs, notes)
        path = REPORTS / f"bench-commits-{stamp}.md"
    else:
        report = render(configs, notes, profile)
        path = REPORTS / f"bench-{stamp}.md"
    path.write_text(report)
    print(report)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
