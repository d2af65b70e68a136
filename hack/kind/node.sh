#!/usr/bin/env bash
# Builds the kind node image for the Kubernetes pinned in hack/tools/go.mod,
# with every image it needs built here (no registry is reachable):
#
#   terrace.local/debian     debootstrap + docker import (debian-base.sh)
#   terrace.local/kind-base  + systemd, containerd, runc, CNI plugins (base/)
#   registry.k8s.io/...      kube-apiserver, kube-controller-manager,
#                            kube-scheduler, kube-proxy, etcd, coredns, pause,
#                            named and tagged as kubeadm expects them
#   terrace.local/kind-node  + kubelet, kubeadm, kubectl, crictl and those
#                            images (node/)
#
# Every tag carries a hash of its inputs, so a rebuild happens only when an
# input changed. Prints the node image's name on its last line.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

debian=$(bash "$here/debian-base.sh")
tools=$(tools_dir)
bins=$(node_bin_dir)

base="terrace.local/kind-base:$(inputs_hash <(echo "$debian") "$here"/base/*)"
node="terrace.local/kind-node:${K8S_VERSION}-$(inputs_hash <(echo "$base $tools $bins") "$0" "$here"/node/*)"
if image_exists "$node"; then echo "$node"; exit 0; fi

build() { "${BG[@]}" docker build -q "$@" >/dev/null; }

if ! image_exists "$base"; then
  log "building $base"
  build --build-arg "DEBIAN=$debian" -t "$base" "$here/base"
fi

ctx=$(mktemp -d "$KIND_CACHE/.node.XXXX")
trap 'rm -rf "$ctx"' EXIT

# A static binary in an image of its own. kubeadm's manifests name the
# command for the control plane and etcd; CoreDNS and pause run their
# image's entrypoint.
static_image() {
  local image=$1 binary=$2 entrypoint=$3 dir
  dir="$ctx/$(basename "$binary")"
  mkdir -p "$dir"
  cp "$binary" "$dir/"
  build -t "$image" -f - "$dir" <<EOF
FROM scratch
COPY $(basename "$binary") $entrypoint
ENV PATH=/usr/local/bin:/usr/bin:/bin
ENTRYPOINT ["$entrypoint"]
EOF
}

reg=registry.k8s.io
images=(
  "$reg/kube-apiserver:$K8S_VERSION"
  "$reg/kube-controller-manager:$K8S_VERSION"
  "$reg/kube-scheduler:$K8S_VERSION"
  "$reg/kube-proxy:$K8S_VERSION"
  "$reg/etcd:$ETCD_IMAGE_TAG"
  "$reg/coredns/coredns:$COREDNS_VERSION"
  "$reg/pause:$PAUSE_IMAGE_TAG"
)
log "building kubeadm's images (${images[*]##*/})"
for b in kube-apiserver kube-controller-manager kube-scheduler; do
  static_image "$reg/$b:$K8S_VERSION" "$tools/$b" "/usr/local/bin/$b"
done
static_image "$reg/etcd:$ETCD_IMAGE_TAG" "$tools/etcd" /usr/local/bin/etcd
static_image "$reg/coredns/coredns:$COREDNS_VERSION" "$bins/coredns" /coredns
static_image "$reg/pause:$PAUSE_IMAGE_TAG" "$bins/pause" /pause
# kube-proxy programs iptables (nft backend, as the node's own iptables).
mkdir -p "$ctx/kube-proxy"
cp "$bins/kube-proxy" "$ctx/kube-proxy/"
build -t "$reg/kube-proxy:$K8S_VERSION" -f - "$ctx/kube-proxy" <<EOF
FROM $debian
RUN apt-get update && apt-get install -y iptables conntrack && rm -rf /var/lib/apt/lists/*
COPY kube-proxy /usr/local/bin/kube-proxy
EOF

# Refuse to build a node image whose images are not what kubeadm will ask for.
want=$("$bins/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null | sort)
have=$(printf '%s\n' "${images[@]}" | sort)
[[ "$want" == "$have" ]] || die "kubeadm expects images:
$want
but this script builds:
$have
(update hack/kind/versions)"

log "assembling $node"
mkdir -p "$ctx/node/bin"
cp "$here"/node/* "$ctx/node/"
cp "$bins/kubelet" "$bins/kubeadm" "$bins/crictl" "$tools/kubectl" "$ctx/node/bin/"
echo "$K8S_VERSION" >"$ctx/node/version"
"${BG[@]}" docker save -o "$ctx/node/images.tar" "${images[@]}"
build --build-arg "BASE=$base" -t "$node" "$ctx/node"

# Superseded node and base images go (not those a container still uses:
# docker refuses, and they stay until the cluster is deleted).
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' terrace.local/kind-node) \
           $(docker images --format '{{.Repository}}:{{.Tag}}' terrace.local/kind-base); do
  [[ $old == "$node" || $old == "$base" ]] || docker rmi "$old" >/dev/null 2>&1 || true
done
echo "$node"
