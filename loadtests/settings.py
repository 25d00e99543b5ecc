"""Thresholds and run parameters of the load test, from loadtests/slo.toml and the environment.

The TOML file holds the defaults in one place; an environment variable overrides one key
(`LOADTEST_MIN_RPS=200 make loadtest`). Values are validated here, once, and a bad one stops
the run with a message that names the variable (or the TOML key) and what it accepts.
Standard library only: the Locust image runs this too and carries nothing but Locust.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

__all__ = [
    "DEFAULT_SLO_FILE",
    "CrossCheckSettings",
    "RouteThresholds",
    "RunSettings",
    "Settings",
    "SettingsError",
    "Thresholds",
    "load_settings",
    "parse_duration",
    "usable_cpus",
]

DEFAULT_SLO_FILE = Path(__file__).with_name("slo.toml")
DEFAULT_REPORT_ROOT = Path(__file__).with_name("reports")
COMPOSE_PROJECT = "asgi-stack"  # `name:` in docker-compose.yml
DOTENV = Path(__file__).resolve().parents[1] / ".env"

CrossCheckSource = Literal["auto", "metrics-url", "prometheus", "docker", "off"]
CROSSCHECK_SOURCES: tuple[str, ...] = ("auto", "metrics-url", "prometheus", "docker", "off")

T = TypeVar("T")


class SettingsError(Exception):
    """A threshold or run parameter is invalid; the message names where it came from."""


@dataclass(frozen=True)
class RouteThresholds:
    """Limits for one request name; None means "only the aggregate limit applies"."""

    max_p95_ms: float | None = None
    max_p99_ms: float | None = None
    max_error_ratio: float | None = None


@dataclass(frozen=True)
class Thresholds:
    min_rps: float
    max_p95_ms: float
    max_p99_ms: float
    max_error_ratio: float
    latency_excludes: tuple[str, ...] = ()
    routes: Mapping[str, RouteThresholds] = field(default_factory=dict)


@dataclass(frozen=True)
class RunSettings:
    host: str
    ca_file: Path | None
    users: int
    spawn_rate: float
    duration_s: int
    max_requests: int
    processes: int
    wait_min: float
    wait_max: float
    slow_seconds: float
    report_root: Path
    allow_remote: bool = False
    server_name: str | None = None  # Host/SNI/certificate name when host is another address
    expect_workers: int = 1  # external Locust workers a --master run waits for
    web_ui: bool = False  # serve Locust's web UI after the preflight instead of a headless run
    web_host: str = "127.0.0.1"  # where that UI listens

    @property
    def hard_timeout_s(self) -> int:
        """Wall-clock limit of the whole Locust process: ramp-up, run, stop, reports."""
        ramp = math.ceil(self.users / self.spawn_rate)
        return self.duration_s + ramp + 60


@dataclass(frozen=True)
class CrossCheckSettings:
    source: CrossCheckSource
    tolerance_ratio: float
    tolerance_abs: int
    required: bool
    metrics_url: str | None
    prometheus_url: str | None
    compose_project: str | None
    app_prefixes: tuple[str, ...] = ("/api/",)

    def tolerance(self, count: int) -> int:
        return max(self.tolerance_abs, math.ceil(self.tolerance_ratio * count))


@dataclass(frozen=True)
class Settings:
    thresholds: Thresholds
    run: RunSettings
    crosscheck: CrossCheckSettings
    slo_file: Path


# --- value parsers: each raises ValueError with what it accepts --------------------------


def parse_duration(value: object) -> int:
    """'30s', '2m', '1m30s', '1h', or a number of seconds -> seconds (>= 1)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 2m, 1m30s or a number of seconds")
    if isinstance(value, int | float):
        seconds = int(value)
    else:
        text = str(value).strip().lower()
        if re.fullmatch(r"\d+", text):
            seconds = int(text)
        else:
            match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
            if not text or not match:
                raise ValueError("expected a duration like 30s, 2m, 1m30s or a number of seconds")
            h, m, s = (int(g) if g else 0 for g in match.groups())
            seconds = h * 3600 + m * 60 + s
    if not 1 <= seconds <= 24 * 3600:
        raise ValueError("expected a duration between 1s and 24h")
    return seconds


def _number(low: float, high: float = math.inf) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number in [{low}, {high}]")
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"expected a number in [{low}, {high}]") from None
        if not (low <= number <= high) or math.isnan(number):
            raise ValueError(f"expected a number in [{low}, {high}]")
        return number

    return parse


def _integer(low: int, high: int | None = None) -> Callable[[object], int]:
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"

    def parse(value: object) -> int:
        if isinstance(value, bool):
            raise ValueError(f"expected an integer {bounds}")
        try:
            number = int(str(value).strip()) if not isinstance(value, int) else value
        except ValueError:
            raise ValueError(f"expected an integer {bounds}") from None
        if number < low or (high is not None and number > high):
            raise ValueError(f"expected an integer {bounds}")
        return number

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected one of 1, 0, true, false, yes, no")


def usable_cpus() -> int:
    """CPUs this process may run on (affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _processes(value: object) -> int:
    if str(value).strip().lower() == "auto":
        return usable_cpus()
    return _integer(1, 256)(value)


def _prefixes(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else str(value).replace(",", " ").split()
    prefixes = tuple(str(item).strip() for item in items if str(item).strip())
    if not prefixes or not all(p.startswith("/") for p in prefixes):
        raise ValueError('expected path prefixes starting with "/", e.g. "/api/" or "/"')
    return prefixes


def _crosscheck_source(value: object) -> CrossCheckSource:
    text = str(value).strip().lower()
    if text not in CROSSCHECK_SOURCES:
        raise ValueError(f"expected one of {', '.join(CROSSCHECK_SOURCES)}")
    return text  # type: ignore[return-value]


def _url(value: object) -> str | None:
    text = str(value).strip().rstrip("/")
    if not text:
        return None
    if not re.match(r"^https?://[^/\s]+", text):
        raise ValueError("expected an http:// or https:// URL")
    return text


def _server_name(value: str) -> str | None:
    text = value.strip()
    if text and not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\]", text):
        raise SettingsError(f"LOADTEST_SERVER_NAME={value!r}: expected a host name, e.g. localhost")
    return text or None


def _web_host(value: object) -> str:
    text = str(value).strip()
    if not re.fullmatch(r"[A-Za-z0-9.:-]+", text):
        raise ValueError("expected an address to bind, e.g. 127.0.0.1 or 0.0.0.0")
    return text


def _optional_url(env: Mapping[str, str], name: str) -> str | None:
    try:
        return _url(env.get(name, ""))
    except ValueError as exc:
        raise SettingsError(f"{name}={env[name]!r}: {exc}") from None


def _https_base_url(value: object) -> str:
    text = str(value).strip().rstrip("/")
    if not re.fullmatch(r"https?://[^/\s?#]+", text):
        raise ValueError("expected a base URL like https://localhost:8443 (no path)")
    return text


# --- loading ------------------------------------------------------------------------------


class _Source:
    """Looks a key up in the environment first, then in a TOML table; names the origin."""

    def __init__(self, env: Mapping[str, str], table: Mapping[str, Any], section: str) -> None:
        self.env = env
        self.table = table
        self.section = section

    def get(
        self, key: str, env_var: str | None, parse: Callable[[object], T], default: Any = None
    ) -> T:
        if env_var and self.env.get(env_var, "").strip() != "":
            raw: object = self.env[env_var]
            origin = f"{env_var}={raw!r}"
        elif key in self.table:
            raw = self.table[key]
            origin = f"[{self.section}] {key} = {raw!r}"
        elif default is not None:
            raw, origin = default, f"default of {key}"
        else:
            raise SettingsError(f"[{self.section}] {key} is missing (set it or {env_var})")
        try:
            return parse(raw)
        except ValueError as exc:
            raise SettingsError(f"{origin}: {exc}") from None


def _route_thresholds(routes: object) -> dict[str, RouteThresholds]:
    if not isinstance(routes, dict):
        raise SettingsError("[thresholds.routes] must be a table of request names")
    parsed: dict[str, RouteThresholds] = {}
    for name, limits in routes.items():
        if not isinstance(limits, dict):
            raise SettingsError(f'[thresholds.routes."{name}"] must be a table')
        unknown = set(limits) - {"max_p95_ms", "max_p99_ms", "max_error_ratio"}
        if unknown:
            raise SettingsError(
                f'[thresholds.routes."{name}"] unknown keys {sorted(unknown)}; '
                "allowed: max_p95_ms, max_p99_ms, max_error_ratio"
            )
        src = _Source({}, limits, f'thresholds.routes."{name}"')
        parsed[name] = RouteThresholds(
            max_p95_ms=src.get("max_p95_ms", None, _number(0)) if "max_p95_ms" in limits else None,
            max_p99_ms=src.get("max_p99_ms", None, _number(0)) if "max_p99_ms" in limits else None,
            max_error_ratio=(
                src.get("max_error_ratio", None, _number(0, 1))
                if "max_error_ratio" in limits
                else None
            ),
        )
    return parsed


def read_dotenv(path: Path) -> dict[str, str]:
    """The stack's settings compose would read from `.env`: HTTPS_PORT, COMPOSE_PROJECT_NAME
    and LOADTEST_*, so `make loadtest` targets the port `docker compose up` published."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    found = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        key = key.removeprefix("export ").strip()
        if not sep or key.startswith("#"):
            continue
        if key in ("HTTPS_PORT", "COMPOSE_PROJECT_NAME") or key.startswith("LOADTEST_"):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            found[key] = value
    return found


def load_settings(env: Mapping[str, str] | None = None, slo_file: Path | None = None) -> Settings:
    """Read slo.toml (or LOADTEST_SLO_FILE) and apply the overrides: the environment, then
    the repository's `.env` (what compose reads) for what the environment leaves unset."""
    if env is None:
        env = {**read_dotenv(DOTENV), **os.environ}
    path = slo_file or Path(env.get("LOADTEST_SLO_FILE") or DEFAULT_SLO_FILE)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SettingsError(f"SLO file {path} not found (LOADTEST_SLO_FILE)") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"SLO file {path} is not valid TOML: {exc}") from None

    t = _Source(env, data.get("thresholds", {}), "thresholds")
    excludes = data.get("thresholds", {}).get("latency_excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(x, str) for x in excludes):
        raise SettingsError("[thresholds] latency_excludes must be a list of request names")
    thresholds = Thresholds(
        min_rps=t.get("min_rps", "LOADTEST_MIN_RPS", _number(0)),
        max_p95_ms=t.get("max_p95_ms", "LOADTEST_MAX_P95_MS", _number(0)),
        max_p99_ms=t.get("max_p99_ms", "LOADTEST_MAX_P99_MS", _number(0)),
        max_error_ratio=t.get("max_error_ratio", "LOADTEST_MAX_ERROR_RATIO", _number(0, 1)),
        latency_excludes=tuple(excludes),
        routes=_route_thresholds(data.get("thresholds", {}).get("routes", {})),
    )

    r = _Source(env, data.get("run", {}), "run")
    https_port = env.get("HTTPS_PORT", "").strip() or "443"
    ca_file = env.get("LOADTEST_CA_FILE", "").strip()
    run = RunSettings(
        host=r.get(
            "host", "LOADTEST_HOST", _https_base_url, default=f"https://localhost:{https_port}"
        ),
        ca_file=Path(ca_file) if ca_file else None,
        users=r.get("users", "LOADTEST_USERS", _integer(1, 10000)),
        spawn_rate=r.get("spawn_rate", "LOADTEST_SPAWN_RATE", _number(0.1, 1000)),
        duration_s=r.get("duration", "LOADTEST_DURATION", parse_duration),
        max_requests=r.get("max_requests", "LOADTEST_MAX_REQUESTS", _integer(1)),
        processes=r.get("processes", "LOADTEST_PROCESSES", _processes, default="auto"),
        wait_min=r.get("wait_min", "LOADTEST_WAIT_MIN", _number(0, 60)),
        wait_max=r.get("wait_max", "LOADTEST_WAIT_MAX", _number(0, 60)),
        slow_seconds=r.get("slow_seconds", "LOADTEST_SLOW_SECONDS", _number(0, 30)),
        report_root=Path(env.get("LOADTEST_REPORT_DIR", "").strip() or DEFAULT_REPORT_ROOT),
        allow_remote=r.get("allow_remote", "LOADTEST_ALLOW_REMOTE", _boolean, default=False),
        server_name=_server_name(env.get("LOADTEST_SERVER_NAME", "")),
        expect_workers=r.get("expect_workers", "LOADTEST_EXPECT_WORKERS", _integer(1, 256), 1),
        web_ui=r.get("web_ui", "LOADTEST_WEB_UI", _boolean, default=False),
        web_host=r.get("web_host", "LOADTEST_WEB_HOST", _web_host, default="127.0.0.1"),
    )
    if run.wait_max < run.wait_min:
        raise SettingsError(
            f"LOADTEST_WAIT_MAX ({run.wait_max}) must be >= LOADTEST_WAIT_MIN ({run.wait_min})"
        )

    c = _Source(env, data.get("crosscheck", {}), "crosscheck")
    project = (
        env.get("LOADTEST_COMPOSE_PROJECT") or env.get("COMPOSE_PROJECT_NAME") or COMPOSE_PROJECT
    ).strip()
    crosscheck = CrossCheckSettings(
        source=c.get("source", "LOADTEST_CROSSCHECK", _crosscheck_source, default="auto"),
        tolerance_ratio=c.get("tolerance_ratio", "LOADTEST_CROSSCHECK_TOLERANCE", _number(0, 1)),
        tolerance_abs=c.get("tolerance_abs", "LOADTEST_CROSSCHECK_TOLERANCE_ABS", _integer(0)),
        required=c.get("required", "LOADTEST_CROSSCHECK_REQUIRED", _boolean, default=False),
        metrics_url=_optional_url(env, "METRICS_URL"),
        prometheus_url=_optional_url(env, "PROMETHEUS_URL"),
        compose_project=project or None,
        app_prefixes=c.get("app_prefixes", "LOADTEST_APP_PREFIXES", _prefixes, default="/api/"),
    )
    return Settings(thresholds=thresholds, run=run, crosscheck=crosscheck, slo_file=path)
