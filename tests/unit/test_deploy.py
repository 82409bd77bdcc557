"""deploy/ is what Prometheus and Grafana load: promtool accepts the config and the rules, the
rules' own tests pass, and the dashboard is JSON Grafana provisions against the right data source.
promtool comes from Debian's prometheus package (scripts/promtool.sh, run by `make test`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tests.deploy_files import (
    ALERT_RULES,
    ALERT_TESTS,
    GRAFANA_PROVISIONING,
    PROMETHEUS_CONFIG,
    dashboards,
    metric_names,
    names_used,
    panel_exprs,
    rules,
)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: run scripts/promtool.sh (`make test` does)"
    return subprocess.run(
        [exe, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    result = promtool("check", "rules", ALERT_RULES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_config_and_the_rules_it_loads() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_each_alert_fires_on_its_case_and_only_after_its_for() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The check can fail: a rule with a PromQL syntax error does not pass."""
    broken = tmp_path / "broken.yml"
    broken.write_text(
        yaml.safe_dump(
            {"groups": [{"name": "g", "rules": [{"alert": "A", "expr": "sum(saga_stuck"}]}]}
        )
    )
    assert promtool("check", "rules", broken).returncode != 0


def test_the_alerts_of_the_issue_exist() -> None:
    alerts = {rule["alert"] for rule in rules()}
    assert {
        "SagaStuck",
        "SagaOutboxLag",
        "SagaDeadLettersGrowing",
        "SagaNoConsumer",
        "SagaParked",
        "SagaProcessDown",
    } <= alerts
    for rule in rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_contract_process_is_scraped() -> None:
    from orchestrator.ops.processes import process_table

    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert set(process_table()) <= jobs


def test_the_dashboard_is_json_with_a_query_in_every_panel() -> None:
    found = dashboards()
    assert found, "no dashboard in deploy/grafana/dashboards"
    source: dict[str, Any] = yaml.safe_load(
        (GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    for name, dashboard in found.items():
        assert dashboard["uid"] and dashboard["title"], name
        panels = [p for p in dashboard["panels"] if p["type"] != "row"]
        assert panels, name
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in panels:
            assert panel["datasource"]["uid"] == uid, panel["title"]
            assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        assert all(metric_names(expr) for expr in panel_exprs(dashboard)), name


def test_the_names_check_finds_metric_names() -> None:
    """What the integration test compares with real scrapes (test_observability.py)."""
    assert metric_names(
        'histogram_quantile(0.95, sum by (le) (rate(saga_step_duration_seconds_bucket{x="y"}[5m])))'
    ) == {"saga_step_duration_seconds_bucket"}
    used = names_used()
    assert "saga_queue_consumers" in used and "saga_stuck" in used
    assert not any(name.startswith("rabbitmq_") for name in used)
