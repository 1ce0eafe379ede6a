"""The Grafana dashboard and the chart's alert rules query only metrics the code really registers.

The registries are the real ones: every class of `finetune_operator.metrics` and
`finetune_trainer.progress` that builds a `CollectorRegistry` is instantiated and its registry
collected, so renaming a metric in the code without the dashboard fails here.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path

from chart_tools import helm_template
from prometheus_client import CollectorRegistry
from prometheus_client.registry import REGISTRY

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dashboard.json"
METRICS_MODULES = ("finetune_operator.metrics", "finetune_trainer.progress")
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
PROMETHEUS_SYNTHETIC = {"up"}  # written by Prometheus itself for every target

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def registries() -> list[CollectorRegistry]:
    found = []
    for name in METRICS_MODULES:
        module = importlib.import_module(name)
        for value in vars(module).values():
            if isinstance(value, CollectorRegistry):
                found.append(value)
            elif inspect.isclass(value) and value.__module__ == name and _no_required_args(value):
                instance = value()
                found += [v for v in vars(instance).values() if isinstance(v, CollectorRegistry)]
    return found


def _no_required_args(cls: type) -> bool:
    params = list(inspect.signature(cls).parameters.values())
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params)


def registered_names() -> set[str]:
    names = set(PROMETHEUS_SYNTHETIC)
    for registry in [*registries(), REGISTRY]:
        for family in registry.collect():
            names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES[family.type]}
    return names


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (or a Grafana `label_values(metric, label)` query)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\boffset\s+\S+", "", expr)
    expr = re.sub(r"\$\w+|\$\{[^}]*\}", "", expr)  # Grafana variables
    expr = re.sub(r"label_values\(([^,()]+),[^)]*\)", r"\1", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, rest = match.group(0), expr[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue  # a function or an operator
        if not re.fullmatch(r"\d+(\.\d+)?[a-z]*", word):
            names.add(word)
    return names


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in doc["panels"]:
        queries += [t["expr"] for t in panel.get("targets", [])]
    for variable in doc["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def test_metric_name_extraction():
    """The extractor itself: functions, keywords, labels, durations and strings are not metrics."""
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_seconds_bucket{job="x", le!="+Inf"}[5m])))'
        " / on (job) group_left max(b_total offset 1h) > bool 3 and absent(up == 1)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "up"}
    assert metric_names('label_values(c{namespace=~"$namespace"}, name)') == {"c"}


def test_registries_are_found_and_hold_the_projects_metrics():
    names = registered_names()
    assert any(n.startswith("finetune_operator_") for n in names), "no operator registry found"
    assert any(n.startswith("finetune_trainer_") for n in names), "no trainer registry found"


def test_every_dashboard_query_names_a_registered_metric():
    names = registered_names()
    queries = dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        used = metric_names(query)
        assert used, f"no metric in {query!r}"
        assert used <= names, f"{query!r} names unregistered {sorted(used - names)}"


def test_dashboard_covers_what_a_platform_team_watches():
    used = set().union(*(metric_names(q) for q in dashboard_queries()))
    for wanted in (
        "finetune_operator_jobs",  # jobs by phase
        "finetune_operator_job_loss",  # loss per job
        "finetune_trainer_tokens_per_second",  # tokens/s per job
        "finetune_operator_preemptions_total",
        "finetune_operator_checkpoint_duration_seconds_bucket",
        "finetune_operator_gpu_seconds_total",
    ):
        assert wanted in used, wanted


def test_every_panel_uses_the_datasource_variable():
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))


def test_alert_rules_name_registered_metrics():
    rendered = helm_template("--set", "metrics.prometheusRule.enabled=true")
    rules = [d for d in rendered if d["kind"] == "PrometheusRule"]
    assert len(rules) == 1
    names = registered_names()
    alerts = {}
    for group in rules[0]["spec"]["groups"]:
        for rule in group["rules"]:
            used = metric_names(rule["expr"])
            assert used and used <= names, f"{rule['alert']}: unregistered {sorted(used - names)}"
            alerts[rule["alert"]] = used
    assert {
        "FineTuneJobFailed",
        "FineTuneJobStuck",
        "FineTuneJobPreemptedOften",
        "FineTuneOperatorDown",
    } <= set(alerts)
