"""Typed settings for the serving layer, read once from the environment.

Every knob of gunicorn, the uvicorn worker, logging and metrics lives here and only
here; `.env.example` lists them all with their defaults. A missing or invalid value stops
start-up with one line that names the variable and what it accepts (`SettingsError`).
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "EX_CONFIG",
    "OTEL_SDK_VARIABLES",
    "Settings",
    "SettingsError",
    "get_settings",
    "load_settings",
]

EX_CONFIG = 78  # sysexits.h: the exit status for a bad setting, which a restart will not fix

# Read by the OpenTelemetry SDK itself when span export is on (server/otlp.py), not here:
# the ones a deployment passes to the app besides OTEL_EXPORTER_OTLP_ENDPOINT.
OTEL_SDK_VARIABLES = ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_EXPORTER_OTLP_HEADERS")


class SettingsError(Exception):
    """A setting from the environment is missing or invalid; the message names it."""


Seconds = Annotated[int, Field(ge=1, le=3600)]


class Settings(BaseSettings):
    """The serving layer's configuration. Field names are the environment variables."""

    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    # What to serve: an ASGI application as "module:attribute".
    app_module: str = Field(
        "app.main:app", pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$", alias="APP_MODULE"
    )
    app_version: str = Field("dev", min_length=1, max_length=64, alias="APP_VERSION")

    # Server socket.
    host: str = Field("0.0.0.0", min_length=1, alias="HOST")  # noqa: S104 - a container binds all
    port: int = Field(8000, ge=1, le=65535, alias="PORT")
    backlog: int = Field(2048, ge=16, le=65535, alias="BACKLOG")

    # Worker processes. None means "derive from the CPU quota" (server.cpu).
    web_concurrency: int | None = Field(None, ge=1, le=256, alias="WEB_CONCURRENCY")
    # Seconds a worker may go without a heartbeat before the master kills it.
    worker_timeout: Seconds = Field(30, alias="WORKER_TIMEOUT")
    # Seconds the master answers /readyz 503 after SIGTERM, still serving, before it stops
    # the workers: nginx's replica watcher (probing every second) or any readiness-driven
    # router takes the instance out first. 0 stops at once. SIGHUP reloads skip it.
    shutdown_delay: int = Field(5, ge=0, le=300, alias="SHUTDOWN_DELAY")
    # Seconds the master waits for workers after SIGTERM / a reload before SIGKILL.
    graceful_timeout: Seconds = Field(28, alias="GRACEFUL_TIMEOUT")
    # Seconds uvicorn waits for in-flight requests on shutdown; must be < GRACEFUL_TIMEOUT.
    shutdown_timeout: Seconds = Field(20, alias="SHUTDOWN_TIMEOUT")
    # Idle keep-alive of the app's connections; outlives nginx's upstream keepalive_timeout.
    keepalive_timeout: Seconds = Field(75, alias="KEEPALIVE_TIMEOUT")
    # Recycle a worker after this many requests (0 disables), spread by the jitter.
    max_requests: int = Field(100_000, ge=0, alias="MAX_REQUESTS")
    max_requests_jitter: int = Field(10_000, ge=0, alias="MAX_REQUESTS_JITTER")
    worker_tmp_dir: Path = Field(Path("/dev/shm"), alias="WORKER_TMP_DIR")  # noqa: S108 - tmpfs

    # Logging.
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field(
        "info", alias="LOG_LEVEL"
    )
    log_format: Literal["json", "console"] = Field("json", alias="LOG_FORMAT")

    # Development only (compose.dev.yml sets it; docker-compose.yml never passes it): the
    # master reloads its workers when the code changes, and an app that fails to import
    # answers 503 with the error instead of stopping the server (server/reloader.py).
    reload: bool = Field(False, alias="RELOAD")
    # WebSockets (uvicorn's protocol, https://www.uvicorn.org/settings/#implementation).
    # A ping every interval keeps idle sessions alive through nginx's read timeout and finds
    # dead peers: no pong within the timeout closes the session (1011).
    ws_ping_interval: Seconds = Field(20, alias="WS_PING_INTERVAL")
    ws_ping_timeout: Seconds = Field(20, alias="WS_PING_TIMEOUT")
    # Larger messages close the session with 1009 (message too big) before they are buffered.
    ws_max_message_size: int = Field(
        1024 * 1024, ge=1, le=64 * 1024 * 1024, alias="WS_MAX_MESSAGE_SIZE"
    )

    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are trusted: "*" or IPs/CIDRs.
    forwarded_allow_ips: str = Field("127.0.0.1", alias="FORWARDED_ALLOW_IPS")

    # Prometheus metrics, served by the gunicorn master on their own port.
    metrics_host: str = Field("0.0.0.0", min_length=1, alias="METRICS_HOST")  # noqa: S104
    metrics_port: int = Field(9000, ge=1, le=65535, alias="METRICS_PORT")
    # Per-request HTTP metrics (count, latency histogram, in progress); off leaves the
    # metrics port serving the process and worker metrics only.
    http_metrics: Literal["on", "off"] = Field("on", alias="HTTP_METRICS")
    prometheus_multiproc_dir: Path = Field(
        Path("/tmp/prometheus-multiproc"),  # noqa: S108 - a tmpfs in the container
        alias="PROMETHEUS_MULTIPROC_DIR",
    )

    # Span export over OTLP/HTTP (server/otlp.py): off when empty. The OpenTelemetry SDK
    # reads this variable itself (and its other OTEL_* ones); here it is validated.
    otel_exporter_otlp_endpoint: str | None = Field(
        None, pattern=r"^https?://[^\s\"'\\]+$", alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )

    @field_validator("log_level", "log_format", "http_metrics", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("web_concurrency", "otel_exporter_otlp_endpoint", mode="before")
    @classmethod
    def _empty_is_auto(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _check_ips(cls, value: str) -> str:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise ValueError("must not be empty")
        for item in items:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return ",".join(items)

    @model_validator(mode="after")
    def _check_relations(self) -> Settings:
        if self.shutdown_timeout >= self.graceful_timeout:
            raise ValueError(
                "SHUTDOWN_TIMEOUT must be less than GRACEFUL_TIMEOUT "
                f"(got {self.shutdown_timeout} >= {self.graceful_timeout})"
            )
        if self.metrics_port == self.port:
            raise ValueError(f"METRICS_PORT must differ from PORT (both are {self.port})")
        return self


# What each field accepts, for the error message (pydantic's own wording is too internal).
_ACCEPTS = {
    "APP_MODULE": 'an import string "module:attribute", e.g. app.main:app',
    "APP_VERSION": "a label of 1 to 64 characters",
    "HOST": "an address to bind, e.g. 0.0.0.0 or 127.0.0.1",
    "PORT": "an integer from 1 to 65535",
    "BACKLOG": "an integer from 16 to 65535",
    "WEB_CONCURRENCY": "an integer from 1 to 256, or empty to derive it from the CPU quota",
    "WORKER_TIMEOUT": "whole seconds from 1 to 3600",
    "SHUTDOWN_DELAY": "whole seconds from 0 to 300 (0: no drain before a stop)",
    "GRACEFUL_TIMEOUT": "whole seconds from 1 to 3600",
    "SHUTDOWN_TIMEOUT": "whole seconds from 1 to 3600",
    "KEEPALIVE_TIMEOUT": "whole seconds from 1 to 3600",
    "MAX_REQUESTS": "an integer >= 0 (0 disables worker recycling)",
    "MAX_REQUESTS_JITTER": "an integer >= 0",
    "WORKER_TMP_DIR": "a directory path (a tmpfs such as /dev/shm)",
    "WS_PING_INTERVAL": "whole seconds from 1 to 3600",
    "WS_PING_TIMEOUT": "whole seconds from 1 to 3600",
    "WS_MAX_MESSAGE_SIZE": "bytes, an integer from 1 to 67108864 (64 MiB)",
    "LOG_LEVEL": "one of debug, info, warning, error, critical",
    "LOG_FORMAT": "one of json, console",
    "RELOAD": "true or false (development only)",
    "FORWARDED_ALLOW_IPS": 'a comma-separated list of IPs or CIDRs, or "*"',
    "METRICS_HOST": "an address to bind, e.g. 0.0.0.0",
    "METRICS_PORT": "an integer from 1 to 65535, different from PORT",
    "HTTP_METRICS": "on or off",
    "PROMETHEUS_MULTIPROC_DIR": "a writable directory path",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "an http(s) URL of an OTLP/HTTP collector, or empty",
}


def _describe(error: ValidationError, environ: dict[str, str]) -> str:
    problems = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else ""
        if name:
            got = environ.get(name, environ.get(name.lower()))
            shown = "missing" if got is None else repr(got)
            accepts = _ACCEPTS.get(name, item["msg"])
            problems.append(f"{name}={shown} is invalid: expected {accepts}")
        else:  # a relation between fields: the message already names them
            problems.append(str(item["msg"]).removeprefix("Value error, "))
    return "invalid setting: " + "; ".join(problems)


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read and validate settings; raise SettingsError naming each bad variable."""
    import os

    env = dict(os.environ if environ is None else environ)
    try:
        if environ is None:
            return Settings()  # type: ignore[call-arg]
        return Settings.model_validate({k.upper(): v for k, v in env.items()})
    except ValidationError as exc:
        raise SettingsError(_describe(exc, env)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return load_settings()
