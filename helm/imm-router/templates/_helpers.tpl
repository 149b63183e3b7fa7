{{/* Chart name, truncated to 63 characters. */}}
{{- define "imm-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "imm-router.fullname" -}}
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

{{- define "imm-router.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "imm-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "imm-router.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "imm-router.labels" -}}
helm.sh/chart: {{ include "imm-router.chart" . }}
{{ include "imm-router.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: router
{{- end }}

{{- define "imm-router.serviceAccountName" -}}
{{- if .Values.serviceAccount.enabled }}
{{- default (include "imm-router.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "imm-router.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Paths inside the container. The config lives in its own directory so that the rules and
templates volumes are siblings of it, never mounted inside another ConfigMap volume. */}}
{{- define "imm-router.configDir" -}}/etc/imm-router/config{{- end }}
{{- define "imm-router.configPath" -}}/etc/imm-router/config/router.yaml{{- end }}
{{- define "imm-router.rulesDir" -}}/etc/imm-router/rules{{- end }}
{{- define "imm-router.templatesDir" -}}/etc/imm-router/templates{{- end }}
{{- define "imm-router.kafkaCaDir" -}}/etc/imm-router/kafka-ca{{- end }}

{{/* terminationGracePeriodSeconds: the router's drain deadline plus a margin. */}}
{{- define "imm-router.terminationGracePeriodSeconds" -}}
{{- add (int .Values.router.drainTimeoutSeconds) (int .Values.router.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Fail early on combinations that cannot work. */}}
{{- define "imm-router.validate" -}}
{{- $workers := int .Values.router.workers }}
{{- $cpu := toString (dig "requests" "cpu" "0" .Values.resources) }}
{{- $millicpu := ternary (trimSuffix "m" $cpu | float64) (mulf ($cpu | float64) 1000) (hasSuffix "m" $cpu) }}
{{- if and (gt $workers 1) (lt $millicpu (mulf $workers 1000)) }}
{{- fail (printf "router.workers is %d: request a CPU per worker process (resources.requests.cpu: %d or more; it is %s), or the workers share fewer cores than they are meant to use." $workers $workers $cpu) }}
{{- end }}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are mutually exclusive: KEDA manages its own HorizontalPodAutoscaler. Enable only one of them." }}
{{- end }}
{{- if and .Values.kafka.sasl.enabled (not (hasPrefix "SASL_" .Values.kafka.securityProtocol)) }}
{{- fail "kafka.sasl.enabled requires kafka.securityProtocol SASL_PLAINTEXT or SASL_SSL." }}
{{- end }}
{{- if and (hasPrefix "SASL_" .Values.kafka.securityProtocol) (not .Values.kafka.sasl.enabled) }}
{{- fail "kafka.securityProtocol SASL_* requires kafka.sasl.enabled=true (credentials come from existingSecret)." }}
{{- end }}
{{- $k := .Values.kafka }}
{{- $internal := list $k.notificationsTopic $k.changelogTopic $k.silencesTopic $k.inhibitionsTopic }}
{{- if $k.deadLetterTopic }}
{{- $internal = append $internal $k.deadLetterTopic }}
{{- end }}
{{- if ne (len $internal) (len (uniq $internal)) }}
{{- fail (printf "kafka.notificationsTopic, changelogTopic, silencesTopic, inhibitionsTopic and deadLetterTopic must be five different topics (got %s)." (join ", " $internal)) }}
{{- end }}
{{- range $internal }}
{{- if has . $k.topics }}
{{- fail (printf "kafka.topics must not contain %s: it is one of the router's own topics." .) }}
{{- end }}
{{- end }}
{{- if .Values.router.apiTokenKey }}
{{- range .Values.env }}
{{- if eq .name "ROUTER_HTTP__API_TOKEN" }}
{{- fail "env ROUTER_HTTP__API_TOKEN and router.apiTokenKey both set the HTTP API token: keep only router.apiTokenKey." }}
{{- end }}
{{- end }}
{{- end }}
{{- with .Values.ingest.eventbridge }}
{{- if and .enabled (not (or .tokenEnv .hmacKeyEnv)) }}
{{- fail "ingest.eventbridge.enabled needs ingest.eventbridge.tokenEnv or hmacKeyEnv (keys of existingSecret): the endpoint never accepts anonymous events." }}
{{- end }}
{{- end }}
{{- if and .Values.ingest.alertmanager.enabled (not .Values.ingest.alertmanager.tokenEnv) }}
{{- fail "ingest.alertmanager.enabled needs ingest.alertmanager.tokenEnv (a key of existingSecret): the endpoint never accepts anonymous alerts." }}
{{- end }}
{{- if and .Values.ingest.ingress.enabled (not (include "imm-router.ingestEnabled" .)) }}
{{- fail "ingest.ingress.enabled needs ingest.mns.enabled, ingest.eventbridge.enabled or ingest.alertmanager.enabled: there is nothing to route." }}
{{- end }}
{{- include "imm-router.requireSecret" . }}
{{- end }}

{{/*
What the pods must get from existingSecret, as JSON {"keys": [...], "users": [...]}: the environment
variables the rendered config reads as ${VAR} (no :-default) that `env` does not set, plus
router.apiTokenKey; `users` says which values need them.
*/}}
{{- define "imm-router.secretNeeds" -}}
{{- $pattern := "\\$\\{[A-Za-z_][A-Za-z0-9_]*\\}" }}
{{- $given := list }}
{{- range .Values.env }}
{{- $given = append $given .name }}
{{- end }}
{{- $keys := list }}
{{- range regexFindAll $pattern (include "imm-router.config" .) -1 }}
{{- $name := trimPrefix "${" . | trimSuffix "}" }}
{{- if not (has $name $given) }}
{{- $keys = append $keys $name }}
{{- end }}
{{- end }}
{{- $users := list }}
{{- range $channel, $spec := .Values.channels | default dict }}
{{- range regexFindAll $pattern (toJson $spec) -1 }}
{{- if has (trimPrefix "${" . | trimSuffix "}") $keys }}
{{- $users = append $users (printf "channels.%s" $channel) }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.kafka.sasl.enabled }}
{{- if or (has .Values.kafka.sasl.usernameEnv $keys) (has .Values.kafka.sasl.passwordEnv $keys) }}
{{- $users = append $users "kafka.sasl" }}
{{- end }}
{{- end }}
{{- range (list .Values.ingest.eventbridge.tokenEnv .Values.ingest.eventbridge.hmacKeyEnv) }}
{{- if and . (has . $keys) }}
{{- $users = append $users "ingest.eventbridge" }}
{{- end }}
{{- end }}
{{- with .Values.ingest.alertmanager.tokenEnv }}
{{- if has . $keys }}
{{- $users = append $users "ingest.alertmanager" }}
{{- end }}
{{- end }}
{{- range regexFindAll $pattern (toJson (.Values.config | default dict)) -1 }}
{{- if has (trimPrefix "${" . | trimSuffix "}") $keys }}
{{- $users = append $users "config" }}
{{- end }}
{{- end }}
{{- with .Values.router.apiTokenKey }}
{{- $keys = append $keys . }}
{{- $users = append $users "router.apiTokenKey" }}
{{- end }}
{{- toJson (dict "keys" ($keys | uniq | sortAlpha) "users" ($users | uniq)) }}
{{- end }}

{{/*
Refuse to render pods that would crash at start: the config reads ${VAR}s (or router.apiTokenKey is
set) and nothing provides them. With `envFrom` set the chart cannot see which keys it provides and
trusts it, except for the API token, which is read from existingSecret by key.
*/}}
{{- define "imm-router.requireSecret" -}}
{{- if not .Values.existingSecret }}
{{- $needs := include "imm-router.secretNeeds" . | fromJson }}
{{- $missing := $needs.keys }}
{{- $users := $needs.users }}
{{- if .Values.envFrom }}
{{- $missing = compact (list .Values.router.apiTokenKey) }}
{{- $users = list "router.apiTokenKey" }}
{{- end }}
{{- if $missing }}
{{- fail (printf "existingSecret is not set: create a Secret holding the keys %s (needed by %s) and set existingSecret to its name; without them the pods cannot start." (join ", " $missing) (join ", " $users)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The kafka: section of router.yaml. */}}
{{- define "imm-router.kafkaConfig" -}}
{{- $k := .Values.kafka }}
{{- $out := dict "bootstrap_servers" $k.bootstrapServers "topics" $k.topics "group_id" $k.groupId "security_protocol" $k.securityProtocol }}
{{- if $k.deadLetterTopic }}
{{- $_ := set $out "dead_letter_topic" $k.deadLetterTopic }}
{{- end }}
{{- $_ := set $out "notifications_topic" $k.notificationsTopic }}
{{- $_ := set $out "notifications_partitions" (int $k.notificationsPartitions) }}
{{- $_ := set $out "changelog_topic" $k.changelogTopic }}
{{- $_ := set $out "silences_topic" $k.silencesTopic }}
{{- $_ := set $out "inhibitions_topic" $k.inhibitionsTopic }}
{{- $_ := set $out "replication_factor" (int $k.replicationFactor) }}
{{- if $k.sasl.enabled }}
{{- $_ := set $out "sasl_mechanism" $k.sasl.mechanism }}
{{- $_ := set $out "sasl_username" (printf "${%s}" $k.sasl.usernameEnv) }}
{{- $_ := set $out "sasl_password" (printf "${%s}" $k.sasl.passwordEnv) }}
{{- end }}
{{- if $k.tls.caSecret }}
{{- $_ := set $out "ssl_cafile" (printf "%s/%s" (include "imm-router.kafkaCaDir" .) $k.tls.caKey) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Non-empty when an ingest endpoint is on. */}}
{{- define "imm-router.ingestEnabled" -}}
{{- if or .Values.ingest.mns.enabled .Values.ingest.eventbridge.enabled .Values.ingest.alertmanager.enabled }}true{{- end }}
{{- end }}

{{/* The ingest: section of router.yaml; secrets only as ${VAR} references to existingSecret keys. */}}
{{- define "imm-router.ingestConfig" -}}
{{- $m := .Values.ingest.mns }}
{{- $e := .Values.ingest.eventbridge }}
{{- $eventbridge := dict "enabled" $e.enabled "token_header" $e.tokenHeader "hmac_header" $e.hmacHeader }}
{{- with $e.tokenEnv }}
{{- $_ := set $eventbridge "token" (printf "${%s}" .) }}
{{- end }}
{{- with $e.hmacKeyEnv }}
{{- $_ := set $eventbridge "hmac_key" (printf "${%s}" .) }}
{{- end }}
{{- $alertmanager := dict "enabled" .Values.ingest.alertmanager.enabled }}
{{- with .Values.ingest.alertmanager.tokenEnv }}
{{- $_ := set $alertmanager "token" (printf "${%s}" .) }}
{{- end }}
{{- toJson (dict "mns" (dict "enabled" $m.enabled "cert_url_prefixes" $m.certUrlPrefixes) "eventbridge" $eventbridge "alertmanager" $alertmanager) }}
{{- end }}

{{/* router.yaml: the free-form `config` block with the chart-managed settings merged over it. */}}
{{- define "imm-router.config" -}}
{{- $managed := dict
  "rules_dir" (include "imm-router.rulesDir" .)
  "templates_dir" (include "imm-router.templatesDir" .)
  "timezone" .Values.router.timezone
  "log_level" .Values.router.logLevel
  "http" (dict "host" "0.0.0.0" "port" (int .Values.router.httpPort))
  "service" (dict "drain_timeout_seconds" (int .Values.router.drainTimeoutSeconds) "workers" (int .Values.router.workers))
  "channels" (.Values.channels | default dict)
  "kafka" (include "imm-router.kafkaConfig" . | fromJson)
}}
{{- if include "imm-router.ingestEnabled" . }}
{{- $_ := set $managed "ingest" (include "imm-router.ingestConfig" . | fromJson) }}
{{- end }}
{{- $config := mustMergeOverwrite (deepCopy (.Values.config | default dict)) $managed }}
{{- toYaml $config }}
{{- end }}

{{/*
The files of one set ("rules" or "templates") as JSON (lossless for file contents, unlike a YAML
round trip which drops the last file's trailing newline): a map of relative path -> content:
`files` from values, else (or also, with includeBundled) the chart's bundled files/<set>/.
Call with (dict "root" $ "set" "rules").
*/}}
{{- define "imm-router.fileSet" -}}
{{- $root := .root }}
{{- $v := index $root.Values .set }}
{{- $out := dict }}
{{- if or (empty $v.files) $v.includeBundled }}
{{- $prefix := printf "files/%s/" .set }}
{{- range $path, $_ := $root.Files.Glob (printf "%s**" $prefix) }}
{{- $_ := set $out (trimPrefix $prefix $path) ($root.Files.Get $path) }}
{{- end }}
{{- end }}
{{- range $path, $content := $v.files }}
{{- if not (kindIs "string" $content) }}
{{- fail (printf "%s.files.%s must be the file's content as a string" $.set $path) }}
{{- end }}
{{- $_ := set $out $path $content }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* ConfigMap keys cannot contain "/": "dingtalk/x.md.j2" is stored as "dingtalk__x.md.j2". */}}
{{- define "imm-router.fileKey" -}}
{{- . | replace "/" "__" }}
{{- end }}

{{/* The volume for one file set: an existing ConfigMap, or the chart's with key->path items. */}}
{{- define "imm-router.fileSetVolume" -}}
{{- $root := .root }}
{{- $v := index $root.Values .set -}}
- name: {{ .set }}
  configMap:
  {{- if $v.existingConfigMap }}
    name: {{ $v.existingConfigMap }}
    {{- with $v.existingConfigMapItems }}
    items:
      {{- toYaml . | nindent 6 }}
    {{- end }}
  {{- else }}
    name: {{ include "imm-router.fullname" $root }}-{{ .set }}
    {{- $files := include "imm-router.fileSet" . | fromJson }}
    {{- if $files }}
    items:
      {{- range $path := keys $files | sortAlpha }}
      - key: {{ include "imm-router.fileKey" $path | quote }}
        path: {{ $path | quote }}
      {{- end }}
    {{- end }}
  {{- end }}
{{- end }}
