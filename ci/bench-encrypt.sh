#!/usr/bin/env bash
# Benchmark: the cost of encryption by default. The same idle guest of
# non-zero pages is migrated over loopback (two processes, `ferry listen`
# and `ferry send`) with the tcp and compression options:
#   * this build's default (TLS 1.3 on the control connection and every data
#     channel, pre-shared-key identity; --tls-dir certificates cost the same
#     after the handshake), and the same with --plaintext on both ends;
#   * with --before BIN, the same guest with an earlier ferry (one from
#     before encryption became the default: plaintext by default, TLS with
#     --encrypt), so that "before" and "after" run in the same script run,
#     interleaved, on the same machine load.
#
#   ci/bench-encrypt.sh [--memory 1GiB] [--repeat 3] [--before FERRY_BIN]
#
# Prints one row per case: the median rate (page bytes over the transfer
# time), the median total time, and the CPU seconds both processes used
# (user + system, from /usr/bin/time when installed), with every run's
# rate; then the ratios that answer "what does encryption by default
# cost": TLS / plaintext in this build, and this build's default against
# the earlier build's default. On loopback both ends share the host's
# cores, so encryption and decryption compete with each other and with the
# copy: a real link between two hosts hides more of it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=1GiB
REPEAT=3
BEFORE=
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --before) BEFORE=$2; shift 2 ;;
        *) echo "bench-encrypt.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
if [ -z "${FERRY:-}" ]; then
    cargo build --release --locked -q -p ferry-cli --bin ferry
    FERRY=$ROOT/target/release/ferry
fi
if [ -n "$BEFORE" ] && [ ! -x "$BEFORE" ]; then
    echo "bench-encrypt.sh: --before $BEFORE is not an executable" >&2
    exit 2
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$FERRY" gen-key "$WORK/key" > /dev/null
TIME=
if [ -x /usr/bin/time ]; then TIME=/usr/bin/time; fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
# Runs a command, appending "user system" CPU seconds to FILE when
# /usr/bin/time is there.
timed() { # FILE CMD...
    local out=$1; shift
    if [ -n "$TIME" ]; then "$TIME" -a -o "$out" -f '%U %S' "$@"; else "$@"; fi
}

# One migration: run_once NAME BIN LISTEN_ARGS -- SEND_ARGS...; appends
# "rate_gbit total_s cpu_s encryption" to $WORK/NAME.
run_once() {
    local name=$1 bin=$2 largs=$3; shift 4
    local P cpu=$WORK/cpu.$$
    P=$(port)
    rm -f "$cpu"
    # shellcheck disable=SC2086
    timed "$cpu" "$bin" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --once $largs > "$WORK/listen.log" 2>&1 &
    local lpid=$!
    for _ in $(seq 100); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$P)).close()" 2>/dev/null && break; sleep 0.05; done
    timed "$cpu" "$bin" send --to 127.0.0.1:"$P" --auth-key-file "$WORK/key" --memory "$MEM" --dirty-rate 0 --zero-fraction 0 \
        --json "$WORK/run.json" "$@" > "$WORK/send.log" 2>&1 || { cat "$WORK/send.log" "$WORK/listen.log" >&2; exit 1; }
    wait "$lpid" || { cat "$WORK/listen.log" >&2; exit 1; }
    local c=0
    if [ -s "$cpu" ]; then c=$(awk '{ s += $1 + $2 } END { print s }' "$cpu"); fi
    python3 - "$WORK/run.json" "$c" >> "$WORK/$name" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d.get("summary", d)
assert s["digest_verified"] if "digest_verified" in s else True
enc = s.get("encryption") or "plain"
print(s["throughput_bytes_per_sec"] * 8 / 1e9, s["total_ms"] / 1e3, sys.argv[2], enc)
PY
}

# The cases: NAME|BIN|LISTEN_ARGS|SEND_ARGS
CASES=(
    "tcp --plaintext|$FERRY|--plaintext|--performance-option tcp --channels 1 --plaintext"
    "tcp (default: TLS)|$FERRY||--performance-option tcp --channels 1"
    "tcp (default: TLS) --channels 2|$FERRY||--performance-option tcp --channels 2"
    "compression --plaintext|$FERRY|--plaintext|--performance-option compression --channels 1 --plaintext"
    "compression (default: TLS)|$FERRY||--performance-option compression --channels 1"
)
if [ -n "$BEFORE" ]; then
    CASES+=(
        "before: tcp (default: plain)|$BEFORE||--performance-option tcp --channels 1"
        "before: tcp --encrypt|$BEFORE|--encrypt|--performance-option tcp --channels 1 --encrypt"
        "before: compression (default)|$BEFORE||--performance-option compression --channels 1"
        "before: compression --encrypt|$BEFORE|--encrypt|--performance-option compression --channels 1 --encrypt"
    )
fi
key() { echo "$1" | tr ' :()' '____'; }
for i in $(seq "$REPEAT"); do
    for c in "${CASES[@]}"; do
        IFS='|' read -r name bin largs sargs <<< "$c"
        # shellcheck disable=SC2086
        run_once "$(key "$name")" "$bin" "$largs" -- $sargs
    done
done

echo "== encryption by default over loopback: $MEM idle guest of non-zero pages, $REPEAT runs each (medians, runs interleaved), $(nproc) cores =="
printf '%-36s %12s %9s %10s   %s\n' case rate total "cpu (s)" "runs; encryption"
declare -A RATE CPU
for c in "${CASES[@]}"; do
    IFS='|' read -r name _ _ _ <<< "$c"
    f=$WORK/$(key "$name")
    RATE[$name]=$(cut -d' ' -f1 "$f" | median)
    CPU[$name]=$(cut -d' ' -f3 "$f" | median)
    total=$(cut -d' ' -f2 "$f" | median)
    enc=$(head -1 "$f" | cut -d' ' -f4-)
    printf '%-36s %6.2f Gbit/s %7.2f s %9.2f   (%s; %s)\n' "$name" "${RATE[$name]}" "$total" "${CPU[$name]}" \
        "$(cut -d' ' -f1 "$f" | xargs printf '%.2f ' | sed 's/ $//')" "$enc"
done
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print('%.2f' % (a/b) if b else 'n/a')" "$1" "$2"; }
echo "-- ratios (rate; cpu) --"
for o in tcp compression; do
    echo "$o: TLS default / --plaintext (this build): rate $(ratio "${RATE[$o (default: TLS)]}" "${RATE[$o --plaintext]}"), cpu $(ratio "${CPU[$o (default: TLS)]}" "${CPU[$o --plaintext]}")"
done
if [ -n "$BEFORE" ]; then
    echo "tcp: this build's default / the earlier default (plain): rate $(ratio "${RATE[tcp (default: TLS)]}" "${RATE[before: tcp (default: plain)]}"), cpu $(ratio "${CPU[tcp (default: TLS)]}" "${CPU[before: tcp (default: plain)]}")"
    echo "compression: this build's default / the earlier default (plain): rate $(ratio "${RATE[compression (default: TLS)]}" "${RATE[before: compression (default)]}"), cpu $(ratio "${CPU[compression (default: TLS)]}" "${CPU[before: compression (default)]}")"
    echo "tcp TLS: this build / the earlier --encrypt: rate $(ratio "${RATE[tcp (default: TLS)]}" "${RATE[before: tcp --encrypt]}"), cpu $(ratio "${CPU[tcp (default: TLS)]}" "${CPU[before: tcp --encrypt]}")"
    echo "tcp plaintext: this build's --plaintext / the earlier default: rate $(ratio "${RATE[tcp --plaintext]}" "${RATE[before: tcp (default: plain)]}")"
fi
