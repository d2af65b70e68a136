#!/usr/bin/env bash
# Builds the real Kubernetes binaries the test cluster runs (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubectl, etcd, kwok) from the Go
# module in hack/tools, plus helm and kind (whose config loader checks
# kind-config.yaml), into a cache outside the clone keyed by the
# pinned versions. A warm cache makes this a no-op; only missing binaries are built.
#
# Prints the cache folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
tools="$here/tools"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$tools/go.mod")
helm_version=$(cat "$tools/helm.version")
kind_version=$(cat "$tools/kind.version")
key=$(cat "$tools/go.mod" "$tools/go.sum" "$tools/helm.version" "$tools/kind.version" | sha256sum | cut -c1-12)
cache="${TERRACE_TOOLS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/terrace/bin/${k8s_version}-${key}}"
binaries=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm kind)

missing=()
for b in "${binaries[@]}"; do
  [[ -x "$cache/$b" ]] || missing+=("$b")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "$cache"
  exit 0
fi

command -v go >/dev/null || { echo "build-tools: Go is required (https://go.dev/dl); none on PATH" >&2; exit 1; }
mkdir -p "$cache"
# One build at a time per cache; a second caller waits, then finds it warm.
exec 9>"$cache/.lock"
flock 9
missing=()
for b in "${binaries[@]}"; do
  [[ -x "$cache/$b" ]] || missing+=("$b")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "$cache"
  exit 0
fi
echo "build-tools: building ${missing[*]} into $cache (cold: about 10-15 min on 2 cores)" >&2
tmp=$(mktemp -d "$cache/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT

# Go 1.27 turns jsonv2 on by default, which breaks kube-apiserver's OpenAPI.
export GOEXPERIMENT=nojsonv2 GOFLAGS=-mod=mod CGO_ENABLED=0
minor=${k8s_version#v1.}; minor=${minor%%.*}
# Stamp the real version so kubectl and helm see "v1.36.x", not "v0.0.0".
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done

want() { [[ " ${missing[*]} " == *" $1 "* ]]; }
k8s_pkgs=()
for b in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  want "$b" && k8s_pkgs+=("k8s.io/kubernetes/cmd/$b")
done
want kwok && k8s_pkgs+=(sigs.k8s.io/kwok/cmd/kwok)

cd "$tools"
if [[ ${#k8s_pkgs[@]} -gt 0 ]]; then
  go build -ldflags "$ldflags" -o "$tmp/" "${k8s_pkgs[@]}"
fi
if want etcd; then
  go build -ldflags "-s -w" -o "$tmp/etcd" go.etcd.io/etcd/server/v3
fi
# helm and kind live in their own modules (their k8s.io dependencies differ
# from ours); `go install pkg@version` pins them by the version files.
if want helm; then
  GOBIN="$tmp" go install -ldflags "-s -w" "helm.sh/helm/v4/cmd/helm@$helm_version"
fi
if want kind; then
  GOBIN="$tmp" go install -ldflags "-s -w" "sigs.k8s.io/kind@$kind_version"
fi

for b in "${missing[@]}"; do
  mv -f "$tmp/$b" "$cache/$b"
done
echo "build-tools: done" >&2
echo "$cache"
