"""`python -m loadtests`: preflight, a bounded headless Locust run, the gate, the cross-check.

    preflight (one verified HTTPS request, seconds)     -> exit 2 with what to fix
    app request counter, before                           (loadtests.crosscheck)
    locust --headless --processes N, --run-time, request cap, hard wall-clock timeout
    app request counter, after; compare with Locust's count of /api/ requests
    summary.json + table; exit 1 naming every missed threshold

Reports land in loadtests/reports/<UTC timestamp>/ (git-ignored): report.html, locust_*.csv,
locust.json (raw per-request stats), summary.json (what the gate decided), locust.log.
`--master` runs Locust as a distributed master waiting for external workers (the compose
`loadtest` profile); the default forks one worker per usable CPU on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from loadtests import crosscheck as xc
from loadtests.gate import (
    Check,
    CrossCheck,
    Summary,
    app_route,
    evaluate,
    is_app_routed,
    load_failures,
    load_locust_json,
    render_table,
    summarize,
)
from loadtests.preflight import PreflightError, check_target, copy_ca_from_compose, target_guard
from loadtests.settings import Settings, SettingsError, load_settings

__all__ = ["locust_command", "main"]

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
STOP_TIMEOUT_S = 10  # users finish the request in flight, so both sides count it
DEFAULT_NGINX_CERT_PATH = "/etc/nginx/certs/fullchain.pem"  # nginx entrypoint's TLS_CERT

EXIT_OK, EXIT_GATE, EXIT_SETUP, EXIT_LOCUST = 0, 1, 2, 3


def _say(message: str) -> None:
    print(f"loadtest: {message}", flush=True)


def locust_command(
    settings: Settings, *, report_dir: Path, master: bool = False, expect_workers: int = 1
) -> list[str]:
    """The Locust argv for one bounded, headless run writing its reports into report_dir."""
    run = settings.run
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--host",
        run.host,
        "--users",
        str(run.users),
        "--spawn-rate",
        f"{run.spawn_rate:g}",
        "--run-time",
        f"{run.duration_s}s",
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--only-summary",
        "--csv",
        str(report_dir / "locust"),
        "--html",
        str(report_dir / "report.html"),
        "--json-file",
        str(report_dir / "locust"),
        "--exit-code-on-error",
        "0",  # the gate decides, from the numbers
        # locustfile options (sent on to the workers by the master)
        "--max-requests",
        str(run.max_requests),
        "--time-limit",
        str(run.duration_s),
        "--wait-min",
        f"{run.wait_min:g}",
        "--wait-max",
        f"{run.wait_max:g}",
        "--slow-seconds",
        f"{run.slow_seconds:g}",
    ]
    if run.ca_file is not None:
        cmd += ["--ca-file", str(run.ca_file)]
    if run.server_name:
        cmd += ["--server-name", run.server_name]
    if master:
        cmd += [
            "--master",
            "--expect-workers",
            str(expect_workers),
            "--expect-workers-max-wait",
            "60",
        ]
    else:
        # The forked workers reach their master over loopback on a free port: the default
        # (every interface, 5557) collides with any other run on the host and needlessly
        # listens beyond it.
        port = _free_port()
        cmd += ["--processes", str(run.processes), "--master-bind-host", "127.0.0.1"]
        cmd += ["--master-bind-port", str(port), "--master-host", "127.0.0.1"]
        cmd += ["--master-port", str(port)]
    return cmd


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_bounded(cmd: list[str], log_path: Path, timeout_s: int) -> int | None:
    """Run Locust in its own process group; past timeout_s stop the whole group.

    Returns the exit code, or None when it had to be stopped.
    """
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _say(f"locust still running after the hard timeout of {timeout_s}s: stopping it")
        except KeyboardInterrupt:
            _say("interrupted: stopping locust")
        for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)  # our own session: Locust master and its forked workers
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _resolve_ca(settings: Settings, report_dir: Path) -> Settings:
    """No LOADTEST_CA_FILE: copy the certificate out of the compose project's nginx."""
    run = settings.run
    if run.ca_file is not None or not run.host.startswith("https://"):
        return settings
    project = settings.crosscheck.compose_project
    if project is None:
        raise PreflightError(
            "LOADTEST_CA_FILE is not set: point it at the stack's certificate, or set "
            "LOADTEST_COMPOSE_PROJECT to copy it out of that project's nginx container"
        )
    cert_path = os.environ.get("LOADTEST_NGINX_CERT_PATH") or DEFAULT_NGINX_CERT_PATH
    ca = copy_ca_from_compose(project, cert_path, report_dir / "ca.pem")
    _say(f"trusting the certificate of {project}/nginx ({cert_path}) copied to {ca}")
    return replace(settings, run=replace(run, ca_file=ca))


@dataclass
class _CounterProbe:
    """The app's request counter read before the run, and compared after it."""

    source: xc.CounterSource | None = None
    reason: str = ""
    before: xc.CounterReading | None = None

    @classmethod
    def start(cls, settings: Settings) -> _CounterProbe:
        if settings.crosscheck.source == "off":
            return cls(reason="disabled (LOADTEST_CROSSCHECK=off)")
        source, reason = xc.choose_source(settings.crosscheck)
        if source is None:
            return cls(reason=reason)
        try:
            return cls(source, "", source.read(not_before=time.time()))
        except xc.CrossCheckUnavailable as exc:
            return cls(reason=str(exc))

    def finish(
        self, summary: Summary, settings: Settings, finished_at: float
    ) -> tuple[CrossCheck, dict[str, Any]]:
        locust_count = summary.app_routed_requests
        tolerance = settings.crosscheck.tolerance(locust_count)
        if self.source is None or self.before is None:
            return CrossCheck("none", locust_count, None, tolerance, self.reason), {}
        try:
            after = self.source.read(not_before=finished_at)
        except xc.CrossCheckUnavailable as exc:
            detail = f"after the run: {exc}"
            return CrossCheck(self.source.name, locust_count, None, tolerance, detail), {}
        locust_by_route: dict[str, int] = {}
        for route in summary.routes:
            if is_app_routed(route.name, summary.app_prefixes):
                key = app_route(route.name)
                locust_by_route[key] = locust_by_route.get(key, 0) + route.requests
        by_route = {
            "app_by_route": xc.route_deltas(self.before, after),
            "locust_by_route": locust_by_route,
        }
        app_count = round(after.total - self.before.total)
        return CrossCheck(self.source.name, locust_count, app_count, tolerance), by_route


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--master",
        action="store_true",
        help="run as a distributed master and wait for external workers",
    )
    parser.add_argument(
        "--expect-workers",
        type=int,
        default=None,
        help="workers to wait for with --master (default LOADTEST_EXPECT_WORKERS, 1)",
    )
    parser.add_argument(
        "--web-ui",
        action="store_true",
        default=None,
        help="after the preflight, serve Locust's web UI on :8089 instead of a headless run; "
        "each test started there still stops at LOADTEST_DURATION / LOADTEST_MAX_REQUESTS "
        "(LOADTEST_WEB_UI=1)",
    )
    parser.add_argument(
        "--print-command", action="store_true", help="print the Locust command line and exit"
    )
    return parser.parse_args(argv)


def web_ui_command(headless: list[str], web_host: str = "127.0.0.1") -> list[str]:
    """The headless command turned into a web UI master: no --headless, --run-time or reports.

    Each test started from the UI is bounded by the locustfile's guard (--time-limit,
    --max-requests). The UI listens on LOADTEST_WEB_HOST: loopback by default; 0.0.0.0 in
    the container, whose port compose publishes on the host's 127.0.0.1 only.
    """
    drop_flag = {"--headless", "--only-summary"}
    drop_value = {"--run-time", "--csv", "--html", "--json-file"}
    cmd: list[str] = []
    skip = False
    for arg in headless:
        if skip:
            skip = False
        elif arg in drop_value:
            skip = True
        elif arg not in drop_flag:
            cmd.append(arg)
    return [*cmd, "--web-host", web_host, "--web-port", "8089"]


def _preflight(settings: Settings, report_dir: Path) -> Settings:
    """Guard, certificate, and one request to the app and one to nginx's static files."""
    target_guard(settings.run.host, settings.run.allow_remote)
    settings = _resolve_ca(settings, report_dir)
    run = settings.run
    result = check_target(run.host, run.ca_file, server_name=run.server_name)
    check_target(run.host, run.ca_file, path="/", server_name=run.server_name)
    _say(
        f"preflight ok: {run.host} answered {result.status} over {result.tls_version} "
        f"in {result.elapsed_ms:.0f} ms (CA {run.ca_file})"
    )
    return settings


def _write_summary(
    path: Path,
    *,
    settings: Settings,
    summary: Summary,
    checks: list[Check],
    cross: tuple[CrossCheck, dict[str, Any]],
    processes: int | None,
) -> None:
    run = settings.run
    document = {
        "host": run.host,
        "settings": {
            "users": run.users,
            "spawn_rate": run.spawn_rate,
            "duration_s": run.duration_s,
            "max_requests": run.max_requests,
            "processes": processes,
            "slo_file": str(settings.slo_file),
        },
        "summary": summary.to_dict(),
        "checks": [{**asdict(c), "description": c.describe()} for c in checks],
        "crosscheck": {**cross[0].to_dict(), **cross[1]},
        "passed": all(c.passed for c in checks),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        _say(f"invalid setting: {exc}")
        return EXIT_SETUP
    # Flags win over the settings for this run.
    settings = replace(
        settings,
        run=replace(
            settings.run,
            expect_workers=args.expect_workers or settings.run.expect_workers,
            web_ui=bool(args.web_ui or settings.run.web_ui),
        ),
    )
    report_dir = settings.run.report_root / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    command = partial(
        locust_command,
        report_dir=report_dir,
        master=args.master,
        expect_workers=settings.run.expect_workers,
    )
    if args.print_command:
        print(" ".join(command(settings)))
        return EXIT_OK

    # 1. preflight: fail in seconds, not after a minute of errors
    report_dir.mkdir(parents=True, exist_ok=True)
    try:
        settings = _preflight(settings, report_dir)
    except PreflightError as exc:
        _say(f"preflight failed: {exc}")
        return EXIT_SETUP
    run = settings.run
    if run.web_ui:
        web_host = run.web_host
        cmd = web_ui_command(command(settings), web_host)
        _say(
            f"web UI on {web_host}:8089; every test stops after LOADTEST_DURATION and "
            "LOADTEST_MAX_REQUESTS"
        )
        os.execv(cmd[0], cmd)  # noqa: S606 - Locust takes over this process (signals, exit code)

    # 2. the app's counter before the run
    probe = _CounterProbe.start(settings)
    if probe.source is None:
        _say(f"cross-check unavailable: {probe.reason}")
    else:
        _say(f"cross-check reads the app's http_requests_total via {probe.source.name}")

    # 3. the bounded Locust run
    workers = f"{run.processes} worker process(es)"
    if args.master:
        workers = f"{run.expect_workers} external worker(s)"
    _say(
        f"running {run.users} users (spawn {run.spawn_rate:g}/s) for {run.duration_s}s, "
        f"at most {run.max_requests} requests, {workers}; hard timeout {run.hard_timeout_s}s"
    )
    log_path = report_dir / "locust.log"
    code = _run_bounded(command(settings), log_path, run.hard_timeout_s)
    finished_at = time.time()
    json_path = report_dir / "locust.json"
    if code is None or not json_path.exists():
        _say(f"locust did not finish cleanly (exit {code}); end of {log_path}:")
        print(_tail(log_path), flush=True)
        return EXIT_LOCUST

    # 4. summary, thresholds, cross-check
    summary = summarize(
        load_locust_json(json_path),
        settings.thresholds.latency_excludes,
        load_failures(report_dir / "locust_failures.csv"),
        settings.crosscheck.app_prefixes,
    )
    checks = evaluate(summary, settings.thresholds)
    cross = probe.finish(summary, settings, finished_at)
    if cross[0].app_count is not None or settings.crosscheck.required:
        checks.append(cross[0].as_check())
    processes = None if args.master else run.processes
    _write_summary(
        report_dir / "summary.json",
        settings=settings,
        summary=summary,
        checks=checks,
        cross=cross,
        processes=processes,
    )
    print(render_table(summary, checks, cross[0]), flush=True)
    _say(f"reports in {report_dir}/ (report.html, summary.json, locust_*.csv, locust.log)")
    missed = [c for c in checks if not c.passed]
    for check in missed:
        _say(check.describe())
    if any("got 429" in f.error for f in summary.failures):
        _say(
            "nginx answered 429: the load generator is rate limited. Add the address nginx "
            "sees for it to RATE_LIMIT_ALLOWLIST (a host run through the published port shows "
            "up as the gateway of the compose `edge` network; see loadtests/README.md)"
        )
    return EXIT_GATE if missed else EXIT_OK
