#!/usr/bin/env bash
# `make kind-up`: Docker (started by PID, hack/kind/dockerd.sh), the node
# image built here (hack/kind/node.sh), then
#   kind create cluster --config kind-config.yaml --image <node image>
# with kind from the pinned Go module (hack/tools/kind.version). Idempotent:
# a cluster that is already up is left as it is.
#
# The kubeconfig goes to $KIND_CACHE/state/kubeconfig (printed at the end),
# not ~/.kube/config, so nothing else on the machine is repointed.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

bash "$here/dockerd.sh" up
# The models every worker mounts (kind-config.yaml: .cache/kind-models, a
# path kind resolves from the folder it runs in): Gemma 3 270M as
# hack/real_models.py prepares it, linked from its cache outside the clone.
models=$(cd "$repo" && "${BG[@]}" "${PYTHON:-python3}" hack/real_models.py | "${PYTHON:-python3}" -c 'import json, sys; print(json.load(sys.stdin)["onnx"])')
mkdir -p "$repo/.cache/kind-models"
ln -sfn "$(dirname "$models")" "$repo/.cache/kind-models/gemma3-270m"
node=$(bash "$here/node.sh")
kind="$(tools_dir)/kind"
kubeconfig="$STATE/kubeconfig"

if "$kind" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  log "cluster $CLUSTER_NAME is already up"
else
  log "kind create cluster --config kind-config.yaml --image $node"
  (cd "$repo" && "$kind" create cluster --config kind-config.yaml --image "$node" \
    --kubeconfig "$kubeconfig" --wait 5m)
fi
"$kind" export kubeconfig --name "$CLUSTER_NAME" --kubeconfig "$kubeconfig" >/dev/null 2>&1
bash "$here/addons.sh"
log "ready; use it with:"
echo "export DOCKER_HOST=$DOCKER_HOST KUBECONFIG=$kubeconfig"
