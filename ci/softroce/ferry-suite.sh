#!/usr/bin/env bash
# Ferry's RDMA performance option end to end on soft-RoCE: builds `ferry`
# (release) on the host, then in ONE boot of two VMs with two rxe NICs each:
#   1. commit: `ferry listen --once` in A, `ferry send --performance-option
#      rdma` in B over both NIC pairs; fails unless it commits with the digest
#      verified (both sides say so). Meanwhile an intruder in B sends
#      connection requests to A's RDMA listener without the migration's token
#      (none, and a forged one): each must be refused (rejected, no queue
#      pair) and the migration must still commit; A must say it revoked
#      remote write access (when the channels ended, or at the switchover);
#   2. failover: the same while B takes its NIC 1 down mid-migration; must
#      still commit (the failed pair's chunks resent on NIC 0);
#   3. abort: A's destination is killed mid-migration; the source must exit
#      non-zero and say its guest keeps running;
#   4. destination stopped: A's daemon gets SIGTERM mid-migration; it aborts
#      the migration and says why, and the source must end with that reason
#      at once (reason peer_aborted), not when its RDMA channels time out;
#   5. source killed: B's source is killed mid-migration; A's migration must
#      fail and end (its RDMA receive task stopped and awaited, remote write
#      access revoked) so that `listen --once` exits with the failure.
# Exits 0 only if all five hold. Emulated soft-RoCE moved Ferry's pages at
# about 2 MiB/s here, so each case is kept short: 64 MiB, few rounds.
#
#   ci/softroce/ferry-suite.sh [--mib N] [--out DIR]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MIB=64
OUT=${TMPDIR:-/tmp}/ferry-softroce-suite
while [ $# -gt 0 ]; do
    case "$1" in
        --mib) MIB=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        *) echo "ferry-suite.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
cd "$ROOT"
echo "== build ferry and the rdma probe (release, host, feature rdma) =="
cargo build --release -p ferry-cli --bin ferry
cargo build -p ferry-ffi --features rdma --release --example rdma_selftest
FERRY=$CARGO_TARGET_DIR/release/ferry
PROBE=$CARGO_TARGET_DIR/release/examples/rdma_selftest
[ -x "$FERRY" ] || { echo "ferry-suite.sh: $FERRY not built" >&2; exit 1; }
[ -x "$PROBE" ] || { echo "ferry-suite.sh: $PROBE not built" >&2; exit 1; }
mkdir -p "$OUT"
rm -f "$OUT/key"; "$FERRY" gen-key "$OUT/key" > /dev/null
GUEST=$OUT/guest-suite.sh
# A: destination; B: source. They step through the cases in lock step: B
# waits for A's "ready-N" file (A listens), A waits for B's "done-N".
cat > "$GUEST" <<GUEST_EOF
#!/bin/bash
set -u
F="$FERRY"
PROBE="$PROBE"
KEY="$OUT/key"
# --plaintext on both ends: consent to RDMA's unencrypted data channels.
COMMON="--auth-key-file \$KEY --peer-timeout 20s --plaintext"
wait_for() { for i in \$(seq 1 600); do [ -e "\$OUT/\$1" ] && return 0; sleep 0.2; done; echo "timeout waiting for \$1"; return 1; }
wait_for_line() { for i in \$(seq 1 600); do grep -q "\$2" "\$1" 2>/dev/null && return 0; sleep 0.2; done; echo "timeout waiting for \$2 in \$1"; return 1; }
send() { # case, extra args...
    local c=\$1; shift
    wait_for ready-\$c || return 1
    for i in 1 2 3 4 5; do
        "\$F" send --to \$PEER0_ADDR:6600 \$COMMON --memory ${MIB}MiB --dirty-rate \${DIRTY:-1MB/s} --max-rounds \${ROUNDS:-6} --force-switchover \
            --performance-option rdma --json "\$OUT/send-\$c.json" "\$@" > "\$OUT/send-\$c.log" 2>&1
        rc=\$?
        grep -q 'cannot connect' "\$OUT/send-\$c.log" || break
        sleep 1
    done
    cat "\$OUT/send-\$c.log"
    echo "SEND_RC case=\$c rc=\$rc"
    touch "\$OUT/done-\$c"
    return 0
}
listen() { # case
    local c=\$1
    "\$F" listen --listen \$NIC0_ADDR:6600 \$COMMON --once > "\$OUT/listen-\$c.log" 2>&1 &
    LPID=\$!
    sleep 1
    touch "\$OUT/ready-\$c"
}
case "\$ROLE" in
A)
    ulimit -l unlimited
    listen commit
    wait \$LPID; echo "LISTEN_RC case=commit rc=\$?"; cat "\$OUT/listen-commit.log"
    wait_for done-commit
    listen failover
    wait \$LPID; echo "LISTEN_RC case=failover rc=\$?"; cat "\$OUT/listen-failover.log"
    wait_for done-failover
    listen abort
    # Kill the destination once pages are flowing.
    wait_for_line "\$OUT/send-abort.log" "rdma: " && sleep 2
    kill -9 \$LPID; echo "killed destination"
    wait_for done-abort
    listen dstop
    # Stop the daemon once pages are flowing: it aborts the migration.
    wait_for_line "\$OUT/send-dstop.log" "rdma: " && sleep 2
    kill -TERM \$LPID; echo "stopped destination"
    wait \$LPID; echo "LISTEN_RC case=dstop rc=\$?"; cat "\$OUT/listen-dstop.log"
    wait_for done-dstop
    listen srckill
    # B kills its source mid-migration: the migration fails and the daemon
    # (--once) must exit, which it does only once the migration has ended.
    for i in \$(seq 1 450); do kill -0 \$LPID 2>/dev/null || break; sleep 0.2; done
    kill -0 \$LPID 2>/dev/null && { echo "destination still running 90 s after its source was killed"; kill -9 \$LPID; }
    wait \$LPID; echo "LISTEN_RC case=srckill rc=\$?"; cat "\$OUT/listen-srckill.log"
    exit 0 ;;
B)
    ulimit -l unlimited
    # Intruders: once the channels are up, requests to A's first RDMA
    # listener (port 6601) without the token, and with a forged one.
    rm -f "\$OUT/send-commit.log"
    ( wait_for_line "\$OUT/send-commit.log" "rdma: 2 channel" &&
      "\$PROBE" probe --from \$NIC0_ADDR --to \$PEER0_ADDR:6601 --for-s 30 > "\$OUT/probe-none.log" 2>&1;
      echo "PROBE_RC kind=none rc=\$?";
      "\$PROBE" probe --from \$NIC1_ADDR --to \$PEER1_ADDR:6601 --data FRDM-forged-token-0000000000000000000000000000000 --for-s 30 > "\$OUT/probe-forged.log" 2>&1;
      echo "PROBE_RC kind=forged rc=\$?" ) &
    send commit
    wait
    # Failover: NIC 1 goes down a few seconds into the migration.
    IF1=\$(ip -o addr show | awk -v a="\$NIC1_ADDR" '\$4 ~ "^"a"/" { print \$2 }')
    rm -f "\$OUT/send-failover.log"
    ( wait_for_line "\$OUT/send-failover.log" "rdma: 2 channel" && sleep 1; ip link set "\$IF1" down; echo "took \$IF1 down" ) &
    send failover
    wait
    ip link set "\$IF1" up
    sleep 2
    DIRTY=4MB/s ROUNDS=30 send abort --downtime-limit 1ms
    DIRTY=4MB/s ROUNDS=30 send dstop --downtime-limit 1ms
    # Source killed once pages flow over RDMA.
    wait_for ready-srckill || exit 0
    "\$F" send --to \$PEER0_ADDR:6600 \$COMMON --memory ${MIB}MiB --dirty-rate 4MB/s --max-rounds 30 --force-switchover \
        --downtime-limit 1ms --performance-option rdma > "\$OUT/send-srckill.log" 2>&1 &
    SPID=\$!
    wait_for_line "\$OUT/send-srckill.log" "rdma: " && sleep 2
    kill -9 \$SPID; echo "killed source"
    wait \$SPID
    cat "\$OUT/send-srckill.log"
    exit 0 ;;
esac
GUEST_EOF
chmod +x "$GUEST"
rm -f "$OUT"/ready-* "$OUT"/done-* "$OUT"/send-* "$OUT"/listen-*
rc=0
bash "$HERE/vm.sh" --timeout 480 --out "$OUT" -- bash "$GUEST" || rc=1

check() { # description, condition command...
    local what=$1; shift
    if "$@"; then echo "PASS $what"; else echo "FAIL $what"; rc=1; fi
}
committed() { # case
    grep -q "SEND_RC case=$1 rc=0" "$OUT/guest-B.log" &&
        grep -q '"digest_verified": true' "$OUT/send-$1.json" &&
        grep -q "committed: .*digest .* verified" "$OUT/listen-$1.log"
}
echo "== ferry RDMA suite =="
check "rdma migration over both NIC pairs commits, digest verified" committed commit
check "intruder without a token: refused by the RDMA listener" \
    grep -q "PROBE_RC kind=none rc=0" "$OUT/guest-B.log"
check "intruder with a forged token: refused by the RDMA listener" \
    grep -q "PROBE_RC kind=forged rc=0" "$OUT/guest-B.log"
check "destination logged the refusals and still committed" \
    grep -q "refused an RDMA connection request" "$OUT/listen-commit.log"
check "destination revoked remote write access before committing" \
    grep -Eq "RDMA remote write access revoked \((switchover|every channel ended)\)" "$OUT/listen-commit.log"
check "both RDMA channels carried pages" \
    python3 -c "import json,sys; s=json.load(open('$OUT/send-commit.json')); c=s['channels']; sys.exit(0 if len(c)==2 and all(x['payload_bytes']>0 for x in c) else 1)"
check "NIC 1 down mid-migration: fails over, commits, digest verified" committed failover
check "failover: the lost channel was reported failed, its chunks requeued" \
    python3 -c "import json,sys; c=json.load(open('$OUT/send-failover.json'))['channels']; sys.exit(0 if any(x['state']=='failed' and x['requeued_chunks']>0 for x in c) else 1)"
check "destination killed: source exits non-zero" grep -q "SEND_RC case=abort rc=[1-9]" "$OUT/guest-B.log"
check "destination killed: source says its guest keeps running" grep -q "guest keeps running" "$OUT/send-abort.log"
check "destination stopped: the source ends with its reason at once (not at its channel timeout)" \
    bash -c "grep -q 'SEND_RC case=dstop rc=[1-9]' '$OUT/guest-B.log' &&
        grep -q 'the destination aborted: destination shutting down' '$OUT/send-dstop.log' &&
        grep -q '\"reason\": \"peer_aborted\"' '$OUT/send-dstop.json'"
check "source killed: the destination's migration fails, ends and --once exits non-zero" \
    grep -q "LISTEN_RC case=srckill rc=[1-9]" "$OUT/guest-A.log"
check "source killed: the destination says the migration failed and revoked remote write access" \
    bash -c "grep -q 'migration from .* failed' '$OUT/listen-srckill.log' &&
        grep -q 'RDMA remote write access revoked (migration aborted)' '$OUT/listen-srckill.log'"
grep -h "throughput\|MB/s\|rdma:" "$OUT"/send-commit.log 2>/dev/null | head -5 || true
cat "$OUT"/probe-*.log 2>/dev/null || true
grep -h "refused an RDMA\|revoked\|data channel failed" "$OUT"/listen-*.log 2>/dev/null | head -10 || true
if [ "$rc" = 0 ]; then echo "ferry RDMA suite: PASS"; else echo "ferry RDMA suite: FAIL"; fi
exit $rc
