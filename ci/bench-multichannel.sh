#!/usr/bin/env bash
# Benchmark: multichannel on the namespace test bed (ci/netns-testbed.sh: 4
# veth links between two namespaces, each shaped to 1 Gbit/s both ways).
# Migrates an idle guest of incompressible pages with --performance-option
# tcp, once with --channels 1 and once with --channels auto (one channel per
# link), and with the default option (compression, whose pool serves every
# channel) and --channels auto; beside them, in the same run, iperf3 with one
# stream per link (the bound: the same bytes split over the four links,
# streams at once). Prints the rates and auto's ratio to the bound. Needs
# root.
#
#   ci/bench-multichannel.sh [--memory 2GiB] [--repeat 3] [--keep-testbed] [--ferry PATH]
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
        --ferry) FERRY=$2; shift 2 ;;
        *) echo "bench-multichannel.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-multichannel.sh: needs root (network namespaces)" >&2; exit 1; }
cd "$ROOT"
if [ -z "${FERRY:-}" ]; then
    cargo build --release --locked -q -p ferry-cli --bin ferry
    FERRY=$ROOT/target/release/ferry
fi
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

# iperf3, one stream per link at once, the guest's bytes split between them;
# prints the total Gbit/s (all bytes over the slowest stream's time).
iperf_bound() { # TAG
    local links bytes pids=() i
    links=$(ip -n ferry-src -br addr | grep -c '^fsrc')
    bytes=$(python3 -c "
import re, sys
m = re.fullmatch(r'(\d+)([KMG]i?B)?', '$MEM')
n = int(m.group(1)) * {None: 1, 'KiB': 1 << 10, 'MiB': 1 << 20, 'GiB': 1 << 30}[m.group(2)]
print(n // $links)")
    for i in $(seq 0 $((links - 1))); do
        ip netns exec ferry-dst iperf3 -s -1 -B "10.200.$i.2" -p $((5301 + i)) > /dev/null 2>&1 &
        pids+=($!)
    done
    # A probe connection would use up a one-off server's test: wait instead.
    sleep 0.5
    local cl=()
    for i in $(seq 0 $((links - 1))); do
        ip netns exec ferry-src iperf3 -c "10.200.$i.2" -B "10.200.$i.1" -p $((5301 + i)) -n "$bytes" -J \
            > "$WORK/iperf.$1.$i" 2>&1 &
        cl+=($!)
    done
    for p in "${cl[@]}" "${pids[@]}"; do wait "$p" || true; done
    python3 - "$WORK"/iperf."$1".* <<'PY'
import json, sys
total, secs = 0, 0.0
for f in sys.argv[1:]:
    d = json.load(open(f))
    r = d["end"]["sum_received"]
    total += r["bytes"]
    secs = max(secs, r["seconds"])
print("%.3f" % (total * 8 / 1e9 / secs))
PY
}

PORT=6650
run() { # run CHANNELS TAG [OPTION ARGS...]
    PORT=$((PORT + 1))
    # --plaintext on both ends: what the links carry, without TLS's CPU
    # (ci/bench-encrypt.sh measures that).
    ip netns exec ferry-dst "$FERRY" listen --listen 0.0.0.0:$PORT --auth-key-file "$WORK/key" --plaintext --once > "$WORK/listen.$2" 2>&1 &
    LPID=$!
    for _ in $(seq 200); do grep -q "listening on" "$WORK/listen.$2" 2>/dev/null && break; sleep 0.05; done
    local ch=$1 tag=$2; shift 2
    local opt=("$@")
    [ ${#opt[@]} -gt 0 ] || opt=(--performance-option tcp)
    ip netns exec ferry-src "$FERRY" send --to 10.200.0.2:$PORT --auth-key-file "$WORK/key" --memory "$MEM" \
        --dirty-rate 0 --zero-fraction 0 "${opt[@]}" --plaintext --channels "$ch" \
        --json "$WORK/$tag.json" > "$WORK/send.$tag" 2>&1 || { cat "$WORK/send.$tag" "$WORK/listen.$tag" >&2; exit 1; }
    wait "$LPID"; LPID=
    python3 - "$WORK/$tag.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["digest_verified"]
secs = d["payload_bytes"] / d["throughput_bytes_per_sec"]  # transfer time
rates = " ".join("%s=%.2f" % (c["remote"].split(":")[0], c["payload_bytes"] * 8 / 1e9 / secs) for c in d["channels"])
print("%.3f %d %s" % (d["throughput_bytes_per_sec"] * 8 / 1e9, len(d["channels"]), rates))
PY
}

for i in $(seq "$REPEAT"); do
    iperf_bound "$i" >> "$WORK/iperf"
    run 1 one.$i >> "$WORK/one"
    run auto auto.$i >> "$WORK/auto"
    run auto comp.$i --performance-option compression >> "$WORK/comp"
done

iperf=$(median < "$WORK/iperf")
one=$(cut -d' ' -f1 "$WORK/one" | median)
auto=$(cut -d' ' -f1 "$WORK/auto" | median)
comp=$(cut -d' ' -f1 "$WORK/comp" | median)
chans=$(cut -d' ' -f2 "$WORK/auto" | head -1)
echo "== multichannel on the test bed: 4 links x 1 Gbit/s (tbf both ways), $MEM idle guest of incompressible pages, --plaintext, $REPEAT runs each, interleaved (medians) =="
echo "iperf3, one stream per link:        $(printf '%.2f' "$iperf") Gbit/s   (runs: $(paste -sd' ' "$WORK/iperf"))"
echo "tcp --channels 1:                   $(printf '%.2f' "$one") Gbit/s   (runs: $(cut -d' ' -f1 "$WORK/one" | paste -sd' '))"
echo "tcp --channels auto:                $(printf '%.2f' "$auto") Gbit/s   (runs: $(cut -d' ' -f1 "$WORK/auto" | paste -sd' '); $chans channels)"
echo "compression (default) --channels auto: $(printf '%.2f' "$comp") Gbit/s   (runs: $(cut -d' ' -f1 "$WORK/comp" | paste -sd' '))"
echo "tcp auto / channels 1:              $(python3 -c "print('%.2f' % ($auto / $one))")x"
echo "tcp auto / iperf3 bound:            $(python3 -c "print('%.2f' % ($auto / $iperf))")x   (goal >= 0.95)"
echo "compression auto / iperf3 bound:    $(python3 -c "print('%.2f' % ($comp / $iperf))")x"
echo "per channel, last tcp auto run (Gbit/s over the transfer): $(tail -1 "$WORK/auto" | cut -d' ' -f3-)"
