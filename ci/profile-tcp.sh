#!/usr/bin/env bash
# Profile: where each side's CPU goes while Ferry moves an idle guest over
# loopback with the tcp option (docs/performance.md quotes it).
#
#   ci/profile-tcp.sh [--memory 1GiB] [--tls] [--ferry BIN] [--top 25]
#
# `ferry listen --once` and `ferry send` run as in ci/bench-tcp.sh; `perf
# record -e cpu-clock` (software clock: no hardware counters needed) is
# attached to the source once it logs "opening data channels", so filling
# the synthetic guest is not in its profile, and stopped when it exits;
# the destination is recorded from its start to its exit (its page check
# after the commit is the resume hook's and its exit unmaps guest memory:
# both listed under their own frames and threads). Prints, per
# side, the samples by thread and the functions with the most self time
# (kernel symbols marked [k]), and the same with kernel and libc time
# charged to the first Ferry frame above them (who asked for it).
# Ferry's symbols are resolved with nm (perf 6.1 does not read this
# binary's symbol table by itself).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MEM=1GiB
TLS=0
TOP=25
FERRY=
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MEM=$2; shift 2 ;;
        --tls) TLS=1; shift ;;
        --ferry) FERRY=$2; shift 2 ;;
        --top) TOP=$2; shift 2 ;;
        *) echo "profile-tcp.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
if ! command -v perf >/dev/null; then
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends linux-perf >/dev/null
fi
if [ -z "$FERRY" ]; then
    (cd "$ROOT" && cargo build --release --locked -q -p ferry-cli --bin ferry)
    FERRY=$ROOT/target/release/ferry
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
"$FERRY" gen-key "$WORK/key" > /dev/null
PLAIN=(--plaintext)
if [ "$TLS" = 1 ]; then PLAIN=(); fi
P=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# The destination is recorded whole, from its start (it fills nothing
# before the transfer, and attaching once the channels open came too late
# on a loaded machine: most of its transfer was missed); its resume hook's
# page check and its exit show under their own frames.
perf record -q -e cpu-clock -F 4000 -g -o "$WORK/dst.data" -- \
    "$FERRY" listen --listen 127.0.0.1:"$P" --auth-key-file "$WORK/key" --once "${PLAIN[@]}" > "$WORK/listen.log" 2>&1 &
LPID=$!
for _ in $(seq 200); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$P)).close()" 2>/dev/null && break; sleep 0.05; done
"$FERRY" send --to 127.0.0.1:"$P" --auth-key-file "$WORK/key" --memory "$MEM" --dirty-rate 0 --zero-fraction 0 \
    --performance-option tcp --channels 1 "${PLAIN[@]}" > "$WORK/send.log" 2>&1 &
SPID=$!
until grep -q "opening data channels" "$WORK/send.log" 2>/dev/null; do
    kill -0 "$SPID" 2>/dev/null || { cat "$WORK/send.log" >&2; exit 1; }
    sleep 0.02
done
perf record -q -e cpu-clock -F 4000 -g -p "$SPID" -o "$WORK/src.data" 2>/dev/null &
RS=$!
wait "$SPID"
kill -INT "$RS" 2>/dev/null || true
wait "$RS" 2>/dev/null || true
wait "$LPID" || true
grep -E "throughput|CPU" "$WORK/send.log" || true
grep -o "CPU [0-9].*" "$WORK/listen.log" | tail -1 || true
for side in src dst; do
    echo "== $side =="
    python3 - "$WORK/$side.data" "$FERRY" "$TOP" <<'PY'
import bisect, collections, re, subprocess, sys
data, binary, top = sys.argv[1], sys.argv[2], int(sys.argv[3])
sec = subprocess.run(["readelf", "-SW", binary], capture_output=True, text=True).stdout
m = re.search(r"\.text\s+PROGBITS\s+([0-9a-f]+)\s+([0-9a-f]+)", sec)
delta = int(m.group(1), 16) - int(m.group(2), 16)  # perf gives file offsets
syms = []
for line in subprocess.run(["nm", "-C", "--defined-only", binary], capture_output=True, text=True).stdout.splitlines():
    p = line.split(" ", 2)
    if len(p) == 3 and p[1] in "tTwW":
        syms.append((int(p[0], 16), re.sub(r"::h[0-9a-f]{16}$", "", p[2])[:100]))
syms.sort()
addrs = [a for a, _ in syms]
def fname(ip, sym, dso):
    if dso == binary or dso.endswith("/" + binary.split("/")[-1]):
        i = bisect.bisect_right(addrs, ip + delta) - 1
        return syms[i][1] if i >= 0 else hex(ip)
    if sym.startswith("[unknown]") or not sym:
        return "?" + dso.split("/")[-1]
    sym = re.sub(r"\+0x[0-9a-f]+$", "", sym)
    return ("[k] " + sym) if "kernel" in dso else sym
out = subprocess.run(["perf", "script", "-i", data, "-F", "comm,ip,sym,dso"], capture_output=True, text=True).stdout
own, owner, threads, tot = collections.Counter(), collections.Counter(), collections.Counter(), 0
for block in out.split("\n\n"):
    lines = [l for l in block.strip().splitlines() if l.strip()]
    if len(lines) < 2:
        continue
    comm = re.sub(r"-\d+$", "", lines[0].strip())
    frames = []
    for l in lines[1:]:
        m = re.match(r"\s*([0-9a-f]+)\s+(.*)\((.*)\)\s*$", l)
        if m:
            frames.append(fname(int(m.group(1), 16), m.group(2).strip(), m.group(3)))
    if not frames:
        continue
    who = next((f for f in frames if not f.startswith(("[k]", "?")) and "memmove" not in f and "memcpy" not in f), frames[0])
    own[(comm, frames[0])] += 1; owner[(comm, who)] += 1; threads[comm] += 1; tot += 1
if not tot:
    print("no samples"); sys.exit(0)
print(f"{tot} samples; by thread: " + ", ".join(f"{k} {100 * v / tot:.1f}%" for k, v in threads.most_common()))
print("-- self --")
for (c, s), v in own.most_common(top):
    print(f"{100 * v / tot:6.2f}%  {c:16s} {s}")
print("-- kernel and libc time charged to the first Ferry frame above it --")
for (c, s), v in owner.most_common(top):
    print(f"{100 * v / tot:6.2f}%  {c:16s} {s}")
PY
done
