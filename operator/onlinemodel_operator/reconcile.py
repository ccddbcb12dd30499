"""One idempotent reconcile of an OnlineModel, shared by every handler, the poller and pod events.

Level-triggered: each pass reads the OnlineModel and its pod, parses the spec, renders the children,
lets `decide` pick the one thing to do about the pod and does it, asks the runtime how training goes, and
patches the whole status. What to do is decided in decide.py; this module only executes it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from pydantic import ValidationError

from onlinemodel_operator.clock import rfc3339, utcnow
from onlinemodel_operator import FOLLOWER, NAME_LABEL, ROLE_LABEL
from onlinemodel_operator.config import OperatorConfig
from onlinemodel_operator.config_files import config_file_error, config_file_refs
from onlinemodel_operator.decide import (
    AlreadyHandled,
    CreatePod,
    ReplaceFailedPod,
    StopForModelChange,
    StopPod,
    WaitForOldPod,
    WaitUntilServing,
    decide,
    decide_checkpoint_request,
    name_taken,
)
from onlinemodel_operator.kube import (CLAIMS, CONFIGMAPS, ONLINEMODELS, PODS, SECRETS, SERVICES, Conflict, KubeApi,
                                       KubeError)
from onlinemodel_operator.models import name_error
from onlinemodel_operator.models_spec import OnlineModelSpec, format_validation_error, parse_spec
from onlinemodel_operator.models_status import FailureStatus, ModelChangedStatus, OnlineModelStatus, SecretKeyStatus
from onlinemodel_operator.pod import analyze_pod, api_token_ref, pod_failure, runtime_url
from onlinemodel_operator.replicas import (CreateFollower, decide_followers, follower_index, follower_pod_name,
                                           render_follower, replicas_status)
from onlinemodel_operator.render import Desired, Owner, made_for, render_all, render_token_secret, spec_hash
from onlinemodel_operator.runtime_client import CheckpointBusy, RuntimeClient, RuntimeClientError
from onlinemodel_operator.events import Transition, transitions
from onlinemodel_operator.status import (
    RuntimeUnavailable,
    RuntimeView,
    compute_status,
    merge_patch,
    previous_status,
    with_saved_checkpoint,
)

EventSink = Callable[[Mapping[str, Any], Transition], None]


@dataclass(frozen=True)
class Outcome:
    """What a pass left: whether the caller should come back (kopf's TemporaryError) or give up (PermanentError)."""

    retry_after: Optional[float] = None
    message: str = ""
    invalid: Optional[str] = None
    gone: bool = False


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

    def _retry(self, message: str) -> Outcome:
        return Outcome(retry_after=self.config.retry_delay, message=message)

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
            previous = previous_status(body).checkpoint
            pod = await self.kube.get(PODS, namespace, name)
            action = decide_checkpoint_request(value, previous.requested if previous else None, pod)
            if isinstance(action, AlreadyHandled):
                return await self._reconcile(namespace, name, events)
            if isinstance(action, WaitUntilServing):
                return self._retry("checkpoint requested; waiting for the pod to serve")
            assert pod is not None
            request = {"requested": value, "request_time": rfc3339(self.clock())}
            try:
                saved = await (await self._client(pod)).checkpoint(self.config.checkpoint_timeout)
            except CheckpointBusy:
                return self._retry("a checkpoint is already running")
            except RuntimeClientError as exc:
                record = with_saved_checkpoint(previous, None, **request, request_result="Failed",
                                               request_message=str(exc))
                events(body, Transition("Warning", "CheckpointFailed", f"requested checkpoint {value!r} failed: {exc}"))
            else:
                record = with_saved_checkpoint(previous, saved, **request, request_result="Succeeded",
                                               request_message=f"saved step {saved.step}")
                events(body, Transition("Normal", "CheckpointRequested",
                                        f"requested checkpoint {value!r} saved step {saved.step} to {saved.path}"))
            await self.kube.patch(ONLINEMODELS, namespace, name, {"status": {"checkpoint": record.to_dict()}}, "status")
            return await self._reconcile(namespace, name, events)

    # --- one pass -------------------------------------------------------------------------------------------

    async def _reconcile(self, namespace: str, name: str, events: EventSink) -> Outcome:
        body = await self.kube.get(ONLINEMODELS, namespace, name)
        if body is None or body.get("metadata", {}).get("deletionTimestamp"):
            return Outcome(gone=True)  # owner references let the garbage collector take the rest
        owner = Owner.from_body(body)
        spec, refused, files = await self._parse(body, owner)
        pod = await self.kube.get(PODS, namespace, name)
        desired = render_all(owner, spec, files) if spec is not None else None
        token_secret = None
        if desired is not None:
            if desired.generates_token:
                token_secret = await self.kube.get(SECRETS, namespace, desired.api_token.name)
            refused = name_taken(name, namespace, pod, await self.kube.get(SERVICES, namespace, name), token_secret)
            if refused:
                pod = None  # not ours: neither managed nor reported as our pod
        if desired is None or refused:  # parse failed: report it, touch nothing that runs
            status = compute_status(body, pod, await self._poll(pod), self.clock(), spec_error=refused)
            await self._publish(body, status, events)
            return Outcome(invalid=refused)

        if desired.generates_token and token_secret is None:
            await self._create_token_secret(owner, body, events)
        await self._ensure_claim(owner, desired.pvc)
        await self._ensure_service(desired.service)
        await self._ensure_service(desired.train_service)
        failure: Optional[FailureStatus] = None
        model_changed = previous_status(body).model_changed  # the spec hash held back, if any
        action = decide(pod, desired_hash=desired.spec_hash, suspend=spec.suspend,
                        held_hash=model_changed.spec_hash if model_changed else None)
        if isinstance(action, (StopPod, ReplaceFailedPod, StopForModelChange)):
            assert pod is not None
            if isinstance(action, StopPod):
                body = await self._announce(body, pod, desired, events)
                pod = await self._stop_pod(body, pod, action, events)
            else:  # the pod failed, or its runtime refused to start: record why, then delete it
                failure = pod_failure(pod)
                if isinstance(action, StopForModelChange):
                    model_changed = ModelChangedStatus(spec_hash=desired.spec_hash, message=action.message,
                                                       time=rfc3339(self.clock()))
                    events(body, Transition("Warning", "ModelChanged",
                                            f"the runtime refused the checkpoints ({action.message}); deleted pod "
                                            f"{name}; none is started until the spec changes"))
                else:
                    events(body, Transition("Warning", "PodFailed",
                                            f"pod {name} {action.phase.lower()}; recreating it"))
                pod = await self._delete_pod(pod)
            # Then the one thing to do about what is left of it: wait while it terminates, or replace it.
            action = decide(pod, desired_hash=desired.spec_hash, suspend=spec.suspend,
                            held_hash=model_changed.spec_hash if model_changed else None)
        outcome = Outcome()
        if isinstance(action, WaitForOldPod):
            outcome = self._retry("waiting for the old pod to terminate")
        elif isinstance(action, CreatePod):
            pod = await self._create_pod(desired.pod)
            events(body, Transition("Normal", "PodCreated", f"created pod {name} (spec {desired.spec_hash})"))

        # Followers read no config file (they do not train): their pods' hash leaves those out (render_follower).
        followers = await self._followers(owner, spec, spec_hash(spec), body, events)
        runtime = await self._poll(pod)
        status = compute_status(body, pod, runtime, self.clock(), desired_hash=desired.spec_hash,
                                endpoint=desired.endpoint, deleted_failure=failure, model_changed=model_changed,
                                api_token_secret=SecretKeyStatus(name=desired.api_token.name,
                                                                 key=desired.api_token.key),
                                replicas=replicas_status(spec, pod, followers, runtime, owner))
        await self._publish(body, status, events)
        return outcome

    async def _parse(self, body: Mapping[str, Any], owner: Owner
                     ) -> tuple[Optional[OnlineModelSpec], Optional[str], dict[str, str]]:
        """(the parsed spec, or None and why it is refused (schema, CEL twins, missing references, a bad config
        file); the texts of its config files by field, config_files.py)."""
        error = name_error(owner.name)
        if error:
            return None, error, {}
        try:
            spec = parse_spec(body.get("spec"))
        except ValidationError as exc:
            return None, format_validation_error(exc), {}
        ns = owner.namespace
        refs = []
        if spec.training.api_token_secret_ref is not None:
            refs.append(("spec.training.apiTokenSecretRef", spec.training.api_token_secret_ref))
        hf = spec.model.source.hugging_face
        if hf is not None and hf.token_secret_ref is not None:
            refs.append(("spec.model.source.huggingFace.tokenSecretRef", hf.token_secret_ref))
        for path, ref in refs:
            value = await self.kube.read_secret_key(ns, ref.name, ref.key)
            if value is None:
                return None, f"{path}: Secret {ns}/{ref.name} does not exist or has no key {ref.key!r}", {}
            if not value.strip():  # the runtime refuses an empty token rather than serve without one
                return None, f"{path}: key {ref.key!r} of Secret {ns}/{ref.name} is empty", {}
        claims = []
        if spec.model.source.volume is not None:
            claims.append(("spec.model.source.volume.claimName", spec.model.source.volume.claim_name))
        if spec.checkpoint.volume.existing_claim:
            claims.append(("spec.checkpoint.volume.existingClaim", spec.checkpoint.volume.existing_claim))
        for path, claim in claims:
            if await self.kube.get(CLAIMS, ns, claim) is None:
                return None, f"{path}: PersistentVolumeClaim {ns}/{claim} does not exist", {}
        files = {}
        for file, ref in config_file_refs(spec):
            text = ((await self.kube.get(CONFIGMAPS, ns, ref.name) or {}).get("data") or {}).get(ref.key)
            error = config_file_error(file, text, ns, ref)
            if error:
                return None, error, {}
            files[file.field] = text
        return spec, None, files

    # --- children -------------------------------------------------------------------------------------------

    async def _create_token_secret(self, owner: Owner, body: Mapping[str, Any], events: EventSink) -> None:
        """The Secret with a random API token, owned by the OnlineModel; drawn once, reused ever after."""
        secret = render_token_secret(owner, secrets.token_urlsafe(32))
        try:
            await self.kube.create(secret)
        except Conflict:  # created meanwhile by another pass: that one stays
            return
        events(body, Transition("Normal", "ApiTokenCreated",
                                f"created Secret {secret['metadata']['name']} with a random API token "
                                "for the training routes (status.apiTokenSecret)"))

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
        if not made_for(existing, owner.name):
            return  # a claim of that name that we did not make: leave it alone
        current = existing["metadata"].get("ownerReferences") or []
        others = [r for r in current if r.get("uid") != owner.uid]
        wanted = others + pvc["metadata"].get("ownerReferences", [])
        if [r.get("uid") for r in wanted] != [r.get("uid") for r in current]:  # `deleteWithModel` was flipped
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

        if not made_for(existing, meta["labels"][NAME_LABEL]):
            return  # a Service of that name that we did not make: leave it alone

        def key(svc: Mapping[str, Any]) -> Any:
            spec = svc.get("spec") or {}
            ports = [(p.get("name"), p.get("port"), p.get("targetPort")) for p in spec.get("ports") or []]
            return ports, spec.get("selector")

        if key(existing) != key(service):
            await self.kube.patch(SERVICES, meta["namespace"], meta["name"],
                                  {"spec": {"ports": service["spec"]["ports"], "selector": service["spec"]["selector"]}})

    async def _followers(self, owner: Owner, spec: OnlineModelSpec, desired_hash: str, body: Mapping[str, Any],
                         events: EventSink) -> dict[int, dict[str, Any]]:
        """Execute `decide_followers` (replicas.py); the follower pods left, by index."""
        pods = await self.kube.list(PODS, owner.namespace, {NAME_LABEL: owner.name, ROLE_LABEL: FOLLOWER})
        followers = {i: p for p in pods if (i := follower_index(owner, p)) is not None}
        for action in decide_followers(followers, replicas=spec.replicas, desired_hash=desired_hash,
                                       suspend=spec.suspend):
            name = follower_pod_name(owner, action.index)
            if isinstance(action, CreateFollower):
                created = await self._create_pod(render_follower(owner, spec, action.index))
                if created is not None:
                    followers[action.index] = created
                events(body, Transition("Normal", "FollowerCreated", f"created follower pod {name}"))
                continue
            left = await self._delete_pod(followers[action.index])
            if left is None:
                del followers[action.index]
            else:
                followers[action.index] = left
            events(body, Transition("Normal", "FollowerDeleted", f"deleting follower pod {name} ({action.why})"))
        return followers

    async def _create_pod(self, pod: dict[str, Any]) -> Optional[dict[str, Any]]:
        try:
            return await self.kube.create(pod)
        except Conflict:  # created meanwhile (or an old one still terminating): read what is there
            return await self.kube.get(PODS, pod["metadata"]["namespace"], pod["metadata"]["name"])

    async def _delete_pod(self, pod: Mapping[str, Any]) -> Optional[dict[str, Any]]:
        """Delete this pod (not a newer one of the same name); returns what is left of it."""
        meta = pod["metadata"]
        await self.kube.delete(PODS, meta["namespace"], meta["name"], uid=meta.get("uid"))
        return await self.kube.get(PODS, meta["namespace"], meta["name"])

    async def _stop_pod(self, body: Mapping[str, Any], pod: Mapping[str, Any], action: StopPod,
                        events: EventSink) -> Optional[dict[str, Any]]:
        """Checkpoint (when the action says the runtime answers), then delete the pod."""
        why = action.why
        if action.checkpoint_first:
            try:
                saved = await (await self._client(pod)).checkpoint(self.config.checkpoint_timeout)
            except CheckpointBusy:
                pass  # one is running; the preStop hook waits for it
            except RuntimeClientError as exc:
                events(body, Transition("Warning", "CheckpointBeforeStopFailed",
                                        f"{why}: checkpoint before stopping the pod failed ({exc}); "
                                        "the pod's preStop hook tries again"))
            else:
                events(body, Transition("Normal", "CheckpointBeforeStop",
                                        f"{why}: saved step {saved.step} before stopping the pod"))
        events(body, Transition("Normal", why, f"deleting pod {pod['metadata']['name']} ({why})"))
        return await self._delete_pod(pod)

    # --- runtime and status ---------------------------------------------------------------------------------

    async def _client(self, pod: Mapping[str, Any]) -> RuntimeClient:
        """A client of the pod's runtime, with the API token the pod itself was given (every route but
        /health needs it)."""
        url = runtime_url(pod)
        assert url is not None, "only pods that answer are asked"
        ref = api_token_ref(pod)
        token = None if ref is None else await self.kube.read_secret_key(pod["metadata"]["namespace"], *ref)
        return self.runtime_client(url, token, timeout=self.config.runtime_timeout)

    async def _poll(self, pod: Optional[Mapping[str, Any]]) -> RuntimeView:
        if pod is None or not analyze_pod(pod).serving:
            return None
        if runtime_url(pod) is None:
            return RuntimeUnavailable("the pod has no IP address")
        try:
            return await (await self._client(pod)).train_status()
        except RuntimeClientError as exc:
            return RuntimeUnavailable(str(exc))
        except KubeError as exc:  # reading the token failed
            return RuntimeUnavailable(f"cannot read the pod's API token: {exc}")

    async def _announce(self, body: dict[str, Any], pod: Mapping[str, Any], desired: Desired,
                        events: EventSink) -> dict[str, Any]:
        """Publish Updating/Suspended before a pod is stopped (its checkpoint may take minutes)."""
        status = compute_status(body, pod, await self._poll(pod), self.clock(), desired_hash=desired.spec_hash,
                                endpoint=desired.endpoint)
        await self._publish(body, status, events)
        meta = body["metadata"]
        return await self.kube.get(ONLINEMODELS, meta["namespace"], meta["name"]) or body

    async def _publish(self, body: Mapping[str, Any], status: OnlineModelStatus, events: EventSink) -> None:
        """Patch /status with the difference from what the API holds, and post an Event per transition."""
        patch = merge_patch(body.get("status") or {}, status.to_dict())
        if patch:
            meta = body["metadata"]
            await self.kube.patch(ONLINEMODELS, meta["namespace"], meta["name"], {"status": patch}, "status")
        for transition in transitions(previous_status(body), status):
            events(body, transition)
