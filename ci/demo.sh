#!/usr/bin/env bash
# The README's demo command: installs the build dependencies of the RDMA
# option when missing (cmake, libclang, pkg-config: the `sideway` crate's
# build needs them; rdma-core itself is loaded at run time and is optional),
# builds `ferry` and runs `ferry demo` with any extra arguments given.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
for p in cmake libclang-dev pkg-config; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    SUDO=(); [ "$(id -u)" -ne 0 ] && SUDO=(sudo)
    echo "demo: installing build dependencies: ${missing[*]}" >&2
    "${SUDO[@]}" apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi
cargo build --release --locked -q -p ferry-cli --bin ferry
exec target/release/ferry demo "$@"
