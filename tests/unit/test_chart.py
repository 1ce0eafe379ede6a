"""The Helm chart with the real helm: lint, schema, rendered objects, and the contracts with the
operator's code (its configuration model, its trainer-pod labels, its CRD)."""

from __future__ import annotations

import json

import pytest
import yaml
from chart_tools import CHART, KUBE_VERSION, NAMESPACE, REPO, find, helm_template, run_helm
from finetune_operator import naming
from finetune_operator.config import OperatorConfig

FULLNAME = "ftop-finetune-operator"
EVERYTHING = (
    "--set", "metrics.serviceMonitor.enabled=true",
    "--set", "metrics.podMonitor.enabled=true",
    "--set", "metrics.prometheusRule.enabled=true",
    "--set", "networkPolicy.enabled=true",
)  # fmt: skip
HA = ("--set", "replicas=2")
SCOPED = ("--set", "config.namespaces={team-a,team-b}")
CLUSTER_WIDE = ("--set", "rbac.clusterWide=true")

NAMESPACED_RULES = [
    {
        "apiGroups": ["finetune.dev"],
        "resources": ["finetunejobs"],
        "verbs": ["get", "list", "watch", "patch", "update"],
    },
    {
        "apiGroups": ["finetune.dev"],
        "resources": ["finetunejobs/status"],
        "verbs": ["get", "patch", "update"],
    },
    {
        "apiGroups": ["batch"],
        "resources": ["jobs"],
        "verbs": ["create", "get", "list", "watch", "patch", "delete"],
    },
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch", "list"]},
]
TOKENREVIEW_RULE = {
    "apiGroups": ["authentication.k8s.io"],
    "resources": ["tokenreviews"],
    "verbs": ["create"],
}


def operator_config(docs: list[dict]) -> OperatorConfig:
    """The rendered ConfigMap, loaded by the operator's own (extra=forbid) model."""
    return OperatorConfig.model_validate(yaml.safe_load(find(docs, "ConfigMap")["data"]["config.yaml"]))


@pytest.mark.parametrize(
    "extra", [(), EVERYTHING, HA + SCOPED + EVERYTHING], ids=["defaults", "all-on", "ha-scoped"]
)
def test_helm_lint_strict(extra):
    done = run_helm("lint", "--strict", str(CHART), *extra)
    assert done.returncode == 0, done.stdout + done.stderr


def test_chart_crds_are_the_repositorys():
    """The chart ships crds/ byte for byte; `make crds` regenerates the repository's copy."""
    repo = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert repo, "crds/ is empty: run `make crds`"
    assert chart == repo, (
        "charts/finetune-operator/crds/ differs from crds/: cp crds/*.yaml charts/finetune-operator/crds/"
    )


BAD_VALUES = {
    "replicas=0": ("--set", "replicas=0"),
    "unknown top-level key": ("--set", "replica=2"),
    "pull policy": ("--set", "image.pullPolicy=Sometimes"),
    "port out of range": ("--set", "ports.metrics=70000"),
    "negative GPU limit": ("--set", "config.maxGpusPerJob=-1"),
    "storage not s3": ("--set", "config.storage.uri=http://bucket/prefix"),
    "unknown config key": ("--set", "config.maxGpus=4"),
    "cpu quantity": ("--set", "resources.requests.cpu=lots"),
    "alert duration": ("--set", "metrics.prometheusRule.stuckFor=30 minutes"),
    "namespace name": ("--set", "config.namespaces={Team_A}"),
    "service account without name": ("--set", "serviceAccount.create=false"),
    "toleration effect": ("--set", "config.defaultTolerations[0].effect=Sometimes"),
}


@pytest.mark.parametrize("args", BAD_VALUES.values(), ids=BAD_VALUES.keys())
def test_schema_rejects_bad_values(args):
    template = ("template", "x", str(CHART), "--kube-version", KUBE_VERSION)
    assert run_helm(*template).returncode == 0, "the chart must render without the bad value"
    for command in (template, ("lint", "--strict", str(CHART))):
        done = run_helm(*command, *args)
        assert done.returncode != 0, f"helm {command[0]} accepted {args}"
        assert "schema" in (done.stdout + done.stderr), done.stdout + done.stderr


def test_schema_config_keys_are_the_operators():
    """Every OperatorConfig key is settable under `config` except those the chart derives."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart_keys = set(schema["properties"]["config"]["properties"])
    model_keys = {f.alias or name for name, f in OperatorConfig.model_fields.items()}
    assert chart_keys == model_keys - {"ports", "leaderElection"}


def test_rendered_config_is_loaded_by_the_operator():
    docs = helm_template()
    config = operator_config(docs)
    assert config.report_url == f"http://{FULLNAME}-progress.{NAMESPACE}.svc:8081"
    assert not config.leader_election.enabled
    container = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == config.ports.model_dump()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    assert services[f"{FULLNAME}-progress"]["spec"]["ports"][0]["port"] == config.ports.progress
    assert services[f"{FULLNAME}-metrics"]["spec"]["ports"][0]["port"] == config.ports.metrics


def test_config_values_reach_the_operator():
    docs = helm_template(
        "--set", "config.storage.uri=s3://models/finetune",
        "--set", "config.maxGpusPerJob=2",
        "--set", "config.allowedModelSources={^unsloth/,^s3://models/}",
        "--set", "config.defaultNodeSelector.gpu=h100",
    )  # fmt: skip
    config = operator_config(docs)
    assert config.storage.uri == "s3://models/finetune" and config.storage.endpoint is None
    assert config.max_gpus_per_job == 2
    assert config.model_source_allowed("unsloth/Qwen3-8B") and not config.model_source_allowed("evil/model")
    assert config.default_node_selector == {"gpu": "h100"}


def test_leader_election_follows_replicas():
    docs = helm_template(*HA)
    config = operator_config(docs)
    assert config.leader_election.enabled
    assert config.leader_election.namespace == NAMESPACE and config.leader_election.lease_name == FULLNAME
    role = find(docs, "Role", f"{FULLNAME}-leader-election")
    assert {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [FULLNAME],
            "verbs": ["get", "update"]} in role["rules"]  # fmt: skip
    assert find(docs, "Deployment")["spec"]["strategy"]["type"] == "RollingUpdate"
    single = helm_template()
    assert find(single, "Deployment")["spec"]["strategy"]["type"] == "Recreate"
    assert not [d for d in single if d["metadata"]["name"].endswith("-leader-election")], (
        "a lease Role without leader election"
    )


def test_pod_meets_the_restricted_pod_security_standard():
    pod = find(helm_template(), "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert {"/tmp", "/etc/finetune-operator"} == {m["mountPath"] for m in container["volumeMounts"]}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == "health"
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["image"].endswith(":" + yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"])


def _no_wildcards_or_secrets(rules: list[dict]) -> None:
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], rule


def test_rbac_is_exactly_the_documented_least_privilege():
    docs = helm_template(*HA, *CLUSTER_WIDE)
    cluster_role = find(docs, "ClusterRole")
    assert cluster_role["rules"] == [TOKENREVIEW_RULE, *NAMESPACED_RULES]
    for doc in docs:
        if doc["kind"] in ("ClusterRole", "Role"):
            _no_wildcards_or_secrets(doc["rules"])
    binding = find(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}]


def test_by_default_only_the_release_namespace_is_served():
    """No Job rights outside the served namespaces unless rbac.clusterWide says so."""
    docs = helm_template()
    assert find(docs, "ClusterRole")["rules"] == [TOKENREVIEW_RULE]
    role = find(docs, "Role", FULLNAME)
    assert role["metadata"]["namespace"] == NAMESPACE and role["rules"] == NAMESPACED_RULES
    assert find(docs, "RoleBinding", FULLNAME)["metadata"]["namespace"] == NAMESPACE
    assert operator_config(docs).namespaces == [NAMESPACE]
    wide = helm_template(*CLUSTER_WIDE)
    assert not [d for d in wide if d["kind"] == "Role"]
    assert operator_config(wide).namespaces == []


def test_admission_policies_carry_the_allowlists():
    docs = helm_template(
        "--set", "config.defaultImage=reg/trainer:2",
        "--set", "config.policy.images={reg/trainer:*,reg/other:1}",
        "--set", "config.trainerServiceAccount=finetune-trainer",
        "--set", "config.policy.namespaces.team-a.serviceAccounts={team-a-iam}",
    )  # fmt: skip
    jobs = find(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-jobs")
    assert jobs["spec"]["matchConditions"][0]["expression"] == (
        f'request.userInfo.username == "system:serviceaccount:{NAMESPACE}:{FULLNAME}"'
    )
    variables = {v["name"]: v["expression"] for v in jobs["spec"]["variables"]}
    assert variables["exact"].startswith('["reg/trainer:2","reg/other:1"]')
    assert variables["repos"].startswith('["reg/trainer"]')
    assert (
        variables["accounts"].startswith('["finetune-trainer"]')
        and '"team-a":["team-a-iam"]' in variables["accounts"]
    )
    refs = find(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-secret-refs")
    messages = " ".join(v["messageExpression"] for v in refs["spec"]["validations"])
    for field in (
        "spec.model.tokenSecretRef",
        "spec.tracking.passwordSecretRef",
        "spec.storage.credentialsSecret",
    ):
        assert field in messages
    for name in (f"{FULLNAME}-jobs", f"{FULLNAME}-secret-refs"):
        binding = find(docs, "ValidatingAdmissionPolicyBinding", name)
        assert binding["spec"] == {"policyName": name, "validationActions": ["Deny"]}
    off = helm_template("--set", "admissionPolicy.enabled=false")
    assert not [d for d in off if d["kind"].startswith("ValidatingAdmissionPolicy")]


def test_watched_namespaces_get_roles_not_a_cluster_role():
    docs = helm_template(*SCOPED)
    assert find(docs, "ClusterRole")["rules"] == [TOKENREVIEW_RULE]
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    assert set(roles) == {"team-a", "team-b"}
    assert all(role["rules"] == NAMESPACED_RULES for role in roles.values())
    bindings = {d["metadata"]["namespace"] for d in docs if d["kind"] == "RoleBinding"}
    assert bindings == {"team-a", "team-b"}
    assert operator_config(docs).namespaces == ["team-a", "team-b"]


WORKLOADS_RULE = {
    "apiGroups": ["kueue.x-k8s.io"],
    "resources": ["workloads"],
    "verbs": ["get", "list", "watch"],
}


def test_kueue_adds_read_only_workloads_and_reaches_the_config():
    on = ("--set", "config.kueue.enabled=true", "--set", "config.kueue.defaultQueues.team-a=gpu")
    docs = helm_template(*on, *CLUSTER_WIDE)
    assert find(docs, "ClusterRole")["rules"] == [TOKENREVIEW_RULE, *NAMESPACED_RULES, WORKLOADS_RULE]
    cfg = operator_config(docs)
    assert cfg.kueue.enabled and cfg.kueue.queue_for("team-a") == "gpu" and cfg.kueue.queue_for("x") is None
    scoped = helm_template(*on, *SCOPED)
    assert all(d["rules"] == [*NAMESPACED_RULES, WORKLOADS_RULE] for d in scoped if d["kind"] == "Role")
    assert WORKLOADS_RULE not in find(helm_template(*CLUSTER_WIDE), "ClusterRole")["rules"]


def test_kueue_quota_example_per_team():
    docs = helm_template(
        "--set", "kueueQuota.create=true",
        "--set", "kueueQuota.teams[0].name=team-a", "--set", "kueueQuota.teams[0].namespace=team-a",
        "--set", "kueueQuota.teams[0].gpus=4",
        "--set", "kueueQuota.teams[1].name=team-b", "--set", "kueueQuota.teams[1].namespace=team-b",
        "--set", "kueueQuota.teams[1].gpus=2", "--set", "kueueQuota.teams[1].localQueue=train",
    )  # fmt: skip
    assert find(docs, "ResourceFlavor")["metadata"]["name"] == "gpu"
    queues = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "ClusterQueue"}
    assert set(queues) == {"team-a", "team-b"}
    for name, gpus in (("team-a", 4), ("team-b", 2)):
        cq = queues[name]
        assert cq["cohortName"] == "finetune"
        assert cq["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": name}}
        group = cq["resourceGroups"][0]
        # Every resource the operator's training pod requests is covered, or Kueue never admits it.
        assert set(group["coveredResources"]) == {"cpu", "memory", "nvidia.com/gpu"}
        quota = {r["name"]: r["nominalQuota"] for r in group["flavors"][0]["resources"]}
        assert quota["nvidia.com/gpu"] == gpus
    local = {
        (d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"]
        for d in docs
        if d["kind"] == "LocalQueue"
    }
    assert local == {
        ("team-a", "gpu"): {"clusterQueue": "team-a"},
        ("team-b", "train"): {"clusterQueue": "team-b"},
    }
    assert "ClusterQueue" not in {d["kind"] for d in helm_template()}


def test_trainer_pod_selectors_match_the_operators_labels():
    """NetworkPolicy and PodMonitor select training pods by the labels the operator puts on them."""
    docs = helm_template(*EVERYTHING)
    trainer_labels = naming.job_labels("some-job")
    policy = find(docs, "NetworkPolicy")
    progress_from = policy["spec"]["ingress"][0]
    selector = progress_from["from"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= trainer_labels.items() and selector
    assert progress_from["ports"] == [{"port": "progress", "protocol": "TCP"}]
    assert policy["spec"]["ingress"][1]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    monitor = find(docs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == selector
    relabel = monitor["spec"]["podMetricsEndpoints"][0]["relabelings"][0]
    label = naming.LABEL_JOB.replace(".", "_").replace("/", "_").replace("-", "_")
    assert (
        relabel["sourceLabels"] == [f"__meta_kubernetes_pod_label_{label}"]
        and relabel["targetLabel"] == "name"
    )
    assert find(docs, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True


def test_optional_objects_are_off_by_default():
    kinds = {d["kind"] for d in helm_template()}
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole",
        "ClusterRoleBinding",
        "Role",
        "RoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "Service",
        "Deployment",
    }


def test_config_change_rolls_the_deployment():
    def checksum(*args):
        return find(helm_template(*args), "Deployment")["spec"]["template"]["metadata"]["annotations"][
            "checksum/config"
        ]

    assert checksum() != checksum("--set", "config.maxGpusPerJob=1")


def test_kubernetes_older_than_1_30_is_refused():
    """Chart.yaml's kubeVersion: the Job features the operator relies on (podReplacementPolicy,
    podFailurePolicy's DisruptionTarget) are GA or on by default from 1.30 on."""
    done = run_helm("template", "x", str(CHART), "--kube-version", "v1.29.9")
    assert done.returncode != 0 and "kubeVersion" in done.stderr
    assert run_helm("template", "x", str(CHART), "--kube-version", "v1.30.0").returncode == 0


STS = (
    "--set", "config.storage.uri=s3://ml-artifacts/finetune",
    "--set", "config.storage.sts.enabled=true",
    "--set", "config.storage.sts.credentialsSecret=platform-s3",
    "--set", "config.resyncSeconds=60",
)  # fmt: skip


def test_sts_grants_write_only_secret_rights_and_admits_only_the_jobs_own_secret():
    """Scoped storage credentials (config.storage.sts): the operator gets create/patch/delete on
    Secrets and never get/list/watch; the platform's keys reach only the operator's container; the
    Job policy admits exactly the `<job>-storage` Secret volume, and a Secret policy binds the
    operator's writes to such Secrets."""
    docs = helm_template(*STS, *SCOPED)
    config = operator_config(docs)
    assert config.storage.sts.enabled and config.storage.sts.credentials_secret == "platform-s3"
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    for role in roles:
        assert role["rules"] == [
            *NAMESPACED_RULES,
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "patch", "delete"]},
        ]
    env = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "secretKeyRef" in e.get("valueFrom", {})
    }
    assert refs == {
        "AWS_ACCESS_KEY_ID": {"name": "platform-s3", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "platform-s3", "key": "AWS_SECRET_ACCESS_KEY"},
    }
    jobs = find(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-jobs")
    volumes = next(v["expression"] for v in jobs["spec"]["validations"] if "volumes" in v["expression"])
    assert "v.secret.secretName == object.metadata.name + '-storage'" in volumes
    secrets = find(docs, "ValidatingAdmissionPolicy", f"{FULLNAME}-credentials")
    assert secrets["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["secrets"]
    assert find(docs, "ValidatingAdmissionPolicyBinding", f"{FULLNAME}-credentials")

    plain = helm_template(*SCOPED)
    assert not [d for d in plain if d["metadata"]["name"] == f"{FULLNAME}-credentials"]
    volumes = next(
        v["expression"]
        for v in find(plain, "ValidatingAdmissionPolicy", f"{FULLNAME}-jobs")["spec"]["validations"]
        if "volumes" in v["expression"]
    )
    assert "secret" not in volumes
    assert "AWS_ACCESS_KEY_ID" not in json.dumps(find(plain, "Deployment"))
