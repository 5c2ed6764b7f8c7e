#!/usr/bin/env bash
# Benchmark: Ferry's TCP data path against iperf3's single stream on the
# same loopback, in one run, cases interleaved (issue 15's figures).
#
#   ci/bench-tcp.sh [--memory 2GiB] [--repeat 3] [--before FERRY_BIN] [--json FILE]
#                   [--send-args "ARGS"]   (extra `ferry send` options, this build only,
#                                           e.g. "--chunk-size 1MiB")
#
# Each repeat runs, one after the other (so machine load hits all alike):
#   * iperf3: `iperf3 -s -1` and `iperf3 -c -n BYTES` (one stream, its
#     default 128 KiB writes), BYTES = the guest's size;
#   * ferry --performance-option tcp --plaintext (what iperf3 measures);
#   * ferry --performance-option tcp (the default: TLS 1.3 on every channel);
#   * ferry --plaintext again, the destination started with
#     `--prealloc-guest SIZE` (its guest memory backed before the migration,
#     as by a VMM that preallocates guest memory: QEMU -mem-prealloc, Cloud
#     Hypervisor prefault=on). Populating it is the guest's work, done before
#     the port opens, so it is in neither Ferry's CPU figure nor the rate;
#     the "process" column still has it. A row beside the default, never
#     the goal's figure: the goals are judged on "ferry tcp --plaintext";
#   * ferry --plaintext again, the destination started with `--hugepages`
#     (its guest memory from the kernel's 2 MiB hugetlb pool, as VMMs back
#     guests for speed: QEMU -mem-path /dev/hugepages, Cloud Hypervisor
#     hugepages=on; one page-table entry per 2 MiB). The script reserves
#     the pages it needs (`vm.nr_hugepages`, root) and gives them back when
#     it exits; before the runs it uses the pool once (`ferry listen
#     --hugepages --prealloc-guest SIZE`, stopped once it listens), as a
#     host that reserved its pool at boot has, and prints what that first
#     use cost (on this VM the hypervisor backs a reserved page on its first
#     use). Also a row beside the default, never the goal's figure;
#     skipped, saying why, where the pool cannot be had;
#   * with --before BIN, the same two with an earlier ferry.
# Ferry migrates an idle guest of non-zero pattern pages (`ferry listen
# --once` and `ferry send`, two processes on 127.0.0.1), every page hashed
# (switchover evidence) and every chunk tagged.
#
# Printed per case: the median rate (page bytes over connect-to-last-ack;
# iperf3: received bits per second), and CPU seconds per GiB moved on each
# side and both together:
#   * "ferry" columns: Ferry's own work from its record (summary `cpu` on the
#     source, `cpu_s` of the destination's "migration committed" event:
#     getrusage over the migration, the synthetic guest's threads and hooks
#     left out);
#   * "process" column: both whole processes (user + system from
#     /usr/bin/time), i.e. with filling and checking the synthetic guest
#     and startup: the figure an earlier ferry without the accounting has;
#   * "audit" and "touch": the parts of those figures spent on the source's
#     audit after the commit (`summary.cpu.audit_s`) and on the destination
#     populating fresh guest memory where pages land (`first_touch_s`), and
#     "data path": both sides less those two, the work iperf3's figure is
#     comparable with (the goal's ratio is still printed on "both").
# iperf3's figures are its two whole processes. The heading gives the
# machine's 1-minute load average before and after the runs (CPU seconds
# and same-run ratios hold up under load better than rates). Then the
# ratios the issue's goals name (rate >= 1.0x iperf3; CPU per GiB, both
# sides, <= 1.5x iperf3's), TLS against plaintext, and this build against
# --before.
# On loopback both ends share the host's cores: every CPU-second one side
# spends is taken from the other.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=2GiB
REPEAT=3
BEFORE=
JSON=
SEND_ARGS=
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --before) BEFORE=$2; shift 2 ;;
        --json) JSON=$2; shift 2 ;;
        --send-args) SEND_ARGS=$2; shift 2 ;;
        *) echo "bench-tcp.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
need() { # COMMAND PACKAGE
    if ! command -v "$1" >/dev/null; then
        apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$2" >/dev/null
    fi
}
need iperf3 iperf3
if [ ! -x /usr/bin/time ]; then need /usr/bin/time time; fi
cd "$ROOT"
if [ -z "${FERRY:-}" ]; then
    cargo build --release --locked -q -p ferry-cli --bin ferry
    FERRY=$ROOT/target/release/ferry
fi
if [ -n "$BEFORE" ] && [ ! -x "$BEFORE" ]; then
    echo "bench-tcp.sh: --before $BEFORE is not an executable" >&2
    exit 2
fi
WORK=$(mktemp -d)
# The hugetlb pool as it was, restored at exit (set below when the script
# reserves pages).
HP_SYSCTL=/proc/sys/vm/nr_hugepages
HP_RESTORE=
cleanup() {
    if [ -n "$HP_RESTORE" ]; then echo "$HP_RESTORE" > "$HP_SYSCTL" || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
"$FERRY" gen-key "$WORK/key" > /dev/null
BYTES=$(python3 -c "
import re, sys
m = re.fullmatch(r'([0-9.]+)\s*([KMGT]?)(i?)B?', '$MEM')
n, u, i = float(m.group(1)), m.group(2), m.group(3)
print(int(n * (1024 if i or not u else 1000) ** ' KMGT'.index(u or ' ')))")
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "nan"; else print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
wait_port() { for _ in $(seq 200); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$1)).close()" 2>/dev/null && return 0; sleep 0.05; done; return 1; }
cpu_of() { awk '{ s += $1 + $2 } END { print s + 0 }' "$1"; }

# Appends "rate_gbit src_ferry_s dst_ferry_s src_proc_s dst_proc_s src_audit_s dst_first_touch_s"
# to $WORK/NAME.
run_iperf() {
    local P
    P=$(port)
    rm -f "$WORK/t.s" "$WORK/t.c"
    /usr/bin/time -o "$WORK/t.s" -f '%U %S' iperf3 -s -1 -B 127.0.0.1 -p "$P" > /dev/null 2>&1 &
    local spid=$!
    sleep 0.3
    for _ in $(seq 50); do
        if /usr/bin/time -o "$WORK/t.c" -f '%U %S' iperf3 -c 127.0.0.1 -p "$P" -n "$BYTES" -J > "$WORK/iperf.json" 2> /dev/null; then break; fi
        sleep 0.1
    done
    wait "$spid" || true
    local c s
    c=$(cpu_of "$WORK/t.c"); s=$(cpu_of "$WORK/t.s")
    python3 - "$WORK/iperf.json" "$c" "$s" >> "$WORK/iperf3" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(d["end"]["sum_received"]["bits_per_second"] / 1e9, "nan", "nan", sys.argv[2], sys.argv[3], "nan", "nan")
PY
}

run_ferry() { # NAME BIN EXTRA_SEND_ARGS ARGS...
    local name=$1 bin=$2 extra=$3; shift 3
    local P
    P=$(port)
    rm -f "$WORK/t.s" "$WORK/t.d" "$WORK/run.json"
    # shellcheck disable=SC2086 # $LISTEN_ARGS: words on purpose
    /usr/bin/time -o "$WORK/t.d" -f '%U %S' "$bin" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --once ${LISTEN_ARGS:-} "$@" > "$WORK/listen.log" 2>&1 &
    local lpid=$!
    wait_port "$P" || { cat "$WORK/listen.log" >&2; exit 1; }
    # shellcheck disable=SC2086 # $extra: words on purpose
    /usr/bin/time -o "$WORK/t.s" -f '%U %S' "$bin" send --to 127.0.0.1:"$P" --auth-key-file "$WORK/key" --memory "$MEM" \
        --dirty-rate 0 --zero-fraction 0 --performance-option tcp --channels 1 --json "$WORK/run.json" $extra "$@" \
        > "$WORK/send.log" 2>&1 || { cat "$WORK/send.log" "$WORK/listen.log" >&2; exit 1; }
    wait "$lpid" || { cat "$WORK/listen.log" >&2; exit 1; }
    python3 - "$WORK/run.json" "$WORK/listen.log" "$(cpu_of "$WORK/t.s")" "$(cpu_of "$WORK/t.d")" >> "$WORK/$name" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1]))
s = d.get("summary", d)
assert s.get("digest_verified", True), "digest not verified"
gib = s["payload_bytes"] / 2**30
src = s.get("cpu", {}).get("ferry_s")
log = open(sys.argv[2], errors="replace").read()
m = re.findall(r"\bcpu_s=([0-9.eE+-]+)", log)
dst = float(m[-1]) if m else None
t = re.findall(r"\bfirst_touch_s=([0-9.eE+-]+)", log)
touch = float(t[-1]) if t else None
audit = s.get("cpu", {}).get("audit_s")
f = lambda v: "nan" if v is None else v
print(s["throughput_bytes_per_sec"] * 8 / 1e9, f(src), f(dst), sys.argv[3], sys.argv[4], f(audit), f(touch))
PY
}

PRE="ferry --plaintext, dst prealloc"
HP="ferry --plaintext, dst --hugepages"
CASES=("iperf3" "ferry tcp --plaintext" "ferry tcp (default: TLS)" "$PRE")
# The 2 MiB hugetlb pool for the --hugepages row: reserve what the guest
# needs (given back at exit), then use it once, untimed, as a host's pool
# has been (see the header).
HP_NOTE=
HP_PAGES=$(( (BYTES + 2097151) / 2097152 ))
HP_DIR=/sys/kernel/mm/hugepages/hugepages-2048kB
hp_room() { echo $(( $(cat $HP_DIR/free_hugepages) - $(cat $HP_DIR/resv_hugepages) )); }
if [ ! -d "$HP_DIR" ]; then
    HP_NOTE="skipped: this kernel has no 2 MiB hugetlb pool"
else
    HP_BEFORE=$(cat "$HP_SYSCTL")
    SHORT=$(( HP_PAGES - $(hp_room) ))
    if [ "$SHORT" -gt 0 ]; then
        if echo $(( HP_BEFORE + SHORT )) 2>/dev/null > "$HP_SYSCTL"; then HP_RESTORE=$HP_BEFORE; fi
    fi
    if [ "$(hp_room)" -lt "$HP_PAGES" ]; then
        HP_NOTE="skipped: the pool has $(hp_room) free pages of the $HP_PAGES needed (vm.nr_hugepages=$(cat "$HP_SYSCTL"); reserving more needs root and free memory)"
    else
        P=$(port)
        "$FERRY" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --plaintext --hugepages --prealloc-guest "$MEM" > "$WORK/warm.log" 2>&1 &
        WPID=$!
        # Populating comes before the port opens; a cold pool on this VM
        # costs seconds per GiB.
        for _ in $(seq 600); do grep -q 'listening on' "$WORK/warm.log" && break; sleep 0.1; done
        wait_port "$P" || { cat "$WORK/warm.log" >&2; exit 1; }
        kill "$WPID"; wait "$WPID" 2>/dev/null || true
        WARM=$(grep -o 'preallocated in [0-9.]* s (CPU [0-9.]* s)' "$WORK/warm.log" | head -1)
        HP_NOTE="pool: $HP_PAGES pages of 2 MiB (vm.nr_hugepages $HP_BEFORE -> $(cat "$HP_SYSCTL"), given back at exit); their first use before the runs (ferry listen --hugepages --prealloc-guest $MEM): $WARM"
        CASES+=("$HP")
    fi
fi
if [ -n "$BEFORE" ]; then CASES+=("before: tcp --plaintext" "before: tcp (default: TLS)"); fi
key() { echo "$1" | tr ' :()' '____'; }
# The machine's load before and after the runs (1-minute load average):
# figures taken while other work runs are noisy and say so.
load() { cut -d' ' -f1 /proc/loadavg; }
LOAD_BEFORE=$(load)
for i in $(seq "$REPEAT"); do
    run_iperf
    run_ferry "$(key 'ferry tcp --plaintext')" "$FERRY" "$SEND_ARGS" --plaintext
    run_ferry "$(key 'ferry tcp (default: TLS)')" "$FERRY" "$SEND_ARGS"
    LISTEN_ARGS="--prealloc-guest $MEM" run_ferry "$(key "$PRE")" "$FERRY" "$SEND_ARGS" --plaintext
    if [[ " ${CASES[*]} " == *" $HP "* ]]; then
        LISTEN_ARGS="--hugepages" run_ferry "$(key "$HP")" "$FERRY" "$SEND_ARGS" --plaintext
    fi
    if [ -n "$BEFORE" ]; then
        run_ferry "$(key 'before: tcp --plaintext')" "$BEFORE" "" --plaintext
        run_ferry "$(key 'before: tcp (default: TLS)')" "$BEFORE" ""
    fi
done

GIB=$(python3 -c "print($BYTES / 2**30)")
LOAD_AFTER=$(load)
echo "== TCP over loopback: $MEM ($BYTES bytes) per run, $REPEAT runs per case interleaved, medians; $(nproc) cores; load average $LOAD_BEFORE before, $LOAD_AFTER after =="
echo "   CPU in seconds per GiB moved; ferry = Ferry's own work from its record, process = both whole processes (/usr/bin/time);"
echo "   audit = the source's audit after the commit, touch = the destination populating fresh memory where pages land"
echo "   (both parts of src/dst); data path = both less those two"
echo "   --hugepages row: $HP_NOTE"
printf '%-34s %13s %9s %9s %9s %10s %7s %7s %9s   %s\n' case rate "src/GiB" "dst/GiB" "both/GiB" "process" audit touch "data path" "rates (Gbit/s)"
# Median over runs of a python expression of the columns r[1..7], per GiB; "-" when any is missing.
pmed() { python3 -c "
import math, statistics, sys
g = $GIB
v = []
for l in open(sys.argv[1]):
    r = [None] + [float(x) for x in l.split()]
    x = eval(sys.argv[2])
    if not math.isnan(x):
        v.append(x / g)
print('%.3f' % statistics.median(v) if v else 'nan')" "$1" "$2"; }
declare -A RATE BOTH PROC DATA
for c in "${CASES[@]}"; do
    f=$WORK/$(key "$c")
    col() { cut -d' ' -f"$1" "$f" | median; }
    # per-run sums first, then medians
    RATE[$c]=$(col 1)
    src=$(awk -v g="$GIB" '{ print $2 / g }' "$f" | median)
    dst=$(awk -v g="$GIB" '{ print $3 / g }' "$f" | median)
    if [ "$c" = iperf3 ]; then
        src=$(awk -v g="$GIB" '{ print $4 / g }' "$f" | median)
        dst=$(awk -v g="$GIB" '{ print $5 / g }' "$f" | median)
        BOTH[$c]=$(awk -v g="$GIB" '{ print ($4 + $5) / g }' "$f" | median)
    else
        BOTH[$c]=$(awk -v g="$GIB" '{ print ($2 + $3) / g }' "$f" | median)
    fi
    PROC[$c]=$(awk -v g="$GIB" '{ print ($4 + $5) / g }' "$f" | median)
    if [ "$c" = iperf3 ]; then
        audit=-; touch=-; DATA[$c]=$(printf %.3f "${BOTH[$c]}")
    else
        audit=$(pmed "$f" 'r[6]'); touch=$(pmed "$f" 'r[7]')
        DATA[$c]=$(pmed "$f" 'r[2] + r[3] - r[6] - r[7]')
    fi
    printf '%-34s %6.2f Gbit/s %9.3f %9.3f %9.3f %10.3f %7s %7s %9s   (%s)\n' "$c" "${RATE[$c]}" "$src" "$dst" "${BOTH[$c]}" "${PROC[$c]}" \
        "$audit" "$touch" "${DATA[$c]}" \
        "$(cut -d' ' -f1 "$f" | xargs printf '%.2f ' | sed 's/ $//')"
done
ratio() { python3 -c "import sys, math; a,b=float(sys.argv[1]),float(sys.argv[2]); print('n/a' if math.isnan(a) or math.isnan(b) or b == 0 else '%.2f' % (a/b))" "$1" "$2"; }
verdict() { python3 -c "import sys; r=sys.argv[1]; print('n/a' if r=='n/a' else ('met' if eval(r + sys.argv[2]) else 'NOT met'))" "$1" "$2"; }
P="ferry tcp --plaintext"; T="ferry tcp (default: TLS)"
r1=$(ratio "${RATE[$P]}" "${RATE[iperf3]}")
c1=$(ratio "${BOTH[$P]}" "${BOTH[iperf3]}")
echo "-- ratios --"
echo "rate, ferry --plaintext / iperf3:                 $r1   (goal >= 1.0: $(verdict "$r1" '>= 1.0'))"
echo "CPU/GiB both sides, ferry --plaintext / iperf3:   $c1   (goal <= 1.5: $(verdict "$c1" '<= 1.5'))"
echo "CPU/GiB both processes, ferry --plaintext / iperf3: $(ratio "${PROC[$P]}" "${PROC[iperf3]}")"
echo "CPU/GiB data path (audit, first touch excluded), ferry --plaintext / iperf3: $(ratio "${DATA[$P]}" "${DATA[iperf3]}")"
echo "rate, ferry TLS / iperf3:                         $(ratio "${RATE[$T]}" "${RATE[iperf3]}")"
echo "CPU/GiB both sides, ferry TLS / iperf3:           $(ratio "${BOTH[$T]}" "${BOTH[iperf3]}")"
echo "TLS / --plaintext: rate $(ratio "${RATE[$T]}" "${RATE[$P]}"), CPU/GiB $(ratio "${BOTH[$T]}" "${BOTH[$P]}")"
echo "rate, ferry --plaintext into preallocated destination memory / iperf3: $(ratio "${RATE[$PRE]}" "${RATE[iperf3]}")   (beside the goal: it is judged on the default row)"
echo "CPU/GiB both sides, the same / iperf3:            $(ratio "${BOTH[$PRE]}" "${BOTH[iperf3]}")"
if [ -n "${RATE[$HP]:-}" ]; then
    echo "rate, ferry --plaintext into hugetlb destination memory (--hugepages) / iperf3: $(ratio "${RATE[$HP]}" "${RATE[iperf3]}")   (beside the goal, as above)"
    echo "CPU/GiB both sides, the same / iperf3:            $(ratio "${BOTH[$HP]}" "${BOTH[iperf3]}")"
else
    echo "--hugepages row $HP_NOTE"
fi
if [ -n "$BEFORE" ]; then
    for o in "tcp --plaintext" "tcp (default: TLS)"; do
        echo "this build / before, $o: rate $(ratio "${RATE[ferry $o]}" "${RATE[before: $o]}"), CPU/GiB both processes $(ratio "${PROC[ferry $o]}" "${PROC[before: $o]}")"
    done
fi
if [ -n "$JSON" ]; then
    python3 - "$WORK" "$JSON" "$MEM" "$BYTES" "$LOAD_BEFORE" "$LOAD_AFTER" "${CASES[@]}" <<'PY'
import json, sys
work, out, mem, nbytes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
load, cases = [float(sys.argv[5]), float(sys.argv[6])], sys.argv[7:]
key = lambda c: c.translate(str.maketrans(" :()", "____"))
doc = {"memory": mem, "bytes": nbytes, "load_average_before_after": load, "cases": {}}
for c in cases:
    runs = [dict(zip(["rate_gbit", "src_ferry_cpu_s", "dst_ferry_cpu_s", "src_process_cpu_s", "dst_process_cpu_s",
                      "src_audit_cpu_s", "dst_first_touch_cpu_s"],
                     map(float, l.split()))) for l in open(f"{work}/{key(c)}")]
    doc["cases"][c] = runs
json.dump(doc, open(out, "w"), indent=1, allow_nan=True)
PY
fi
