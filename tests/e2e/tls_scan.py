"""sslyze against the stack's published HTTPS port, judged by Mozilla's "intermediate" profile.

Shared by test_tls_policy.py (nginx's own certificate) and test_acme.py (the ACME one): one
scan of the commands the Mozilla checker needs, the server's certificate trusted through
`ca_file`, and the checker's verdict as a list of issues (empty: compliant).
https://nabla-c0d3.github.io/sslyze/documentation/ (the Python API used here)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sslyze import (
    CertificateInfoExtraArgument,
    ScanCommandsExtraArguments,
    Scanner,
    ServerNetworkLocation,
    ServerScanRequest,
    ServerScanStatusEnum,
)
from sslyze.mozilla_tls_profile.tls_config_checker import (
    SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
    MozillaTlsConfiguration,
    ServerNotCompliantWithTlsConfiguration,
    TlsConfigurationEnum,
    check_server_against_tls_configuration,
)

if TYPE_CHECKING:
    from pathlib import Path

    from sslyze import ServerScanResult

__all__ = ["intermediate_issues", "scan"]


def scan(server_name: str, port: int, ca_file: Path) -> ServerScanResult:
    """Scan 127.0.0.1:`port` with SNI `server_name`, trusting `ca_file`."""
    request = ServerScanRequest(
        server_location=ServerNetworkLocation(server_name, port, "127.0.0.1"),
        scan_commands=SCAN_COMMANDS_NEEDED_BY_MOZILLA_CHECKER,
        scan_commands_extra_arguments=ScanCommandsExtraArguments(
            certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca_file)
        ),
    )
    scanner = Scanner()
    scanner.queue_scans([request])
    (result,) = scanner.get_results()
    assert result.scan_status == ServerScanStatusEnum.COMPLETED, result.connectivity_error_trace
    return result


def intermediate_issues(result: ServerScanResult) -> dict[str, str]:
    """What keeps the server from Mozilla's intermediate profile (empty: nothing)."""
    profile = MozillaTlsConfiguration.get(TlsConfigurationEnum.MOZILLA_INTERMEDIATE)
    try:
        check_server_against_tls_configuration(result, profile)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return dict(exc.issues)
    return {}
