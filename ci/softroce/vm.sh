#!/usr/bin/env bash
# Boot emulated VMs with soft-RoCE NICs and run a guest script in each.
#
#   vm.sh [--one] [--timeout SECONDS] [--out DIR] -- SCRIPT [ARGS...]
#
# Default: two VMs (roles A and B), each with two virtio NICs joined pairwise
# by QEMU socket netdevs on 127.0.0.1 (NIC n: 10.77.1n.1 on A, 10.77.1n.2 on
# B, soft-RoCE device rxeN on each). --one: a single VM (role L) with one rxe
# device on a dummy NIC at 10.77.20.1 (loopback).
#
# SCRIPT runs inside each VM via guest.sh (root fs = the host's, read-only
# with overlays; pass results through $OUT). Exits 0 only if every VM's
# script exited 0; never runs longer than --timeout (default 420 s).
# Guest logs: $OUT/guest-<ROLE>.log. Needs what install.sh installs.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ONE=0
TIMEOUT=420
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --one) ONE=1; shift ;;
        --timeout) TIMEOUT=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --) shift; break ;;
        *) echo "vm.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
[ $# -gt 0 ] || { echo "usage: vm.sh [--one] [--timeout S] [--out DIR] -- SCRIPT [ARGS...]" >&2; exit 2; }
command -v vng >/dev/null || { echo "vm.sh: vng missing: run ci/softroce/install.sh" >&2; exit 1; }
KVER=$(ls /lib/modules | grep -- '-amd64$' | sort -V | tail -1)
[ -n "$KVER" ] && [ -f "/boot/vmlinuz-$KVER" ] || { echo "vm.sh: no Debian -amd64 kernel: run ci/softroce/install.sh" >&2; exit 1; }
OUT=${OUT:-$(mktemp -d /tmp/ferry-softroce.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
rm -f "$OUT"/result-* "$OUT"/guest-*.log
echo "vm.sh: kernel $KVER, results in $OUT, timeout ${TIMEOUT}s"

# Each VM gets the whole remaining budget; `timeout` kills a hung QEMU.
VNG=(vng --run "/boot/vmlinuz-$KVER" --disable-kvm --memory 1G --cpus 1 --rwdir "$OUT")
nic() { echo "-netdev socket,id=r$1,$2=127.0.0.1:$((${PORT_BASE:-5600} + $1)) -device virtio-net-pci,netdev=r$1,mac=52:54:00:77:0$1:0$3"; }
quote() { printf '%q ' "$@"; }

start=$(date +%s)
pids=()
roles=()
if [ "$ONE" = 1 ]; then
    roles=(L)
    timeout --kill-after=10 "$TIMEOUT" "${VNG[@]}" --exec "env ROLE=L OUT=$OUT NICS=0 bash $HERE/guest.sh $(quote "$@")" \
        > "$OUT/vng-L.log" 2>&1 &
    pids+=($!)
else
    roles=(A B)
    timeout --kill-after=10 "$TIMEOUT" "${VNG[@]}" --qemu-opts="$(nic 0 listen 1) $(nic 1 listen 1)" \
        --exec "env ROLE=A OUT=$OUT NICS=2 bash $HERE/guest.sh $(quote "$@")" > "$OUT/vng-A.log" 2>&1 &
    pids+=($!)
    sleep 4 # A's QEMU must be listening before B's connects
    timeout --kill-after=10 "$((TIMEOUT - 4))" "${VNG[@]}" --qemu-opts="$(nic 0 connect 2) $(nic 1 connect 2)" \
        --exec "env ROLE=B OUT=$OUT NICS=2 bash $HERE/guest.sh $(quote "$@")" > "$OUT/vng-B.log" 2>&1 &
    pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p" || true; done
echo "vm.sh: VMs done after $(( $(date +%s) - start ))s"

fail=0
for r in "${roles[@]}"; do
    echo "----- guest $r log -----"
    cat "$OUT/guest-$r.log" 2>/dev/null || echo "(no log)"
    if [ -f "$OUT/result-$r" ]; then
        rc=$(cat "$OUT/result-$r")
    else
        rc="missing (VM did not finish: timeout or boot failure; see $OUT/vng-$r.log)"
        tail -20 "$OUT/vng-$r.log" 2>/dev/null || true
    fi
    echo "vm.sh: role $r result: $rc"
    [ "$rc" = 0 ] || fail=1
done
exit $fail
