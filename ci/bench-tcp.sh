#!/usr/bin/env bash
# Benchmark: Ferry's TCP transport moving an idle guest of non-zero pages over
# loopback (two processes, `ferry listen` and `ferry send`), beside iperf3's
# single stream in the same run. Prints both rates and their ratio.
#
#   ci/bench-tcp.sh [--memory 2GiB] [--repeat 3]
#
# Ferry's rate is page bytes over the transfer time (connect to the last
# acknowledged chunk), CRC32 of every payload included; the median of the
# repeats is reported, and so is iperf3's median over as many 5 s runs.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=2GiB
REPEAT=3
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        *) echo "bench-tcp.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if ! command -v iperf3 >/dev/null; then
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends iperf3 >/dev/null
fi
cd "$ROOT"
cargo build --release --locked -q -p ferry-migration --bin ferry
FERRY=$ROOT/target/release/ferry
WORK=$(mktemp -d)
cleanup() { kill "${IPERF_PID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$FERRY" gen-key "$WORK/key" > /dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

IPORT=$(port)
iperf3 -s -B 127.0.0.1 -p "$IPORT" >/dev/null 2>&1 &
IPERF_PID=$!
sleep 0.5
for i in $(seq "$REPEAT"); do
    # One stream, default (128 KiB) writes, 5 s.
    iperf3 -c 127.0.0.1 -p "$IPORT" -t 5 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 1e9)'
done > "$WORK/iperf"
kill "$IPERF_PID"; IPERF_PID=

for i in $(seq "$REPEAT"); do
    P=$(port)
    # --plaintext on both ends: the plain TCP data path, as iperf3 measures it
    # (ci/bench-encrypt.sh measures the default, encrypted, path).
    "$FERRY" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --plaintext --once > "$WORK/listen.$i" 2>&1 &
    LPID=$!
    for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$P)).close()" 2>/dev/null && break; sleep 0.05; done
    "$FERRY" send --to 127.0.0.1:"$P" --auth-key-file "$WORK/key" --memory "$MEM" --dirty-rate 0 --zero-fraction 0 \
        --performance-option tcp --plaintext --json "$WORK/ferry.$i.json" > "$WORK/send.$i" 2>&1
    wait "$LPID"
    python3 -c "import json; d=json.load(open('$WORK/ferry.$i.json')); assert d['digest_verified']; print(d['throughput_bytes_per_sec'] * 8 / 1e9)"
done > "$WORK/ferry"

ip=$(median < "$WORK/iperf")
fe=$(median < "$WORK/ferry")
echo "== TCP over loopback, $MEM idle guest of non-zero pages, $REPEAT runs each (medians) =="
echo "iperf3 single stream:            $(printf '%.2f' "$ip") Gbit/s   (runs: $(paste -sd' ' "$WORK/iperf"))"
echo "ferry --performance-option tcp:  $(printf '%.2f' "$fe") Gbit/s   (runs: $(paste -sd' ' "$WORK/ferry"))"
python3 -c "print('ratio ferry / iperf3: %.2f' % ($fe / $ip))"
