"""The locustfile loads in Locust, exposes its options, and finds the fingerprinted assets.

Run in subprocesses: importing Locust monkey-patches the interpreter with gevent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from loadtests.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "loadtests" / "locustfile.py"


def run_python(script: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "loadtests",
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def test_locust_accepts_the_locustfile_and_its_options() -> None:
    """Unknown options would make Locust's parser exit non-zero before listing the users."""
    options = ["--ca-file", "/tmp/ca.pem", "--max-requests", "5", "--time-limit", "1m30s"]
    options += ["--wait-min", "0", "--wait-max", "0.1", "--slow-seconds", "0.2"]
    listed = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), *options, "--list"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "ShopUser" in listed


def test_assets_are_discovered_from_the_real_index_html() -> None:
    index = (ROOT / "app" / "static" / "index.html").read_text()
    out = run_python(
        "import json, locustfile, pathlib\n"
        f"html = pathlib.Path({str(ROOT / 'app/static/index.html')!r}).read_text()\n"
        "print(json.dumps(locustfile.discover_assets(html)))"
    )
    assets = json.loads(out.strip().splitlines()[-1])
    assert len(assets["css"]) == 1
    assert len(assets["js"]) == 1
    for path in assets["css"] + assets["js"]:
        assert path in index
        assert (ROOT / "app" / path.lstrip("/")).is_file()


def test_asset_names_hide_the_fingerprint() -> None:
    out = run_python(
        "import locustfile\n"
        "print(locustfile._asset_name('/static/css/app.3e0e405652.css'),"
        " locustfile._asset_name('/static/js/app.1.js'), locustfile._asset_name('/static/x.svg'))"
    )
    assert out.split() == ["/static/css/{asset}", "/static/js/{asset}", "/static/{asset}"]


def test_option_defaults_come_from_the_one_loader() -> None:
    """A plain `locust -f` run gets slo.toml's values (and LOADTEST_* overrides), parsed by
    loadtests.settings: no second set of defaults, no second reading of the environment."""
    script = (
        "import json\n"
        "import loadtests.locustfile\n"
        "from locust.argument_parser import parse_options\n"
        f"opts = parse_options(['-f', {str(LOCUSTFILE)!r}])\n"
        "print(json.dumps({k: getattr(opts, k) for k in "
        "('time_limit', 'max_requests', 'wait_min', 'wait_max', 'slow_seconds')}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADTEST_")}
    defaults = json.loads(_python_out(script, env).strip().splitlines()[-1])
    run = load_settings(env={}).run
    assert defaults == {
        "time_limit": run.duration_s,
        "max_requests": run.max_requests,
        "wait_min": run.wait_min,
        "wait_max": run.wait_max,
        "slow_seconds": run.slow_seconds,
    }
    overridden = json.loads(
        _python_out(script, {**env, "LOADTEST_DURATION": "1m30s"}).strip().splitlines()[-1]
    )
    assert overridden["time_limit"] == 90


def _python_out(script: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
