"""The chart lints and renders with Helm's engine, and what it renders is what the operator needs."""

from __future__ import annotations

import tomllib

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from onlinemodel_operator.main import build_parser
from chart_helpers import (
    CHART_DIR,
    KUBE_VERSIONS,
    NAMESPACE,
    RELEASE,
    by_kind,
    load_crd_source,
    one,
)

WATCHED = ["team-a", "team-b"]


def test_lint_is_clean():
    for values in (None, {"operator": {"watchNamespaces": WATCHED}}, {"crds": {"install": False, "keep": True}}):
        report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version="v1.29.0")
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert not problems and not report["errors"], report


@pytest.mark.parametrize(
    "values",
    [
        None,
        {"operator": {"watchNamespaces": WATCHED, "logLevel": "debug", "extraArgs": ["--poll-interval=3"]}},
        {"crds": {"install": False, "keep": False}, "serviceAccount": {"create": False, "name": "existing"}},
        {"image": {"digest": "sha256:" + "a" * 64}, "nodeSelector": {"kubernetes.io/os": "linux"},
         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
         "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
             {"matchExpressions": [{"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}]}]}}},
         "operator": {"extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
         "imagePullSecrets": [{"name": "regcred"}], "priorityClassName": "system-cluster-critical",
         "commonLabels": {"team": "ml"}, "podAnnotations": {"a": "b"}},
    ],
    ids=["defaults", "namespaced", "no-crd-existing-sa", "placement"],
)
@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_validates_against_kubernetes_schemas(render, values, kube_version):
    manifests = render(values)
    assert manifests
    for manifest in manifests:
        # strict: unknown fields are errors, as with `kubectl apply --validate=strict`.
        kubernetes_validate.validate(manifest, kube_version, strict=True)


def test_deployment_runs_one_operator_safely(render):
    deployment = one(render(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-onlinemodel"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/onlinemodel/onlinemodel-operator:0.1.0"
    assert container["imagePullPolicy"] == "IfNotPresent"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["runAsNonRoot"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["args"] == ["--liveness=http://0.0.0.0:8080/healthz", "--poll-interval=10",
                                 "--checkpoint-timeout=600"]
    probe = container["livenessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    # A read-only root filesystem needs a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


@pytest.mark.parametrize("values", [
    None,
    {"operator": {"watchNamespaces": WATCHED, "logLevel": "verbose"}},
    {"operator": {"logLevel": "debug", "pollIntervalSeconds": 0.5, "healthPort": 9000}},
])
def test_the_operator_accepts_the_rendered_arguments(render, values):
    """The Deployment's args parse with the operator's own command-line parser."""
    (container,) = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"]
    parsed = build_parser().parse_args(container["args"])
    operator_values = (values or {}).get("operator", {})
    assert parsed.namespace == operator_values.get("watchNamespaces", [])
    assert parsed.liveness == f"http://0.0.0.0:{operator_values.get('healthPort', 8080)}/healthz"
    assert parsed.poll_interval == operator_values.get("pollIntervalSeconds", 10)
    assert parsed.verbose == (operator_values.get("logLevel") == "verbose")
    assert parsed.debug == (operator_values.get("logLevel") == "debug")


def test_values_reach_the_deployment(render):
    manifests = render({
        "image": {"repository": "registry.example/om-operator", "tag": "1.2.3", "pullPolicy": "Always"},
        "operator": {"watchNamespaces": WATCHED, "healthPort": 9090, "logLevel": "verbose",
                     "pollIntervalSeconds": 2.5, "checkpointTimeoutSeconds": 900, "extraArgs": ["--x=1"]},
        "livenessProbe": {"periodSeconds": 7},
        "resources": {"limits": {"memory": "1Gi"}},
    })
    (container,) = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "registry.example/om-operator:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert container["args"] == [
        "--liveness=http://0.0.0.0:9090/healthz", "--poll-interval=2.5", "--checkpoint-timeout=900",
        "--verbose", "--namespace=team-a", "--namespace=team-b", "--x=1",
    ]
    assert container["ports"][0]["containerPort"] == 9090
    assert container["livenessProbe"]["periodSeconds"] == 7
    assert container["resources"]["limits"]["memory"] == "1Gi"


def _rules(role):
    return {(group, resource): set(rule["verbs"])
            for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}


NAMESPACED_NEEDS = {
    ("onlinemodel.dev", "onlinemodels"): {"get", "list", "watch", "patch", "update", "delete"},
    ("onlinemodel.dev", "onlinemodels/status"): {"get", "patch", "update"},
    ("onlinemodel.dev", "onlinemodels/finalizers"): {"update"},
    ("", "pods"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "services"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "persistentvolumeclaims"): {"create", "get", "list", "watch", "patch", "delete"},
    ("", "secrets"): {"get", "create"},
    ("", "configmaps"): {"get"},
    ("", "events"): {"create"},
}
CLUSTER_NEEDS = {
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}


def _assert_least_privilege(role):
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
    rules = _rules(role)
    assert not {resource for _, resource in rules} & {"pods/exec", "pods/attach", "pods/portforward"}
    assert rules[("", "configmaps")] == {"get"}  # the guard ConfigMap a spec names, by name
    # Secrets by name only: list or watch would hand the operator every Secret of the namespace; it creates
    # the generated API-token Secrets and never changes or deletes one (the garbage collector does).
    assert rules[("", "secrets")] == {"get", "create"}


def test_rbac_all_namespaces(render):
    manifests = render()
    role = one(manifests, "ClusterRole")
    assert _rules(role) == CLUSTER_NEEDS | NAMESPACED_NEEDS
    _assert_least_privilege(role)
    binding = one(manifests, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-onlinemodel", "namespace": NAMESPACE}]
    assert not by_kind(manifests, "Role")
    assert one(manifests, "ServiceAccount")["metadata"]["namespace"] == NAMESPACE


def test_rbac_watched_namespaces_get_roles_only_there(render):
    manifests = render({"operator": {"watchNamespaces": WATCHED}})
    cluster_role = one(manifests, "ClusterRole")
    assert _rules(cluster_role) == CLUSTER_NEEDS
    roles = by_kind(manifests, "Role")
    bindings = by_kind(manifests, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == WATCHED
    assert sorted(b["metadata"]["namespace"] for b in bindings) == WATCHED
    for role in roles:
        assert _rules(role) == NAMESPACED_NEEDS
        _assert_least_privilege(role)
    for binding in bindings:
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": f"{RELEASE}-onlinemodel"}
        assert binding["subjects"][0]["namespace"] == NAMESPACE


def test_rbac_extra_rules_go_where_the_built_in_ones_go(render):
    extra = {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get"]}
    key = ("networking.k8s.io", "networkpolicies")
    assert key in _rules(one(render({"rbac": {"create": True, "extraRules": [extra]}}), "ClusterRole"))
    manifests = render({"rbac": {"create": True, "extraRules": [extra]}, "operator": {"watchNamespaces": WATCHED}})
    assert key not in _rules(one(manifests, "ClusterRole"))
    roles = by_kind(manifests, "Role")
    assert len(roles) == len(WATCHED) and all(key in _rules(role) for role in roles)


def test_rbac_and_service_account_can_be_left_out(render):
    manifests = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "mine"}})
    assert {m["kind"] for m in manifests} == {"CustomResourceDefinition", "Deployment"}
    assert one(manifests, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "mine"


def test_existing_service_account_needs_a_name(chart):
    with pytest.raises(helm.HelmError, match="serviceAccount.name is required"):
        chart.render({"serviceAccount": {"create": False}, "crds": {"install": False, "keep": True}}, name=RELEASE)


@pytest.mark.parametrize("is_upgrade", [False, True])
def test_crd_is_rendered_on_install_and_upgrade(render, is_upgrade):
    source = load_crd_source()
    crd = one(render(is_install=not is_upgrade, is_upgrade=is_upgrade), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    # Apart from the chart's labels and annotations, Helm applies the CRD exactly as crds/ has it.
    for meta in (crd["metadata"], source["metadata"]):
        meta.pop("labels", None)
        meta.get("annotations", {}).pop("helm.sh/resource-policy", None)
        if not meta.get("annotations"):
            meta.pop("annotations", None)
    assert crd == source


def test_crd_toggles(render):
    assert not by_kind(render({"crds": {"install": False, "keep": True}}), "CustomResourceDefinition")
    crd = one(render({"crds": {"install": True, "keep": False}}), "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_chart_app_version_matches_the_project():
    chart_meta = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    project = tomllib.loads((CHART_DIR.parents[1] / "pyproject.toml").read_text())["project"]
    assert chart_meta["appVersion"] == project["version"]
