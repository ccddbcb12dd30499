"""One idempotent reconcile of an OnlineModel, shared by every handler, the poller and pod events.

Level-triggered: each pass re-reads the OnlineModel and its pod, makes the claim, Service and pod match the
spec, asks the runtime how training goes, and writes the whole status. A bad spec changes nothing that runs.
A pod that must go (spec change, suspend) is asked for a checkpoint first; a new pod starts only after the
old one is gone (one GPU, one volume).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from pydantic import ValidationError

from onlinemodel_operator import NAME_LABEL, SPEC_HASH_ANNOTATION
from onlinemodel_operator.config import OperatorConfig
from onlinemodel_operator.kube import CLAIMS, ONLINEMODELS, PODS, SERVICES, Conflict, KubeApi
from onlinemodel_operator.models import API_TOKEN_ENV, OnlineModelSpec, format_validation_error, parse_spec
from onlinemodel_operator.models import MAX_NAME_LENGTH, OnlineModel, RESOURCE_NAME_RE
from onlinemodel_operator.render import CONTAINER_NAME, PORT_NAME, Owner, render_all
from onlinemodel_operator.runtime_client import CheckpointBusy, RuntimeClient, RuntimeClientError
from onlinemodel_operator.status import (
    RuntimeUnavailable,
    RuntimeView,
    Transition,
    analyze_pod,
    compute_status,
    merge_patch,
    pod_failure,
    rfc3339,
    transitions,
)

EventSink = Callable[[Mapping[str, Any], Transition], None]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


@dataclass
class Outcome:
    """What a pass left: the status written, and whether the caller should come back."""

    status: dict[str, Any] = field(default_factory=dict)
    retry_after: Optional[float] = None
    message: str = ""
    invalid: Optional[str] = None
    gone: bool = False


def runtime_url(pod: Mapping[str, Any]) -> Optional[str]:
    """http://<podIP>:<the runtime container's http port>, or None while the pod has no IP."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip:
        return None
    port = None
    for container in pod.get("spec", {}).get("containers", []):
        if container.get("name") == CONTAINER_NAME:
            for p in container.get("ports") or []:
                if p.get("name") == PORT_NAME:
                    port = p.get("containerPort")
    host = f"[{ip}]" if ":" in ip else ip
    return f"http://{host}:{port or 8000}"


def _pod_token_ref(pod: Mapping[str, Any]) -> Optional[tuple[str, str]]:
    """The Secret key the pod's runtime takes its API token from (the pod's, not the current spec's)."""
    for container in pod.get("spec", {}).get("containers", []):
        if container.get("name") != CONTAINER_NAME:
            continue
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if env.get("name") == API_TOKEN_ENV and ref:
                return ref["name"], ref.get("key", "token")
    return None


class Reconciler:
    def __init__(self, kube: KubeApi, config: OperatorConfig, *, clock: Callable[[], dt.datetime] = utcnow,
                 runtime_client: Callable[..., RuntimeClient] = RuntimeClient) -> None:
        self.kube = kube
        self.config = config
        self.clock = clock
        self.runtime_client = runtime_client
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.closed = False  # set when the operator stops: pollers end instead of retrying

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)

    # --- entry points -----------------------------------------------------------------------------------

    async def reconcile(self, namespace: str, name: str, events: EventSink) -> Outcome:
        async with self._lock(namespace, name):
            return await self._reconcile(namespace, name, events)

    async def request_checkpoint(self, namespace: str, name: str, value: str, events: EventSink) -> Outcome:
        """Handle a new value of the checkpoint-requested annotation: POST /checkpoint, record the result."""
        async with self._lock(namespace, name):
            body = await self.kube.get(ONLINEMODELS, namespace, name)
            if body is None:
                return Outcome(gone=True)
            checkpoint = (body.get("status") or {}).get("checkpoint") or {}
            if checkpoint.get("requested") == value:
                return await self._reconcile(namespace, name, events)  # handled before (e.g. on resume)
            pod = await self.kube.get(PODS, namespace, name)
            url = runtime_url(pod) if pod is not None else None
            if pod is None or url is None or not analyze_pod(pod).serving:
                return Outcome(retry_after=self.config.retry_delay,
                               message="checkpoint requested; waiting for the pod to serve")
            now = self.clock()
            record: dict[str, Any] = {"requested": value, "requestTime": rfc3339(now)}
            try:
                result = await self._client(url, await self._token(pod)).checkpoint(self.config.checkpoint_timeout)
            except CheckpointBusy:
                return Outcome(retry_after=self.config.retry_delay, message="a checkpoint is already running")
            except RuntimeClientError as exc:
                record.update(requestResult="Failed", requestMessage=str(exc))
                events(body, Transition("Warning", "CheckpointFailed", f"requested checkpoint {value!r} failed: {exc}"))
            else:
                record.update(requestResult="Succeeded", requestMessage=f"saved step {result.get('step')}")
                for key, src in (("step", "step"), ("weightVersion", "weight_version"), ("time", "time"),
                                 ("path", "path")):
                    if result.get(src) is not None:
                        record[key] = result[src]
                events(body, Transition("Normal", "CheckpointRequested",
                                        f"requested checkpoint {value!r} saved step {result.get('step')} "
                                        f"to {result.get('path')}"))
            await self.kube.patch(ONLINEMODELS, namespace, name, {"status": {"checkpoint": record}}, "status")
            return await self._reconcile(namespace, name, events)

    # --- one pass -------------------------------------------------------------------------------------------

    async def _reconcile(self, namespace: str, name: str, events: EventSink) -> Outcome:
        body = await self.kube.get(ONLINEMODELS, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return Outcome(gone=True)  # owner references let the garbage collector take the rest
        owner = Owner.from_body(body)
        spec, spec_error = await self._validate(body, owner)
        pod = await self.kube.get(PODS, namespace, name)
        if spec is not None:
            spec_error = await self._name_taken(owner, pod)
            if spec_error:
                spec, pod = None, None  # not ours: neither managed nor reported as our pod
        if spec is None:
            runtime = await self._poll(pod)
            status = compute_status(body, pod, runtime, self.clock(), spec_error=spec_error)
            await self._publish(body, status, events)
            return Outcome(status, invalid=spec_error)

        desired = render_all(owner, spec)
        await self._ensure_claim(owner, desired.pvc)
        await self._ensure_service(desired.service)
        retry: Optional[float] = None
        message = ""
        failure: Optional[dict[str, Any]] = None
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            retry, message = self.config.retry_delay, "waiting for the old pod to terminate"
        elif pod is not None and spec.suspend:
            body = await self._announce(body, pod, desired.spec_hash, desired.endpoint, events)
            pod = await self._stop_pod(body, pod, "Suspended", events)
        elif pod is not None and (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded"):
            failure = pod_failure(pod)
            events(body, Transition("Warning", "PodFailed", f"pod {name} {pod['status']['phase'].lower()}; recreating it"))
            pod = await self._delete_pod(pod)
        elif pod is not None and (pod["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != desired.spec_hash:
            body = await self._announce(body, pod, desired.spec_hash, desired.endpoint, events)
            pod = await self._stop_pod(body, pod, "SpecChanged", events)
        if pod is not None and pod["metadata"].get("deletionTimestamp"):
            retry, message = self.config.retry_delay, "waiting for the old pod to terminate"
        if pod is None and not spec.suspend:
            pod = await self._create_pod(desired.pod)
            events(body, Transition("Normal", "PodCreated", f"created pod {name} (spec {desired.spec_hash})"))

        runtime = await self._poll(pod)
        status = compute_status(body, pod, runtime, self.clock(), desired_hash=desired.spec_hash,
                                endpoint=desired.endpoint)
        if failure and failure != (body.get("status") or {}).get("lastFailure"):
            status["lastFailure"] = failure
        await self._publish(body, status, events)
        return Outcome(status, retry_after=retry, message=message)

    async def _validate(self, body: Mapping[str, Any], owner: Owner) -> tuple[Optional[OnlineModelSpec], Optional[str]]:
        """The parsed spec, or None and why it is refused (schema, CEL twins, missing references)."""
        if len(owner.name) > MAX_NAME_LENGTH or not re.match(RESOURCE_NAME_RE, owner.name):
            return None, OnlineModel.CEL[0]["message"]
        try:
            spec = parse_spec(body.get("spec"))
        except ValidationError as exc:
            return None, format_validation_error(exc)
        ns = owner.namespace
        refs = []
        if spec.training.api_token_secret_ref is not None:
            refs.append(("spec.training.apiTokenSecretRef", spec.training.api_token_secret_ref))
        hf = spec.model.source.hugging_face
        if hf is not None and hf.token_secret_ref is not None:
            refs.append(("spec.model.source.huggingFace.tokenSecretRef", hf.token_secret_ref))
        for path, ref in refs:
            if await self.kube.read_secret_key(ns, ref.name, ref.key) is None:
                return None, f"{path}: Secret {ns}/{ref.name} does not exist or has no key {ref.key!r}"
        claims = []
        if spec.model.source.volume is not None:
            claims.append(("spec.model.source.volume.claimName", spec.model.source.volume.claim_name))
        if spec.checkpoint.volume.existing_claim:
            claims.append(("spec.checkpoint.volume.existingClaim", spec.checkpoint.volume.existing_claim))
        for path, claim in claims:
            if await self.kube.get(CLAIMS, ns, claim) is None:
                return None, f"{path}: PersistentVolumeClaim {ns}/{claim} does not exist"
        return spec, None

    async def _name_taken(self, owner: Owner, pod: Optional[Mapping[str, Any]]) -> Optional[str]:
        """Why the pod or Service name is someone else's (never touch objects the operator did not make)."""
        service = await self.kube.get(SERVICES, owner.namespace, owner.name)
        for kind, obj in (("Pod", pod), ("Service", service)):
            if obj is not None and (obj["metadata"].get("labels") or {}).get(NAME_LABEL) != owner.name:
                return (f"{kind} {owner.namespace}/{owner.name} exists and was not created for this OnlineModel; "
                        "delete it or give the OnlineModel another name")
        return None

    # --- children -------------------------------------------------------------------------------------------

    async def _ensure_claim(self, owner: Owner, pvc: Optional[dict[str, Any]]) -> None:
        if pvc is None:
            return
        existing = await self.kube.get(CLAIMS, owner.namespace, pvc["metadata"]["name"])
        if existing is None:
            try:
                await self.kube.create(pvc)
            except Conflict:
                pass
            return
        if (existing["metadata"].get("labels") or {}).get(NAME_LABEL) != owner.name:
            return  # a claim of that name that we did not make: leave it alone
        current = existing["metadata"].get("ownerReferences") or []
        others = [r for r in current if r.get("uid") != owner.uid]
        wanted = others + pvc["metadata"].get("ownerReferences", [])
        if [r.get("uid") for r in wanted] != [r.get("uid") for r in current]:  # `retain` was flipped
            await self.kube.patch(CLAIMS, owner.namespace, pvc["metadata"]["name"],
                                  {"metadata": {"ownerReferences": wanted}})

    async def _ensure_service(self, service: dict[str, Any]) -> None:
        meta = service["metadata"]
        existing = await self.kube.get(SERVICES, meta["namespace"], meta["name"])
        if existing is None:
            try:
                await self.kube.create(service)
            except Conflict:
                pass
            return

        def key(svc: Mapping[str, Any]) -> Any:
            spec = svc.get("spec") or {}
            ports = [(p.get("name"), p.get("port"), p.get("targetPort")) for p in spec.get("ports") or []]
            return ports, spec.get("selector")

        if key(existing) != key(service):
            await self.kube.patch(SERVICES, meta["namespace"], meta["name"],
                                  {"spec": {"ports": service["spec"]["ports"], "selector": service["spec"]["selector"]}})

    async def _create_pod(self, pod: dict[str, Any]) -> Optional[dict[str, Any]]:
        try:
            return await self.kube.create(pod)
        except Conflict:  # created meanwhile (or an old one still terminating): read what is there
            return await self.kube.get(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def _delete_pod(self, pod: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        meta = pod["metadata"]
        await self.kube.delete(PODS, meta["namespace"], meta["name"], uid=meta.get("uid"))
        return await self.kube.get(PODS, meta["namespace"], meta["name"])

    async def _stop_pod(self, body: Mapping[str, Any], pod: Mapping[str, Any], why: str,
                        events: EventSink) -> Optional[dict[str, Any]]:
        """Checkpoint (when the runtime answers), then delete the pod; returns what is left of it."""
        url = runtime_url(pod)
        if url and analyze_pod(pod).serving:
            try:
                result = await self._client(url, await self._token(pod)).checkpoint(self.config.checkpoint_timeout)
            except CheckpointBusy:
                pass  # one is running; the preStop hook waits for it
            except RuntimeClientError as exc:
                events(body, Transition("Warning", "CheckpointBeforeStopFailed",
                                        f"{why}: checkpoint before stopping the pod failed ({exc}); "
                                        "the pod's preStop hook tries again"))
            else:
                events(body, Transition("Normal", "CheckpointBeforeStop",
                                        f"{why}: saved step {result.get('step')} before stopping the pod"))
        events(body, Transition("Normal", why, f"deleting pod {pod['metadata']['name']} ({why})"))
        return await self._delete_pod(pod)

    # --- runtime and status ---------------------------------------------------------------------------------

    def _client(self, url: str, token: Optional[str] = None) -> RuntimeClient:
        return self.runtime_client(url, token, timeout=self.config.runtime_timeout)

    async def _token(self, pod: Mapping[str, Any]) -> Optional[str]:
        ref = _pod_token_ref(pod)
        if ref is None:
            return None
        return await self.kube.read_secret_key(pod["metadata"]["namespace"], ref[0], ref[1])

    async def _poll(self, pod: Optional[Mapping[str, Any]]) -> RuntimeView:
        if pod is None or not analyze_pod(pod).serving:
            return None
        url = runtime_url(pod)
        if url is None:
            return RuntimeUnavailable("the pod has no IP address")
        try:
            return await self._client(url).train_status()
        except RuntimeClientError as exc:
            return RuntimeUnavailable(str(exc))

    async def _announce(self, body: dict[str, Any], pod: Mapping[str, Any], desired_hash: str, endpoint: str,
                        events: EventSink) -> dict[str, Any]:
        """Publish Updating/Suspended before a pod is stopped (its checkpoint may take minutes)."""
        runtime = await self._poll(pod)
        status = compute_status(body, pod, runtime, self.clock(), desired_hash=desired_hash, endpoint=endpoint)
        await self._publish(body, status, events)
        meta = body["metadata"]
        return await self.kube.get(ONLINEMODELS, meta["namespace"], meta["name"]) or body

    async def _publish(self, body: Mapping[str, Any], status: dict[str, Any], events: EventSink) -> None:
        old = body.get("status") or {}
        patch = merge_patch(old, status)
        if patch:
            meta = body["metadata"]
            await self.kube.patch(ONLINEMODELS, meta["namespace"], meta["name"], {"status": patch}, "status")
        for transition in transitions(old, status):
            events(body, transition)
