"""A test receiver inside a stack's networks: Alertmanager's webhook and OTLP/HTTP traces.

A container of the stack's own app image (present wherever the stack was built, nothing to
pull) runs a small stdlib HTTP server that answers every POST with 200 and prints it as one
JSON line (path, content type and encoding, body in base64); the test reads `docker logs`.
It joins the stack's `monitoring` network (Alertmanager) and `backend` (the app) under the
alias `receiver`, so the stack's settings can name it before it exists:
ALERTMANAGER_WEBHOOK_URL=http://receiver:9099/alerts, OTEL_EXPORTER_OTLP_ENDPOINT=
http://receiver:9099. It is started and removed by container id, never by name pattern.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tests.e2e.conftest import run

if TYPE_CHECKING:
    from collections.abc import Callable

    from tests.e2e.conftest import Stack

PORT = 9099
URL = f"http://receiver:{PORT}"

_SERVER = f"""
import base64, http.server, json

class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        print(json.dumps({{
            "path": self.path,
            "content_type": self.headers.get("content-type"),
            "content_encoding": self.headers.get("content-encoding"),
            "body": base64.b64encode(body).decode(),
        }}), flush=True)
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.ThreadingHTTPServer(("0.0.0.0", {PORT}), Handler).serve_forever()
"""


@dataclass
class Received:
    path: str
    content_type: str | None
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    container: str

    @classmethod
    def start(cls, stack: Stack) -> Receiver:
        image = stack.inspect("app")["Config"]["Image"]
        container = run(
            [
                "docker",
                "run",
                "-d",
                "--read-only",
                "--cap-drop",
                "ALL",
                "--security-opt",
                "no-new-privileges",
                "--memory",
                "64m",
                "--network",
                f"{stack.project}_monitoring",
                "--network-alias",
                "receiver",
                "--entrypoint",
                "python",
                image,
                "-c",
                _SERVER,
            ]
        ).stdout.strip()
        run(
            [
                "docker",
                "network",
                "connect",
                "--alias",
                "receiver",
                f"{stack.project}_backend",
                container,
            ]
        )
        return cls(container)

    def received(self) -> list[Received]:
        out = run(["docker", "logs", self.container]).stdout
        found = []
        for line in out.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            body = base64.b64decode(record["body"])
            if record.get("content_encoding") == "gzip":
                body = gzip.decompress(body)
            found.append(Received(record["path"], record["content_type"], body))
        return found

    def wait_for(
        self, match: Callable[[Received], bool], timeout: float, what: str
    ) -> list[Received]:
        deadline = time.monotonic() + timeout
        while True:
            found = [r for r in self.received() if match(r)]
            if found:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout:.0f}s")
            time.sleep(1)

    def stop(self) -> None:
        run(["docker", "rm", "-f", self.container], check=False)
