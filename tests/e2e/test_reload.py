"""`make reload` under a stream of requests: nginx and gunicorn reload, nobody notices.

SIGHUP to nginx starts new workers with the re-read config and lets the old ones finish;
SIGHUP to the gunicorn master boots new workers and stops the old ones gracefully. A
bounded stream of reads and writes through nginx runs across both reloads; every request
must succeed. The stream is paced under the rate limit (the host is not on this stack's
allow-list), so the only failures it could see are the reload's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest
from traffic import PacedTraffic

if TYPE_CHECKING:
    from conftest import Stack

pytestmark = pytest.mark.e2e

DURATION = 14.0  # seconds of traffic; the reload happens 3 s in
MAX_REQUESTS = 300


def _booted_workers(stack: Stack) -> int:
    return sum(
        1 for r in stack.records("app") if str(r.get("event", "")).startswith("Booting worker")
    )


def test_make_reload_under_traffic_fails_no_request(stack: Stack) -> None:
    nginx_before = stack.nginx_worker_pids()
    booted_before = _booted_workers(stack)
    assert nginx_before, "no nginx worker process found"

    with PacedTraffic(
        stack.client, duration=DURATION, max_requests=MAX_REQUESTS, retry_unanswered=True
    ) as traffic:
        time.sleep(3)
        reload = stack.make("reload")
        time.sleep(DURATION - 3)
    assert reload.returncode == 0, reload.stdout + reload.stderr

    assert traffic.lost(stack.nginx_request_ids()) == [], traffic.summary()
    assert len(traffic.succeeded) >= 50, traffic.summary()

    # Both really reloaded: new nginx workers, and gunicorn booted a new set of workers.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if stack.nginx_worker_pids().isdisjoint(nginx_before) and (
            _booted_workers(stack) >= booted_before + 2
        ):
            break
        time.sleep(0.5)
    assert stack.nginx_worker_pids().isdisjoint(nginx_before), "nginx workers were not replaced"
    assert _booted_workers(stack) >= booted_before + 2, "gunicorn booted no new workers"
    for record in stack.records("app")[-200:]:
        assert record.get("level") not in ("error", "critical"), record
