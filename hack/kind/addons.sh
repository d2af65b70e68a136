#!/usr/bin/env bash
# What `make kind-up` adds to the kind cluster besides Kubernetes itself:
#   - Prometheus (hack/kind/prometheus.yaml, in namespace monitoring), its
#     image built here from its Go module (build-prometheus.sh, prometheus/);
#   - the models: kind-config.yaml mounts .cache/kind-models/gemma3-270m on
#     every worker at /models/gemma3-270m; crds/samples/kind/models.yaml
#     makes it a PersistentVolume the tiers mount with pvc://models/...
# Idempotent. Needs the cluster up (hack/kind/up.sh calls it).
set -euo pipefail
source "$(dirname "$0")/lib.sh"

kind="$(tools_dir)/kind"
kubectl=("$(tools_dir)/kubectl" --kubeconfig "$STATE/kubeconfig")
bin=$("${BG[@]}" bash "$here/build-prometheus.sh" | tail -1)

prometheus="terrace.local/prometheus:$(inputs_hash <(echo "$bin") "$here/prometheus/Dockerfile")"
if ! image_exists "$prometheus"; then
  log "building $prometheus"
  "${BG[@]}" docker build -q -f "$here/prometheus/Dockerfile" -t "$prometheus" "$bin" >/dev/null
fi
# kind load skips nodes that already have the image.
"${BG[@]}" "$kind" load docker-image --name "$CLUSTER_NAME" --nodes "$(kind_workers)" "$prometheus" >/dev/null
# The manifest's hash in the pod template: a changed config restarts it.
sed -e "s|PROMETHEUS_IMAGE|$prometheus|" -e "s|CONFIG_HASH|$(inputs_hash "$here/prometheus.yaml")|" \
  "$here/prometheus.yaml" | "${kubectl[@]}" apply -f - >/dev/null
"${kubectl[@]}" rollout status -n monitoring deployment/prometheus --timeout=180s >/dev/null
log "Prometheus: http://prometheus.monitoring.svc:9090 ($prometheus)"
