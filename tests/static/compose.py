"""`docker compose config` of this repository, as the static tests read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def compose_config(*args: str) -> dict[str, Any]:
    """`docker compose <args> config --format json` in the repository, with none of this
    shell's settings (a COMPOSE_FILE or HTTPS_PORT of yours would change the answer).
    Needs the `docker compose` CLI (scripts/ensure-compose.sh), not the Docker daemon."""
    if shutil.which("docker") is None:
        pytest.fail("docker CLI missing: run scripts/ensure-compose.sh", pytrace=False)
    clean = {k: os.environ[k] for k in ("PATH", "HOME", "DOCKER_CONFIG") if k in os.environ}
    proc = subprocess.run(
        ["docker", "compose", *args, "config", "--format", "json"],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))
