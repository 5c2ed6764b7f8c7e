#!/usr/bin/env bash
# Throughput on soft-RoCE, same boot, same device pair: perftest's
# ib_write_bw versus Ferry's rdma_selftest (one pair), then rdma_selftest
# over both pairs. Prints the figures and the ratio. Emulated soft-RoCE is
# slow (5-40 MB/s); the ratio is what counts.
#
#   ci/softroce/bench.sh [--mib N] [--out DIR]
#
# ib_write_bw runs without -R (rdma_cm may pick another device by route):
# the device is pinned with -d rxe0 and the IPv4 GID with -x 1; its TCP
# handshake goes to the peer's NIC0 address. Both tools move MIB MiB in
# 256 KiB writes. perftest reports MB/sec in MiB (2^20 bytes) per second.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MIB=64
OUT=${TMPDIR:-/tmp}/ferry-softroce-bench
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "bench.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cd "$ROOT"
cargo build -p ferry-ffi --features rdma --release --example rdma_selftest
SELFTEST=$CARGO_TARGET_DIR/release/examples/rdma_selftest
command -v ib_write_bw >/dev/null || { echo "bench.sh: ib_write_bw missing: run ci/softroce/install.sh" >&2; exit 1; }
ITERS=$((MIB * 4))
mkdir -p "$OUT"
GUEST=$OUT/guest-bench.sh
cat > "$GUEST" <<GUEST_EOF
#!/bin/bash
set -eu
IBW="ib_write_bw -d rxe0 -x 1 -s 262144 -n $ITERS -F"
if [ "\$ROLE" = A ]; then
    timeout 120 \$IBW
    "$SELFTEST" server --pair \$NIC0_ADDR:\$PEER0_ADDR --mib $MIB
    "$SELFTEST" server --pair \$NIC0_ADDR:\$PEER0_ADDR --pair \$NIC1_ADDR:\$PEER1_ADDR --mib $MIB
else
    for i in \$(seq 1 60); do
        if timeout 120 \$IBW \$PEER0_ADDR > "\$OUT/ibw.txt" 2>&1; then break; fi
        sleep 1
    done
    cat "\$OUT/ibw.txt"
    echo "IBW_MIBPS \$(awk '\$1 == 262144 { print \$4 }' "\$OUT/ibw.txt")"
    sleep 2
    "$SELFTEST" client --pair \$NIC0_ADDR:\$PEER0_ADDR --mib $MIB
    sleep 2
    "$SELFTEST" client --pair \$NIC0_ADDR:\$PEER0_ADDR --pair \$NIC1_ADDR:\$PEER1_ADDR --mib $MIB
fi
GUEST_EOF
chmod +x "$GUEST"
rc=0
bash "$HERE/vm.sh" --timeout 540 --out "$OUT/run" -- bash "$GUEST" || rc=1
LOG=$OUT/run/guest-B.log
ibw=$(sed -n 's/^IBW_MIBPS //p' "$LOG" | tail -1)
one=$(grep 'RESULT selftest pairs=1 ' "$LOG" | sed -n 's/.*sum_of_pair_MiBps=\([0-9.]*\).*/\1/p' | tail -1)
two=$(grep 'RESULT selftest pairs=2 ' "$LOG" | sed -n 's/.*sum_of_pair_MiBps=\([0-9.]*\).*/\1/p' | tail -1)
echo "== soft-RoCE bench ($MIB MiB per pair, 256 KiB writes) =="
echo "ib_write_bw rxe0<->rxe0 (1 pair):      ${ibw:-?} MiB/s"
echo "ferry rdma_selftest (1 pair):          ${one:-?} MiB/s"
echo "ferry rdma_selftest (2 pairs, summed): ${two:-?} MiB/s"
if [ -n "$ibw" ] && [ -n "$one" ] && [ -n "$two" ]; then
    python3 -c "print('ratio ferry/ib_write_bw (1 pair): %.2f; 2 pairs / 1 pair: %.2f' % ($one / $ibw, $two / $one))"
else
    rc=1
fi
exit $rc
