{{/* The shared endpoint (sharedEndpoint.enabled): names and labels. */}}
{{- define "moirai.endpoint.name" -}}
{{- printf "%s-endpoint" (include "moirai.fullname" . | trunc 54 | trimSuffix "-") -}}
{{- end -}}

{{- define "moirai.endpoint.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: endpoint
{{- end -}}

{{- define "moirai.endpoint.labels" -}}
{{ include "moirai.endpoint.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* What the shared endpoint does with the API: list PlacedModels (moirai_operator.endpoint). */}}
{{- define "moirai.endpoint.rules" -}}
- apiGroups: ["moirai.dev"]
  resources: ["placedmodels"]
  verbs: ["list"]
{{- end -}}
