"""The monitoring services in docker-compose.yml: opt-in profile, loopback-only ports, locked
down like the rest of the stack. Reads the YAML; `docker compose config` itself is the infra
layer's check."""

from __future__ import annotations

from typing import Any

import pytest

from tests.monitoring import promql

COMPOSE = promql.load_yaml(promql.REPO / "docker-compose.yml")
SERVICES = ("prometheus", "alertmanager", "nginx-exporter", "grafana")


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = COMPOSE["services"][name]
    return service


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_locked_down(name: str) -> None:
    service = _service(name)
    assert service["profiles"] == ["monitoring"]
    # Through the shared x-hardening anchor or set here, the result must be the same.
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    user = str(service["user"])
    assert user.split(":", maxsplit=1)[0] not in ("", "0", "root")
    assert service["deploy"]["resources"]["limits"]["memory"]
    assert "env_file" not in service, ".env holds secrets these services do not need"
    for port in service.get("ports", []):
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_ports_are_the_documented_variables() -> None:
    assert _service("prometheus")["ports"] == ["127.0.0.1:${PROMETHEUS_PORT:-9090}:9090"]
    assert _service("grafana")["ports"] == ["127.0.0.1:${GRAFANA_PORT:-3000}:3000"]
    assert _service("alertmanager")["ports"] == ["127.0.0.1:${ALERTMANAGER_PORT:-9093}:9093"]
    assert "ports" not in _service("nginx-exporter")


def test_images_are_pinned_build_arguments() -> None:
    args = _service("prometheus")["build"]["args"]
    assert args["PROMETHEUS_IMAGE"] == "${PROMETHEUS_IMAGE:-prom/prometheus:v2.53.3}"
    dockerfile = (promql.PROMETHEUS_DIR / "Dockerfile").read_text()
    assert "ARG PROMETHEUS_IMAGE=prom/prometheus:v2.53.3" in dockerfile
    args = _service("alertmanager")["build"]["args"]
    assert args["ALERTMANAGER_IMAGE"] == "${ALERTMANAGER_IMAGE:-prom/alertmanager:v0.28.1}"
    dockerfile = (promql.MONITORING / "alertmanager" / "Dockerfile").read_text()
    assert "ARG ALERTMANAGER_IMAGE=prom/alertmanager:v0.28.1" in dockerfile
    exporter = _service("nginx-exporter")["image"]
    assert exporter == "${NGINX_EXPORTER_IMAGE:-nginx/nginx-prometheus-exporter:1.4.1}"
    assert _service("grafana")["image"].startswith("${GRAFANA_IMAGE:-grafana/grafana:1")


def test_prometheus_reaches_the_app_and_the_host() -> None:
    prometheus = _service("prometheus")
    assert set(prometheus["networks"]) == {"backend", "monitoring"}
    assert COMPOSE["networks"]["backend"]["internal"] is True
    assert not COMPOSE["networks"]["monitoring"].get("internal")
    assert prometheus["volumes"] == ["prometheus-data:/prometheus"]
    assert "prometheus-data" in COMPOSE["volumes"]
    flags = prometheus["command"]
    assert any(
        f.startswith("--storage.tsdb.retention.time=${PROMETHEUS_RETENTION_TIME") for f in flags
    )
    assert any(
        f.startswith("--storage.tsdb.retention.size=${PROMETHEUS_RETENTION_SIZE") for f in flags
    )
    assert prometheus["healthcheck"]["test"][:3] == ["CMD", "promtool", "check"]
    assert "--enable-feature=exemplar-storage" in flags
    assert "depends_on" not in prometheus, "monitoring must start even when the app does not"


def test_exporter_reads_stub_status_on_the_backend() -> None:
    exporter = _service("nginx-exporter")
    assert exporter["networks"] == ["backend"]
    assert "--nginx.scrape-uri=http://nginx:8081/stub_status" in exporter["command"]
    prometheus = promql.load_yaml(promql.PROMETHEUS_DIR / "prometheus.yml")
    nginx_job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "nginx")
    assert nginx_job["static_configs"][0]["targets"] == ["nginx-exporter:9113"]


def test_grafana_is_read_only_without_credentials() -> None:
    grafana = _service("grafana")
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert env["GF_AUTH_BASIC_ENABLED"] == "false"
    assert env["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env
    mounts = grafana["volumes"]
    assert "./monitoring/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./monitoring/grafana/dashboards:/etc/grafana/dashboards:ro" in mounts
    assert grafana["networks"] == ["monitoring"]


def test_prometheus_sends_alerts_to_alertmanager_and_scrapes_openmetrics() -> None:
    prometheus = promql.load_yaml(promql.PROMETHEUS_DIR / "prometheus.yml")
    targets = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    # Exemplars exist only in OpenMetrics: the app's scrape asks for it first.
    assert jobs["app"]["scrape_protocols"][0] == "OpenMetricsText1.0.0"
    assert jobs["alertmanager"]["static_configs"][0]["targets"] == ["alertmanager:9093"]
    alertmanager = _service("alertmanager")
    assert set(alertmanager["networks"]) <= set(_service("prometheus")["networks"])
    # The receivers' URLs are settings, passed by name; no other variable reaches it.
    assert alertmanager["environment"] == ["ALERTMANAGER_WEBHOOK_URL", "ALERTMANAGER_HEARTBEAT_URL"]
    assert "--cluster.listen-address=" in alertmanager["command"]
    assert alertmanager["healthcheck"]["test"][:2] == ["CMD", "amtool"]
