#!/usr/bin/env bash
# Builds the image every other one here starts FROM: Debian (hack/kind/versions)
# made with `debootstrap --variant=minbase` and `docker import`ed. No
# registry is involved; only the Debian mirror apt already uses.
#
# Prints the image's name. Cached twice: the image itself (tag keyed by the
# suite and RECIPE below) and the rootfs tarball under the kind cache,
# so a wiped Docker data-root re-imports in seconds instead of re-bootstrapping.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

# Bump RECIPE when what this script puts in the image changes.
RECIPE=r1
tag="terrace.local/debian:${DEBIAN_SUITE}-${RECIPE}"
if image_exists "$tag"; then echo "$tag"; exit 0; fi

tarball="$KIND_CACHE/rootfs/${tag##*:}.tar"
if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
  log "debootstrap $DEBIAN_SUITE (minbase) -> $tarball (about 2 min)"
  mkdir -p "$KIND_CACHE/rootfs"
  work=$(mktemp -d "$KIND_CACHE/rootfs/.work.XXXX")
  trap 'rm -rf "$work"' EXIT
  "${BG[@]}" debootstrap --variant=minbase "$DEBIAN_SUITE" "$work/root" "$DEBIAN_MIRROR" >"$work/log" 2>&1 ||
    { tail -20 "$work/log" >&2; die "debootstrap failed"; }
  # What a container image should not carry: apt lists, caches, logs, and
  # this machine's identity.
  rm -rf "$work/root"/var/lib/apt/lists/* "$work/root"/var/cache/apt/*.bin \
    "$work/root"/var/cache/apt/archives/*.deb "$work/root"/var/log/*.log \
    "$work/root"/tmp/* "$work/root"/etc/hostname "$work/root"/etc/machine-id
  : >"$work/root/etc/resolv.conf"
  # Image-style apt: no recommends, no docs, no stale lists left behind.
  cat >"$work/root/etc/apt/apt.conf.d/90terrace-image" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
EOF
  cat >"$work/root/etc/dpkg/dpkg.cfg.d/90terrace-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  "${BG[@]}" tar -C "$work/root" --numeric-owner -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
log "docker import $tarball -> $tag"
"${BG[@]}" docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["bash"]' \
  "$tarball" "$tag" >/dev/null
echo "$tag"
