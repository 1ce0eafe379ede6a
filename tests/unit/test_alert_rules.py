"""The chart's alert rules in promtool (built from Prometheus's Go module by hack/cluster-bins.sh):
`check rules --lint=all`, and `test rules` for every alert, firing and not firing, on the series
the operator really exports (gauges set from the watched status, counters per replica).

Series are written in promtool's notation at one sample a minute (`0+1x30`: 0, 1, ... 30; `_`: no
sample), the rules evaluated every minute."""

from __future__ import annotations

import subprocess
from pathlib import Path

import consumers
import pytest
import yaml
from chart_tools import helm_template

OPERATOR = 'finetune_operator_jobs{phase="Failed", instance="10.0.0.7:8080", pod="ftop-0"}'
STEP = 'finetune_operator_job_step{namespace="team-a", name="medical-r1", pod="ftop-0"}'
JOB_LABELS = {"namespace": "team-a", "name": "medical-r1", "severity": "warning"}


def rendered_rules(*values: str) -> dict:
    """The PrometheusRule's spec (the chart with its default windows unless `values` say otherwise)."""
    rendered = helm_template("--set", "metrics.prometheusRule.enabled=true", *values)
    (rule,) = [d for d in rendered if d["kind"] == "PrometheusRule"]
    return rule["spec"]


def rule(name: str) -> dict:
    (found,) = [r for g in rendered_rules()["groups"] for r in g["rules"] if r.get("alert") == name]
    return found


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(yaml.safe_dump(rendered_rules()))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([consumers.binary("promtool"), *args], capture_output=True, text=True, check=False)


def test_rules_pass_promtool_lint(rules_file):
    done = promtool("check", "rules", "--lint=all", "--lint-fatal", str(rules_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_rules_with_other_windows_pass_promtool_lint(tmp_path):
    values = [
        "--set",
        "metrics.prometheusRule.failedWindow=1h",
        "--set",
        "metrics.prometheusRule.stuckFor=2h",
    ]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rendered_rules(*values)))
    done = promtool("check", "rules", "--lint=all", "--lint-fatal", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def alerts(name: str, labels: dict[str, str] | None = None) -> list[dict]:
    """The one alert `name` with its labels and its annotations as Prometheus expands them."""
    found = rule(name)
    annotations = {
        k: v.replace("{{ $labels.namespace }}", (labels or {}).get("namespace", "")).replace(
            "{{ $labels.name }}", (labels or {}).get("name", "")
        )
        for k, v in found["annotations"].items()
    }
    return [{"exp_labels": labels or dict(found["labels"]), "exp_annotations": annotations}]


# (alert, scenario, input series {series: values}, {evaluation minute: firing alerts or []})
CASES = [
    (
        "FineTuneJobFailed",
        "a job fails within Prometheus's first 15 minutes",
        {OPERATOR: "0 0 0 1x20"},
        {2: [], 4: "fires", 16: "fires", 18: []},
    ),
    (
        "FineTuneJobFailed",
        "a job fails after hours of scraping",
        {OPERATOR: "2x60 3x30"},
        {60: [], 61: "fires", 74: "fires", 76: []},
    ),
    (
        "FineTuneJobFailed",
        "a failed job is deleted, then another fails",
        {OPERATOR: "3x30 2x10 3x20"},
        {35: [], 41: [], 43: "fires"},
    ),
    (
        "FineTuneJobFailed",
        "failed jobs from before, none new",
        {OPERATOR: "4x60"},
        {0: [], 10: [], 30: [], 60: []},
    ),
    (
        "FineTuneJobFailed",
        "two operator replicas see the same failure",
        {OPERATOR: "1x30 2x30", OPERATOR.replace("ftop-0", "ftop-1"): "1x31 2x30"},
        {29: [], 31: "fires"},
    ),
    (
        "FineTuneJobStuck",
        "a new job's first steps",
        {STEP: "_x10 0+1x40"},
        {10: [], 11: [], 30: [], 50: []},
    ),
    (
        "FineTuneJobStuck",
        "a new job that never moves",
        {STEP: "_x10 0x60"},
        {10: [], 39: [], 40: "fires", 60: "fires"},
    ),
    (
        "FineTuneJobStuck",
        "a job that stops moving",
        {STEP: "0+1x60 60x60"},
        {60: [], 88: [], 90: "fires"},
    ),
    (
        "FineTuneJobStuck",
        "a slow job (one step every 10 minutes)",
        {STEP: "0x9 1x9 2x9 3x9 4x9 5x9 6x9 7x9"},
        {50: [], 70: []},
    ),
    (
        "FineTuneJobStuck",
        "a job that finished (its series is gone)",
        {STEP: "0+1x20 _x60"},
        {30: [], 60: []},
    ),
    (
        "FineTuneJobPreemptedOften",
        "five preemptions in ten minutes",
        {"finetune_operator_preemptions_total": "0x10 1+1x4 5x60"},
        {13: [], 15: "fires", 80: []},
    ),
    (
        "FineTuneJobPreemptedOften",
        "two preemptions an hour",
        {"finetune_operator_preemptions_total": "0+0x30 1x30 2x30 3x30 4x30"},
        {60: [], 120: [], 150: []},
    ),
    (
        "FineTuneOperatorDown",
        "the target is down",
        {"up{job=JOB, namespace=NS}": "1x10 0x20"},
        {10: [], 14: [], 16: "fires"},
    ),
    (
        "FineTuneOperatorDown",
        "the target is never scraped",
        {'up{job="other", namespace="monitoring"}': "1x20"},
        {4: [], 6: "fires"},
    ),
    (
        "FineTuneOperatorDown",
        "the target is up",
        {"up{job=JOB, namespace=NS}": "1x30"},
        {0: [], 10: [], 30: []},
    ),
    (
        "FineTuneOperatorReconcileErrors",
        "errors keep coming",
        {"finetune_operator_reconcile_errors_total": "0+1x40"},
        {10: [], 17: "fires", 40: "fires"},
    ),
    (
        "FineTuneOperatorReconcileErrors",
        "a burst of errors that stops",
        {"finetune_operator_reconcile_errors_total": "0+1x5 5x60"},
        {10: [], 20: [], 40: []},
    ),
]


def operator_up_selector() -> tuple[str, str]:
    """The job and namespace labels the chart's ServiceMonitor gives the operator's target."""
    expr = rule("FineTuneOperatorDown")["expr"]
    job = expr.split('job="', 1)[1].split('"', 1)[0]
    namespace = expr.split('namespace="', 1)[1].split('"', 1)[0]
    return job, namespace


@pytest.mark.parametrize(
    ("alert", "series", "expected"),
    [pytest.param(a, s, e, id=f"{a}: {scenario}") for a, scenario, s, e in CASES],
)
def test_alert(alert, series, expected, rules_file, tmp_path):
    job, namespace = operator_up_selector()
    labels = JOB_LABELS if alert == "FineTuneJobStuck" else None
    test = {
        "rule_files": [str(rules_file)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": s.replace("JOB", f'"{job}"').replace("NS", f'"{namespace}"'), "values": v}
                    for s, v in series.items()
                ],
                "alert_rule_test": [
                    {
                        "eval_time": f"{minute}m",
                        "alertname": alert,
                        "exp_alerts": alerts(alert, labels) if firing == "fires" else [],
                    }
                    for minute, firing in expected.items()
                ],
            }
        ],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_firing_and_quiet_cases():
    names = {r["alert"] for g in rendered_rules()["groups"] for r in g["rules"]}
    for name in names:
        outcomes = {bool(f) for a, _, _, e in CASES if a == name for f in e.values()}
        assert outcomes == {True, False}, name
