#!/usr/bin/env bash
# Runs one fuzz target with coverage guidance on a stable toolchain (what `cargo fuzz`
# does, minus the nightly-only AddressSanitizer; Rust code is memory-safe here).
#
#   bash fuzz/run.sh config_toml 60     # target, seconds
#   bash fuzz/run.sh headers 30
#   bash fuzz/run.sh h1_client 1800 -runs=10000000   # further arguments go to libFuzzer
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?target: a name under fuzz_targets/}
secs=${2:-60}
host=$(rustc -vV | awk '/^host:/ {print $2}')
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
  -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions" \
  cargo build --release --target "$host" --target-dir target/cov --bin "$target"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp corpus/"$target"/* "$work"/
mkdir -p artifacts
"target/cov/$host/release/$target" -max_total_time="$secs" -artifact_prefix=artifacts/ "${@:3}" "$work"
