"""What the Swarm e2e tests share: an address pool, a certificate, the images a stack needs.

A stack cannot build, so `build_images` builds the compose file's app and nginx images
under this session's tag (the layer cache makes a second call cheap); `certificate` makes
the PEM pair deploy/swarm/deploy.sh turns into a versioned config + secret; `free_pool`
finds a /16 for a swarm's overlay networks that nothing on this host uses.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import random
import time
from pathlib import Path

from conftest import ROOT, TIMINGS, run, used_subnets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DEPLOY = ROOT / "deploy" / "swarm" / "deploy.sh"
SWARM_POOLS = ipaddress.IPv4Network("10.192.0.0/12")


def free_pool() -> ipaddress.IPv4Network:
    """A /16 for the swarm's networks that no docker network or host route touches."""
    taken = used_subnets()
    candidates = list(SWARM_POOLS.subnets(new_prefix=16))
    random.shuffle(candidates)
    for net in candidates:
        if not any(net.overlaps(other) for other in taken):
            return net
    raise RuntimeError(f"no free /16 in {SWARM_POOLS} for the swarm's address pool")


def certificate(directory: Path, addresses: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost and `addresses` (two days)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.IPv4Address(a)) for a in addresses]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "fullchain.pem", directory / "privkey.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def build_images(env: dict[str, str], project: str, *, v2: bool = False) -> dict[str, str]:
    """Build app and nginx as docker-compose.yml does, tagged APP_VERSION; with `v2`, a
    second app build to update to (`<tag>-v2`). Returns the references by role."""
    tag = env["APP_VERSION"]
    start = time.monotonic()
    compose = ["docker", "compose", "-f", str(ROOT / "docker-compose.yml"), "-p", project]
    run([*compose, "build", "app", "nginx"], env=env, timeout=900)
    images = {"app": f"{env['APP_IMAGE']}:{tag}", "nginx": f"{env['NGINX_IMAGE_NAME']}:{tag}"}
    if v2:
        run([*compose, "build", "app"], env={**env, "APP_VERSION": f"{tag}-v2"}, timeout=900)
        images["app-v2"] = f"{env['APP_IMAGE']}:{tag}-v2"
    TIMINGS[f"swarm: images built ({', '.join(images)})"] = time.monotonic() - start
    return images


def access_log_ids(log: str) -> set[str]:
    """Request ids of the nginx access lines in a task's log: every request nginx read,
    answered or not (PacedTraffic.lost)."""
    ids = set()
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("logger") == "nginx.access":
            ids.add(str(record.get("request_id", "")))
    return ids
