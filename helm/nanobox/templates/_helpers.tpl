{{/* Names: <release>-nanobox, or the release name when it already holds "nanobox". */}}
{{- define "nanobox.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels every object carries. */}}
{{- define "nanobox.labels" -}}
app.kubernetes.io/name: nanobox
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "nanobox.selector" -}}
app.kubernetes.io/name: nanobox
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "nanobox.componentLabels" -}}
{{ include "nanobox.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* An image reference: (dict "root" $ "image" .Values.gateway.image). */}}
{{- define "nanobox.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if .root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Service DNS names and the addresses services reach each other at. */}}
{{- define "nanobox.schedulerAddr" -}}
{{- printf "%s-scheduler.%s.svc:%v" (include "nanobox.fullname" .) .Release.Namespace .Values.scheduler.service.port -}}
{{- end -}}
{{- define "nanobox.builderAddr" -}}
{{- printf "%s-template-builder.%s.svc:%v" (include "nanobox.fullname" .) .Release.Namespace .Values.templateBuilder.service.port -}}
{{- end -}}

{{/* Secret names: the existing one named in values, else the chart's. */}}
{{- define "nanobox.databaseSecret" -}}
{{- .Values.database.existingSecret | default (printf "%s-database" (include "nanobox.fullname" .)) -}}
{{- end -}}
{{- define "nanobox.databaseConfigured" -}}
{{- if or .Values.database.existingSecret .Values.database.url }}true{{ end -}}
{{- end -}}
{{- define "nanobox.objectStoreSecret" -}}
{{- .Values.objectStore.existingSecret | default (printf "%s-object-store" (include "nanobox.fullname" .)) -}}
{{- end -}}
{{- define "nanobox.objectStoreCredentials" -}}
{{- if or .Values.objectStore.existingSecret .Values.objectStore.accessKeyId }}true{{ end -}}
{{- end -}}
{{- define "nanobox.apiKeysSecret" -}}
{{- .Values.apiKeys.existingSecret | default (printf "%s-api-keys" (include "nanobox.fullname" .)) -}}
{{- end -}}
{{- define "nanobox.apiKeysConfigured" -}}
{{- if or .Values.apiKeys.existingSecret .Values.apiKeys.keys }}true{{ end -}}
{{- end -}}
{{- define "nanobox.serviceTokenSecret" -}}
{{- .Values.serviceToken.existingSecret | default (printf "%s-service-token" (include "nanobox.fullname" .)) -}}
{{- end -}}

{{/* Where the pods see the configuration and the secrets. */}}
{{- define "nanobox.configPath" -}}/etc/nanobox/config/nanobox.toml{{- end -}}
{{- define "nanobox.apiKeysPath" -}}/etc/nanobox/secrets/api-keys/{{ .Values.apiKeys.secretKey }}{{- end -}}
{{- define "nanobox.serviceTokenPath" -}}/etc/nanobox/secrets/service-token/{{ .Values.serviceToken.secretKey }}{{- end -}}

{{/*
nanobox.toml as a dict: what the chart derives from its values, with .Values.config
merged over it.
*/}}
{{- define "nanobox.config" -}}
{{- $c := dict -}}
{{- $api := dict -}}
{{- if include "nanobox.apiKeysConfigured" . -}}
{{- $_ := set $api "api_keys_file" (include "nanobox.apiKeysPath" .) -}}
{{- end -}}
{{- $_ := set $c "api" $api -}}
{{- $_ := set $c "agent" (dict "scheduler_addr" (include "nanobox.schedulerAddr" .)) -}}
{{- $_ := set $c "builder" (dict "advertise_addr" (include "nanobox.builderAddr" .)) -}}
{{- $_ := set $c "network" (dict "subnet" .Values.nodeAgent.subnet) -}}
{{- $pool := dict "replenish_interval_sec" .Values.pool.replenishIntervalSec "max_idle_sec" .Values.pool.maxIdleSec -}}
{{- if .Values.pool.templates -}}
{{- $_ := set $pool "templates" .Values.pool.templates -}}
{{- end -}}
{{- $_ := set $c "pool" $pool -}}
{{- if .Values.objectStore.location -}}
{{- $_ := set $c "object_store" (dict "location" .Values.objectStore.location) -}}
{{- end -}}
{{- $_ := set $c "auth" (dict "service_token_file" (include "nanobox.serviceTokenPath" .)) -}}
{{- $telemetry := dict "log_format" .Values.telemetry.logFormat "default_filter" .Values.telemetry.defaultFilter -}}
{{- if .Values.telemetry.otlpEndpoint -}}
{{- $_ := set $telemetry "otlp_endpoint" .Values.telemetry.otlpEndpoint -}}
{{- end -}}
{{- $_ := set $c "telemetry" $telemetry -}}
{{- toJson (mergeOverwrite $c (deepCopy .Values.config)) -}}
{{- end -}}

{{/*
TOML. Helm's toToml writes every number as a float (values arrive as JSON numbers), and
nanobox.toml's integer keys reject floats, so the chart writes TOML itself: integral
numbers as integers, strings JSON-quoted (valid TOML basic strings), lists inline, lists
of tables as [[arrays of tables]], null values left out.
*/}}
{{- define "nanobox.tomlValue" -}}
{{- $k := kindOf . -}}
{{- if eq $k "string" -}}
{{- if regexMatch `^[^"\\\x00-\x1f\x7f]*$` . }}"{{ . }}"{{ else }}{{ toJson . }}{{ end -}}
{{- else if eq $k "bool" -}}
{{- . -}}
{{- else if or (eq $k "float64") (eq $k "float32") -}}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (hasPrefix "int" $k) (hasPrefix "uint" $k) -}}
{{- . -}}
{{- else if eq $k "slice" -}}
[{{ range $i, $e := . }}{{ if $i }}, {{ end }}{{ include "nanobox.tomlValue" $e }}{{ end }}]
{{- else -}}
{{- fail (printf "nanobox.toml: cannot write a %s as a TOML value" $k) -}}
{{- end -}}
{{- end -}}

{{/* A table's body: (dict "path" "pool" "table" $dict). */}}
{{- define "nanobox.tomlTable" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- $tables := list -}}
{{- $arrays := list -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $v := index $table $key -}}
{{- if kindIs "map" $v -}}
{{- if $v }}{{ $tables = append $tables $key }}{{ end -}}
{{- else if and (kindIs "slice" $v) $v (kindIs "map" (first $v)) -}}
{{- $arrays = append $arrays $key -}}
{{- else if not (kindIs "invalid" $v) }}
{{ $key }} = {{ include "nanobox.tomlValue" $v }}
{{- end -}}
{{- end -}}
{{- range $key := $tables -}}
{{- $sub := ternary $key (printf "%s.%s" $path $key) (eq $path "") }}

[{{ $sub }}]
{{- include "nanobox.tomlTable" (dict "path" $sub "table" (index $table $key)) -}}
{{- end -}}
{{- range $key := $arrays -}}
{{- $sub := ternary $key (printf "%s.%s" $path $key) (eq $path "") -}}
{{- range $item := index $table $key }}

[[{{ $sub }}]]
{{- include "nanobox.tomlTable" (dict "path" $sub "table" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The environment every NanoBox container gets. */}}
{{- define "nanobox.commonEnv" -}}
- name: NANOBOX_CONFIG
  value: {{ include "nanobox.configPath" . }}
{{- end -}}

{{/* [database] url from its Secret. */}}
{{- define "nanobox.databaseEnv" -}}
{{- if include "nanobox.databaseConfigured" . -}}
- name: NANOBOX__DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "nanobox.databaseSecret" . }}
      key: {{ .Values.database.secretKey }}
{{- end -}}
{{- end -}}

{{/* S3 credentials from their Secret. */}}
{{- define "nanobox.objectStoreEnv" -}}
{{- if include "nanobox.objectStoreCredentials" . -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "nanobox.objectStoreSecret" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "nanobox.objectStoreSecret" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- end -}}
{{- end -}}

{{/* Volumes: the configuration, and the secrets a component reads as files. */}}
{{- define "nanobox.configVolume" -}}
- name: config
  configMap:
    name: {{ include "nanobox.fullname" . }}-config
{{- end -}}
{{- define "nanobox.apiKeysVolume" -}}
{{- if include "nanobox.apiKeysConfigured" . -}}
- name: api-keys
  secret:
    secretName: {{ include "nanobox.apiKeysSecret" . }}
    defaultMode: 0440
{{- end -}}
{{- end -}}
{{- define "nanobox.serviceTokenVolume" -}}
- name: service-token
  secret:
    secretName: {{ include "nanobox.serviceTokenSecret" . }}
    defaultMode: 0440
{{- end -}}
{{- define "nanobox.configMount" -}}
- name: config
  mountPath: /etc/nanobox/config
  readOnly: true
{{- end -}}
{{- define "nanobox.apiKeysMount" -}}
{{- if include "nanobox.apiKeysConfigured" . -}}
- name: api-keys
  mountPath: /etc/nanobox/secrets/api-keys
  readOnly: true
{{- end -}}
{{- end -}}
{{- define "nanobox.serviceTokenMount" -}}
- name: service-token
  mountPath: /etc/nanobox/secrets/service-token
  readOnly: true
{{- end -}}

{{/* Pod annotations that roll the pods when the configuration or a secret changes. */}}
{{- define "nanobox.checksums" -}}
checksum/config: {{ include "nanobox.config" . | sha256sum }}
{{- end -}}

{{/* The security context of the unprivileged services. */}}
{{- define "nanobox.restrictedSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
