"""What the benchmark needs besides the project's venv, installed on first use: the load
generators from Debian (apt-get), py-spy from PyPI into .cache/bench-tools (not the
venv), and the stack's images built by docker compose from this checkout (tag `bench`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING

from bench.configs import COMPOSE_FILE, IMAGE_TAG, ROOT
from bench.processes import say

if TYPE_CHECKING:
    from pathlib import Path

TOOLS = ROOT / ".cache" / "bench-tools"
# command -> Debian package
DEBIAN = {"wrk": "wrk", "taskset": "util-linux", "openssl": "openssl"}


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


def ensure_py_spy() -> Path:
    binary = TOOLS / "bin" / "py-spy"
    if not binary.exists():
        say(f"installing py-spy from PyPI into {TOOLS}")
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "--quiet"),
                *("--disable-pip-version-check", "--target", str(TOOLS), "py-spy"),
            ],
            check=True,
            timeout=600,
        )
    return binary


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
