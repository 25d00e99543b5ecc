"""Draw bench/plot.py's figures (JSON on stdin) into a PNG: run by the tools venv's python,
which has matplotlib; imports nothing from the project."""

from __future__ import annotations

import json
import sys

import matplotlib as mpl

mpl.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "ours": "#1f77b4",
    "ours-otlp": "#4292c6",
    "ours-off": "#6baed6",
    "compose": "#08519c",
    "compose-host": "#3182bd",
    "peer": "#ff7f0e",
}


def main(path: str) -> None:
    rows = json.load(sys.stdin)
    clients = sorted({r["client"] for r in rows}, key=lambda c: c != "wrk")
    fig, axes = plt.subplots(len(clients), 2, figsize=(13, 3.2 + 0.45 * len(rows)), squeeze=False)
    for row_axes, client in zip(axes, clients, strict=True):
        mine = [r for r in rows if r["client"] == client]
        names = [r["name"] for r in mine]
        colours = [COLOURS.get(r["role"], "#999999") for r in mine]
        for ax, key, label in (
            (row_axes[0], "per_cpu_second", "requests per server CPU-second (higher is better)"),
            (row_axes[1], "p99_ms", "p99 latency, ms (lower is better)"),
        ):
            ax.barh(names, [r[key] for r in mine], color=colours)
            ax.invert_yaxis()
            ax.set_title(f"{label} [{client}]", fontsize=9)
            ax.tick_params(labelsize=8)
        row_axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
