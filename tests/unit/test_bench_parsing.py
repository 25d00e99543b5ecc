"""`make bench`'s parsing of wrk's output and of py-spy's collapsed stacks."""

from __future__ import annotations

import pytest

from bench.load import OutputError, parse_wrk
from bench.profile import ProfileError, analyse_profile

WRK = """\
Running 10s test @ http://127.0.0.1:41234/api/hello
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.12ms    2.01ms  41.30ms   90.11%
    Req/Sec     5.27k   311.22     5.81k    71.00%
  Latency Distribution
     50%    5.71ms
     75%    6.50ms
     90%    7.80ms
     99%   12.40ms
  52431 requests in 10.01s, 8.40MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   5238.01
Transfer/sec:    859.31KB
"""


def test_wrk_output_is_read() -> None:
    rps, p50, p99, requests, errors = parse_wrk(WRK)
    assert rps == pytest.approx(5238.01)
    assert p50 == pytest.approx(5.71)
    assert p99 == pytest.approx(12.40)
    assert requests == 52431
    assert errors == 4 + 3


def test_wrk_latency_units() -> None:
    out = WRK.replace("5.71ms", "850.00us").replace("12.40ms", "1.20s")
    _, p50, p99, _, _ = parse_wrk(out)
    assert p50 == pytest.approx(0.85)
    assert p99 == pytest.approx(1200)


def frames(*names: str) -> str:
    return ";".join(names)


UVICORN = "run (uvicorn/protocols/http/httptools_impl.py:400)"
PROXY = "ProxyHeadersMiddleware.__call__ (uvicorn/middleware/proxy_headers.py:60)"
HEALTH = "HealthMiddleware.__call__ (server/health.py:48)"
OBS = "ObservabilityMiddleware.__call__ (server/middleware.py:90)"
APP = "FastAPI.__call__ (fastapi/applications.py:1224)"
PROFILE = "\n".join(
    [
        f"{frames(UVICORN, 'data_received (uvicorn/protocols/http/httptools_impl.py:10)')} 40",
        f"{frames(UVICORN, PROXY)} 2",
        f"{frames(UVICORN, PROXY, HEALTH)} 3",
        f"{frames(UVICORN, PROXY, HEALTH, OBS)} 5",
        f"{frames(UVICORN, PROXY, HEALTH, OBS, 'log_access (server/logs.py:230)')} 6",
        f"{frames(UVICORN, PROXY, HEALTH, OBS, 'log_access (server/logs.py:230)', '_write_line (server/logs.py:50)')} 4",  # noqa: E501
        f"{frames(UVICORN, PROXY, HEALTH, OBS, 'HttpMetrics.observe (server/metrics.py:112)')} 2",
        f"{frames(UVICORN, PROXY, HEALTH, OBS, APP)} 38",
    ]
)


def test_profile_attributes_each_layer_its_own_share() -> None:
    report = analyse_profile(PROFILE)
    assert "100 samples" in report
    assert (
        "| uvicorn: HTTP parsing, event loop, transport (outside the ASGI app) | 40.0% |" in report
    )
    assert "| uvicorn ProxyHeadersMiddleware (X-Forwarded-*) | 2.0% |" in report
    assert "| server.health.HealthMiddleware | 3.0% |" in report
    assert "| server.middleware.ObservabilityMiddleware | 17.0% |" in report
    assert "| the app: FastAPI + Starlette, incl. writing the response | 38.0% |" in report
    assert "| access line: log_access (render + queue) | 10.0% |" in report
    assert "|   of which the write(2) of a batch | 4.0% |" in report
    assert "| metrics: HttpMetrics.started + observe | 2.0% |" in report


def test_wrk_output_without_latency_percentiles_is_an_error() -> None:
    without = "\n".join(line for line in WRK.splitlines() if "%" not in line or "Stdev" in line)
    with pytest.raises(OutputError, match="50% latency"):
        parse_wrk(without)


def test_unreadable_latency_unit_is_an_error() -> None:
    with pytest.raises(OutputError, match=r"12\.40min"):
        parse_wrk(WRK.replace("12.40ms", "12.40min"))


def test_profile_without_a_layer_fails_loudly() -> None:
    # As if HealthMiddleware's __call__ had been renamed: no sample shows it any more.
    renamed = PROFILE.replace("HealthMiddleware.__call__", "HealthMiddleware.handle")
    with pytest.raises(ProfileError, match=r"server\.health\.HealthMiddleware"):
        analyse_profile(renamed)


def test_profile_matches_the_file_as_well_as_the_name() -> None:
    # A __call__ of the same class name in another file is not our middleware.
    moved = PROFILE.replace("(server/middleware.py:90)", "(elsewhere/middleware.py:90)")
    with pytest.raises(ProfileError, match="ObservabilityMiddleware"):
        analyse_profile(moved)


def test_empty_profile_is_an_error() -> None:
    with pytest.raises(ProfileError, match="no samples"):
        analyse_profile("")
