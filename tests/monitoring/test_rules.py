"""Alert rules: every alert is documented, tested both ways by promtool, and built on metrics
that exist and thresholds defined in one place. Pure Python (promtool runs them in
test_promtool.py)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.monitoring import promql

ALERTS = promql.alert_rules()
RUNBOOK = promql.MONITORING / "RUNBOOK.md"
SEVERITIES = {"critical", "warning", "info"}
# The dead man's switch: always firing, routed on its own, never inhibited.
HEARTBEAT = "Watchdog"
REQUIRED_ALERTS = {
    "AppTargetDown",
    "NginxTargetDown",
    "High5xxRatio",
    "HighLatencyP95",
    "NoWorkers",
    "WorkerSaturation",
    "FrequentWorkerRestarts",
    HEARTBEAT,
}


def _alert_tests() -> list[dict[str, Any]]:
    found = []
    for path in promql.rule_test_files():
        for test in promql.load_yaml(path)["tests"]:
            found.extend(test.get("alert_rule_test", []))
    return found


def test_required_alerts_exist() -> None:
    names = [a["alert"] for a in ALERTS]
    assert len(names) == len(set(names)), "alert names must be unique"
    assert set(names) >= REQUIRED_ALERTS


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_alert_is_documented(alert: dict[str, Any]) -> None:
    if alert["alert"] == HEARTBEAT:
        assert alert["labels"]["severity"] == "none"
    else:
        assert alert["labels"]["severity"] in SEVERITIES
    annotations = alert["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    anchor = alert["alert"].lower()
    assert annotations["runbook_url"] == f"monitoring/RUNBOOK.md#{anchor}"
    headings = re.findall(r"^## (\w+)", RUNBOOK.read_text(), flags=re.MULTILINE)
    assert alert["alert"] in headings, f"RUNBOOK.md has no '## {alert['alert']}' section"


@pytest.mark.parametrize("alert", ALERTS, ids=lambda a: a["alert"])
def test_alert_has_unit_tests_that_fire_and_stay_quiet(alert: dict[str, Any]) -> None:
    cases = [t for t in _alert_tests() if t["alertname"] == alert["alert"]]
    assert any(t.get("exp_alerts") for t in cases), "no promtool test where it fires"
    if alert["alert"] == HEARTBEAT:
        assert all(t.get("exp_alerts") for t in cases), "the heartbeat never stays quiet"
        return
    assert any(not t.get("exp_alerts") for t in cases), "no promtool test where it stays quiet"


def test_rules_use_only_existing_metrics() -> None:
    allowed = promql.SCRAPED_METRICS | promql.recorded_names()
    for rule in promql.rules():
        unknown = promql.metric_names(rule["expr"]) - allowed
        name = rule.get("alert") or rule.get("record")
        assert not unknown, f"{name}: no such metric {sorted(unknown)}"


def test_thresholds_are_defined_once_in_thresholds_yml() -> None:
    defined = [
        r["record"]
        for group in promql.load_yaml(promql.RULES_DIR / "thresholds.yml")["groups"]
        for r in group["rules"]
    ]
    assert len(defined) == len(set(defined))
    assert all(name.startswith("threshold:") for name in defined)
    elsewhere = {
        r["record"]
        for path in promql.rule_files()
        if path.name != "thresholds.yml"
        for group in promql.load_yaml(path)["groups"]
        for r in group["rules"]
        if "record" in r
    }
    assert not {n for n in elsewhere if n.startswith("threshold:")}
    used: set[str] = set()
    for rule in promql.rules():
        used |= promql.threshold_names(rule["expr"])
    for query in promql.panel_queries():
        used |= promql.threshold_names(query.promql())
    assert used <= set(defined), f"undefined thresholds: {sorted(used - set(defined))}"
    assert set(defined) <= used, f"unused thresholds: {sorted(set(defined) - used)}"


def test_rule_tests_load_every_rules_file() -> None:
    loaded = set()
    for path in promql.rule_test_files():
        for name in promql.load_yaml(path)["rule_files"]:
            loaded.add((path.parent / name).resolve())
    assert loaded == {p.resolve() for p in promql.rule_files()}
