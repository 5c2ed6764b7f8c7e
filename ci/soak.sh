#!/usr/bin/env bash
# Soak: N back-to-back migrations of a dirtying guest, alternating
# directions between two `ferry listen` daemons that stay up the whole time.
#
#   bash ci/soak.sh                  # 50 runs, 256 MiB guest dirtying 48 MB/s
#   SOAK_RUNS=4 bash ci/soak.sh      # the short mode ci/test.sh runs
#
# Environment:
#   SOAK_RUNS=50          migrations
#   SOAK_MEMORY=256MiB    guest memory of each migration
#   SOAK_DIRTY=48MB/s     rate the guest dirties its memory
#   SOAK_PROFILE=release  cargo profile of the ferry binary it builds (debug
#                         reuses the test build); FERRY=PATH uses that binary
#   SOAK_KEEP=1           keep the work directory (JSON records, logs)
#   SOAK_NETNS=0          loopback ports even as root
#
# As root, daemon A runs in network namespace fysoak-a and daemon B in
# fysoak-b, joined by the veth pair fysoak-va/fysoak-vb (10.251.77.1/.2);
# migration i goes A -> B when i is even, B -> A when odd, `ferry send`
# running in the source's namespace. Without root or namespaces both daemons
# listen on loopback ports instead (it says so). Each `ferry send` migrates
# a fresh synthetic guest: a source process owns its guest.
#
# A run counts as verified when `ferry send` exits 0, its --json record says
# the digest was verified on both sides, and the destination daemon reports
# the same digest committed with every pattern page checked by its resume
# hook. Prints how many verified (exit status 1 unless all), the spread of
# downtime and of total time from the records, and each daemon's
# ferry_migrations_committed_total / _aborted_total from its --metrics.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=${SOAK_RUNS:-50}
MEM=${SOAK_MEMORY:-256MiB}
DIRTY=${SOAK_DIRTY:-48MB/s}
PROFILE=${SOAK_PROFILE:-release}
NS_A=fysoak-a NS_B=fysoak-b VETH_A=fysoak-va VETH_B=fysoak-vb
NET=10.251.77

if [ -z "${FERRY:-}" ]; then
    if [ "$PROFILE" = release ]; then
        (cd "$ROOT" && cargo build --release --locked -q -p ferry-cli --bin ferry)
    else
        (cd "$ROOT" && cargo build --locked -q -p ferry-cli --bin ferry)
    fi
    FERRY=$ROOT/target/$PROFILE/ferry
fi
WORK=$(mktemp -d)
PIDS=()
NETNS=0
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
    if [ "$NETNS" = 1 ]; then
        ip netns del "$NS_A" 2>/dev/null || true
        ip netns del "$NS_B" 2>/dev/null || true
    fi
    if [ "${SOAK_KEEP:-0}" = 1 ]; then echo "soak: records and logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

netns_up() {
    [ "$(id -u)" = 0 ] && [ "${SOAK_NETNS:-1}" != 0 ] || return 1
    ip netns del "$NS_A" 2>/dev/null || true
    ip netns del "$NS_B" 2>/dev/null || true
    ip netns add "$NS_A" 2>/dev/null || return 1
    NETNS=1
    ip netns add "$NS_B" &&
        ip link add "$VETH_A" netns "$NS_A" type veth peer name "$VETH_B" netns "$NS_B" &&
        ip -n "$NS_A" addr add "$NET.1/24" dev "$VETH_A" &&
        ip -n "$NS_B" addr add "$NET.2/24" dev "$VETH_B" &&
        ip -n "$NS_A" link set lo up && ip -n "$NS_B" link set lo up &&
        ip -n "$NS_A" link set "$VETH_A" up && ip -n "$NS_B" link set "$VETH_B" up
}

"$FERRY" gen-key "$WORK/key" > /dev/null
if netns_up; then
    echo "soak: namespaces $NS_A ($NET.1) and $NS_B ($NET.2) over veth $VETH_A/$VETH_B"
    IN_A=(ip netns exec "$NS_A") IN_B=(ip netns exec "$NS_B")
    ADDR_A=$NET.1:6600 ADDR_B=$NET.2:6600
    METRICS_A=127.0.0.1:9660 METRICS_B=127.0.0.1:9660
else
    echo "soak: no network namespaces (needs root and 'ip netns'; SOAK_NETNS=${SOAK_NETNS:-1}): both daemons on loopback ports instead"
    if [ "$NETNS" = 1 ]; then ip netns del "$NS_A" 2>/dev/null || true; NETNS=0; fi
    free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
    IN_A=() IN_B=()
    ADDR_A=127.0.0.1:$(free_port) ADDR_B=127.0.0.1:$(free_port)
    METRICS_A=127.0.0.1:$(free_port) METRICS_B=127.0.0.1:$(free_port)
fi

start_daemon() { # NAME ADDR METRICS NSEXEC...
    local name=$1 addr=$2 metrics=$3
    shift 3
    "$@" "$FERRY" listen --listen "$addr" --auth-key-file "$WORK/key" --metrics "$metrics" \
        >"$WORK/daemon-$name.out" 2>"$WORK/daemon-$name.err" &
    PIDS+=($!)
}
start_daemon a "$ADDR_A" "$METRICS_A" "${IN_A[@]}"
start_daemon b "$ADDR_B" "$METRICS_B" "${IN_B[@]}"
for name in a b; do
    for _ in $(seq 100); do grep -q "listening on" "$WORK/daemon-$name.err" 2>/dev/null && break; sleep 0.1; done
    grep -q "listening on" "$WORK/daemon-$name.err" || { echo "soak: daemon $name did not start:" >&2; cat "$WORK/daemon-$name.err" >&2; exit 1; }
done

scrape() { # METRICS NSEXEC...: GET /metrics (bash's /dev/tcp, no curl needed)
    local addr=$1
    shift
    "$@" bash -c 'exec 3<>"/dev/tcp/${0%:*}/${0##*:}" && printf "GET /metrics HTTP/1.0\r\n\r\n" >&3 && cat <&3' "$addr"
}
metric() { # TEXT NAME: sum of the samples of NAME
    awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }' <<<"$1"
}

echo "soak: $RUNS migrations of a $MEM guest dirtying $DIRTY, alternating A -> B and B -> A ($FERRY)"
started=$(date +%s.%N)
verified=0
failed=()
for i in $(seq 0 $((RUNS - 1))); do
    if [ $((i % 2)) = 0 ]; then src=(${IN_A[@]+"${IN_A[@]}"}) to=$ADDR_B dst=b dir="A -> B"; else src=(${IN_B[@]+"${IN_B[@]}"}) to=$ADDR_A dst=a dir="B -> A"; fi
    json=$WORK/run-$i.json
    before=$(grep -c " committed: " "$WORK/daemon-$dst.out" || true)
    set +e
    timeout 300 ${src[@]+"${src[@]}"} "$FERRY" send --to "$to" --auth-key-file "$WORK/key" \
        --memory "$MEM" --dirty-rate "$DIRTY" --json "$json" >"$WORK/send-$i.out" 2>"$WORK/send-$i.err"
    rc=$?
    set -e
    why=
    if [ "$rc" != 0 ]; then
        why="ferry send exited $rc: $(tail -n 1 "$WORK/send-$i.err")"
    elif ! grep -q '"digest_verified": true' "$json"; then
        why="the record does not say the digest was verified"
    else
        digest=$(sed -n 's/^  "digest": "\([0-9a-f]*\)",$/\1/p' "$json")
        # The destination prints its outcome once its resume hook has
        # checked every page.
        line=
        for _ in $(seq 300); do
            line=$(grep " committed: " "$WORK/daemon-$dst.out" | sed -n "$((before + 1))p" || true)
            [ -n "$line" ] && break
            sleep 0.1
        done
        if [ -z "$line" ]; then
            why="destination $dst reported no commit"
        elif ! grep -q "digest $digest verified .* pattern pages verified" <<<"$line"; then
            why="destination $dst: $line"
        fi
    fi
    if [ -z "$why" ]; then
        verified=$((verified + 1))
        printf 'run %2d %s: verified, downtime %s ms, total %s ms\n' "$i" "$dir" \
            "$(sed -n 's/^  "downtime_ms": \(.*\),$/\1/p' "$json" | xargs printf '%.1f')" \
            "$(sed -n 's/^  "total_ms": \(.*\),$/\1/p' "$json" | xargs printf '%.0f')"
    else
        failed+=("$i")
        echo "run $i $dir: FAILED: $why"
    fi
done
elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

spread() { # FIELD: min / median / p95 / max over the runs' records (nearest rank)
    for f in "$WORK"/run-*.json; do [ -e "$f" ] || continue; sed -n "s/^  \"$1\": \(.*\),\$/\1/p" "$f"; done | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) { print "no records"; exit }
            m = int((NR + 1) / 2); p = int(NR * 0.95 + 0.999); if (p < 1) p = 1
            printf "min %.1f / median %.1f / p95 %.1f / max %.1f ms over %d runs\n", v[1], v[m], v[p], v[NR], NR }'
}
echo
echo "soak: $verified of $RUNS migrations committed and verified in $elapsed s"
[ ${#failed[@]} = 0 ] || echo "soak: failed runs: ${failed[*]} (logs: SOAK_KEEP=1)"
echo "  downtime: $(spread downtime_ms)"
echo "  total:    $(spread total_ms)"

ok=1
[ "$verified" = "$RUNS" ] || ok=0
committed=0
for name in a b; do
    if [ "$name" = a ]; then text=$(scrape "$METRICS_A" ${IN_A[@]+"${IN_A[@]}"} || true); else text=$(scrape "$METRICS_B" ${IN_B[@]+"${IN_B[@]}"} || true); fi
    c=$(metric "$text" ferry_migrations_committed_total)
    a=$(metric "$text" ferry_migrations_aborted_total)
    s=$(metric "$text" ferry_migrations_started_total)
    reasons=$(grep '^ferry_migrations_aborted_total{' <<<"$text" | grep -v ' 0$' | tr '\n' ' ' || true)
    echo "  daemon $name metrics: started $s, committed $c, aborted $a ${reasons}"
    committed=$((committed + ${c%.*}))
done
if [ "$committed" != "$verified" ]; then
    echo "soak: the daemons' metrics count $committed commits, the runs $verified" >&2
    ok=0
fi
[ "$ok" = 1 ]
