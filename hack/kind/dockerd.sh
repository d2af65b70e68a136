#!/usr/bin/env bash
# Starts and stops the project's own dockerd, by PID.
#
#   hack/kind/dockerd.sh up     install Debian's docker.io if missing, start dockerd
#   hack/kind/dockerd.sh down   stop it and undo the host network changes it made
#
# dockerd runs with
#   - its data-root under the kind cache (outside the clone), keyed by the
#     engine's version so an upgrade never reads an older layout;
#   - its own socket, exec-root and pid file under /run/terrace-kind, so it
#     never meets a system Docker;
#   - hack/kind/runc-wrapper as the default OCI runtime (see that file: this
#     VM's root lacks CAP_SYS_RESOURCE, which privileged containers ask for).
#
# Host settings dockerd changes, and how `down` puts them back:
#   - net.ipv4.ip_forward -> 1 (NAT for containers): restored to the saved value;
#   - iptables/ip6tables: DOCKER* chains, MASQUERADE for its bridges, FORWARD
#     policy DROP: the tables saved before the first start are restored, only
#     when they still hold Docker's chains (so nothing else is overwritten
#     when Docker made no change);
#   - the docker0 and br-* bridges: deleted.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

pidfile="$RUN_DIR/dockerd.pid"

running() {
  [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null
}

install_docker() {
  command -v dockerd >/dev/null && [[ -x /usr/bin/docker ]] && return 0
  [[ $(id -u) == 0 ]] || die "dockerd is missing; run as root or: apt-get install docker.io"
  log "installing Debian's docker.io (apt-get)"
  # Without systemd the package's init script would start a second dockerd
  # with the default data-root; a policy-rc.d that says "no" stops that.
  local policy=/usr/sbin/policy-rc.d made=""
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made=1
  fi
  DEBIAN_FRONTEND=noninteractive "${BG[@]}" apt-get install -y -q --no-install-recommends \
    docker.io debootstrap iptables >&2
  [[ -n $made ]] && rm -f "$policy"
  ln -sfn /usr/bin/docker "$STATE/path/docker"
}

save_host_network() {
  # Saved once per machine state: a second `up` after a crash keeps the
  # original values rather than Docker's.
  [[ -f "$STATE/host-network/saved" ]] && return 0
  mkdir -p "$STATE/host-network"
  sysctl -n net.ipv4.ip_forward >"$STATE/host-network/ip_forward"
  iptables-save >"$STATE/host-network/iptables" 2>/dev/null || true
  ip6tables-save >"$STATE/host-network/ip6tables" 2>/dev/null || true
  touch "$STATE/host-network/saved"
}

# Puts filter and nat back as saved; a table the save lacks (it was empty
# before Docker) is emptied with ACCEPT policies, which is how it was.
restore_tables() {
  local cmd=$1 saved=$2 table chains chain
  "$cmd-save" 2>/dev/null | grep -q ':DOCKER' || return 0
  for table in filter nat; do
    if grep -q "^\*$table\$" "$saved"; then
      sed -n "/^\*$table\$/,/^COMMIT\$/p" "$saved"
    else
      case $table in
        filter) chains="INPUT FORWARD OUTPUT" ;;
        nat) chains="PREROUTING INPUT OUTPUT POSTROUTING" ;;
      esac
      echo "*$table"
      for chain in $chains; do echo ":$chain ACCEPT [0:0]"; done
      echo COMMIT
    fi
  done | "$cmd-restore"
}

restore_host_network() {
  local d="$STATE/host-network"
  [[ -f "$d/saved" ]] || return 0
  local link
  for link in $(ip -o link show type bridge | awk -F': ' '{print $2}' | grep -E '^(docker0|br-[0-9a-f]{12})$' || true); do
    ip link delete "$link" 2>/dev/null || true
  done
  restore_tables iptables "$d/iptables"
  restore_tables ip6tables "$d/ip6tables"
  sysctl -q -w "net.ipv4.ip_forward=$(cat "$d/ip_forward")"
  rm -rf "$d"
}

up() {
  if running; then
    return 0
  fi
  install_docker
  local engine data
  engine=$(dockerd --version | sed -E 's/^Docker version ([0-9]+\.[0-9]+).*/\1/')
  data="$KIND_CACHE/docker-$engine"
  mkdir -p "$RUN_DIR" "$data" "$STATE"
  save_host_network
  log "starting dockerd $engine (data-root $data)"
  # setsid: dockerd outlives make; it is stopped by PID (`down`).
  setsid nice -n 10 dockerd \
    --host "$DOCKER_HOST" \
    --data-root "$data" \
    --exec-root "$RUN_DIR/exec" \
    --pidfile "$pidfile" \
    --add-runtime "terrace-runc=$here/runc-wrapper" \
    --default-runtime terrace-runc \
    --log-level warn \
    </dev/null >>"$STATE/dockerd.log" 2>&1 &
  local pid=$!
  local i
  for i in $(seq 60); do
    if docker info >/dev/null 2>&1; then
      log "dockerd up (pid $pid, DOCKER_HOST=$DOCKER_HOST)"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  tail -20 "$STATE/dockerd.log" >&2
  die "dockerd did not start (log: $STATE/dockerd.log)"
}

down() {
  if running; then
    local pid i
    pid=$(cat "$pidfile")
    # Networks first, while the engine can still remove their bridges.
    docker network ls -q --filter type=custom | xargs -r docker network rm >/dev/null 2>&1 || true
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    for i in $(seq 60); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "dockerd did not stop in 60 s; sending SIGKILL to pid $pid"
      kill -KILL "$pid"
    fi
  fi
  rm -f "$pidfile"
  rm -rf "$RUN_DIR"
  restore_host_network
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
