"""What deploy/ ships, read the way Prometheus and Grafana read it: shared by the unit test (the
files are valid) and the integration test (every metric they name is exposed by a real process)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERT_RULES = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"

# Series Prometheus makes itself for every target.
PROMETHEUS_OWN = {"up"}
# Our metric names (a sample's name: counters end in _total, histograms in _bucket/_sum/_count).
_METRIC = re.compile(r"\b(saga_[a-z0-9_]+|up)\b")


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboards() -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text()) for p in sorted(DASHBOARDS.glob("*.json"))}


def panel_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", [])]
    return exprs


def metric_names(expr: str) -> set[str]:
    return set(_METRIC.findall(expr))


def names_used() -> dict[str, set[str]]:
    """Metric name -> where it is used (an alert's name or a dashboard panel's file)."""
    used: dict[str, set[str]] = {}
    for rule in rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for file, dashboard in dashboards().items():
        for expr in panel_exprs(dashboard):
            for name in metric_names(expr):
                used.setdefault(name, set()).add(f"dashboard {file}")
    return used
