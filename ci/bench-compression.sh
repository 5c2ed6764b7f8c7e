#!/usr/bin/env bash
# Benchmark of the compression performance option (not a timed test).
#
# Builds three 1 GiB guest memory images in a temporary directory (never
# committed): a realistic mix (ELF binaries and libraries from /usr/lib, text,
# about 30 % zero pages, 5 % random pages), all random, and mostly zero. Each
# is migrated by `ferry send --guest-image` to `ferry listen` with the tcp
# option and the compression option with lz4 and zstd:
#   (a) over loopback;
#   (b) over one veth link between two network namespaces, shaped to
#       1 Gbit/s with tc on both ends (namespaces, link and addresses are
#       created here and removed at the end);
# and by QEMU's own migration (Debian's qemu-system-x86, multifd with 4
# channels and zstd, over loopback) with the same bytes as guest RAM.
# Prints, per row, the median of REPS runs: time, effective rate (guest bytes
# / time), bytes on the wire, and ratio (page bytes / wire bytes; zero pages
# travel as flags in every option and are not page bytes).
#
#   REPS=3          runs per row (median)
#   IMAGE_MIB=1024  image and guest size
#   SKIP_SHAPED=1   skip (b) (with --goals: skip comparison (2));  SKIP_QEMU=1  skip QEMU
#   RANDOM_MIB=1024 --goals: the random guest's size in comparison (1)
#   FERRY=PATH      use this ferry binary instead of building one
#   LISTEN_ARGS=... more arguments of `ferry listen`, e.g. "--prealloc-guest 1GiB"
#                   (the destination lands into memory backed before the runs:
#                   its first touch of fresh pages, whose cost on this VM swings
#                   from 0.3 to 2 s/GiB between runs, leaves every row's time)
#
# `ci/bench-compression.sh --goals [--before OLD_FERRY]` runs only issue 15's
# two comparisons, each option's runs interleaved with its peer's:
#   (1) a guest of random pages over loopback (RANDOM_MIB, default 1024;
#       runs of 512 MiB last 0.3 s, where a fixed start-up cost and the
#       machine's noise weigh more): the default option
#       (compression, zstd:1) against --performance-option tcp; the goal is
#       compression's median time at most 1.05x tcp's;
#   (2) the realistic mix (IMAGE_MIB) over the 1 Gbit/s link: tcp's time over
#       compression's, per pair of runs; the goal is >= 2.0 in every pair.
# Each comparison starts with one untimed pair (the first runs after the
# images are written are slower), then REPS interleaved pairs, each round
# starting with the next option in turn (the first run of a round is more
# often slow); (1) prints the
# ratio of the medians and the median of the per-pair ratios (a pair runs
# back to back, so it shares the machine's load: the steadier figure).
# With --before, OLD_FERRY's compression runs join each comparison (the same
# images, interleaved) so a change is measured against the build before it.
# cpu: Ferry's own CPU seconds on each side (source `summary.cpu.ferry_s`,
# destination `CPU X s` on its committed line), src+dst. Each run's line
# ends with its chunks sent compressed/raw (incompressible)/raw (link idle).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${REPS:-3}
MIB=${IMAGE_MIB:-1024}
GOALS=0
BEFORE=
while [ $# -gt 0 ]; do
    case "$1" in
        --goals) GOALS=1; shift ;;
        --before) BEFORE=$2; shift 2 ;;
        *) echo "bench-compression.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
NS_A=ferrybench-a NS_B=ferrybench-b
ADDR_A=10.213.77.1 ADDR_B=10.213.77.2

[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, tc)" >&2; exit 1; }
for p in qemu-system-x86 iproute2 python3; do
    dpkg -s "$p" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$p" >/dev/null; }
done

if [ -z "${FERRY:-}" ]; then
    cargo build --release --locked -q -p ferry-cli --bin ferry
    FERRY=$PWD/target/release/ferry
fi
WORK=$(mktemp -d /tmp/ferry-bench.XXXXXX)
cleanup() {
    set +e
    jobs -p | xargs -r kill 2>/dev/null
    ip netns del "$NS_A" 2>/dev/null
    ip netns del "$NS_B" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
"$FERRY" gen-key "$WORK/key" > /dev/null

if [ "$GOALS" = 0 ]; then
    echo "== building ${MIB} MiB images in $WORK"
    python3 ci/memimage.py "$WORK" "$MIB"
fi

# One ferry migration; prints "total_ms bytes_on_wire payload_bytes src_cpu_s dst_cpu_s".
# FERRY_BIN (default $FERRY) is the binary of both ends; GUEST_MIB the guest size.
ferry_once() { # netns-or-empty listen-addr image option...
    local ns=$1 addr=$2 img=$3; shift 3
    local FERRY=${FERRY_BIN:-$FERRY} MIB=${GUEST_MIB:-$MIB}
    local run_a=() run_b=()
    if [ -n "$ns" ]; then run_a=(ip netns exec "$NS_A"); run_b=(ip netns exec "$NS_B"); fi
    # --plaintext on both ends: compared with QEMU's unencrypted migration
    # (ci/bench-encrypt.sh measures what encryption adds).
    # shellcheck disable=SC2086 # LISTEN_ARGS: words
    "${run_b[@]}" "$FERRY" listen --listen "$addr" --auth-key-file "$WORK/key" --plaintext --once \
        ${LISTEN_ARGS:-} >"$WORK/listen.out" 2>&1 &
    local lp=$!
    # A connection that closes before its hello is not a migration attempt,
    # so probing does not use up --once.
    for _ in $(seq 200); do
        "${run_a[@]}" bash -c "exec 3<>/dev/tcp/${addr%:*}/${addr#*:}" 2>/dev/null && break
        sleep 0.05
    done
    "${run_a[@]}" "$FERRY" send --to "$addr" --auth-key-file "$WORK/key" --memory "${MIB}MiB" \
        --dirty-rate 0 --guest-image "$img" --plaintext --json "$WORK/s.json" "$@" \
        >"$WORK/send.out" 2>&1 || { cat "$WORK/send.out" "$WORK/listen.out" >&2; return 1; }
    wait "$lp"
    python3 - "$WORK/s.json" "$WORK/listen.out" <<'PY'
import json, re, sys
d = json.load(open(sys.argv[1]))
m = re.search(r"CPU ([0-9.]+) s", open(sys.argv[2]).read())
src = d.get("cpu", {}).get("ferry_s", float("nan"))
ch = d.get("channels", [])
kinds = "/".join(str(sum(c.get(k, 0) for c in ch))
                 for k in ("compressed_chunks", "raw_incompressible_chunks", "raw_link_idle_chunks"))
print(d["total_ms"], d["bytes_on_wire"], d["payload_bytes"], src, m.group(1) if m else "nan", kinds)
PY
}

# QEMU migration of the image as guest RAM; prints "total_ms bytes_on_wire payload_bytes".
qemu_once() { # image
    local img=$1 port=$((20000 + RANDOM % 20000)) accel=tcg
    [ -w /dev/kvm ] && accel=kvm
    local common=(-machine "pc,accel=$accel,memory-backend=ram" -m "${MIB}M" -nodefaults
                  -display none -vga none -S)
    qemu-system-x86_64 "${common[@]}" \
        -object "memory-backend-file,id=ram,size=${MIB}M,mem-path=$img,share=off" \
        -qmp "unix:$WORK/src.qmp,server=on,wait=off" >/dev/null 2>&1 &
    local qs=$!
    qemu-system-x86_64 "${common[@]}" \
        -object "memory-backend-ram,id=ram,size=${MIB}M" -incoming defer \
        -qmp "unix:$WORK/dst.qmp,server=on,wait=off" >/dev/null 2>&1 &
    local qd=$!
    python3 - "$WORK/src.qmp" "$WORK/dst.qmp" "$port" <<'PY'
import json, socket, sys, time
def qmp(path):
    for _ in range(200):
        try:
            s = socket.socket(socket.AF_UNIX); s.connect(path); break
        except OSError:
            time.sleep(0.05)
    f = s.makefile("rw")
    json.loads(f.readline())
    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
        while True:
            r = json.loads(f.readline())
            if "return" in r: return r["return"]
            if "error" in r: raise SystemExit(f"{name}: {r['error']}")
    cmd("qmp_capabilities")
    return cmd
src, dst, port = qmp(sys.argv[1]), qmp(sys.argv[2]), sys.argv[3]
for c in (src, dst):
    c("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    c("migrate-set-parameters", **{"multifd-channels": 4, "multifd-compression": "zstd",
                                   "max-bandwidth": 1 << 40})
dst("migrate-incoming", uri=f"tcp:127.0.0.1:{port}")
src("migrate", uri=f"tcp:127.0.0.1:{port}")
while True:
    q = src("query-migrate")
    if q.get("status") == "completed": break
    if q.get("status") in ("failed", "cancelled"): raise SystemExit(f"qemu migration {q}")
    time.sleep(0.02)
ram = q["ram"]
print(q["total-time"], ram["transferred"], ram["normal-bytes"], "nan", "nan", "-")
PY
    kill "$qs" "$qd" 2>/dev/null; wait "$qs" "$qd" 2>/dev/null || true
}

# Runs a row REPS times and prints it.
row() { # label image cmd...
    local label=$1 img=$2; shift 2
    local lines=()
    for _ in $(seq "$REPS"); do
        lines+=("$("$@")")
    done
    # The run with the median time.
    local med
    med=$(printf '%s\n' "${lines[@]}" | sort -n -k1,1 | awk '{ v[NR] = $0 } END { print v[int((NR + 1) / 2)] }')
    local all
    all=$(printf '%s\n' "${lines[@]}" | awk '{ printf "%s%.2f", (NR > 1 ? "/" : ""), $1 / 1000 }')
    read -r ms wire payload _ <<<"$med"
    python3 -c "
ms, wire, payload, gb = $ms, $wire, $payload, $MIB * 2**20
print(f'{\"$label\":<34} {\"$(basename "$img" .img)\":<7} {ms/1e3:7.2f} s {gb/ms/1e3:8.0f} MB/s {wire/1e6:9.1f} MB {payload/max(wire,1):6.2f}   ($all s)')"
}

header() {
    echo
    echo "== $1"
    printf '%-34s %-7s %9s %13s %12s %6s   %s\n' option image time "effective" "on the wire" ratio "runs"
}

# Two namespaces joined by one veth link shaped to 1 Gbit/s both ways.
shaped_link_up() {
    ip netns add "$NS_A"
    ip netns add "$NS_B"
    ip link add fb-a netns "$NS_A" type veth peer name fb-b netns "$NS_B"
    ip -n "$NS_A" addr add "$ADDR_A/30" dev fb-a
    ip -n "$NS_B" addr add "$ADDR_B/30" dev fb-b
    for n in "$NS_A:fb-a" "$NS_B:fb-b"; do
        ip -n "${n%%:*}" link set lo up
        ip -n "${n%%:*}" link set "${n#*:}" up
        ip netns exec "${n%%:*}" tc qdisc replace dev "${n#*:}" root tbf rate 1gbit burst 256kb latency 10ms
    done
}

# Issue 15's comparisons: runs of the options interleaved, one line per run,
# then medians and ratios. Rows: label=args (FERRY_BIN picked by label "before").
goal_rows() { # title netns-or-empty addr image guest-mib
    local title=$1 ns=$2 addr=$3 img=$4 gmib=$5
    local labels=("tcp" "compression")
    [ -n "$BEFORE" ] && labels+=("before: compression")
    echo
    echo "== $title ($gmib MiB $(basename "$img" .img) guest, $REPS runs each, interleaved)"
    : > "$WORK/goal.txt"
    # One untimed pair first: the first migrations after the images were
    # written run slower (page cache, memory the hypervisor took back), and
    # would land on whichever option runs first.
    FERRY_BIN=$FERRY GUEST_MIB=$gmib ferry_once "$ns" "$addr" "$img" --performance-option tcp > /dev/null
    FERRY_BIN=$FERRY GUEST_MIB=$gmib ferry_once "$ns" "$addr" "$img" > /dev/null
    # Each round starts with the next option (tcp first in round 1, the
    # compression option first in round 2, ...): the first run of a round
    # follows the previous round's parsing and is more often the slow one
    # (memory the hypervisor took back in between), so no option gets that
    # place every time.
    local n=${#labels[@]}
    for i in $(seq "$REPS"); do
        local order=() k
        for k in $(seq 0 $((n - 1))); do order+=("${labels[$(((i - 1 + k) % n))]}"); done
        for l in "${order[@]}"; do
            local bin=$FERRY args=()
            case "$l" in
                tcp) args=(--performance-option tcp) ;;
                "before: compression") bin=$BEFORE ;;
            esac
            local r
            r=$(FERRY_BIN=$bin GUEST_MIB=$gmib ferry_once "$ns" "$addr" "$img" "${args[@]}")
            echo "$i|$l|$r" >> "$WORK/goal.txt"
            printf '  run %d %-22s %s\n' "$i" "$l" "$r"
        done
    done
    python3 - "$WORK/goal.txt" "$gmib" <<'PY'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    i, label, r = line.rstrip("\n").split("|")
    ms, wire, payload, src, dst, _kinds = r.split()
    rows.setdefault(label, []).append((int(i), float(ms) / 1e3, int(wire), int(payload), float(src), float(dst)))
gb = int(sys.argv[2]) * 2**20
print(f"  {'option':<22} {'time':>8} {'guest rate':>12} {'ratio':>6} {'cpu src+dst':>14}   runs (s)")
med = {}
for label, rs in rows.items():
    t = statistics.median(r[1] for r in rs)
    med[label] = t
    w = statistics.median(r[3] / max(r[2], 1) for r in rs)
    cs = statistics.median(r[4] for r in rs); cd = statistics.median(r[5] for r in rs)
    runs = " ".join(f"{r[1]:.2f}" for r in rs)
    print(f"  {label:<22} {t:7.2f}s {gb / t / 1e6:8.0f} MB/s {w:6.2f} {cs:6.2f}+{cd:<6.2f}   ({runs})")
tcp = dict((r[0], r[1]) for r in rows["tcp"])
for label in rows:
    if label == "tcp":
        continue
    per = [tcp[r[0]] / r[1] for r in rows[label]]
    print(f"  {label}: median time / tcp's {med[label] / med['tcp']:.3f}; median of its time / tcp's per pair "
          f"{statistics.median(1 / p for p in per):.3f}; tcp time / its time per run: "
          + " ".join(f"{p:.2f}" for p in per))
PY
}

if [ "$GOALS" = 1 ]; then
    RMIB=${RANDOM_MIB:-1024}
    echo "== building images in $WORK: $RMIB MiB random, ${MIB} MiB mix"
    mkdir -p "$WORK/rnd"
    python3 ci/memimage.py "$WORK/rnd" "$RMIB" random
    goal_rows "loopback: compression (default) vs tcp; goal: time <= 1.05x tcp's" "" 127.0.0.1:16600 "$WORK/rnd/random.img" "$RMIB"
    if [ "${SKIP_SHAPED:-0}" != 1 ]; then
        python3 ci/memimage.py "$WORK" "$MIB" mix
        shaped_link_up
        goal_rows "one veth link shaped to 1 Gbit/s: compression (default) vs tcp; goal: tcp time / compression time >= 2.0 in every run" ns "$ADDR_B:6600" "$WORK/mix.img" "$MIB"
    fi
    echo
    echo "time: connect to Committed, including both sides' memory digests; ratio = page bytes / wire bytes"
    exit 0
fi

header "loopback"
for img in mix random zero; do
    f="$WORK/$img.img"
    row "ferry tcp" "$f" ferry_once "" 127.0.0.1:16600 "$f" --performance-option tcp
    row "ferry compression lz4" "$f" ferry_once "" 127.0.0.1:16600 "$f" --compression lz4
    row "ferry compression zstd:1" "$f" ferry_once "" 127.0.0.1:16600 "$f" --compression zstd:1
    if [ "${SKIP_QEMU:-0}" != 1 ]; then
        row "qemu 7.2 multifd 4 + zstd" "$f" qemu_once "$f"
    fi
done

if [ "${SKIP_SHAPED:-0}" != 1 ]; then
    shaped_link_up
    header "one veth link shaped to 1 Gbit/s (tc tbf) between two namespaces"
    for img in mix random zero; do
        f="$WORK/$img.img"
        row "ferry tcp" "$f" ferry_once ns "$ADDR_B:6600" "$f" --performance-option tcp
        row "ferry compression lz4" "$f" ferry_once ns "$ADDR_B:6600" "$f" --compression lz4
        row "ferry compression zstd:1" "$f" ferry_once ns "$ADDR_B:6600" "$f" --compression zstd:1
    done
fi
echo
echo "time: connect to Committed, including both sides' memory digests; effective = guest bytes / time"
