"""Every log record renders as one JSON line with the same core keys."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[2]

EMIT = textwrap.dedent(
    """
    import logging, warnings
    import structlog
    from server.logs import configure_logging, get_logger

    configure_logging("info", "{fmt}")
    structlog.contextvars.bind_contextvars(request_id="rid-123")
    logging.getLogger("gunicorn.error").info("Booting worker with pid: %s", 42)
    logging.getLogger("uvicorn.error").info("Started server process [%d]", 42,
                                            extra={{"color_message": "coloured"}})
    logging.getLogger("app").warning("order created", extra={{"order_id": 7}})
    get_logger("server.access").info("request", method="GET", status=200)
    try:
        raise ValueError("bad\\nvalue")
    except ValueError:
        logging.getLogger("app").exception("stdlib failure")
        get_logger("server.errors").exception("structlog failure")
    logging.getLogger("uvicorn.access").info("must not appear")
    logging.getLogger("gunicorn.access").info("must not appear")
    logging.getLogger("app").debug("below the level")
    warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
    """
)


def _run(fmt: str) -> list[bytes]:
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", EMIT.format(fmt=fmt)],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    )
    assert result.stderr == b""
    return result.stdout.splitlines()


def test_every_record_is_one_json_line_with_the_core_keys() -> None:
    lines = _run("json")
    records = [orjson.loads(line) for line in lines]
    events = [r["event"] for r in records]
    assert events[:6] == [
        "Booting worker with pid: 42",
        "Started server process [42]",
        "order created",
        "request",
        "stdlib failure",
        "structlog failure",
    ]
    assert len(records) == 7  # the six above and the captured warning
    for record in records:
        assert {"timestamp", "level", "logger", "event", "pid", "request_id"} <= record.keys()
        assert record["request_id"] == "rid-123"
        assert record["timestamp"].endswith("Z")
        assert "color_message" not in record
    by_event = {r["event"]: r for r in records}
    assert by_event["Booting worker with pid: 42"]["logger"] == "gunicorn.error"
    assert by_event["order created"]["order_id"] == 7
    assert by_event["order created"]["level"] == "warning"
    assert by_event["request"]["logger"] == "server.access"
    assert by_event["request"]["status"] == 200
    for event in ("stdlib failure", "structlog failure"):
        exception = by_event[event]["exception"]
        assert exception[0]["exc_type"] == "ValueError"
        assert exception[0]["exc_value"] == "bad\nvalue"
        assert exception[0]["frames"]
        assert "locals" not in exception[0]["frames"][0]
    assert records[-1]["logger"] == "py.warnings"


def test_console_format_is_for_humans() -> None:
    lines = _run("console")
    text = b"\n".join(lines).decode()
    assert "order created" in text
    assert "Traceback" in text or "ValueError" in text
    assert not text.lstrip().startswith("{")


BATCH = textwrap.dedent(
    """
    import asyncio, structlog
    from server.logs import configure_logging, log_access

    configure_logging("info", "json")

    async def main():
        for i in range(300):  # one turn of the loop: the lines go out in batches
            structlog.contextvars.bind_contextvars(request_id=f"r{i}")
            log_access({"method": "GET", "path": "/x" * 20, "status": 200, "n": i})
        await asyncio.sleep(0)

    asyncio.run(main())
    log_access({"method": "GET", "path": "/after-loop", "status": 204, "n": 300})
    """
)


def test_access_lines_are_batched_as_whole_lines() -> None:
    traced = subprocess.run(
        ["strace", "-f", "-e", "trace=write", "-o", "/dev/stderr", sys.executable, "-c", BATCH]
        if shutil.which("strace")
        else [sys.executable, "-c", BATCH],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    )
    records = [orjson.loads(line) for line in traced.stdout.splitlines()]
    assert [r["n"] for r in records] == list(range(301))
    assert [r["request_id"] for r in records[:300]] == [f"r{i}" for i in range(300)]
    if shutil.which("strace"):
        writes = [line for line in traced.stderr.decode().splitlines() if "write(1," in line]
        assert len(writes) < 100  # batched: far fewer writes than lines
        sizes = [int(line.rsplit("=", 1)[1]) for line in writes]
        assert max(sizes) <= 4096  # each write stays atomic on a pipe
