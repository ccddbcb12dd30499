"""The kubelet of the operator tests: `FakeKubelet` plays the lifecycle of the pods in the emulated API
server (Running at 127.0.0.1, waiting, exited, failed, deletions finished), and `play_kubelet` runs a pod's
own container command, with the pod's environment, as a local process (the end-to-end test with the real
runtime).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Optional

import httpx

from onlinemodel_operator.pod import runtime_container
from onlinemodel_operator.render import CONTAINER_NAME
from onlinemodel_protocol.api import utc_timestamp
from operator_apiserver import ApiServer


def running_status(ip: str = "127.0.0.1", ready: bool = True, restarts: int = 0) -> dict[str, Any]:
    now = utc_timestamp()
    return {
        "phase": "Running", "podIP": ip, "startTime": now,
        "conditions": [{"type": "PodScheduled", "status": "True"},
                       {"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": CONTAINER_NAME, "ready": ready, "restartCount": restarts,
                               "started": True, "state": {"running": {"startedAt": now}}}],
    }


class FakeKubelet:
    """Plays the kubelet for pods in the emulator: starts them (Running at 127.0.0.1) and finishes deletions."""

    def __init__(self, api: ApiServer, namespace: str, *, auto_start: bool = True, ready: bool = True,
                 termination_delay: float = 0.3) -> None:
        self.api = api
        self.namespace = namespace
        self.auto_start = auto_start
        self.ready = ready
        self.termination_delay = termination_delay
        self._seen: set[str] = set()
        self._terminating: set[str] = set()
        self._task: Optional[asyncio.Task[None]] = None

    async def __aenter__(self) -> "FakeKubelet":
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        while True:
            for pod in self.api.live("v1/pods", self.namespace):
                uid = pod["metadata"]["uid"]
                name = pod["metadata"]["name"]
                if pod["metadata"].get("deletionTimestamp"):
                    if uid in self._terminating:
                        continue
                    self._terminating.add(uid)
                    asyncio.get_running_loop().call_later(
                        self.termination_delay,
                        lambda n=name: asyncio.ensure_future(self.api.finish_deletion("v1/pods", self.namespace, n)))
                    continue
                if uid not in self._seen:
                    self._seen.add(uid)
                    if self.auto_start:
                        await self.mark_running(name, ready=self.ready)
            await asyncio.sleep(0.05)

    async def set_status(self, name: str, status: Mapping[str, Any]) -> dict[str, Any]:
        return await self.api.patch_object("v1/pods", self.namespace, name, {"status": dict(status)}, "status")

    async def mark_running(self, name: str, *, ready: bool = True, ip: str = "127.0.0.1") -> dict[str, Any]:
        return await self.set_status(name, running_status(ip, ready))

    async def mark_waiting(self, name: str, reason: str, message: str = "") -> dict[str, Any]:
        return await self.set_status(name, {
            "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [{"name": CONTAINER_NAME, "ready": False, "restartCount": 0,
                                   "state": {"waiting": {"reason": reason, "message": message}}}]})

    async def mark_exited(self, name: str, exit_code: int, message: str) -> dict[str, Any]:
        """The runtime container exited (the pod stays Running: restartPolicy Always restarts it)."""
        return await self.set_status(name, {
            "phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [{
                "name": CONTAINER_NAME, "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message,
                                         "finishedAt": utc_timestamp()}}}]})

    async def mark_crash_looping(self, name: str, exit_code: int, message: str, restarts: int = 3) -> dict[str, Any]:
        """The runtime container keeps exiting; `message`: the end of its log (terminationMessagePolicy
        FallbackToLogsOnError)."""
        return await self.set_status(name, {
            "phase": "Running", "podIP": "127.0.0.1", "containerStatuses": [{
                "name": CONTAINER_NAME, "ready": False, "restartCount": restarts,
                "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}},
                "lastState": {"terminated": {"exitCode": exit_code, "reason": "Error", "message": message,
                                             "finishedAt": utc_timestamp()}}}]})

    async def mark_failed(self, name: str, exit_code: int = 1, reason: str = "Error") -> dict[str, Any]:
        now = utc_timestamp()
        return await self.set_status(name, {
            "phase": "Failed", "containerStatuses": [{
                "name": CONTAINER_NAME, "ready": False, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "reason": reason, "finishedAt": now}}}]})


# The end of `onlinemodel serve --model SmolLM2-135M-Instruct --tensor-parallel-size 2`'s output (vLLM 0.32 CPU,
# measured 2026-12-01; exit code 1): what the pod's termination message holds when vLLM refuses the GPU count.
VLLM_REFUSES_TP_2 = (
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for VllmConfig\n"
    "  Value error, Total number of attention heads (9) must be divisible by tensor parallel size (2). "
    "[type=value_error, input_value=ArgsKwargs((), {'model_co... 'shutdown_timeout': 0}), input_type=ArgsKwargs]\n"
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n")


def local_command(pod: Mapping[str, Any], *, host: str = "127.0.0.1", port: int, checkpoint_dir: str) -> list[str]:
    """The pod's `onlinemodel serve ...` command, re-pointed at a local address and checkpoint directory
    (flags the operator always renders)."""
    container = runtime_container(pod)
    argv = [*container["command"], *container["args"]]
    for flag, value in (("--host", host), ("--port", str(port)), ("--checkpoint-dir", checkpoint_dir)):
        argv[argv.index(flag) + 1] = value
    return argv


def runnable(argv: list[str]) -> list[str]:
    """`onlinemodel ...` as a local command: the console script when on PATH, else this Python."""
    if argv and argv[0] == "onlinemodel" and shutil.which("onlinemodel") is None:
        return [sys.executable, "-c", "import sys; from onlinemodel_runtime.cli import main; sys.exit(main())",
                *argv[1:]]
    return argv


async def _health_ok(port: int) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            return (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200
    except httpx.HTTPError:
        return False


def pod_environment(api: ApiServer, pod: Mapping[str, Any], volumes_dir: Path) -> dict[str, str]:
    """The runtime container's environment as the kubelet gives it: values, and Secret keys read from the
    API server; a value under an emptyDir's mount path points into that volume's directory in `volumes_dir`."""
    container = runtime_container(pod)
    kinds = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes_dir / m["name"] for m in container.get("volumeMounts") or []
              if "emptyDir" in kinds[m["name"]]}
    secrets = {s["metadata"]["name"]: s for s in api.live("v1/secrets", pod["metadata"]["namespace"])}
    env: dict[str, str] = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            value = entry["value"]
            for mount_path, local in mounts.items():
                if value == mount_path or value.startswith(mount_path + "/"):
                    value = str(local) + value[len(mount_path):]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        env[entry["name"]] = value
    for local in mounts.values():
        local.mkdir(parents=True, exist_ok=True)
    return env


async def play_kubelet(kubelet: FakeKubelet, pod: Mapping[str, Any], *, checkpoint_dir: str, volumes_dir: Path,
                       env: Optional[Mapping[str, str]] = None,
                       ready: Optional[Callable[[], Awaitable[bool]]] = None,
                       timeout: float = 600.0) -> subprocess.Popen[bytes]:
    """Run the pod's container command as a local process and publish the pod as the kubelet would.

    The process listens on the pod's containerPort (a test sets spec.serving.port to `free_port()`) at
    127.0.0.1, checkpoints to `checkpoint_dir`, and gets the pod's environment (`pod_environment`, its
    emptyDirs under `volumes_dir`), then `env`. The pod is marked Running (not ready) at once, and ready when
    `ready()` (default: GET /health answers 200) says so. The caller terminates the process."""
    port = runtime_container(pod)["ports"][0]["containerPort"]
    argv = runnable(local_command(pod, port=port, checkpoint_dir=checkpoint_dir))
    process = subprocess.Popen(argv, env={**os.environ, **pod_environment(kubelet.api, pod, volumes_dir),
                                          **(env or {})})
    await kubelet.mark_running(pod["metadata"]["name"], ready=False)
    deadline = asyncio.get_running_loop().time() + timeout
    while not await (ready() if ready is not None else _health_ok(port)):
        if process.poll() is not None:
            raise RuntimeError(f"{argv[:3]} exited with {process.returncode}")
        if asyncio.get_running_loop().time() > deadline:
            process.terminate()
            raise TimeoutError(f"the runtime did not get ready in {timeout} s")
        await asyncio.sleep(1.0)
    await kubelet.mark_running(pod["metadata"]["name"], ready=True)
    return process

