#!/usr/bin/env bash
# Multichannel test bed: two network namespaces joined by 4 veth pairs, each
# pair its own subnet, each link shaped to 1 Gbit/s in both directions.
#
#   ci/netns-testbed.sh up      create (or repair: idempotent) the test bed
#   ci/netns-testbed.sh down    remove it (idempotent)
#   ci/netns-testbed.sh status  show addresses and qdiscs
#
#   namespace ferry-src: fsrc0..fsrc3 = 10.200.0.1/24 .. 10.200.3.1/24
#   namespace ferry-dst: fdst0..fdst3 = 10.200.0.2/24 .. 10.200.3.2/24
#
# FERRY_TESTBED_SRC / FERRY_TESTBED_DST name the namespaces instead (a second
# bed beside the first, e.g. for the QEMU tests); FERRY_TESTBED_LINKS and
# FERRY_TESTBED_RATE change the number of links (4) and their rate (1gbit).
#
# A bed belongs to one process at a time: whoever uses it holds an flock on
# /run/ferry-netns-NS.lock for each of its namespaces NS (taken in name
# order), and a second user waits (saying so) instead of tearing the bed down
# under the first. `up` takes the locks for the process that called it (a
# benchmark script): a background `tail --pid` holds them until `down` or
# until that process ends, however it ends. `down` by a process that does not
# hold the bed leaves a bed another process holds up (and says so). The Rust
# tests (tests/src/netns.rs) take the locks themselves and set
# FERRY_TESTBED_LOCKED=1 when they call this script.
#
# Every link: tc qdisc replace dev X root tbf rate 1gbit burst 256kb latency 10ms
# on both ends. Needs root. Touches nothing outside the two namespaces it
# creates (the veths live only inside them). Run ferry in them with
#   ip netns exec ferry-dst ferry listen ...
#   ip netns exec ferry-src ferry send --to 10.200.0.2 ...
set -euo pipefail
SRC=${FERRY_TESTBED_SRC:-ferry-src}
DST=${FERRY_TESTBED_DST:-ferry-dst}
LINKS=${FERRY_TESTBED_LINKS:-4}
RATE=${FERRY_TESTBED_RATE:-1gbit}

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "netns-testbed.sh: needs root (network namespaces, tc)" >&2
        exit 1
    fi
}

has_ns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

# ---- locks (see the header)
lock_file() { echo "/run/ferry-netns-$1.lock"; }
if [[ "$SRC" < "$DST" ]]; then FIRST=$SRC SECOND=$DST; else FIRST=$DST SECOND=$SRC; fi
# "HOLDER_PID OWNER_PID" of the process holding the locks for a caller.
HOLDER_FILE=/run/ferry-netns-$SRC+$DST.holder
OWNER=$PPID
locked_by_caller() { [ "${FERRY_TESTBED_LOCKED:-0}" = 1 ]; }

# The pid of the process holding this bed's locks for our caller, if alive
# (the caller is our parent, or we are it: a shell may exec its last command).
our_holder() {
    local h o
    read -r h o 2>/dev/null < "$HOLDER_FILE" || return 1
    { [ "$o" = "$OWNER" ] || [ "$o" = "$$" ]; } && kill -0 "$h" 2>/dev/null && echo "$h"
}

# Takes the bed's locks for our caller (unless it holds them already).
hold() {
    locked_by_caller && return 0
    our_holder > /dev/null && return 0
    local ready holder said=0 i=0
    ready=$(mktemp -u /run/ferry-netns-ready.XXXXXX)
    (
        exec 8> "$(lock_file "$FIRST")" 9> "$(lock_file "$SECOND")"
        flock 8
        flock 9
        : > "$ready"
        exec tail --pid="$OWNER" -f /dev/null
    ) < /dev/null > /dev/null 2>&1 &
    holder=$!
    until [ -e "$ready" ]; do
        kill -0 "$holder" 2> /dev/null || { echo "netns-testbed.sh: could not take $(lock_file "$FIRST")" >&2; exit 1; }
        i=$((i + 1))
        if [ "$said" = 0 ] && [ "$i" -ge 5 ]; then
            echo "netns-testbed.sh: $SRC/$DST in use by another process (it holds $(lock_file "$FIRST") or $(lock_file "$SECOND")): waiting" >&2
            said=1
        fi
        sleep 0.1
    done
    rm -f "$ready"
    echo "$holder $OWNER" > "$HOLDER_FILE"
}

up() {
    need_root
    hold
    for ns in "$SRC" "$DST"; do
        has_ns "$ns" || ip netns add "$ns"
        ip -n "$ns" link set lo up
    done
    for i in $(seq 0 $((LINKS - 1))); do
        local s=fsrc$i d=fdst$i
        if ! ip -n "$SRC" link show "$s" >/dev/null 2>&1; then
            # A half-made pair (one end only) from an interrupted run: drop it.
            ip -n "$DST" link del "$d" 2>/dev/null || true
            # Created inside the source namespace, peer moved into the destination's:
            # no interface ever appears in the host's namespace.
            ip -n "$SRC" link add "$s" type veth peer name "$d" netns "$DST"
        fi
        ip -n "$SRC" addr replace "10.200.$i.1/24" dev "$s"
        ip -n "$DST" addr replace "10.200.$i.2/24" dev "$d"
        ip -n "$SRC" link set "$s" up
        ip -n "$DST" link set "$d" up
        ip netns exec "$SRC" tc qdisc replace dev "$s" root tbf rate "$RATE" burst 256kb latency 10ms
        ip netns exec "$DST" tc qdisc replace dev "$d" root tbf rate "$RATE" burst 256kb latency 10ms
    done
    # Wait until every link has carrier on both ends (veth carrier comes up
    # asynchronously; IPv4 needs no duplicate address detection).
    local ok=0
    for _ in $(seq 50); do
        ok=1
        for i in $(seq 0 $((LINKS - 1))); do
            ip -n "$SRC" link show "fsrc$i" | grep -q 'LOWER_UP' || ok=0
            ip -n "$DST" link show "fdst$i" | grep -q 'LOWER_UP' || ok=0
        done
        [ "$ok" = 1 ] && break
        sleep 0.1
    done
    [ "$ok" = 1 ] || { echo "netns-testbed.sh: links did not come up" >&2; exit 1; }
    echo "netns test bed up: $SRC <-> $DST over $LINKS links of $RATE (10.200.0-$((LINKS - 1)).0/24)"
}

down() {
    need_root
    local holder=""
    if ! locked_by_caller; then
        if ! holder=$(our_holder); then
            # Not ours: tear it down only if nobody holds it (holding the
            # locks meanwhile).
            local rc=0
            flock -n -E 75 "$(lock_file "$FIRST")" flock -n -E 75 "$(lock_file "$SECOND")" \
                env FERRY_TESTBED_LOCKED=1 bash "$0" down || rc=$?
            if [ "$rc" = 75 ]; then
                echo "netns-testbed.sh: $SRC/$DST in use by another process (it holds $(lock_file "$FIRST") or $(lock_file "$SECOND")): left up" >&2
                return 0
            fi
            return "$rc"
        fi
    fi
    for ns in "$SRC" "$DST"; do
        if has_ns "$ns"; then
            # Kill what still runs inside (a test that died mid-way), then the namespace.
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
            ip netns del "$ns"
        fi
    done
    if [ -n "$holder" ]; then
        kill "$holder" 2> /dev/null || true
        rm -f "$HOLDER_FILE"
    fi
    echo "netns test bed down"
}

status() {
    for ns in "$SRC" "$DST"; do
        echo "== $ns"
        if has_ns "$ns"; then
            ip -n "$ns" -br addr
            ip netns exec "$ns" tc qdisc show | grep tbf || true
        else
            echo "(absent)"
        fi
    done
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
