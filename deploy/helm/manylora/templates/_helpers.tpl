{{/* Names, labels, addresses and the security wiring every component shares. */}}

{{- define "manylora.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* A component's object name: call with (list $ "router"). */}}
{{- define "manylora.name" -}}
{{- printf "%s-%s" (include "manylora.fullname" (index . 0)) (index . 1) -}}
{{- end -}}

{{- define "manylora.selectorLabels" -}}
app.kubernetes.io/name: {{ (index . 0).Chart.Name }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "manylora.labels" -}}
{{ include "manylora.selectorLabels" . }}
app.kubernetes.io/version: {{ (index . 0).Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ (index . 0).Release.Service }}
helm.sh/chart: {{ printf "%s-%s" (index . 0).Chart.Name (index . 0).Chart.Version }}
{{- end -}}

{{/* The in-cluster name callers dial (and a TLS certificate must hold): NAME.NAMESPACE.svc */}}
{{- define "manylora.host" -}}
{{- printf "%s.%s.svc" (include "manylora.name" .) (index . 0).Release.Namespace -}}
{{- end -}}

{{- define "manylora.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end -}}

{{- define "manylora.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s:6379/0" (include "manylora.host" (list . "redis")) -}}
{{- else -}}
{{- required "redis.url: give an external Redis, or set redis.enabled" .Values.redis.url -}}
{{- end -}}
{{- end -}}

{{- define "manylora.authSecret" -}}
{{- .Values.auth.existingSecret | default (include "manylora.name" (list . "auth")) -}}
{{- end -}}

{{- define "manylora.tlsSecret" -}}
{{- required "tls.existingSecret: a Secret with tls.crt, tls.key and ca.crt" .Values.tls.existingSecret -}}
{{- end -}}

{{/* The pod annotations of a component with a metrics port: call with (list $ PORT). */}}
{{- define "manylora.podAnnotations" -}}
{{- if (index . 0).Values.metrics.scrapeAnnotations -}}
annotations:
  prometheus.io/scrape: "true"
  prometheus.io/port: {{ index . 1 | quote }}
  prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* MANYLORA_* settings every gRPC service shares. */}}
{{- define "manylora.commonEnv" -}}
- name: MANYLORA_HOST
  value: "0.0.0.0"
- name: MANYLORA_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: MANYLORA_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end -}}

{{/* A server's security settings (every gRPC service): the key file, its certificate and,
     under mutual TLS, the CA of its clients. Call with (list $ CALLER) where CALLER says
     whether the service also calls others (router, worker): then the CA of its callees. */}}
{{- define "manylora.securityEnv" -}}
{{- $ := index . 0 -}}
{{- if $.Values.auth.enabled }}
- name: MANYLORA_AUTH_KEY_FILE
  value: /etc/manylora/auth/auth.key
{{- end }}
{{- if $.Values.tls.enabled }}
- name: MANYLORA_TLS_CERT_FILE
  value: /etc/manylora/tls/tls.crt
- name: MANYLORA_TLS_KEY_FILE
  value: /etc/manylora/tls/tls.key
{{- if $.Values.tls.mutual }}
- name: MANYLORA_TLS_CLIENT_CA_FILE
  value: /etc/manylora/tls/ca.crt
{{- end }}
{{- if index . 1 }}
- name: MANYLORA_TLS_CA_FILE
  value: /etc/manylora/tls/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* A component's extraEnv map as env entries. */}}
{{- define "manylora.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end -}}

{{- define "manylora.securityMounts" -}}
{{- if .Values.auth.enabled }}
- name: auth
  mountPath: /etc/manylora/auth
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/manylora/tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "manylora.securityVolumes" -}}
{{- if .Values.auth.enabled }}
- name: auth
  secret:
    secretName: {{ include "manylora.authSecret" . }}
    defaultMode: 0400
    items:
      - {key: auth.key, path: auth.key}
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "manylora.tlsSecret" . }}
    defaultMode: 0400
    items:
      - {key: tls.crt, path: tls.crt}
      - {key: tls.key, path: tls.key}
      - {key: ca.crt, path: ca.crt}
{{- end }}
{{- end -}}

{{- define "manylora.modelMount" -}}
{{- if .Values.model.volume }}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{- define "manylora.modelVolume" -}}
{{- if .Values.model.volume }}
- name: models
{{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Liveness, readiness (and startup) probes over grpc.health.v1. Plaintext: the kubelet's
     native gRPC probe. Under TLS the kubelet's probe cannot connect (it speaks plaintext
     only), so the image's own health check runs in the container, with the CA (and, under
     mutual TLS, the pod's certificate) and the name the certificate holds.
     Call with (dict "root" $ "port" PORT "service" SERVICE "serverName" NAME "kind" KIND). */}}
{{- define "manylora.grpcProbe" -}}
{{- $ := .root -}}
{{- if $.Values.tls.enabled -}}
exec:
  command:
    - python
    - -m
    - services.common.healthcheck
    - {{ printf "127.0.0.1:%v" .port | quote }}
    - {{ .service | quote }}
    - --tls-ca-file=/etc/manylora/tls/ca.crt
    - --tls-server-name={{ .serverName }}
    {{- if $.Values.tls.mutual }}
    - --tls-cert-file=/etc/manylora/tls/tls.crt
    - --tls-key-file=/etc/manylora/tls/tls.key
    {{- end }}
timeoutSeconds: 5
{{- else -}}
grpc:
  port: {{ .port }}
  service: {{ .service | quote }}
timeoutSeconds: 3
{{- end }}
{{- end -}}

{{- define "manylora.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities:
    drop: ["ALL"]
{{- end -}}
