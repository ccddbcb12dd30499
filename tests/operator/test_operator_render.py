"""Unit tests of render.py: spec -> desired Pod, Service and PVC."""

from __future__ import annotations

from typing import Any

import base64

import pytest

from onlinemodel_operator import MANAGED_BY_LABEL, NAME_LABEL, SPEC_HASH_ANNOTATION
from onlinemodel_operator.models_spec import parse_spec
from onlinemodel_operator.render import (
    CACHE_ENV,
    CHECKPOINT_DIR,
    HOME_DIR,
    RUNTIME_UID,
    Owner,
    made_for,
    render_all,
    render_pod,
    render_pvc,
    render_token_secret,
    serve_args,
    shm_size,
    spec_hash,
)
from onlinemodel_operator.replicas import render_follower
from onlinemodel_protocol import limits
from operator_kubelet import local_command

OWNER = Owner(name="chat", namespace="ml", uid="uid-1")


def base(**extra: Any) -> dict[str, Any]:
    return {"model": {"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B"}}}, "image": "ghcr.io/x/runtime:1", **extra}


def test_pod_shape() -> None:
    pod = render_pod(OWNER, parse_spec(base()))
    meta = pod["metadata"]
    assert meta["name"] == "chat" and meta["namespace"] == "ml"
    assert meta["ownerReferences"] == [{"apiVersion": "onlinemodel.dev/v1alpha1", "kind": "OnlineModel",
                                        "name": "chat", "uid": "uid-1", "controller": True,
                                        "blockOwnerDeletion": True}]
    assert meta["labels"][NAME_LABEL] == "chat" and meta["labels"][MANAGED_BY_LABEL] == "onlinemodel-operator"
    assert len(meta["annotations"][SPEC_HASH_ANNOTATION]) == 16
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Always"
    assert spec["terminationGracePeriodSeconds"] == 300
    (container,) = spec["containers"]
    assert container["command"] == ["onlinemodel", "serve"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert (startup["failureThreshold"], startup["periodSeconds"]) == (60, 10)
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "onlinemodel", "checkpoint", "--url", "http://127.0.0.1:8000", "--timeout", "150"]
    assert {"name": "checkpoints", "mountPath": CHECKPOINT_DIR} in container["volumeMounts"]
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "chat-checkpoints"}} in spec["volumes"]


def test_serve_args_default_and_full() -> None:
    """Every runtime default is stated (the CRD's defaults are protocol.limits'); periodic checkpoints are on."""
    assert serve_args(OWNER, parse_spec(base())) == [
        "--model", "Qwen/Qwen3-0.6B", "--served-model-name", "chat", "--host", "0.0.0.0", "--port", "8000",
        "--checkpoint-dir", CHECKPOINT_DIR, "--checkpoint-keep", str(limits.CHECKPOINT_KEEP_DEFAULT),
        "--checkpoint-every-steps", str(limits.CHECKPOINT_EVERY_STEPS_DEFAULT),
        "--checkpoint-every-seconds", str(int(limits.CHECKPOINT_EVERY_SECONDS_DEFAULT)),
        "--final-checkpoint-timeout", "90",
        "--learning-rate", repr(limits.LEARNING_RATE_DEFAULT), "--optimizer-rank", str(limits.OPTIMIZER_RANK_DEFAULT),
        "--max-examples", str(limits.MAX_EXAMPLES_DEFAULT), "--default-epochs", str(limits.EPOCHS_DEFAULT),
        "--replay-examples", str(limits.REPLAY_EXAMPLES_DEFAULT), "--anchor-weight", f"{limits.ANCHOR_WEIGHT_DEFAULT:g}",
        "--null-space-energy", f"{limits.NULL_SPACE_ENERGY_DEFAULT:g}", "--max-decode-slowdown", str(limits.MAX_DECODE_SLOWDOWN_DEFAULT),
        "--sync-interval", str(int(limits.SYNC_INTERVAL_DEFAULT))]
    full = parse_spec(base(
        model={"source": {"huggingFace": {"id": "Qwen/Qwen3-0.6B", "revision": "main"}}, "servedName": "qwen"},
        serving={"port": 9000, "maxModelLen": 4096, "gpuMemoryUtilization": 0.85, "extraArgs": ["--enforce-eager"]},
        training={"learningRate": 1e-5, "optimizerRank": 4, "maxExamplesPerRequest": 16, "defaultEpochs": 2,
                  "replayExamples": 0, "anchorWeight": 0.5, "nullSpaceEnergy": 0, "maxBodyBytes": 1048576, "maxDecodeSlowdown": 0},
        checkpoint={"everySteps": 50, "everySeconds": 600.5, "keepLast": 2, "startOver": True},
        replication={"syncIntervalSeconds": 5}))
    assert serve_args(OWNER, full) == [
        "--model", "Qwen/Qwen3-0.6B", "--served-model-name", "qwen", "--host", "0.0.0.0", "--port", "9000",
        "--checkpoint-dir", CHECKPOINT_DIR, "--checkpoint-keep", "2",
        "--checkpoint-every-steps", "50", "--checkpoint-every-seconds", "600.5", "--final-checkpoint-timeout", "90",
        "--start-over",
        "--learning-rate", "1e-05", "--optimizer-rank", "4", "--max-examples", "16", "--default-epochs", "2",
        "--replay-examples", "0", "--anchor-weight", "0.5", "--null-space-energy", "0", "--max-decode-slowdown", "off", "--max-body-bytes", "1048576", "--sync-interval", "5",
        "--max-model-len", "4096", "--gpu-memory-utilization", "0.85",
        "--", "--revision", "main", "--enforce-eager"]


def test_periodic_checkpoints_can_be_turned_off() -> None:
    args = serve_args(OWNER, parse_spec(base(checkpoint={"everySteps": 0, "everySeconds": 0})))
    assert args[args.index("--checkpoint-every-steps") + 1] == "0"
    assert args[args.index("--checkpoint-every-seconds") + 1] == "0"


@pytest.mark.parametrize("budget,value", [(1.5, "1.5"), (1, "1"), (0, "off"),
                                          (None, str(limits.MAX_DECODE_SLOWDOWN_DEFAULT))])
def test_max_decode_slowdown_flag(budget, value) -> None:
    training = {} if budget is None else {"maxDecodeSlowdown": budget}
    args = serve_args(OWNER, parse_spec(base(training=training)))
    assert args[args.index("--max-decode-slowdown") + 1] == value


def test_no_training_flag() -> None:
    args = serve_args(OWNER, parse_spec(base(training={"enabled": False, "learningRate": 0.1})))
    assert "--no-training" in args and "--learning-rate" not in args and "--start-over" not in args


def test_model_from_volume_and_image() -> None:
    spec = parse_spec(base(model={"source": {"volume": {"claimName": "weights", "path": "qwen3"}}}))
    pod = render_pod(OWNER, spec)
    container = pod["spec"]["containers"][0]
    assert container["args"][:2] == ["--model", "/var/lib/onlinemodel/model/qwen3"]
    assert {"name": "model", "mountPath": "/var/lib/onlinemodel/model", "readOnly": True} in container["volumeMounts"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["spec"]["volumes"]
    image = parse_spec(base(model={"source": {"image": {"path": "/models/smollm2"}}}))
    assert serve_args(OWNER, image)[:2] == ["--model", "/models/smollm2"]


def test_secrets_env_and_placement() -> None:
    spec = parse_spec(base(
        model={"source": {"huggingFace": {"id": "meta-llama/Llama-3.2-1B", "tokenSecretRef": {"name": "hf", "key": "t"}}}},
        training={"apiTokenSecretRef": {"name": "api"}},
        resources={"gpus": 2, "cpu": "8", "memory": "64Gi"},
        pod={"env": [{"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}], "nodeSelector": {"gpu": "h100"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
             "affinity": {"nodeAffinity": {}}, "runtimeClassName": "nvidia", "serviceAccountName": "sa",
             "priorityClassName": "high", "imagePullSecrets": [{"name": "reg"}],
             "annotations": {"a": "b"}, "labels": {"team": "ml"}, "terminationGracePeriodSeconds": 120}))
    pod = render_pod(OWNER, spec)
    container = pod["spec"]["containers"][0]
    assert container["env"] == [
        *({"name": k, "value": v} for k, v in CACHE_ENV.items()),
        {"name": "ONLINEMODEL_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "api", "key": "token"}}},
        {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}},
        {"name": "VLLM_LOGGING_LEVEL", "value": "DEBUG"}]
    assert container["resources"] == {"requests": {"cpu": "8", "memory": "64Gi"},
                                      "limits": {"nvidia.com/gpu": 2, "memory": "64Gi"}}
    s = pod["spec"]
    assert s["nodeSelector"] == {"gpu": "h100"} and s["runtimeClassName"] == "nvidia"
    assert s["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert s["affinity"] == {"nodeAffinity": {}} and s["serviceAccountName"] == "sa"
    assert s["priorityClassName"] == "high" and s["imagePullSecrets"] == [{"name": "reg"}]
    assert s["terminationGracePeriodSeconds"] == 120
    assert container["lifecycle"]["preStop"]["exec"]["command"][-2:] == ["--timeout", "60"]
    assert container["args"][container["args"].index("--final-checkpoint-timeout") + 1] == "36"
    assert pod["metadata"]["labels"]["team"] == "ml" and pod["metadata"]["annotations"]["a"] == "b"


def test_cpu_only_has_no_gpu_limit() -> None:
    assert render_pod(OWNER, parse_spec(base(resources={"gpus": 0})))["spec"]["containers"][0]["resources"] == {}


def test_service_and_claim() -> None:
    desired = render_all(OWNER, parse_spec(base(serving={"port": 9000},
                                                checkpoint={"volume": {"size": "50Gi", "storageClassName": "fast"}})))
    svc = desired.service
    assert svc["spec"]["selector"] == {NAME_LABEL: "chat"}
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pvc = desired.pvc
    assert pvc["metadata"]["name"] == "chat-checkpoints"
    assert pvc["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "50Gi"}},
                           "storageClassName": "fast"}
    assert desired.endpoint == "http://chat.ml.svc:9000"


def test_the_claim_outlives_the_onlinemodel_unless_asked_and_existing_claim_is_not_rendered() -> None:
    kept = render_pvc(OWNER, parse_spec(base()))
    assert "ownerReferences" not in kept["metadata"]  # nothing learned is lost by deleting the resource
    assert kept["spec"]["resources"]["requests"]["storage"] == "20Gi"
    deleted = render_pvc(OWNER, parse_spec(base(checkpoint={"volume": {"deleteWithModel": True}})))
    assert deleted["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    # A spec stored before `retain` was removed still parses (the claim is kept either way).
    assert render_pvc(OWNER, parse_spec(base(checkpoint={"volume": {"retain": False}}))) == kept
    existing = parse_spec(base(checkpoint={"volume": {"existingClaim": "mine"}}))
    assert render_pvc(OWNER, existing) is None
    pod = render_pod(OWNER, existing)
    assert {"name": "checkpoints", "persistentVolumeClaim": {"claimName": "mine"}} in pod["spec"]["volumes"]


def test_spec_hash_ignores_suspend_and_claim_deletion_but_not_the_rest() -> None:
    h = spec_hash(parse_spec(base()))
    assert spec_hash(parse_spec(base(suspend=True))) == h
    assert spec_hash(parse_spec(base(checkpoint={"volume": {"deleteWithModel": True}}))) == h
    assert spec_hash(parse_spec(base(checkpoint={"startOver": True}))) != h
    assert spec_hash(parse_spec(base(training={"learningRate": 0.001}))) != h
    assert spec_hash(parse_spec(base(image="other:2"))) != h


def test_local_command_repoints_the_rendered_serve_command() -> None:
    """What play_kubelet runs (the end-to-end test with the real runtime) is the pod's own command."""
    pod = render_pod(OWNER, parse_spec(base(serving={"extraArgs": ["--enforce-eager"]})))
    argv = local_command(pod, host="127.0.0.1", port=9123, checkpoint_dir="/tmp/ck")
    expected = [*pod["spec"]["containers"][0]["command"], *pod["spec"]["containers"][0]["args"]]
    for flag, value in (("--host", "127.0.0.1"), ("--port", "9123"), ("--checkpoint-dir", "/tmp/ck")):
        assert argv.index(flag) < argv.index("--") and argv[argv.index(flag) + 1] == value
        expected[expected.index(flag) + 1] = value
    assert argv == expected and argv[-1] == "--enforce-eager"


def test_every_rendered_object_is_made_for_its_onlinemodel() -> None:
    desired = render_all(OWNER, parse_spec(base()))
    assert all(made_for(obj, "chat") for obj in (desired.pod, desired.service, desired.pvc))
    assert not made_for(desired.pod, "other") and not made_for({"metadata": {}}, "chat")


def test_generated_api_token_is_mounted_and_owned() -> None:
    desired = render_all(OWNER, parse_spec(base()))
    assert desired.generates_token and desired.api_token.name == "chat-api-token" and desired.api_token.key == "token"
    env = desired.pod["spec"]["containers"][0]["env"]
    assert {"name": "ONLINEMODEL_API_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "chat-api-token", "key": "token"}}} in env
    secret = render_token_secret(OWNER, "s3cr3t")
    assert secret["metadata"]["name"] == "chat-api-token" and made_for(secret, "chat")
    assert secret["metadata"]["ownerReferences"] == desired.service["metadata"]["ownerReferences"]
    assert base64.b64decode(secret["data"]["token"]) == b"s3cr3t"
    users = render_all(OWNER, parse_spec(base(training={"apiTokenSecretRef": {"name": "mine", "key": "k"}})))
    assert not users.generates_token and (users.api_token.name, users.api_token.key) == ("mine", "k")


def test_hardened_pod() -> None:
    """Non-root with a fixed UID, nothing to escalate with, read-only root with writable caches."""
    pod = render_pod(OWNER, parse_spec(base(pod={"serviceAccountName": "sa"})))
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False and spec["serviceAccountName"] == "sa"
    assert spec["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "fsGroup": RUNTIME_UID,
        "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}
    (container,) = spec["containers"]
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for path in ("/tmp", "/dev/shm", HOME_DIR):
        assert "emptyDir" in volumes[mounts[path]], path
    env = {e["name"]: e.get("value") for e in container["env"]}
    for name in ("HOME", "HF_HOME", "XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[name] == HOME_DIR or env[name].startswith(HOME_DIR + "/"), name


def test_user_env_wins_over_the_cache_defaults() -> None:
    pod = render_pod(OWNER, parse_spec(base(pod={"env": [{"name": "HF_HOME", "value": "/models/hf"}]})))
    hf_home = [e for e in pod["spec"]["containers"][0]["env"] if e["name"] == "HF_HOME"]
    assert hf_home == [{"name": "HF_HOME", "value": "/models/hf"}]


@pytest.mark.parametrize("field, flag, name", [("guard", "--guard", "guard"), ("anchors", "--anchor-file", "anchors")])
def test_a_config_files_configmap_is_mounted_read_only_and_passed(field: str, flag: str, name: str) -> None:
    spec = parse_spec(base(training={field: {"configMapRef": {"name": "cm", "key": "k.json"}}}))
    pod = render_pod(OWNER, spec)
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[args.index(flag) + 1] == f"/etc/onlinemodel/{name}/{name}.yaml"
    assert {"name": name, "mountPath": f"/etc/onlinemodel/{name}", "readOnly": True} in container["volumeMounts"]
    assert {"name": name, "configMap": {"name": "cm", "items": [{"key": "k.json", "path": f"{name}.yaml"}]}} \
        in pod["spec"]["volumes"]
    default_key = parse_spec(base(training={field: {"configMapRef": {"name": "cm"}}}))
    assert getattr(default_key.training, field).config_map_ref.key == f"{name}.yaml"
    off = parse_spec(base(training={"enabled": False, field: {"configMapRef": {"name": "cm"}}}))
    assert flag not in serve_args(OWNER, off)
    assert all(v["name"] != name for v in render_pod(OWNER, off)["spec"]["volumes"])
    assert flag not in serve_args(OWNER, parse_spec(base()))


def test_the_guard_and_anchor_files_go_together() -> None:
    spec = parse_spec(base(training={"guard": {"configMapRef": {"name": "g"}}, "anchors": {"configMapRef": {"name": "a"}}}))
    pod = render_pod(OWNER, spec)
    assert {"--guard", "--anchor-file"} <= set(pod["spec"]["containers"][0]["args"])
    assert {"guard", "anchors"} <= {v["name"] for v in pod["spec"]["volumes"]}


@pytest.mark.parametrize("field, a, b", [
    ("guard", "probes: [{messages: [{role: user, content: a}], expect: a}]", "heldout: {text: b}"),
    ("anchors", "conversations: [{messages: [{role: user, content: a}, {role: assistant, content: a}]}]",
     "conversations: [{messages: [{role: user, content: b}, {role: assistant, content: b}]}]"),
])
def test_a_config_files_text_is_part_of_the_spec_hash(field: str, a: str, b: str) -> None:
    spec = parse_spec(base(training={field: {"configMapRef": {"name": "cm"}}}))
    assert spec_hash(spec, {field: a}) == spec_hash(spec, {field: a}) != spec_hash(spec, {field: b})
    assert spec_hash(spec, {field: a}) != spec_hash(spec)
    desired = render_all(OWNER, spec, {field: a})
    assert desired.pod["metadata"]["annotations"][SPEC_HASH_ANNOTATION] == desired.spec_hash == \
        spec_hash(spec, {field: a})



# --- tensor parallelism (resources.gpus > 1) -------------------------------------------------------------

def _tp_flags(args: list[str]) -> list[str]:
    return [a for i, a in enumerate(args) if a == "--tensor-parallel-size" or
            (i and args[i - 1] == "--tensor-parallel-size")]


@pytest.mark.parametrize("resources,gpu_limit,tp_flags,shm", [
    # gpus 0 and 1 render as before tensor parallelism: no flag, /dev/shm 2Gi.
    ({"gpus": 0}, None, [], "2Gi"),
    ({}, 1, [], "2Gi"),
    ({"gpus": 1, "shmSize": "8Gi"}, 1, [], "8Gi"),
    # More GPUs: one pod holding them all, vLLM splitting each layer over them; /dev/shm grows for NCCL.
    ({"gpus": 2}, 2, ["--tensor-parallel-size", "2"], "4Gi"),
    ({"gpus": 8}, 8, ["--tensor-parallel-size", "8"], "10Gi"),
    ({"gpus": 4, "shmSize": "16Gi", "gpuResourceName": "amd.com/gpu"}, 4, ["--tensor-parallel-size", "4"], "16Gi"),
])
def test_gpus_set_the_limit_the_tensor_parallel_size_and_shm_on_learner_and_followers(
        resources: dict[str, Any], gpu_limit: Any, tp_flags: list[str], shm: str) -> None:
    spec = parse_spec(base(resources=resources, replicas=3, serving={"extraArgs": ["--enforce-eager"]}))
    assert shm_size(spec) == shm
    for pod in (render_pod(OWNER, spec), render_follower(OWNER, spec, 1), render_follower(OWNER, spec, 2)):
        container = pod["spec"]["containers"][0]
        limits_ = container["resources"].get("limits", {})
        assert limits_.get(resources.get("gpuResourceName", "nvidia.com/gpu")) == gpu_limit
        args = container["args"]
        assert _tp_flags(args) == tp_flags
        if tp_flags:  # an option of `onlinemodel serve` (passed on to vLLM), before the user's extra arguments
            assert args.index("--tensor-parallel-size") < args.index("--") and args[-1] == "--enforce-eager"
        dshm = next(v for v in pod["spec"]["volumes"] if v["name"] == "dshm")
        assert dshm == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm}}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]

