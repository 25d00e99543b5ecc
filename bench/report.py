"""The report: the side-by-side table (medians of interleaved rounds, ratios to the
ceiling), the per-round figures and the notes, as markdown."""

from __future__ import annotations

import itertools
import os
import statistics
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from bench.configs import REQUEST_ID

if TYPE_CHECKING:
    from bench.configs import Config
    from bench.settings import Settings


def _ceiling_for(config: Config, configs: list[Config]) -> Config:
    ceilings = [c for c in configs if c.role == "ceiling"]
    same = [c for c in ceilings if c.headers == config.headers]
    return (same or ceilings)[0]


def _table(configs: list[Config]) -> list[str]:
    lines = [
        "| configuration | req/s | ÷ ceiling | req per server CPU-s | ÷ ceiling "
        "| server CPU µs/req | p50 ms | x ceiling | p99 ms | x ceiling | peak RSS MiB "
        "| server CPU | client CPU | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
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
            f"| {config.median('peak_rss') / 2**20:.0f} "
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
        f"Server side pinned to CPU {settings.server_cpu}, wrk (1 thread, "
        f"{settings.connections} keep-alive connections) to CPU {settings.client_cpu}; "
        f"{settings.seconds} s per run after {settings.warmup_seconds} s warm-up; "
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
    "does not depend on that: compare configurations by it when server CPU is low. Peak "
    "RSS: the sum of the server side's processes' high-water marks (VmHWM)."
)


def render_trees(configs: list[Config], notes: list[str], settings: Settings) -> str:
    lines = [*_header(configs, "Benchmark by commit", settings), *_table(configs), ""]
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


def render(configs: list[Config], notes: list[str], profile: str, settings: Settings) -> str:
    by_role = {c.role: c for c in configs}
    ceiling = by_role["ceiling"]
    c_rps, c_p99 = ceiling.median("rps"), ceiling.median("p99_ms")
    c_eff = ceiling.median("per_cpu_second")
    full, gunicorn, no_log = by_role["nginx"], by_role["gunicorn"], by_role["no-log"]
    lines = [*_header(configs, "Benchmark", settings), *_table(configs)]
    lines += [
        "",
        "Targets: full stack ≥ 60 % of the ceiling's req/s, p99 ≤ 2 x the ceiling's. Measured "
        "(nginx TLS -> gunicorn over TCP, as in compose): "
        f"req/s **{full.median('rps') / c_rps:.0%}** (per server CPU-second "
        f"**{full.median('per_cpu_second') / c_eff:.0%}**), p99 "
        f"**{full.median('p99_ms') / c_p99:.2f} x**. Access line (gunicorn with vs without): "
        f"**{1 - gunicorn.median('per_cpu_second') / no_log.median('per_cpu_second'):.0%}** "
        "of the CPU-normalised throughput.",
    ]
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
