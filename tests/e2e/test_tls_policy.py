"""The edge's TLS policy is exactly Mozilla's "intermediate" profile, as sslyze judges it.

sslyze scans nginx of the shared stack through the published port (SNI `localhost`, the
stack's own certificate trusted) and checks the result against the Mozilla profile it
bundles. Any drift (a protocol, a cipher, a curve, the certificate) fails with sslyze's own
list of issues. sslyze's OpenSSL cannot offer the ML-KEM hybrids, so the post-quantum group
nginx may add on OpenSSL 3.5+ (nginx/conf/tls/policy-intermediate.conf) is checked with
nginx's own openssl client instead.
https://ssl-config.mozilla.org/#server=nginx&config=intermediate
tests/e2e/tls_scan.py runs the scan and the check (sslyze's Python API).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
from tls_scan import intermediate_issues
from tls_scan import scan as sslyze_scan

if TYPE_CHECKING:
    from sslyze import ServerScanResult

    from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def scan(stack: Stack) -> ServerScanResult:
    assert stack.cafile is not None
    return sslyze_scan("localhost", stack.https_port, stack.cafile)


def test_edge_is_compliant_with_mozilla_intermediate(scan: ServerScanResult) -> None:
    issues = intermediate_issues(scan)
    assert not issues, f"not Mozilla intermediate: {issues}"


def test_curves_are_exactly_the_profiles(scan: ServerScanResult) -> None:
    # The compliance check only fails on extra curves; a missing one would also be drift.
    result = scan.scan_result.elliptic_curves.result if scan.scan_result else None
    assert result is not None
    assert result.supported_curves is not None
    supported = {curve.name for curve in result.supported_curves}
    assert supported == {"X25519", "secp256r1", "secp384r1"}, supported


def _offered_group(stack: Stack, group: str) -> str:
    """The group nginx negotiates with a client (nginx's own openssl) offering only `group`."""
    proc = stack.exec(
        "nginx",
        "sh",
        "-c",
        "echo | openssl s_client -connect 127.0.0.1:8443 -servername localhost "
        f"-tls1_3 -groups {group} 2>&1 | grep -i 'temp key\\|negotiated\\|alert' || true",
        check=False,
    )
    return proc.stdout


def test_post_quantum_hybrid_when_openssl_has_it(stack: Stack) -> None:
    groups = stack.exec("nginx", "sh", "-c", "openssl list -tls-groups 2>/dev/null || true")
    if "X25519MLKEM768" not in groups.stdout:
        pytest.skip("this nginx image's OpenSSL has no X25519MLKEM768 (< 3.5)")
    answer = _offered_group(stack, "X25519MLKEM768")
    assert "X25519MLKEM768" in answer, answer
    # A group outside the list (X448) is refused, as sslyze saw from outside.
    refused = _offered_group(stack, "X448")
    assert "X448" not in refused.replace("-groups X448", ""), refused
