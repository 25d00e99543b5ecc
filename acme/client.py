"""The renewal loop: issue when missing, renew when a third of the lifetime is left.

One pass (`Renewer.step`) decides, acts and tells how long to sleep:

  1. Whose certificate is at TLS_CERT?  (`Renewer.ownership`; the precedence, README "TLS")
     - TLS_CERT/TLS_KEY outside nginx's certificate volume: files mounted by the operator.
     - a certificate this client did not install (not self-signed, fingerprint not in the
       volume's `.acme-installed`): put there by the operator.
     Either way the operator's certificate wins: the client requests nothing and checks again
     hourly. Missing or nginx's self-signed one: the client manages the files.
  2. lego's certificate in the state volume: none, or not covering SERVER_NAMES -> issue
     (`lego run`); a third of its lifetime or less left -> renew (`lego renew --reuse-key`,
     the key stays, so nginx's pair changes in one rename).
  3. Failure: one JSON line naming the cause (`acme_failed`, cause = the ACME error type,
     `ca_unreachable`, `ca_untrusted`, `timeout`...), the files nginx serves untouched, and a
     retry after a back-off that doubles (from lifetime/12, at most 2 min, up to lifetime/6,
     at most 1 h: Let's Encrypt allows 5 failed validations per name per hour).
  4. Success: the certificate and key are copied into TLS_CERT/TLS_KEY atomically (temp file,
     then rename; the fingerprint is recorded first). nginx's certificate watcher sees the new
     pair and reloads gracefully (nginx/README.md); this container never signals nginx.

The account and the certificates live in the state volume (LEGO_PATH), so a restart reuses
both: no new order until the renewal is due (CA rate limits are real).
Metrics on :9102/metrics (Prometheus text format, the `acme` job).
https://go-acme.github.io/lego/usage/cli/  https://letsencrypt.org/docs/rate-limits/
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acme.certificates import CertificateError, CertificateInfo, read_certificate
from acme.settings import CERT_DIR, EX_CONFIG, Settings, SettingsError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["Attempt", "Metrics", "Renewer", "backoff", "failure_cause", "main"]

LEGO_PATH = Path(os.environ.get("LEGO_PATH", "/var/lib/acme"))  # the state volume
WEBROOT = Path("/var/www/acme")  # shared with nginx, which serves /.well-known/acme-challenge/
METRICS_PORT = 9102
MARKER = ".acme-installed"  # in the certificate volume: fingerprints this client installed
FRACTION_LEFT = 1 / 3  # renew when this share of the lifetime is left
DEFAULT_LIFETIME = 90 * 86400.0  # before the first certificate: Let's Encrypt's
RECHECK = 3600.0  # an idle client (operator's certificate) looks again this often
MAX_SLEEP = 6 * 3600.0  # and a managing one at least this often
LEGO_TIMEOUT = 600.0


# ── logging: one JSON object per line ────────────────────────────────────────


def log(level: str, event: str, **fields: Any) -> None:
    record = {
        "timestamp": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "level": level,
        "logger": "acme",
        "event": event,
        **fields,
    }
    sys.stdout.write(json.dumps(record, default=str) + "\n")
    sys.stdout.flush()


# ── what went wrong ─────────────────────────────────────────────────────────

ACME_ERROR = re.compile(r"urn:ietf:params:acme:error:([A-Za-z]+)")
CAUSES = (  # (pattern in lego's output, cause), first match wins after the ACME error type
    (re.compile(r"x509: certificate signed by unknown authority|certificate is not trusted"),
     "ca_untrusted"),
    (re.compile(r"no such host|connection refused|i/o timeout|network is unreachable|"
                r"get directory at|dial tcp|EOF"), "ca_unreachable"),
)  # fmt: skip


def failure_cause(output: str) -> tuple[str, str]:
    """lego's output -> (cause, the line that says it)."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if match := ACME_ERROR.search(line):
            return match[1], line[-500:]
    for pattern, cause in CAUSES:
        for line in lines:
            if pattern.search(line):
                return cause, line[-500:]
    return "unknown", (lines[-1][-500:] if lines else "lego printed nothing")


def backoff(failures: int, lifetime: float | None) -> float:
    """Seconds before retry number `failures` (1, 2, ...): doubling from lifetime/12 (at
    most 2 min) up to lifetime/6 (at most 1 h). Short-lived certificates retry sooner."""
    life = lifetime or DEFAULT_LIFETIME
    first = min(max(life / 12, 1.0), 120.0)
    cap = min(max(life / 6, first), 3600.0)
    return float(min(first * 2 ** max(failures - 1, 0), cap))


# ── metrics ─────────────────────────────────────────────────────────────────


@dataclass
class Metrics:
    """The client's state in Prometheus' text format (no client library: a handful of
    gauges and one counter, read by one scraper)."""

    managing: int = 0
    consecutive_failures: int = 0
    attempts: dict[tuple[str, str], int] = field(default_factory=dict)
    last_success: float = 0.0
    next_attempt: float = 0.0
    not_after: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attempt(self, action: str, result: str) -> None:
        with self.lock:
            key = (action, result)
            self.attempts[key] = self.attempts.get(key, 0) + 1

    def render(self) -> str:
        with self.lock:
            lines = [
                "# HELP acme_managing 1 when this client manages nginx's certificate, 0 when "
                "an operator's certificate wins.",
                "# TYPE acme_managing gauge",
                f"acme_managing {self.managing}",
                "# HELP acme_consecutive_failures Failed issue/renew attempts since the last "
                "success.",
                "# TYPE acme_consecutive_failures gauge",
                f"acme_consecutive_failures {self.consecutive_failures}",
                "# HELP acme_attempts_total Issue and renew attempts by result.",
                "# TYPE acme_attempts_total counter",
            ]
            for action in ("issue", "renew"):
                for result in ("success", "failure"):
                    count = self.attempts.get((action, result), 0)
                    lines.append(
                        f'acme_attempts_total{{action="{action}",result="{result}"}} {count}'
                    )
            lines += [
                "# HELP acme_last_success_timestamp_seconds When a certificate was last "
                "obtained (0: never, since start).",
                "# TYPE acme_last_success_timestamp_seconds gauge",
                f"acme_last_success_timestamp_seconds {self.last_success}",
                "# HELP acme_next_attempt_timestamp_seconds When the client will next act.",
                "# TYPE acme_next_attempt_timestamp_seconds gauge",
                f"acme_next_attempt_timestamp_seconds {self.next_attempt}",
                "# HELP acme_certificate_not_after_seconds notAfter of the certificate the "
                "client holds (what nginx serves: probe_ssl_earliest_cert_expiry).",
                "# TYPE acme_certificate_not_after_seconds gauge",
                f"acme_certificate_not_after_seconds {self.not_after}",
            ]
        return "\n".join(lines) + "\n"


def serve_metrics(metrics: Metrics, port: int = METRICS_PORT) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/metrics":
                self.send_error(404)
                return
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # scrapes are not events

    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)  # noqa: S104 - container port
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    return server


# ── the loop ────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Attempt:
    ok: bool
    output: str


def run_lego(args: Sequence[str], env: dict[str, str]) -> Attempt:
    try:
        proc = subprocess.run(
            list(args),
            env=env,
            capture_output=True,
            text=True,
            timeout=LEGO_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Attempt(False, f"timeout: lego did not finish within {LEGO_TIMEOUT:.0f}s")
    return Attempt(proc.returncode == 0, proc.stdout + proc.stderr)


@dataclass
class Renewer:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    lego_path: Path = LEGO_PATH
    webroot: Path = WEBROOT
    cert_dir: Path = CERT_DIR
    runner: Callable[[Sequence[str], dict[str, str]], Attempt] = run_lego
    clock: Callable[[], float] = time.time
    failures: int = 0
    _inactive_reason: str = ""

    # ── files ────────────────────────────────────────────────────────────────
    @property
    def lego_cert(self) -> Path:
        return self.lego_path / "certificates" / f"{self.settings.domains[0]}.crt"

    @property
    def lego_key(self) -> Path:
        return self.lego_cert.with_suffix(".key")

    @property
    def marker(self) -> Path:
        return self.settings.cert_path.parent / MARKER

    def installed_fingerprints(self) -> list[str]:
        try:
            return self.marker.read_text().split()
        except OSError:
            return []

    def held(self) -> CertificateInfo | None:
        """lego's certificate, if it covers every name we want."""
        try:
            info = read_certificate(self.lego_cert)
        except CertificateError:
            return None
        if not set(self.settings.domains) <= info.names:
            return None
        return info

    # ── precedence ───────────────────────────────────────────────────────────
    def ownership(self) -> str:
        """'' when this client manages TLS_CERT/TLS_KEY, else why it must not."""
        cert, key = self.settings.cert_path, self.settings.key_path
        if cert.parent != self.cert_dir or key.parent != self.cert_dir:
            return (
                f"TLS_CERT={cert} / TLS_KEY={key} are outside nginx's certificate volume "
                f"({self.cert_dir}): the mounted certificate wins"
            )
        if not cert.exists():
            return ""
        try:
            info = read_certificate(cert)
        except CertificateError as exc:
            return f"TLS_CERT holds no readable certificate ({exc}): fix or delete it"
        if info.self_signed or info.fingerprint in self.installed_fingerprints():
            return ""
        return (
            f"the certificate at TLS_CERT={cert} (issuer {info.issuer}) was not installed "
            "by this client: the operator's certificate wins; delete TLS_CERT and TLS_KEY "
            "(nginx makes a self-signed pair on restart) to hand the files to ACME"
        )

    # ── lego ─────────────────────────────────────────────────────────────────
    def lego(self, action: str) -> list[str]:
        s = self.settings
        args = [
            "lego", "--accept-tos", "--email", s.email, "--server", s.directory,
            "--path", str(self.lego_path), "--key-type", s.key_type,
            "--http", "--http.webroot", str(self.webroot),
        ]  # fmt: skip
        for domain in s.domains:
            args += ["--domains", domain]
        if action == "issue":
            return [*args, "run"]
        # --days=-1: renew now (the timing is ours, a third of the lifetime, which lego's
        # whole days cannot express); --reuse-key: nginx's key file does not change.
        return [*args, "renew", "--days=-1", "--reuse-key", "--no-random-sleep"]

    def lego_env(self) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.lego_path)}
        if self.settings.ca_bundle:
            env["LEGO_CA_CERTIFICATES"] = str(self.settings.ca_bundle)
        return env

    # ── install ──────────────────────────────────────────────────────────────
    def install(self, info: CertificateInfo) -> bool:
        """Copy lego's pair into TLS_CERT/TLS_KEY if nginx does not have it yet."""
        cert, key = self.settings.cert_path, self.settings.key_path
        chain = self.lego_cert.read_bytes()
        try:
            if cert.read_bytes() == chain:
                return False
        except OSError:
            pass
        # Record the fingerprint first: a crash between the steps leaves a certificate
        # this client still recognises as its own.
        known = [*self.installed_fingerprints()[-1:], info.fingerprint]
        _atomic_write(self.marker, ("\n".join(known) + "\n").encode(), 0o644)
        key_bytes = self.lego_key.read_bytes()
        try:
            same_key = key.read_bytes() == key_bytes
        except OSError:
            same_key = False
        if not same_key:
            _atomic_write(key, key_bytes, 0o600)
        _atomic_write(cert, chain, 0o644)
        return True

    # ── one pass ─────────────────────────────────────────────────────────────
    def step(self) -> float:
        """Decide, act; return the seconds to sleep before the next pass."""
        reason = self.ownership()
        if reason:
            self.metrics.managing = 0
            if reason != self._inactive_reason:
                log("warning", "acme_inactive", cause="operator_certificate", reason=reason)
                self._inactive_reason = reason
            return self._next(RECHECK)
        if self._inactive_reason:
            log("info", "acme_active", reason="TLS_CERT is nginx's self-signed one or missing")
            self._inactive_reason = ""
        self.metrics.managing = 1

        held = self.held()
        now = self.clock()
        action = "issue" if held is None else ("renew" if now >= held.renew_at() else "")
        if action:
            attempt = self.runner(self.lego(action), self.lego_env())
            after = self.held()
            # A renewal counts only if a new certificate is there.
            if attempt.ok and after is not None and (held is None or after != held):
                self.failures = 0
                self.metrics.consecutive_failures = 0
                self.metrics.last_success = self.clock()
                self.metrics.attempt(action, "success")
                log(
                    "info",
                    "certificate_obtained",
                    action=action,
                    domains=sorted(after.names),
                    serial=after.serial,
                    not_before=_iso(after.not_before),
                    not_after=_iso(after.not_after),
                    renew_at=_iso(after.renew_at()),
                )
                held = after
            else:
                self.failures += 1
                self.metrics.consecutive_failures = self.failures
                self.metrics.attempt(action, "failure")
                cause, detail = (
                    failure_cause(attempt.output)
                    if not attempt.ok
                    else ("no_certificate", "lego succeeded but wrote no certificate for "
                          f"{', '.join(self.settings.domains)} under {self.lego_cert.parent}")
                )  # fmt: skip
                delay = backoff(self.failures, held.lifetime if held else None)
                log(
                    "error",
                    "acme_failed",
                    action=action,
                    cause=cause,
                    detail=detail,
                    domains=list(self.settings.domains),
                    directory=self.settings.directory,
                    consecutive_failures=self.failures,
                    retry_in_seconds=round(delay, 1),
                    serving=self._serving(),
                )
                if held is not None:
                    self._install(held)  # a valid older one is still better than none
                return self._next(delay)

        if held is None:  # unreachable: no certificate means action "issue" above
            return self._next(backoff(1, None))
        self._install(held)
        self.metrics.not_after = held.not_after
        return self._next(min(max(held.renew_at() - self.clock(), 1.0), MAX_SLEEP))

    def _install(self, info: CertificateInfo) -> None:
        if self.install(info):
            log(
                "info",
                "certificate_installed",
                cert=str(self.settings.cert_path),
                serial=info.serial,
                not_after=_iso(info.not_after),
                note="nginx reloads when its certificate watcher sees the new pair",
            )

    def _serving(self) -> str:
        try:
            info = read_certificate(self.settings.cert_path)
        except CertificateError:
            return "nothing yet"
        kind = "self-signed" if info.self_signed else f"serial {info.serial}"
        return f"{kind}, valid until {_iso(info.not_after)}"

    def _next(self, delay: float) -> float:
        self.metrics.next_attempt = self.clock() + delay
        return delay


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ── the process ─────────────────────────────────────────────────────────────


def main() -> int:
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        log("critical", "invalid_setting", error=str(exc))
        return EX_CONFIG
    metrics = Metrics()
    serve_metrics(metrics)
    renewer = Renewer(settings, metrics)
    log("info", "acme_started", **settings.describe(), state=str(LEGO_PATH))
    if settings.skipped_names:
        log(
            "info",
            "names_not_certified",
            names=list(settings.skipped_names),
            reason="IP addresses and localhost cannot be validated over HTTP-01",
        )

    wake = threading.Event()
    stopping = threading.Event()

    def on_term(signum: int, _frame: object) -> None:
        stopping.set()
        wake.set()

    def on_hup(_signum: int, _frame: object) -> None:
        # `docker compose kill -s HUP acme`: act now (e.g. after fixing DNS), back-off reset.
        renewer.failures = 0
        wake.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    signal.signal(signal.SIGHUP, on_hup)

    while not stopping.is_set():
        delay = renewer.step()
        wake.wait(delay)
        wake.clear()
    log("info", "acme_stopped")
    return 0
