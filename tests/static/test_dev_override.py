"""`make dev` is production's stack plus three development changes, and production never
gets them by accident.

- Compose loads compose.dev.yml only when named (`make dev`): `docker compose config` in
  the repository, which does load any `*.override.yml`, has no RELOAD and no source mount.
- With it, only the app's RELOAD/LOG_FORMAT and the read-only source mounts differ from
  production: same images, hardening (read_only, cap_drop, no-new-privileges), limits,
  networks, healthchecks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.static.compose import compose_config

ROOT = Path(__file__).resolve().parents[2]
DEV_FILE = "compose.dev.yml"
# Files compose reads without being told (https://docs.docker.com/compose/intro/compose-application-model/).
AUTOLOADED = (
    "compose.yaml",
    "compose.yml",
    "docker-compose.yaml",
    "docker-compose.yml",
    "compose.override.yaml",
    "compose.override.yml",
    "docker-compose.override.yaml",
    "docker-compose.override.yml",
)


def config(*files: str) -> dict[str, Any]:
    """The services of `docker compose [-f FILE...] config` in the repository."""
    return dict(compose_config(*[arg for f in files for arg in ("-f", f)])["services"])


def binds(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in service.get("volumes") or [] if v.get("type") == "bind"]


def test_the_dev_file_is_never_loaded_by_itself() -> None:
    assert DEV_FILE not in AUTOLOADED
    production = config()  # what `docker compose up` runs here
    assert "RELOAD" not in (production["app"].get("environment") or {})
    for name in ("app", "nginx"):
        sources = [Path(b["source"]) for b in binds(production[name])]
        assert not [s for s in sources if s.is_relative_to(ROOT)], f"{name} mounts {sources}"


def test_dev_is_production_plus_reload_and_mounted_source() -> None:
    production = config("docker-compose.yml")
    dev = config("docker-compose.yml", DEV_FILE)
    app, nginx = dev["app"], dev["nginx"]

    assert app["environment"]["RELOAD"] == "true"
    assert app["environment"]["LOG_FORMAT"] == "console"
    mounted = {b["target"]: (Path(b["source"]), b.get("read_only")) for b in binds(app)}
    assert mounted == {"/app/app": (ROOT / "app", True), "/app/server": (ROOT / "server", True)}
    static = {b["target"]: (Path(b["source"]), b.get("read_only")) for b in binds(nginx)}
    assert static == {"/usr/share/nginx/static": (ROOT / "app" / "static", True)}

    # Everything else is production's, hardening included.
    expected = copy.deepcopy(production)
    expected["app"]["environment"].update(RELOAD="true", LOG_FORMAT="console")
    for name in ("app", "nginx"):
        expected[name]["volumes"] = (expected[name].get("volumes") or []) + binds(dev[name])
        assert dev[name]["read_only"] is True
        assert dev[name]["cap_drop"] == ["ALL"]
    assert dev == expected
