{{/* The name of every object: the release name, with "fovea" added unless it is in it already. */}}
{{- define "fovea.fullname" -}}
{{- if contains "fovea" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fovea" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Agent pods carry app.kubernetes.io/name: fovea (captures are downloaded through them). */}}
{{- define "fovea.selectorLabels" -}}
app.kubernetes.io/name: fovea
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fovea.labels" -}}
{{ include "fovea.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fovea.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fovea.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fovea.scheme" -}}
{{- if .Values.metrics.tls.enabled }}https{{ else }}http{{ end -}}
{{- end -}}

{{/* The agent's config file: .Values.config with the exposure settings the chart owns. */}}
{{- define "fovea.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "captures" (merge (deepCopy (default dict .Values.config.captures)) .Values.captures) -}}
{{- $_ := set $config "port" .Values.metrics.port -}}
{{- $_ := set $config "bindAddress" .Values.metrics.bindAddress -}}
{{- if .Values.metrics.tls.enabled -}}
{{- $_ := set $config "tls" (dict "certFile" "/etc/fovea/tls/tls.crt" "keyFile" "/etc/fovea/tls/tls.key") -}}
{{- end -}}
{{- if .Values.metrics.auth.enabled -}}
{{- $_ := set $config "metricsAuth" (dict "enabled" true "cacheTTL" .Values.metrics.auth.cacheTTL) -}}
{{- end -}}
{{- toYaml $config -}}
{{- end -}}

{{/* Prometheus relabelling shared by the ServiceMonitor and the PodMonitor: the pod's node becomes `node`. */}}
{{- define "fovea.relabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: instance
{{- end -}}
