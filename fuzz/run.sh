#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 20; the note's long runs
# used 600), starting from the seed corpora in seeds/. Needs the nightly
# toolchain; installs cargo-fuzz from crates.io if it is missing. A crash, a
# panic, a leak or more than 1 GiB of memory fails the run, and the input that
# did it is left in artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs="${1:-20}"
targets="${FUZZ_TARGETS:-grpc_packets connect_request authority identifiers table link h2watch}"

if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    # CI sets KNP_REQUIRE_FUZZ=1: there a missing toolchain fails the run.
    if [ "${KNP_REQUIRE_FUZZ:-0}" = 1 ]; then
        echo "fuzz: no nightly toolchain, and KNP_REQUIRE_FUZZ=1" >&2
        exit 1
    fi
    echo "SKIP fuzz: no nightly toolchain (rustup toolchain install nightly)"
    exit 0
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --version 0.13.2 --locked -q
fi

echo "== cargo fuzz build"
cargo +nightly fuzz build
failed=""
for t in $targets; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    echo "== fuzz $t for ${secs}s"
    if cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        grep -E '^(Done|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" | paste -sd' ' -
    else
        failed="$failed $t"
        tail -n 60 "$log"
    fi
    rm -f "$log"
done
if [ -n "$failed" ]; then
    echo "fuzz: crash in:$failed (inputs in fuzz/artifacts/)" >&2
    exit 1
fi
echo "fuzz: $(echo $targets | wc -w) targets, ${secs}s each, no crash"
