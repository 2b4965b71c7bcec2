#!/usr/bin/env bash
# Builds the real control-plane components the cluster suite runs, from the Go
# module registry, pinned, into a version-stamped cache directory outside the
# repository. A rerun with a warm cache builds nothing.
#
#   KUBE_E2E_CACHE  cache root (default: ~/.cache/konnectivity-rs)
#
# Prints the bin directory on the last line of stdout.
set -euo pipefail

KUBE_VERSION=v1.36.4          # kube-apiserver, kubectl (k8s.io/kubernetes)
STAGING_VERSION=v0.36.4       # every k8s.io staging module at the matching patch
ETCD_VERSION=v3.6.14          # go.etcd.io/etcd/server/v3
KWOK_VERSION=v0.8.0           # sigs.k8s.io/kwok (kubelet API)
METRICS_SERVER_VERSION=v0.9.0 # sigs.k8s.io/metrics-server

stamp="kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_kwok-${KWOK_VERSION}_ms-${METRICS_SERVER_VERSION}"
root="${KUBE_E2E_CACHE:-${HOME}/.cache/konnectivity-rs}/cluster-${stamp}"
bin="$root/bin"
mkdir -p "$bin"

export GOTOOLCHAIN=local GOWORK=off CGO_ENABLED=0 GOFLAGS=-trimpath
log() { echo "[cluster build] $*" >&2; }
timed() { local t0=$SECONDS; "$@"; log "  done in $((SECONDS - t0)) s"; }

build_kube() {
    local mod="$root/src/kube"
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
    local ver="-X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
    local major minor
    major=$(echo "$KUBE_VERSION" | sed 's/^v\([0-9]*\)\..*/\1/')
    minor=$(echo "$KUBE_VERSION" | sed 's/^v[0-9]*\.\([0-9]*\)\..*/\1/')
    ver="$ver -X k8s.io/component-base/version.gitMajor=$major -X k8s.io/component-base/version.gitMinor=$minor"
    ver="$ver -X k8s.io/client-go/pkg/version.gitVersion=${KUBE_VERSION}"
    ver="$ver -X k8s.io/client-go/pkg/version.gitMajor=$major -X k8s.io/client-go/pkg/version.gitMinor=$minor"
    (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true)
    (cd "$mod" && go mod download)
    for cmd in kube-apiserver kubectl; do
        if [ ! -x "$bin/$cmd" ]; then
            log "building $cmd ${KUBE_VERSION}"
            (cd "$mod" && timed go build -ldflags "-s -w $ver" -o "$bin/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
            mv "$bin/$cmd.tmp" "$bin/$cmd"
        fi
    done
}

build_etcd() {
    local mod="$root/src/etcd"
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
    (cd "$mod" && go mod tidy)
    log "building etcd ${ETCD_VERSION}"
    (cd "$mod" && timed go build -ldflags "-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3)
    mv "$bin/etcd.tmp" "$bin/etcd"
}

install_go() { # name package version
    log "building $1 $3"
    local gobin="$root/gobin"
    mkdir -p "$gobin"
    GOBIN="$gobin" timed go install -ldflags "-s -w" "$2@$3"
    mv "$gobin/$1" "$bin/$1"
}

[ -x "$bin/kube-apiserver" ] && [ -x "$bin/kubectl" ] || build_kube
[ -x "$bin/etcd" ] || build_etcd
[ -x "$bin/kwok" ] || install_go kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_VERSION"
[ -x "$bin/metrics-server" ] || install_go metrics-server sigs.k8s.io/metrics-server/cmd/metrics-server "$METRICS_SERVER_VERSION"

# kwok's lifecycle stages and resource metrics ship in its module; kwok's
# --config takes the YAML files themselves.
stages="$root/kwok-config"
if [ ! -d "$stages" ]; then
    kwok_dir=$(cd "$root/src/etcd" && go mod download -json "sigs.k8s.io/kwok@${KWOK_VERSION}" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    mkdir -p "$stages.tmp"
    cp "$kwok_dir"/kustomize/stage/node/fast/node-initialize.yaml \
        "$kwok_dir"/kustomize/stage/pod/fast/pod-ready.yaml \
        "$kwok_dir"/kustomize/stage/pod/fast/pod-delete.yaml \
        "$kwok_dir"/kustomize/metrics/resource/metrics-resource.yaml \
        "$kwok_dir"/kustomize/metrics/usage/usage-from-annotation.yaml "$stages.tmp/"
    chmod u+w "$stages.tmp"/*
    mv "$stages.tmp" "$stages"
fi
# The upstream proxy server and agent, at the version tests/interop pins.
interop="$(cd "$(dirname "$0")/../interop" && pwd)"
knp=$(cd "$interop" && go list -m -f '{{.Version}}' sigs.k8s.io/apiserver-network-proxy)
if [ "$(cat "$bin/upstream.version" 2>/dev/null)" != "$knp" ]; then
    log "building upstream konnectivity $knp"
    (cd "$interop" && timed go build -o "$bin/upstream-server" sigs.k8s.io/apiserver-network-proxy/cmd/server \
        && go build -o "$bin/upstream-agent" sigs.k8s.io/apiserver-network-proxy/cmd/agent)
    echo "$knp" >"$bin/upstream.version"
fi
echo "$bin"
