#!/usr/bin/env bash
# Builds the cargo-fuzz targets and runs each briefly (FUZZ_SECONDS, default 20).
# cargo-fuzz needs nightly-only compiler flags (sanitizers); RUSTC_BOOTSTRAP=1
# lets the machine's stable toolchain accept them, as no nightly can be fetched here.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
cargo fuzz build
for t in frame handshake offer session; do
    echo "fuzz: $t for ${FUZZ_SECONDS:-20}s"
    cargo fuzz run "$t" -- -max_total_time="${FUZZ_SECONDS:-20}" -rss_limit_mb=2048 2>&1 | tail -n 2
done
