{{- /* Names: "<release>-warden", or the release name when it already says warden. */ -}}
{{- define "warden.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "warden" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-warden" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- /* The components: values key -> name (also the CLI command and container name). */ -}}
{{- define "warden.components" -}}
{{- $all := dict "gateway" "gateway" "filterWorker" "filter-worker" -}}
{{- if .Values.moderator.enabled }}{{ $_ := set $all "moderator" "moderator" }}{{ end -}}
{{- if .Values.webhooks.enabled }}{{ $_ := set $all "webhooks" "webhooks" }}{{ end -}}
{{- toJson $all -}}
{{- end -}}

{{- define "warden.version" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{- /* Selector labels: stable across upgrades (no version). context: component or "". */ -}}
{{- define "warden.selectorLabels" -}}
app.kubernetes.io/name: warden
app.kubernetes.io/instance: {{ .root.Release.Name | quote }}
{{- with .component }}
app.kubernetes.io/component: {{ . | quote }}
{{- end }}
{{- end -}}

{{- define "warden.labels" -}}
{{- $user := omit (.root.Values.labels | default dict) "app.kubernetes.io/name" "app.kubernetes.io/instance" "app.kubernetes.io/component" "app.kubernetes.io/version" "app.kubernetes.io/managed-by" "app.kubernetes.io/part-of" "helm.sh/chart" -}}
{{- with $user }}{{ toYaml . }}
{{ end -}}
{{ include "warden.selectorLabels" . }}
app.kubernetes.io/part-of: warden
app.kubernetes.io/version: {{ include "warden.version" .root | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | quote }}
{{- end -}}

{{- define "warden.image" -}}
{{- $img := .Values.image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (include "warden.version" .) -}}
{{- end -}}
{{- end -}}

{{- /*
Credentials: {value} (kept in the chart's Secret), {secret, secretKey} (an existing
Secret), or empty (credentials.existingSecret under a default key). Returns JSON
{"secret": name, "key": key, "optional": bool} or {} when the credential is absent and
optional. Fails with a clear message on a half-set or missing required credential.
context: {root, name (values key), key (default key), required (bool), cred (optional override)}
*/ -}}
{{- define "warden.credential" -}}
{{- $root := .root -}}
{{- $c := .cred | default (index $root.Values.credentials .name) | default dict -}}
{{- $path := .path | default (printf "credentials.%s" .name) -}}
{{- if and $c.value (or $c.secret $c.secretKey) -}}
{{- fail (printf "%s sets both value and secret/secretKey: set only one" $path) -}}
{{- else if and $c.secret (not $c.secretKey) -}}
{{- fail (printf "%s has a secret but no secretKey" $path) -}}
{{- else if and $c.secretKey (not $c.secret) -}}
{{- fail (printf "%s has a secretKey but no secret" $path) -}}
{{- else if $c.secret -}}
{{- toJson (dict "secret" (tpl $c.secret $root) "key" $c.secretKey "optional" false) -}}
{{- else if $c.value -}}
{{- toJson (dict "secret" (include "warden.fullname" $root) "key" .key "optional" false) -}}
{{- else if and (has .name (list "signingKey" "eventSigningKey")) (include "warden.generateKeys" $root) -}}
{{- toJson (dict "secret" (include "warden.keysSecret" $root) "key" .key "optional" false) -}}
{{- else if $root.Values.credentials.existingSecret -}}
{{- toJson (dict "secret" (tpl $root.Values.credentials.existingSecret $root) "key" .key "optional" (not .required)) -}}
{{- else if .required -}}
{{- fail (printf "%s is required: set {value: ...} or {secret: ..., secretKey: ...}, or credentials.existingSecret" $path) -}}
{{- else -}}
{}
{{- end -}}
{{- end -}}

{{- /* The credentials the services read: values key -> [env var or "", default key, required]. */ -}}
{{- define "warden.credentialSpecs" -}}
{{- toJson (dict
  "database" (list "PS_DATABASE" "database" true)
  "signingKey" (list "" "signing.key" true)
  "eventSigningKey" (list "" "event_signing.key" true)
  "apiKey" (list "PS_API_KEY" "api-key" false)
  "moderatorAccessTokens" (list "PS_MODERATOR_ACCESS_TOKENS" "moderator-access-tokens" false)
  "openaiFilterApiKey" (list "PS_OPENAI_FILTER_API_KEY" "openai-filter-api-key" false)
  "redisUrl" (list "PS_REDIS_URL" "redis-url" false)
  "natsUrl" (list "PS_NATS_URL" "nats-url" false)
) -}}
{{- end -}}

{{- /* env entries (secretKeyRef) for one credential; context: {root, name}. */ -}}
{{- define "warden.credentialEnv" -}}
{{- $spec := index (include "warden.credentialSpecs" .root | fromJson) .name -}}
{{- $ref := include "warden.credential" (dict "root" .root "name" .name "key" (index $spec 1) "required" (index $spec 2)) | fromJson -}}
{{- if $ref.secret -}}
- name: {{ index $spec 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.secret | quote }}
      key: {{ $ref.key | quote }}
      {{- if $ref.optional }}
      optional: true
      {{- end }}
{{- end }}
{{- end -}}

{{- define "warden.monitoringCRD" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") -}}
true
{{- end -}}
{{- end -}}

{{- /* A checksum of the chart-held credentials, so pods restart when they change. */ -}}
{{- define "warden.credentialsChecksum" -}}
{{- $vals := dict -}}
{{- range $name, $_ := (include "warden.credentialSpecs" . | fromJson) -}}
{{- with (index $.Values.credentials $name) }}{{ with .value }}{{ $_ := set $vals $name . }}{{ end }}{{ end -}}
{{- end -}}
{{- toJson $vals | sha256sum -}}
{{- end -}}

{{- /*
"true" when the key hook generates the signing keys: a key is given neither as a value
nor as a Secret reference, and keyGeneration.enabled is true, or "auto" with no
credentials.existingSecret to read it from.
*/ -}}
{{- define "warden.generateKeys" -}}
{{- $c := .Values.credentials -}}
{{- $missing := false -}}
{{- range list "signingKey" "eventSigningKey" -}}
{{- $k := index $c . | default dict -}}
{{- if not (or $k.value $k.secret) }}{{ $missing = true }}{{ end -}}
{{- end -}}
{{- $mode := toString .Values.keyGeneration.enabled -}}
{{- if and $missing (or (eq $mode "true") (and (eq $mode "auto") (not $c.existingSecret))) -}}
true
{{- end -}}
{{- end -}}

{{- /* The Secret the key hook creates (outside the release: never overwritten or deleted). */ -}}
{{- define "warden.keysSecret" -}}
{{- printf "%s-keys" (include "warden.fullname" .) -}}
{{- end -}}
