"""The pod the operator renders meets the Restricted Pod Security Standard (pod_security.py, control by
control), whatever the spec; and the check is not vacuous: each weakening of that pod fails the control it
breaks."""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest

from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.render import Owner, render_pod
from pod_security import CONTROLS, violations

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")
IMAGE = "ghcr.io/x/runtime:1"

SPECS = {
    "minimal": {"model": {"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B"}}}, "image": IMAGE},
    "everything set": {
        "model": {"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B", "revision": "main",
                                             "tokenSecretRef": {"name": "hf"}}}, "servedName": "q"},
        "image": IMAGE, "resources": {"gpus": 2, "cpu": "8", "memory": "64Gi", "shmSize": "8Gi"},
        "serving": {"port": 9000, "maxModelLen": 4096, "extraArgs": ["--enforce-eager"]},
        "training": {"apiTokenSecretRef": {"name": "api"}, "maxBodyBytes": 1024},
        "checkpoint": {"startOver": True, "volume": {"existingClaim": "ck"}},
        "pod": {"serviceAccountName": "sa", "runtimeClassName": "nvidia", "priorityClassName": "high",
                "env": [{"name": "HF_HOME", "value": "/var/lib/onlinemodel/home/hf"}],
                "annotations": {"a": "b"}, "labels": {"team": "ml"},
                "tolerations": [{"operator": "Exists"}], "imagePullSecrets": [{"name": "reg"}]}},
    "weights on a claim, CPU, no training": {
        "model": {"source": {"volume": {"claimName": "weights", "path": "qwen"}}}, "image": IMAGE,
        "resources": {"gpus": 0}, "training": {"enabled": False}},
    "weights in the image": {"model": {"source": {"image": {"path": "/models/m"}}}, "image": IMAGE},
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_pod_is_restricted(name: str) -> None:
    assert violations(render_pod(OWNER, parse_spec(SPECS[name]))) == []


def runtime(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def context(pod: dict[str, Any]) -> dict[str, Any]:
    return runtime(pod)["securityContext"]


def set_(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A weakening that sets `path` (dots, from `spec` or `ctx`: the runtime container's securityContext)."""

    def apply(pod: dict[str, Any]) -> None:
        parts = path.split(".")
        node = {"ctx": context(pod), "spec": pod["spec"]}[parts[0]]
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value

    return apply


def add_init_container(pod: dict[str, Any]) -> None:
    pod["spec"]["initContainers"] = [{"name": "init", "image": IMAGE}]


def drop_pod_level(field: str) -> Callable[[dict[str, Any]], None]:
    return lambda pod: pod["spec"]["securityContext"].pop(field)


# (weakening, the controls it must break): each control of the profile fails for at least one.
WEAKENED: dict[str, tuple[Callable[[dict[str, Any]], None], set[str]]] = {
    "hostProcess": (set_("ctx.windowsOptions.hostProcess", True), {"HostProcess"}),
    "hostNetwork": (set_("spec.hostNetwork", True), {"Host Namespaces"}),
    "hostPID": (set_("spec.hostPID", True), {"Host Namespaces"}),
    "hostIPC": (set_("spec.hostIPC", True), {"Host Namespaces"}),
    "privileged": (set_("ctx.privileged", True), {"Privileged Containers"}),
    "add SYS_ADMIN": (set_("ctx.capabilities.add", ["SYS_ADMIN"]),
                      {"Capabilities (baseline)", "Capabilities (restricted)"}),
    "add CHOWN (a default one)": (set_("ctx.capabilities.add", ["CHOWN"]), {"Capabilities (restricted)"}),
    "capabilities not dropped": (set_("ctx.capabilities.drop", []), {"Capabilities (restricted)"}),
    "hostPath volume": (lambda pod: pod["spec"]["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
                        {"HostPath Volumes", "Volume Types"}),
    "nfs volume": (lambda pod: pod["spec"]["volumes"].append({"name": "n", "nfs": {"server": "s", "path": "/"}}),
                   {"Volume Types"}),
    "hostPort": (lambda pod: runtime(pod)["ports"][0].update(hostPort=8000), {"Host Ports"}),
    "AppArmor unconfined": (set_("ctx.appArmorProfile.type", "Unconfined"), {"AppArmor"}),
    "AppArmor annotation": (lambda pod: pod["metadata"]["annotations"].update(
        {"container.apparmor.security.beta.kubernetes.io/runtime": "unconfined"}), {"AppArmor"}),
    "SELinux type": (set_("ctx.seLinuxOptions.type", "spc_t"), {"SELinux"}),
    "SELinux user": (set_("spec.securityContext.seLinuxOptions.user", "root"), {"SELinux"}),
    "procMount": (set_("ctx.procMount", "Unmasked"), {"/proc Mount Type"}),
    "seccomp unconfined (pod)": (set_("spec.securityContext.seccompProfile.type", "Unconfined"),
                                 {"Seccomp (baseline)", "Seccomp (restricted)"}),
    "seccomp unconfined (container)": (set_("ctx.seccompProfile.type", "Unconfined"),
                                       {"Seccomp (baseline)", "Seccomp (restricted)"}),
    "no seccomp profile": (drop_pod_level("seccompProfile"), {"Seccomp (restricted)"}),
    "unsafe sysctl": (set_("spec.securityContext.sysctls", [{"name": "kernel.msgmax", "value": "1"}]), {"Sysctls"}),
    "privilege escalation allowed": (set_("ctx.allowPrivilegeEscalation", True), {"Privilege Escalation"}),
    "privilege escalation unset": (lambda pod: context(pod).pop("allowPrivilegeEscalation"),
                                   {"Privilege Escalation"}),
    "runAsNonRoot unset": (drop_pod_level("runAsNonRoot"), {"Running as Non-root"}),
    "runAsNonRoot false (container)": (set_("ctx.runAsNonRoot", False), {"Running as Non-root"}),
    "runAsUser 0": (set_("spec.securityContext.runAsUser", 0), {"Running as Non-root user"}),
    "runAsUser 0 (container)": (set_("ctx.runAsUser", 0), {"Running as Non-root user"}),
    "an init container with no hardening": (add_init_container,
                                            {"Privilege Escalation", "Capabilities (restricted)"}),
}


@pytest.mark.parametrize("case", sorted(WEAKENED))
def test_a_weakened_pod_fails_the_control_it_breaks(case: str) -> None:
    weaken, broken = WEAKENED[case]
    pod = copy.deepcopy(render_pod(OWNER, parse_spec(SPECS["minimal"])))
    weaken(pod)
    assert {control for control, _ in violations(pod)} == broken


def test_every_control_can_fail() -> None:
    assert set(CONTROLS) == set().union(*(broken for _, broken in WEAKENED.values()))
