"""Load test thresholds and run parameters: slo.toml defaults, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.run import locust_command, web_ui_command
from loadtests.settings import (
    DEFAULT_SLO_FILE,
    SettingsError,
    load_settings,
    parse_duration,
    read_dotenv,
    usable_cpus,
)


def test_the_shipped_slo_file_loads_with_sane_defaults() -> None:
    settings = load_settings(env={})
    t, run, cross = settings.thresholds, settings.run, settings.crosscheck
    assert settings.slo_file == DEFAULT_SLO_FILE
    assert t.min_rps > 0
    assert 0 < t.max_p95_ms <= t.max_p99_ms
    assert 0 <= t.max_error_ratio < 1
    assert "/api/slow" in t.latency_excludes
    assert t.routes["/api/slow"].max_p99_ms is not None
    assert run.host == "https://localhost:443"
    assert run.ca_file is None
    assert run.processes == usable_cpus()
    assert 1 <= run.duration_s <= 120
    assert run.max_requests >= 1
    assert run.hard_timeout_s > run.duration_s
    assert cross.source == "auto"
    assert cross.compose_project == "asgi-stack"  # docker-compose.yml's `name:`
    assert cross.app_prefixes == ("/api/",)


def test_environment_overrides_each_key() -> None:
    env = {
        "LOADTEST_MIN_RPS": "123.5",
        "LOADTEST_MAX_P95_MS": "7",
        "LOADTEST_MAX_P99_MS": "9",
        "LOADTEST_MAX_ERROR_RATIO": "0",
        "LOADTEST_USERS": "3",
        "LOADTEST_SPAWN_RATE": "1.5",
        "LOADTEST_DURATION": "1m30s",
        "LOADTEST_MAX_REQUESTS": "500",
        "LOADTEST_PROCESSES": "1",
        "LOADTEST_WAIT_MIN": "0",
        "LOADTEST_WAIT_MAX": "0",
        "LOADTEST_CA_FILE": "/tmp/ca.pem",
        "HTTPS_PORT": "8443",
        "LOADTEST_CROSSCHECK": "prometheus",
        "LOADTEST_CROSSCHECK_TOLERANCE": "0.1",
        "PROMETHEUS_URL": "http://127.0.0.1:9090/",
        "LOADTEST_APP_PREFIXES": "/",
    }
    s = load_settings(env=env)
    assert (s.thresholds.min_rps, s.thresholds.max_p95_ms, s.thresholds.max_p99_ms) == (
        123.5,
        7,
        9,
    )
    assert s.thresholds.max_error_ratio == 0
    assert (s.run.users, s.run.spawn_rate, s.run.duration_s) == (3, 1.5, 90)
    assert (s.run.max_requests, s.run.processes) == (500, 1)
    assert s.run.ca_file == Path("/tmp/ca.pem")
    assert s.run.host == "https://localhost:8443"
    assert s.crosscheck.source == "prometheus"
    assert s.crosscheck.prometheus_url == "http://127.0.0.1:9090"
    assert s.crosscheck.tolerance(1000) == 100
    assert s.crosscheck.tolerance(10) == 3  # the absolute floor
    assert s.crosscheck.app_prefixes == ("/",)


def test_loadtest_host_wins_over_https_port() -> None:
    s = load_settings(env={"HTTPS_PORT": "8443", "LOADTEST_HOST": "https://127.0.0.1:9443/"})
    assert s.run.host == "https://127.0.0.1:9443"


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("LOADTEST_MIN_RPS", "fast", "expected a number"),
        ("LOADTEST_MAX_P99_MS", "-1", "expected a number"),
        ("LOADTEST_MAX_ERROR_RATIO", "2", "[0, 1]"),
        ("LOADTEST_USERS", "0", "integer"),
        ("LOADTEST_DURATION", "soon", "duration"),
        ("LOADTEST_PROCESSES", "many", "integer"),
        ("LOADTEST_HOST", "localhost:443", "base URL"),
        ("LOADTEST_HOST", "https://localhost/api", "no path"),
        ("LOADTEST_CROSSCHECK", "maybe", "auto, metrics-url, prometheus, docker, off"),
        ("LOADTEST_CROSSCHECK_REQUIRED", "perhaps", "true"),
        ("METRICS_URL", "127.0.0.1:9000", "http"),
        ("LOADTEST_APP_PREFIXES", "api", "prefixes"),
    ],
)
def test_an_invalid_value_names_the_variable(var: str, value: str, says: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        load_settings(env={var: value})
    assert var in str(excinfo.value)
    assert says in str(excinfo.value)


def test_wait_bounds_must_be_ordered() -> None:
    with pytest.raises(SettingsError, match="LOADTEST_WAIT_MAX"):
        load_settings(env={"LOADTEST_WAIT_MIN": "2", "LOADTEST_WAIT_MAX": "1"})


def test_bad_slo_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        load_settings(env={"LOADTEST_SLO_FILE": str(tmp_path / "nope.toml")})
    broken = tmp_path / "broken.toml"
    broken.write_text("[thresholds\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(env={}, slo_file=broken)
    missing = tmp_path / "missing.toml"
    missing.write_text(DEFAULT_SLO_FILE.read_text().replace("min_rps = ", "# min_rps = "))
    with pytest.raises(SettingsError, match="min_rps is missing"):
        load_settings(env={}, slo_file=missing)
    typo = tmp_path / "typo.toml"
    typo.write_text(DEFAULT_SLO_FILE.read_text() + '\n[thresholds.routes."/x"]\nmax_p999_ms = 1\n')
    with pytest.raises(SettingsError, match="unknown keys"):
        load_settings(env={}, slo_file=typo)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2m", 120), ("1m30s", 90), ("1h", 3600), ("45", 45), (20, 20)],
)
def test_durations(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1d", "-5s", "5 minutes", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_the_locust_command_is_bounded_and_writes_every_report(tmp_path: Path) -> None:
    env = {"LOADTEST_DURATION": "12s", "LOADTEST_MAX_REQUESTS": "999", "LOADTEST_PROCESSES": "2"}
    cmd = locust_command(load_settings(env=env), report_dir=tmp_path)
    joined = " ".join(cmd)
    for part in (
        "--headless",
        "--run-time 12s",
        "--max-requests 999",
        "--time-limit 12",
        "--processes 2",
        f"--html {tmp_path}/report.html",
        f"--csv {tmp_path}/locust",
        f"--json-file {tmp_path}/locust",
        "--stop-timeout",
    ):
        assert part in joined
    master = locust_command(
        load_settings(env=env), report_dir=tmp_path, master=True, expect_workers=3
    )
    assert "--processes" not in master
    assert "--expect-workers 3" in " ".join(master)


def test_dotenv_supplies_the_published_port_and_loadtest_settings(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# comment\nHTTPS_PORT=8443\nexport LOADTEST_USERS='7'\nSECRET=x\n"
        'COMPOSE_PROJECT_NAME="mystack"\nbroken line\n'
    )
    assert read_dotenv(dotenv) == {
        "HTTPS_PORT": "8443",
        "LOADTEST_USERS": "7",
        "COMPOSE_PROJECT_NAME": "mystack",
    }
    assert read_dotenv(tmp_path / "absent") == {}


def test_the_web_ui_command_keeps_the_bounds_and_drops_the_headless_parts(tmp_path: Path) -> None:
    headless = locust_command(load_settings(env={"LOADTEST_DURATION": "45s"}), report_dir=tmp_path)
    ui = web_ui_command(headless)
    joined = " ".join(ui)
    for gone in ("--headless", "--run-time", "--csv", "--html", "--json-file", "--only-summary"):
        assert gone not in ui
    assert "--time-limit 45" in joined  # the locustfile's guard stops each test
    assert "--max-requests" in joined
    assert ui[-4:] == ["--web-host", "127.0.0.1", "--web-port", "8089"]
