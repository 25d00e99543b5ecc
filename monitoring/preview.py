"""Render a PNG preview of the Grafana dashboard's main panels from a live Prometheus.

Grafana is the real UI (monitoring/grafana/dashboards/asgi-service.json). This picture is
for the README, and for machines where Grafana cannot run: it asks Prometheus the same
queries as the dashboard's panels, over the last minutes, and draws them with matplotlib.

    make dashboard-preview            # PROMETHEUS_URL (default http://127.0.0.1:9090)
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "asgi-service.json"
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval becomes at a 10 s scrape interval
PANELS = (  # titles of the dashboard's panels, drawn in this order on a 3 x 2 grid
    "Requests by status",
    "Latency p50 / p95 / p99",
    "Request rate by route",
    "Workers and in-flight requests",
    "CPU by role",
    "nginx connections",
)


def _panels() -> dict[str, list[tuple[str, str]]]:
    """Title -> [(legend, expr)] of every panel with targets in the dashboard."""
    found: dict[str, list[tuple[str, str]]] = {}

    def walk(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))  # type: ignore[arg-type]
            targets = panel.get("targets") or []
            exprs = [
                (str(t.get("legendFormat", "")), str(t["expr"]))
                for t in targets  # type: ignore[union-attr]
                if isinstance(t, dict) and t.get("expr")
            ]
            if exprs:
                found[str(panel.get("title", ""))] = exprs

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def _query_range(base: str, expr: str, start: float, end: float) -> list[dict[str, object]]:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", "10s")
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": 5})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=10) as response:  # noqa: S310 - a URL we were given
        body = json.load(response)
    return list(body["data"]["result"])


def _legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value).replace("{{ " + key + " }}", value)
    return text or ",".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def main() -> int:
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt

    base = os.environ.get("PROMETHEUS_URL", "http://127.0.0.1:9090").rstrip("/")
    minutes = float(os.environ.get("PREVIEW_MINUTES", "6"))
    out = Path(os.environ.get("PREVIEW_OUT", "docs/dashboard.png"))
    end = time.time()
    start = end - minutes * 60
    panels = _panels()
    missing = [title for title in PANELS if title not in panels]
    if missing:
        print(f"not in the dashboard: {missing}; it has {sorted(panels)}", file=sys.stderr)
        return 2

    fig, axes = plt.subplots(3, 2, figsize=(14, 10), constrained_layout=True)
    fig.suptitle(f"ASGI service: {minutes:g} minutes from Prometheus ({base})", fontsize=13)
    for axis, title in zip(axes.flat, PANELS, strict=True):
        for legend, expr in panels[title]:
            for series in _query_range(base, expr, start, end):
                points = series["values"]  # type: ignore[index]
                xs = [(float(t) - end) / 60 for t, _ in points]
                ys = [float(v) for _, v in points]
                axis.plot(xs, ys, label=_legend(legend, series["metric"]))  # type: ignore[arg-type]
        axis.set_title(title)
        axis.set_xlabel("minutes ago")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=7, loc="upper left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
