#!/usr/bin/env bash
# Builds what a kind node runs and `make tools` does not: kubelet, kubeadm and
# kube-proxy from the Kubernetes pinned in hack/tools/go.mod, CoreDNS from its
# Go module (the version kubeadm of that release deploys, hack/kind/versions),
# crictl (what `kind load` asks the node with) from cri-tools' Go module,
# and pause, a tiny static C program (hack/kind/pause.c). The control-plane
# binaries, kubectl and etcd come from `make tools` (hack/build-tools.sh).
#
# Output: a cache folder outside the clone keyed by every input, so a second
# run is a no-op. Prints that folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tools="$here/../tools"
# shellcheck source=versions
source "$here/versions"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$tools/go.mod")
key=$(cat "$tools/go.mod" "$tools/go.sum" "$here/versions" "$here/pause.c" "$0" | sha256sum | cut -c1-12)
root="${TERRACE_KIND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/terrace/kind}"
out="$root/bin/${k8s_version}-${key}"
binaries=(kubelet kubeadm kube-proxy coredns crictl pause)

complete() {
  local b
  for b in "${binaries[@]}"; do [[ -x "$out/$b" ]] || return 1; done
}
if complete; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "kind/build-binaries: Go is required; none on PATH" >&2; exit 1; }
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if complete; then echo "$out"; exit 0; fi
echo "kind/build-binaries: building into $out (cold: about 10-15 min on 2 cores)" >&2

tmp=$(mktemp -d "$out/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT

# kubelet, kubeadm and kube-proxy need modules the tools module does not
# list; build them in a scratch copy so hack/tools/go.sum stays as pinned.
mkdir "$tmp/mod"
cp "$tools/go.mod" "$tools/go.sum" "$tmp/mod/"
cat >"$tmp/mod/node.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
EOF

export GOEXPERIMENT=nojsonv2 GOFLAGS=-mod=mod
minor=${k8s_version#v1.}; minor=${minor%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

k8s_pkgs=()
for b in kubelet kubeadm kube-proxy; do
  [[ -x "$out/$b" ]] || k8s_pkgs+=("k8s.io/kubernetes/cmd/$b")
done
if [[ ${#k8s_pkgs[@]} -gt 0 ]]; then
  (cd "$tmp/mod" && CGO_ENABLED=0 go build -ldflags "$ldflags" -o "$tmp/" "${k8s_pkgs[@]}")
  for p in "${k8s_pkgs[@]}"; do mv -f "$tmp/${p##*/}" "$out/"; done
fi

if [[ ! -x "$out/coredns" ]]; then
  CGO_ENABLED=0 GOBIN="$tmp" go install -ldflags "-s -w" "github.com/coredns/coredns@$COREDNS_VERSION"
  mv -f "$tmp/coredns" "$out/coredns"
fi

if [[ ! -x "$out/crictl" ]]; then
  CGO_ENABLED=0 GOBIN="$tmp" go install -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
  mv -f "$tmp/crictl" "$out/crictl"
fi

if [[ ! -x "$out/pause" ]]; then
  ${CC:-cc} -Os -static -s -o "$tmp/pause" "$here/pause.c"
  mv -f "$tmp/pause" "$out/pause"
fi

echo "kind/build-binaries: done" >&2
echo "$out"
