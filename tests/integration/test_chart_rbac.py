"""The chart's RBAC on a real kube-apiserver (RBAC on): installed with the real helm, then the
chart's ServiceAccount, through a token from the TokenRequest API, does what the operator does and
is refused everything else. Prints the install time and the verbs granted.

Running the operator itself under this token through a job to Succeeded is the operator's e2e
(tests/e2e); here every API call the operator makes (finetune_operator.kube) is made with the token.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from chart_install import installed_chart, kubectl, ok
from chart_tools import REPO

pytestmark = pytest.mark.cluster

# (verb, resource, subresource, namespace-or-None): what the operator needs.
ALLOWED = [
    ("get", "finetunejobs.finetune.dev", "", "team"),
    ("list", "finetunejobs.finetune.dev", "", None),
    ("watch", "finetunejobs.finetune.dev", "", None),
    ("patch", "finetunejobs.finetune.dev", "", "team"),
    ("patch", "finetunejobs.finetune.dev", "status", "team"),
    ("update", "finetunejobs.finetune.dev", "status", "team"),
    ("create", "jobs.batch", "", "team"),
    ("delete", "jobs.batch", "", "team"),
    ("watch", "jobs.batch", "", None),
    ("list", "pods", "", "team"),
    ("create", "events", "", "team"),
    ("create", "tokenreviews.authentication.k8s.io", "", None),
]
# What it must not do: read Secrets' values, make or kill pods itself, or touch anything else.
DENIED = [
    ("get", "secrets", "", "team"),
    ("list", "secrets", "", None),
    ("watch", "secrets", "", "release"),
    ("create", "pods", "", "team"),
    ("delete", "pods", "", "team"),
    ("create", "pods", "eviction", "team"),
    ("get", "pods", "log", "team"),
    ("create", "pods", "exec", "team"),
    ("delete", "namespaces", "", None),
    ("create", "namespaces", "", None),
    ("create", "finetunejobs.finetune.dev", "", "team"),
    ("delete", "finetunejobs.finetune.dev", "", "team"),
    ("get", "configmaps", "", "team"),
    ("create", "deployments.apps", "", "team"),
    ("create", "serviceaccounts", "token", "team"),
    ("update", "customresourcedefinitions.apiextensions.k8s.io", "", None),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io", "", None),
    ("bind", "clusterroles.rbac.authorization.k8s.io", "", None),
    ("impersonate", "serviceaccounts", "", "team"),
    ("update", "nodes", "", None),
    ("create", "leases.coordination.k8s.io", "", "team"),
]
# Granted to every authenticated user by the default ClusterRoles (system:basic-user & co.).
DEFAULT_GRANTS = {
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
}
DOCUMENTED = {
    "finetunejobs.finetune.dev": {"get", "list", "watch", "patch", "update"},
    "finetunejobs.finetune.dev/status": {"get", "patch", "update"},
    "jobs.batch": {"create", "get", "list", "watch", "patch", "delete"},
    "pods": {"get", "list", "watch"},
    "events": {"create", "patch", "list"},
    "tokenreviews.authentication.k8s.io": {"create"},
}


@pytest.fixture(scope="module")
def install(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The chart with replicas=2, so the leader-election Role is there too."""
    with installed_chart(cluster, tmp_path_factory.mktemp("sa"), "--set", "replicas=2") as release:
        yield release


def can_i(install: dict[str, Any], verb: str, resource: str, sub: str, ns: str | None) -> bool:
    args = ["auth", "can-i", verb, resource]
    if sub:
        args.append(f"--subresource={sub}")
    args += ["-n", install["namespaces"][ns]] if ns else ["--all-namespaces"]
    done = kubectl(install["sa"], *args)
    assert done.stdout.strip() in ("yes", "no"), done.stdout + done.stderr
    return done.stdout.strip() == "yes"


def test_the_token_is_the_charts_service_account(install):
    review = json.loads(ok(kubectl(install["sa"], "auth", "whoami", "-o", "json")))
    username = review["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{install['namespaces']['release']}:{install['fullname']}"


@pytest.mark.parametrize("check", ALLOWED, ids=lambda c: f"{c[0]}-{c[1]}{'/' + c[2] if c[2] else ''}")
def test_allowed(install, check):
    assert can_i(install, *check)


@pytest.mark.parametrize("check", DENIED, ids=lambda c: f"{c[0]}-{c[1]}{'/' + c[2] if c[2] else ''}")
def test_denied(install, check):
    assert not can_i(install, *check)


def test_lease_only_the_charts_own(install):
    ns = install["namespaces"]["release"]
    assert (
        ok(
            kubectl(install["sa"], "auth", "can-i", "update", f"leases/{install['fullname']}", "-n", ns)
        ).strip()
        == "yes"
    )
    assert (
        kubectl(install["sa"], "auth", "can-i", "update", "leases/kube-scheduler", "-n", ns).stdout.strip()
        == "no"
    )
    assert kubectl(install["sa"], "auth", "can-i", "create", "leases", "-n", ns).stdout.strip() == "yes"


def test_granted_verbs_are_exactly_the_documented_ones(install):
    """What `kubectl auth can-i --list` shows (a SelfSubjectRulesReview, here as JSON) in a job
    namespace: nothing beyond docs/install.md's table."""
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview",
              "spec": {"namespace": install["namespaces"]["team"]}}  # fmt: skip
    answer = json.loads(
        ok(
            kubectl(
                install["sa"], "create", "--validate=false", "-o", "json", "-f", "-", stdin=json.dumps(review)
            )
        )
    )
    rules = answer["status"]["resourceRules"]
    granted: dict[str, set[str]] = {}
    for rule in rules:
        if rule.get("resourceNames"):
            continue
        for group in rule.get("apiGroups") or [""]:
            for resource in rule["resources"]:
                name = resource if not group else f"{resource.split('/')[0]}.{group}" + (
                    f"/{resource.split('/')[1]}" if "/" in resource else "")  # fmt: skip
                granted.setdefault(name, set()).update(rule["verbs"])
    for default in DEFAULT_GRANTS:
        granted.pop(default, None)
    print("\nRBAC verbs granted to the operator's ServiceAccount:")
    for name in sorted(granted):
        print(f"  {name}: {', '.join(sorted(granted[name]))}")
    assert granted == DOCUMENTED
    docs = (REPO / "docs" / "install.md").read_text()
    for name, verbs in DOCUMENTED.items():
        assert f"| `{name}` | {', '.join(sorted(verbs))} |" in docs, (
            f"docs/install.md lacks the row for {name}"
        )


def test_the_operators_api_calls_work_with_the_token_and_secrets_do_not(install):
    """The calls of finetune_operator.kube, made for real with the ServiceAccount's token."""
    admin, sa = install["admin"], install["sa"]
    team = install["namespaces"]["team"]
    ftj = {
        "apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "rbac", "namespace": team},
        "spec": {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "Conard/fortune-telling"}},
    }  # fmt: skip
    ok(kubectl(admin, "apply", "-f", "-", stdin=json.dumps(ftj)))
    ok(kubectl(sa, "get", "ftj", "rbac", "-n", team))
    status = {"status": {"phase": "Pending", "message": "creating the training Job"}}
    ok(
        kubectl(
            sa,
            "patch",
            "ftj",
            "rbac",
            "-n",
            team,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )
    )
    job = {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "rbac", "namespace": team},
        "spec": {"suspend": True, "template": {"spec": {"restartPolicy": "Never", "containers": [
            {"name": "trainer", "image": "busybox:1.36", "command": ["true"]}]}}},
    }  # fmt: skip
    ok(kubectl(sa, "create", "--validate=false", "-f", "-", stdin=json.dumps(job)))
    ok(kubectl(sa, "patch", "job", "rbac", "-n", team, "--type=merge", "-p", '{"spec":{"suspend":false}}'))
    ok(kubectl(sa, "get", "pods", "-n", team))
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
              "spec": {"token": "not-a-token", "audiences": ["finetune-operator"]}}  # fmt: skip
    answer = json.loads(
        ok(kubectl(sa, "create", "--validate=false", "-o", "json", "-f", "-", stdin=json.dumps(review)))
    )
    assert answer["status"].get("authenticated") is not True
    ok(kubectl(sa, "delete", "job", "rbac", "-n", team))

    ok(
        kubectl(
            admin,
            "create",
            "secret",
            "generic",
            "finetune-s3",
            "-n",
            team,
            "--from-literal=AWS_SECRET_ACCESS_KEY=x",
        )
    )
    for refused in (
        ("get", "secret", "finetune-s3", "-n", team),
        ("get", "secrets", "-A"),
        ("run", "direct", "--image=busybox:1.36", "-n", team),
        ("delete", "namespace", team),
        ("get", "configmaps", "-n", install["namespaces"]["release"]),
    ):
        done = kubectl(sa, *refused)
        assert done.returncode != 0 and "forbidden" in done.stderr.lower(), (
            refused,
            done.stdout,
            done.stderr,
        )
