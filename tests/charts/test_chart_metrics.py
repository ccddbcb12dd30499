"""The chart's optional monitoring: a PodMonitor for the model pods and a Grafana dashboard ConfigMap."""

from __future__ import annotations

import json
import re

import kubernetes_validate
from prometheus_client import CollectorRegistry

from chart_helpers import KUBE_VERSIONS, NAMESPACE, by_kind, one
from onlinemodel_operator import MANAGED_BY, MANAGED_BY_LABEL
from onlinemodel_operator.render import PORT_NAME
from onlinemodel_runtime.server.metrics import TrainingMetrics

ON = {"metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}},
                  "grafanaDashboard": {"enabled": True}}}


def test_both_are_off_by_default(render):
    manifests = render()
    assert not by_kind(manifests, "PodMonitor") and not by_kind(manifests, "ConfigMap")


def test_the_pod_monitor_scrapes_every_model_pod(render):
    monitor = one(render(ON), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["metadata"]["labels"]["release"] == "prom"
    spec = monitor["spec"]
    assert spec["selector"] == {"matchLabels": {MANAGED_BY_LABEL: MANAGED_BY}}  # what the operator labels pods with
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["podMetricsEndpoints"] == [{"port": PORT_NAME, "path": "/metrics", "interval": "30s"}]
    watched = render({**ON, "operator": {"watchNamespaces": ["team-a"]}})
    assert one(watched, "PodMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}
    chosen = render({"metrics": {"podMonitor": {"enabled": True, "namespaces": ["ml"], "interval": "15s"}}})
    spec = one(chosen, "PodMonitor")["spec"]
    assert spec["namespaceSelector"] == {"matchNames": ["ml"]} and spec["podMetricsEndpoints"][0]["interval"] == "15s"


def test_the_dashboard_is_valid_json_with_a_panel_for_every_metric(render):
    config_map = one(render(ON), "ConfigMap")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == NAMESPACE
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)
    dashboard = json.loads(config_map["data"]["onlinemodel.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    used = set(re.findall(r"[a-z_:]+(?=\{)", exprs))
    registry = CollectorRegistry()
    TrainingMetrics(registry)
    families = {m.name for m in registry.collect()}
    exposed = {n + s for n in families for s in ("", "_total", "_bucket")}
    missing = [name for name in families if not used & {name, name + "_total", name + "_bucket"}]
    assert not missing, f"metrics without a panel: {missing}"
    assert {u for u in used if u.startswith("onlinemodel_")} <= exposed  # no panel of a metric that does not exist
    assert {"vllm:inter_token_latency_seconds_bucket", "vllm:generation_tokens_total"} <= used  # TPOT, throughput
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
