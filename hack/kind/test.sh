#!/usr/bin/env bash
# `make test-kind`: the kind layer of the tests (tests/kind, docs/testing.md).
# Brings up the kind cluster (make kind-up) and Terrace's images (make
# kind-images), runs tests/kind in file order (the tests tell one story:
# install, route, cap, scale, upgrade, uninstall), then takes the cluster
# and Docker down again; KEEP=1 leaves them up. pytest's exit status is
# the target's.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

if [[ -z ${KEEP-} ]]; then
  trap 'bash "$here/down.sh" || true' EXIT
fi
start=$SECONDS
bash "$here/up.sh" >/dev/null
bash "$here/terrace-images.sh" >/dev/null
log "cluster and images ready in $((SECONDS - start)) s"
cd "$repo"
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
"${PYTHON:-python3}" -m pytest tests/kind -p no:randomly ${PYTEST_ARGS-}
