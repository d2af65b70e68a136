#!/usr/bin/env bash
# `make kind-down`: delete the kind cluster, then stop dockerd by its PID and
# undo the host network changes it made (hack/kind/dockerd.sh). The caches
# (Docker's data-root with the built images, the binaries) stay, so the next
# `make kind-up` is warm; `rm -rf ~/.cache/terrace/kind` removes them.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [[ -S $RUN_DIR/docker.sock ]] && docker info >/dev/null 2>&1; then
  kind="$(tools_dir)/kind"
  if "$kind" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
    log "deleting cluster $CLUSTER_NAME"
    "$kind" delete cluster --name "$CLUSTER_NAME" --kubeconfig "$STATE/kubeconfig"
  fi
fi
rm -f "$STATE/kubeconfig"
bash "$here/dockerd.sh" down
