#!/usr/bin/env bash
# Interop suite against the upstream Go implementation pinned in go.mod
# (sigs.k8s.io/apiserver-network-proxy v0.36.0). Needs our binaries built
# (cargo build --workspace --bins) and the Go toolchain; Go modules come from
# the module registry on first run.
set -euo pipefail
cd "$(dirname "$0")"
target_dir="${CARGO_TARGET_DIR:-$(cd ../.. && pwd)/target}"
bin_dir="${KNP_BIN_DIR:-$target_dir/debug}"
export KNP_BIN_DIR="$bin_dir"

echo "== our pairings with the upstream client, agent and server"
go test -count=1 -timeout 20m ./...

# The newer client library (reusable tunnel), in a module of its own since it
# needs a newer grpc than the pinned upstream server.
bash client037/run.sh | grep -E '^(--- |ok|FAIL|panic)|_test.go:[0-9]+:'

# The upstream integration suite, run against our agent binary. Skipped, with
# the reason in the README: tests that need traffic to addresses outside this
# machine (a blackholed 198.18.0.254 and a public DNS lookup).
skip='TestProxyDial_RequestCancelled_GRPC$|TestProxyDial_AgentTimeout_GRPC$|TestFailedDNSLookupProxy_HTTPCONN$'
echo "== upstream suite sigs.k8s.io/apiserver-network-proxy/tests with -agent-path=$bin_dir/proxy-agent"
log=$(mktemp)
status=0
go test -count=1 -timeout 20m -v -skip "$skip" sigs.k8s.io/apiserver-network-proxy/tests \
    -args -agent-path="$bin_dir/proxy-agent" >"$log" 2>&1 || status=$?
grep -E '^(--- |ok|FAIL|panic)|_test.go:[0-9]+:' "$log" || true
if [ "$status" -ne 0 ]; then
    # Some upstream tests race inside the Go client. TestProxyHandle_TunnelContextCancelled_GRPC
    # cancels one context that both closes the tunnel (the request's read sees
    # EOF) and cancels the request (it should see "context canceled"); which
    # one net/http reports first depends on goroutine scheduling. Measured here
    # on 2 cores, 30 runs each: 3 of 30 failed with our agent (twice), 0 of 30
    # with the upstream in-process agent (1 of 20 in an earlier run). A failed
    # test gets up to three more runs; a test that fails all four fails the suite.
    failed=$(grep -E '^--- FAIL: ' "$log" | awk '{print $3}' | sort -u | paste -sd'|' -)
    for attempt in 2 3 4; do
        [ -n "$failed" ] || break
        echo "run $attempt of: $failed"
        status=0
        go test -count=1 -timeout 10m -v -run "^(${failed})\$" sigs.k8s.io/apiserver-network-proxy/tests \
            -args -agent-path="$bin_dir/proxy-agent" >"$log" 2>&1 || status=$?
        grep -E '^(--- |ok|FAIL|panic)|_test.go:[0-9]+:' "$log" || true
        [ "$status" -ne 0 ] || break
        failed=$(grep -E '^--- FAIL: ' "$log" | awk '{print $3}' | sort -u | paste -sd'|' -)
    done
    if [ "$status" -ne 0 ]; then
        echo "upstream suite failed (exit $status); log follows" >&2
        tail -n 300 "$log" >&2
    fi
fi
rm -f "$log"
exit "$status"
