#!/usr/bin/env bash
# Benchmark: the cost of --encrypt. The same idle guest of non-zero pages is
# migrated over loopback (two processes, `ferry listen` and `ferry send`)
# with the tcp and compression options, each with and without --encrypt
# (TLS 1.3, pre-shared-key identity; --tls-dir certificates cost the same
# after the handshake), and encrypted tcp over 2 channels (each channel its
# own TLS session and task, so encryption spreads over cores).
#
#   ci/bench-encrypt.sh [--memory 1GiB] [--repeat 3]
#
# Prints one row per case: the median rate (page bytes over the transfer
# time, connect to the last acknowledged chunk; CRC32 of every payload
# included) and the total time, with every run's rate. On loopback both ends
# share the host's cores, so encryption and decryption compete with each
# other and with the copy: a real link between two hosts hides more of it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=1GiB
REPEAT=3
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        *) echo "bench-encrypt.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
if [ -z "${FERRY:-}" ]; then
    cargo build --release --locked -q -p ferry-migration --bin ferry
    FERRY=$ROOT/target/release/ferry
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$FERRY" gen-key "$WORK/key" > /dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

# run NAME LISTEN_ARGS -- SEND_ARGS...
run() {
    local name=$1 largs=$2; shift 3
    for i in $(seq "$REPEAT"); do
        P=$(port)
        # shellcheck disable=SC2086
        "$FERRY" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --once $largs > "$WORK/listen.$name.$i" 2>&1 &
        LPID=$!
        for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$P)).close()" 2>/dev/null && break; sleep 0.05; done
        "$FERRY" send --to 127.0.0.1:"$P" --auth-key-file "$WORK/key" --memory "$MEM" --dirty-rate 0 --zero-fraction 0 \
            --json "$WORK/$name.$i.json" "$@" > "$WORK/send.$name.$i" 2>&1 || { cat "$WORK/send.$name.$i" >&2; exit 1; }
        wait "$LPID"
        python3 -c "import json; d=json.load(open('$WORK/$name.$i.json')); assert d['digest_verified']; print(d['throughput_bytes_per_sec'] * 8 / 1e9, d['total_ms'] / 1e3, d.get('encryption') or 'plain')"
    done > "$WORK/$name"
    local rate total enc
    rate=$(cut -d' ' -f1 "$WORK/$name" | median)
    total=$(cut -d' ' -f2 "$WORK/$name" | median)
    enc=$(head -1 "$WORK/$name" | cut -d' ' -f3-)
    printf '%-34s %6.2f Gbit/s  %6.2f s   (runs: %s; %s)\n' "$name" "$rate" "$total" "$(cut -d' ' -f1 "$WORK/$name" | xargs printf '%.2f ' | sed 's/ $//')" "$enc"
}

echo "== --encrypt over loopback, $MEM idle guest of non-zero pages, $REPEAT runs each (medians), $(nproc) cores =="
run "tcp --plaintext"              "--plaintext" -- --performance-option tcp --channels 1 --plaintext
run "tcp (TLS)"                    ""            -- --performance-option tcp --channels 1
run "tcp (TLS) --channels 2"       ""            -- --performance-option tcp --channels 2
run "compression --plaintext"      "--plaintext" -- --performance-option compression --channels 1 --plaintext
run "compression (TLS)"            ""            -- --performance-option compression --channels 1
