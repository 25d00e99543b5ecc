"""scripts/deploy.py without Docker: its settings, lock, durations and failure reasons.
The roll itself runs against a real compose stack in tests/e2e/test_deploy.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.scripts import load_script

deploy = load_script("deploy")


def test_dotenv_lines_are_read_like_compose(tmp_path: Path) -> None:
    env = tmp_path / ".env"
    env.write_text(
        "# DEPLOY_TIMEOUT=1\n"
        "DEPLOY_TIMEOUT=45\n"
        "export APP_VERSION='v 2'\n"
        'QUOTED="x=y"\n'
        "not a setting\n"
    )
    assert deploy.read_dotenv(env) == {
        "DEPLOY_TIMEOUT": "45",
        "APP_VERSION": "v 2",
        "QUOTED": "x=y",
    }
    assert deploy.read_dotenv(tmp_path / "missing") == {}


def test_settings_default_and_precedence() -> None:
    assert deploy.load_settings({}, {}) == {"DEPLOY_TIMEOUT": deploy.DEFAULTS["DEPLOY_TIMEOUT"]}
    assert deploy.load_settings({}, {"DEPLOY_TIMEOUT": "30"})["DEPLOY_TIMEOUT"] == 30
    # The environment wins over .env, as in compose.
    env = {"DEPLOY_TIMEOUT": "60"}
    assert deploy.load_settings(env, {"DEPLOY_TIMEOUT": "30"})["DEPLOY_TIMEOUT"] == 60


@pytest.mark.parametrize("value", ["soon", "-5", "5", "99999", "1.5"])
def test_a_bad_setting_is_refused_by_name(value: str) -> None:
    with pytest.raises(deploy.Refused) as caught:
        deploy.load_settings({"DEPLOY_TIMEOUT": value}, {})
    assert str(caught.value).startswith(f"DEPLOY_TIMEOUT={value!r} is invalid: expected ")


@pytest.mark.parametrize(
    ("text", "seconds"), [("40s", 40), ("1m30s", 90), ("500ms", 1), (40_000_000_000, 40), (7, 7)]
)
def test_compose_durations(text: str | int, seconds: int) -> None:
    assert deploy._duration(text) == seconds


def test_a_second_deploy_of_the_project_is_refused_while_one_runs() -> None:
    with deploy.deploy_lock("unit-test-project", "deploy"):
        with pytest.raises(deploy.Refused) as caught, deploy.deploy_lock("unit-test-project", "x"):
            pass
        message = str(caught.value)
        assert "another deploy of project 'unit-test-project' is running" in message
        assert "`make deploy`, pid " in message  # who holds it
        with deploy.deploy_lock("another-project", "deploy"):  # other projects are free
            pass
    with deploy.deploy_lock("unit-test-project", "rollback"):  # freed on exit
        pass


def test_the_reason_is_the_apps_own_message() -> None:
    replica = deploy.Replica(
        id="c0ffee",
        name="p-app-3",
        image="sha256:1",
        configured="app:v2",
        status="restarting",
        health="",
        exit_code=78,
        restarts=2,
        started="",
    )
    line = {"level": "critical", "event": "invalid setting: WORKER_TIMEOUT='soon' is invalid"}
    lines = ["plain text", json.dumps(line), json.dumps({"level": "info", "event": "x"})]
    assert deploy._why(replica, lines) == line["event"]
    assert replica.crashed
    assert deploy._why(replica, ["Traceback ..."]) == "exited with status 78"


def test_log_lines_carry_the_core_keys(capsys: pytest.CaptureFixture[str]) -> None:
    deploy.log("built", image="app:v2", seconds=1.5)
    record = json.loads(capsys.readouterr().out)
    assert record["event"] == "built"
    assert {"timestamp", "level", "logger", "event", "pid"} <= set(record)
    assert record["timestamp"].endswith("Z")
