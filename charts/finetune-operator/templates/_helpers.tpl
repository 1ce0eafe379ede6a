{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "finetune-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified name. The Services append "-metrics"/"-progress", so it is kept to 54 characters.
*/}}
{{- define "finetune-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "finetune-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "finetune-operator.labels" -}}
helm.sh/chart: {{ include "finetune-operator.chart" . }}
{{ include "finetune-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: finetune-operator
{{- end }}

{{- define "finetune-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "finetune-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "finetune-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "finetune-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "finetune-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The namespaces the operator serves, as a JSON list: config.namespaces, else the release's own
namespace; with rbac.clusterWide an empty list means every namespace.
*/}}
{{- define "finetune-operator.servedNamespaces" -}}
{{- if .Values.rbac.clusterWide }}
{{- toJson .Values.config.namespaces }}
{{- else }}
{{- toJson (.Values.config.namespaces | default (list .Release.Namespace)) }}
{{- end }}
{{- end }}

{{/* Labels the operator puts on every training pod (finetune_operator.naming). */}}
{{- define "finetune-operator.trainerPodLabels" -}}
app.kubernetes.io/name: finetune-trainer
app.kubernetes.io/managed-by: finetune-operator
{{- end }}

{{/*
The operator's configuration file (finetune_operator.config.OperatorConfig): the platform team's
values under `config`, plus what the chart itself decides (ports, leader election, the progress
Service's URL), so the two cannot disagree.
*/}}
{{- define "finetune-operator.config" -}}
{{- $fullname := include "finetune-operator.fullname" . -}}
{{- $config := deepCopy .Values.config -}}
{{- $storage := dict -}}
{{- range $key, $value := .Values.config.storage }}
{{- if not (kindIs "invalid" $value) }}{{- $_ := set $storage $key $value }}{{- end }}
{{- end }}
{{- $_ := set $config "storage" $storage -}}
{{- $_ := set $config "namespaces" (include "finetune-operator.servedNamespaces" . | fromJsonArray) -}}
{{- if not .Values.config.reportUrl }}
{{- $_ := set $config "reportUrl" (printf "http://%s-progress.%s.svc:%d" $fullname .Release.Namespace (int .Values.ports.progress)) }}
{{- end }}
{{- $_ := set $config "ports" (dict "metrics" .Values.ports.metrics "progress" .Values.ports.progress "health" .Values.ports.health) -}}
{{- $_ := set $config "leaderElection" (dict
      "enabled" (gt (int .Values.replicas) 1)
      "namespace" .Release.Namespace
      "leaseName" $fullname
      "leaseDurationSeconds" .Values.leaderElection.leaseDurationSeconds
      "renewSeconds" .Values.leaderElection.renewSeconds) -}}
{{- toYaml $config }}
{{- end }}
