"""The chart's RBAC and admission policies on a real kube-apiserver (RBAC on): installed with the
real helm serving one namespace (the default: Roles, no cluster-wide Job rights), then the chart's
ServiceAccount, through a token from the TokenRequest API, does what the operator does and is
refused everything else, Jobs outside the served namespace and Jobs that are not trainer Jobs
included; and a user who may only create FineTuneJobs cannot name a Secret they cannot read.
Prints the install time and the verbs granted.

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
from finetune_operator.config import OperatorConfig
from finetune_operator.jobbuilder import build_job

pytestmark = pytest.mark.cluster

CHART_CONFIG = OperatorConfig.model_validate({"storage": {"uri": "s3://platform/jobs"}})
"""The chart's defaults as far as the Jobs go (default image, no trainer ServiceAccount)."""

# (verb, resource, subresource, namespace-or-None): what the operator needs.
ALLOWED = [
    ("get", "finetunejobs.finetune.dev", "", "team"),
    ("list", "finetunejobs.finetune.dev", "", "team"),
    ("watch", "finetunejobs.finetune.dev", "", "team"),
    ("patch", "finetunejobs.finetune.dev", "", "team"),
    ("patch", "finetunejobs.finetune.dev", "status", "team"),
    ("update", "finetunejobs.finetune.dev", "status", "team"),
    ("create", "jobs.batch", "", "team"),
    ("delete", "jobs.batch", "", "team"),
    ("watch", "jobs.batch", "", "team"),
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
    # Only in the namespaces it serves: nothing in its own, in kube-system, or cluster-wide.
    ("create", "jobs.batch", "", "release"),
    ("create", "jobs.batch", "", "kube-system"),
    ("create", "jobs.batch", "", None),
    ("list", "finetunejobs.finetune.dev", "", None),
    ("get", "pods", "", "kube-system"),
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
    """The chart with replicas=2 (so the leader-election Role is there too), serving the team
    namespace only."""
    team = f"{cluster.namespace}-team"  # installed_chart's second namespace
    with installed_chart(
        cluster,
        tmp_path_factory.mktemp("sa"),
        "--set",
        "replicas=2",
        "--set",
        f"config.namespaces={{{team}}}",
    ) as release:
        yield release


def can_i(install: dict[str, Any], verb: str, resource: str, sub: str, ns: str | None) -> bool:
    args = ["auth", "can-i", verb, resource]
    if sub:
        args.append(f"--subresource={sub}")
    args += ["-n", install["namespaces"].get(ns, ns)] if ns else ["--all-namespaces"]
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
        "spec": {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "Conard/fortune-telling"},
                 "suspend": True},
    }  # fmt: skip
    ok(kubectl(admin, "apply", "-f", "-", stdin=json.dumps(ftj)))
    applied = json.loads(ok(kubectl(admin, "get", "ftj", "rbac", "-n", team, "-o", "json")))
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
    # The Job exactly as the operator builds it (the chart's admission policy admits it).
    job = build_job(applied, CHART_CONFIG)
    ok(kubectl(sa, "create", "-f", "-", stdin=json.dumps(job)))
    ok(
        kubectl(
            sa,
            "patch",
            "job",
            "rbac",
            "-n",
            team,
            "--type=merge",
            "-p",
            '{"spec":{"activeDeadlineSeconds":3600}}',
        )
    )
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


# -- the admission policies ---------------------------------------------------------------------


def as_operator(install: dict[str, Any], *args: str) -> list[str]:
    sa = f"system:serviceaccount:{install['namespaces']['release']}:{install['fullname']}"
    return [*args, "--as", sa]


def test_can_i_as_the_operator_shows_job_rights_only_in_served_namespaces(install):
    """`kubectl auth can-i --as` the operator's ServiceAccount, from the admin's kubeconfig."""
    admin = install["admin"]
    answers = {}
    for where in (
        ["-n", install["namespaces"]["team"]],
        ["-n", install["namespaces"]["release"]],
        ["-n", "kube-system"],
        ["-n", "default"],
        ["--all-namespaces"],
    ):
        done = kubectl(admin, *as_operator(install, "auth", "can-i", "create", "jobs.batch", *where))
        answers[where[-1]] = done.stdout.strip()
    print(f"\ncan-i create jobs as the operator: {answers}")
    assert answers == {
        install["namespaces"]["team"]: "yes",
        install["namespaces"]["release"]: "no",
        "kube-system": "no",
        "default": "no",
        "--all-namespaces": "no",
    }


def _operator_job(install: dict[str, Any], name: str) -> dict[str, Any]:
    team = install["namespaces"]["team"]
    ftj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": team, "uid": "00000000-0000-0000-0000-000000000000"},
        "spec": {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "org/data"}, "suspend": True},
    }
    job = build_job(ftj, CHART_CONFIG)
    job["metadata"].pop("ownerReferences")  # no such FineTuneJob: the garbage collector would delete it
    return job


def _pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


TAMPERED = {
    "foreign image": (lambda p: p["containers"][0].update(image="busybox:1.36"), "allowed trainer images"),
    "look-alike image": (
        lambda p: p["containers"][0].update(image="ghcr.io/finetune-dev/finetune-trainer-x:0.1.0"),
        "allowed trainer images",
    ),
    "extra container": (
        lambda p: p["containers"].append(
            {"name": "x", "image": "alpine:3", "securityContext": p["containers"][0]["securityContext"]}
        ),
        "allowed trainer images",
    ),
    "init container": (
        lambda p: p.update(initContainers=[{"name": "x", "image": "alpine:3"}]),
        "allowed trainer images",
    ),
    "hostPath volume": (
        lambda p: p["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "no hostPath",
    ),
    "Secret volume": (
        lambda p: p["volumes"].append({"name": "s", "secret": {"secretName": "anything"}}),
        "no hostPath, other Secret",
    ),
    "projected Secret": (
        lambda p: p["volumes"][2]["projected"]["sources"].append({"secret": {"name": "anything"}}),
        "no hostPath, other Secret",
    ),
    "hostNetwork": (lambda p: p.update(hostNetwork=True), "no host network"),
    "hostPID": (lambda p: p.update(hostPID=True), "no host network, PID"),
    "privileged": (
        lambda p: p["containers"][0]["securityContext"].update(
            privileged=True, allowPrivilegeEscalation=True
        ),
        "unprivileged",
    ),
    "added capability": (
        lambda p: p["containers"][0]["securityContext"].update(capabilities={"add": ["SYS_ADMIN"]}),
        "added",
    ),
    "root": (lambda p: p["securityContext"].update(runAsNonRoot=False), "non-root"),
    "foreign ServiceAccount": (lambda p: p.update(serviceAccountName="admin"), "allowed ServiceAccount"),
    "API token mounted": (lambda p: p.update(automountServiceAccountToken=True), "no API token"),
}


def test_the_policy_admits_the_operators_own_job(install):
    job = _operator_job(install, "policy-ok")
    ok(kubectl(install["sa"], "create", "--dry-run=server", "-f", "-", stdin=json.dumps(job)))


@pytest.mark.parametrize("case", list(TAMPERED))
def test_the_policy_refuses_a_job_the_operator_would_not_make(install, case):
    """A hand-written Job with the operator's own token (what a stolen token or a bug could do)."""
    change, says = TAMPERED[case]
    job = _operator_job(install, "policy-bad")
    change(_pod(job))
    done = kubectl(install["sa"], "create", "--dry-run=server", "-f", "-", stdin=json.dumps(job))
    assert done.returncode != 0, f"{case}: admitted"
    assert "ValidatingAdmissionPolicy" in done.stderr and says in done.stderr, done.stderr


def test_the_policy_does_not_judge_other_users_jobs(install):
    """Only the operator's ServiceAccount is bound by it: the admin's busybox Job is the admin's."""
    job = _operator_job(install, "admins-own")
    _pod(job)["containers"][0]["image"] = "busybox:1.36"
    ok(kubectl(install["admin"], "create", "--dry-run=server", "-f", "-", stdin=json.dumps(job)))


@pytest.fixture(scope="module")
def tenant_user(install):
    """`alice`: may create and read FineTuneJobs in the team namespace and read one Secret
    (`readable`); `hidden` she may not read."""
    admin, team = install["admin"], install["namespaces"]["team"]
    for name in ("readable", "hidden"):
        ok(kubectl(admin, "create", "secret", "generic", name, "-n", team, "--from-literal=token=x"))
    ok(
        kubectl(
            admin,
            "create",
            "role",
            "ftj-author",
            "-n",
            team,
            "--verb=create,get,list,update,patch",
            "--resource=finetunejobs.finetune.dev",
        )
    )
    ok(
        kubectl(
            admin,
            "create",
            "role",
            "read-readable",
            "-n",
            team,
            "--verb=get",
            "--resource=secrets",
            "--resource-name=readable",
        )
    )
    for role in ("ftj-author", "read-readable"):
        ok(
            kubectl(
                admin, "create", "rolebinding", f"alice-{role}", "-n", team, f"--role={role}", "--user=alice"
            )
        )
    return "alice"


SECRET_FIELDS = {
    "spec.model.tokenSecretRef": lambda n: {
        "model": {"hub": "unsloth/Qwen3-8B", "tokenSecretRef": {"name": n, "key": "token"}}
    },
    "spec.data.tokenSecretRef": lambda n: {
        "data": {"hub": "org/data", "tokenSecretRef": {"name": n, "key": "token"}}
    },
    "spec.export.push.tokenSecretRef": lambda n: {
        "export": {"push": {"repo": "me/a", "tokenSecretRef": {"name": n, "key": "token"}}}
    },
    "spec.tracking.apiKeySecretRef": lambda n: {
        "tracking": {"type": "wandb", "apiKeySecretRef": {"name": n, "key": "token"}}
    },
    "spec.storage.credentialsSecret": lambda n: {"storage": {"credentialsSecret": n}},
}


def _ftj_as(install: dict[str, Any], user: str, name: str, spec: dict[str, Any]):
    obj = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": install["namespaces"]["team"]},
        "spec": {"model": {"hub": "unsloth/Qwen3-8B"}, "data": {"hub": "org/data"}, "suspend": True, **spec},
    }
    return kubectl(install["admin"], "create", "--as", user, "-f", "-", stdin=json.dumps(obj))


@pytest.mark.parametrize("field", list(SECRET_FIELDS))
def test_a_job_may_name_only_secrets_its_author_can_read(install, tenant_user, field):
    slug = field.split(".")[-2].lower()
    refused = _ftj_as(install, tenant_user, f"hidden-{slug}", SECRET_FIELDS[field]("hidden"))
    assert refused.returncode != 0, f"{field}: a job naming an unreadable Secret was admitted"
    assert f"{field}: you may not read the Secret hidden" in refused.stderr, refused.stderr
    admitted = _ftj_as(install, tenant_user, f"readable-{slug}", SECRET_FIELDS[field]("readable"))
    assert admitted.returncode == 0, admitted.stderr


def test_an_unchanged_secret_ref_does_not_block_other_edits(install, tenant_user):
    """A job the admin made naming `hidden`: alice may still suspend it (the ref is unchanged), and
    may not point it at another Secret she cannot read."""
    team = install["namespaces"]["team"]
    admins = {
        "apiVersion": "finetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "admins-job", "namespace": team},
        "spec": {
            "model": {"hub": "unsloth/Qwen3-8B"},
            "data": {"hub": "org/data"},
            "tracking": {"type": "wandb", "apiKeySecretRef": {"name": "hidden", "key": "token"}},
        },
    }
    ok(kubectl(install["admin"], "apply", "-f", "-", stdin=json.dumps(admins)))
    ok(
        kubectl(
            install["admin"],
            "patch",
            "ftj",
            "admins-job",
            "-n",
            team,
            "--as",
            tenant_user,
            "--type=merge",
            "-p",
            '{"spec":{"suspend":true}}',
        )
    )
    ok(
        kubectl(
            install["admin"], "create", "secret", "generic", "hidden-2", "-n", team, "--from-literal=token=x"
        )
    )
    done = kubectl(
        install["admin"],
        "patch",
        "ftj",
        "admins-job",
        "-n",
        team,
        "--as",
        tenant_user,
        "--type=merge",
        "-p",
        '{"spec":{"tracking":{"apiKeySecretRef":{"name":"hidden-2","key":"token"}}}}',
    )
    # Refused either way: the tracking section is immutable after creation (issue 16), and the
    # policy would refuse the unreadable Secret.
    assert done.returncode != 0, done.stderr
    assert "you may not read the Secret hidden-2" in done.stderr or "tracking is immutable" in done.stderr
