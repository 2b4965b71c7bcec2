#!/usr/bin/env bash
# Interop tests against the konnectivity-client v0.37.1 library (reusable
# tunnel: many Proxy streams on one HTTP/2 connection over the Unix socket).
# Needs our binaries built (cargo build --workspace --bins) and the Go
# toolchain; Go modules come from the module registry on first run.
# INTEROP_LOGS=1 echoes our binaries' logs; INTEROP_V=N passes --v=N to them.
set -euo pipefail
cd "$(dirname "$0")"
target_dir="${CARGO_TARGET_DIR:-$(cd ../../.. && pwd)/target}"
export KNP_BIN_DIR="${KNP_BIN_DIR:-$target_dir/debug}"
export GOWORK=off
echo "== konnectivity-client v0.37.1 against our proxy-server and proxy-agent in $KNP_BIN_DIR"
go test -count=1 -timeout 10m -v ./... "$@"
