# Shared settings for hack/kind/*.sh (sourced, not run).
#
# Everything kind needs lives outside the clone under one cache folder:
#   $KIND_CACHE/docker-<engine>/   dockerd's data-root (images, containers)
#   $KIND_CACHE/rootfs/            debootstrap tarballs (docker import input)
#   $KIND_CACHE/bin/<k8s>-<key>/   kubelet, kubeadm, kube-proxy, coredns, pause
#   $KIND_CACHE/state/             pid file, logs, the host settings we changed
# The dockerd we start listens on its own socket (DOCKER_HOST below), so it
# never meets a system Docker, and is stopped by its PID.

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
# shellcheck source=versions
source "$here/versions"

KIND_CACHE="${TERRACE_KIND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/terrace/kind}"
STATE="$KIND_CACHE/state"
RUN_DIR=/run/terrace-kind
export DOCKER_HOST="unix://$RUN_DIR/docker.sock"
CLUSTER_NAME=$(awk '$1 == "name:" {print $2; exit}' "$repo/kind-config.yaml")
K8S_VERSION=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$repo/hack/tools/go.mod")

# Debian's docker CLI (20.10) speaks BuildKit without the buildx plugin; a
# newer CLI elsewhere on PATH may not. kind runs `docker` from PATH too.
mkdir -p "$STATE/path"
if [[ -x /usr/bin/docker ]]; then
  ln -sfn /usr/bin/docker "$STATE/path/docker"
fi
export PATH="$STATE/path:$PATH"

# Heavy work yields to everything else on the machine.
BG=(nice -n 19 ionice -c3)

log() { echo "kind: $*" >&2; }
die() { echo "kind: error: $*" >&2; exit 1; }

tools_dir() { "${BG[@]}" bash "$repo/hack/build-tools.sh" | tail -1; }
node_bin_dir() { "${BG[@]}" bash "$here/build-binaries.sh" | tail -1; }

# A short, stable hash of files: image tags change when their inputs change.
inputs_hash() { cat "$@" | sha256sum | cut -c1-12; }

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

# The nodes images are loaded into: workers only. kind's control plane of a
# multi-node cluster keeps its NoSchedule taint, and each node imports every
# layer (about 30 s a node). Comma-separated, for `kind load --nodes`.
kind_workers() {
  local kind nodes
  kind="$(tools_dir)/kind"
  nodes=$("$kind" get nodes --name "$CLUSTER_NAME" | grep -v -- '-control-plane' | paste -sd, -)
  [[ -n $nodes ]] || nodes=$("$kind" get nodes --name "$CLUSTER_NAME" | paste -sd, -)
  echo "$nodes"
}
