"""`.env.example` documents every setting without being a second home for any of them.

- Every line is a comment: `cp .env.example .env` changes nothing, which `docker compose
  config` (every profile) and the load test's loaded SLO prove by comparison.
- The default it shows is the one the component really has (server/settings.py, the nginx
  entrypoint), so the documentation cannot drift from the code.
- Every variable compose or a component reads is documented there.
- Each compose service is handed only variables its component reads (no `env_file`).
Needs the `docker compose` CLI (scripts/ensure-compose.sh), not the Docker daemon.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from acme.settings import DEFAULTS as ACME_DEFAULTS
from loadtests.settings import load_settings as load_loadtest_settings
from loadtests.settings import read_dotenv
from server.settings import OTEL_SDK_VARIABLES, Settings
from tests.scripts import load_script
from tests.static.compose import compose_config as config_of

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / ".env.example"
COMPOSE_FILE = ROOT / "docker-compose.yml"
ALERTMANAGER_ENTRYPOINT = ROOT / "monitoring" / "alertmanager" / "entrypoint.sh"
ENTRYPOINT = ROOT / "nginx" / "docker-entrypoint.sh"
PROFILES = ("monitoring", "loadtest", "acme")
DOCUMENTED = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")


def documented() -> dict[str, str]:
    """NAME -> the default shown in `# NAME=value` lines."""
    found = {}
    for line in EXAMPLE.read_text().splitlines():
        if match := DOCUMENTED.match(line):
            found[match[1]] = match[2]
    return found


def compose_spec() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text()))


def entrypoint_defaults() -> dict[str, str]:
    """The nginx entrypoint's `NAME=${NAME:-default}` (or `${NAME-default}`) lines."""
    pattern = re.compile(r"^([A-Z][A-Z0-9_]*)=\$\{\1:?-(.*)\}$", re.MULTILINE)
    return dict(pattern.findall(ENTRYPOINT.read_text()))


def loadtest_variables() -> set[str]:
    names: set[str] = set()
    for path in (ROOT / "loadtests").glob("*.py"):
        names |= set(
            re.findall(r'"((?:LOADTEST|PROMETHEUS|METRICS)_[A-Z0-9_]+)"', path.read_text())
        )
    return names


def service_environment(service: dict[str, Any]) -> dict[str, str | None]:
    env = service.get("environment") or {}
    if isinstance(env, dict):
        return {k: (None if v is None else str(v)) for k, v in env.items()}
    return {item.split("=", 1)[0]: (item.split("=", 1)[1] if "=" in item else None) for item in env}


# ── the file itself ─────────────────────────────────────────────────────────


def test_every_line_is_a_comment() -> None:
    settings = [
        line
        for line in EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert settings == [], "a value in .env.example overrides the component's default"


def test_shown_defaults_are_the_app_servers() -> None:
    shown = documented()
    for field in Settings.model_fields.values():
        name = str(field.alias)
        default = "" if field.default is None else str(field.default)
        if isinstance(field.default, bool):
            default = default.lower()  # as one writes it in a .env file
        assert shown[name] == default, (
            f"{name}: .env.example shows {shown[name]!r}, default {default!r}"
        )


def test_shown_defaults_are_the_nginx_entrypoints() -> None:
    shown = documented()
    for name, default in entrypoint_defaults().items():
        if name in ("APP_UPSTREAM",):  # compose's own contract, not a user setting
            continue
        # Derived in compose (HTTPS_REDIRECT_PORT, RATE_LIMIT_ALLOWLIST): shown empty.
        derived = any(
            item.startswith(f"{name}=")
            for item in compose_spec()["services"]["nginx"].get("environment", [])
        )
        assert name in shown, f"{name} (nginx/docker-entrypoint.sh) is not in .env.example"
        assert shown[name] == ("" if derived else default), name


def test_shown_defaults_are_the_deploy_scripts() -> None:
    deploy = load_script("deploy")
    shown = documented()
    for name, default in deploy.DEFAULTS.items():
        assert shown.get(name) == str(default), f"{name}: .env.example shows {shown.get(name)!r}"


def test_every_variable_compose_reads_is_documented() -> None:
    used = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", COMPOSE_FILE.read_text()))
    for service in compose_spec()["services"].values():
        used |= {k for k, v in service_environment(service).items() if v is None}
    missing = used - set(documented())
    assert not missing, f"not in .env.example: {sorted(missing)}"


def test_shown_defaults_are_the_acme_clients() -> None:
    shown = documented()
    for name, default in ACME_DEFAULTS.items():
        assert name in shown, f"{name} (acme/settings.py) is not in .env.example"
        assert shown[name] == default, (
            f"{name}: .env.example shows {shown[name]!r}, default {default!r}"
        )


# ── what each container receives ───────────────────────────────────────────


def test_no_service_gets_the_whole_env_file() -> None:
    spec = compose_spec()
    for name, service in spec["services"].items():
        assert "env_file" not in service, f"{name} reads .env whole (secrets included)"
    assert "env_file" not in spec.get("x-hardening", {})


def test_each_service_gets_only_what_it_reads() -> None:
    readers = {
        "app": {str(field.alias) for field in Settings.model_fields.values()}
        | set(OTEL_SDK_VARIABLES),
        "nginx": set(entrypoint_defaults()),
        "locust-master": loadtest_variables(),
        "alertmanager": set(
            re.findall(r"\$\{(ALERTMANAGER_\w+)", ALERTMANAGER_ENTRYPOINT.read_text())
        ),
        "acme": set(ACME_DEFAULTS),
    }
    services = compose_spec()["services"]
    for name, reads in readers.items():
        given = set(service_environment(services[name]))
        assert given <= reads, f"{name} is handed variables it never reads: {given - reads}"
    for name, service in services.items():
        if name not in readers and name != "grafana":  # grafana: its own GF_* settings
            assert not service_environment(service), f"{name} reads no settings"


# ── copying it changes nothing ──────────────────────────────────────────────


def compose_config(env_file: Path) -> dict[str, Any]:
    profiles = [arg for p in PROFILES for arg in ("--profile", p)]
    return config_of("-f", str(COMPOSE_FILE), "--env-file", str(env_file), *profiles)


def test_copying_it_to_dotenv_changes_no_compose_config(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    copied = tmp_path / ".env"
    shutil.copy(EXAMPLE, copied)
    assert compose_config(copied) == compose_config(empty)


def test_copying_it_to_dotenv_changes_no_slo(tmp_path: Path) -> None:
    copied = tmp_path / ".env"
    shutil.copy(EXAMPLE, copied)
    baseline = load_loadtest_settings(env={})
    with_copy = load_loadtest_settings(env=read_dotenv(copied))
    assert with_copy.thresholds == baseline.thresholds
    assert with_copy.run == baseline.run


def test_an_edit_to_slo_toml_takes_effect_with_the_copy(tmp_path: Path) -> None:
    # The reproduction: min_rps = 99 in slo.toml, .env copied from .env.example.
    slo = tmp_path / "slo.toml"
    text = (ROOT / "loadtests" / "slo.toml").read_text()
    slo.write_text(re.sub(r"(?m)^min_rps = [0-9.]+", "min_rps = 99.0", text))
    copied = tmp_path / ".env"
    shutil.copy(EXAMPLE, copied)
    loaded = load_loadtest_settings(env=read_dotenv(copied), slo_file=slo)
    assert loaded.thresholds.min_rps == 99.0
