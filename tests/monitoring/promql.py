"""What the monitoring tests share: the dashboards' queries, the rules, the metric names.

Used by the static tests in this folder and by tests/e2e/test_monitoring.py, so that both
check the very expressions Grafana and Prometheus run.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "monitoring"
PROMETHEUS_DIR = MONITORING / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
DASHBOARDS_DIR = MONITORING / "grafana" / "dashboards"
DATASOURCES_FILE = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DATASOURCE_UID = "prometheus"

# --- the metric names anything in monitoring/ may use ------------------------------------

# The serving layer's metrics (team contract; server/metrics.py).
APP_METRICS = frozenset(
    {
        "http_requests_total",
        "http_request_duration_seconds_bucket",
        "http_request_duration_seconds_sum",
        "http_request_duration_seconds_count",
        "http_requests_in_progress",
        "websocket_connections_open",
        "websocket_messages_total",
        "websocket_sessions_total",
        "gunicorn_workers",
        "gunicorn_worker_restarts_total",
        "app_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    }
)
# nginx-prometheus-exporter 1.4 over stub_status.
# https://github.com/nginx/nginx-prometheus-exporter#metrics-for-nginx-oss
NGINX_EXPORTER_METRICS = frozenset(
    {
        "nginx_up",
        "nginx_connections_accepted",
        "nginx_connections_active",
        "nginx_connections_handled",
        "nginx_connections_reading",
        "nginx_connections_waiting",
        "nginx_connections_writing",
        "nginx_http_requests_total",
    }
)
# blackbox_exporter 0.26 (monitoring/blackbox/blackbox.yml, job "tls"): the served certificate.
# https://github.com/prometheus/blackbox_exporter/blob/master/prober/tls.go
BLACKBOX_METRICS = frozenset(
    {
        "probe_success",
        "probe_duration_seconds",
        "probe_ssl_earliest_cert_expiry",
        "probe_ssl_last_chain_info",
        "probe_tls_version_info",
    }
)
# The ACME client (acme/client.py, job "acme").
ACME_METRICS = frozenset(
    {
        "acme_managing",
        "acme_consecutive_failures",
        "acme_attempts_total",
        "acme_last_success_timestamp_seconds",
        "acme_next_attempt_timestamp_seconds",
        "acme_certificate_not_after_seconds",
    }
)
# Series Prometheus writes for every target, and the few of its own metrics we alert on.
PROMETHEUS_METRICS = frozenset(
    {
        "up",
        "scrape_duration_seconds",
        "scrape_samples_scraped",
        "ALERTS",
        "prometheus_rule_evaluation_failures_total",
        "prometheus_config_last_reload_successful",
        "prometheus_tsdb_compactions_failed_total",
    }
)
# Alertmanager 0.28's own, scraped by the `alertmanager` job.
ALERTMANAGER_METRICS = frozenset({"alertmanager_notifications_failed_total"})
SCRAPED_METRICS = (
    APP_METRICS
    | NGINX_EXPORTER_METRICS
    | BLACKBOX_METRICS
    | ACME_METRICS
    | PROMETHEUS_METRICS
    | ALERTMANAGER_METRICS
)

# Values Grafana substitutes before a query reaches Prometheus. The durations are the ones
# Grafana computes for this stack: timeInterval 10s -> $__rate_interval >= 4 x 10s.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "10s",
    "$__range": "1h",
}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel_id: int
    panel_title: str
    ref_id: str
    expr: str
    exemplar: bool = False  # Grafana also asks /api/v1/query_exemplars and draws the dots

    @property
    def name(self) -> str:
        return f"{self.dashboard}#{self.panel_id} {self.panel_title!r} {self.ref_id}"

    def promql(self) -> str:
        return substitute_grafana_variables(self.expr)


def substitute_grafana_variables(expr: str) -> str:
    # Longest names first: $__range must not eat $__range_s and the like.
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, GRAFANA_VARIABLES[name])
    return expr


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def load_dashboard(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


def iter_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in iter_panels(dashboard) if p.get("type") != "row"]


def panel_queries() -> list[PanelQuery]:
    queries = []
    for path in dashboard_files():
        dashboard = load_dashboard(path)
        for panel in data_panels(dashboard):
            for target in panel.get("targets", []):
                queries.append(
                    PanelQuery(
                        dashboard=path.name,
                        panel_id=panel["id"],
                        panel_title=panel.get("title", ""),
                        ref_id=target.get("refId", ""),
                        expr=target.get("expr", ""),
                        exemplar=bool(target.get("exemplar")),
                    )
                )
    return queries


# --- rules ------------------------------------------------------------------------------


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rule_test_files() -> list[Path]:
    return sorted(RULE_TESTS_DIR.glob("*.yml"))


def load_yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def rules() -> list[dict[str, Any]]:
    found = []
    for path in rule_files():
        for group in load_yaml(path)["groups"]:
            found.extend(group["rules"])
    return found


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


# --- metric names in PromQL -----------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][A-Za-z0-9_:]*)")
_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression selects (functions and keywords left out).

    A small scanner, not a parser: strings, label matchers, ranges and grouping clauses are
    blanked first, then every identifier not followed by "(" is a metric name. Valid syntax
    is promtool's job (test_promtool.py).
    """
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGES.sub("", text)
    text = _GROUPING.sub("", text)
    text = _OFFSET.sub("", text)
    names = set()
    for match in _IDENT.finditer(text):
        token = match.group(1)
        if re.match(r"\s*\(", text[match.end() :]) or token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def threshold_names(expr: str) -> set[str]:
    return {name for name in metric_names(expr) if name.startswith("threshold:")}
