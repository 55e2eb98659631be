#!/usr/bin/env bash
# The whole drover test suite — the README's test command, and what .ci/run calls.
#
#   1. unit, golden and property tests of every crate, and the end-to-end tests that run the
#      real `drover` and `drover-worker` binaries on loopback QUIC (cargo test);
#   2. as root: the package tests in booted Debian roots (packaging/test-booted.sh), which
#      skip loudly when they cannot run here.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "==> building the workspace (the end-to-end tests run these binaries)"
cargo build --workspace --locked

echo "==> cargo test --workspace"
cargo test --workspace --locked

if [ -x packaging/test-booted.sh ]; then
  echo "==> package tests in booted Debian roots"
  packaging/test-booted.sh
fi
