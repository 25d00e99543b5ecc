"""The serving layer's middleware around the example app, in-process (httpx + ASGI)."""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator

import httpx
import pytest

from app.main import app as example_app
from server.asgi import wrap
from server.health import HealthMiddleware, ServerState
from server.metrics import HttpMetrics


@pytest.fixture
def metrics() -> HttpMetrics:
    return HttpMetrics()


@pytest.fixture
async def client(metrics: HttpMetrics) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=wrap(example_app, metrics))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


def _value(metrics: HttpMetrics, name: str, **labels: str) -> float:
    metrics.flush()
    value = metrics.registry.get_sample_value(name, labels) if metrics.registry else None
    return value or 0.0


@pytest.mark.anyio
async def test_routes_are_labelled_by_template(
    client: httpx.AsyncClient, metrics: HttpMetrics
) -> None:
    for item_id in (1, 2, 3, 999):
        await client.get(f"/api/items/{item_id}")
    assert (
        _value(
            metrics,
            "http_requests_total",
            method="GET",
            route="/api/items/{item_id}",
            status="200",
        )
        == 3
    )
    assert (
        _value(
            metrics,
            "http_requests_total",
            method="GET",
            route="/api/items/{item_id}",
            status="404",
        )
        == 1
    )
    await client.get("/wp-login.php")
    await client.get("/.env")
    assert (
        _value(metrics, "http_requests_total", method="GET", route="<unmatched>", status="404") == 2
    )
    await client.request("BREW", "/api/hello")
    assert (
        _value(metrics, "http_requests_total", method="OTHER", route="/api/hello", status="405")
        == 1
    )
    assert _value(metrics, "http_requests_in_progress") == 0
    count = _value(
        metrics, "http_request_duration_seconds_count", method="GET", route="/api/items/{item_id}"
    )
    assert count == 4


@pytest.mark.anyio
async def test_request_id_accepted_generated_and_seen_by_the_app(
    client: httpx.AsyncClient,
) -> None:
    kept = await client.get("/api/boom", headers={"X-Request-ID": "abc.DEF_123-x"})
    assert kept.status_code == 500
    assert kept.headers["x-request-id"] == "abc.DEF_123-x"
    # The app's error handler read the same id from its request headers.
    assert kept.json() == {"detail": "internal server error", "request_id": "abc.DEF_123-x"}

    replaced = await client.get("/api/boom", headers={"X-Request-ID": "no spaces allowed"})
    assert re.fullmatch(r"[0-9a-f]{32}", replaced.headers["x-request-id"])
    assert replaced.json()["request_id"] == replaced.headers["x-request-id"]


@pytest.mark.anyio
async def test_unhandled_exception_in_a_bare_asgi_app_gets_a_json_500(
    metrics: HttpMetrics,
) -> None:
    async def broken(scope, receive, send):  # type: ignore[no-untyped-def]
        raise KeyError("secret-detail")

    transport = httpx.ASGITransport(app=wrap(broken, metrics), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        response = await c.get("/anything")
    assert response.status_code == 500
    assert "secret-detail" not in response.text
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert _value(metrics, "http_requests_total", method="GET", route="<unmatched>", status="500")


@pytest.mark.anyio
async def test_validation_errors_are_422_with_fields(client: httpx.AsyncClient) -> None:
    response = await client.post("/api/orders", json={"item_id": "x", "quantity": 0})
    assert response.status_code == 422
    locs = {tuple(e["loc"]) for e in response.json()["detail"]}
    assert locs == {("body", "item_id"), ("body", "quantity")}
    assert (await client.get("/api/slow", params={"seconds": "forever"})).status_code == 422


async def _lifespan_app(scope, receive, send):  # type: ignore[no-untyped-def]
    assert scope["type"] == "lifespan"
    message = await receive()
    assert message["type"] == "lifespan.startup"
    await send({"type": "lifespan.startup.complete"})
    message = await receive()
    await send({"type": "lifespan.shutdown.complete"})


@pytest.mark.anyio
async def test_readiness_follows_the_lifespan() -> None:
    state = ServerState()
    app = HealthMiddleware(_lifespan_app, state)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/healthz")).status_code == 200
        starting = await c.get("/readyz")
        assert starting.status_code == 503
        assert starting.json() == {"status": "starting"}

        messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
        sent: list[dict[str, str]] = []

        async def receive():  # type: ignore[no-untyped-def]
            return next(messages)

        async def send(message):  # type: ignore[no-untyped-def]
            sent.append(message)
            if message["type"] == "lifespan.startup.complete":
                assert (await c.get("/readyz")).status_code == 200

        await app({"type": "lifespan"}, receive, send)
        assert [m["type"] for m in sent] == [
            "lifespan.startup.complete",
            "lifespan.shutdown.complete",
        ]
        stopping = await c.get("/readyz")
        assert stopping.status_code == 503
        assert stopping.json() == {"status": "stopping"}
        assert (await c.post("/healthz")).status_code == 405


@pytest.mark.anyio
async def test_draining_answers_readyz_503_while_alive() -> None:
    state = ServerState(started=True)
    app = HealthMiddleware(_lifespan_app, state)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        assert (await c.get("/readyz")).status_code == 200
        state.draining.set()
        draining = await c.get("/readyz")
        assert draining.status_code == 503
        assert draining.json() == {"status": "draining"}
        assert (await c.get("/healthz")).status_code == 200  # alive all the same
        state.draining.clear()
        assert (await c.get("/readyz")).status_code == 200


def test_the_drain_flag_is_shared_with_forked_children() -> None:
    state = ServerState(started=True)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a worker forked before the master starts to drain
        os.close(write)
        os.read(read, 1)  # until the parent has set the flag
        os._exit(0 if not state.ready and state.reason == "draining" else 1)
    os.close(read)
    state.draining.set()
    os.write(write, b"x")
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.anyio
async def test_latency_buckets_carry_the_trace_id_as_exemplar(
    client: httpx.AsyncClient, metrics: HttpMetrics
) -> None:
    from prometheus_client.openmetrics.exposition import generate_latest

    response = await client.get("/api/hello")
    trace_id = response.headers["traceparent"].split("-")[1]
    metrics.flush()
    assert metrics.registry is not None
    text = generate_latest(metrics.registry).decode()
    lines = [line for line in text.splitlines() if f'trace_id="{trace_id}"' in line]
    assert len(lines) == 1, text
    assert lines[0].startswith('http_request_duration_seconds_bucket{le="')
    assert 'route="/api/hello"' in lines[0]


@pytest.mark.anyio
async def test_http_metrics_off_serves_without_recording(metrics: HttpMetrics) -> None:
    # HTTP_METRICS=off: wrap() gets no metrics; requests keep their id and access line.
    transport = httpx.ASGITransport(app=wrap(example_app, None))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as off:
        response = await off.get("/api/hello")
    assert response.status_code == 200
    assert response.headers["x-request-id"]
    assert (
        _value(metrics, "http_requests_total", method="GET", route="/api/hello", status="200") == 0
    )


def test_http_metrics_setting_is_on_or_off() -> None:
    from server.settings import SettingsError, load_settings

    assert load_settings({"HTTP_METRICS": "OFF"}).http_metrics == "off"
    assert load_settings({}).http_metrics == "on"
    with pytest.raises(SettingsError, match="HTTP_METRICS='maybe' is invalid: expected on or off"):
        load_settings({"HTTP_METRICS": "maybe"})
