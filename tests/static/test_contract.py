"""The contract between the components: invariants no single component can check alone.

Each value is read from its one home (server/settings.py defaults, the nginx config, the
compose file, the Dockerfiles, Prometheus' config, the server's own metric objects), never
restated here, so changing one side without the other fails this test. Pure Python: no
Docker, no network.

- the timeout ladder: the app finishes in-flight requests before gunicorn kills workers,
  gunicorn before nginx gives up on its connections, nginx before Docker sends SIGKILL;
- keep-alive: the app keeps idle upstream connections open longer than nginx does, so nginx
  never sends a request on a connection the app is closing;
- read timeouts: nginx waits longer than gunicorn's worker timeout and the slowest endpoint,
  the load generator longer than nginx (the one that answers is the one that knows why);
- ports: the app's PORT / METRICS_PORT against nginx's upstream, compose `expose`, the
  healthchecks, Prometheus' targets; nginx's listeners against compose's port mappings;
- metric names: what the server really exports is what monitoring/ may query;
- ACME: the client and nginx agree on the names, the certificate files, the challenge
  webroot and the uid that owns the shared volumes; Prometheus scrapes the client's port and
  probes nginx's TLS port through the blackbox exporter.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.sse import _PING_INTERVAL as SSE_KEEPALIVE
from prometheus_client import CollectorRegistry, generate_latest

from acme import client as acme_client
from acme import settings as acme_settings
from app.main import MAX_SLOW_SECONDS
from server.metrics import HttpMetrics, MasterCollector, WebSocketMetrics
from server.settings import Settings
from tests.monitoring import promql

ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = ROOT / "nginx" / "conf"
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
DEFAULTS = Settings.model_validate({})  # the app server's defaults, from their one home


def seconds(value: str) -> float:
    """An nginx or compose duration (`30s`, `1m30s`, `500ms`, `60`) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", value.strip())
    assert "".join(n + (u or "") for n, u in parts) == value.strip(), value
    return sum(float(n) * units[u or "s"] for n, u in parts)


def nginx_directive(path: str, name: str) -> str:
    """The value of the one `name ...;` directive in nginx/conf/<path>."""
    text = (NGINX_CONF / path).read_text()
    found = re.findall(rf"^\s*{name}\s+([^;]+);", text, flags=re.MULTILINE)
    assert len(found) == 1, f"{path}: expected one {name}, found {found}"
    return str(found[0]).strip()


def nginx_listens() -> set[int]:
    ports = set()
    for path in (NGINX_CONF / "servers").glob("*.conf"):
        ports |= {int(p) for p in re.findall(r"^\s*listen\s+(\d+)", path.read_text(), re.M)}
    return ports


def entrypoint_default(name: str) -> str:
    text = (ROOT / "nginx" / "docker-entrypoint.sh").read_text()
    match = re.search(rf"^{name}=\$\{{{name}:?-(.*)\}}$", text, flags=re.MULTILINE)
    assert match, f"nginx/docker-entrypoint.sh has no default for {name}"
    return match[1]


def entrypoint_constant(name: str) -> str:
    text = (ROOT / "nginx" / "docker-entrypoint.sh").read_text()
    match = re.search(rf"^{name}=(\d+)", text, flags=re.MULTILINE)
    assert match, f"nginx/docker-entrypoint.sh sets no {name}"
    return match[1]


def dockerfile_instruction(path: str, instruction: str) -> str:
    text = (ROOT / path).read_text().replace("\\\n", " ")
    found = re.findall(rf"^{instruction}\s+(.+)$", text, flags=re.MULTILINE)
    assert len(found) == 1, f"{path}: expected one {instruction}"
    return str(found[0])


# ── the timeout ladder ──────────────────────────────────────────────────────


def test_timeouts_nest_from_the_app_to_docker() -> None:
    delay = DEFAULTS.shutdown_delay  # readiness 503 before the stop (drain)
    app_drain = delay + DEFAULTS.shutdown_timeout
    gunicorn = DEFAULTS.graceful_timeout
    nginx = seconds(nginx_directive("nginx.conf", "worker_shutdown_timeout"))
    ladder = {"app (SHUTDOWN_DELAY + SHUTDOWN_TIMEOUT)": app_drain}
    ladder["gunicorn GRACEFUL_TIMEOUT"] = gunicorn
    ladder["nginx worker_shutdown_timeout"] = nginx
    for service in ("app", "nginx"):
        docker = seconds(SERVICES[service]["stop_grace_period"])
        ladder[f"compose {service} stop_grace_period"] = docker
        assert app_drain < gunicorn < nginx < docker, ladder
        # gunicorn's GRACEFUL_TIMEOUT starts only when the drain ends
        assert delay + gunicorn < docker, ladder


def test_nginx_drops_a_draining_replica_before_it_stops_serving() -> None:
    # nginx's supervisor looks every UPSTREAM_WATCH_INTERVAL, each probe waits at most
    # PROBE_TIMEOUT: a replica answering /readyz 503 for SHUTDOWN_DELAY is out of the
    # upstream before it stops listening.
    interval = float(entrypoint_default("UPSTREAM_WATCH_INTERVAL"))
    supervisor = (ROOT / "nginx" / "supervisor.sh").read_text()
    match = re.search(r"^PROBE_TIMEOUT=(\d+)", supervisor, flags=re.MULTILINE)
    assert match, "nginx/supervisor.sh sets no PROBE_TIMEOUT"
    worst = interval + 2 * int(match[1])  # a turn, then its probe, then the next probe
    assert worst < DEFAULTS.shutdown_delay, (
        f"UPSTREAM_WATCH_INTERVAL {interval}s + probes {worst - interval}s >= "
        f"SHUTDOWN_DELAY {DEFAULTS.shutdown_delay}s: a draining replica could still get "
        "requests after it stopped listening"
    )


# ── keep-alive and read timeouts ────────────────────────────────────────────


def test_the_app_outlives_nginx_idle_upstream_connections() -> None:
    nginx_idle = seconds(nginx_directive("proxy/upstream.conf", "keepalive_timeout"))
    assert nginx_idle < DEFAULTS.keepalive_timeout, (
        f"nginx keeps idle upstream connections {nginx_idle}s, the app closes them after "
        f"KEEPALIVE_TIMEOUT={DEFAULTS.keepalive_timeout}s: nginx would reuse closing ones"
    )


def test_nginx_waits_longer_than_the_app_decides() -> None:
    read = seconds(nginx_directive("proxy/app.conf", "proxy_read_timeout"))
    send = seconds(nginx_directive("proxy/app.conf", "proxy_send_timeout"))
    assert read > DEFAULTS.worker_timeout, "gunicorn, not nginx, must time a stuck worker out"
    assert read > MAX_SLOW_SECONDS, "the slowest endpoint (/api/slow) must finish through nginx"
    assert send >= read


def test_websocket_pings_keep_sessions_alive_through_nginx() -> None:
    read = seconds(nginx_directive("proxy/websocket.conf", "proxy_read_timeout"))
    send = seconds(nginx_directive("proxy/websocket.conf", "proxy_send_timeout"))
    assert DEFAULTS.ws_ping_interval < read, (
        f"WS_PING_INTERVAL={DEFAULTS.ws_ping_interval}s is not shorter than nginx's WebSocket "
        f"proxy_read_timeout {read}s: idle sessions would be cut by nginx"
    )
    assert send >= read
    # Event streams go through the ordinary location: the app's keep-alive comments
    # (FastAPI's, for a quiet stream) must come before nginx's read timeout.
    assert seconds(nginx_directive("proxy/app.conf", "proxy_read_timeout")) > SSE_KEEPALIVE


def test_the_load_generator_waits_longer_than_nginx() -> None:
    text = (ROOT / "loadtests" / "locustfile.py").read_text()
    match = re.search(r"^\s*network_timeout = ([0-9.]+)", text, flags=re.MULTILINE)
    assert match, "loadtests/locustfile.py sets no network_timeout"
    read = seconds(nginx_directive("proxy/app.conf", "proxy_read_timeout"))
    assert float(match[1]) > read, "Locust would give up before nginx answers 504"


# ── file descriptors ────────────────────────────────────────────────────────


def test_nginx_has_descriptors_for_every_connection_slot() -> None:
    # worker_connections is rendered from the memory limit, capped by the entrypoint
    most = int(entrypoint_constant("MAX_WORKER_CONNECTIONS"))
    rlimit = int(nginx_directive("nginx.conf", "worker_rlimit_nofile"))
    nofile = SERVICES["nginx"]["ulimits"]["nofile"]
    # a proxied request holds two descriptors: the client's and the app's
    assert 2 * most < rlimit <= int(nofile["soft"]) <= int(nofile["hard"])


# ── ports ───────────────────────────────────────────────────────────────────


def test_nginx_upstream_is_the_apps_port() -> None:
    host, port = entrypoint_default("APP_UPSTREAM").rsplit(":", 1)
    assert host in SERVICES, f"APP_UPSTREAM names {host!r}, not a compose service"
    assert int(port) == DEFAULTS.port


def test_app_ports_are_exposed_and_probed() -> None:
    app = SERVICES["app"]
    assert {str(DEFAULTS.port), str(DEFAULTS.metrics_port)} <= set(app["expose"])
    assert not app.get("ports"), "the app's ports are never published"
    probe = f"127.0.0.1:{DEFAULTS.port}/healthz"
    assert probe in " ".join(app["healthcheck"]["test"]), "compose healthcheck"
    assert probe in dockerfile_instruction("Dockerfile", "HEALTHCHECK"), "image HEALTHCHECK"
    exposed = set(dockerfile_instruction("Dockerfile", "EXPOSE").split())
    assert exposed == {str(DEFAULTS.port), str(DEFAULTS.metrics_port)}


def test_prometheus_scrapes_the_metrics_port_and_the_exporter() -> None:
    config = yaml.safe_load((promql.PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (app_sd,) = jobs["app"]["dns_sd_configs"]
    assert app_sd["names"] == ["app"]
    assert app_sd["port"] == DEFAULTS.metrics_port
    exporter = SERVICES["nginx-exporter"]["command"]
    listen = next(a for a in exporter if a.startswith("--web.listen-address="))
    (target,) = jobs["nginx"]["static_configs"][0]["targets"]
    assert target == "nginx-exporter:" + listen.rsplit(":", 1)[1]
    scrape = next(a for a in exporter if a.startswith("--nginx.scrape-uri="))
    status_port = int(re.search(r"//nginx:(\d+)/", scrape)[1])  # type: ignore[index]
    status_conf = (NGINX_CONF / "servers" / "status.conf").read_text()
    assert f"listen {status_port};" in status_conf


def test_published_ports_reach_nginx_listeners() -> None:
    listens = nginx_listens()
    inner = {int(p.rsplit(":", 1)[1]) for p in SERVICES["nginx"]["ports"]}
    assert inner <= listens, (inner, listens)
    exposed = {int(p) for p in dockerfile_instruction("nginx/Dockerfile", "EXPOSE").split()}
    assert exposed == inner
    health = (ROOT / "nginx" / "healthcheck.sh").read_text()
    port = int(re.search(r"NGINX_HEALTH_PORT:-(\d+)", health)[1])  # type: ignore[index]
    assert port in listens
    locust_host = next(
        e for e in SERVICES["locust-master"]["environment"] if e.startswith("LOADTEST_HOST=")
    )
    assert int(locust_host.rsplit(":", 1)[1]) in listens


# ── metric names ────────────────────────────────────────────────────────────


def exported_metric_names() -> set[str]:
    """Sample names of one exposition of the server's real metric objects."""
    registry = CollectorRegistry()
    metrics = HttpMetrics(registry)
    metrics.requests.labels("GET", "/", "200").inc()
    metrics.duration.labels("GET", "/").observe(0.01)
    websocket = WebSocketMetrics(registry)
    websocket.messages.labels("/ws", "in").inc()
    websocket.sessions.labels("/ws", "1000").inc()
    registry.register(MasterCollector(lambda: [], "contract"))
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}
    return {n for n in names if not n.endswith("_created")}


def test_monitoring_knows_exactly_the_metrics_the_server_exports() -> None:
    exported = exported_metric_names()
    assert exported == set(promql.APP_METRICS), (
        f"server exports but monitoring/ does not know: {sorted(exported - promql.APP_METRICS)}; "
        f"monitoring/ expects but the server lacks: {sorted(promql.APP_METRICS - exported)}"
    )


@pytest.mark.parametrize("source", ["rules", "dashboards"])
def test_rules_and_dashboards_query_only_exported_names(source: str) -> None:
    allowed = (
        exported_metric_names()
        | acme_metric_names()
        | promql.BLACKBOX_METRICS
        | promql.NGINX_EXPORTER_METRICS
        | promql.PROMETHEUS_METRICS
        | promql.ALERTMANAGER_METRICS
        | promql.recorded_names()
    )
    if source == "rules":
        exprs = [str(rule["expr"]) for rule in promql.rules()]
    else:
        exprs = [query.promql() for query in promql.panel_queries()]
    unknown = set().union(*(promql.metric_names(e) for e in exprs)) - allowed
    assert not unknown, f"{source} query metrics nobody exports: {sorted(unknown)}"


# ── ACME ────────────────────────────────────────────────────────────────────


def acme_metric_names() -> set[str]:
    text = acme_client.Metrics().render()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1].isalpha()}


def test_monitoring_knows_exactly_the_metrics_the_acme_client_exports() -> None:
    assert acme_metric_names() == set(promql.ACME_METRICS)


def volume_mounts(service: str) -> dict[str, str]:
    """volume name (or host path) -> path in the container, without the mode."""
    mounts = {}
    for entry in SERVICES[service].get("volumes", []):
        source, target = entry.split(":")[:2]
        mounts[source] = target
    return mounts


def test_acme_client_and_nginx_agree_on_names_and_certificate_files() -> None:
    for name in ("SERVER_NAMES", "TLS_CERT", "TLS_KEY"):
        assert acme_settings.DEFAULTS[name] == entrypoint_default(name), name
    assert volume_mounts("nginx")["tls-certs"] == str(acme_settings.CERT_DIR)
    assert volume_mounts("acme")["tls-certs"] == str(acme_settings.CERT_DIR)
    assert Path(acme_settings.DEFAULTS["TLS_CERT"]).parent == acme_settings.CERT_DIR


def test_acme_challenges_are_written_where_nginx_serves_them() -> None:
    root = nginx_directive("location/acme-challenge.conf", "root")
    assert root == str(acme_client.WEBROOT)
    assert volume_mounts("nginx")["acme-challenges"] == root
    assert volume_mounts("acme")["acme-challenges"] == root
    assert volume_mounts("acme")["acme-state"] == str(acme_client.LEGO_PATH)
    # Both images run as uid 101 and create the shared mount points as 101, so whichever
    # container initialises a fresh volume, the other can use it.
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "acme/Dockerfile").read_text(), re.MULTILINE)
    assert users[-1] == "101:101"  # the user it runs as
    for dockerfile in ("acme/Dockerfile", "nginx/Dockerfile"):
        text = (ROOT / dockerfile).read_text()
        assert re.search(rf"install -d -o 101 -g 101 .*{re.escape(root)}", text), dockerfile


def test_prometheus_scrapes_the_acme_client_and_probes_nginx_tls() -> None:
    config = yaml.safe_load((promql.PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    (acme_sd,) = jobs["acme"]["dns_sd_configs"]
    assert acme_sd["names"] == ["acme"]
    assert acme_sd["port"] == acme_client.METRICS_PORT
    assert SERVICES["acme"]["expose"] == [str(acme_client.METRICS_PORT)]
    assert str(acme_client.METRICS_PORT) in dockerfile_instruction("acme/Dockerfile", "EXPOSE")
    (tls_sd,) = jobs["tls"]["dns_sd_configs"]
    assert tls_sd["names"] == ["nginx"]
    https_inner = int(
        next(p for p in SERVICES["nginx"]["ports"] if "HTTPS_PORT" in p).rsplit(":", 1)[1]
    )
    assert tls_sd["port"] == https_inner
    listen = next(a for a in SERVICES["blackbox-exporter"]["command"] if "listen-address" in a)
    address = next(
        r for r in jobs["tls"]["relabel_configs"] if r.get("target_label") == "__address__"
    )
    assert address["replacement"] == "blackbox-exporter:" + listen.rsplit(":", 1)[1]
    blackbox = yaml.safe_load((ROOT / "monitoring" / "blackbox" / "blackbox.yml").read_text())
    assert jobs["tls"]["params"]["module"] == ["tls_served"]
    assert "tls_served" in blackbox["modules"]
