"""Thin kopf handlers: each one calls the shared Reconciler; status is written there, never returned here.

Load with `kopf run -m onlinemodel_operator.handlers` (or `onlinemodel-operator`, see main.py).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import kopf

from onlinemodel_operator import (
    CHECKPOINT_REQUEST_ANNOTATION,
    GROUP,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    NAME_LABEL,
    PLURAL,
    VERSION,
)
from onlinemodel_operator.config import OperatorConfig
from onlinemodel_operator.kube import KubeApi, connection_info, load_configuration
from onlinemodel_operator.reconcile import Outcome, Reconciler
from onlinemodel_operator.events import Transition


KOPF_PREFIX = f"kopf.{GROUP}"


def post_event(body: Mapping[str, Any], transition: Transition) -> None:
    """A Kubernetes Event on the OnlineModel (kopf queues it; posting never blocks a handler)."""
    kopf.event(dict(body), type=transition.type, reason=transition.reason, message=transition.message)


def _settle(outcome: Outcome) -> None:
    """Turn an outcome into kopf's retry semantics (the status is already written)."""
    if outcome.invalid:
        raise kopf.PermanentError(f"InvalidSpec: {outcome.invalid}")
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.message or "not settled yet", delay=outcome.retry_after)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    config = memo.get("config") or OperatorConfig.from_env(os.environ)
    memo["config"] = config
    # Keep kopf's bookkeeping in annotations (the structural status schema would prune it), under a prefix
    # of its own: kopf drops every annotation under its prefix from the diff, so with "onlinemodel.dev" the
    # checkpoint-requested annotation would never reach its handler.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=KOPF_PREFIX, key="last-handled-configuration")
    settings.persistence.finalizer = f"{GROUP}/operator"  # kopf's daemons need one; name it after us
    settings.posting.reporting_component = MANAGED_BY
    settings.watching.server_timeout = 300
    settings.networking.request_timeout = 60
    memo["reconciler"] = Reconciler(KubeApi(load_configuration()), config)
    logger.info(f"onlinemodel operator configured: {config!r}")


@kopf.on.login()
def login(**_: Any) -> Any:
    """In-cluster service account, else the kubeconfig named by $KUBECONFIG when the operator starts."""
    return connection_info(load_configuration())


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    reconciler = memo.get("reconciler")
    if reconciler is not None:
        reconciler.closed = True
        await reconciler.kube.aclose()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def reconcile(name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    _settle(await memo["reconciler"].reconcile(namespace, name, post_event))


@kopf.on.field(GROUP, VERSION, PLURAL, field=("metadata", "annotations", CHECKPOINT_REQUEST_ANNOTATION))
async def checkpoint_requested(new: Any, name: str, namespace: str, memo: kopf.Memo, **_: Any) -> None:
    if not new:
        return
    outcome = await memo["reconciler"].request_checkpoint(namespace, name, str(new), post_event)
    if outcome.retry_after is not None:
        raise kopf.TemporaryError(outcome.message, delay=outcome.retry_after)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=10.0)
async def poll(stopped: kopf.DaemonStopped, name: str, namespace: str, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """Re-reconcile every poll interval: pod state and /train/status change without any event of ours."""
    reconciler: Reconciler = memo["reconciler"]
    while not stopped and not reconciler.closed:
        try:
            outcome = await reconciler.reconcile(namespace, name, post_event)
        except Exception as exc:  # keep polling: the next pass may succeed (API hiccup, runtime restart)
            if stopped or reconciler.closed:
                break
            logger.warning(f"reconcile failed: {exc!r}")
        else:
            if outcome.gone:
                break
        await stopped.wait(memo["config"].poll_interval)
    reconciler.forget(namespace, name)


@kopf.on.event("v1", "pods", labels={MANAGED_BY_LABEL: MANAGED_BY, NAME_LABEL: kopf.PRESENT})
async def pod_changed(type: str, body: kopf.Body, memo: kopf.Memo, logger: Any, **_: Any) -> None:
    """A pod of ours changed or vanished: reconcile its OnlineModel now (recreate, or report the state)."""
    if type is None:  # the initial listing; the resume handlers cover it
        return
    owner = body.get("metadata", {}).get("labels", {}).get(NAME_LABEL)
    namespace = body.get("metadata", {}).get("namespace")
    if not owner or not namespace:
        return
    try:
        await memo["reconciler"].reconcile(namespace, owner, post_event)
    except Exception as exc:  # the poller retries; an event handler must not crash the watch
        logger.warning(f"reconcile of {namespace}/{owner} after a pod event failed: {exc!r}")
