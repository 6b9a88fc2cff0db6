{{/* The release's full name, at most 63 characters. */}}
{{- define "moirai.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "moirai.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "moirai.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "moirai.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "moirai.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "moirai.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "moirai.gpuImage" -}}
{{- default (printf "%s-gpu" (include "moirai.image" .)) .Values.gpuImage -}}
{{- end -}}

{{/* The namespaces served (a JSON list): watchNamespaces, or the release's own. */}}
{{- define "moirai.watchNamespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/*
The rules the operator needs in a namespace it serves: exactly the verbs it uses
(tests/kube/test_chart_install.py records them and compares).
kopf: list/watch PlacedModels, patch them (its progress annotations), create Events.
The reconciler: get a PlacedModel afresh and patch its status; server-side apply its children
(create + patch); list and delete the per-device ones a new plan no longer needs (Services,
Deployments) and list Deployments for readiness; apply, list and delete profiling Jobs; apply
their Secrets (never read or list them: they go with their Job); apply, list and prune the lanes'
HorizontalPodAutoscaler.
*/}}
{{- define "moirai.namespacedRules" -}}
- apiGroups: ["moirai.dev"]
  resources: ["placedmodels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["moirai.dev"]
  resources: ["placedmodels/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
{{- if .Values.networkPolicy.enabled }}
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["create", "patch"]
{{- end }}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end -}}

{{/*
What values.schema.json cannot say: a failed render names the value and the fix. Included by
the operator's Deployment.
*/}}
{{- define "moirai.validate" -}}
{{- if eq (int .Values.profiling.port) 8080 -}}
{{- fail "profiling.port 8080 is the operator's health port: choose another port for the profile inbox" -}}
{{- end -}}
{{- range .Values.batching.preferredBatchSizes -}}
{{- if gt (int .) (int $.Values.batching.maxBatchSize) -}}
{{- fail (printf "batching.preferredBatchSizes has %v, above batching.maxBatchSize (%v): give sizes from 1 to maxBatchSize, or raise it" . $.Values.batching.maxBatchSize) -}}
{{- end -}}
{{- end -}}
{{- end -}}
