"""`make dev`: the same stack from a checkout; a saved change reaches the browser in seconds.

The dev stack runs from a temporary copy of the repository (the files the images and
compose read), started the way `make dev` starts it, `-f docker-compose.yml -f
compose.dev.yml`, so the test edits files of the copy and never the repository. Through
nginx over verified HTTPS, with paced GET+POST traffic running:
- a change to app/main.py is served by new workers, no request of the traffic failing;
- a change to app/static/ is served by nginx on the next request;
- the containers keep production's hardening (read-only root, no capabilities), and the
  app logs for humans.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from traffic import PacedTraffic

if TYPE_CHECKING:
    from conftest import Stack, StackFactory

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
# What the compose files, the Dockerfiles and .dockerignore read: the rest is not copied.
CHECKOUT = (
    "docker-compose.yml",
    "compose.dev.yml",
    "Dockerfile",
    ".dockerignore",
    "app",
    "server",
    "nginx",
    "requirements",
    ".cache/wheelhouse",
)
WITHIN_S = 30  # bound on a change reaching the client; measured values are printed


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for name in CHECKOUT:
        source, target = ROOT / name, root / name
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return root


@pytest.fixture(scope="module")
def dev_stack(stack_factory: StackFactory, checkout: Path) -> Stack:
    files = (checkout / "docker-compose.yml", checkout / "compose.dev.yml")
    return stack_factory.up("dev", files=files)


def wait_for(stack: Stack, path: str, text: str) -> float:
    """Seconds until GET `path` through nginx answers 200 containing `text`."""
    start = time.monotonic()
    with stack.client() as client:
        while time.monotonic() - start < WITHIN_S:
            response = client.get(path)
            if response.status_code == 200 and text in response.text:
                return time.monotonic() - start
            time.sleep(0.1)
    raise AssertionError(f"{text!r} not served at {path} within {WITHIN_S}s")


def test_the_dev_stack_keeps_production_hardening(dev_stack: Stack, checkout: Path) -> None:
    for service in ("app", "nginx"):
        host = dev_stack.inspect(service)["HostConfig"]
        assert host["ReadonlyRootfs"] is True, service
        assert host["CapDrop"] == ["ALL"], service
    mounts = {m["Destination"]: m for m in dev_stack.inspect("app")["Mounts"]}
    assert Path(mounts["/app/app"]["Source"]) == checkout / "app"
    assert mounts["/app/app"]["RW"] is False
    assert dev_stack.environment("app")["RELOAD"] == "true"
    # Console lines for humans, not JSON objects.
    lines = dev_stack.logs("app")
    assert any("RELOAD is on" in line for line in lines), lines[-20:]
    starts = [line for line in lines if "effective configuration" in line]
    assert starts, lines[-20:]
    with pytest.raises(json.JSONDecodeError):
        json.loads(starts[0])


def test_a_saved_app_change_reaches_the_client_and_fails_no_request(
    dev_stack: Stack, checkout: Path, e2e_summary: list[str]
) -> None:
    main = checkout / "app" / "main.py"
    before = '{"message": "hello", "service": "example"}'
    assert before in main.read_text()
    with dev_stack.client() as client:
        assert client.get("/api/hello").json()["message"] == "hello"

    with PacedTraffic(dev_stack.client, duration=WITHIN_S + 10, max_requests=600) as traffic:
        time.sleep(2)
        main.write_text(main.read_text().replace(before, before.replace("hello", "edited")))
        seconds = wait_for(dev_stack, "/api/hello", '"message":"edited"')
        time.sleep(2)  # traffic after the switch, on the new workers
    e2e_summary.append(f"dev loop: app/main.py change served after {seconds:.1f} s")
    print(f"dev: change served after {seconds:.1f} s; traffic: {traffic.summary()}")

    assert traffic.failures == [], traffic.summary()
    assert len(traffic.succeeded) >= 30, traffic.summary()
    changed = [line for line in dev_stack.logs("app") if "code changed" in line]
    assert any("main.py" in line for line in changed), changed


def test_a_saved_static_change_is_served_by_nginx(
    dev_stack: Stack, checkout: Path, e2e_summary: list[str]
) -> None:
    page = checkout / "app" / "static" / "index.html"
    page.write_text(page.read_text().replace("<title>Example service", "<title>Edited service"))
    seconds = wait_for(dev_stack, "/", "<title>Edited service")
    e2e_summary.append(f"dev loop: app/static change served after {seconds:.1f} s")
