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
    nginx TLS -> gunicorn     nginx (the repo's nginx/conf, rendered for the host) in front
                    of that gunicorn, HTTPS with keep-alive; nginx shares the server core

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


def start(
    name: str, argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> Server:
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
        text = text.replace("access_log /dev/stdout json;", f"access_log {work}/access.log json;")
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


@dataclass
class Config:
    name: str
    url: str
    server: Server
    runs: list[Run] = field(default_factory=list)
    upstream: Server | None = None  # the gunicorn behind nginx: its CPU counts too

    def parts(self) -> dict[str, list[int]]:
        if self.upstream is None:
            return {"server": self.server.pids()}
        return {"nginx": self.server.pids(), "gunicorn": self.upstream.pids()}

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.runs))


def server_env(work: Path, **extra: str) -> dict[str, str]:
    multiproc = work / "metrics" / str(len(list(work.glob("metrics/*"))))
    multiproc.mkdir(parents=True)
    return {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "WORKER_TMP_DIR": str(work),
        "LOG_FORMAT": "json",
        **extra,
    }


def start_all(work: Path, configs: list[Config]) -> list[str]:
    """Start every server (appending to `configs` as it goes, for the caller's cleanup)."""
    uvicorn = [
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

    def add(name: str, argv: list[str], env: dict[str, str], url: str) -> Server:
        server = start(name, argv, env, work / f"{len(configs)}.log")
        configs.append(Config(name, url, server))
        return server

    port = free_port()
    add(
        "raw ASGI (uvicorn, info)",
        [*uvicorn, "--port", str(port), "loadtests.bench_app:app"],
        server_env(work),
        f"http://127.0.0.1:{port}/api/hello",
    )
    port = free_port()
    add(
        "ceiling: bare uvicorn + app.main",
        [*uvicorn, "--port", str(port), "app.main:app"],
        server_env(work),
        f"http://127.0.0.1:{port}/api/hello",
    )
    gunicorn = [str(VENV_BIN / "gunicorn"), "-c", "server/gunicorn_conf.py"]
    for label, level in (
        ("gunicorn + serving layer", "info"),
        ("gunicorn, access log off", "warning"),
    ):
        port = free_port()
        env = server_env(
            work,
            HOST="127.0.0.1",
            PORT=str(port),
            METRICS_HOST="127.0.0.1",
            METRICS_PORT=str(free_port()),
            WEB_CONCURRENCY="1",
            LOG_LEVEL=level,
            # A worker restart (app import) every 10k requests would dominate a 10 s run.
            MAX_REQUESTS="0",
        )
        add(label, gunicorn, env, f"http://127.0.0.1:{port}/api/hello")
    upstream = int(configs[2].url.split(":")[2].split("/")[0])
    conf, https_port, notes = prepare_nginx(work / "nginx", upstream)
    nginx = start(
        "nginx",
        [
            "nginx",
            "-e",
            "stderr",
            "-p",
            str(conf.parent.parent),
            "-c",
            str(conf),
            "-g",
            "daemon off;",
        ],
        dict(os.environ),
        work / "nginx.log",
    )
    url = f"https://localhost:{https_port}/api/hello"
    configs.append(Config("nginx TLS -> gunicorn", url, nginx, upstream=configs[2].server))
    context = ssl.create_default_context(cafile=str(work / "nginx" / "cert.pem"))
    for config in configs:
        wait_ready(config.server, config.url, context if config.url.startswith("https") else None)
    return notes


def render(configs: list[Config], notes: list[str], profile: str) -> str:
    ceiling = configs[1]
    c_rps, c_p50, c_p99 = ceiling.median("rps"), ceiling.median("p50_ms"), ceiling.median("p99_ms")
    c_eff = ceiling.median("per_cpu_second")
    lines = [
        f"# Benchmark {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: GET /api/hello",
        "",
        f"Server side pinned to CPU {SERVER_CPU}, wrk (1 thread, {CONNECTIONS} keep-alive "
        f"connections) to CPU {CLIENT_CPU}; {SECONDS} s per run after {WARMUP_SECONDS} s warm-up; "
        f"median of {len(ceiling.runs)} interleaved round(s). Ratios are to the ceiling. "
        f"Host: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the end.",
        "",
        "| configuration | req/s | ÷ ceiling | req per server CPU-s | ÷ ceiling | p50 ms "
        "| x ceiling | p99 ms | x ceiling | server CPU | wrk CPU | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        rps, p50, p99 = config.median("rps"), config.median("p50_ms"), config.median("p99_ms")
        eff = config.median("per_cpu_second")
        capped = " (request cap hit)" if any(r.capped for r in config.runs) else ""
        lines.append(
            f"| {config.name}{capped} | {rps:,.0f} | {rps / c_rps:.0%} | {eff:,.0f} "
            f"| {eff / c_eff:.0%} | {p50:.2f} | {p50 / c_p50:.2f} | {p99:.2f} | {p99 / c_p99:.2f} "
            f"| {config.median('server_cpu'):.0%} | {config.median('client_cpu'):.0%} "
            f"| {sum(r.errors for r in config.runs)} |"
        )
    full, gunicorn, no_log = configs[4], configs[2], configs[3]
    lines += [
        "",
        "Targets: full stack ≥ 70 % of the ceiling's req/s, p99 ≤ 2 x the ceiling's. Measured: "
        f"req/s **{full.median('rps') / c_rps:.0%}** (per server CPU-second "
        f"**{full.median('per_cpu_second') / c_eff:.0%}**), p99 "
        f"**{full.median('p99_ms') / c_p99:.2f} x**. Access line (gunicorn with vs without): "
        f"**{1 - gunicorn.median('per_cpu_second') / no_log.median('per_cpu_second'):.0%}** "
        "of the CPU-normalised throughput.",
        "",
        "Per round, req/s (req per server CPU-s): "
        + "; ".join(
            f"{c.name}: " + ", ".join(f"{r.rps:,.0f} ({r.per_cpu_second:,.0f})" for r in c.runs)
            for c in configs
        ),
        "",
        *[f"- {note}" for note in notes],
        "- server CPU: share of one core the server's processes used during the run. A server "
        "that is the bottleneck uses ~100 %; less means other load on the host took the core "
        "(a shared machine), and req/s understates capacity. Requests per server CPU-second "
        "does not depend on that: compare configurations by it when server CPU is low.",
    ]
    for config in configs:
        if config.upstream is None:
            continue
        per_request = {
            name: statistics.median(r.parts_cpu[name] / r.rps * 1e6 for r in config.runs if r.rps)
            for name in config.runs[0].parts_cpu
        }
        alone = 1e6 / gunicorn.median("per_cpu_second")
        lines.append(
            f"- {config.name}: server CPU per request "
            + " + ".join(f"{name} {us:.0f} µs" for name, us in per_request.items())
            + f" (gunicorn alone, without nginx: {alone:.0f} µs; the ceiling: "
            f"{1e6 / c_eff:.0f} µs)"
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
    args = parser.parse_args(argv)
    rounds = 0 if args.profile_only else ROUNDS
    if len(os.sched_getaffinity(0)) < 2:
        say("needs two CPUs (server and load generator on different cores)")
        return 2
    ensure_debian_packages({"wrk": "wrk", "nginx": "nginx", "taskset": "util-linux"})
    REPORTS.mkdir(exist_ok=True)
    # Metrics files, logs and nginx's temp files on tmpfs, like the containers' /tmp.
    shm = Path("/dev/shm")  # noqa: S108 - tmpfs, like the containers' /tmp
    with tempfile.TemporaryDirectory(prefix="bench-", dir=shm) as tmp:
        work = Path(tmp)
        lua = work / "cap.lua"
        lua.write_text(CAP_LUA)
        configs: list[Config] = []
        try:
            notes = start_all(work, configs)
            for round_no in range(1, rounds + 1):
                for config in configs:
                    say(f"round {round_no}/{rounds}: {config.name}")
                    wrk(config.url, WARMUP_SECONDS, lua, config.parts())
                    config.runs.append(wrk(config.url, SECONDS, lua, config.parts()))
            want_profile = args.profile or args.profile_only
            profile = profile_worker(configs[2], lua, work) if want_profile else ""
        finally:
            for config in reversed(configs):
                config.server.stop()
    if args.profile_only:
        print(profile)
        return 0
    report = render(configs, notes, profile)
    path = REPORTS / f"bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
    path.write_text(report)
    print(report)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
