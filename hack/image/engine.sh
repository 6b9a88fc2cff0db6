#!/usr/bin/env bash
# Makes sure a Docker engine answers on this machine, for `hack/image/build.sh` and the tests
# marked `container`: installs Debian's docker.io (and debootstrap, for hack/image/base.sh) when
# missing, and starts dockerd in the background when none runs. Needs root; idempotent.
#
# The engine makes no bridge network and touches no iptables rules: builds and the tests'
# containers use the host's network (`--network host`), so every address stays on this machine.
# Its log: ${MOIRAI_DOCKERD_LOG:-/tmp/moirai-dockerd.log}.
set -euo pipefail

LOG="${MOIRAI_DOCKERD_LOG:-/tmp/moirai-dockerd.log}"
log() { printf '[engine] %s\n' "$*" >&2; }
die() { printf '[engine] error: %s\n' "$*" >&2; exit 1; }

if docker info >/dev/null 2>&1; then
    log "a Docker engine answers"
    exit 0
fi
[[ $(id -u) -eq 0 ]] || die "no Docker engine answers, and starting one needs root"
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi
log "starting dockerd (log: $LOG)"
nohup setsid dockerd --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    >"$LOG" 2>&1 </dev/null &
for _ in $(seq 120); do
    docker info >/dev/null 2>&1 && { log "the engine answers"; exit 0; }
    sleep 0.5
done
die "dockerd did not answer within 60 s: see $LOG"
