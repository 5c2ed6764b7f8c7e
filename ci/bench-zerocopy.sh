#!/usr/bin/env bash
# Benchmark: does MSG_ZEROCOPY pay on the links this machine has? Plain
# send() against send(MSG_ZEROCOPY) of the same bytes, over loopback and over
# a veth pair between two network namespaces (made and removed here), runs
# interleaved (docs/performance.md quotes it).
#
#   ci/bench-zerocopy.sh [--bytes 2GiB] [--repeat 3] [--no-veth]
#
# The sender (ci/zerocopy.c) sends from a 256 MiB buffer it filled once (like
# guest memory: not in cache), 4 MiB per call (Ferry's chunk size); the
# receiver reads into a 1 MiB buffer and drops it. With MSG_ZEROCOPY the
# sender reads the completion notifications from the socket's error queue;
# the kernel marks each completion whose pages it had to copy after all
# (SO_EE_CODE_ZEROCOPY_COPIED), which it does whenever the bytes are
# delivered to a local socket: loopback, and a veth peer on the same host.
# Printed per case: median rate, CPU seconds per GiB of each process, and
# the share of zerocopy sends the kernel copied anyway. Needs root for veth.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BYTES=2GiB
REPEAT=3
VETH=1
while [ $# -gt 0 ]; do
    case "$1" in
        --bytes) BYTES=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --no-veth) VETH=0; shift ;;
        *) echo "bench-zerocopy.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
N=$(python3 -c "
import re
m = re.fullmatch(r'([0-9.]+)\s*([KMGT]?)(i?)B?', '$BYTES')
n, u, i = float(m.group(1)), m.group(2), m.group(3)
print(int(n * (1024 if i or not u else 1000) ** ' KMGT'.index(u or ' ')))")
WORK=$(mktemp -d)
NSA=ferry-zc-a-$$
NSB=ferry-zc-b-$$
cleanup() {
    ip netns del "$NSA" 2>/dev/null || true
    ip netns del "$NSB" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cc -O2 -Wall -o "$WORK/zerocopy" "$ROOT/ci/zerocopy.c"
if [ "$VETH" = 1 ]; then
    ip netns add "$NSA"
    ip netns add "$NSB"
    ip link add zc-a-$$ type veth peer name zc-b-$$
    ip link set zc-a-$$ netns "$NSA"
    ip link set zc-b-$$ netns "$NSB"
    ip -n "$NSA" addr add 10.251.0.1/24 dev zc-a-$$
    ip -n "$NSB" addr add 10.251.0.2/24 dev zc-b-$$
    for ns in "$NSA" "$NSB"; do ip -n "$ns" link set lo up; done
    ip -n "$NSA" link set zc-a-$$ up
    ip -n "$NSB" link set zc-b-$$ up
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
run() { # LINK MODE: appends "rate send_cpu recv_cpu completions copied" to $WORK/LINK-MODE
    local link=$1 mode=$2 p rx=() tx=() addr=127.0.0.1
    p=$(port)
    if [ "$link" = veth ]; then rx=(ip netns exec "$NSB"); tx=(ip netns exec "$NSA"); addr=10.251.0.2; fi
    "${rx[@]}" "$WORK/zerocopy" recv "$p" > "$WORK/recv.out" &
    local r=$!
    "${tx[@]}" "$WORK/zerocopy" send "$addr" "$p" "$N" "$mode" > "$WORK/send.out"
    wait "$r"
    read -r scpu rate _notes done copied < "$WORK/send.out"
    echo "$rate $scpu $(cat "$WORK/recv.out") $done $copied" >> "$WORK/$link-$mode"
}
LINKS=(loopback)
if [ "$VETH" = 1 ]; then LINKS+=(veth); fi
for _ in $(seq "$REPEAT"); do
    for l in "${LINKS[@]}"; do
        run "$l" copy
        run "$l" zerocopy
    done
done
GIB=$(python3 -c "print($N / 2**30)")
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo "== send() vs MSG_ZEROCOPY: $BYTES per run from a 256 MiB buffer, 4 MiB per send, $REPEAT runs per case interleaved, medians; $(nproc) cores =="
printf '%-22s %13s %13s %13s %13s   %s\n' case rate "send s/GiB" "recv s/GiB" "both s/GiB" "zerocopy sends copied by the kernel"
for l in "${LINKS[@]}"; do
    for m in copy zerocopy; do
        f=$WORK/$l-$m
        rate=$(cut -d' ' -f1 "$f" | median)
        s=$(awk -v g="$GIB" '{ print $2 / g }' "$f" | median)
        r=$(awk -v g="$GIB" '{ print $3 / g }' "$f" | median)
        b=$(awk -v g="$GIB" '{ print ($2 + $3) / g }' "$f" | median)
        c=$(awk '{ d += $4; c += $5 } END { print (d ? sprintf("%d of %d", c, d) : "-") }' "$f")
        printf '%-22s %6.2f Gbit/s %13.3f %13.3f %13.3f   %s\n' "$l, $m" "$rate" "$s" "$r" "$b" "$c"
    done
done
