"""The ACME client's decisions, with real certificates (made by the openssl CLI) and lego
replaced by a function that writes what lego would write. The real lego against a real ACME
server (Pebble) is tests/e2e/test_acme.py."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from acme.certificates import CertificateError, read_certificate
from acme.client import Attempt, Renewer, backoff, failure_cause
from acme.settings import DIRECTORIES, Settings, SettingsError

if TYPE_CHECKING:
    from collections.abc import Sequence

DOMAIN = "shop.example.com"


# ── certificates made with openssl ──────────────────────────────────────────


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA (what Let's Encrypt is to lego), in a folder: ca.pem, ca.key."""
    folder = tmp_path_factory.mktemp("ca")
    openssl(
        "req", "-x509", "-new", "-nodes", "-days", "30", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-subj", "/CN=Test CA",
        "-keyout", "ca.key", "-out", "ca.pem", cwd=folder,
    )  # fmt: skip
    return folder


def issue(ca: Path, out: Path, names: Sequence[str], days: int = 90) -> None:
    """A CA-signed chain (leaf + CA) and its key, as lego stores them: <name>.crt/.key."""
    out.mkdir(parents=True, exist_ok=True)
    stem = names[0]
    san = ",".join(f"DNS:{n}" for n in names)
    (out / "ext.cnf").write_text(f"subjectAltName={san}\n")
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-subj", f"/CN={stem}", "-keyout", f"{stem}.key", "-out", "leaf.csr", cwd=out,
    )  # fmt: skip
    openssl(
        "x509", "-req", "-in", "leaf.csr", "-CA", str(ca / "ca.pem"), "-CAkey",
        str(ca / "ca.key"), "-CAcreateserial", "-days", str(days), "-extfile", "ext.cnf",
        "-out", "leaf.pem", cwd=out,
    )  # fmt: skip
    (out / f"{stem}.crt").write_text((out / "leaf.pem").read_text() + (ca / "ca.pem").read_text())


def self_signed(cert: Path, key: Path) -> None:
    """What nginx's entrypoint makes on first start."""
    openssl(
        "req", "-x509", "-new", "-nodes", "-days", "365", "-newkey", "ec",
        "-pkeyopt", "ec_paramgen_curve:P-256", "-subj", "/CN=localhost",
        "-keyout", str(key), "-out", str(cert), cwd=cert.parent,
    )  # fmt: skip


# ── settings ────────────────────────────────────────────────────────────────


def settings_from(**env: str) -> Settings:
    return Settings.from_env({"ACME_EMAIL": "ops@example.com", "SERVER_NAMES": DOMAIN, **env})


def test_settings_defaults_to_lets_encrypt_production() -> None:
    s = settings_from(SERVER_NAMES=f"{DOMAIN} www.example.com localhost 127.0.0.1")
    assert s.directory == DIRECTORIES["production"]
    assert s.domains == (DOMAIN, "www.example.com")
    assert s.skipped_names == ("localhost", "127.0.0.1")
    assert s.cert_path == Path("/etc/nginx/certs/fullchain.pem")


def test_staging_by_name_and_any_https_directory() -> None:
    assert settings_from(ACME_DIRECTORY="staging").directory == DIRECTORIES["staging"]
    url = "https://pebble:14000/dir"
    assert settings_from(ACME_DIRECTORY=url).directory == url


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"ACME_EMAIL": ""}, "ACME_EMAIL"),
        ({"ACME_EMAIL": "not-an-address"}, "ACME_EMAIL"),
        ({"ACME_DIRECTORY": "http://insecure.example/dir"}, "ACME_DIRECTORY"),
        ({"ACME_DIRECTORY": "prod"}, "ACME_DIRECTORY"),
        ({"ACME_CA_BUNDLE": "/nonexistent/ca.pem"}, "ACME_CA_BUNDLE"),
        ({"ACME_KEY_TYPE": "dsa"}, "ACME_KEY_TYPE"),
        ({"SERVER_NAMES": "localhost 127.0.0.1"}, "SERVER_NAMES"),
        ({"SERVER_NAMES": "*.example.com"}, "SERVER_NAMES"),
        ({"SERVER_NAMES": "bad_name.example.com"}, "SERVER_NAMES"),
        ({"TLS_CERT": "certs/fullchain.pem"}, "TLS_CERT"),
    ],
)
def test_bad_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        settings_from(**env)


def test_ca_bundle_must_hold_a_certificate(tmp_path: Path, ca: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("nothing\n")
    with pytest.raises(SettingsError, match=r"ACME_CA_BUNDLE.*no PEM certificate"):
        settings_from(ACME_CA_BUNDLE=str(empty))
    assert settings_from(ACME_CA_BUNDLE=str(ca / "ca.pem")).ca_bundle == ca / "ca.pem"


# ── certificates, causes, back-off ──────────────────────────────────────────


def test_read_certificate(ca: Path, tmp_path: Path) -> None:
    issue(ca, tmp_path, [DOMAIN, "www.example.com"], days=90)
    info = read_certificate(tmp_path / f"{DOMAIN}.crt")
    assert info.names == {DOMAIN, "www.example.com"}
    assert info.lifetime == 90 * 86400
    assert not info.self_signed
    assert info.renew_at() == info.not_before + 60 * 86400  # a third (30 days) left
    ca_info = read_certificate(ca / "ca.pem")
    assert ca_info.self_signed
    with pytest.raises(CertificateError):
        read_certificate(tmp_path / "ext.cnf")
    with pytest.raises(CertificateError):
        read_certificate(tmp_path / "missing.pem")


def test_failure_cause_names_the_acme_error() -> None:
    output = (
        "2026/12/01 22:00:00 [INFO] [shop.example.com] acme: Trying to solve HTTP-01\n"
        "2026/12/01 22:00:01 Could not obtain certificates:\n"
        "\terror: one or more domains had a problem:\n"
        "[shop.example.com] acme: error: 403 :: urn:ietf:params:acme:error:unauthorized :: "
        "Invalid response from http://shop.example.com/.well-known/acme-challenge/x: 404\n"
    )
    cause, detail = failure_cause(output)
    assert cause == "unauthorized"
    assert "Invalid response" in detail
    assert failure_cause("get directory at 'https://ca/dir': dial tcp: no such host")[0] == (
        "ca_unreachable"
    )
    assert failure_cause("x509: certificate signed by unknown authority")[0] == "ca_untrusted"
    assert failure_cause("")[0] == "unknown"


def test_backoff_doubles_and_is_capped() -> None:
    day90 = 90 * 86400.0
    assert [backoff(n, day90) for n in (1, 2, 3, 4, 10)] == [120, 240, 480, 960, 3600]
    assert backoff(1, None) == 120  # before the first certificate: Let's Encrypt's lifetime
    # A 90-second certificate: retry after 7.5 s, at most 15 s (it must renew in its last 30).
    assert [backoff(n, 90.0) for n in (1, 2, 3)] == [7.5, 15, 15]


# ── the loop ────────────────────────────────────────────────────────────────


class FakeLego:
    """Stands in for lego: records each call, issues from the test CA or fails."""

    def __init__(self, ca: Path, lego_path: Path) -> None:
        self.ca, self.lego_path = ca, lego_path
        self.calls: list[list[str]] = []
        self.fail_with = ""

    def __call__(self, args: Sequence[str], env: dict[str, str]) -> Attempt:
        self.calls.append(list(args))
        if self.fail_with:
            return Attempt(False, self.fail_with)
        domains = [args[i + 1] for i, a in enumerate(args) if a == "--domains"]
        folder = self.lego_path / "certificates"
        key = folder / f"{domains[0]}.key"
        kept = key.read_bytes() if "--reuse-key" in args and key.exists() else None
        issue(self.ca, folder, domains)
        if kept is not None:  # --reuse-key: re-sign with the same key
            key.write_bytes(kept)
            csr = [
                "req",
                "-new",
                "-key",
                key.name,
                "-subj",
                f"/CN={domains[0]}",
                "-out",
                "leaf.csr",
            ]
            openssl(*csr, cwd=folder)
            openssl(
                "x509", "-req", "-in", "leaf.csr", "-CA", str(self.ca / "ca.pem"), "-CAkey",
                str(self.ca / "ca.key"), "-CAcreateserial", "-days", "90", "-extfile",
                "ext.cnf", "-out", "leaf.pem", cwd=folder,
            )  # fmt: skip
            chain = (folder / "leaf.pem").read_text() + (self.ca / "ca.pem").read_text()
            (folder / f"{domains[0]}.crt").write_text(chain)
        return Attempt(True, "")


@pytest.fixture
def world(tmp_path: Path, ca: Path) -> tuple[Renewer, FakeLego]:
    certs = tmp_path / "certs"
    certs.mkdir()
    self_signed(certs / "fullchain.pem", certs / "privkey.pem")
    settings = settings_from(
        TLS_CERT=str(certs / "fullchain.pem"), TLS_KEY=str(certs / "privkey.pem")
    )
    lego = FakeLego(ca, tmp_path / "lego")
    renewer = Renewer(settings, lego_path=tmp_path / "lego", webroot=tmp_path / "www",
                      cert_dir=certs, runner=lego)  # fmt: skip
    return renewer, lego


def events(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_first_start_issues_and_replaces_the_self_signed_pair(
    world: tuple[Renewer, FakeLego], capsys: pytest.CaptureFixture[str]
) -> None:
    renewer, lego = world
    delay = renewer.step()
    assert lego.calls[0][-1] == "run"
    assert lego.calls[0][lego.calls[0].index("--domains") :][:2] == ["--domains", DOMAIN]
    served = read_certificate(renewer.settings.cert_path)
    assert not served.self_signed
    assert DOMAIN in served.names
    assert renewer.settings.key_path.read_bytes() == renewer.lego_key.read_bytes()
    assert oct(renewer.settings.key_path.stat().st_mode & 0o777) == "0o600"
    # Sleeps until the renewal is due, waking at least every 6 hours to look again.
    assert delay == pytest.approx(min(6 * 3600, served.renew_at() - renewer.clock()), abs=5)
    logged = [e["event"] for e in events(capsys)]
    assert logged == ["certificate_obtained", "certificate_installed"]
    assert renewer.metrics.managing == 1
    assert 'acme_attempts_total{action="issue",result="success"} 1' in renewer.metrics.render()


def test_a_restart_orders_nothing_until_renewal_is_due(world: tuple[Renewer, FakeLego]) -> None:
    renewer, lego = world
    renewer.step()
    again = Renewer(renewer.settings, lego_path=renewer.lego_path, webroot=renewer.webroot,
                    cert_dir=renewer.cert_dir, runner=lego)  # fmt: skip
    again.step()
    assert len(lego.calls) == 1, "a restart must reuse the stored certificate"


def test_renews_with_a_third_left_keeping_the_key(world: tuple[Renewer, FakeLego]) -> None:
    renewer, lego = world
    renewer.step()
    first = read_certificate(renewer.settings.cert_path)
    key = renewer.settings.key_path.read_bytes()
    renewer.clock = lambda: first.renew_at() - 60
    renewer.step()
    assert len(lego.calls) == 1, "not due yet"
    renewer.clock = lambda: first.renew_at() + 1
    renewer.step()
    assert lego.calls[1][-4:] == ["renew", "--days=-1", "--reuse-key", "--no-random-sleep"]
    served = read_certificate(renewer.settings.cert_path)
    assert served.serial != first.serial
    assert renewer.settings.key_path.read_bytes() == key


def test_failure_logs_the_cause_keeps_serving_and_backs_off(
    world: tuple[Renewer, FakeLego], capsys: pytest.CaptureFixture[str]
) -> None:
    renewer, lego = world
    renewer.step()
    first = read_certificate(renewer.settings.cert_path)
    capsys.readouterr()
    lego.fail_with = "acme: error: 400 :: urn:ietf:params:acme:error:connection :: refused"
    renewer.clock = lambda: first.renew_at() + 1
    delays = [renewer.step() for _ in range(3)]
    assert delays == [120, 240, 480]
    assert read_certificate(renewer.settings.cert_path).fingerprint == first.fingerprint
    failed = events(capsys)
    assert [e["event"] for e in failed] == ["acme_failed"] * 3
    assert failed[0]["level"] == "error"
    assert failed[0]["cause"] == "connection"
    assert failed[0]["action"] == "renew"
    assert failed[2]["consecutive_failures"] == 3
    assert str(failed[0]["serving"]).startswith(f"serial {first.serial}")
    assert renewer.metrics.consecutive_failures == 3
    lego.fail_with = ""
    renewer.step()
    assert renewer.metrics.consecutive_failures == 0
    assert read_certificate(renewer.settings.cert_path).serial != first.serial


def test_an_operators_certificate_wins(
    world: tuple[Renewer, FakeLego], ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    renewer, lego = world
    bought = tmp_path / "bought"
    issue(ca, bought, [DOMAIN])
    renewer.settings.cert_path.write_bytes((bought / f"{DOMAIN}.crt").read_bytes())
    renewer.settings.key_path.write_bytes((bought / f"{DOMAIN}.key").read_bytes())
    assert renewer.step() == 3600
    assert renewer.step() == 3600
    assert lego.calls == []
    assert renewer.settings.cert_path.read_bytes() == (bought / f"{DOMAIN}.crt").read_bytes()
    logged = events(capsys)
    assert len(logged) == 1, "said once, not every hour"
    assert logged[0]["event"] == "acme_inactive"
    assert "TLS_CERT" in str(logged[0]["reason"])
    assert renewer.metrics.managing == 0


def test_files_outside_the_volume_are_mounted_and_win(world: tuple[Renewer, FakeLego]) -> None:
    renewer, lego = world
    renewer.settings = settings_from(TLS_CERT="/run/secrets/cert.pem", TLS_KEY="/run/secrets/k.pem")
    assert "outside" in renewer.ownership()
    renewer.step()
    assert lego.calls == []


def test_its_own_certificate_is_recognised_after_install(world: tuple[Renewer, FakeLego]) -> None:
    renewer, _ = world
    renewer.step()
    assert renewer.ownership() == ""  # not self-signed, but its fingerprint is recorded


def test_new_names_get_a_new_certificate(world: tuple[Renewer, FakeLego]) -> None:
    renewer, lego = world
    renewer.step()
    renewer.settings = settings_from(
        SERVER_NAMES=f"{DOMAIN} www.example.com",
        TLS_CERT=str(renewer.settings.cert_path),
        TLS_KEY=str(renewer.settings.key_path),
    )
    renewer.step()
    assert lego.calls[1][-1] == "run"
    assert read_certificate(renewer.settings.cert_path).names == {DOMAIN, "www.example.com"}
