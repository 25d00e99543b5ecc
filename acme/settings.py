"""The ACME client's settings, read once from the environment and validated.

One home each: the defaults below are the only ones (`.env.example` shows them, tests check
it). SERVER_NAMES, TLS_CERT and TLS_KEY are nginx's settings, read here too so that both
containers agree on the names and on the files nginx serves (their defaults are
nginx/docker-entrypoint.sh's; tests/static/test_contract.py holds them equal).
A bad value stops start-up with one line that names the variable (`SettingsError`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "CERT_DIR",
    "DEFAULTS",
    "DIRECTORIES",
    "EX_CONFIG",
    "VARIABLES",
    "Settings",
    "SettingsError",
]

EX_CONFIG = 78  # sysexits.h: a bad setting, which a restart will not fix

# Where docker-compose.yml mounts nginx's certificate volume, in nginx and in this container.
CERT_DIR = Path("/etc/nginx/certs")

# ACME_DIRECTORY by name; anything else must be the https:// URL of a directory.
# https://letsencrypt.org/docs/staging-environment/
DIRECTORIES = {
    "production": "https://acme-v02.api.letsencrypt.org/directory",
    "staging": "https://acme-staging-v02.api.letsencrypt.org/directory",
}

DEFAULTS = {
    "ACME_EMAIL": "",
    "ACME_DIRECTORY": "production",
    "ACME_CA_BUNDLE": "",
    "ACME_KEY_TYPE": "ec256",
    "SERVER_NAMES": "localhost 127.0.0.1",
    "TLS_CERT": str(CERT_DIR / "fullchain.pem"),
    "TLS_KEY": str(CERT_DIR / "privkey.pem"),
}
VARIABLES = frozenset(DEFAULTS)

KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa4096")
EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
# A DNS name HTTP-01 can prove: letters, digits, hyphens, at least two labels.
HOSTNAME = re.compile(r"(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{1,63}")
LOCAL_NAMES = frozenset({"localhost", "_"})


class SettingsError(Exception):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    email: str
    directory: str  # the directory URL
    ca_bundle: Path | None  # extra CA trusted for the directory's TLS (a private CA)
    key_type: str
    domains: tuple[str, ...]  # the names the certificate covers, first = lego's file name
    skipped_names: tuple[str, ...]  # in SERVER_NAMES, not provable by HTTP-01 (IPs, localhost)
    cert_path: Path
    key_path: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def get(name: str) -> str:
            value = env.get(name, "")
            return (value if value != "" else DEFAULTS[name]).strip()

        email = get("ACME_EMAIL")
        if not email:
            raise SettingsError(
                "ACME_EMAIL is not set: the ACME client needs the address the CA may write "
                "to about this account (expiry, policy changes), e.g. ACME_EMAIL=ops@example.com"
            )
        if not EMAIL.fullmatch(email):
            raise SettingsError(f"ACME_EMAIL={email!r} is invalid: expected an e-mail address")

        directory = get("ACME_DIRECTORY")
        url = DIRECTORIES.get(directory.lower(), directory)
        if not re.fullmatch(r"https://[^\s/]+(/\S*)?", url):
            raise SettingsError(
                f"ACME_DIRECTORY={directory!r} is invalid: expected "
                f"{' or '.join(DIRECTORIES)}, or the https:// URL of an ACME directory"
            )

        bundle_value = get("ACME_CA_BUNDLE")
        ca_bundle = Path(bundle_value) if bundle_value else None
        if ca_bundle is not None:
            try:
                text = ca_bundle.read_text(encoding="ascii", errors="replace")
            except OSError as exc:
                raise SettingsError(
                    f"ACME_CA_BUNDLE={bundle_value!r} cannot be read ({exc.strerror}): mount "
                    "the PEM file of the CA that signs the ACME server's certificate there"
                ) from None
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise SettingsError(f"ACME_CA_BUNDLE={bundle_value!r} holds no PEM certificate")

        key_type = get("ACME_KEY_TYPE").lower()
        if key_type not in KEY_TYPES:
            raise SettingsError(
                f"ACME_KEY_TYPE={key_type!r} is invalid: expected one of {', '.join(KEY_TYPES)}"
            )

        domains, skipped = split_server_names(get("SERVER_NAMES"))

        paths = {}
        for name in ("TLS_CERT", "TLS_KEY"):
            value = get(name)
            if not value.startswith("/"):
                raise SettingsError(f"{name}={value!r} is invalid: expected an absolute path")
            paths[name] = Path(value)
        return cls(
            email=email,
            directory=url,
            ca_bundle=ca_bundle,
            key_type=key_type,
            domains=domains,
            skipped_names=skipped,
            cert_path=paths["TLS_CERT"],
            key_path=paths["TLS_KEY"],
        )

    def describe(self) -> dict[str, object]:
        """The effective configuration, for the start-up log line."""
        return {
            "directory": self.directory,
            "domains": list(self.domains),
            "skipped_names": list(self.skipped_names),
            "ca_bundle": str(self.ca_bundle) if self.ca_bundle else None,
            "key_type": self.key_type,
            "cert": str(self.cert_path),
            "key": str(self.key_path),
        }


def split_server_names(value: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """SERVER_NAMES -> (names a certificate is requested for, names left out).

    IP addresses and localhost cannot be proven over HTTP-01 and stay on the certificate
    nginx already has for them only through the default server (they are left out, and
    logged); a wildcard needs DNS-01, which this client does not do: an error.
    """
    domains: list[str] = []
    skipped: list[str] = []
    for raw in value.split():
        name = raw.lower().rstrip(".")
        if name in LOCAL_NAMES or name.endswith(".localhost") or _is_ip(name):
            skipped.append(raw)
        elif name.startswith("*."):
            raise SettingsError(
                f"SERVER_NAMES has the wildcard {raw!r}: ACME HTTP-01 cannot prove a wildcard "
                "(it needs DNS-01); list the names instead"
            )
        elif not HOSTNAME.fullmatch(name):
            raise SettingsError(
                f"SERVER_NAMES has {raw!r}, which is not a DNS name a CA can validate"
            )
        elif name not in domains:
            domains.append(name)
    if not domains:
        raise SettingsError(
            f"SERVER_NAMES={value!r} names no public DNS name: ACME needs at least one "
            "(e.g. SERVER_NAMES='example.com www.example.com') whose DNS points at this host"
        )
    return tuple(domains), tuple(skipped)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True
