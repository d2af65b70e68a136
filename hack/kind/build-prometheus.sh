#!/usr/bin/env bash
# Builds the Prometheus that runs inside the kind cluster from its Go module
# (github.com/prometheus/prometheus, PROMETHEUS_MODULE_VERSION in
# hack/kind/versions). Debian's package, which the dev cluster runs, is built
# without Kubernetes service discovery, and inside a cluster that is how
# Prometheus finds the pods. Only that discovery is compiled in (Prometheus'
# own build tags), which roughly halves the build: about 2 min cold on 2
# cores. Static, no web UI assets (the API and /metrics are all Terrace
# reads).
#
# Output: a cache folder outside the clone keyed by the version and this
# script. Prints that folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions
source "$here/versions"
key=$(cat "$here/versions" "$0" | sha256sum | cut -c1-12)
root="${TERRACE_KIND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/terrace/kind}"
out="$root/bin/prometheus-${PROMETHEUS_MODULE_VERSION}-${key}"
if [[ -x "$out/prometheus" ]]; then echo "$out"; exit 0; fi

command -v go >/dev/null || { echo "kind/build-prometheus: Go is required; none on PATH" >&2; exit 1; }
mkdir -p "$out"
exec 9>"$out/.lock"
flock 9
if [[ -x "$out/prometheus" ]]; then echo "$out"; exit 0; fi
echo "kind/build-prometheus: building into $out (cold: about 2-3 min on 2 cores)" >&2
tmp=$(mktemp -d "$out/.build.XXXX")
trap 'rm -rf "$tmp"' EXIT
CGO_ENABLED=0 GOBIN="$tmp" go install -tags remove_all_sd,enable_kubernetes_sd,netgo \
  -ldflags "-s -w" "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_MODULE_VERSION"
mv -f "$tmp/prometheus" "$out/prometheus"
echo "$out"
