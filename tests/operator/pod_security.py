"""The Pod Security Standards' Restricted profile, control by control, as Kubernetes publishes it
(https://kubernetes.io/docs/concepts/security/pod-security-standards/: the Baseline controls, then the
Restricted ones; Linux pods).

`violations(pod)` checks a Pod manifest against every control and returns (control, detail) pairs; an empty
list means the pod would be admitted to a namespace labelled `pod-security.kubernetes.io/enforce: restricted`.
Each control reads exactly the fields the published policy lists, with its allowed values.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

Pod = Mapping[str, Any]
Violation = tuple[str, str]

# Baseline "Capabilities": the default set a container may add to.
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
# Baseline "Sysctls": the safe, namespaced ones.
SAFE_SYSCTLS = {"kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
                "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
                "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
                "net.ipv4.tcp_keepalive_probes"}
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# Restricted "Volume Types": the only volume sources allowed.
VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                "secret"}
APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def _spec(pod: Pod) -> Mapping[str, Any]:
    return pod.get("spec") or {}


def _pod_context(pod: Pod) -> Mapping[str, Any]:
    return _spec(pod).get("securityContext") or {}


def _containers(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """Every container, init and ephemeral ones included, with a path for the message."""
    for kind in ("containers", "initContainers", "ephemeralContainers"):
        for container in _spec(pod).get(kind) or []:
            yield f"spec.{kind}[{container.get('name')}]", container


def _contexts(pod: Pod) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """The pod's security context and each container's."""
    yield "spec.securityContext", _pod_context(pod)
    for where, container in _containers(pod):
        yield f"{where}.securityContext", container.get("securityContext") or {}


# --- Baseline -------------------------------------------------------------------------------------------

def host_process(pod: Pod) -> Iterator[str]:
    for where, context in _contexts(pod):
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            yield f"{where}.windowsOptions.hostProcess"


def host_namespaces(pod: Pod) -> Iterator[str]:
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if _spec(pod).get(field):
            yield f"spec.{field}"


def privileged_containers(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        if (container.get("securityContext") or {}).get("privileged"):
            yield f"{where}.securityContext.privileged"


def _capabilities(container: Mapping[str, Any]) -> Mapping[str, Any]:
    return (container.get("securityContext") or {}).get("capabilities") or {}


def baseline_capabilities(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        for capability in _capabilities(container).get("add") or []:
            if capability not in BASELINE_CAPABILITIES:
                yield f"{where} adds {capability}"


def host_path_volumes(pod: Pod) -> Iterator[str]:
    for volume in _spec(pod).get("volumes") or []:
        if "hostPath" in volume:
            yield f"volume {volume.get('name')}"


def host_ports(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        for port in container.get("ports") or []:
            if port.get("hostPort"):
                yield f"{where} hostPort {port['hostPort']}"


def app_armor(pod: Pod) -> Iterator[str]:
    for where, context in _contexts(pod):
        profile = (context.get("appArmorProfile") or {}).get("type")
        if profile not in (None, "RuntimeDefault", "Localhost"):
            yield f"{where}.appArmorProfile.type {profile}"
    for key, value in ((pod.get("metadata") or {}).get("annotations") or {}).items():
        if key.startswith(APPARMOR_ANNOTATION) and value != "runtime/default" and not value.startswith("localhost/"):
            yield f"annotation {key}: {value}"


def se_linux(pod: Pod) -> Iterator[str]:
    for where, context in _contexts(pod):
        options = context.get("seLinuxOptions") or {}
        if options.get("type", "") not in SELINUX_TYPES:
            yield f"{where}.seLinuxOptions.type {options['type']}"
        for field in ("user", "role"):
            if options.get(field):
                yield f"{where}.seLinuxOptions.{field}"


def proc_mount(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        mount = (container.get("securityContext") or {}).get("procMount")
        if mount not in (None, "Default"):
            yield f"{where}.securityContext.procMount {mount}"


def baseline_seccomp(pod: Pod) -> Iterator[str]:
    for where, context in _contexts(pod):
        if (context.get("seccompProfile") or {}).get("type") == "Unconfined":
            yield f"{where}.seccompProfile.type Unconfined"


def sysctls(pod: Pod) -> Iterator[str]:
    for sysctl in _pod_context(pod).get("sysctls") or []:
        if sysctl.get("name") not in SAFE_SYSCTLS:
            yield f"sysctl {sysctl.get('name')}"


# --- Restricted -----------------------------------------------------------------------------------------

def volume_types(pod: Pod) -> Iterator[str]:
    for volume in _spec(pod).get("volumes") or []:
        sources = set(volume) - {"name"}
        if not sources <= VOLUME_TYPES:
            yield f"volume {volume.get('name')}: {', '.join(sorted(sources - VOLUME_TYPES))}"


def privilege_escalation(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        if (container.get("securityContext") or {}).get("allowPrivilegeEscalation") is not False:
            yield f"{where}.securityContext.allowPrivilegeEscalation must be false"


def running_as_non_root(pod: Pod) -> Iterator[str]:
    pod_level = _pod_context(pod).get("runAsNonRoot")
    if pod_level is False:
        yield "spec.securityContext.runAsNonRoot is false"
    for where, container in _containers(pod):
        value = (container.get("securityContext") or {}).get("runAsNonRoot")
        if value is False or (value is None and pod_level is not True):
            yield f"{where}.securityContext.runAsNonRoot must be true (or set at pod level)"


def running_as_non_root_user(pod: Pod) -> Iterator[str]:
    for where, context in _contexts(pod):
        if context.get("runAsUser") == 0:
            yield f"{where}.runAsUser is 0"


def restricted_seccomp(pod: Pod) -> Iterator[str]:
    allowed = ("RuntimeDefault", "Localhost")
    pod_level = (_pod_context(pod).get("seccompProfile") or {}).get("type")
    if pod_level is not None and pod_level not in allowed:
        yield f"spec.securityContext.seccompProfile.type {pod_level}"
    for where, container in _containers(pod):
        value = ((container.get("securityContext") or {}).get("seccompProfile") or {}).get("type")
        if value is None and pod_level is None:
            yield f"{where}.securityContext.seccompProfile must be set (or set at pod level)"
        elif value is not None and value not in allowed:
            yield f"{where}.securityContext.seccompProfile.type {value}"


def restricted_capabilities(pod: Pod) -> Iterator[str]:
    for where, container in _containers(pod):
        capabilities = _capabilities(container)
        if "ALL" not in (capabilities.get("drop") or []):
            yield f"{where} must drop ALL capabilities"
        for capability in capabilities.get("add") or []:
            if capability != "NET_BIND_SERVICE":
                yield f"{where} adds {capability}"


CONTROLS: dict[str, Callable[[Pod], Iterator[str]]] = {
    # Baseline
    "HostProcess": host_process,
    "Host Namespaces": host_namespaces,
    "Privileged Containers": privileged_containers,
    "Capabilities (baseline)": baseline_capabilities,
    "HostPath Volumes": host_path_volumes,
    "Host Ports": host_ports,
    "AppArmor": app_armor,
    "SELinux": se_linux,
    "/proc Mount Type": proc_mount,
    "Seccomp (baseline)": baseline_seccomp,
    "Sysctls": sysctls,
    # Restricted
    "Volume Types": volume_types,
    "Privilege Escalation": privilege_escalation,
    "Running as Non-root": running_as_non_root,
    "Running as Non-root user": running_as_non_root_user,
    "Seccomp (restricted)": restricted_seccomp,
    "Capabilities (restricted)": restricted_capabilities,
}


def violations(pod: Pod) -> list[Violation]:
    """(control, detail) for every control of the Restricted profile the pod breaks."""
    return [(control, detail) for control, check in CONTROLS.items() for detail in check(pod)]
