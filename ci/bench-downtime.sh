#!/usr/bin/env bash
# Benchmark: the pause (downtime) and its parts against guest size, with the
# pre-wave Ferry ("before") and QEMU 7.2 migrating the same idle bytes in the
# same run.
#
#   ci/bench-downtime.sh [--sizes "1 2 4 8"] [--repeat 3] [--baseline PATH]
#                        [--no-qemu] [--no-baseline] [--large]
#
# For every guest size (GiB), two processes over loopback (`ferry listen
# --once`, `ferry send`), `--performance-option tcp`, defaults otherwise (TLS,
# page evidence, audit): an idle guest and one dirtying 64 MB/s, both the
# synthetic guest's mix (a quarter of the pages zero, the rest data). The
# pause and its parts come from each run's --json record (`downtime_ms`,
# `pause_actual`, `pause_predicted`); medians over --repeat runs.
#
# "before": the same runs with the binary of commit 8349d93 (the whole-memory
# digest inside the pause): --baseline PATH, else /work/baseline/ferry-8349d93
# when present, else built from this repository's history into a temporary
# worktree.
#
# QEMU: two qemu-system-x86_64 (Debian's 7.2; ci/softroce/install.sh installs
# it), q35 TCG, one vCPU, the source paused (-S) with random bytes loaded
# into RAM (-device loader,...,force-raw=on), migrated over loopback with the
# bandwidth cap lifted; `query-migrate`'s `downtime`. Its content is the same
# bytes of data as Ferry's idle guest, capped at 1.5 GiB (what fits between
# 256 MiB and q35's 2 GiB of low RAM in one loader; an idle paused guest's
# downtime does not grow with content it already sent).
#
# --large adds the large-guest runs of issue 14: an 8 GiB guest of non-zero
# pages and a 16 GiB guest with 5% data, idle, with each side's peak RSS,
# the guest's resident part and Ferry's own (the goal: under 2% of the
# guest size).
#
# Goals printed at the end: idle pause at most 20 ms at every size; 8 GiB no
# more than twice 1 GiB; 4 GiB dirtying 64 MB/s within the default 300 ms
# limit, verified; Ferry's own memory under 2% of the guest on either side.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZES="1 2 4 8"
REPEAT=3
BASELINE=
QEMU=1
BEFORE=1
LARGE=0
while [ $# -gt 0 ]; do
    case "$1" in
        --sizes) SIZES=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        --baseline) BASELINE=$2; shift 2 ;;
        --no-qemu) QEMU=0; shift ;;
        --no-baseline) BEFORE=0; shift ;;
        --large) LARGE=1; shift ;;
        *) echo "bench-downtime.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
cd "$ROOT"
cargo build --release --locked -q -p ferry-cli --bin ferry
FERRY=$ROOT/target/release/ferry
WORK=$(mktemp -d)
cleanup() {
    [ -n "${BASE_TREE:-}" ] && git -C "$ROOT" worktree remove --force "$BASE_TREE" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$BEFORE" = 1 ] && [ -z "$BASELINE" ]; then
    if [ -x /work/baseline/ferry-8349d93 ]; then
        BASELINE=/work/baseline/ferry-8349d93
    else
        echo "building the pre-wave ferry (commit 8349d93) for the \"before\" rows..." >&2
        BASE_TREE=$WORK/base-tree
        git -C "$ROOT" worktree add --detach "$BASE_TREE" 8349d93 >/dev/null
        (cd "$BASE_TREE" && cargo build --release -q -p ferry-migration --bin ferry)
        BASELINE=$BASE_TREE/target/release/ferry
    fi
fi
if [ "$QEMU" = 1 ] && ! command -v qemu-system-x86_64 >/dev/null; then
    bash "$ROOT/ci/softroce/install.sh" >/dev/null
fi

"$FERRY" gen-key "$WORK/key" >/dev/null
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# One migration: BINARY NAME SIZE_GIB RATE ZERO_FRACTION [extra send flags]
# leaves NAME.json (the source's record) and NAME.dest (the destination's output).
migrate() {
    local bin=$1 name=$2 gib=$3 rate=$4 zero=$5
    shift 5
    local p
    p=$(port)
    "$bin" listen --listen 127.0.0.1:"$p" --auth-key-file "$WORK/key" --once \
        --memory-limit 64GiB > "$WORK/$name.dest" 2>&1 &
    local lpid=$!
    for _ in $(seq 200); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1',$p)).close()" 2>/dev/null && break
        sleep 0.05
    done
    if ! "$bin" send --to 127.0.0.1:"$p" --auth-key-file "$WORK/key" --memory "${gib}GiB" \
        --dirty-rate "$rate" --zero-fraction "$zero" --performance-option tcp \
        --json "$WORK/$name.json" "$@" > "$WORK/$name.send" 2>&1; then
        echo "bench-downtime.sh: $name failed:" >&2
        tail -5 "$WORK/$name.send" >&2
    fi
    wait "$lpid" || true
}

for i in $(seq "$REPEAT"); do
    for gib in $SIZES; do
        for load in idle busy; do
            rate=0
            [ "$load" = busy ] && rate=64MB/s
            echo "run $i: ${gib} GiB $load" >&2
            migrate "$FERRY" "after.$gib.$load.$i" "$gib" "$rate" 0.25
            if [ "$BEFORE" = 1 ]; then
                migrate "$BASELINE" "before.$gib.$load.$i" "$gib" "$rate" 0.25
            fi
        done
    done
done
if [ "$LARGE" = 1 ]; then
    echo "large: 8 GiB of non-zero pages" >&2
    migrate "$FERRY" "large.8.dense" 8 0 0
    echo "large: 16 GiB, 5% data" >&2
    migrate "$FERRY" "large.16.sparse" 16 0 0.95
fi

if [ "$QEMU" = 1 ]; then
    for i in $(seq "$REPEAT"); do
        for gib in $SIZES; do
            echo "run $i: QEMU ${gib} GiB idle" >&2
            for limit in 300 10; do
            python3 - "$ROOT" "$WORK" "$gib" "$i" "$limit" <<'EOF'
import json, os, sys
root, work, gib, i, limit = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
sys.path.insert(0, os.path.join(root, "ci", "qemu"))
from driver import Vm  # noqa: E402
content = min(gib * (3 << 28), 3 << 29)  # 75% of the guest, at most 1.5 GiB
img = os.path.join(work, f"qemu.{gib}.img")
if not os.path.exists(img) or os.path.getsize(img) != content:
    with open("/dev/urandom", "rb") as r, open(img, "wb") as w:
        left = content
        while left:
            n = min(left, 64 << 20)
            w.write(r.read(n))
            left -= n
port = __import__("socket").socket()
port.bind(("127.0.0.1", 0))
p = port.getsockname()[1]
port.close()
src = Vm(f"src{gib}", work, mem_kib=gib << 20, paused=True, loaders=[(img, 0x10000000)])
dst = Vm(f"dst{gib}", work, mem_kib=gib << 20, paused=True, incoming=True)
try:
    for vm in (src, dst):
        vm.set_migration(downtime_limit_ms=limit)
    dst.incoming(f"tcp:127.0.0.1:{p}")
    src.migrate(f"tcp:127.0.0.1:{p}")
    q = src.wait_migration(600)
    out = {"status": q.get("status"), "downtime_ms": q.get("downtime"),
           "total_ms": q.get("total-time"), "content": content}
finally:
    src.kill()
    dst.kill()
with open(os.path.join(work, f"qemu.{gib}.{limit}.{i}.json"), "w") as f:
    json.dump(out, f)
EOF
            done
        done
    done
fi

python3 - "$WORK" "$SIZES" "$REPEAT" "$BEFORE" "$QEMU" "$LARGE" <<'EOF'
import json, os, re, statistics, sys
work, sizes, repeat = sys.argv[1], [int(s) for s in sys.argv[2].split()], int(sys.argv[3])
before, qemu, large = sys.argv[4] == "1", sys.argv[5] == "1", sys.argv[6] == "1"

def load(name):
    try:
        with open(os.path.join(work, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def committed(d):
    return d and d.get("outcome", "committed") == "committed" and "downtime_ms" in d

def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None

def fmt(x, w=8, p=1):
    return f"{x:{w}.{p}f}" if x is not None else " " * (w - 1) + "-"

def runs(prefix, gib, load_):
    return [load(f"{prefix}.{gib}.{load_}.{i}.json") for i in range(1, repeat + 1)]

def dest_own(prefix, gib, load_):
    """Ferry's own memory on the destination, % of the guest, per run (its line)."""
    out = []
    for i in range(1, repeat + 1):
        try:
            text = open(os.path.join(work, f"{prefix}.{gib}.{load_}.{i}.dest")).read()
        except OSError:
            continue
        m = re.search(r"own ([\d.]+)% of the guest\)", text)
        out.append(float(m.group(1)) if m else None)
    return out

print()
print(f"== Pause against guest size: tcp option, two processes over loopback, medians of {repeat} ==")
print("guest: synthetic, 75% data pages; after = this tree (TLS, page evidence, audit), before = 8349d93 (whole-memory digest)")
print()
print(f"{'size':>5} {'load':>8} {'version':>7} {'pause ms':>9} {'final':>8} {'devst':>8} {'verify':>8} {'commit':>8} {'predict':>8} {'total s':>8} {'ok':>3} {'own% src':>8} {'dst':>5}")
after = {}
for gib in sizes:
    for load_, label in (("idle", "idle"), ("busy", "64MB/s")):
        rows = [("after", runs("after", gib, load_))]
        if before:
            rows.append(("before", runs("before", gib, load_)))
        for version, rs in rows:
            ok = [r for r in rs if committed(r)]
            pa = lambda k: med([r.get("pause_actual", {}).get(k) for r in ok])
            pause = med([r["downtime_ms"] for r in ok])
            if version == "after":
                after[(gib, load_)] = (pause, ok)
            verify = pa("verification_ms") if version == "after" else med([r.get("digest_ms") for r in ok])
            print(f"{gib:>4}G {label:>8} {version:>7} {fmt(pause, 9)} {fmt(pa('final_copy_ms'))} "
                  f"{fmt(pa('device_state_ms'), 8, 2)} {fmt(verify)} {fmt(pa('commit_round_trip_ms'))} "
                  f"{fmt(med([r.get('predicted_downtime_ms') for r in ok]))} "
                  f"{fmt(med([r['total_ms'] / 1e3 for r in ok]), 8, 2)} {len(ok):>2}/{len(rs)}"
                  + (f" {fmt(med([r.get('memory', {}).get('own_percent_of_guest') for r in ok]), 8, 2)}"
                     f" {fmt(med(dest_own(version, gib, load_)), 5, 2)}" if version == "after" else ""))
print("columns (after): final copy, device state, verification (Switchover to Ready checked), commit round trip")
print("(Commit to Committed, the restore included), the predicted pause, Ferry's own memory (peak RSS minus")
print("guest memory) as % of the guest on the source and the destination; before: verify = its digest_ms")

if qemu:
    print()
    print(f"== QEMU 7.2, same machine and run: paused TCG guest, RAM content loaded, migrated over loopback, medians of {repeat} ==")
    print("downtime-limit 300 ms (its default, as Ferry's) and 10 ms (QEMU then copies everything before it stops)")
    print(f"{'size':>5} {'content':>9} {'downtime ms':>12} {'total s':>8} {'@10ms: downtime':>16} {'total s':>8} {'completed':>9}")
    for gib in sizes:
        cols, n, content = [], 0, 0
        for limit in (300, 10):
            qs = [load(f"qemu.{gib}.{limit}.{i}.json") for i in range(1, repeat + 1)]
            ok = [q for q in qs if q and q.get("status") == "completed"]
            n += len(ok)
            content = ok[0]["content"] / (1 << 30) if ok else content
            cols.append((med([q["downtime_ms"] for q in ok]), med([q["total_ms"] / 1e3 for q in ok])))
        print(f"{gib:>4}G {content:>8.2f}G {fmt(cols[0][0], 12)} {fmt(cols[0][1], 8, 2)} "
              f"{fmt(cols[1][0], 16)} {fmt(cols[1][1], 8, 2)} {n:>6}/{2 * repeat}")

if large:
    print()
    print("== Large guests (after), idle, one run each ==")
    print(f"{'guest':>22} {'pause ms':>9} {'src RSS':>9} {'src own':>9} {'src own%':>8} {'dst RSS':>9} {'dst guest':>9} {'dst own%':>8} {'audit':>7}")
    for name, label in (("large.8.dense", "8 GiB, all data"), ("large.16.sparse", "16 GiB, 5% data")):
        d = load(f"{name}.json")
        dest = ""
        try:
            dest = open(os.path.join(work, f"{name}.dest")).read()
        except OSError:
            pass
        m = re.search(r"peak RSS ([\d.]+ \S+) \(guest ([\d.]+ \S+), own ([\d.]+)% of the guest\)", dest)
        if committed(d):
            mem = d.get("memory", {})
            gi = lambda b: f"{b / (1 << 30):.2f}G"
            print(f"{label:>22} {fmt(d['downtime_ms'], 9)} {gi(mem.get('peak_rss_bytes', 0)):>9} "
                  f"{gi(mem.get('own_bytes', 0)):>9} {mem.get('own_percent_of_guest', 0):>7.2f}% "
                  f"{(m.group(1) if m else '-'):>9} {(m.group(2) if m else '-'):>9} {(m.group(3) + '%' if m else '-'):>8} "
                  f"{d.get('audit', {}).get('result', '-'):>7}")
        else:
            print(f"{label:>22} failed: {(d or {}).get('error', 'no record')}")

print()
print("== Goals ==")
idle = {g: after.get((g, "idle"), (None, []))[0] for g in sizes}
for g in sizes:
    p = idle[g]
    print(f"idle {g} GiB pause {fmt(p, 0)} ms <= 20 ms: {'yes' if p is not None and p <= 20 else 'NO'}")
for g in sizes:
    ok = after.get((g, "idle"), (None, []))[1]
    src = med([r.get("memory", {}).get("own_percent_of_guest") for r in ok])
    dst = med(dest_own("after", g, "idle"))
    fits = src is not None and dst is not None and max(src, dst) < 2
    print(f"idle {g} GiB Ferry's own memory: source {fmt(src, 0, 2)}%, destination {fmt(dst, 0, 2)}% "
          f"< 2% of the guest: {'yes' if fits else 'NO'}")
if 1 in idle and 8 in idle and idle[1] and idle[8] is not None:
    print(f"idle 8 GiB / 1 GiB = {idle[8] / idle[1]:.2f} <= 2: {'yes' if idle[8] <= 2 * idle[1] else 'NO'}")
if (4, "busy") in after:
    p, ok = after[(4, "busy")]
    verified = ok and all(r.get("digest_verified") and r.get("audit", {}).get("result") == "passed" for r in ok)
    print(f"4 GiB dirtying 64 MB/s pause {fmt(p, 0)} ms <= 300 ms, verified and audited: "
          f"{'yes' if p is not None and p <= 300 and verified else 'NO'}")
EOF
