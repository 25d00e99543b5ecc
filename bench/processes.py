"""Process control: start the servers pinned to the server core, wait until they answer,
read their CPU time and peak memory from /proc, stop exactly what was started.

A server is either a host process group (started here, in its own session) or a Docker
container (started here by `docker run`, stopped and removed by its id). Both are seen
the same way from outside: the pids of the process tree, read from /proc.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import ssl

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"bench: {message}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        # As nginx binds: connections of a stopped one in TIME_WAIT do not hold the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))  # noqa: S104 - a test bind, closed at once
        except OSError:
            return False
    return True


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (every thread's children)."""
    found = [pid]
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
                found += process_tree(int(child))
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLOCK_TICKS


def peak_rss_bytes(pids: list[int]) -> int:
    """Sum of each process's peak resident set (VmHWM): the server side's memory high mark."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1]) * 1024
    return total


def _docker(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, check=False, timeout=30
    )


@dataclass
class Server:
    """One server side process tree: a host process group or a container."""

    name: str
    log: Path
    process: subprocess.Popen[bytes] | None = None
    container: str = ""  # docker container id
    compose: list[str] = field(default_factory=list)  # `docker compose -f ...` of its project
    compose_env: dict[str, str] = field(default_factory=dict)  # COMPOSE_PROJECT_NAME included
    owned: bool = True  # started by `docker run` here: removed by its id on stop
    fixed: tuple[int, ...] = ()  # processes started by someone else for us (docker-proxy)

    def container_of(self, service: str) -> str:
        """The container id of a service of this server's compose project."""
        return subprocess.run(
            [*self.compose, "ps", "--quiet", service],
            capture_output=True,
            text=True,
            env=self.compose_env,
            check=True,
            timeout=60,
        ).stdout.strip()

    def sibling(self, service: str) -> Server:
        """Another service of the same project: measured on its own, stopped with this one."""
        container = self.container_of(service)
        return Server(f"{self.name}: {service}", self.log, container=container, owned=False)

    def root_pid(self) -> int | None:
        if self.process is not None:
            return self.process.pid
        out = _docker("inspect", "--format", "{{.State.Pid}}", self.container).stdout.strip()
        return int(out) if out.isdigit() and out != "0" else None

    def pids(self) -> list[int]:
        if self.fixed:
            return [pid for pid in self.fixed if Path(f"/proc/{pid}").exists()]
        pid = self.root_pid()
        if pid is None:
            return []
        try:
            return process_tree(pid)
        except OSError:
            return []

    def exited(self) -> bool:
        if self.fixed:
            return not self.pids()
        if self.process is not None:
            return self.process.poll() is not None
        return self.root_pid() is None

    def output(self) -> str:
        if self.container:
            done = _docker("logs", "--tail", "40", self.container)
            return done.stdout + done.stderr
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.compose:  # our project only (COMPOSE_PROJECT_NAME in compose_env)
            subprocess.run(
                [*self.compose, "down", "--volumes", "--timeout", "10"],
                capture_output=True,
                env=self.compose_env,
                check=False,
                timeout=120,
            )
            return
        if self.container and self.owned:
            _docker("rm", "--force", "--volumes", self.container)
            return
        if self.process is None or self.process.poll() is not None:  # or a compose sibling
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)  # the group we started
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def start_host(
    name: str, argv: list[str], env: dict[str, str], log: Path, *, cpu: int, cwd: Path
) -> Server:
    """A host process in its own session, pinned to `cpu`, output into `log`."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["taskset", "-c", str(cpu), *argv],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(name, log, process=process)


def docker_proxies(host_port: int, cpu: int) -> Server:
    """The userland proxies dockerd runs for a published host port, pinned to `cpu`: part
    of the server side of a compose stack with a published port."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            argv = cmdline.read_bytes().split(b"\0")
            if argv[0].endswith(b"docker-proxy") and str(host_port).encode() in argv:
                found.append(int(cmdline.parent.name))
    for pid in found:
        subprocess.run(
            ["taskset", "--all-tasks", "--pid", "--cpu-list", str(cpu), str(pid)],
            capture_output=True,
            check=True,
            timeout=30,
        )
    return Server("docker-proxy", Path("/dev/null"), fixed=tuple(found), owned=False)


def start_container(name: str, run_args: list[str], log: Path) -> Server:
    """`docker run --detach` with these arguments (image and command last)."""
    done = subprocess.run(
        ["docker", "run", "--detach", *run_args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: docker run failed:\n{done.stderr[-2000:]}")
    return Server(name, log, container=done.stdout.strip())


def start_compose(
    name: str,
    compose: list[str],
    services: list[str],
    env: dict[str, str],
    log: Path,
) -> Server:
    """`<compose> up --detach --no-deps <services>` (compose: the `docker compose -f ...`
    prefix; env: its variables, COMPOSE_PROJECT_NAME included). The server is the first
    service's container; stopping it takes the whole project down."""
    server = Server(name, log, compose=compose, compose_env=env)
    up = subprocess.run(
        [*compose, "up", "--detach", "--no-build", "--no-deps", *services],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    if up.returncode != 0:
        server.stop()
        raise RuntimeError(f"{name}: compose up failed:\n{up.stderr[-2000:]}")
    server.container = server.container_of(services[0])
    return server


def wait_listening(server: Server, port: int, timeout: float = 30) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.exited():
            raise RuntimeError(f"{server.name} exited:\n{server.output()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{server.name} not listening after {timeout:.0f}s:\n{server.output()}")


def wait_ready(
    server: Server,
    url: str,
    context: ssl.SSLContext | None,
    timeout: float = 60,
    host: str = "localhost",
) -> None:
    """Poll `url` until it answers 200; fail with the server's output if it exits or not."""
    if not url.startswith(("http://", "https://")):
        raise ValueError(url)
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Host": host})  # noqa: S310
    while time.monotonic() < deadline:
        if server.exited():
            raise RuntimeError(f"{server.name} exited:\n{server.output()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(request, timeout=2, context=context) as response,  # noqa: S310
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s:\n{server.output()}")
