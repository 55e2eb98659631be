#!/usr/bin/env bash
# Fuzz the protocol decoders for $1 seconds (default 60). Extra arguments go to libFuzzer.
# FUZZ_TARGET picks the target: decode_frames (default) or decode_spool.
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=...); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no nightly toolchain is needed. Set FUZZ_SANITIZER=none for
# a faster run without AddressSanitizer (Rust code here is safe; ASan mainly guards deps).
set -euo pipefail

seconds="${1:-60}"
shift || true
sanitizer="${FUZZ_SANITIZER:-address}"

cd "$(dirname "$0")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it with cargo install" >&2
    cargo install cargo-fuzz --locked
fi

target="${FUZZ_TARGET:-decode_frames}"
mkdir -p "corpus/$target"
RUSTC_BOOTSTRAP=1 exec cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 "$@"
