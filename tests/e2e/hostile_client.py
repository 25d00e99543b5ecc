"""One hostile client, run inside a container on the stack's edge network (its own address).

Standard library only: tests/e2e/test_hostile_clients.py mounts this file into the app
image and runs it there, with the stack's certificate mounted at /certs. Every attack is bounded in
connections and seconds, and prints one JSON object with what the attacker saw:

  uploads N SIZE           N concurrent POST /api/orders of SIZE bytes each: all N
                           connections open first, then all send; "early": answers the app
                           gave before the last of them was sent (their slot was free again)
  slow LORIS BODIES HOLD   LORIS connections trickling their headers (slowloris on the
                           HTTP port, reopened whenever nginx cuts one) and BODIES
                           requests (HTTPS) trickling their
                           bodies (slow POST), for HOLD seconds; with "open", how many
                           slowloris connections were open, sampled every SAMPLE_S
                           ([time.monotonic(), count]: the host's clock, one kernel)
"""

from __future__ import annotations

import asyncio
import functools
import json
import ssl
import sys
import time
from collections import Counter

HOST, PORT, NAME = "nginx", 8443, "localhost"
PLAIN_PORT = 8080  # nginx's HTTP listener: the same worker connection slots as 8443
TRICKLE_S = 4.0  # under nginx's client_header_timeout / client_body_timeout (10 s)
SAMPLE_S = 0.5


@functools.cache
def context() -> ssl.SSLContext:
    """One for all connections: loading the CA file for each cost the attack its pace."""
    return ssl.create_default_context(cafile="/certs/fullchain.pem")


async def open_tls() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(HOST, PORT, ssl=context(), server_hostname=NAME), 30
    )


async def read_response(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict]:
    """Status and JSON body (or {}) of one HTTP/1.1 response."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:])}
    body = b""
    if "content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), timeout)
    try:
        parsed = json.loads(body) if body else {}
    except ValueError:
        parsed = {"not_json": body[:100].decode("latin-1")}
    if "x-request-id" in headers and isinstance(parsed, dict):
        parsed["header_request_id"] = headers["x-request-id"]
    return status, parsed


def shape_ok(status: int, body: dict) -> bool:
    """nginx's own answers (429, 5xx) must be {"detail", "request_id"} with the header's id;
    the app's (201, 422) are the app's business."""
    if status != 429 and status < 500:
        return True
    return set(body) == {"detail", "request_id", "header_request_id"} and (
        body["request_id"] == body["header_request_id"]
    )


async def upload(size: int, connected: asyncio.Barrier, times: dict) -> tuple[str, bool]:
    try:
        reader, writer = await open_tls()
    except (TimeoutError, OSError) as exc:
        await connected.wait()
        return f"connect: {type(exc).__name__}", True
    await connected.wait()  # all at once, as far as one client can
    filler = size - len(b'{"item_id": 1, "quantity": 1, "note": ""}')
    body = b'{"item_id": 1, "quantity": 1, "note": "' + b"x" * filler + b'"}'
    head = (
        f"POST /api/orders HTTP/1.1\r\nHost: {NAME}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        times["last sent"] = max(times.get("last sent", 0.0), time.monotonic())
        status, parsed = await read_response(reader, 60)
        if status != 429:
            times.setdefault("answered", []).append(time.monotonic())
        return str(status), shape_ok(status, parsed)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return f"no answer: {type(exc).__name__}", True
    finally:
        writer.close()


async def uploads(count: int, size: int) -> dict:
    connected = asyncio.Barrier(count)
    times: dict = {}
    results = await asyncio.gather(*(upload(size, connected, times) for _ in range(count)))
    return {
        "statuses": dict(Counter(status for status, _ in results)),
        "early": sum(1 for t in times.get("answered", []) if t < times.get("last sent", 0.0)),
        "bad_shape": sum(1 for _, ok in results if not ok),
    }


async def slowloris(hold: float, stats: Counter, open_now: list[int]) -> None:
    """Keep one slow-header connection open for `hold` seconds: nginx cuts a header that
    takes longer than client_header_timeout, so reconnect each time it does. On the plain
    HTTP port: worker_connections counts every listener's connections alike, and without
    TLS handshakes the attack holds its count on a loaded machine (with them, 2,700 at once
    timed out connecting: the attacker's strength was the machine's load, not its own)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + hold
    while loop.time() < end:
        try:
            _reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, PLAIN_PORT), 30)
        except (TimeoutError, OSError) as exc:
            stats[f"loris connect: {type(exc).__name__}"] += 1
            await asyncio.sleep(1)
            continue
        stats["loris connections"] += 1
        open_now[0] += 1
        open_now[1] = max(open_now[1], open_now[0])
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {NAME}\r\n".encode())
            while loop.time() < end:
                await asyncio.sleep(TRICKLE_S)
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
        except OSError:
            stats["loris cut by nginx"] += 1
        finally:
            open_now[0] -= 1
            writer.close()


async def slow_body(hold: float, stats: Counter, shapes: list[bool]) -> None:
    try:
        reader, writer = await open_tls()
    except (TimeoutError, OSError) as exc:
        stats[f"body connect: {type(exc).__name__}"] += 1
        return
    head = (
        f"POST /api/orders HTTP/1.1\r\nHost: {NAME}\r\nContent-Type: application/json\r\n"
        "Content-Length: 100000\r\n\r\n"
    )
    try:
        writer.write(head.encode())
        await writer.drain()
        loop = asyncio.get_running_loop()
        end = loop.time() + hold
        while loop.time() < end:
            try:  # answered before the body was sent (a limit): record it and stop
                status, parsed = await read_response(reader, TRICKLE_S)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            stats[str(status)] += 1
            shapes.append(shape_ok(status, parsed))
            return
        stats["body held"] += 1
    except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
        stats[f"body dropped: {type(exc).__name__}"] += 1
    finally:
        writer.close()


async def sample(open_now: list[int], samples: list[list[float]], done: asyncio.Event) -> None:
    while not done.is_set():
        samples.append([round(time.monotonic(), 3), open_now[0]])
        await asyncio.sleep(SAMPLE_S)


async def slow(loris: int, bodies: int, hold: float) -> dict:
    stats: Counter = Counter()
    shapes: list[bool] = []
    open_now = [0, 0]  # slowloris connections open now, and the most at once
    samples: list[list[float]] = []
    done = asyncio.Event()
    sampler = asyncio.create_task(sample(open_now, samples, done))
    tasks = [slowloris(hold, stats, open_now) for _ in range(loris)]
    tasks += [slow_body(hold, stats, shapes) for _ in range(bodies)]
    await asyncio.gather(*tasks)
    done.set()
    await sampler
    samples.append([round(time.monotonic(), 3), open_now[0]])  # all closed: 0
    stats["loris peak"] = open_now[1]
    return {"statuses": dict(stats), "bad_shape": shapes.count(False), "open": samples}


def main(argv: list[str]) -> None:
    mode, *args = argv
    if mode == "uploads":
        result = asyncio.run(uploads(int(args[0]), int(args[1])))
    elif mode == "slow":
        result = asyncio.run(slow(int(args[0]), int(args[1]), float(args[2])))
    else:
        raise SystemExit(f"unknown attack {mode!r}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
