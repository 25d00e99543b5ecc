"""`python -m bench.ablate [WORD...]` (make bench-ablate): what each nginx directive costs,
one at a time (only the variants whose name contains a WORD, if given).

`ours` (the shipped nginx service on the host's network in front of our gunicorn), once as
shipped and once per variant: one file of nginx/conf replaced by a copy with one change,
mounted over the original (a compose override in the work directory), nothing else
touched. Interleaved rounds (BENCH_ROUNDS), wrk and h2load as in `make bench`; the report
is nginx's own CPU per request (µs, median) and its difference to the shipped config.
A variant whose pattern no longer matches its file stops the run before anything starts:
an ablation that silently measured the shipped config would report a change as worthless.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.configs import ROOT, WRK, Config, Setup, Started, both, start_ours
from bench.processes import say
from bench.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from collections.abc import Callable

    from bench.settings import Settings

CONF = ROOT / "nginx" / "conf"
REPORTS = Path(__file__).with_name("reports")


@dataclass(frozen=True)
class Variant:
    name: str
    path: str  # under nginx/conf (mounted at /etc/nginx/<path>)
    old: str
    new: str
    why: str

    def render(self, conf: Path = CONF) -> str:
        text = (conf / self.path).read_text()
        if text.count(self.old) != 1:
            raise ValueError(f"{self.name}: {self.old!r} is not once in nginx/conf/{self.path}")
        return text.replace(self.old, self.new)


VARIANTS = [
    Variant(
        "access log unbuffered",
        "logging/access-log.conf",
        "access_log /dev/stdout json buffer=4k flush=1s;",
        "access_log /dev/stdout json;",
        "one write(2) per line (before: shipped until 4-6 µs per request were measured here)",
    ),
    Variant(
        "access log off",
        "logging/access-log.conf",
        "access_log /dev/stdout json buffer=4k flush=1s;",
        "access_log off;",
        "the price of the access log (a feature: not a candidate)",
    ),
    Variant(
        "upstream keepalive 8",
        "proxy/upstream.conf",
        "keepalive 32;",
        "keepalive 8;",
        "fewer idle upstream connections than requests in flight",
    ),
    Variant(
        "upstream keepalive 64",
        "proxy/upstream.conf",
        "keepalive 32;",
        "keepalive 64;",
        "more idle upstream connections than requests in flight",
    ),
    Variant(
        "proxy_buffering off",
        "proxy/app.conf",
        "proxy_pass http://app;",
        "proxy_pass http://app;\n    proxy_buffering off;",
        "small responses passed through without the response buffer",
    ),
    Variant(
        "request-id map: always $request_id",
        "tracing/request-id.conf",
        '    "~^[A-Za-z0-9._-]{1,128}$"   $http_x_request_id;\n',
        "",
        "no regex on X-Request-ID (a feature: accepting the caller's id)",
    ),
    Variant(
        "gzip off",
        "compression/gzip.conf",
        "gzip on;",
        "gzip off;",
        "the gzip filter's checks on a response below gzip_min_length",
    ),
]


def override(work: Path, variant: Variant) -> Path:
    """The variant's file and a compose override that mounts it over the shipped one
    (layered on bench/compose.host-nginx.yml)."""
    changed = work / "conf" / variant.path
    changed.parent.mkdir(parents=True, exist_ok=True)
    changed.write_text(variant.render())
    changed.chmod(0o644)
    changed.parent.chmod(0o755)
    compose = work / "compose.ablate.yml"
    compose.write_text(
        f"services:\n  nginx:\n    volumes:\n      - {changed}:/etc/nginx/{variant.path}:ro\n"
    )
    return compose


def setups(settings: Settings, only: list[str] | None = None) -> list[Setup]:
    """The shipped config, then each variant (or those whose name contains one of `only`)."""

    def start(variant: Variant | None) -> Callable[[Path], Started]:
        def run(work: Path) -> Started:
            extra = [str(override(work, variant))] if variant else []
            return start_ours(work, settings, overrides=extra)

        return run

    result = [Setup("shipped", start(None), both("shipped", "ours"))]
    for i, variant in enumerate(VARIANTS):
        if only and not any(word in variant.name for word in only):
            continue
        result.append(Setup(f"variant-{i}", start(variant), both(variant.name, "variant")))
    return result


def nginx_us(config: Config) -> float:
    """nginx's CPU per request, µs (median over rounds)."""
    return float(statistics.median(r.parts_cpu["nginx"] / r.rps * 1e6 for r in config.runs))


def render(configs: list[Config], rounds: int) -> str:
    load = os.getloadavg()
    lines = [
        f"# nginx ablation {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: GET /api/hello",
        "",
        f"Median of {rounds} interleaved round(s); nginx's own CPU per request (µs) and its "
        "difference to the shipped config (negative: cheaper). Load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end.",
        "",
        "| variant | client | nginx µs/req | Δ µs/req | app µs/req | req/s | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    shipped = {c.client: c for c in configs if c.role == "ours"}
    for config in configs:
        base = nginx_us(shipped[config.client])
        app = statistics.median(r.parts_cpu["gunicorn"] / r.rps * 1e6 for r in config.runs)
        lines.append(
            f"| {config.name} | {config.client} | {nginx_us(config):.1f} "
            f"| {nginx_us(config) - base:+.1f} | {app:.0f} | {config.median('rps'):,.0f} "
            f"| {config.median('p99_ms'):.2f} | {sum(r.errors for r in config.runs)} |"
        )
    lines += ["", *(f"- {v.name}: {v.why}" for v in VARIANTS)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    only = argv if argv is not None else sys.argv[1:]  # words of variant names
    from bench.__main__ import _rounds
    from bench.load import CAP_LUA
    from bench.tools import DEBIAN, build_images, ensure_debian_packages

    try:
        settings = load_settings()
        chosen = setups(settings, only)
        for variant in VARIANTS:
            variant.render()
    except (SettingsError, ValueError) as error:
        say(str(error))
        return 2
    ensure_debian_packages(DEBIAN)
    build_images(("nginx",))
    REPORTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        lua = work / "cap.lua"
        lua.write_text(CAP_LUA)
        _rounds(chosen, work, lua, settings, settings.rounds)
    configs = [c for s in chosen for c in s.configs]
    configs.sort(key=lambda c: (c.client != WRK, c.role != "ours"))
    report = render(configs, settings.rounds)
    path = REPORTS / f"ablate-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.md"
    path.write_text(report)
    print(report)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
