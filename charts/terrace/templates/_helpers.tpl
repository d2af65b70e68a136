{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "terrace.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name for the chart's own objects. */}}
{{- define "terrace.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "terrace.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "terrace.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "terrace.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "terrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: terrace
{{- end }}

{{- define "terrace.selectorLabels" -}}
app.kubernetes.io/name: {{ include "terrace.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* An image reference: registry/repository:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "terrace.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $registry := $root.Values.global.imageRegistry | default $img.registry -}}
{{- $tag := $img.tag | default $root.Chart.AppVersion -}}
{{- if $registry }}{{ printf "%s/%s:%s" $registry $img.repository $tag }}{{ else }}{{ printf "%s:%s" $img.repository $tag }}{{ end }}
{{- end }}

{{- define "terrace.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (printf "%s-operator" (include "terrace.fullname" .)) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "terrace.agentServiceAccount" -}}
{{- printf "%s-agent" (include "terrace.fullname" .) }}
{{- end }}
