#!/usr/bin/env bash
# `make kind-images`: Terrace's four images (images/*/Dockerfile) built here
# FROM a Python base built here (hack/kind/python: Debian's Python 3.11 on
# the debootstrapped Debian), then `kind load`ed into the cluster from
# `make kind-up`. Tags: terrace.local/terrace-<name>:<chart appVersion>.
#
# The runtime image is onnxruntime-only unless a CPU build of torch can be
# had: PyPI serves only the CUDA build for Linux (~4 GB with its nvidia-*
# wheels), far too big to load into three nodes. Set RUNTIME_EXTRAS=torch
# (and PIP_EXTRA_INDEX_URL to a CPU index, where one is reachable) to
# include it.
#
# Prints the four image names.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

bash "$here/dockerd.sh" up
debian=$(bash "$here/debian-base.sh")
python="terrace.local/python:3.11-$(inputs_hash <(echo "$debian") "$here/python/Dockerfile")"
if ! image_exists "$python"; then
  log "building $python"
  "${BG[@]}" docker build -q --build-arg "DEBIAN=$debian" -t "$python" "$here/python" >/dev/null
fi

version=$(awk -F'"' '/^appVersion:/ {print $2}' "$repo/charts/terrace/Chart.yaml")
runtime_extras=${RUNTIME_EXTRAS-}
images=()
for name in operator router runtime agent; do
  image="terrace.local/terrace-$name:$version"
  args=(--build-arg "PYTHON_IMAGE=$python")
  # pip inside the build trusts what pip here trusts (a TLS-inspecting
  # proxy's CA, where there is one), as a secret: it is in no layer.
  args+=(--secret "id=pip-ca,src=${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}")
  if [[ $name == runtime ]]; then
    args+=(--build-arg "EXTRAS=$runtime_extras" --build-arg "PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL-}")
  fi
  log "building $image"
  start=$SECONDS
  DOCKER_BUILDKIT=1 "${BG[@]}" docker build -q "${args[@]}" -f "$repo/images/$name/Dockerfile" \
    -t "$image" "$repo" >/dev/null
  log "  $image: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'), $((SECONDS - start)) s"
  images+=("$image")
done

# Rebuilt tags leave their previous images untagged: drop them.
docker image prune -f >/dev/null

kind="$(tools_dir)/kind"
if "$kind" get clusters 2>/dev/null | grep -qx "$CLUSTER_NAME"; then
  workers=$(kind_workers)
  log "kind load docker-image (${#images[@]} images) into $workers"
  "${BG[@]}" "$kind" load docker-image --name "$CLUSTER_NAME" --nodes "$workers" "${images[@]}" >&2
else
  log "no kind cluster $CLUSTER_NAME: images built, not loaded (make kind-up first)"
fi
printf '%s\n' "${images[@]}"
