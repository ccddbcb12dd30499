{{/* Chart name, overridable with nameOverride. */}}
{{- define "onlinemodel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's resources: <release>-<chart>, or the release name when it already holds the chart name. */}}
{{- define "onlinemodel.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "onlinemodel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod; never change them between versions (selectors are immutable). */}}
{{- define "onlinemodel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onlinemodel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "onlinemodel.labels" -}}
helm.sh/chart: {{ include "onlinemodel.chart" . }}
{{ include "onlinemodel.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: onlinemodel
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "onlinemodel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "onlinemodel.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "onlinemodel.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
RBAC rules on the objects the operator manages, shared by the ClusterRole (all namespaces) and the
per-namespace Roles (operator.watchNamespaces).
*/}}
{{- define "onlinemodel.namespacedRules" -}}
# The operator's own kind. kopf patches metadata (finalizer, handler progress annotations) and the
# status subresource. `delete` and `update` on onlinemodels/finalizers: with the
# OwnerReferencesPermissionEnforcement admission plugin, only a client allowed to delete the owner
# and update its finalizers may set blockOwnerDeletion in the owner references of the Pod, Service
# and PVC it creates.
- apiGroups: ["onlinemodel.dev"]
  resources: ["onlinemodels"]
  verbs: ["get", "list", "watch", "patch", "update", "delete"]
- apiGroups: ["onlinemodel.dev"]
  resources: ["onlinemodels/status"]
  verbs: ["get", "patch", "update"]
- apiGroups: ["onlinemodel.dev"]
  resources: ["onlinemodels/finalizers"]
  verbs: ["update"]
# What each OnlineModel is reconciled into (the operator watches its pods). No pods/exec: the
# operator talks to the runtime over HTTP.
- apiGroups: [""]
  resources: ["pods", "services", "persistentvolumeclaims"]
  verbs: ["create", "get", "list", "watch", "patch", "delete"]
# Secrets: `get` by name (no list or watch, so it never sees the Secrets it is not told about): the
# operator checks that the Secrets a spec names exist and hold a value before it starts a pod, and reads
# the pod's API token to call its GET /train/status and POST /checkpoint. `create`: the Secret
# <name>-api-token with a random token when a spec names none. RBAC cannot limit `create` to those names
# (resourceNames never matches a create: the name is in the request body, not the URL the authorizer
# sees), so this rule allows creating any Secret in the namespace. No update, patch or delete: a
# generated Secret is never changed, and the garbage collector deletes it with its OnlineModel (owner
# reference).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create"]
# ConfigMaps: `get` by name only: the operator validates the guard and anchor files a spec names
# (spec.training.guard.configMapRef, spec.training.anchors.configMapRef) before it starts a pod; the pod mounts them.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# Events for handler progress (kopf) and status transitions (the operator), core v1 API.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- with .Values.rbac.extraRules }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* kopf's cluster-wide needs: it watches CRDs and namespaces to learn which resources and namespaces exist. */}}
{{- define "onlinemodel.clusterRules" -}}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
