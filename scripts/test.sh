#!/usr/bin/env bash
# The test command (README.md): services up, formatting, lints, every test.
# Builds share one target folder outside the clone, so repeated runs are incremental.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Tests talk to these (support module defaults are the same).
export SLUICE_TEST_PG="${SLUICE_TEST_PG:-postgres://postgres@127.0.0.1:5432}"
export SLUICE_TEST_MYSQL="${SLUICE_TEST_MYSQL:-mysql://root@127.0.0.1:3306}"
export SLUICE_TEST_KAFKA="${SLUICE_TEST_KAFKA:-127.0.0.1:9092}"
export SLUICE_TANSU="${SLUICE_TANSU:-$SLUICE_CACHE/tansu-0.6.0/bin/tansu}"
unset RUST_BACKTRACE

step() { printf '\n== %s\n' "$*"; }
started=$(date +%s)
step "services"
SLUICE_FRESH_BROKER=1 compose/native-up.sh
step "cargo fmt --check"
cargo fmt --all --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
step "tests"
cargo nextest run --workspace --no-fail-fast "$@"
printf '\n== test command took %ss\n' "$(( $(date +%s) - started ))"
