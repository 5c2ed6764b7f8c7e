#!/usr/bin/env bash
# Ferry's test command (the README's): installs what the tests need when it
# is missing, then lint, fuzz smoke runs, the soft-RoCE RDMA suite in two
# emulated VMs, a short soak (ci/soak.sh), and every Rust test. Ends with
# "tests: N passed, N failed".
#
#   FERRY_SKIP_SOFTROCE=1  skip the VM suite (it needs ~5 minutes)
#   FERRY_SKIP_FUZZ=1      skip the fuzz build and runs
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
step() { printf '\n== %s (%s)\n' "$*" "$(date +%T)"; }

step "install: apt packages and virtme-ng when missing"
# cmake, libclang (sideway's build), qemu, a Debian kernel and rdma-core for
# the soft-RoCE VMs, iproute2 for namespace tests.
bash ci/softroce/install.sh

step "format"
cargo fmt --all -- --check

step "clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy -p ferry-ffi --features rdma --all-targets --locked -- -D warnings

if [ "${FERRY_SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz targets"
    bash ci/fuzz.sh
fi

if [ "${FERRY_SKIP_SOFTROCE:-0}" != 1 ]; then
    step "soft-RoCE: RDMA tests and selftest in emulated VMs"
    bash ci/softroce/selftest.sh
fi

step "soak (short): 4 back-to-back migrations between two daemons"
# The full soak (50 runs of a 256 MiB guest): bash ci/soak.sh
SOAK_RUNS=4 SOAK_MEMORY=128MiB SOAK_PROFILE=debug bash ci/soak.sh

step "cargo test"
# CI runs as root: there the multichannel namespace tests must run, not skip.
if [ "$(id -u)" = 0 ]; then export FERRY_REQUIRE_NETNS=${FERRY_REQUIRE_NETNS:-1}; fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
{ cargo test --workspace --locked && cargo test -p ferry-ffi --features rdma --locked; } 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
read -r passed failed < <(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } } END { print p + 0, f + 0 }' "$log")
echo
echo "tests: $passed passed, $failed failed"
exit "$rc"
