"""promtool on the real files: config, rules, rule unit tests, every dashboard query.

Marked `static`: they need promtool, from the Prometheus base image (see conftest.py).
"""

from __future__ import annotations

import re

import pytest
import yaml

from tests.monitoring import promql
from tests.monitoring.conftest import Promtool

pytestmark = pytest.mark.static


def _ok(result: object) -> None:
    assert result.returncode == 0, f"promtool failed:\n{result.stdout}\n{result.stderr}"  # type: ignore[attr-defined]


def test_config_is_valid(promtool: Promtool) -> None:
    result = promtool.run("check", "config", promtool.config())
    _ok(result)
    # The glob in rule_files must find every rules file, not silently none.
    assert f"SUCCESS: {len(promql.rule_files())} rule files found" in result.stdout


def test_rules_are_valid(promtool: Promtool) -> None:
    _ok(promtool.run("check", "rules", *[promtool.path(p) for p in promql.rule_files()]))


def test_rule_unit_tests_pass(promtool: Promtool) -> None:
    # cwd = the tests folder: rule_files in the tests are relative to it.
    tests = [p.name for p in promql.rule_test_files()]
    result = promtool.run("test", "rules", *tests, cwd=promql.RULE_TESTS_DIR)
    _ok(result)
    assert result.stdout.count("SUCCESS") == len(tests)


def test_every_dashboard_query_parses(promtool: Promtool) -> None:
    """Each panel query, Grafana variables substituted, as a recording rule promtool parses."""
    queries = promql.panel_queries()
    assert queries
    rules = [
        {"record": f"dashboard_check:query_{i}", "expr": query.promql()}
        for i, query in enumerate(queries)
    ]
    rules_file = promtool.scratch / "dashboard_queries.yml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    rules_file.chmod(0o644)
    result = promtool.run("check", "rules", promtool.path(rules_file))
    if result.returncode != 0:
        index = {f"dashboard_check:query_{i}": q.name for i, q in enumerate(queries)}
        detail = result.stdout + result.stderr
        named = [name for key, name in index.items() if re.search(rf"{key}\b", detail)]
        pytest.fail(f"dashboard queries do not parse: {named}\n{detail}")
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
