"""The running containers of a compose project, found by the labels compose puts on them."""

from __future__ import annotations

import shutil
import subprocess

__all__ = ["ComposeLookupError", "running_containers"]


class ComposeLookupError(Exception):
    """The docker CLI is missing or `docker ps` failed; the message says which."""


def running_containers(project: str, service: str) -> list[str]:
    """Ids of the project's running containers of `service`, possibly none."""
    if shutil.which("docker") is None:
        raise ComposeLookupError("the docker CLI is not installed")
    result = subprocess.run(
        [
            "docker",
            "ps",
            "-q",
            "--filter",
            f"label=com.docker.compose.project={project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
        ],
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    if result.returncode != 0:
        raise ComposeLookupError(f"docker ps: {result.stderr.strip()}")
    return result.stdout.split()
