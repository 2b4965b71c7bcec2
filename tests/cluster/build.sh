#!/usr/bin/env bash
# Builds the real control-plane components the cluster suite runs, from the Go
# module registry, pinned, each into a version-stamped directory of a cache
# outside the repository, and links them into one bin directory. A rerun with
# a warm cache builds nothing; changing one version rebuilds only that one.
#
#   KUBE_E2E_CACHE         cache root (default: ~/.cache/konnectivity-rs)
#   KUBE_E2E_KUBE_VERSION  kube-apiserver and kubectl (default below)
#
# Prints the bin directory on the last line of stdout.
set -euo pipefail
# Errors inside $(...) and functions called from it stop the script too.
shopt -s inherit_errexit

KUBE_VERSION="${KUBE_E2E_KUBE_VERSION:-v1.36.4}" # k8s.io/kubernetes
ETCD_VERSION=v3.6.14                             # go.etcd.io/etcd/server/v3
KWOK_VERSION=v0.8.0                              # sigs.k8s.io/kwok (kubelet API)
METRICS_SERVER_VERSION=v0.9.0                    # sigs.k8s.io/metrics-server
# Every k8s.io staging module at the matching patch: v1.36.4 -> v0.36.4.
STAGING_VERSION="v0.${KUBE_VERSION#v1.}"

here="$(cd "$(dirname "$0")" && pwd)"
cache="${KUBE_E2E_CACHE:-${HOME}/.cache/konnectivity-rs}"
mkdir -p "$cache"

export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-trimpath
log() { echo "[cluster build] $*" >&2; }
command -v go >/dev/null || { log "needs the Go toolchain (1.26 or newer)"; exit 1; }

# Runs `build_<name> <tmp dir>` unless <cache>/<name>-<version> exists; the
# directory appears only once the build succeeded, so a failed or interrupted
# build is never taken for a finished one.
component() { # name version
    local dir="$cache/$1-$2"
    if [ ! -d "$dir" ]; then
        log "building $1 $2"
        local t0=$SECONDS
        rm -rf "$dir.tmp"
        mkdir -p "$dir.tmp"
        "build_$1" "$dir.tmp" >&2
        mv "$dir.tmp" "$dir"
        log "  $1 $2 done in $((SECONDS - t0)) s"
    fi
    echo "$dir"
}

build_kube() {
    local out="$1" mod="$1/src"
    mkdir -p "$mod"
    local gomod
    gomod=$(cd "$mod" && go mod download -json "k8s.io/kubernetes@${KUBE_VERSION}" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
    {
        echo "module konnectivity-rs.test/kubebuild"
        echo
        grep -E '^go [0-9]' "$gomod"
        grep -E '^godebug ' "$gomod" || true
        echo
        echo "require k8s.io/kubernetes ${KUBE_VERSION}"
        echo
        echo "replace ("
        sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\t\1 => \1 '"${STAGING_VERSION}"'#p' "$gomod"
        echo ")"
    } >"$mod/go.mod"
    cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    local major minor ver
    major=$(echo "$KUBE_VERSION" | sed 's/^v\([0-9]*\)\..*/\1/')
    minor=$(echo "$KUBE_VERSION" | sed 's/^v[0-9]*\.\([0-9]*\)\..*/\1/')
    ver="-X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
    ver="$ver -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor"
    ver="$ver -X k8s.io/client-go/pkg/version.gitVersion=${KUBE_VERSION}"
    ver="$ver -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    (cd "$mod" && go mod tidy -e)
    for cmd in kube-apiserver kubectl; do
        (cd "$mod" && go build -ldflags "-s -w $ver" -o "$out/$cmd" "k8s.io/kubernetes/cmd/$cmd")
    done
}

build_etcd() {
    local out="$1" mod="$1/src"
    mkdir -p "$mod"
    cat >"$mod/go.mod" <<GO
module konnectivity-rs.test/etcdbuild

go 1.25

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
GO
    cat >"$mod/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
    (cd "$mod" && go mod tidy && go build -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)
}

build_kwok() {
    GOBIN="$1" go install -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@${KWOK_VERSION}"
    # Its lifecycle stages and resource metrics ship in its module; kwok's
    # --config takes the YAML files themselves.
    local src
    src=$(cd "$1" && go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    mkdir -p "$1/kwok-config"
    cp "$src"/kustomize/stage/node/fast/node-initialize.yaml \
        "$src"/kustomize/stage/pod/fast/pod-ready.yaml \
        "$src"/kustomize/stage/pod/fast/pod-delete.yaml \
        "$src"/kustomize/metrics/resource/metrics-resource.yaml \
        "$src"/kustomize/metrics/usage/usage-from-annotation.yaml "$1/kwok-config/"
    chmod u+w "$1"/kwok-config/*
}

build_metrics-server() {
    GOBIN="$1" go install -ldflags "-s -w" "sigs.k8s.io/metrics-server/cmd/metrics-server@${METRICS_SERVER_VERSION}"
}

# The upstream proxy server and agent, at the version tests/interop pins.
KNP_VERSION=$(cd "$here/../interop" && go list -m -f '{{.Version}}' sigs.k8s.io/apiserver-network-proxy)
build_konnectivity() {
    (cd "$here/../interop" &&
        go build -o "$1/upstream-server" sigs.k8s.io/apiserver-network-proxy/cmd/server &&
        go build -o "$1/upstream-agent" sigs.k8s.io/apiserver-network-proxy/cmd/agent)
}

kube=$(component kube "$KUBE_VERSION")
etcd=$(component etcd "$ETCD_VERSION")
kwok=$(component kwok "$KWOK_VERSION")
ms=$(component metrics-server "$METRICS_SERVER_VERSION")
knp=$(component konnectivity "$KNP_VERSION")

bin="$cache/bin/kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_ms-${METRICS_SERVER_VERSION}_knp-${KNP_VERSION}"
mkdir -p "$bin"
for f in "$kube/kube-apiserver" "$kube/kubectl" "$etcd/etcd" "$kwok/kwok" "$kwok/kwok-config" \
    "$ms/metrics-server" "$knp/upstream-server" "$knp/upstream-agent"; do
    ln -sfn "$f" "$bin/$(basename "$f")"
done
echo "$bin"
