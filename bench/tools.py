"""What the benchmark needs besides the project's venv, installed on first use: the load
generators and Caddy from Debian (apt-get), py-spy, Traefik and matplotlib from PyPI into
a venv of their own (.cache/bench-tools, pinned in bench/tools.in), and the stack's images
built by docker compose from this checkout (tag `bench`)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.configs import COMPOSE_FILE, IMAGE_TAG, ROOT
from bench.processes import say

TOOLS = ROOT / ".cache" / "bench-tools"
TOOLS_BIN = TOOLS / "bin"
TOOLS_IN = Path(__file__).with_name("tools.in")
# command -> Debian package
DEBIAN = {
    "wrk": "wrk",
    "h2load": "nghttp2-client",
    "caddy": "caddy",
    "taskset": "util-linux",
    "openssl": "openssl",
}


def ensure_debian_packages(commands: dict[str, str]) -> None:
    """apt-get install the packages whose commands are missing (command -> package)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {', '.join(missing)}: run as root, or install them")
    say(f"installing {', '.join(missing)} from Debian")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    if subprocess.run(install, env=env, check=False, timeout=600).returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, check=True, timeout=600)
        subprocess.run(install, env=env, check=True, timeout=600)


def ensure_tools() -> None:
    """The venv .cache/bench-tools with bench/tools.in, re-made when that file changes."""
    stamp = TOOLS / f".installed-{hashlib.sha256(TOOLS_IN.read_bytes()).hexdigest()[:12]}"
    if stamp.exists():
        return
    say(f"installing {TOOLS_IN.name} from PyPI into {TOOLS}")
    shutil.rmtree(TOOLS, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(TOOLS)], check=True, timeout=300)
    subprocess.run(
        [
            *(str(TOOLS_BIN / "pip"), "install", "--quiet", "--disable-pip-version-check"),
            *("-r", str(TOOLS_IN)),
        ],
        check=True,
        timeout=900,
    )
    stamp.touch()


def build_images(services: tuple[str, ...] = ("app", "nginx")) -> None:
    """`docker compose build` of these services, tagged `bench` (asgi-stack/*:bench). The
    base images come from the environment as for any compose build (PYTHON_IMAGE, ...:
    `make bench BASE=local` passes the Debian-built ones)."""
    say(f"building the {', '.join(services)} image(s) (docker compose build, tag {IMAGE_TAG})")
    subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE_FILE), "build", "--quiet", *services],
        env={**os.environ, "APP_VERSION": IMAGE_TAG, "COMPOSE_PROJECT_NAME": "bench-build"},
        check=True,
        timeout=1200,
    )
