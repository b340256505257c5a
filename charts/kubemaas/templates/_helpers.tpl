{{/* Names. */}}
{{- define "kubemaas.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubemaas.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubemaas.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubemaas.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Labels on every object; selector labels are the stable subset. */}}
{{- define "kubemaas.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubemaas.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubemaas.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "kubemaas.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubemaas
{{- end }}

{{- define "kubemaas.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "kubemaas.runtimeImage" -}}
{{- $images := .Values.operator.runtimeImages | default dict }}
{{- $builtin := $images.builtin | default .Values.operator.runtimeImage }}
{{- default (printf "ghcr.io/kubemaas/kubemaas-runtime:%s" .Chart.AppVersion) $builtin }}
{{- end }}

{{- define "kubemaas.vllmRuntimeImage" -}}
{{- $images := .Values.operator.runtimeImages | default dict }}
{{- default (printf "ghcr.io/kubemaas/kubemaas-runtime-vllm:%s" .Chart.AppVersion) $images.vllm }}
{{- end }}

{{/*
What the operator does in the namespaces it serves, and nothing more (docs/install.md, "RBAC"):
- ModelServices: read and watch; patch for kopf's bookkeeping annotations (the operator never
  writes a spec); status through server-side apply on /status.
- The children it owns: read, server-side apply (PATCH, which needs create for a new object),
  delete those no longer desired. No update: every write is an apply.
- Pods and ReplicaSets: read-only (status comes from them).
- Events: create (kopf posts core/v1 Events about ModelServices).
No Secrets: a ModelService's secretRef is passed by name to the runtime pod's fetch step.
*/}}
{{- define "kubemaas.operatorRules" -}}
- apiGroups: [kubemaas.io]
  resources: [modelservices]
  verbs: [get, list, watch, patch]
- apiGroups: [kubemaas.io]
  resources: [modelservices/status]
  verbs: [patch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [gateway.networking.k8s.io]
  resources: [httproutes]
  verbs: [get, list, watch, create, patch, delete]
# spec.adapters: the pods' adapter list, ConfigMap <name>-adapters (builders/adapters.py);
# with inferenceRouting also the endpoint picker's config
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, list, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [replicasets]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if .Values.modelCache.enabled }}
# spec.model.cache node: the claim the pods mount (builders/model_cache.py)
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, create, patch]
{{- end }}
{{- if .Values.multiNode.enabled }}
# resources.gpu.nodes > 1: one KubeRay RayCluster per replica (docs/operator.md, Multi-node)
- apiGroups: [ray.io]
  resources: [rayclusters]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
{{- if .Values.inferenceRouting.enabled }}
# spec.routing: inferencePool. The operator writes the pool and the endpoint picker's children;
# it holds get/list/watch on inferencepools and inferenceobjectives (and on pods, above) because
# the API server lets it grant the picker's Role only what it holds itself.
- apiGroups: [inference.networking.k8s.io]
  resources: [inferencepools]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [inference.networking.x-k8s.io]
  resources: [inferenceobjectives]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, list, create, patch, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, create, patch, delete]
{{- end }}
{{- end }}

{{/*
Cluster-scoped reads kopf needs to discover what it serves: CRDs (it follows a CRD upgrade
without a restart), and, when watching listed namespaces, namespace names.
*/}}
{{- define "kubemaas.discoveryRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
# GPU feature discovery's node labels (nvidia.com/gpu.memory, gpu.product): the GPU-fit check
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
{{- if .Values.modelCache.enabled }}
# spec.model.cache node: the local PersistentVolume over the cache folder (cluster-scoped);
# delete: a deleted ModelService's own PV (it has no owner to be collected with)
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get, list, create, patch, delete]
{{- end }}
{{- if .Values.watchNamespaces }}
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end }}
{{- end }}
