#!/usr/bin/env bash
# Fuzz drover's decoders of untrusted bytes.
#
#   fuzz/run.sh [SECONDS] [libFuzzer args...]      one target (FUZZ_TARGET, default decode_frames)
#   fuzz/run.sh --all [SECONDS]                    every target in turn, SECONDS each (default 20)
#
# Targets (fuzz/Cargo.toml): decode_frames (every wire message), decode_spool (the worker's
# event spool), proxy_head (the egress proxy's request heads), redact (secret masking),
# unpack_archive (inputs/outputs tar archives), decode_certs (peer certificates and CSRs).
# Seeds in fuzz/seeds/<target>/ start each corpus (fuzz/corpus/<target>/, git-ignored).
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=...); RUSTC_BOOTSTRAP=1 lets the
# stable toolchain accept them, so no nightly toolchain is needed. Set FUZZ_SANITIZER=none for
# a faster run without AddressSanitizer (Rust code here is safe; ASan mainly guards deps).
set -euo pipefail

cd "$(dirname "$0")"
sanitizer="${FUZZ_SANITIZER:-address}"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz not found; installing it with cargo install" >&2
    cargo install cargo-fuzz --locked
fi

targets() {
    sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^drover-protocol-fuzz$'
}

run_one() {
    local target="$1" seconds="$2"
    shift 2
    mkdir -p "corpus/$target"
    if [ -d "seeds/$target" ]; then
        cp -n seeds/"$target"/* "corpus/$target/" 2>/dev/null || true
    fi
    RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer "$sanitizer" "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 "$@"
}

if [ "${1:-}" = "--all" ]; then
    seconds="${2:-20}"
    # Build every target first, so the time limit is spent fuzzing.
    RUSTC_BOOTSTRAP=1 cargo fuzz build --sanitizer "$sanitizer"
    for t in $(targets); do
        echo "==> fuzz $t for ${seconds}s"
        log="$(mktemp)"
        if ! run_one "$t" "$seconds" >"$log" 2>&1; then
            tail -n 60 "$log" >&2
            echo "fuzz target $t FAILED; the input is under fuzz/artifacts/$t/" >&2
            exit 1
        fi
        grep -E '^(#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
        rm -f "$log"
    done
    exit 0
fi

seconds="${1:-60}"
shift || true
run_one "${FUZZ_TARGET:-decode_frames}" "$seconds" "$@"
