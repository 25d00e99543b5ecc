#!/usr/bin/env python3
"""Zero-downtime deploy and rollback of the app service of a running compose stack.

`make deploy` rolls the app to the working tree and `.env`; `make rollback` goes back to the
image that ran before the last deploy. Both take the same path, the one a replica set takes
behind a readiness-driven proxy (docker-rollout and kamal-proxy do the same on one host):

    lock ─▶ tag the running image :previous ─▶ build (deploy) or retag (rollback)
         ─▶ start N new app containers beside the N old ones (compose --scale 2N, no recreate)
         ─▶ each new one healthy AND in nginx's upstream (`nginx-upstreams`: the replica
            watcher puts an address there only after its /readyz answered 200)
         ─▶ stop the old ones (SIGTERM: /readyz 503 for SHUTDOWN_DELAY, the watcher takes them
            out, in-flight requests finish) ─▶ remove them
    a new one not ready within DEPLOY_TIMEOUT (crash, invalid setting, failing readiness):
         ─▶ the new ones are stopped and removed, the old ones never touched; exit 1 with
            the reason and the failed container's last log lines

nginx is never restarted and never left without a ready replica. One JSON object per line
on stdout, with the stack's core keys (`timestamp`, `level`, `logger`, `event`).

Standard library only: it runs with any python3 >= 3.11 next to the Docker CLI.
Exit status: 0 done; 1 the deploy failed and was rolled back; 2 it could not start
(no running stack, another deploy running, a bad DEPLOY_* setting).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "app"  # the service rolled; nginx follows it by its DNS name
PROXY = "nginx"
PREVIOUS_TAG = "previous"  # <APP_IMAGE>:previous is what `make rollback` returns to
LOG_LINES = 20  # of a failed container, in the error

# The deploy's own settings: read from the environment, then `.env` (as compose does),
# validated here, named in every error. .env.example documents them.
DEFAULTS = {
    # Seconds each new replica has to be healthy and in nginx's upstream.
    "DEPLOY_TIMEOUT": 120,
}
LIMITS = {"DEPLOY_TIMEOUT": (10, 3600)}

EX_FAILED = 1
EX_USAGE = 2


class DeployError(Exception):
    """The deploy failed after it started; the new containers are being removed."""

    def __init__(self, reason: str, **context: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.context = context


class Refused(Exception):
    """The deploy cannot start: nothing was changed."""


# ── logging: one JSON object per line ───────────────────────────────────────────


def log(event: str, level: str = "info", **fields: Any) -> None:
    record = {
        "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z"),
        "level": level,
        "logger": "deploy",
        "event": event,
        "pid": os.getpid(),
        **fields,
    }
    print(json.dumps(record, default=str), flush=True)


# ── settings ────────────────────────────────────────────────────────────────────


def read_dotenv(path: Path) -> dict[str, str]:
    """`NAME=value` lines of a compose .env file (quotes stripped, comments skipped)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        match = re.match(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        value = match[2]
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[match[1]] = value
    return values


def load_settings(environ: dict[str, str], dotenv: dict[str, str]) -> dict[str, int]:
    settings: dict[str, int] = {}
    for name, default in DEFAULTS.items():
        raw = environ.get(name, dotenv.get(name, ""))
        if not raw.strip():
            settings[name] = default
            continue
        low, high = LIMITS[name]
        if not raw.strip().isdigit() or not low <= int(raw) <= high:
            raise Refused(f"{name}={raw!r} is invalid: expected whole seconds from {low} to {high}")
        settings[name] = int(raw)
    return settings


# ── docker ──────────────────────────────────────────────────────────────────────


def run(
    args: Sequence[str],
    *,
    timeout: float = 120,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> str:
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        list(args),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise DeployError(
            f"`{' '.join(args)}` exited {proc.returncode}",
            output=(proc.stdout + proc.stderr).strip().splitlines()[-LOG_LINES:],
        )
    return proc.stdout


def compose(
    *args: str, timeout: float = 120, check: bool = True, env: dict[str, str] | None = None
) -> str:
    return run(["docker", "compose", *args], timeout=timeout, check=check, env=env)


def base_images() -> dict[str, str]:
    """The base images to build on (scripts/pick-base-images.sh: local ones, built now,
    where the configured ones cannot be pulled)."""
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        ["bash", str(ROOT / "scripts" / "pick-base-images.sh")],  # noqa: S607
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        timeout=3600,
        check=False,
    )  # its account of what it does goes to our stderr, for people
    if proc.returncode != 0:
        raise DeployError(f"scripts/pick-base-images.sh exited {proc.returncode}")
    return dict(word.split("=", 1) for word in proc.stdout.split())


def inspect(ids: Sequence[str]) -> list[dict[str, Any]]:
    if not ids:
        return []
    out = run(["docker", "inspect", *ids], check=False)
    return list(json.loads(out or "[]"))


@dataclass
class Replica:
    """One app container as Docker reports it."""

    id: str
    name: str
    image: str  # image id (sha256:...)
    configured: str  # the reference it was created from (<APP_IMAGE>:<APP_VERSION>)
    status: str  # created, running, restarting, exited, ...
    health: str  # starting, healthy, unhealthy, or "" without a healthcheck
    exit_code: int
    restarts: int
    started: str
    addresses: set[str] = field(default_factory=set)

    @classmethod
    def from_inspect(cls, data: dict[str, Any]) -> Replica:
        state = data["State"]
        networks = data.get("NetworkSettings", {}).get("Networks") or {}
        return cls(
            id=data["Id"][:12],
            name=data["Name"].lstrip("/"),
            image=data["Image"],
            configured=data["Config"]["Image"],
            status=state["Status"],
            health=(state.get("Health") or {}).get("Status", ""),
            exit_code=int(state.get("ExitCode", 0)),
            restarts=int(data.get("RestartCount", 0)),
            started=state.get("StartedAt", ""),
            addresses={n["IPAddress"] for n in networks.values() if n.get("IPAddress")},
        )

    @property
    def crashed(self) -> bool:
        return self.status in ("exited", "dead", "restarting") or self.restarts > 0


@dataclass
class Stack:
    """The compose project the deploy works on, as its config and Docker describe it."""

    project: str
    image: str  # <APP_IMAGE>:<APP_VERSION> from the compose file and .env
    stop_grace_period: int  # seconds, compose's (docker stop waits this long)

    @classmethod
    def load(cls) -> Stack:
        try:
            config = json.loads(compose("config", "--format", "json"))
        except DeployError as error:
            raise Refused(f"the compose file does not load: {error.context}") from None
        service = config["services"][SERVICE]
        return cls(
            project=config["name"],
            image=service["image"],
            stop_grace_period=_duration(service.get("stop_grace_period", "10s")),
        )

    @property
    def repository(self) -> str:
        return self.image.rsplit(":", 1)[0] if ":" in self.image.split("/")[-1] else self.image

    @property
    def previous(self) -> str:
        return f"{self.repository}:{PREVIOUS_TAG}"

    def container_ids(self, service: str, *, running_only: bool = True) -> list[str]:
        args = ["docker", "ps", "-q", "--no-trunc"]
        if not running_only:
            args.append("-a")
        args += ["--filter", f"label=com.docker.compose.project={self.project}"]
        args += ["--filter", f"label=com.docker.compose.service={service}"]
        return run(args).split()

    def replicas(self, ids: Sequence[str] | None = None) -> list[Replica]:
        ids = self.container_ids(SERVICE, running_only=False) if ids is None else ids
        return [Replica.from_inspect(data) for data in inspect(ids)]

    def upstream(self) -> set[str]:
        """The IPs in nginx's rendered upstream (the edge's `nginx-upstreams` command)."""
        proxies = self.container_ids(PROXY)
        if not proxies:
            raise DeployError(f"the {PROXY} container is not running")
        out = run(["docker", "exec", proxies[0], "nginx-upstreams"], timeout=30)
        return {line.strip().rsplit(":", 1)[0] for line in out.splitlines() if line.strip()}


def _duration(text: str | int | float) -> int:
    """A compose duration (`40s`, `1m30s`, or nanoseconds as a number) in whole seconds."""
    if isinstance(text, int | float):
        return max(1, round(text / 1e9)) if text > 1000 else int(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", str(text))
    return max(1, round(sum(float(n) * units[u] for n, u in parts)))


# ── the lock ────────────────────────────────────────────────────────────────────


@contextlib.contextmanager
def deploy_lock(project: str, action: str) -> Iterator[None]:
    """One deploy or rollback per project and host at a time (flock: freed on any exit)."""
    path = Path(tempfile.gettempdir()) / f"asgi-stack-deploy-{project}.lock"
    handle: IO[str] = path.open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise Refused(
            f"another deploy of project {project!r} is running ({holder}); "
            f"wait for it to finish (lock {path})"
        ) from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(
            f"`make {action}`, pid {os.getpid()}, since {dt.datetime.now(dt.UTC):%H:%M:%S} UTC"
        )
        handle.flush()
        yield
    finally:
        handle.seek(0)
        handle.truncate()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


# ── the roll ────────────────────────────────────────────────────────────────────


def _tag(image_id: str, ref: str) -> None:
    run(["docker", "tag", image_id, ref])


def _image_id(ref: str) -> str | None:
    out = run(["docker", "image", "inspect", "--format", "{{.Id}}", ref], check=False).strip()
    return out or None


def _image_version(ref: str) -> str:
    out = run(
        [
            "docker",
            "image",
            "inspect",
            "--format",
            '{{index .Config.Labels "org.opencontainers.image.version"}}',
            ref,
        ],
        check=False,
    )
    return out.strip() or "unknown"


def _last_lines(replica: Replica) -> list[str]:
    # Both streams: the app logs to stdout, a crash before logging is set up to stderr.
    proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
        ["docker", "logs", "--tail", str(LOG_LINES), replica.id],  # noqa: S607 - the CLI on PATH
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return (proc.stdout + proc.stderr).strip().splitlines()[-LOG_LINES:]


def _why(replica: Replica, lines: list[str]) -> str:
    """The reason a replica failed, the app's own message first (an invalid setting's names it)."""
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("level") in ("critical", "error"):
            return str(record.get("event"))
    if replica.crashed:
        return f"exited with status {replica.exit_code}"
    return "not ready"


def wait_until_serving(
    stack: Stack, new: list[str], timeout: int, started: float
) -> dict[str, float]:
    """Until every new replica is healthy and in nginx's upstream; seconds each one took."""
    deadline = time.monotonic() + timeout
    in_upstream: dict[str, float] = {}
    while True:
        replicas = stack.replicas(new)
        for replica in replicas:
            if replica.crashed:
                lines = _last_lines(replica)
                raise DeployError(
                    f"new replica {replica.name} crashed: {_why(replica, lines)}",
                    container=replica.name,
                    status=replica.status,
                    exit_code=replica.exit_code,
                    restarts=replica.restarts,
                    last_lines=lines,
                )
        upstream = stack.upstream()
        for replica in replicas:
            if (
                replica.name not in in_upstream
                and replica.health in ("healthy", "")
                and (replica.addresses & upstream)
            ):
                in_upstream[replica.name] = time.monotonic() - started
                log(
                    "replica in nginx upstream",
                    container=replica.name,
                    addresses=sorted(replica.addresses),
                    seconds=round(in_upstream[replica.name], 2),
                )
        if len(in_upstream) == len(new):
            return in_upstream
        if time.monotonic() > deadline:
            late = next(r for r in replicas if r.name not in in_upstream)
            lines = _last_lines(late)
            state = late.health or late.status
            raise DeployError(
                f"new replica {late.name} not ready within DEPLOY_TIMEOUT={timeout}s "
                f"(health: {state}; in nginx upstream: {bool(late.addresses & upstream)}): "
                f"{_why(late, lines)}",
                container=late.name,
                last_lines=lines,
            )
        time.sleep(0.5)


def stop_and_remove(stack: Stack, replicas: list[Replica], why: str) -> None:
    """`docker stop` (SIGTERM: the drain, then graceful) and remove; while they stop, watch
    nginx's upstream and log when they left it (the drain working: before they exit)."""
    if not replicas:
        return
    started = time.monotonic()
    names = [r.name for r in replicas]
    addresses = set().union(*(r.addresses for r in replicas))
    log("stopping replicas", containers=names, why=why, grace_seconds=stack.stop_grace_period)
    ids = [r.id for r in replicas]
    stop = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
        ["docker", "stop", "--time", str(stack.stop_grace_period), *ids],  # noqa: S607
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    listed = bool(addresses & stack.upstream())  # failed new ones never were
    left: float | None = None
    while stop.poll() is None:
        if listed and left is None and not addresses & stack.upstream():
            left = time.monotonic() - started
            log("replicas left nginx upstream", containers=names, seconds=round(left, 2))
        time.sleep(0.25)
    _, errors = stop.communicate()
    if stop.returncode != 0:
        raise DeployError(f"`docker stop` exited {stop.returncode}", output=errors.splitlines())
    run(["docker", "rm", *ids], timeout=120)
    log(
        "replicas removed",
        containers=names,
        seconds=round(time.monotonic() - started, 2),
        were_in_upstream=listed,
        left_upstream_before_exit=left is not None if listed else None,
    )


def _target_image(stack: Stack, action: str, current: str, previous_id: str | None) -> str:
    """The image the new replicas run: a new build, or the one kept at :previous. Tags it
    as the service's image (what compose starts) and keeps the running one at :previous."""
    if action == "deploy":
        started = time.monotonic()
        bases = base_images()
        log("building", image=stack.image, **bases)
        compose("build", SERVICE, timeout=1800, env=bases)
        target = _image_id(stack.image)
        if target is None:
            raise DeployError(f"the build produced no image {stack.image}")
        log(
            "built",
            image=stack.image,
            id=target[:19],
            version=_image_version(target),
            seconds=round(time.monotonic() - started, 1),
            unchanged=target == current,  # a settings-only deploy
        )
    else:
        if previous_id is None:
            raise Refused(f"no image {stack.previous} to roll back to: nothing was deployed yet")
        target = previous_id
        _tag(target, stack.image)
    if target != current:
        _tag(current, stack.previous)  # rollback after rollback: forward again
        log("kept the running image for rollback", tag=stack.previous, id=current[:19])
    return target


def _start_beside(stack: Stack, old: list[Replica], timeout: int) -> dict[str, float]:
    """N new replicas beside the N old (compose leaves those alone: --no-recreate), until
    each one serves; seconds from the start to nginx's upstream, per replica."""
    old_ids = {r.id for r in old}
    started = time.monotonic()
    compose(
        "up", "--detach", "--no-deps", "--no-recreate", "--no-build",
        "--scale", f"{SERVICE}={2 * len(old)}", SERVICE,
        timeout=300,
    )  # fmt: skip
    new = [i[:12] for i in stack.container_ids(SERVICE, running_only=False)]
    new = [i for i in new if i not in old_ids]
    log("started new replicas", containers=[r.name for r in stack.replicas(new)])
    return wait_until_serving(stack, new, timeout, started)


def roll(stack: Stack, settings: dict[str, int], action: str) -> None:
    started = time.monotonic()
    old = [r for r in stack.replicas() if r.status == "running"]
    if not old:
        raise Refused(
            f"no running {SERVICE} container in project {stack.project!r}: "
            "start the stack first (`make up`)"
        )
    if not stack.container_ids(PROXY):
        raise Refused(f"no running {PROXY} container in project {stack.project!r}: `make up`")
    current = old[0].image
    log(
        f"{action} started",
        project=stack.project,
        image=stack.image,
        replicas=[r.name for r in old],
        running_version=_image_version(current),
    )
    previous_id = _image_id(stack.previous)
    configured_id = _image_id(stack.image)
    target = _target_image(stack, action, current, previous_id)
    try:
        waited = _start_beside(stack, old, settings["DEPLOY_TIMEOUT"])
    except (DeployError, KeyboardInterrupt) as error:
        reason = error.reason if isinstance(error, DeployError) else "interrupted"
        log(f"{action} failed: removing the new replicas", level="error", reason=reason)
        old_ids = {r.id for r in old}
        stop_and_remove(stack, [r for r in stack.replicas() if r.id not in old_ids], "failed")
        # The tags go back to what they named, so a later `docker compose up` does not
        # recreate the old replicas from the failed image.
        if configured_id is not None and configured_id != target:
            _tag(configured_id, stack.image)
        if previous_id is not None:
            _tag(previous_id, stack.previous)
        if isinstance(error, KeyboardInterrupt):
            raise DeployError(reason) from None
        raise
    # Every new replica serves: the old ones drain and go.
    stop_and_remove(stack, old, why=f"replaced ({action})")
    log(
        f"{action} done",
        image=stack.image,
        version=_image_version(target),
        replicas=[r.name for r in stack.replicas() if r.status == "running"],
        seconds=round(time.monotonic() - started, 1),
        seconds_to_upstream=round(max(waited.values()), 2),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["deploy", "rollback"])
    action = parser.parse_args(argv).action
    try:
        settings = load_settings(dict(os.environ), read_dotenv(ROOT / ".env"))
        stack = Stack.load()
        with deploy_lock(stack.project, action):
            roll(stack, settings, action)
    except Refused as refused:
        log(f"{action} refused", level="error", reason=str(refused))
        return EX_USAGE
    except DeployError as error:
        log(f"{action} failed", level="error", reason=error.reason, **error.context)
        return EX_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
