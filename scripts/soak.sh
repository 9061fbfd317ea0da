#!/usr/bin/env bash
# Soak run (not a test): the load generator writes SOAK_RATE changes/s (default 2000) for
# SOAK_SECS seconds (default 600) through a release build of sluice into PostgreSQL, MariaDB
# (mapped) and Parquet sinks. In the middle the PostgreSQL sink stalls for SOAK_STALL_SECS
# (default 60): a session holds an exclusive lock on its `users` table. Every 10 s it
# prints the daemon's RSS, the sinks' lag and the source's WAL lag; at the end the peak
# RSS, how long the lag took to drain, and `sluice validate`.
#
#   scripts/soak.sh                                   # the full 10 minutes
#   SOAK_SECS=120 SOAK_STALL_AT=40 SOAK_STALL_SECS=30 scripts/soak.sh   # a short one
#   SOAK_TRANSPORT=kafka scripts/soak.sh              # through the local broker
#
# Everything it creates lives in databases soak_src / soak_pg / soak_my and under
# $SLUICE_CACHE/soak; each run starts from scratch.
set -euo pipefail
cd "$(dirname "$0")/.."
export SLUICE_CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$SLUICE_CACHE/target}"
SECS="${SOAK_SECS:-600}"
RATE="${SOAK_RATE:-2000}"
STALL_AT="${SOAK_STALL_AT:-$(( SECS / 2 - 30 ))}"
STALL_SECS="${SOAK_STALL_SECS:-60}"
TRANSPORT="${SOAK_TRANSPORT:-direct}"
PORT="${SOAK_PORT:-7879}"
DIR="$SLUICE_CACHE/soak"
PG="postgres://postgres@127.0.0.1:5432"
BIN="$CARGO_TARGET_DIR/release"

say() { printf '[soak] %s\n' "$*"; }

if [ "$TRANSPORT" = kafka ]; then compose/native-up.sh; else SLUICE_SKIP_KAFKA=1 compose/native-up.sh; fi
say "building the release binaries"
cargo build --release --quiet --workspace --bins

say "fresh databases and folders"
psql -X -q -h 127.0.0.1 -U postgres -d postgres -tAc \
  "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'soak' AND NOT active" >/dev/null
for db in soak_src soak_pg; do
  psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
done
mariadb -h 127.0.0.1 -u root -e "DROP DATABASE IF EXISTS soak_my; CREATE DATABASE soak_my"
rm -rf "$DIR" && mkdir -p "$DIR/lake"
"$BIN/loadgen" --url "$PG/soak_src" --schema-only --populate 10000

TRANSPORT_TOML=""
if [ "$TRANSPORT" = kafka ]; then
  TRANSPORT_TOML="[transport]
kind = \"kafka\"
brokers = \"127.0.0.1:9092\"
topic_prefix = \"soak$(date +%s)\"
group = \"soak$(date +%s)\"
instance = \"soak\""
fi
cat > "$DIR/soak.toml" <<EOF
[daemon]
http = "127.0.0.1:$PORT"
state_dir = "$DIR/state"

[source]
kind = "postgres"
url = "$PG/soak_src"
tables = ["public.users", "public.orders"]
slot = "soak"
publication = "soak"

$TRANSPORT_TOML

[[sink]]
name = "pg"
kind = "postgres"
url = "$PG/soak_pg"

[[sink]]
name = "my"
kind = "mysql"
url = "mysql://root@127.0.0.1:3306/soak_my"
mapping = "$PWD/queries/mysql.sql"

[[sink]]
name = "lake"
kind = "parquet"
path = "$DIR/lake"
rotate_secs = 10
EOF

say "starting sluice ($TRANSPORT transport); log: $DIR/sluice.log"
"$BIN/sluice" run --config "$DIR/soak.toml" >"$DIR/sluice.log" 2>&1 &
SLUICE_PID=$!
LOCK_PID=""
LOAD_PID=""
cleanup() {
  for p in $LOAD_PID $LOCK_PID; do kill "$p" 2>/dev/null || true; done
  kill "$SLUICE_PID" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 120); do
  curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null && break
  sleep 1
done
curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null || { say "sluice did not become ready"; tail -20 "$DIR/sluice.log"; exit 1; }

metric() { # metric NAME [LABEL_MATCH] -> value or -
  curl -fs "http://127.0.0.1:$PORT/metrics" | awk -v n="$1" -v l="${2:-}" \
    'index($0, n) == 1 && (l == "" || index($0, l)) { v = $NF } END { print (v == "" ? "-" : v) }'
}
rss_mb() { awk '/VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$SLUICE_PID/status"; }

say "workload: $RATE changes/s for ${SECS}s; pg sink stalls at ${STALL_AT}s for ${STALL_SECS}s"
"$BIN/loadgen" --url "$PG/soak_src" --rate "$RATE" --duration "$SECS" --connections 4 --txn-size 2 \
  --mix insert=40,update=45,delete=15 >"$DIR/loadgen.log" 2>&1 &
LOAD_PID=$!

START=$(date +%s)
PEAK=0
printf '%6s %9s %10s %10s %10s %14s\n' "t(s)" "RSS(MB)" "lag pg(s)" "lag my(s)" "lag lake(s)" "WAL lag(B)"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  sleep 10
  T=$(( $(date +%s) - START ))
  if [ -z "$LOCK_PID" ] && [ "$T" -ge "$STALL_AT" ]; then
    say "stalling the pg sink for ${STALL_SECS}s (exclusive lock on soak_pg.users)"
    psql -X -q -h 127.0.0.1 -U postgres -d soak_pg \
      -c "BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep($STALL_SECS); COMMIT;" >/dev/null 2>&1 &
    LOCK_PID=$!
  fi
  RSS=$(rss_mb)
  PEAK=$(awk -v a="$PEAK" -v b="$RSS" 'BEGIN { print (b > a ? b : a) }')
  printf '%6s %9s %10s %10s %10s %14s\n' "$T" "$RSS" \
    "$(metric sluice_replication_lag_seconds 'sink="pg"')" "$(metric sluice_replication_lag_seconds 'sink="my"')" \
    "$(metric sluice_replication_lag_seconds 'sink="lake"')" "$(metric sluice_source_lag_bytes)"
done
wait "$LOAD_PID" || true
tail -1 "$DIR/loadgen.log"
LOAD_END=$(date +%s)

say "waiting for every sink to catch up (validate)"
DRAINED=""
for _ in $(seq 1 60); do
  if "$BIN/sluice" validate --config "$DIR/soak.toml" >"$DIR/validate.log" 2>&1; then DRAINED=$(( $(date +%s) - LOAD_END )); break; fi
  RSS=$(rss_mb); PEAK=$(awk -v a="$PEAK" -v b="$RSS" 'BEGIN { print (b > a ? b : a) }')
  sleep 5
done
cat "$DIR/validate.log"
"$BIN/sluice" status --url "http://127.0.0.1:$PORT" || true
RESTARTS=$(metric sluice_actor_restarts_total)
say "peak RSS ${PEAK} MB; final RSS $(rss_mb) MB; actor restarts ${RESTARTS}"
if [ -n "$DRAINED" ]; then
  say "caught up ${DRAINED}s after the workload ended; validate: no differences"
else
  say "FAILED: the sinks did not catch up within 300s of the end of the workload"
  exit 1
fi
