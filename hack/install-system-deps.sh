#!/usr/bin/env bash
# System packages the test cluster needs: Debian's prometheus (run by hand by
# hack/devcluster.py, never as a service) and openssl (per-run certificates).
set -euo pipefail
need=()
command -v prometheus >/dev/null || [[ -x /usr/bin/prometheus ]] || need+=(prometheus)
command -v openssl >/dev/null || need+=(openssl)
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
