"""RELOAD=true (the development loop): a saved change is served by new workers in seconds.

A real gunicorn master with two uvicorn workers serves a throw-away app package in a temp
directory (the repository is never edited). The test client asks every 50 ms through the
whole edit: every answer is the old code's until the new code answers, never a 5xx. A
typo mid-edit must not stop the server: it answers 503 naming the error until the next
save fixes it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.integration.conftest import Server, start_server

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

pytestmark = pytest.mark.integration

APP = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({{"type": message["type"] + ".complete"}})
            if message["type"] == "lifespan.shutdown":
                return
    body = b"{version}"
    await send({{"type": "http.response.start", "status": 200, "headers": []}})
    await send({{"type": "http.response.body", "body": body}})
"""
SETTLE_S = 1.5  # the watcher's first scan (server/reloader.py polls every 0.5 s)
WITHIN_S = 20  # bound on one change reaching the client (the test fails beyond it)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("devapp")
    (root / "devapp").mkdir()
    (root / "devapp" / "__init__.py").write_text("")
    (root / "devapp" / "main.py").write_text(APP.format(version="one"))
    return root


@pytest.fixture(scope="module")
def reloading(package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("reload"),
        APP_MODULE="devapp.main:app",
        RELOAD="true",
        PYTHONPATH=str(package),
        PYTHONDONTWRITEBYTECODE="1",  # as in the image; no stale bytecode within a second
    )
    try:
        srv.wait_ready(workers=2)
        time.sleep(SETTLE_S)
        yield srv
    finally:
        srv.stop()


def until(
    server: Server,
    done: Callable[[httpx.Response], bool],
    allowed: Callable[[httpx.Response], bool],
) -> tuple[httpx.Response, float, int]:
    """Ask every 50 ms until an answer is `done`; every answer before must be `allowed`
    (no other status, no 5xx). Returns that answer, the seconds it took, the requests.

    A request the closing old worker drops at the socket (HTTP/1.1's keep-alive close race)
    is asked again: nginx does that in the stack, and the dev stack's e2e test holds the
    path through nginx to zero failures (tests/e2e/test_dev_loop.py)."""
    start = time.monotonic()
    asked = 0
    with httpx.Client(base_url=server.url, timeout=5) as client:
        while time.monotonic() - start < WITHIN_S:
            asked += 1
            try:
                response = client.get("/")
            except httpx.TransportError:
                continue
            if done(response):
                return response, time.monotonic() - start, asked
            assert allowed(response), (
                f"unexpected answer during the reload: {response.status_code} {response.text}"
            )
            time.sleep(0.05)
    raise AssertionError(f"no expected answer within {WITHIN_S}s:\n{server.tail()}")


def serves(text: str) -> Callable[[httpx.Response], bool]:
    return lambda r: (r.status_code, r.text) == (200, text)


def test_a_saved_change_is_served_by_new_workers(reloading: Server, package: Path) -> None:
    assert httpx.get(reloading.url).text == "one"
    pids = reloading.worker_pids()
    (package / "devapp" / "main.py").write_text(APP.format(version="two"))
    _, seconds, asked = until(reloading, serves("two"), allowed=serves("one"))
    print(f"reload: new code served after {seconds:.2f} s, {asked} requests")
    changed = [
        r for r in reloading.records() if r["event"] == "code changed: reloading the workers"
    ]
    assert changed, reloading.tail()
    assert any(str(f).endswith("devapp/main.py") for f in changed[-1]["files"])  # type: ignore[union-attr]
    reloading.wait_ready(workers=2)
    assert reloading.worker_pids().isdisjoint(pids), "the old workers are still serving"


def test_a_typo_answers_503_naming_it_until_fixed(reloading: Server, package: Path) -> None:
    main = package / "devapp" / "main.py"
    main.write_text(APP.format(version="three") + "\ndef broken(:\n")
    response, _, _ = until(reloading, lambda r: r.status_code == 503, allowed=serves("two"))
    body = response.json()
    assert body["detail"] == "the application failed to load"
    assert body["error"].startswith("SyntaxError"), body
    assert body["request_id"] == response.headers["x-request-id"]
    assert reloading.process.poll() is None, "the master stopped on a typo"

    main.write_text(APP.format(version="four"))
    until(reloading, serves("four"), allowed=lambda r: r.status_code == 503)


def test_reload_is_off_by_default_and_gunicorns_own_stays_off(server: Server) -> None:
    config = next(r for r in server.records() if r["event"] == "effective configuration")
    assert config["reload"] is False
    assert not any("RELOAD is on" in str(r["event"]) for r in server.records())
