"""`python -m bench` (make bench): what each layer of the stack costs, side by side.

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
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from bench.configs import Config, start_all, start_trees
from bench.load import CAP_LUA, wrk
from bench.processes import say
from bench.profile import ProfileError, profile_worker
from bench.report import render, render_trees
from bench.settings import Settings, SettingsError, load_settings
from bench.tools import DEBIAN, build_images, ensure_debian_packages, ensure_py_spy

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
        "--trees",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="instead: the ceiling vs `gunicorn + serving layer` of each checkout (e.g. git "
        "worktrees of older commits), without and with an X-Request-ID header",
    )
    return parser


def _rounds(configs: list[Config], lua: Path, settings: Settings, rounds: int) -> None:
    """Interleaved: every configuration once per round, each after its own warm-up."""
    for round_no in range(1, rounds + 1):
        for config in configs:
            say(f"round {round_no}/{rounds}: {config.name}")
            parts = config.parts()
            for seconds in (settings.warmup_seconds, settings.seconds):  # the last one counts
                run = wrk(
                    config.url,
                    seconds,
                    lua=lua,
                    parts=parts,
                    settings=settings,
                    headers=config.headers,
                )
            config.runs.append(run)


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
    py_spy = ensure_py_spy() if args.profile or args.profile_only else None
    if not args.trees:
        build_images(("nginx",))
    REPORTS.mkdir(exist_ok=True)
    rounds = 0 if args.profile_only else settings.rounds
    profile = ""
    # Metrics files, logs and sockets on tmpfs, like the containers' /tmp.
    with tempfile.TemporaryDirectory(prefix="bench-", dir="/dev/shm") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx (uid 101 in its container) reads the certificate here
        lua = work / "cap.lua"
        lua.write_text(CAP_LUA)
        lua.chmod(0o644)
        configs: list[Config] = []
        try:
            if args.trees:
                trees = [t.resolve() for t in args.trees]
                notes = start_trees(work, configs, trees, settings)
            else:
                notes = start_all(work, configs, settings)
            _rounds(configs, lua, settings, rounds)
            if py_spy is not None:
                gunicorn = next(c for c in configs if c.role == "gunicorn")
                profile = profile_worker(gunicorn, lua, py_spy, REPORTS, settings)
        except ProfileError as error:
            say(f"profile: {error}")
            return 1
        finally:
            for config in reversed(configs):
                config.server.stop()
    if args.profile_only:
        print(profile)
        return 0
    stamp = f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    if args.trees:
        report = render_trees(configs, notes, settings)
        path = REPORTS / f"bench-commits-{stamp}.md"
    else:
        report = render(configs, notes, profile, settings)
        path = REPORTS / f"bench-{stamp}.md"
    path.write_text(report)
    print(report)
    say(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
