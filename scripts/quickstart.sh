#!/usr/bin/env bash
# The main job on the embedded default: local services, a source database `app` with the
# load generator's tables (1,000 users), then `sluice run --config conf/quickstart.toml`
# (snapshot, then streaming into the `replica` database and var/lake). Ctrl-C stops it.
# In another terminal: `cargo run --bin loadgen -- --url postgres://postgres@127.0.0.1/app
# --rate 100 --duration 60` writes changes; `cargo run --bin sluice -- status` shows them.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
SLUICE_SKIP_KAFKA=1 compose/native-up.sh
for db in app replica; do
  psql -X -q -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$db'" | grep -q 1 \
    || psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db"
done
cargo build --quiet --workspace --bins
"$CARGO_TARGET_DIR/debug/loadgen" --url postgres://postgres@127.0.0.1:5432/app --schema-only --populate 1000
exec "$CARGO_TARGET_DIR/debug/sluice" run --config conf/quickstart.toml
