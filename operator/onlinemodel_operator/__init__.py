"""The onlinemodel Kubernetes operator: the OnlineModel resource and the kopf handlers that run it.

Pure parts (no I/O): `models` (the resource, as pydantic models; its spec in `models_spec`, its status in
`models_status`, their shared base in `models_base`), `crd` (the CRD generated from them), `render` (spec ->
Pod/Service/PVC/API-token Secret), `pod` (reading a live pod back), `decide` (what was observed -> the one
action of a pass), `replicas` (followers: render, decide, status), `status` (pod + runtime answer ->
OnlineModelStatus), `events` (old and new status -> the Events worth posting), `clock` (UTC, RFC 3339). I/O
parts: `kube` (Kubernetes API), `runtime_client` (the pod's HTTP API), `reconcile` (one idempotent pass that
executes `decide`'s action), `handlers` (thin kopf handlers), `config` and `main` (the `onlinemodel-operator`
entry point).
"""

GROUP = "onlinemodel.dev"
VERSION = "v1alpha1"
PLURAL = "onlinemodels"
KIND = "OnlineModel"
API_VERSION = f"{GROUP}/{VERSION}"

# Annotation a user sets (to any new value) to ask for a checkpoint now.
CHECKPOINT_REQUEST_ANNOTATION = "onlinemodel.dev/checkpoint-requested"
# Pod annotation: hash of the OnlineModel spec the pod was rendered from (a change recreates the pod).
SPEC_HASH_ANNOTATION = "onlinemodel.dev/spec-hash"
# Label on every object the operator creates, naming the OnlineModel it belongs to.
NAME_LABEL = "onlinemodel.dev/name"
# Label of a serving pod's role when the OnlineModel is scaled out: the learner trains, followers serve its weights.
ROLE_LABEL = "onlinemodel.dev/role"
LEARNER = "learner"
FOLLOWER = "follower"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "onlinemodel-operator"
