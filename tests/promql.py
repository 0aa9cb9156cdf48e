"""What the shipped dashboards and alert rules ask Prometheus for, and what the code exports.

Shared by tests/test_dashboards.py and tests/test_deploy_files.py. The PromQL reading is
deliberately small: enough to find metric and label names in the expressions this
project writes (selectors, aggregations with by/without, binary operators, functions),
and checked against known expressions in test_dashboards.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"

# Metrics that other programs export: Prometheus itself (up) and NVIDIA's DCGM exporter
# (default counters of dcgm-exporter, run by docker-compose.yml's gpu profile).
PROMETHEUS_SYNTHETIC = {"up"}
DCGM_METRICS = {
    "DCGM_FI_DEV_GPU_UTIL",
    "DCGM_FI_DEV_FB_USED",
    "DCGM_FI_DEV_FB_FREE",
    "DCGM_FI_DEV_POWER_USAGE",
    "DCGM_FI_DEV_GPU_TEMP",
}
DCGM_LABELS = {"gpu", "UUID", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION"}
# Labels Prometheus adds (job, instance) or histograms carry (le).
TARGET_LABELS = {"job", "instance", "le", "__name__"}

# Grafana's built-in variables, substituted before an expression reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$__interval": "15s", "$__range": "1h"}

_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^{}]*)\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w:$.])([A-Za-z_:][\w:]*)(?![\w:])")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")


@dataclass(frozen=True)
class Query:
    where: str  # "dashboard imgsearch.json, panel 'X', target A" / "alert X"
    expr: str  # as written (Grafana variables not yet substituted)
    external: bool  # every metric comes from an exporter that needs GPUs

    @property
    def promql(self) -> str:
        return substitute(self.expr)


def substitute(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    leftover = re.findall(r"\$\w+", expr)
    if leftover:
        raise ValueError(f"unknown Grafana variables {leftover} in {expr!r}")
    return expr


def _strip_strings(expr: str) -> str:
    return _STRING.sub('""', expr)


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects."""
    text = _strip_strings(expr)
    text = _MATCHERS.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group(1)
        rest = text[match.end():].lstrip()
        if rest.startswith("(") or name in _KEYWORDS:
            continue  # a function or aggregation, or an operator keyword
        names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """Label names an expression matches on or groups by."""
    text = _strip_strings(expr)
    labels: set[str] = set()
    for body in _MATCHERS.findall(text):
        labels.update(_MATCHER_LABEL.findall(body))
    for _kw, body in _GROUPING.findall(text):
        labels.update(part.strip() for part in body.split(",") if part.strip())
    return labels


def is_external(names: set[str]) -> bool:
    return bool(names) and names <= DCGM_METRICS


def dashboard_files() -> list[Path]:
    return sorted(DASHBOARDS.glob("*.json"))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that draws data (rows are containers; collapsed rows nest panels)."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from (p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            yield panel


def dashboard_queries() -> list[Query]:
    queries = []
    for path in dashboard_files():
        dashboard = json.loads(path.read_text())
        for panel in panels(dashboard):
            for target in panel.get("targets", []):
                expr = target.get("expr", "")
                queries.append(Query(
                    f"{path.name}, panel {panel.get('title')!r}, target {target.get('refId')}",
                    expr, is_external(metric_names(expr)),
                ))
    return queries


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def alert_queries() -> list[Query]:
    return [Query(f"alert {rule.get('alert') or rule.get('record')}", rule["expr"], False)
            for rule in alert_rules()]


@dataclass(frozen=True)
class Exported:
    """Series names and label names the code's metrics produce."""

    names: set[str]
    labels: dict[str, set[str]]  # series name -> label names


@functools.cache
def exported_metrics() -> Exported:
    """Read prometheus_client's default registry after importing the metric modules."""
    import ingest_worker.metrics  # noqa: F401 - registers the worker's metrics
    import query_api.metrics  # noqa: F401 - registers the API's metrics
    from prometheus_client import REGISTRY

    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "stateset": ("",),
        "enum": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):  # noqa: SLF001 - no public listing
        declared = set(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            for suffix in suffixes.get(family.type, ("",)):
                series = family.name + suffix
                names.add(series)
                labels.setdefault(series, set()).update(declared)
            for sample in family.samples:
                names.add(sample.name)
                labels.setdefault(sample.name, set()).update(sample.labels)
    return Exported(names, labels)
