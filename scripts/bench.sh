#!/usr/bin/env bash
# The benchmark (not a test): sluice against PostgreSQL's own logical replication on the
# local services, with the shipped build (profile release-lto). Arguments go to
# sluice-bench (--help lists them):
#   scripts/bench.sh                                  # the full run (about 20 minutes)
#   scripts/bench.sh --rows 100000 --changes 50000    # a quick one
#   scripts/bench.sh --transports direct --skip-native
#   scripts/bench.sh --source-only                    # the source into a discarding consumer
#   scripts/bench.sh --sinks-only                     # each sink writer, and the mapping stage
#   scripts/bench.sh --kafka-only --rows 100000       # the producer and consumer actors
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
case " $* " in
  *" --transports direct "*|*" --transports=direct "*) SLUICE_SKIP_KAFKA=1 compose/native-up.sh ;;
  *) compose/native-up.sh ;;
esac
echo "[bench] building the release-lto binaries (the first build takes a while)"
cargo build --profile release-lto --quiet --workspace --bins
exec "$CARGO_TARGET_DIR/release-lto/sluice-bench" --json "$SLUICE_CACHE/bench/last.json" "$@"
