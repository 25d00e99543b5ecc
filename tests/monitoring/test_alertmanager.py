"""Alertmanager's configuration in the real amtool: valid, and routing and inhibition do what
monitoring/RUNBOOK.md says, for the alerts the rules really define.

amtool comes from the Alertmanager image the stack builds on (localbase/alertmanager:trixie
here, from scripts/base-images.sh; prom/alertmanager:v0.28.1 where it can be pulled).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

import pytest

from tests.monitoring import promql

ALERTMANAGER_DIR = promql.MONITORING / "alertmanager"
CONFIG = ALERTMANAGER_DIR / "alertmanager.yml"
IMAGES = ("localbase/alertmanager:trixie", "prom/alertmanager:v0.28.1")


def _image() -> str | None:
    if not shutil.which("docker"):
        return None
    wanted = [os.environ.get("ALERTMANAGER_IMAGE"), *IMAGES]
    for image in [i for i in wanted if i]:
        probe = subprocess.run(
            ["docker", "image", "inspect", image], capture_output=True, timeout=30, check=False
        )
        if probe.returncode == 0:
            return image
    return None


@pytest.fixture(scope="module")
def amtool() -> list[str]:
    """`docker run` of the image, locked down, the config folder mounted; add the command."""
    image = _image()
    if image is None:
        message = "no amtool: build localbase/alertmanager:trixie (scripts/base-images.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return [
        "docker", "run", "--rm", "--network", "none", "--read-only", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--user", "65534:65534",
        "-v", f"{ALERTMANAGER_DIR}:/etc/alertmanager:ro", "--entrypoint", "sh", image, "-c",
    ]  # fmt: skip


def _run(amtool: list[str], script: str) -> str:
    result = subprocess.run(
        [*amtool, script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, f"{script}:\n{result.stdout}{result.stderr}"
    return result.stdout


def _receivers(amtool: list[str], label_sets: list[list[str]]) -> list[str]:
    """The receiver amtool routes each label set to (one container for all of them)."""
    script = "".join(
        "amtool config routes test --config.file=/etc/alertmanager/alertmanager.yml "
        + " ".join(shlex.quote(label) for label in labels)
        + " && "
        for labels in label_sets
    )
    return _run(amtool, script + "true").split()


def test_config_is_valid(amtool: list[str]) -> None:
    out = _run(amtool, "amtool check-config /etc/alertmanager/alertmanager.yml")
    assert "SUCCESS" in out
    assert "2 receivers" in out


def test_every_alert_reaches_a_receiver(amtool: list[str]) -> None:
    # Routes match on severity and on the Watchdog's name: one alert of each kind is enough
    # (each amtool run costs half a second).
    kinds: dict[tuple[bool, str], str] = {}
    for alert in promql.alert_rules():
        kinds.setdefault(
            (alert["alert"] == "Watchdog", alert["labels"]["severity"]), alert["alert"]
        )
    labels = [
        [f"alertname={name}", f"severity={severity}"] for (_, severity), name in kinds.items()
    ]
    routed = dict(zip(kinds.values(), _receivers(amtool, labels), strict=True))
    assert routed.pop("Watchdog") == "heartbeat"
    assert set(routed.values()) == {"webhook"}, routed
    assert {severity for _, severity in kinds} == {"critical", "warning", "info", "none"}


def test_pages_inhibit_warnings_never_the_watchdog() -> None:
    config = promql.load_yaml(CONFIG)
    (rule,) = config["inhibit_rules"]
    assert rule["source_matchers"] == ['severity="critical"']
    assert rule["target_matchers"] == ['severity=~"warning|info"']
    severities = {a["alert"]: a["labels"]["severity"] for a in promql.alert_rules()}
    assert severities["Watchdog"] == "none"  # outside every inhibition
    # Pages are grouped and sent faster than warnings, resolved notifications included.
    routes = {tuple(r["matchers"]): r for r in config["route"]["routes"]}
    page = routes[('severity="critical"',)]
    assert page["group_interval"] == "1m"
    assert config["route"]["group_by"] == ["alertname", "severity"]
    assert all(
        c.get("send_resolved") for r in config["receivers"] if r["name"] == "webhook"
        for c in r["webhook_configs"]
    )  # fmt: skip


def test_webhook_urls_are_settings_not_text() -> None:
    """The URLs come from the environment through the entrypoint (url_file), never the file."""
    config = promql.load_yaml(CONFIG)
    for receiver in config["receivers"]:
        for webhook in receiver["webhook_configs"]:
            assert "url" not in webhook
            assert webhook["url_file"].startswith("/tmp/alertmanager/")


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ("", "ALERTMANAGER_WEBHOOK_URL is not set"),
        ("ftp://example.net/hook", "ALERTMANAGER_WEBHOOK_URL is invalid"),
        ("http://example.net/a b", "ALERTMANAGER_WEBHOOK_URL is invalid"),
    ],
)
def test_entrypoint_refuses_a_bad_url_naming_the_variable(webhook: str, message: str) -> None:
    result = subprocess.run(
        ["sh", str(ALERTMANAGER_DIR / "entrypoint.sh")],
        env={"PATH": os.environ["PATH"], "ALERTMANAGER_WEBHOOK_URL": webhook},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert result.returncode == 78
    assert message in result.stdout
    assert webhook == "" or webhook not in result.stdout  # a URL may hold a token: not echoed
