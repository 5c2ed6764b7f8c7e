#!/usr/bin/env bash
# Install what the soft-RoCE CI needs (see shared/softroce.md), only when missing.
#
# * Debian packages: QEMU, a stock Debian kernel (its rdma_rxe.ko gives soft-RoCE
#   inside the VMs), rdma-core user space and tools, and cmake/libclang/pkg-config
#   which the `sideway` crate's build needs.
# * virtme-ng (`vng`) from PyPI, to boot that kernel over the host's root fs.
#   busybox-static: virtme-ng builds its initramfs from it.
# * The real QEMU guest of ci/qemu/ (shared/qemu-guest.md): gcc and libc6-dev
#   build its static memcheck program, cpio packs its busybox initramfs,
#   python3 runs the QEMU driver (ci/qemu/driver.py).
#
# Idempotent: a second run installs nothing and takes well under a second.
set -euo pipefail

PKGS=(qemu-system-x86 linux-image-amd64 kmod iproute2 rdma-core ibverbs-providers
      ibverbs-utils perftest rdmacm-utils cmake libclang-dev pkg-config busybox-static
      gcc libc6-dev cpio python3)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$p")
    fi
done

SUDO=()
if [ "$(id -u)" -ne 0 ]; then SUDO=(sudo); fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "softroce/install: apt packages missing: ${missing[*]}"
    "${SUDO[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
else
    echo "softroce/install: apt packages present"
fi

if ! command -v vng >/dev/null 2>&1; then
    echo "softroce/install: installing virtme-ng"
    python3 -m pip install -q virtme-ng
    hash -r
fi
command -v vng >/dev/null || { echo "softroce/install: vng still not on PATH after pip install" >&2; exit 1; }

# A kernel with rdma_rxe must exist for the VMs.
if ! ls /lib/modules/*-amd64/kernel/drivers/infiniband/sw/rxe/rdma_rxe.ko* >/dev/null 2>&1; then
    echo "softroce/install: no rdma_rxe.ko under /lib/modules/*-amd64: linux-image-amd64 incomplete?" >&2
    exit 1
fi
echo "softroce/install: ok (vng $(vng --version 2>/dev/null | head -1))"
