"""The report's figures as a picture: requests per server CPU-second and p99 of each
configuration, both clients side by side (matplotlib from .cache/bench-tools)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from bench.tools import TOOLS_BIN

if TYPE_CHECKING:
    from bench.configs import Config

SCRIPT = Path(__file__).with_name("draw.py")


def figures(configs: list[Config]) -> list[dict[str, object]]:
    """What the plot shows, one entry per row of the report."""
    return [
        {
            "name": c.name,
            "client": c.client,
            "role": c.role,
            "per_cpu_second": c.median("per_cpu_second"),
            "p99_ms": c.median("p99_ms"),
        }
        for c in configs
        if c.role not in ("raw", "tree")
    ]


def plot(configs: list[Config], path: Path) -> None:
    """Draw into `path` with the tools venv's matplotlib (not a project dependency)."""
    subprocess.run(
        [str(TOOLS_BIN / "python"), str(SCRIPT), str(path)],
        input=orjson.dumps(figures(configs)),
        check=True,
        timeout=120,
    )
