"""deploy/swarm/stack.yml against docker-compose.yml: the same images, settings, health and
timeouts, so the Swarm path cannot drift from the compose stack it mirrors. Pure Python."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.static.test_contract import ROOT, SERVICES

STACK: dict[str, Any] = yaml.safe_load((ROOT / "deploy" / "swarm" / "stack.yml").read_text())[
    "services"
]
# What Swarm sets itself: the upstream that follows the tasks, the certificate's files.
SWARM_ONLY = {"nginx": {"APP_UPSTREAM"}}


def names(environment: list[str]) -> set[str]:
    return {entry.split("=", 1)[0] for entry in environment}


@pytest.mark.parametrize("service", ["app", "nginx"])
def test_same_image_settings_health_and_grace(service: str) -> None:
    compose, stack = SERVICES[service], STACK[service]
    assert stack["image"] == compose["image"]
    expected = names(compose["environment"]) | SWARM_ONLY.get(service, set())
    assert names(stack["environment"]) == expected
    assert stack["healthcheck"] == compose["healthcheck"]
    assert stack["stop_grace_period"] == compose["stop_grace_period"]
    assert stack["read_only"] is True
    assert stack["cap_drop"] == ["ALL"]
    assert (
        stack["deploy"]["resources"]["limits"]["cpus"]
        == (compose["deploy"]["resources"]["limits"]["cpus"])
    )


def test_app_updates_start_first_with_rollback_over_dnsrr() -> None:
    deploy = STACK["app"]["deploy"]
    assert deploy["endpoint_mode"] == "dnsrr"
    assert deploy["update_config"]["order"] == "start-first"
    assert deploy["update_config"]["failure_action"] == "rollback"
    assert all(p["mode"] == "host" for p in STACK["nginx"]["ports"])
    env = dict(e.split("=", 1) for e in STACK["nginx"]["environment"] if "=" in e)
    assert env["APP_UPSTREAM"] == "tasks.app:8000"
