#!/usr/bin/env bash
# The whole drover test suite — the README's test command, and what .ci/run calls.
#
#   1. unit, golden and property tests of every crate, and the end-to-end tests that run the
#      real `drover` and `drover-worker` binaries on loopback QUIC (cargo test);
#   2. a bounded run of every cargo-fuzz target (fuzz/run.sh --all, DROVER_FUZZ_SECONDS each,
#      default 20; 0 skips), when cargo-fuzz is installed (.ci/run installs it);
#   3. as root: the package tests in booted Debian roots (packaging/test-booted.sh), which
#      skip loudly when they cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the workspace (the end-to-end tests run these binaries)"
cargo build --workspace --locked

echo "==> cargo test --workspace"
cargo test --workspace --locked

fuzz_seconds="${DROVER_FUZZ_SECONDS:-20}"
if [ "$fuzz_seconds" = 0 ]; then
  echo "==> fuzz targets: skipped (DROVER_FUZZ_SECONDS=0)"
elif cargo fuzz --version >/dev/null 2>&1; then
  echo "==> fuzz targets, ${fuzz_seconds}s each"
  fuzz/run.sh --all "$fuzz_seconds"
else
  echo "*** SKIPPED the fuzz targets: cargo-fuzz is not installed (cargo install cargo-fuzz --locked; .ci/run does) ***"
fi

if [ -x packaging/test-booted.sh ]; then
  echo "==> package tests in booted Debian roots"
  packaging/test-booted.sh
fi
