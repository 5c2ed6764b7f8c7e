#!/usr/bin/env bash
# Benchmark: what the page path costs in CPU, per GiB moved, on each side,
# this build against a baseline build of Ferry, in the same run.
#
#   ci/bench-pagepath.sh --baseline PATH/TO/OLD/ferry [--memory 1GiB] [--repeat 3]
#
# Two processes over loopback (`ferry listen --once`, `ferry send`), an
# idle guest loaded from an image (--guest-image), --dirty-rate 0, plain
# TCP data channels. CPU is user + system seconds of each process from GNU
# time, divided by the GiB of guest memory moved; medians of --repeat runs.
#
#   tcp          a guest of random pages (every page sent, nothing
#                compresses): the per-page loop of the plain TCP path.
#                Before (frame format 1): zero test and CRC32 on the
#                source, CRC32 of what landed on the destination, and the
#                whole-memory digest on both. After (format 2): one opaque
#                copy of each page, zero test and keyed hash of the copy on
#                the source, a keyed hash of what landed on the
#                destination, and the digest while the switchover still
#                computes it.
#   compression  a realistic image (ci/memimage.py mix), --performance-option
#                compression (zstd:1): the sound copy on the compression path
#                (format 2 compresses a private copy of each page instead
#                of guest memory itself).
#
# Only the two ferry binaries differ; each pair talks to itself (a baseline
# source to a baseline destination). The baseline's own flags: before
# format 2 plaintext was the default, so it gets no --plaintext.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=1GiB
REPEAT=3
BASELINE=
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --baseline) BASELINE=$2; shift 2 ;;
        *) echo "bench-pagepath.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if [ -z "$BASELINE" ] || [ ! -x "$BASELINE" ]; then
    echo "bench-pagepath.sh: --baseline PATH: a ferry binary built from an earlier commit (e.g. git worktree add /tmp/old COMMIT && cargo build --release there)" >&2
    exit 2
fi
cd "$ROOT"
cargo build --release --locked -q -p ferry-cli --bin ferry
NEW=$ROOT/target/release/ferry
WORK=$(mktemp -d)
cleanup() { kill "${LPID:-}" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
MIB=$(python3 -c "
import re, sys
m = re.fullmatch(r'(\d+)(KiB|MiB|GiB)', '$MEM') or sys.exit('bench-pagepath.sh: --memory like 1GiB')
print(int(m[1]) * {'KiB': 1 / 1024, 'MiB': 1, 'GiB': 1024}[m[2]])" | cut -d. -f1)
GIB=$(python3 -c "print($MIB / 1024)")
head -c $((MIB << 20)) /dev/urandom > "$WORK/random.img"
python3 "$ROOT/ci/memimage.py" "$WORK" "$MIB" mix >/dev/null
# A key both builds read: the current one wants 32 random bytes, encoded,
# in a file only its owner reads; the baseline takes any file of 16+ bytes.
if "$NEW" gen-key "$WORK/key" >/dev/null 2>&1; then :; else
    head -c 32 /dev/urandom | base64 > "$WORK/key"; chmod 600 "$WORK/key"
fi
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
cpu() { awk '{ printf "%.3f\n", ($1 + $2) / '"$GIB"' }' "$1"; }

# run BIN LABEL IMAGE OPTION I: one migration; CPU per GiB of each side.
run() {
    local bin=$1 label=$2 image=$3 option=$4 i=$5 plain=()
    if [ "$bin" = "$NEW" ]; then plain=(--plaintext); fi
    local p; p=$(port)
    /usr/bin/time -f "%U %S" -o "$WORK/$label.dst.$i" \
        "$bin" listen --listen 127.0.0.1:"$p" --auth-key-file "$WORK/key" "${plain[@]}" --once \
        > "$WORK/$label.listen.$i" 2>&1 &
    LPID=$!
    for _ in $(seq 200); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$p)).close()" 2>/dev/null && break; sleep 0.05; done
    /usr/bin/time -f "%U %S" -o "$WORK/$label.src.$i" \
        "$bin" send --to 127.0.0.1:"$p" --auth-key-file "$WORK/key" "${plain[@]}" --memory "$MEM" \
        --guest-image "$image" --dirty-rate 0 --performance-option "$option" \
        > "$WORK/$label.send.$i" 2>&1 || { cat "$WORK/$label.send.$i" >&2; exit 1; }
    wait "$LPID"; LPID=
    grep -q "verified" "$WORK/$label.send.$i" || { echo "$label: not verified" >&2; cat "$WORK/$label.send.$i" >&2; exit 1; }
    cpu "$WORK/$label.src.$i" >> "$WORK/$label.src"
    cpu "$WORK/$label.dst.$i" >> "$WORK/$label.dst"
}

for i in $(seq "$REPEAT"); do
    # Interleaved, so that load from elsewhere on the machine hits both.
    run "$BASELINE" tcp-before "$WORK/random.img" tcp "$i"
    run "$NEW" tcp-after "$WORK/random.img" tcp "$i"
    run "$BASELINE" comp-before "$WORK/mix.img" compression "$i"
    run "$NEW" comp-after "$WORK/mix.img" compression "$i"
done

echo "== CPU seconds per GiB moved, $MEM guest, $REPEAT runs each (medians; runs in brackets) =="
printf '%-32s %10s %10s\n' "" source destination
for label in tcp-before tcp-after comp-before comp-after; do
    printf '%-32s %10s %10s   [%s | %s]\n' "$label" \
        "$(median < "$WORK/$label.src")" "$(median < "$WORK/$label.dst")" \
        "$(paste -sd' ' "$WORK/$label.src")" "$(paste -sd' ' "$WORK/$label.dst")"
done
for side in src dst; do
    python3 - "$WORK" "$side" <<'EOF'
import statistics, sys
work, side = sys.argv[1], sys.argv[2]
def med(label):
    return statistics.median(float(x) for x in open(f"{work}/{label}.{side}"))
name = {"src": "source", "dst": "destination"}[side]
for opt, a, b in (("tcp", "tcp-before", "tcp-after"), ("compression", "comp-before", "comp-after")):
    print(f"{opt:<12} {name:<12} after/before: {med(b) / med(a):.2f}")
EOF
done
