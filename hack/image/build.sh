#!/usr/bin/env bash
# Builds Moirai's image with a Docker engine on this machine.
#
#   hack/image/build.sh [cpu|gpu] [TAG]     default: cpu, moirai:<version> (gpu: <version>-gpu)
#
# The CPU image's base is whatever hack/image/base.sh answers (python:3.11-slim, or the same made
# from Debian's packages where no registry can be reached); the GPU image's base is $CUDA_IMAGE
# (default: the Dockerfile's CUDA runtime). The build runs on the host's network, and gives pip
# the host's CA bundle ($MOIRAI_CA_BUNDLE, default /etc/ssl/certs/ca-certificates.crt) as the
# build secret `ca`. Extra `docker build` arguments: $MOIRAI_BUILD_ARGS. Prints the tag built.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
TARGET="${1:-cpu}"
VERSION="$(sed -nE 's/^version = "(.*)"$/\1/p' "$REPO/pyproject.toml")"
CA="${MOIRAI_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"

die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }

# A client that builds with BuildKit: one with the buildx plugin, or Docker < 23 (its own).
builder() {
    local candidate version
    if docker buildx version >/dev/null 2>&1; then
        echo docker
        return
    fi
    for candidate in docker /usr/bin/docker; do
        version="$("$candidate" version --format '{{.Client.Version}}' 2>/dev/null)" || continue
        if ((${version%%.*} < 23)); then
            echo "$candidate"
            return
        fi
    done
    die "no Docker client here builds with BuildKit: install the buildx plugin or Debian's docker.io"
}

args=(--network host --target "$TARGET")
case "$TARGET" in
    cpu)
        TAG="${2:-moirai:$VERSION}"
        args+=(--build-arg "BASE_IMAGE=$("$HERE/base.sh")")
        ;;
    gpu)
        TAG="${2:-moirai:$VERSION-gpu}"
        [[ -z "${CUDA_IMAGE:-}" ]] || args+=(--build-arg "CUDA_IMAGE=$CUDA_IMAGE")
        ;;
    *) die "usage: $0 [cpu|gpu] [TAG]" ;;
esac
[[ ! -s "$CA" ]] || args+=(--secret "id=ca,src=$CA")
# shellcheck disable=SC2206  # MOIRAI_BUILD_ARGS is a list of words on purpose
args+=(${MOIRAI_BUILD_ARGS:-})

DOCKER_BUILDKIT=1 "$(builder)" build "${args[@]}" -t "$TAG" "$REPO" >&2
# The images this tag named before (each a copy of the environment): untagged now, removed.
docker image prune -f --filter label=dev.moirai.image >/dev/null
printf '%s\n' "$TAG"
