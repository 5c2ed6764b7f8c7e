#!/usr/bin/env bash
# Benchmark of the relay (issue 13): QEMU 7.2 migrating its guests itself,
# straight over ONE link of the namespace test bed (ci/netns-testbed.sh: 4
# veth links of 1 Gbit/s, tbf both ways), against the same guests through
# `ferry relay` over all four links, in the same run. Needs root.
#
#   ci/bench-relay.sh [--repeat 3] [--keep-testbed] [--no-running]
#
# Guests (ci/qemu/driver.py; x86_64 q35 under TCG, one vCPU):
#   * paused 1 GiB (-S, never run) with 512 MiB of random content loaded at
#     256 MiB, and the same with 512 MiB of the realistic memory mix
#     (ci/memimage.py: binaries, text, zero and random pages); migrated with
#     one connection and with multifd (4 channels, all to the one address);
#   * running: Debian's kernel and memcheck (ci/qemu/memcheck.c, 64 MiB
#     rewritten and checked every 500 ms; RAM 1 GiB less 8 KiB, see
#     DEFAULT_MEM_KIB in driver.py), migrated while it runs; the destination
#     must go on printing OK passes.
# Every run: the destination starts paused (-S), and its RAM is compared
# byte for byte with the source's (pmemsave, both paused) before it resumes.
# Printed per row: the median over --repeat runs of QEMU's total-time, the
# rate (QEMU's transferred bytes over that time), its downtime, and whether
# every run's RAM compared equal; "runs" lists every run's time.
#
# The relay rows (same guests through `ferry relay` over the 4 links, with
# and without compression; the ratio to direct; goal: >= 3.6x) are added
# with `ferry relay` itself: see RELAY ROWS at the end. Until it exists this
# script prints the direct rows and says so.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPEAT=3
KEEP=0
RUNNING=1
while [ $# -gt 0 ]; do
    case "$1" in
        --repeat) REPEAT=$2; shift 2 ;;
        --keep-testbed) KEEP=1; shift ;;
        --no-running) RUNNING=0; shift ;;
        *) echo "bench-relay.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ "$(id -u)" = 0 ] || { echo "bench-relay.sh: needs root (network namespaces)" >&2; exit 1; }
cd "$ROOT"
bash ci/softroce/install.sh >/dev/null
export FERRY_TESTBED_SRC=fq-src FERRY_TESTBED_DST=fq-dst
if ip netns list | awk '{print $1}' | grep -qx "$FERRY_TESTBED_SRC"; then KEEP=1; fi
WORK=$(mktemp -d /tmp/fqbench.XXXXXX)
cleanup() {
    rm -rf "$WORK"
    [ "$KEEP" = 1 ] || bash "$ROOT/ci/netns-testbed.sh" down >/dev/null
}
trap cleanup EXIT
bash ci/netns-testbed.sh up
bash ci/qemu/build-guest.sh >/dev/null
python3 ci/memimage.py "$WORK" 512 mix random

python3 - "$WORK" "$REPEAT" "$RUNNING" <<'PY'
import os, statistics, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "ci", "qemu"))
import driver

work, repeat, running = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
SRC, DST = "fq-src", "fq-dst"
GIB_KIB = 1 << 20
port = [4500]


def direct(link):
    port[0] += 1
    return f"tcp:10.200.{link}.2:{port[0]}"


def runs(label, path, n, **kw):
    """n migrations of one kind; prints the row, fails on any problem."""
    res = []
    for _ in range(n):
        r = driver.migrate_once(work, direct(0), src_ns=SRC, dst_ns=DST, **kw)
        bad = driver.problems(r)
        if bad:
            sys.exit(f"bench-relay.sh: {label} over {path}: {'; '.join(bad)}")
        res.append(r)
    t = statistics.median(r["total_ms"] for r in res)
    med = min(res, key=lambda r: abs(r["total_ms"] - t))
    gbit = med["transferred"] * 8 / med["total_ms"] / 1e6
    down = statistics.median(r["downtime_ms"] for r in res)
    ram = "equal" if all(r["ram"]["equal"] for r in res) else "DIFFERS"
    times = "/".join(f"{r['total_ms'] / 1000:.2f}" for r in res)
    print(f"{label:<34} {path:<26} {t / 1000:6.2f} s {gbit:6.2f} Gbit/s {down:6.0f} ms  {ram:<7} ({times} s)",
          flush=True)
    return med


print(f"== QEMU {os.popen('qemu-system-x86_64 --version').readline().split()[3]} migration over the "
      f"namespace test bed (4 links x 1 Gbit/s), {repeat} run(s) per row, medians ==")
print(f"{'guest':<34} {'path':<26} {'time':>8} {'rate':>13} {'downtime':>9}  {'RAM':<7} runs")
for kind in ("random", "mix"):
    img = os.path.join(work, f"{kind}.img")
    label = f"paused 1 GiB, 512 MiB {kind}"
    for mf in (0, 4):
        path = "direct, 1 link" + (f", multifd {mf}" if mf else "")
        runs(label, path, repeat, mem_kib=GIB_KIB, running=False,
             loaders=[(img, 0x10000000)], multifd=mf)
if running:
    med = runs("running, memcheck 64 MiB", "direct, 1 link", repeat,
               running=True, memcheck={"mib": 64})
    print(f"{'':<34} destination after resuming: {', '.join(med['dst_passes'])} "
          f"(source's last: pass {med['src_last_pass']})")
print("time: QEMU's total-time (migrate to completed on the source); rate: its transferred bytes "
      "over that time")
PY

# ---- RELAY ROWS --------------------------------------------------------------
# Added with `ferry relay` (issue 13): the guests above through the relay over
# all four links — `ferry listen --relay-allow 127.0.0.1/32` in fq-dst, the
# destination QEMU listening on 127.0.0.1 there (--deliver-to), `ferry relay
# --listen 127.0.0.1:PORT --to 10.200.0.2` in fq-src, the source QEMU
# migrating to tcp:127.0.0.1:PORT — with --performance-option tcp and with
# compression, each beside its direct row and the ratio. Nothing here pretends
# to measure them before `ferry relay` exists.
FERRY=${FERRY:-$ROOT/target/release/ferry}
if [ -x "$FERRY" ] && "$FERRY" relay --help >/dev/null 2>&1; then
    echo "relay rows: $FERRY has 'relay', but this script's relay rows are not written yet (issue 13)"
    exit 1
fi
echo "relay rows (QEMU through \`ferry relay\` over 4 links, tcp and compression): not run, they need \`ferry relay\` (issue 13)"
