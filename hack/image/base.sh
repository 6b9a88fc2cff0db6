#!/usr/bin/env bash
# Prints the base image for the Dockerfile's CPU stages (its BASE_IMAGE build argument), making
# one when none can be pulled.
#
#   hack/image/base.sh            the image name: $BASE_IMAGE (default python:3.11-slim) when it
#                                 is here or can be pulled, else moirai-base:bookworm, built
#                                 here from Debian's packages when missing
#   hack/image/base.sh --local    always the local one (building it when missing)
#
# The local base is what python:3.11-slim gives the Dockerfile — Debian bookworm with Python
# 3.11, venv and CA certificates — made with `debootstrap --variant=minbase` into a folder and
# `docker import`ed: it needs only Debian's package archive, which machines without a container
# registry still reach. Needs root (debootstrap), a Docker engine, and about 2 minutes.
set -euo pipefail

WANTED="${BASE_IMAGE:-python:3.11-slim}"
LOCAL="moirai-base:bookworm"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates

log() { printf '[base-image] %s\n' "$*" >&2; }
die() { printf '[base-image] error: %s\n' "$*" >&2; exit 1; }
here() { docker image inspect "$1" >/dev/null 2>&1; }

build_local() {
    command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install -y debootstrap"
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
    ROOTFS="$(mktemp -d "${TMPDIR:-/tmp}/moirai-base.XXXXXX")"
    trap 'rm -rf "$ROOTFS"' EXIT
    local root="$ROOTFS"
    log "building $LOCAL: debootstrap --variant=minbase $SUITE (+ $PACKAGES)"
    debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" >&2
    # What a container image leaves out: package lists and caches, logs, the host's resolver.
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
        "$root"/var/cache/apt/archives/*.deb "$root"/var/log/*.log "$root"/etc/resolv.conf
    tar -C "$root" --numeric-owner -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'CMD ["python3"]' \
        - "$LOCAL" >/dev/null
    log "built $LOCAL"
}

docker info >/dev/null 2>&1 || die "no Docker engine answers: start one (hack/image/engine.sh)"
if [[ "${1:-}" != "--local" ]]; then
    [[ $# -eq 0 ]] || die "usage: $0 [--local]"
    if here "$WANTED" || docker pull -q "$WANTED" >/dev/null 2>&1; then
        printf '%s\n' "$WANTED"
        exit 0
    fi
    log "cannot pull $WANTED: using the local base $LOCAL"
fi
here "$LOCAL" || build_local
printf '%s\n' "$LOCAL"
