#!/usr/bin/env bash
# Runs INSIDE a soft-RoCE VM started by vm.sh (do not run on the host).
#
# Sets up rdma_rxe on this VM's NICs, exports the addresses, runs the guest
# script given as arguments, and records its exit code in $OUT/result-$ROLE
# (the --rwdir folder shared with the host; /tmp is lost when the VM stops).
#
# Environment (set by vm.sh): ROLE (A, B, or L for the one-VM loopback),
# OUT (results folder), NICS (number of NICs, 2 for A/B).
# Exported to the script: ROLE, OUT, NIC0_ADDR, NIC1_ADDR, PEER0_ADDR,
# PEER1_ADDR (A/B), or LOOP_ADDR (L); RDMA_DEVS (rxe device names).
set -u
log() { echo "[guest $ROLE] $*" | tee -a "$OUT/guest-$ROLE.log" >&2; }
finish() { echo "$1" > "$OUT/result-$ROLE"; log "script exit code $1"; exit 0; }
trap 'finish 99' ERR

export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
modprobe rdma_rxe || { log "modprobe rdma_rxe failed"; finish 90; }
ip link set lo up

if [ "$ROLE" = L ]; then
    ip link add ferry0 type dummy && ip addr add 10.77.20.1/24 dev ferry0 && ip link set ferry0 up
    rdma link add rxe0 type rxe netdev ferry0 || { log "rdma link add failed"; finish 91; }
    export LOOP_ADDR=10.77.20.1 RDMA_DEVS=rxe0
else
    [ "$ROLE" = A ] && me=1 peer=2 || { me=2; peer=1; }
    devs=""
    for n in $(seq 0 $((NICS - 1))); do
        mac="52:54:00:77:0$n:0$me"
        iface=""
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && iface=$(basename "$d")
        done
        [ -n "$iface" ] || { log "no NIC with MAC $mac"; ip -br link >&2; finish 92; }
        ip addr add "10.77.1$n.$me/24" dev "$iface"
        ip link set "$iface" up
        rdma link add "rxe$n" type rxe netdev "$iface" || { log "rdma link add rxe$n on $iface failed"; finish 91; }
        export "NIC${n}_ADDR=10.77.1$n.$me" "PEER${n}_ADDR=10.77.1$n.$peer"
        devs="$devs rxe$n"
        log "NIC $n: $iface 10.77.1$n.$me/24 -> rxe$n"
    done
    export RDMA_DEVS="${devs# }"
fi
ulimit -l unlimited 2>/dev/null || true
export ROLE OUT
log "running: $*"
trap - ERR
"$@" >> "$OUT/guest-$ROLE.log" 2>&1
finish $?
