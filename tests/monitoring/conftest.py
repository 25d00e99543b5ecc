"""promtool for the static monitoring checks, from the Prometheus image the stack builds on.

Where promtool comes from, first match wins:
  PROMTOOL=/path/to/promtool      a binary on this machine (fast local iteration)
  PROMTOOL_IMAGE / PROMETHEUS_IMAGE  an image present locally (never pulled)
  localbase/prometheus:trixie, prom/prometheus:v2.53.3   whichever is present locally
Without any, the promtool tests are skipped, except under CI=true where they fail: CI builds
localbase/prometheus:trixie (scripts/base-images.sh) before the static layer.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.monitoring.promql import PROMETHEUS_DIR

DEFAULT_IMAGES = ("localbase/prometheus:trixie", "prom/prometheus:v2.53.3")
# Inside the container the repository's monitoring/prometheus is /etc/prometheus, the
# layout of the image built from monitoring/prometheus/Dockerfile.
CONFIG_MOUNT = "/etc/prometheus"
SCRATCH_MOUNT = "/scratch"


@dataclass
class Promtool:
    """Runs promtool on files under monitoring/prometheus or a scratch directory."""

    binary: str | None
    image: str | None
    scratch: Path

    def path(self, host_path: Path) -> str:
        """The name promtool sees for a file of ours."""
        host_path = host_path.resolve()
        if self.binary:
            return str(host_path)
        if host_path.is_relative_to(PROMETHEUS_DIR):
            return f"{CONFIG_MOUNT}/{host_path.relative_to(PROMETHEUS_DIR)}"
        return f"{SCRATCH_MOUNT}/{host_path.relative_to(self.scratch)}"

    def config(self) -> str:
        """prometheus.yml as promtool should check it: its rule_files glob is absolute
        (/etc/prometheus/rules/*.yml, the image's layout); a host binary gets a copy that
        points at the repository's rules instead."""
        config = PROMETHEUS_DIR / "prometheus.yml"
        if not self.binary:
            return self.path(config)
        copy = self.scratch / "prometheus.yml"
        copy.write_text(config.read_text().replace(f"{CONFIG_MOUNT}/", f"{PROMETHEUS_DIR}/"))
        return str(copy)

    def run(self, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        if self.binary:
            command = [self.binary, *args]
        else:
            assert self.image
            workdir = [] if cwd is None else ["--workdir", self.path(cwd)]
            command = [
                "docker", "run", "--rm", "--network", "none", "--read-only",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--tmpfs", "/tmp",
                "-v", f"{PROMETHEUS_DIR}:{CONFIG_MOUNT}:ro",
                "-v", f"{self.scratch}:{SCRATCH_MOUNT}:ro",
                *workdir, "--entrypoint", "promtool", self.image, *args,
            ]  # fmt: skip
        return subprocess.run(
            command, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
        )


def _image_present(image: str) -> bool:
    if not shutil.which("docker"):
        return False
    probe = subprocess.run(
        ["docker", "image", "inspect", image], capture_output=True, timeout=30, check=False
    )
    return probe.returncode == 0


def _find_promtool() -> tuple[str | None, str | None]:
    if binary := os.environ.get("PROMTOOL"):
        return binary, None
    wanted = [os.environ.get("PROMTOOL_IMAGE"), os.environ.get("PROMETHEUS_IMAGE")]
    for image in [i for i in wanted if i] + list(DEFAULT_IMAGES):
        if _image_present(image):
            return None, image
    return None, None


@pytest.fixture(scope="session")
def promtool(tmp_path_factory: pytest.TempPathFactory) -> Promtool:
    binary, image = _find_promtool()
    if not binary and not image:
        message = (
            "no promtool: set PROMTOOL, or build localbase/prometheus:trixie "
            "(scripts/base-images.sh prometheus)"
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    scratch = tmp_path_factory.mktemp("promtool")
    # The image runs promtool as nobody: the scratch files must be world-readable.
    scratch.chmod(0o755)
    return Promtool(binary=binary, image=image, scratch=scratch)
