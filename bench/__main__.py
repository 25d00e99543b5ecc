"""`python -m bench` (make bench): our stack, its layers and the alternatives, side by side.

A benchmark, not a test: it prints numbers and writes them down, it does not pass or fail.
The server side is pinned to one core (BENCH_SERVER_CPU, default 0) and the load generator
to another (BENCH_CLIENT_CPU, default 1), so every configuration gets the same CPU budget
and the generator never competes with the server. All traffic is on loopback.

Each run is bounded: BENCH_SECONDS (10) after a BENCH_WARMUP_SECONDS (2) warm-up, a request
cap (BENCH_MAX_REQUESTS) and a hard timeout. Rounds are interleaved (BENCH_ROUNDS, 3) and
the median kept, because this machine is shared. Server and generator CPU use are reported
so a starved run shows. The table goes to stdout and bench/reports/bench-<UTC time>.md.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.configs import (
    NOTES,
    TREE_NOTES,
    WRK,
    Config,
    Setup,
    Started,
    setups,
    start_setup,
    tree_setups,
)
from bench.load import CAP_LUA, Run, h2load, wrk
from bench.plot import plot
from bench.processes import say
from bench.profile import ProfileError, profile_worker
from bench.report import render, render_trees
from bench.settings import Settings, SettingsError, load_settings
from bench.tools import DEBIAN, TOOLS_BIN, build_images, ensure_debian_packages, ensure_tools

REPORTS = Path(__file__).with_name("reports")


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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", action="store_true", help="also profile the gunicorn worker")
    parser.add_argument(
        "--profile-only", action="store_true", help="only the profile, no benchmark rounds"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="SETUP",
        help="only these setups (and bare uvicorn, the reference): raw, gunicorn, no-log, "
        "uvicorn-ssl, traefik, caddy, tiangolo, ours, ours-otlp, ours-off, compose, "
        "compose-host",
    )
    parser.add_argument(
        "--trees",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="instead: the ceiling vs `gunicorn + serving layer` of each checkout (e.g. git "
        "worktrees of older commits), without and with an X-Request-ID header",
    )
    return parser


def _measure(
    config: Config, started: Started, seconds: int, *, work: Path, lua: Path, settings: Settings
) -> Run:
    if config.client == WRK:
        driver = functools.partial(wrk, lua=lua)
    else:
        driver = functools.partial(h2load, log=work / "h2load.log")
    return driver(
        started.url, seconds, parts=started.parts, settings=settings, headers=config.headers
    )


def _rounds(
    setups: list[Setup], work: Path, lua: Path, settings: Settings, rounds: int
) -> list[str]:
    """Interleaved: each setup started for its turn in every round; each of its configs
    (one per client) measured after its own warm-up; then the setup is stopped. Returns
    the setups' summary lines (what the OTLP sink received), for the report's notes."""
    summaries = []
    for round_no in range(1, rounds + 1):
        for setup in setups:
            started = start_setup(setup, work)
            requests = 0
            try:
                for config in setup.configs:
                    say(f"round {round_no}/{rounds}: {config.name} [{config.client}]")
                    for seconds in (settings.warmup_seconds, settings.seconds):  # last counts
                        run = _measure(
                            config, started, seconds, work=work, lua=lua, settings=settings
                        )
                        requests += run.requests
                    config.runs.append(run)
            finally:
                if summary := started.stop():
                    summaries.append(
                        f"round {round_no}, {setup.name}: {summary} for the {requests:,} "
                        "requests the clients made (warm-ups included; + readiness probes)"
                    )
    return summaries


def _profile(work: Path, lua: Path, settings: Settings) -> str:
    gunicorn = next(s for s in setups(settings) if s.name == "gunicorn")
    started = start_setup(gunicorn, work)
    try:
        return profile_worker(started, lua, TOOLS_BIN / "py-spy", REPORTS, settings)
    finally:
        started.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as error:
        say(str(error))
        return 2
    if problem := _unusable(args):
        say(problem)
        return 2
    ensure_debian_packages(DEBIAN)
    ensure_tools()
    if args.trees:
        chosen = tree_setups([t.resolve() for t in args.trees], settings)
        notes = TREE_NOTES
    else:
        build_images(("app", "nginx"))
        chosen = setups(settings)
        notes = NOTES
    if args.only:
        chosen = [s for s in chosen if s.name in args.only or s.name == "ceiling"]
    REPORTS.mkdir(exist_ok=True)
    profile = ""
    # Metrics files, logs and certificates on tmpfs, like the containers' /tmp.
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx (uid 101 in its container) reads the certificate here
        lua = work / "cap.lua"
        lua.write_text(CAP_LUA)
        lua.chmod(0o644)
        try:
            if not args.profile_only:
                notes = notes + _rounds(chosen, work, lua, settings, settings.rounds)
            if args.profile or args.profile_only:
                profile = _profile(work, lua, settings)
        except ProfileError as error:
            say(f"profile: {error}")
            return 1
    if args.profile_only:
        print(profile)
        return 0
    configs = [c for s in chosen for c in s.configs]
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    if args.trees:
        report = render_trees(configs, notes, settings)
        path = REPORTS / f"bench-commits-{stamp}.md"
    else:
        report = render(configs, notes, profile, settings)
        path = REPORTS / f"bench-{stamp}.md"
        plot(configs, path.with_suffix(".png"))
    path.write_text(report)
    print(report)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
