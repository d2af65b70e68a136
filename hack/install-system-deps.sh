#!/usr/bin/env bash
# System packages the tests need: Debian's prometheus (run by hand by
# hack/devcluster.py, never as a service), openssl (per-run certificates) and
# postgresql (terrace-batch's store; hack/localpg.py runs private servers).
set -euo pipefail
need=()
command -v prometheus >/dev/null || [[ -x /usr/bin/prometheus ]] || need+=(prometheus)
command -v openssl >/dev/null || need+=(openssl)
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need+=(postgresql)
[[ ${#need[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "install-system-deps: missing ${need[*]}; install them (Debian: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
echo "install-system-deps: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package starts a system service where systemd runs; Terrace runs its own.
if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# Nor the cluster Debian's postgresql package creates and may start.
if command -v pg_lsclusters >/dev/null; then
  pg_lsclusters --no-header 2>/dev/null | while read -r version name port status _; do
    [[ $status == online* ]] && pg_ctlcluster "$version" "$name" stop || true
  done
fi
