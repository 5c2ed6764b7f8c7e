#!/usr/bin/env bash
# Benchmark: per-core encode speed and ratio of the compression option's
# candidate encoders, side by side on the same bytes (docs/performance.md
# quotes it): lz4_flex (Ferry's lz4 encoder and decoder today), liblz4 (the
# C library, through the `lz4` crate) at acceleration 1, 2, 4 and 8, and
# zstd at level 1 (Ferry's default) and -1, -3, -5. The wire format is the
# lz4 block format whichever lz4 encoder made it; every lz4 output is
# decoded with lz4_flex's safe decoder and compared with its input.
#
#   ci/bench-codecs.sh [--memory MIB] [--repeat N]
#
# Images: ci/memimage.py's realistic mix and all-random pages (MIB each,
# default 512), cut as the page path cuts guest memory (ci/codec-speed:
# runs of non-zero pages in segments of at most 256 KiB). The encoders run
# on one thread, N rounds (default 5) interleaved; printed: the median
# speed, the ratio (page bytes / compressed bytes), and the median per round
# of each encoder's speed over lz4_flex's in the same round. The tool is a
# crate of its own (not in the workspace: liblz4 is measured without
# becoming Ferry's dependency); building it needs crates.io.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MIB=512
REPEAT=5
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) MIB=$2; shift 2 ;;
        --repeat) REPEAT=$2; shift 2 ;;
        *) echo "bench-codecs.sh: unknown option $1" >&2; exit 2 ;;
    esac
done
WORK=$(mktemp -d /tmp/ferry-codecs.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target/codec-speed}
cargo build --release -q --manifest-path "$ROOT/ci/codec-speed/Cargo.toml"
python3 "$ROOT/ci/memimage.py" "$WORK" "$MIB" mix random
for img in mix random; do
    echo "== $img ($MIB MiB image), $(uptime | sed 's/.*load/load/')"
    "$CARGO_TARGET_DIR/release/codec-speed" "$WORK/$img.img" "$REPEAT"
done
