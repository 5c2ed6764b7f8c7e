#!/usr/bin/env bash
# Builds the real guest of the QEMU tests and benchmarks: memcheck (a static
# C program, ci/qemu/memcheck.c) inside a busybox initramfs, to boot with
# Debian's kernel under QEMU. Nothing built here is committed.
#
#   ci/qemu/build-guest.sh [OUTDIR]
#
# OUTDIR (default $FERRY_GUEST_DIR, else target/qemu-guest under the
# repository) gets memcheck and initrd.gz; the build is skipped when they
# were made from the same sources, busybox and compiler (a stamp of their
# hashes). Prints three lines for scripts to eval:
#   KERNEL=/boot/vmlinuz-...  INITRD=OUTDIR/initrd.gz  MEMCHECK=OUTDIR/memcheck
# Needs gcc, libc6-dev, busybox-static, cpio, gzip and a Debian -amd64 kernel
# (ci/softroce/install.sh installs them).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
OUT=${1:-${FERRY_GUEST_DIR:-$ROOT/target/qemu-guest}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

KVER=$(ls /lib/modules 2>/dev/null | grep -- '-amd64$' | sort -V | tail -1 || true)
KERNEL=/boot/vmlinuz-$KVER
[ -n "$KVER" ] && [ -r "$KERNEL" ] || { echo "build-guest.sh: no readable Debian -amd64 kernel in /boot: run ci/softroce/install.sh" >&2; exit 1; }
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] && [[ $("$BUSYBOX" 2>&1 || true) == BusyBox* ]] || { echo "build-guest.sh: /bin/busybox missing: install busybox-static (ci/softroce/install.sh)" >&2; exit 1; }
[[ $(ldd "$BUSYBOX" 2>&1 || true) == *"not a dynamic"* ]] \
    || { echo "build-guest.sh: /bin/busybox is not static: install busybox-static" >&2; exit 1; }
for t in gcc cpio gzip; do
    command -v "$t" >/dev/null || { echo "build-guest.sh: $t missing (ci/softroce/install.sh installs it)" >&2; exit 1; }
done

# Two tests (or a test and a benchmark) may build at once: one at a time.
exec 9>"$OUT/.lock"
flock 9

stamp=$(cat "$HERE/memcheck.c" "$HERE/init" "$0" "$BUSYBOX" | sha256sum | cut -c1-16)-$(gcc -dumpfullversion)
if [ "$(cat "$OUT/stamp" 2>/dev/null)" != "$stamp" ] || [ ! -s "$OUT/initrd.gz" ] || [ ! -x "$OUT/memcheck" ]; then
    rm -f "$OUT/stamp"
    gcc -O2 -static -Wall -Wextra -Werror -o "$OUT/memcheck.tmp" "$HERE/memcheck.c"
    mv "$OUT/memcheck.tmp" "$OUT/memcheck"
    tree=$(mktemp -d)
    trap 'rm -rf "$tree"' EXIT
    mkdir -p "$tree"/{bin,dev,proc,sys}
    cp "$BUSYBOX" "$tree/bin/busybox"
    for app in $("$BUSYBOX" --list); do
        [ "$app" = busybox ] || ln -s busybox "$tree/bin/$app"
    done
    install -m 0755 "$HERE/init" "$tree/init"
    install -m 0755 "$OUT/memcheck" "$tree/memcheck"
    (cd "$tree" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9 > "$OUT/initrd.gz.tmp")
    mv "$OUT/initrd.gz.tmp" "$OUT/initrd.gz"
    echo "$stamp" > "$OUT/stamp"
fi
echo "KERNEL=$KERNEL"
echo "INITRD=$OUT/initrd.gz"
echo "MEMCHECK=$OUT/memcheck"
