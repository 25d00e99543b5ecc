"""Grafana provisioning and dashboards: valid, wired to the provisioned datasource, and
querying only metrics that exist. Pure Python, no Grafana needed (query syntax: see
test_promtool.py)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.monitoring import promql

DASHBOARDS = promql.dashboard_files()
PROVISIONING = promql.MONITORING / "grafana" / "provisioning"


def test_there_are_dashboards() -> None:
    assert DASHBOARDS, "no dashboard JSON in monitoring/grafana/dashboards"


def test_datasource_is_provisioned_with_the_pinned_uid() -> None:
    config = promql.load_yaml(promql.DATASOURCES_FILE)
    (datasource,) = config["datasources"]
    assert datasource["uid"] == promql.DATASOURCE_UID
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    # Grafana's $__rate_interval is derived from this; it must match the scrape interval.
    prometheus = promql.load_yaml(promql.PROMETHEUS_DIR / "prometheus.yml")
    assert datasource["jsonData"]["timeInterval"] == prometheus["global"]["scrape_interval"]


def test_dashboard_provider_reads_the_mounted_folder() -> None:
    config = promql.load_yaml(PROVISIONING / "dashboards" / "dashboards.yml")
    (provider,) = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    assert provider["allowUiUpdates"] is False


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_shape(path: Any) -> None:
    dashboard = promql.load_dashboard(path)  # valid JSON, or this raises
    assert dashboard.get("uid"), "a fixed uid keeps links stable across re-provisioning"
    assert dashboard.get("title")
    assert "id" not in dashboard or dashboard["id"] is None, "exported ids clash on import"
    panels = promql.data_panels(dashboard)
    assert panels
    ids = [p["id"] for p in promql.iter_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        where = f"panel {panel['id']} {panel.get('title')!r}"
        assert panel.get("title"), where
        assert panel.get("description"), f"{where}: say what it shows"
        assert panel.get("gridPos", {}).get("w"), where
        datasource = {"type": "prometheus", "uid": promql.DATASOURCE_UID}
        assert panel.get("datasource") == datasource, where
        targets = panel.get("targets")
        assert targets, f"{where} has no query"
        ref_ids = [t.get("refId") for t in targets]
        assert all(ref_ids), where
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in targets:
            assert target.get("expr", "").strip(), f"{where} {target.get('refId')}: empty query"
            assert target.get("datasource") == {
                "type": "prometheus",
                "uid": promql.DATASOURCE_UID,
            }, where


def test_no_template_variable_left_unsubstituted() -> None:
    """The only `$` allowed in a query is one of Grafana's built-in interval variables, which
    the tests (and Grafana) replace with a duration."""
    for query in promql.panel_queries():
        assert "$" not in query.promql(), f"{query.name}: unknown variable in {query.expr!r}"


def test_dashboards_use_only_existing_metrics() -> None:
    allowed = promql.SCRAPED_METRICS | promql.recorded_names()
    for query in promql.panel_queries():
        unknown = promql.metric_names(query.promql()) - allowed
        assert not unknown, f"{query.name}: no such metric {sorted(unknown)}"


def test_dashboards_cover_what_operators_look_at() -> None:
    """The panels the stack promises (README 'Dashboards'), by the metric each one needs."""
    used: set[str] = set()
    for query in promql.panel_queries():
        used |= promql.metric_names(query.promql())
    expected = promql.APP_METRICS | promql.NGINX_EXPORTER_METRICS
    expected -= {
        "http_request_duration_seconds_sum",
        "http_request_duration_seconds_count",
        "nginx_up",  # shown through `up` and the NginxTargetDown alert
    }
    assert expected <= used, f"not on any dashboard: {sorted(expected - used)}"
    exprs = [q.expr for q in promql.panel_queries()]
    for quantile in ("0.50", "0.95", "0.99"):
        assert any(f"histogram_quantile({quantile}, sum by (le) (rate(" in e for e in exprs), (
            f"p{quantile[2:]} over all routes"
        )
    assert any("sum by (le, route) (rate(" in e for e in exprs), "p95 by route"


def test_the_latency_panel_shows_exemplars() -> None:
    """Dots on the quantiles panel lead from a spike to a trace id (RUNBOOK "Follow a slow
    request"): exactly one query asks, so each exemplar is drawn once."""
    asking = [q for q in promql.panel_queries() if q.exemplar]
    assert len(asking) == 1, [q.name for q in asking]
    (query,) = asking
    assert query.panel_title == "Latency p50 / p95 / p99"
    assert "http_request_duration_seconds_bucket" in promql.metric_names(query.promql())
