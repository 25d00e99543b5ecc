from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, SettingsError, load_settings


def test_defaults_are_production_ready() -> None:
    settings = load_settings({})
    assert settings.app_module == "app.main:app"
    assert settings.port == 8000
    assert settings.metrics_port == 9000
    assert settings.web_concurrency is None  # derived from the CPU quota
    assert settings.log_format == "json"
    # Timeouts nest: uvicorn's graceful shutdown < gunicorn's graceful timeout.
    assert settings.shutdown_timeout < settings.graceful_timeout
    # The app's keep-alive outlives nginx's upstream keepalive_timeout (60 s).
    assert settings.keepalive_timeout > 60
    assert settings.prometheus_multiproc_dir == Path("/tmp/prometheus-multiproc")


def test_values_are_parsed_and_normalised() -> None:
    settings = load_settings(
        {
            "WEB_CONCURRENCY": "3",
            "LOG_LEVEL": "WARNING",
            "LOG_FORMAT": " Console ",
            "FORWARDED_ALLOW_IPS": "172.28.0.0/16, 10.0.0.1",
            "APP_MODULE": "my_service.api:application",
        }
    )
    assert settings.web_concurrency == 3
    assert settings.log_level == "warning"
    assert settings.log_format == "console"
    assert settings.forwarded_allow_ips == "172.28.0.0/16,10.0.0.1"
    assert settings.app_module == "my_service.api:application"


def test_shutdown_delay_zero_disables_the_drain() -> None:
    assert load_settings({"SHUTDOWN_DELAY": "0"}).shutdown_delay == 0


def test_reload_is_off_unless_asked_for() -> None:
    assert load_settings({}).reload is False
    assert load_settings({"RELOAD": "true"}).reload is True


def test_empty_web_concurrency_means_auto() -> None:
    assert load_settings({"WEB_CONCURRENCY": ""}).web_concurrency is None


@pytest.mark.parametrize(
    ("variable", "value", "accepts"),
    [
        ("PORT", "0", "an integer from 1 to 65535"),
        ("PORT", "http", "an integer from 1 to 65535"),
        ("WORKER_TIMEOUT", "-5", "whole seconds from 1 to 3600"),
        ("WEB_CONCURRENCY", "many", "an integer from 1 to 256"),
        ("LOG_LEVEL", "verbose", "one of debug, info, warning, error, critical"),
        ("LOG_FORMAT", "xml", "one of json, console"),
        ("FORWARDED_ALLOW_IPS", "proxy.local", "a comma-separated list of IPs or CIDRs"),
        ("APP_MODULE", "app.main", 'an import string "module:attribute"'),
        ("MAX_REQUESTS", "-1", "an integer >= 0"),
        ("SHUTDOWN_DELAY", "-1", "whole seconds from 0 to 300"),
        ("SHUTDOWN_DELAY", "5s", "whole seconds from 0 to 300"),
        ("SHUTDOWN_DELAY", "301", "whole seconds from 0 to 300"),
        ("RELOAD", "sometimes", "true or false"),
        ("WS_PING_INTERVAL", "0", "whole seconds from 1 to 3600"),
        ("WS_PING_TIMEOUT", "soon", "whole seconds from 1 to 3600"),
        ("WS_MAX_MESSAGE_SIZE", "1MB", "bytes, an integer from 1 to 67108864"),
        ("WS_MAX_MESSAGE_SIZE", "0", "bytes, an integer from 1 to 67108864"),
    ],
)
def test_invalid_value_names_variable_and_what_it_accepts(
    variable: str, value: str, accepts: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({variable: value})
    message = str(caught.value)
    assert message.startswith(f"invalid setting: {variable}={value!r} is invalid: expected ")
    assert accepts in message
    assert "\n" not in message


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings({"PORT": "x", "LOG_FORMAT": "xml"})
    assert "PORT='x'" in str(caught.value)
    assert "LOG_FORMAT='xml'" in str(caught.value)


def test_timeouts_must_nest() -> None:
    with pytest.raises(SettingsError, match="SHUTDOWN_TIMEOUT must be less than GRACEFUL_TIMEOUT"):
        load_settings({"SHUTDOWN_TIMEOUT": "30", "GRACEFUL_TIMEOUT": "30"})


def test_metrics_port_must_differ_from_port() -> None:
    with pytest.raises(SettingsError, match="METRICS_PORT must differ from PORT"):
        load_settings({"PORT": "9000"})


def test_every_setting_is_documented_in_env_example() -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    documented = {
        line.split("=", 1)[0].lstrip("# ").strip()
        for line in example.splitlines()
        if "=" in line and line.lstrip("# ")[:1].isupper()
    }
    aliases = {field.alias for field in Settings.model_fields.values()}
    assert aliases <= documented, aliases - documented


def test_otlp_endpoint_is_off_when_empty_and_must_be_a_url() -> None:
    assert load_settings({}).otel_exporter_otlp_endpoint is None
    assert load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": ""}).otel_exporter_otlp_endpoint is None
    url = "http://collector:4318"
    assert load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": url}).otel_exporter_otlp_endpoint == url
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_ENDPOINT='collector:4318'"):
        load_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"})
