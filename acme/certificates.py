"""What the client needs to know about a certificate file, read with the openssl CLI.

Python's standard library cannot parse X.509, and the image has openssl anyway (the
nginx image uses the same tool for the self-signed certificate), so one `openssl x509`
call per file gives the validity window, the subject/issuer, the names and a fingerprint.
https://docs.openssl.org/3.0/man1/openssl-x509/
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["CertificateError", "CertificateInfo", "read_certificate"]

OPENSSL_DATE = "%b %d %H:%M:%S %Y %Z"  # notAfter=Mar  1 12:00:00 2027 GMT


class CertificateError(Exception):
    """The file is missing or holds no readable certificate."""


@dataclass(frozen=True)
class CertificateInfo:
    not_before: float  # Unix seconds
    not_after: float
    subject: str
    issuer: str
    names: frozenset[str]  # DNS names of the subjectAltName extension, lower case
    serial: str  # hex, upper case, as openssl prints it
    fingerprint: str  # sha256 of the whole file (the chain nginx serves)

    @property
    def lifetime(self) -> float:
        return self.not_after - self.not_before

    @property
    def self_signed(self) -> bool:
        """Issuer == subject: nginx's first-start certificate, never a CA's."""
        return self.subject == self.issuer

    def renew_at(self, fraction_left: float = 1 / 3) -> float:
        """When `fraction_left` of the lifetime remains (Let's Encrypt's advice: a third)."""
        return self.not_after - self.lifetime * fraction_left


def read_certificate(path: Path) -> CertificateInfo:
    """The first certificate of a PEM file (the leaf of a full chain)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"{path}: {exc.strerror}") from None
    proc = subprocess.run(
        [
            "openssl",
            "x509",
            "-noout",
            "-nameopt",
            "RFC2253",
            "-startdate",
            "-enddate",
            "-subject",
            "-issuer",
            "-serial",
            "-ext",
            "subjectAltName",
        ],
        input=data,
        capture_output=True,
        timeout=30,
        check=False,
    )
    if proc.returncode != 0:
        message = proc.stderr.decode(errors="replace").strip().splitlines()
        raise CertificateError(f"{path}: not a PEM certificate ({message[-1] if message else ''})")
    fields: dict[str, str] = {}
    names: set[str] = set()
    for line in proc.stdout.decode().splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("notBefore", "notAfter", "subject", "issuer", "serial"):
            fields[key] = value.strip()
        elif "DNS:" in line:
            names |= {
                part.strip()[4:].lower()
                for part in line.split(",")
                if part.strip().startswith("DNS:")
            }
    return CertificateInfo(
        not_before=_timestamp(fields["notBefore"]),
        not_after=_timestamp(fields["notAfter"]),
        subject=fields.get("subject", ""),
        issuer=fields.get("issuer", ""),
        names=frozenset(names),
        serial=fields.get("serial", ""),
        fingerprint=hashlib.sha256(data).hexdigest(),
    )


def _timestamp(text: str) -> float:
    # openssl pads single-digit days with a space: "Mar  1 ..." -> split/join first.
    return datetime.strptime(" ".join(text.split()), OPENSSL_DATE).replace(tzinfo=UTC).timestamp()
