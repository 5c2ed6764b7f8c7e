#!/usr/bin/env bash
# Benchmark of the relay (issue 13): QEMU 7.2 migrating its guests itself,
# straight over ONE link of the namespace test bed (ci/netns-testbed.sh: 4
# veth links of 1 Gbit/s, tbf both ways), against the same guests through
# `ferry relay` over all four links, in the same run. Needs root.
#
#   ci/bench-relay.sh [--repeat 3] [--keep-testbed] [--no-running] [--guests random,mix,running]
#                     [--options tcp,compression] [--multifd 0,4]
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
# Beside them, QEMU's ceiling on this machine at this moment: the same
# guest migrated with no link at all (both QEMUs in fq-src, over loopback):
# no transport can carry QEMU's stream faster than QEMU makes and loads it.
# Every run: the destination starts paused (-S), and its RAM is compared
# byte for byte with the source's (pmemsave, both paused) before it resumes.
# Printed per row: the median over --repeat runs of QEMU's total-time, the
# rate (QEMU's transferred bytes over that time), its downtime, and whether
# every run's RAM compared equal; "runs" lists every run's time.
#
# Relay rows, same run, same guests: through `ferry relay` over all four
# links (`ferry listen` in fq-dst, the destination QEMU listening on
# 127.0.0.1 there = --deliver-to; `ferry relay --listen 127.0.0.1:PORT --to
# 10.200.0.2` in fq-src, one relay process per migration; the source QEMU
# migrates to tcp:127.0.0.1:PORT), with --performance-option tcp and
# compression (lz4 per chunk, only where it pays), each printed with its
# ratio to the direct one-link row of the same guest (goal: >= 3.6x). Every
# relay run must exit 0 (every byte of every stream delivered, digests
# matched) and the RAMs compare equal. Each relay row also says where the
# time went, from the relay's per-stream metrics (`ferry relay --json` and
# the `relay stream` lines `ferry listen` logs): "dst QEMU N%" is the time
# the destination relay waited for its QEMU to take bytes (the busiest
# stream's, over QEMU's total time), "window N%" the time the source
# relay's reader waited for credit, and "cpu" the CPU seconds of `ferry
# relay` + `ferry listen` for the run (QEMU's own are not counted); with
# compression, "lz4 N%" the share of chunks sent compressed (the others went
# raw: their link was about to idle, or they did not shrink). FERRY=path picks the binary (default
# target/release/ferry, built first); RELAY_ARGS="--window 32MiB" adds flags
# to every `ferry relay`. FERRY_B=path A/Bs a second build in the same run:
# each relay row runs with both builds alternately (A, B, A, B, ...), each
# with its own `ferry listen` (ports 6600 and 6601), and prints a row for
# each, marked [A] and [B]; RELAY_ARGS_B="..." gives B's relays their own
# flags (FERRY_B defaults to FERRY then: an A/B of flags). "chunks N KiB" is the mean chunk the source
# relay cut; with compression, "raw:" says why the other chunks went raw
# (link about to idle, did not shrink, skipped after one that did not,
# low yield: the host's CPUs were busy and a sample shrank less than 2.5x).
# "qemu cpu S+D s" (every row): the CPU seconds the source and the
# destination QEMU used from the migrate command to both ends; with the
# relays' "cpu" it is the run's CPU budget (the 2-core CI host runs both
# QEMUs and both relays: where that budget passes 2 x the time, the cores,
# not the links, set the pace).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPEAT=3
KEEP=0
RUNNING=1
GUESTS=random,mix,running
OPTIONS=tcp,compression
MULTIFD=0,4
while [ $# -gt 0 ]; do
    case "$1" in
        --repeat) REPEAT=$2; shift 2 ;;
        --keep-testbed) KEEP=1; shift ;;
        --no-running) RUNNING=0; shift ;;
        --guests) GUESTS=$2; shift 2 ;;
        --options) OPTIONS=$2; shift 2 ;;
        --multifd) MULTIFD=$2; shift 2 ;;
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
FERRY=${FERRY:-$ROOT/target/release/ferry}
if [ -z "${FERRY_NO_BUILD:-}" ] && [ "$FERRY" = "$ROOT/target/release/ferry" ]; then
    cargo build --release --quiet -p ferry-cli --bin ferry
fi
head -c 32 /dev/urandom | base64 > "$WORK/key" && chmod 600 "$WORK/key"
export FERRY RELAY_KEY="$WORK/key"

case ",$GUESTS," in *,running,*) ;; *) RUNNING=0 ;; esac
python3 - "$WORK" "$REPEAT" "$RUNNING" "$GUESTS" "$OPTIONS" "$MULTIFD" <<'PY'
import json, os, re, resource, statistics, subprocess, sys, time
sys.path.insert(0, os.path.join(os.getcwd(), "ci", "qemu"))
import driver

FERRY, KEY = os.environ["FERRY"], os.environ["RELAY_KEY"]
# FERRY_B: a second build, A/B in the same run: every relay row runs with
# both, alternating run by run (A, B, A, B, ...), each with its own
# `ferry listen`, and prints a row for each.
BUILDS = {"A": FERRY}
if os.environ.get("FERRY_B") or "RELAY_ARGS_B" in os.environ:
    BUILDS["B"] = os.environ.get("FERRY_B") or FERRY

work, repeat, running = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
guests = sys.argv[4].split(",")
options = sys.argv[5].split(",")
multifds = [int(m) for m in sys.argv[6].split(",")]
SRC, DST = "fq-src", "fq-dst"
GIB_KIB = 1 << 20
port = [4500]


def direct(link):
    port[0] += 1
    return f"tcp:10.200.{link}.2:{port[0]}"


class Daemon:
    """`ferry listen` of one build in the destination namespace, on every link."""

    def __init__(self, build, ferry, port):
        self.ferry, self.port, self.relays = ferry, port, 0
        # Flags of this build's relays.
        self.args = os.environ.get("RELAY_ARGS", "").split()
        if build == "B" and "RELAY_ARGS_B" in os.environ:
            self.args = os.environ["RELAY_ARGS_B"].split()
        self.log = os.path.join(work, f"listen-{build}.log")
        self.p = subprocess.Popen(["ip", "netns", "exec", DST, ferry, "listen", "--listen",
                                   f"0.0.0.0:{port}", "--auth-key-file", KEY, "--plaintext"],
                                  stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))
        deadline = time.monotonic() + 30
        while "listening on" not in open(self.log).read():
            if self.p.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench-relay.sh: ferry listen did not start: {open(self.log).read()[-2000:]}")
            time.sleep(0.05)


def cpu_s(pid):
    """User + system CPU seconds of a process so far."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def dst_streams(d, mid):
    """The `relay stream` lines `ferry listen` logged for its migration `mid`
    (the daemon numbers relays from 1); it logs them a moment after the
    source relay exits."""
    deadline = time.monotonic() + 3
    while True:
        lines = [l for l in open(d.log) if "relay stream" in l and f" migration_id={mid} " in l]
        if lines or time.monotonic() > deadline:
            return [{k: float(v) for k, v in re.findall(r"(\w+_s)=([0-9.]+)", l)} for l in lines]
        time.sleep(0.05)


def relay_once(option, d, **kw):
    """One migration through a new `ferry relay` of the build of daemon d;
    the relay must exit 0."""
    port[0] += 1
    listen, deliver = port[0] + 100, port[0]
    args = ["ip", "netns", "exec", SRC, d.ferry, "relay", "--listen", f"127.0.0.1:{listen}",
            "--to", f"10.200.0.2:{d.port}", "--deliver-to", f"127.0.0.1:{deliver}",
            "--auth-key-file", KEY, "--performance-option", option, "--plaintext",
            "--json", os.path.join(work, "relay.json")] + d.args
    d.relays += 1
    listen_cpu = cpu_s(d.p.pid)
    r = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = r.stdout.readline()
    if "ready" not in line:
        r.kill()
        sys.exit(f"bench-relay.sh: ferry relay not ready: {line}{r.stderr.read()}")
    res = driver.migrate_once(work, f"tcp:127.0.0.1:{listen}", incoming=f"tcp:127.0.0.1:{deliver}",
                              src_ns=SRC, dst_ns=DST, **kw)
    # `ip netns exec` execs ferry in place, and the QEMUs were reaped
    # already: what the children used from here on is the relay's CPU.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        out, err = r.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        r.kill()
        out, err = r.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res["relay_cpu"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    res["listen_cpu"] = cpu_s(d.p.pid) - listen_cpu
    src = []
    try:
        with open(os.path.join(work, "relay.json")) as f:
            src = json.load(f)["report"]["streams"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    dst = dst_streams(d, d.relays)
    t = res.get("total_ms") or 1
    res["window_pct"] = 100 * max([s.get("waited_for_window_s", 0) for s in src] or [0]) * 1000 / t
    res["dst_qemu_pct"] = 100 * max([s.get("waited_to_deliver_s", 0) for s in dst] or [0]) * 1000 / t
    sent = sum(s.get("chunks_sent", 0) for s in src) or 1
    res["compressed_pct"] = 100 * sum(s.get("chunks_compressed", 0) for s in src) / sent
    for k in ("link_idle", "incompressible", "skipped", "low_yield"):
        res[f"raw_{k}_pct"] = 100 * sum(s.get(f"chunks_raw_{k}", 0) for s in src) / sent
    res["chunk_kib"] = sum(s.get("forward_bytes", 0) for s in src) / sent / 1024
    res["relay_status"] = r.returncode
    res["relay_out"] = (line + out).strip()
    if r.returncode != 0:
        res["relay_err"] = err[-2000:]
    return res


def runs(label, path, n, relay=None, **kw):
    """n migrations of one kind (of each build, alternating, for a relay
    row); prints the row(s), fails on any problem."""
    res = {b: [] for b in (BUILDS if relay else ["A"])}
    for _ in range(n):
        for b in res:
            res[b].append(run_one(label, path, relay, daemons.get(b), **kw))
    med = None
    for b, rs in res.items():
        m = row(label, path + (f" [{b}]" if len(res) > 1 else ""), rs, relay)
        med = med or m
    return med


def run_one(label, path, relay, d, **kw):
    """One migration; fails on any problem."""
    if relay:
        r = relay_once(relay, d, **kw)
    elif path.startswith("QEMU alone"):
        port[0] += 1
        r = driver.migrate_once(work, f"tcp:127.0.0.1:{port[0]}", src_ns=SRC, dst_ns=SRC, **kw)
    else:
        r = driver.migrate_once(work, direct(0), src_ns=SRC, dst_ns=DST, **kw)
    bad = driver.problems(r)
    if relay and r.get("relay_status") != 0:
        bad.append(f"ferry relay exited {r.get('relay_status')}: {r.get('relay_err')}")
    if bad:
        sys.exit(f"bench-relay.sh: {label} over {path}: {'; '.join(bad)}")
    return r


def row(label, path, res, relay):
    """Prints the row of these runs; returns the median run."""
    t = statistics.median(r["total_ms"] for r in res)
    med = min(res, key=lambda r: abs(r["total_ms"] - t))
    gbit = med["transferred"] * 8 / med["total_ms"] / 1e6
    down = statistics.median(r["downtime_ms"] for r in res)
    ram = "equal" if all(r["ram"]["equal"] for r in res) else "DIFFERS"
    times = "/".join(f"{r['total_ms'] / 1000:.2f}" for r in res)
    ends = [r["dst_end_ms"] for r in res if r.get("dst_end_ms") is not None]
    end = statistics.median(ends) if len(ends) == len(res) else None
    ratio = f"  {base[label] / t:4.2f}x direct" if label in base and path != "direct, 1 link" else ""
    if end is not None and label in base_end and path != "direct, 1 link":
        ratio += f" (dst loaded {end / 1000:.2f} s: {base_end[label] / end:4.2f}x)"
    elif end is not None and path == "direct, 1 link":
        ratio = f"  (dst loaded {end / 1000:.2f} s)"
    where = ""
    qcpu = [(r.get("src_qemu_cpu_s"), r.get("dst_qemu_cpu_s")) for r in res]
    if all(a is not None and b is not None for a, b in qcpu):
        where = (f"  [qemu cpu {statistics.median(a for a, _ in qcpu):.2f}+"
                 f"{statistics.median(b for _, b in qcpu):.2f} s]")
    if relay:
        where += (f"  [dst QEMU {statistics.median(r['dst_qemu_pct'] for r in res):3.0f}%, "
                 f"window {statistics.median(r['window_pct'] for r in res):3.0f}%, "
                 f"cpu {statistics.median(r['relay_cpu'] for r in res):.2f}+"
                 f"{statistics.median(r['listen_cpu'] for r in res):.2f} s"
                 + f", chunks {statistics.median(r['chunk_kib'] for r in res):.0f} KiB"
                 + (f", lz4 {statistics.median(r['compressed_pct'] for r in res):.0f}% of chunks"
                    f" (raw: link idle {statistics.median(r['raw_link_idle_pct'] for r in res):.0f}%,"
                    f" no gain {statistics.median(r['raw_incompressible_pct'] for r in res):.0f}%,"
                    f" skipped {statistics.median(r['raw_skipped_pct'] for r in res):.0f}%,"
                    f" low yield {statistics.median(r['raw_low_yield_pct'] for r in res):.0f}%)"
                    if relay == "compression" else "") + "]")
    print(f"{label:<34} {path:<26} {t / 1000:6.2f} s {gbit:6.2f} Gbit/s {down:6.0f} ms  {ram:<7} ({times} s){ratio}{where}",
          flush=True)
    if path == "direct, 1 link":
        base[label] = t
        if end is not None:
            base_end[label] = end
    return med


base = {}
base_end = {}
daemons = {b: Daemon(b, f, 6600 + i) for i, (b, f) in enumerate(BUILDS.items())}
if len(BUILDS) > 1:
    print("A/B: " + ", ".join(f"[{b}] {d.ferry} {' '.join(d.args)}" for b, d in daemons.items()))


print(f"== QEMU {os.popen('qemu-system-x86_64 --version').readline().split()[3]} migration over the "
      f"namespace test bed (4 links x 1 Gbit/s), {repeat} run(s) per row, medians ==")
print(f"{'guest':<34} {'path':<26} {'time':>8} {'rate':>13} {'downtime':>9}  {'RAM':<7} runs")
for kind in ("random", "mix"):
    if kind not in guests:
        continue
    img = os.path.join(work, f"{kind}.img")
    label = f"paused 1 GiB, 512 MiB {kind}"
    for mf in (0, 4):
        path = "direct, 1 link" + (f", multifd {mf}" if mf else "")
        runs(label, path, repeat, mem_kib=GIB_KIB, running=False,
             loaders=[(img, 0x10000000)], multifd=mf)
    runs(label, "QEMU alone, loopback", repeat, mem_kib=GIB_KIB, running=False,
         loaders=[(img, 0x10000000)])
    for option in options:
        for mf in multifds:
            path = f"relay 4 links, {option}" + (f", mf {mf}" if mf else "")
            runs(label, path, repeat, relay=option, mem_kib=GIB_KIB, running=False,
                 loaders=[(img, 0x10000000)], multifd=mf)
if running:
    label = "running, memcheck 64 MiB"
    for relay in (None, "tcp"):
        path = "direct, 1 link" if relay is None else "relay 4 links, tcp"
        med = runs(label, path, repeat, relay=relay, running=True, memcheck={"mib": 64})
        print(f"{'':<34} destination after resuming: {', '.join(med['dst_passes'])} "
              f"(source's last: pass {med['src_last_pass']})")
for d in daemons.values():
    d.p.terminate()
print("time: QEMU's total-time (migrate to completed on the source); rate: its transferred bytes "
      "over that time (through the relay: the stream bytes QEMU wrote, before compression); "
      "Nx direct: the direct one-link row's median time over this row's; dst loaded: the migrate "
      "command to the destination QEMU leaving 'inmigrate' (the end as the destination sees it: "
      "what was still on the way when the source completed included), and the same ratio on it; "
      "QEMU alone, loopback: "
      "both QEMUs in one namespace, no link, no relay (QEMU's own ceiling on this machine now); "
      "[qemu cpu: CPU seconds of the source + destination QEMU from the migrate command to both "
      "ends] [dst QEMU: the destination relay waiting for its QEMU to read, window: the source relay "
      "waiting for credit, as shares of the migration's time; cpu: ferry relay + ferry listen CPU seconds]")
PY
