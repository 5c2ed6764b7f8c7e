#!/usr/bin/env bash
# Real RDMA end to end on soft-RoCE: builds ferry-ffi's rdma_selftest example
# and its unit tests (release) on the host, then
#   1. one VM, loopback on one rxe device: the ffi rdma unit tests for real
#      (FERRY_RDMA_TEST_ADDR set, so no test skips);             [--skip-loopback]
#   2. two VMs, two rxe NICs each: rdma_selftest server in A, client in B,
#      over both device pairs at once (MIB MiB per pair, default 64);
#   3. ferry-suite.sh: real `ferry` migrations over RDMA in two VMs (commit
#      over both NICs, NIC failover, destination killed).
# Exits 0 only if everything verified. Prints the MB/s figures.
#
#   ci/softroce/selftest.sh [--mib N] [--skip-loopback] [--out DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MIB=64
LOOP=1
OUT=${TMPDIR:-/tmp}/ferry-softroce-selftest
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB=$2; shift 2 ;;
        --skip-loopback) LOOP=0; shift ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "selftest.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cd "$ROOT"

echo "== build (release, host) =="
cargo build -p ferry-ffi --features rdma --release --example rdma_selftest
SELFTEST=$CARGO_TARGET_DIR/release/examples/rdma_selftest
UNIT=$(cargo test -p ferry-ffi --features rdma --release --no-run --message-format=json |
    python3 -c 'import sys, json
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "ferry_ffi" and "lib" in m["target"]["kind"]:
        print(m["executable"])' | tail -1)
[ -x "$SELFTEST" ] || { echo "selftest.sh: $SELFTEST not built" >&2; exit 1; }
[ -x "$UNIT" ] || { echo "selftest.sh: ferry-ffi unit test binary not found" >&2; exit 1; }
mkdir -p "$OUT"
GUEST=$OUT/guest-cmds.sh
cat > "$GUEST" <<GUEST_EOF
#!/bin/bash
set -eu
rdma link show
case "\$ROLE" in
  L) FERRY_RDMA_TEST_ADDR=\$LOOP_ADDR "$UNIT" --test-threads=1 rdma > "\$OUT/unit.log" 2>&1 && urc=0 || urc=\$?
     cat "\$OUT/unit.log"
     if grep -q 'SKIPPED RDMA DEVICE TEST' "\$OUT/unit.log"; then echo "a device test skipped inside the VM" >&2; exit 3; fi
     exit \$urc ;;
  A) exec "$SELFTEST" server --pair \$NIC0_ADDR:\$PEER0_ADDR --pair \$NIC1_ADDR:\$PEER1_ADDR --mib $MIB ;;
  B) exec "$SELFTEST" client --pair \$NIC0_ADDR:\$PEER0_ADDR --pair \$NIC1_ADDR:\$PEER1_ADDR --mib $MIB ;;
esac
GUEST_EOF
chmod +x "$GUEST"

rc=0
if [ "$LOOP" = 1 ]; then
    echo "== one VM, rxe loopback: ffi rdma unit tests =="
    bash "$HERE/vm.sh" --one --timeout 240 --out "$OUT/loopback" -- bash "$GUEST" || rc=1
fi
echo "== two VMs, two soft-RoCE pairs: rdma_selftest ${MIB} MiB per pair =="
bash "$HERE/vm.sh" --timeout 420 --out "$OUT/pairs" -- bash "$GUEST" || rc=1
echo "== two VMs: ferry send --performance-option rdma (commit, failover, abort) =="
bash "$HERE/ferry-suite.sh" --out "$OUT/ferry" || rc=1
echo "== figures =="
grep -h 'MB/s\|RESULT\|VERIFIED\|FAILED' "$OUT"/pairs/guest-*.log || true
if [ "$rc" = 0 ]; then echo "softroce selftest: PASS"; else echo "softroce selftest: FAIL"; fi
exit $rc
