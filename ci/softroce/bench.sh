#!/usr/bin/env bash
# Throughput on soft-RoCE, same boot, same device pair: perftest's
# ib_write_bw versus Ferry's rdma_selftest (one pair), rdma_selftest over
# both pairs, then a real `ferry` RDMA migration on one pair (rxe1 removed
# on the source, so only rxe0 pairs) and on both pairs. Prints the figures
# and the ratios. Emulated soft-RoCE is slow (5-40 MB/s); the ratio is what
# counts.
#
# Ferry's figure is its round 0: every page of an idle guest of MIB MiB per
# pair, all non-zero (--zero-fraction 0, --dirty-rate 0), page bytes over
# the round's wall time (acks included), in MiB/s.
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
cargo build --release -p ferry-cli --bin ferry
SELFTEST=$CARGO_TARGET_DIR/release/examples/rdma_selftest
FERRY=$CARGO_TARGET_DIR/release/ferry
command -v ib_write_bw >/dev/null || { echo "bench.sh: ib_write_bw missing: run ci/softroce/install.sh" >&2; exit 1; }
ITERS=$((MIB * 4))
mkdir -p "$OUT/run"
rm -f "$OUT/run/key"; "$FERRY" gen-key "$OUT/run/key" > /dev/null # the guests see $OUT/run as their OUT
rm -f "$OUT"/run/ferry-*.json "$OUT"/run/ferry-ready-*
GUEST=$OUT/guest-bench.sh
cat > "$GUEST" <<GUEST_EOF
#!/bin/bash
set -eu
IBW="ib_write_bw -d rxe0 -x 1 -s 262144 -n $ITERS -F"
if [ "\$ROLE" = A ]; then
    timeout 120 \$IBW
    "$SELFTEST" server --pair \$NIC0_ADDR:\$PEER0_ADDR --mib $MIB
    "$SELFTEST" server --pair \$NIC0_ADDR:\$PEER0_ADDR --pair \$NIC1_ADDR:\$PEER1_ADDR --mib $MIB
    for n in 1 2; do
        "$FERRY" listen --listen \$NIC0_ADDR:6600 --auth-key-file "\$OUT/key" --plaintext --once &
        sleep 1; touch "\$OUT/ferry-ready-\$n"; wait
    done
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
    IF1=\$(ip -o addr show | awk -v a="\$NIC1_ADDR" '\$4 ~ "^"a"/" { print \$2 }')
    for n in 1 2; do
        if [ \$n = 1 ]; then rdma link delete rxe1; else rdma link add rxe1 type rxe netdev "\$IF1"; fi
        for i in \$(seq 1 100); do [ -e "\$OUT/ferry-ready-\$n" ] && break; sleep 0.3; done
        "$FERRY" send --to \$PEER0_ADDR:6600 --auth-key-file "\$OUT/key" --plaintext --performance-option rdma \
            --memory \$(( $MIB * n ))MiB --dirty-rate 0 --zero-fraction 0 --max-rounds 1 --force-switchover \
            --json "\$OUT/ferry-\$n.json"
    done
fi
GUEST_EOF
chmod +x "$GUEST"
rc=0
bash "$HERE/vm.sh" --timeout 540 --out "$OUT/run" -- bash "$GUEST" || rc=1
LOG=$OUT/run/guest-B.log
ibw=$(sed -n 's/^IBW_MIBPS //p' "$LOG" | tail -1)
one=$(grep 'RESULT selftest pairs=1 ' "$LOG" | sed -n 's/.*sum_of_pair_MiBps=\([0-9.]*\).*/\1/p' | tail -1)
two=$(grep 'RESULT selftest pairs=2 ' "$LOG" | sed -n 's/.*sum_of_pair_MiBps=\([0-9.]*\).*/\1/p' | tail -1)
round0() { python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rounds'][0]; print('%.2f' % (r['bytes'] / 2**20 / (r['duration_ms'] / 1e3)))" "$1" 2>/dev/null; }
f1=$(round0 "$OUT/run/ferry-1.json")
f2=$(round0 "$OUT/run/ferry-2.json")
echo "== soft-RoCE bench ($MIB MiB per pair, 256 KiB writes) =="
echo "ib_write_bw rxe0<->rxe0 (1 pair):      ${ibw:-?} MiB/s"
echo "ferry rdma_selftest (1 pair):          ${one:-?} MiB/s"
echo "ferry rdma_selftest (2 pairs, summed): ${two:-?} MiB/s"
echo "ferry migration, rdma, 1 pair:         ${f1:-?} MiB/s (round 0, $MIB MiB)"
echo "ferry migration, rdma, 2 pairs:        ${f2:-?} MiB/s (round 0, $((MIB * 2)) MiB)"
if [ -n "$ibw" ] && [ -n "$f1" ] && [ -n "$f2" ]; then
    python3 -c "print('ratio ferry migration/ib_write_bw (1 pair): %.2f; ferry migration 2 pairs / 1 pair: %.2f' % ($f1 / $ibw, $f2 / $f1))"
else
    rc=1
fi
if [ -n "$ibw" ] && [ -n "$one" ] && [ -n "$two" ]; then
    python3 -c "print('ratio ferry/ib_write_bw (1 pair): %.2f; 2 pairs / 1 pair: %.2f' % ($one / $ibw, $two / $one))"
else
    rc=1
fi
exit $rc
