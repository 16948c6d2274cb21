{{/*
Common helpers of the spotserve chart: names, labels, the image, security contexts, the
environment every spotserve container shares, volumes, probes, and the value checks that
values.schema.json cannot express.
*/}}

{{- define "spotserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spotserve.fullname" -}}
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

{{/* "<fullname>-<component>"; call with (dict "ctx" $ "component" "admission"). */}}
{{- define "spotserve.componentName" -}}
{{- printf "%s-%s" (include "spotserve.fullname" .ctx) .component | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "spotserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "spotserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of every object; call with (dict "ctx" $ "component" "admission"). */}}
{{- define "spotserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "spotserve.selectorLabels" . }}
app.kubernetes.io/part-of: spotserve
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{- define "spotserve.image" -}}
{{ printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) | quote }}
{{- end }}

{{/* Prometheus scrape annotations of a pod template. */}}
{{- define "spotserve.podAnnotations" -}}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}

{{/* The pod-level part every spotserve pod shares. */}}
{{- define "spotserve.podCommon" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "spotserve.containerSecurityContext" -}}
{{ toYaml .Values.securityContext }}
{{- end }}

{{/* nodeSelector, tolerations and affinity of a component's values (call with them). */}}
{{- define "spotserve.placement" -}}
{{- with .nodeSelector -}}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Where a container finds its NATS password: /var/run/spotserve/nats/<user>. */}}
{{- define "spotserve.passwordDir" -}}
/var/run/spotserve/nats
{{- end }}

{{/* Environment of a name -> value map, in sorted order (call with the map). */}}
{{- define "spotserve.envMap" -}}
{{- range $name := keys . | sortAlpha }}
- name: {{ $name }}
  value: {{ get $ $name | quote }}
{{- end }}
{{- end }}

{{/*
The environment of every spotserve container: NATS (its own user and password file),
SPOTSERVE_HOME, logs, metrics, the chart's extraEnv. Call with
(dict "ctx" $ "user" "admission" "metricsPort" 9464).
*/}}
{{- define "spotserve.commonEnv" -}}
{{- $v := .ctx.Values -}}
- name: SPOTSERVE_NATS__URL
  value: {{ $v.nats.url | quote }}
- name: SPOTSERVE_NATS__REPLICAS
  value: {{ $v.nats.replicas | quote }}
- name: SPOTSERVE_NATS__USER
  value: {{ .user | quote }}
- name: SPOTSERVE_NATS__PASSWORD_FILE
  value: {{ printf "%s/%s" (include "spotserve.passwordDir" .ctx) .user | quote }}
- name: SPOTSERVE_HOME
  value: {{ $v.home.path | quote }}
- name: SPOTSERVE_LOG__JSON_OUTPUT
  value: "true"
- name: SPOTSERVE_LOG__LEVEL
  value: {{ $v.log.level | quote }}
- name: SPOTSERVE_METRICS__HOST
  value: "0.0.0.0"
- name: SPOTSERVE_METRICS__PORT
  value: {{ .metricsPort | default $v.metrics.port | quote }}
{{- include "spotserve.envMap" $v.extraEnv }}
{{- end }}

{{/* The model's directory inside the containers (the model volume's mount point). */}}
{{- define "spotserve.checkpointsDir" -}}
{{ printf "%s/checkpoints" (trimSuffix "/" .Values.home.path) }}
{{- end }}

{{/* Which model a service reads: the configured directory, else the embedded default. */}}
{{- define "spotserve.modelEnv" -}}
{{- if .Values.model.path -}}
- name: SPOTSERVE_MODEL__PATH
  value: {{ printf "%s/%s" (include "spotserve.checkpointsDir" .) .Values.model.path | quote }}
{{- else -}}
- name: SPOTSERVE_MODEL__SIZE
  value: {{ .Values.model.size | quote }}
{{- end }}
{{- end }}

{{/* Whether control-plane services mount the model volume (they read model.path there). */}}
{{- define "spotserve.controlPlaneMountsModel" -}}
{{- if .Values.model.path }}true{{ end }}
{{- end }}

{{/* Volume mounts of every spotserve container: /tmp, SPOTSERVE_HOME, its password. */}}
{{- define "spotserve.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: {{ .Values.home.path | quote }}
- name: nats-credentials
  mountPath: {{ include "spotserve.passwordDir" . }}
  readOnly: true
{{- end }}

{{/* The model volume's mount; call with (dict "ctx" $ "readOnly" true). */}}
{{- define "spotserve.modelVolumeMount" -}}
- name: model
  mountPath: {{ include "spotserve.checkpointsDir" .ctx | quote }}
  readOnly: {{ .readOnly }}
{{- end }}

{{/*
Volumes of every spotserve pod: /tmp and SPOTSERVE_HOME (emptyDir: the root filesystem is
read-only) and the NATS passwords of the pod's users (only their keys of the Secret). Call
with (dict "ctx" $ "users" (list "admission")).
*/}}
{{- define "spotserve.commonVolumes" -}}
- name: tmp
  emptyDir: {}
- name: home
  emptyDir:
    {{- with .ctx.Values.home.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
- name: nats-credentials
  secret:
    secretName: {{ .ctx.Values.nats.credentialsSecret | quote }}
    defaultMode: 0440
    items:
      {{- range .users | uniq }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}

{{/* The model volume (model.volume). */}}
{{- define "spotserve.modelVolume" -}}
{{- $volume := .Values.model.volume }}
- name: model
  {{- if eq $volume.type "persistentVolumeClaim" }}
  persistentVolumeClaim:
    claimName: {{ $volume.claimName | quote }}
  {{- else if eq $volume.type "hostPath" }}
  hostPath:
    path: {{ $volume.hostPath | quote }}
    type: Directory
  {{- else }}
  emptyDir:
    {{- with $volume.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
  {{- end }}
{{- end }}

{{/*
Startup, readiness and liveness probes on `spotserve health SERVICE [--this-node]`. Liveness
fails only on exit 1 (no answer while NATS is reachable): exit 2 (NATS unreachable or
refusing us) would restart every pod of the release at once and fix nothing. Call with
(dict "ctx" $ "service" "admission" "thisNode" false "readiness" true).
*/}}
{{- define "spotserve.probes" -}}
{{- $p := .ctx.Values.probes }}
{{- $check := printf "spotserve health %s%s" .service (ternary " --this-node" "" (.thisNode | default false)) -}}
startupProbe:
  exec:
    command: ["sh", "-c", {{ $check | quote }}]
  periodSeconds: {{ $p.startupPeriodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.startupFailureThreshold }}
{{- if .readiness }}
readinessProbe:
  exec:
    command: ["sh", "-c", {{ $check | quote }}]
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}
livenessProbe:
  exec:
    command: ["sh", "-c", {{ printf "%s; test $? -ne 1" $check | quote }}]
  periodSeconds: {{ $p.periodSeconds }}
  timeoutSeconds: {{ $p.timeoutSeconds }}
  failureThreshold: {{ $p.failureThreshold }}
{{- end }}

{{/* A control-plane PodDisruptionBudget; call with (dict "ctx" $ "component" "admission"). */}}
{{- define "spotserve.controlPlanePdb" -}}
{{- if .ctx.Values.podDisruptionBudget.enabled }}
---
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "spotserve.componentName" . }}
  labels:
    {{- include "spotserve.labels" . | nindent 4 }}
spec:
  maxUnavailable: {{ .ctx.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "spotserve.selectorLabels" . | nindent 6 }}
{{- end }}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express; each fails the render with a
message that says what to change. Included by every component template (it prints nothing).
*/}}
{{- define "spotserve.validate" -}}
{{- $v := .Values }}
{{- $margin := float64 $v.executors.terminationMarginSeconds }}
{{- range $v.executors.pools }}
{{- if le (float64 .terminationGracePeriodSeconds) $margin }}
{{- fail (printf "executors.pools[%s].terminationGracePeriodSeconds (%v) must be greater than executors.terminationMarginSeconds (%v): the executor announces it is gone after grace - margin seconds" .name .terminationGracePeriodSeconds $v.executors.terminationMarginSeconds) }}
{{- end }}
{{- end }}
{{- if and $v.executors.preStop.enabled (ge (float64 $v.executors.preStop.timeoutSeconds) $margin) }}
{{- fail (printf "executors.preStop.timeoutSeconds (%v) must be less than executors.terminationMarginSeconds (%v): the preStop hook runs before SIGTERM, and its time comes out of the margin" $v.executors.preStop.timeoutSeconds $v.executors.terminationMarginSeconds) }}
{{- end }}
{{- $names := list }}
{{- range $v.executors.pools }}
{{- if has .name $names }}
{{- fail (printf "executors.pools: the pool name %q is used twice" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}
{{- if and $v.model.path (eq $v.model.volume.type "emptyDir") }}
{{- fail "model.path names a directory on the model volume, but model.volume.type is emptyDir (empty at every start): use persistentVolumeClaim or hostPath" }}
{{- end }}
{{- if and $v.model.name (not $v.model.path) }}
{{- fail "model.name (executors fetch it through the loader) needs model.path too: admission, scheduler, planner and gateway read the same model from the model volume" }}
{{- end }}
{{- if and (eq $v.loader.mode "daemonset") (eq $v.model.volume.type "emptyDir") }}
{{- fail "loader.mode daemonset needs model.volume.type hostPath or persistentVolumeClaim: executors read what their node's loader writes, and an emptyDir is one pod's own" }}
{{- end }}
{{- if le (int $v.gateway.terminationGracePeriodSeconds) (int $v.gateway.preStopSleepSeconds) }}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must be greater than gateway.preStopSleepSeconds (%v): the gateway needs time to finish its streams after the sleep" $v.gateway.terminationGracePeriodSeconds $v.gateway.preStopSleepSeconds) }}
{{- end }}
{{- end }}
