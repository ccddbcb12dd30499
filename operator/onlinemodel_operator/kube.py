"""A small async Kubernetes API client for the objects the operator owns (pods, services, claims).

Credentials come from the `kubernetes` package's loaders (in-cluster service account, else kubeconfig),
so they match what kopf uses; requests go through httpx so handlers never block the event loop.
"""

from __future__ import annotations

import base64
import os
import ssl
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import httpx

from onlinemodel_operator import GROUP, PLURAL, VERSION

MERGE_PATCH = "application/merge-patch+json"


class KubeError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Conflict(KubeError):
    """409: the object exists already (create) or changed meanwhile."""


@dataclass(frozen=True)
class Kind:
    api_prefix: str  # "/api/v1" or "/apis/group/version"
    plural: str

    def path(self, namespace: str, name: Optional[str] = None, subresource: Optional[str] = None) -> str:
        path = f"{self.api_prefix}/namespaces/{namespace}/{self.plural}"
        if name:
            path += f"/{name}"
        if subresource:
            path += f"/{subresource}"
        return path


PODS = Kind("/api/v1", "pods")
SERVICES = Kind("/api/v1", "services")
CLAIMS = Kind("/api/v1", "persistentvolumeclaims")
SECRETS = Kind("/api/v1", "secrets")
CONFIGMAPS = Kind("/api/v1", "configmaps")
ONLINEMODELS = Kind(f"/apis/{GROUP}/{VERSION}", PLURAL)
KINDS = {"Pod": PODS, "Service": SERVICES, "PersistentVolumeClaim": CLAIMS, "Secret": SECRETS,
         "ConfigMap": CONFIGMAPS}


def load_configuration() -> Any:
    """The `kubernetes` package's Configuration: in-cluster first, then $KUBECONFIG / ~/.kube/config."""
    from kubernetes import config
    from kubernetes.client import Configuration

    cfg = Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        # Read $KUBECONFIG now: the package's own default was frozen when it was first imported.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg)
    return cfg


def connection_info(cfg: Any) -> Any:
    """kopf's credentials for the same Configuration (what kopf's own login_via_client builds)."""
    import kopf

    header = cfg.get_api_key_with_prefix("BearerToken") or cfg.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    return kopf.ConnectionInfo(server=cfg.host, ca_path=cfg.ssl_ca_cert, insecure=not cfg.verify_ssl,
                               username=cfg.username or None, password=cfg.password or None, scheme=scheme,
                               token=token, certificate_path=cfg.cert_file, private_key_path=cfg.key_file)


class KubeApi:
    """Async CRUD over the Kubernetes REST API (JSON dicts in, JSON dicts out)."""

    def __init__(self, configuration: Any, *, timeout: float = 30.0) -> None:
        self._cfg = configuration
        verify: Any = True
        if not configuration.verify_ssl:
            verify = ssl._create_unverified_context()  # the kubeconfig says insecure-skip-tls-verify
        elif configuration.ssl_ca_cert:
            verify = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
        if configuration.cert_file:
            if verify is True:
                verify = ssl.create_default_context()
            verify.load_cert_chain(configuration.cert_file, configuration.key_file)
        self._client = httpx.AsyncClient(base_url=configuration.host.rstrip("/"), verify=verify,
                                         timeout=timeout, trust_env=False)

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self, content_type: Optional[str] = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        token = self._cfg.get_api_key_with_prefix("BearerToken") or self._cfg.get_api_key_with_prefix("authorization")
        if token:
            headers["Authorization"] = token
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def _request(self, method: str, path: str, *, body: Any = None, content_type: Optional[str] = None,
                       params: Optional[Mapping[str, str]] = None) -> Optional[dict[str, Any]]:
        response = await self._client.request(method, path, json=body, params=params,
                                               headers=self._headers(content_type))
        if response.status_code == 404:
            return None
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            error = Conflict if response.status_code == 409 else KubeError
            raise error(response.status_code, str(message)[:1000])
        return response.json() if response.content else {}

    async def get(self, kind: Kind, namespace: str, name: str) -> Optional[dict[str, Any]]:
        return await self._request("GET", kind.path(namespace, name))

    async def list(self, kind: Kind, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        """The objects of `kind` in `namespace` carrying every label in `labels` (filtered here too: fakes
        may ignore the selector)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        result = await self._request("GET", kind.path(namespace), params={"labelSelector": selector}) or {}
        return [item for item in result.get("items") or []
                if all(((item.get("metadata") or {}).get("labels") or {}).get(k) == v for k, v in labels.items())]

    async def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        kind = KINDS[obj["kind"]]
        result = await self._request("POST", kind.path(obj["metadata"]["namespace"]), body=dict(obj),
                                     content_type="application/json")
        return result or {}

    async def patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any],
                    subresource: Optional[str] = None) -> Optional[dict[str, Any]]:
        return await self._request("PATCH", kind.path(namespace, name, subresource), body=dict(patch),
                                   content_type=MERGE_PATCH)

    async def delete(self, kind: Kind, namespace: str, name: str, *, uid: Optional[str] = None) -> bool:
        """Delete (with a uid precondition when given); False when it was already gone."""
        body: dict[str, Any] = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            result = await self._request("DELETE", kind.path(namespace, name), body=body,
                                         content_type="application/json")
        except Conflict:  # the uid precondition failed: a newer object of that name, not ours to delete
            return False
        return result is not None

    async def read_secret_key(self, namespace: str, name: str, key: str) -> Optional[str]:
        """The decoded value of a Secret's key; None when the Secret or the key is missing."""
        secret = await self.get(SECRETS, namespace, name)
        if secret is None:
            return None
        if key in (secret.get("stringData") or {}):  # only seen on fakes: the API server folds it into data
            return str(secret["stringData"][key])
        raw = (secret.get("data") or {}).get(key)
        return None if raw is None else base64.b64decode(raw).decode()
