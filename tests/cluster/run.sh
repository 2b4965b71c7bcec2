#!/usr/bin/env bash
# The real-cluster suite: builds (or reuses from the cache) kube-apiserver,
# kubectl, etcd, kwok, metrics-server and the upstream proxy, then runs every
# case in every egress mode and pairing. Needs root (network namespaces) and
# our binaries (cargo build --workspace --bins).
#
#   KUBE_E2E_SETUPS  run only setups whose name contains one of these
#                    comma-separated strings (e.g. "server=ours agent=ours")
set -euo pipefail
cd "$(dirname "$0")/../.."
t0=$SECONDS
bin=$(bash tests/cluster/build.sh | tail -n 1)
echo "== cluster components ready in $((SECONDS - t0)) s: $bin"
export KUBE_E2E_BIN="$bin" KUBE_E2E_REQUIRED=1
t1=$SECONDS
status=0
cargo test -q -p tests --test cluster || status=$?
echo "== cluster suite took $((SECONDS - t1)) s"
exit "$status"
