#!/usr/bin/env bash
# Benchmark: multichannel on the namespace test bed (ci/netns-testbed.sh: 4
# veth links between two namespaces, each shaped to 1 Gbit/s both ways).
# Migrates an idle guest of incompressible pages with --performance-option
# tcp, once with --channels 1 and once with --channels auto (one channel per
# link), in the same run, and prints both rates. Needs root.
#
#   ci/bench-multichannel.sh [--memory 2GiB] [--repeat 3] [--keep-testbed]
#
# The guest's pages are the synthetic guest's pattern pages with
# --zero-fraction 0: every page non-zero and different (splitmix64 words),
# which no codec shrinks. The rate is page bytes over the transfer time
# (connect to the last acknowledged chunk, CRC32 of every payload
# included), from the --json summary; medians over the repeats. The test
# bed is torn down at the end unless it was already up or --keep-testbed.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=2GiB
REPEAT=3
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --keep-testbed) KEEP=1; shift ;;
        *) echo "bench-multichannel.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-multichannel.sh: needs root (network namespaces)" >&2; exit 1; }
cd "$ROOT"
cargo build --release --locked -q -p ferry-cli --bin ferry
FERRY=$ROOT/target/release/ferry
WORK=$(mktemp -d)
if ip netns list | awk '{print $1}' | grep -qx ferry-src; then KEEP=1; fi
LPID=
cleanup() {
    [ -n "$LPID" ] && kill "$LPID" 2>/dev/null || true
    rm -rf "$WORK"
    [ "$KEEP" = 1 ] || bash "$ROOT/ci/netns-testbed.sh" down >/dev/null
}
trap cleanup EXIT
bash "$ROOT/ci/netns-testbed.sh" up
"$FERRY" gen-key "$WORK/key" > /dev/null
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

PORT=6650
run() { # run CHANNELS TAG
    PORT=$((PORT + 1))
    # --plaintext on both ends: what the links carry, without TLS's CPU
    # (ci/bench-encrypt.sh measures that).
    ip netns exec ferry-dst "$FERRY" listen --listen 0.0.0.0:$PORT --auth-key-file "$WORK/key" --plaintext --once > "$WORK/listen.$2" 2>&1 &
    LPID=$!
    for _ in $(seq 200); do grep -q "listening on" "$WORK/listen.$2" 2>/dev/null && break; sleep 0.05; done
    ip netns exec ferry-src "$FERRY" send --to 10.200.0.2:$PORT --auth-key-file "$WORK/key" --memory "$MEM" \
        --dirty-rate 0 --zero-fraction 0 --performance-option tcp --plaintext --channels "$1" \
        --json "$WORK/$2.json" > "$WORK/send.$2" 2>&1 || { cat "$WORK/send.$2" "$WORK/listen.$2" >&2; exit 1; }
    wait "$LPID"; LPID=
    python3 - "$WORK/$2.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["digest_verified"]
secs = d["payload_bytes"] / d["throughput_bytes_per_sec"]  # transfer time
rates = " ".join("%s=%.2f" % (c["remote"].split(":")[0], c["payload_bytes"] * 8 / 1e9 / secs) for c in d["channels"])
print("%.3f %d %s" % (d["throughput_bytes_per_sec"] * 8 / 1e9, len(d["channels"]), rates))
PY
}

for i in $(seq "$REPEAT"); do
    run 1 one.$i >> "$WORK/one"
    run auto auto.$i >> "$WORK/auto"
done

one=$(cut -d' ' -f1 "$WORK/one" | median)
auto=$(cut -d' ' -f1 "$WORK/auto" | median)
chans=$(cut -d' ' -f2 "$WORK/auto" | head -1)
echo "== multichannel on the test bed: 4 links x 1 Gbit/s (tbf both ways), $MEM idle guest of incompressible pages, --performance-option tcp, $REPEAT runs each (medians) =="
echo "--channels 1:     $(printf '%.2f' "$one") Gbit/s   (runs: $(cut -d' ' -f1 "$WORK/one" | paste -sd' '))"
echo "--channels auto:  $(printf '%.2f' "$auto") Gbit/s   (runs: $(cut -d' ' -f1 "$WORK/auto" | paste -sd' '); $chans channels)"
echo "ratio:            $(python3 -c "print('%.2f' % ($auto / $one))")x"
echo "per channel, last auto run (Gbit/s over the transfer): $(tail -1 "$WORK/auto" | cut -d' ' -f3-)"
