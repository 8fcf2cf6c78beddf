#!/usr/bin/env bash
# Runs the `decode_frame` fuzz target for a fixed time; exits non-zero if the
# fuzzer finds a crash (panic, sanitizer report, timeout or OOM).
#
#   shared/fuzz/run.sh [SECONDS]        (default 30)
#
# Environment:
#   NOVACRON_FUZZ_TARGET_DIR  persistent cargo target dir (e.g. a CI cache);
#                             unset: shared/fuzz/target
#   NOVACRON_FUZZ_SANITIZER   address (default) or none
#
# Works on the stable toolchain: cargo-fuzz needs nightly-only rustc flags
# (-Zsanitizer, sanitizer coverage), which RUSTC_BOOTSTRAP=1 unlocks.
# New corpus entries go to shared/fuzz/corpus/decode_frame (git-ignored); the
# committed seeds in shared/fuzz/seeds/decode_frame are only read. A crash
# input lands in shared/fuzz/artifacts/decode_frame (git-ignored).
set -euo pipefail

secs="${1:-30}"
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [[ "$secs" -eq 0 ]]; then
    echo "usage: $0 [SECONDS>0]" >&2
    exit 2
fi

cd "$(dirname "${BASH_SOURCE[0]}")"

if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1

build_args=(--sanitizer "${NOVACRON_FUZZ_SANITIZER:-address}")
if [[ -n "${NOVACRON_FUZZ_TARGET_DIR:-}" ]]; then
    build_args+=(--target-dir "$NOVACRON_FUZZ_TARGET_DIR")
else
    # Never build into a target dir inherited from the main workspace.
    unset CARGO_TARGET_DIR
fi

target=decode_frame
corpus="corpus/$target"
seeds="seeds/$target"
artifacts="artifacts/$target"
mkdir -p "$corpus" "$artifacts"

cargo fuzz build "${build_args[@]}" "$target"

# The first corpus dir receives new inputs; the seeds are read only.
status=0
cargo fuzz run "${build_args[@]}" "$target" "$corpus" "$seeds" -- \
    -max_total_time="$secs" \
    -max_len=4096 \
    -timeout=10 \
    -rss_limit_mb=2048 \
    -print_final_stats=1 ||
    status=$?

if [[ "$status" -ne 0 ]]; then
    echo "fuzz target $target failed (exit $status); inputs in shared/fuzz/$artifacts:" >&2
    ls -lt "$artifacts" >&2 || true
    echo "reproduce: (cd shared/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_args[*]} $target $artifacts/<file>)" >&2
    exit "$status"
fi
