"""The benchmark's knobs (BENCH_*), read from the environment once and validated.

A bad value stops the run before anything starts, with a message naming the variable.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


class SettingsError(ValueError):
    """A BENCH_* variable holds a value the benchmark cannot use."""


def _int(environ: dict[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = environ.get(name, "").strip() or str(default)
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is invalid: expected a whole number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range: expected {low}..{high}")
    return value


@dataclass(frozen=True)
class Settings:
    server_cpu: int  # the server side's one core (taskset / cpuset)
    client_cpu: int  # the load generator's core
    seconds: int  # one measured run, after the warm-up
    warmup_seconds: int
    connections: int  # client connections (wrk and h2load alike)
    streams: int  # h2load: concurrent streams per connection
    rounds: int  # interleaved rounds; the report keeps the median
    max_requests: int  # a run stops after this many responses, whatever the time

    @property
    def run_timeout(self) -> int:
        """Hard limit of one load-generator run: it is killed after this."""
        return self.seconds + 30


def load_settings(environ: dict[str, str] | None = None) -> Settings:
    env = dict(os.environ if environ is None else environ)
    cpus = os.cpu_count() or 1
    settings = Settings(
        server_cpu=_int(env, "BENCH_SERVER_CPU", 0, 0, cpus - 1),
        client_cpu=_int(env, "BENCH_CLIENT_CPU", 1, 0, cpus - 1),
        seconds=_int(env, "BENCH_SECONDS", 10, 1, 600),
        warmup_seconds=_int(env, "BENCH_WARMUP_SECONDS", 2, 1, 60),
        connections=_int(env, "BENCH_CONNECTIONS", 32, 1, 10_000),
        streams=_int(env, "BENCH_STREAMS", 4, 1, 1000),
        rounds=_int(env, "BENCH_ROUNDS", 3, 1, 50),
        max_requests=_int(env, "BENCH_MAX_REQUESTS", 400_000, 1, 100_000_000),
    )
    if settings.server_cpu == settings.client_cpu:
        raise SettingsError(
            f"BENCH_SERVER_CPU and BENCH_CLIENT_CPU are both {settings.server_cpu}: "
            "the server side and the load generator need different cores"
        )
    return settings
