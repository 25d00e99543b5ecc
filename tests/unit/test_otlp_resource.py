"""server/otlp.py: the service's name and version on every exported span."""

from __future__ import annotations

import pytest

from server.otlp import service_resource


def test_named_after_the_app_package_when_the_sdk_has_no_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    attributes = service_resource("shop.main:app", "v7").attributes
    assert attributes["service.name"] == "shop"
    assert attributes["service.version"] == "v7"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_SERVICE_NAME", "checkout"), ("OTEL_RESOURCE_ATTRIBUTES", "service.name=checkout")],
)
def test_the_sdk_variables_name_it_when_set(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    monkeypatch.setenv(variable, value)
    assert service_resource("app.main:app", "dev").attributes["service.name"] == "checkout"
