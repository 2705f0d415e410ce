{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "imap-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name when it already contains the chart's. */}}
{{- define "imap-gateway.fullname" -}}
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

{{- define "imap-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imap-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imap-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imap-gateway.labels" -}}
helm.sh/chart: {{ include "imap-gateway.chart" . }}
{{ include "imap-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "imap-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "imap-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imap-gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Paths inside the pod. */}}
{{- define "imap-gateway.configDir" -}}/etc/imap-gateway/config{{- end }}
{{- define "imap-gateway.routingDir" -}}/etc/imap-gateway/routing{{- end }}
{{- define "imap-gateway.tlsDir" -}}/etc/imap-gateway/tls{{- end }}
{{- define "imap-gateway.adminTokenDir" -}}/etc/imap-gateway/admin-token{{- end }}

{{- define "imap-gateway.routingConfigMap" -}}
{{- if .Values.routing.existingConfigMap }}
{{- .Values.routing.existingConfigMap }}
{{- else }}
{{- printf "%s-routing" (include "imap-gateway.fullname" .) }}
{{- end }}
{{- end }}

{{/* "true" when the TLS listener and STARTTLS are configured. */}}
{{- define "imap-gateway.tlsEnabled" -}}
{{- if .Values.tls.existingSecret }}true{{ end }}
{{- end }}

{{- define "imap-gateway.imapsEnabled" -}}
{{- if and .Values.listeners.imaps.enabled .Values.tls.existingSecret }}true{{ end }}
{{- end }}

{{/* config.shutdownGrace ("30s", "2m") in seconds. */}}
{{- define "imap-gateway.graceSeconds" -}}
{{- $g := .Values.config.shutdownGrace }}
{{- if hasSuffix "m" $g }}
{{- mul (trimSuffix "m" $g | atoi) 60 }}
{{- else }}
{{- trimSuffix "s" $g | atoi }}
{{- end }}
{{- end }}

{{- define "imap-gateway.terminationGracePeriodSeconds" -}}
{{- $grace := include "imap-gateway.graceSeconds" . | atoi }}
{{- $t := int .Values.terminationGracePeriodSeconds }}
{{- if eq $t 0 }}
{{- add $grace 15 }}
{{- else if le $t $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than config.shutdownGrace (%ds): the pod would be killed while sessions drain" $t $grace) }}
{{- else }}
{{- $t }}
{{- end }}
{{- end }}

{{/* The PROXY protocol keys of one [[listeners]] table. */}}
{{- define "imap-gateway.proxyKeys" -}}
{{- if .Values.proxyProtocol.enabled }}
{{- if not .Values.proxyProtocol.trustedNetworks }}
{{- fail "proxyProtocol.enabled needs proxyProtocol.trustedNetworks (the load balancer's addresses)" }}
{{- end }}
proxy_protocol = true
proxy_trusted_networks = [{{ range $i, $n := .Values.proxyProtocol.trustedNetworks }}{{ if $i }}, {{ end }}{{ $n | toJson }}{{ end }}]
{{- end }}
{{- end }}

{{/* gateway.toml. The checksum/config annotation is computed from this. */}}
{{- define "imap-gateway.config" -}}
{{- $tls := include "imap-gateway.tlsEnabled" . -}}
{{- $tlsDir := include "imap-gateway.tlsDir" . -}}
{{- if not (or .Values.listeners.imap.enabled (include "imap-gateway.imapsEnabled" .)) }}
{{- fail "no IMAP listener: enable listeners.imap, or listeners.imaps together with tls.existingSecret" }}
{{- end -}}
# Rendered by the imap-gateway Helm chart (docs/configuration.md).
routing_table = {{ printf "%s/%s" (include "imap-gateway.routingDir" .) .Values.routing.key | toJson }}
{{- if .Values.listeners.imap.enabled }}

[[listeners]]
name = "imap"
address = "0.0.0.0:{{ .Values.listeners.imap.containerPort }}"
mode = "plain"
{{- if $tls }}
tls_cert = "{{ $tlsDir }}/tls.crt"
tls_key = "{{ $tlsDir }}/tls.key"
tls_session_tickets = {{ .Values.tls.sessionTickets }}
{{- end }}
allow_plaintext_auth = {{ .Values.listeners.imap.allowPlaintextAuth }}
{{- include "imap-gateway.proxyKeys" . }}
{{- end }}
{{- if include "imap-gateway.imapsEnabled" . }}

[[listeners]]
name = "imaps"
address = "0.0.0.0:{{ .Values.listeners.imaps.containerPort }}"
mode = "tls"
tls_cert = "{{ $tlsDir }}/tls.crt"
tls_key = "{{ $tlsDir }}/tls.key"
tls_session_tickets = {{ .Values.tls.sessionTickets }}
{{- include "imap-gateway.proxyKeys" . }}
{{- end }}

[timeouts]
shutdown_grace = {{ .Values.config.shutdownGrace | toJson }}
{{- range $k, $v := .Values.config.timeouts }}
{{ $k }} = {{ $v | toJson }}
{{- end }}

[log]
format = {{ .Values.config.log.format | toJson }}
level = {{ .Values.config.log.level | toJson }}

[admin]
enabled = true
address = "0.0.0.0:{{ .Values.admin.port }}"
{{- if .Values.admin.token.existingSecret }}
token_file = "{{ include "imap-gateway.adminTokenDir" . }}/{{ .Values.admin.token.key }}"
{{- end }}
{{- with .Values.config.extraToml }}

{{ . }}
{{- end }}
{{- end }}
