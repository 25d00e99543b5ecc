"""The report: one table per client (medians of interleaved rounds, each figure also as a
ratio to bare uvicorn measured by the same client), the targets, the per-round figures and
the notes, as markdown; and the same figures as a plot (bench/plot.py)."""

from __future__ import annotations

import itertools
import os
import statistics
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bench.configs import H2LOAD, REQUEST_ID, WRK

if TYPE_CHECKING:
    from bench.configs import Config
    from bench.settings import Settings

CLIENTS = {
    WRK: "HTTP/1.1 with keep-alive (wrk)",
    H2LOAD: "HTTP/2 multiplexed over TLS (h2load; bare uvicorn has no TLS: HTTP/1.1, --h1)",
}


def reference(config: Config, configs: list[Config]) -> Config:
    """Bare uvicorn measured the same way: same client, same headers."""
    ceilings = [c for c in configs if c.role == "ceiling" and c.client == config.client]
    same = [c for c in ceilings if c.headers == config.headers]
    if not (same or ceilings):
        raise ValueError(f"no bare-uvicorn row measured with {config.client}")
    return (same or ceilings)[0]


def _table(configs: list[Config]) -> list[str]:
    lines = [
        "| configuration | req/s | ÷ uvicorn | req per server CPU-s | ÷ uvicorn "
        "| server CPU µs/req | p50 ms | p99 ms | x uvicorn | peak RSS MiB | x uvicorn "
        "| server CPU | client CPU | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in configs:
        ref = reference(config, configs)
        rps, eff, p99 = (
            config.median("rps"),
            config.median("per_cpu_second"),
            config.median("p99_ms"),
        )
        rss = config.median("peak_rss")
        capped = " (request cap hit)" if any(r.capped for r in config.runs) else ""
        lines.append(
            f"| {config.name}{capped} | {rps:,.0f} | {rps / ref.median('rps'):.0%} "
            f"| {eff:,.0f} | {eff / ref.median('per_cpu_second'):.0%} "
            f"| {config.us_per_request:.0f} | {config.median('p50_ms'):.2f} | {p99:.2f} "
            f"| {p99 / ref.median('p99_ms'):.2f} | {rss / 2**20:.0f} "
            f"| {rss / ref.median('peak_rss'):.2f} "
            f"| {config.median('server_cpu'):.0%} | {config.median('client_cpu'):.0%} "
            f"| {sum(r.errors for r in config.runs)} |"
        )
    return lines


def _header(configs: list[Config], title: str, settings: Settings) -> list[str]:
    rounds = max(len(c.runs) for c in configs)
    load = os.getloadavg()
    return [
        f"# {title} {datetime.now(UTC):%Y-%m-%d %H:%M UTC}: GET /api/hello",
        "",
        f"Server side pinned to CPU {settings.server_cpu}, the load generator (1 thread) to "
        f"CPU {settings.client_cpu}; {settings.connections} requests in flight (wrk: "
        f"{settings.connections} connections; h2load: "
        f"{max(1, settings.connections // settings.streams)} connections x {settings.streams} "
        f"streams); {settings.seconds} s per run after {settings.warmup_seconds} s warm-up; "
        f"median of {rounds} interleaved round(s). Ratios are to bare uvicorn measured by "
        f"the same client. Host: {os.cpu_count()} CPUs, load average {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f} (1/5/15 min) at the end.",
        "",
    ]


def _rounds(configs: list[Config]) -> str:
    return "Per round, req/s (req per server CPU-s): " + "; ".join(
        f"{c.name} [{c.client}]: "
        + ", ".join(f"{r.rps:,.0f} ({r.per_cpu_second:,.0f})" for r in c.runs)
        for c in configs
    )


SERVER_CPU_NOTE = (
    "- server CPU: share of one core the server's processes used during the run. A server "
    "that is the bottleneck uses ~100 %; less means other load on the host took the core "
    "(a shared machine), and req/s understates capacity. Requests per server CPU-second "
    "does not depend on that: compare configurations by it. Kernel network work done in "
    "softirq context is no process's and is not counted. Peak RSS: the sum of the server "
    "side's processes' high-water marks (VmHWM)."
)


def _by(configs: list[Config], client: str, role: str) -> list[Config]:
    return [c for c in configs if c.client == client and c.role == role]


def targets(configs: list[Config]) -> list[str]:
    """The issue's targets, each with the measured figures that decide it."""
    lines = []
    for client in CLIENTS:
        ours = _by(configs, client, "ours")
        if not ours:
            continue
        mine = ours[0]
        eff, p99 = mine.median("per_cpu_second"), mine.median("p99_ms")
        for peer in _by(configs, client, "peer"):
            p_eff, p_p99 = peer.median("per_cpu_second"), peer.median("p99_ms")
            lines.append(
                f"- [{client}] ours vs {peer.name.removeprefix('peer: ')}: per server "
                f"CPU-second {eff:,.0f} vs {p_eff:,.0f} (**{eff / p_eff:.2f} x**, "
                f"{'ahead' if eff > p_eff else 'BEHIND'}), p99 {p99:.2f} vs {p_p99:.2f} ms "
                f"({'no worse' if p99 <= p_p99 else 'WORSE'})"
            )
        off = _by(configs, client, "ours-off")
        if off:
            lines.append(
                f"- [{client}] access logs + HTTP metrics cost "
                f"{mine.us_per_request - off[0].us_per_request:+.0f} µs of server CPU per "
                f"request ({off[0].us_per_request:.0f} -> {mine.us_per_request:.0f})"
            )
        otlp = _by(configs, client, "ours-otlp")
        if otlp:
            lines.append(
                f"- [{client}] OTLP span export (OTEL_EXPORTER_OTLP_ENDPOINT set vs unset) "
                f"costs {otlp[0].us_per_request - mine.us_per_request:+.0f} µs of server CPU "
                f"per request ({mine.us_per_request:.0f} -> {otlp[0].us_per_request:.0f}), "
                f"req/s x{otlp[0].median('rps') / mine.median('rps'):.2f}, p99 "
                f"{mine.median('p99_ms'):.2f} -> {otlp[0].median('p99_ms'):.2f} ms"
            )
        bridge, on_host = _by(configs, client, "compose"), _by(configs, client, "compose-host")
        if bridge and on_host:
            lines.append(
                f"- [{client}] Docker's bridge networks and published port: "
                f"{bridge[0].us_per_request - on_host[0].us_per_request:+.0f} µs of server CPU "
                f"per request, req/s x{bridge[0].median('rps') / on_host[0].median('rps'):.2f}, "
                f"p99 {on_host[0].median('p99_ms'):.2f} -> {bridge[0].median('p99_ms'):.2f} ms"
            )
    for mine in _by(configs, WRK, "ours"):
        ref = reference(mine, configs)
        share = mine.median("per_cpu_second") / ref.median("per_cpu_second")
        p99x = mine.median("p99_ms") / ref.median("p99_ms")
        lines.append(
            f"- full path vs bare uvicorn over TCP (wrk): **{share:.0%}** per server CPU-second "
            f"(target ≥ 60 %), req/s {mine.median('rps') / ref.median('rps'):.0%}, "
            f"p99 **{p99x:.2f} x** (target ≤ 2 x)"
        )
        parts = part_us(mine)
        if "nginx" in parts:
            edge, app, bare = (
                parts["nginx"],
                mine.us_per_request - parts["nginx"],
                ref.us_per_request,
            )
            lines.append(
                f"- where the full path's {mine.us_per_request:.0f} µs per request go (wrk): "
                f"nginx (TLS, proxy, access log) {edge:.0f} µs, the app side (gunicorn + "
                f"serving layer + app) {app:.0f} µs vs bare uvicorn's {bare:.0f} µs. With "
                f"an app side as cheap as bare uvicorn, this nginx alone would allow "
                f"{bare / (bare + edge):.0%}; 60 % leaves the app side "
                f"{bare / 0.6 - edge - bare:+.0f} µs over bare uvicorn (it takes {app - bare:+.0f})"
            )
    return lines


def part_us(config: Config) -> dict[str, float]:
    """Server CPU per request of each part (nginx, gunicorn, ...), µs, median of rounds."""
    return {
        name: statistics.median(r.parts_cpu[name] / r.rps * 1e6 for r in config.runs if r.rps)
        for name in config.runs[0].parts_cpu
    }


def per_part(configs: list[Config]) -> list[str]:
    lines = []
    for config in configs:
        if len(config.runs[0].parts_cpu) < 2:
            continue
        us = part_us(config)
        lines.append(
            f"- {config.name} [{config.client}]: server CPU per request "
            + " + ".join(f"{name} {value:.0f} µs" for name, value in us.items())
        )
    return lines


def render(configs: list[Config], notes: list[str], profile: str, settings: Settings) -> str:
    lines = _header(configs, "Benchmark", settings)
    for client, title in CLIENTS.items():
        rows = [c for c in configs if c.client == client]
        if rows:
            lines += [f"## {title}", "", *_table(rows), ""]
    lines += ["## Targets", "", *targets(configs), ""]
    lines += ["## Notes", "", *[f"- {note}" for note in notes], SERVER_CPU_NOTE]
    lines += [*per_part(configs), "", _rounds(configs)]
    if profile:
        lines += ["", profile]
    return "\n".join(lines) + "\n"


def render_trees(configs: list[Config], notes: list[str], settings: Settings) -> str:
    lines = [*_header(configs, "Benchmark by commit", settings), *_table(configs), ""]
    for headers in ((), (REQUEST_ID,)):
        trees = [c for c in configs if c.role == "tree" and c.headers == headers]
        for before, after in itertools.pairwise(trees):
            ref = reference(after, configs)
            c_eff = ref.median("per_cpu_second")
            gain = (after.median("per_cpu_second") - before.median("per_cpu_second")) / c_eff
            lines.append(
                f"- {before.name} -> {after.name}: {gain:+.0%} of the ceiling per CPU-second, "
                f"{after.us_per_request - before.us_per_request:+.0f} µs of server CPU "
                f"per request ({before.us_per_request:.0f} -> {after.us_per_request:.0f}; "
                f"ceiling {ref.us_per_request:.0f})"
            )
    lines += ["", _rounds(configs), "", *[f"- {note}" for note in notes], SERVER_CPU_NOTE]
    return "\n".join(lines) + "\n"
