#!/usr/bin/env bash
# Makes the local services sluice needs ready on a Debian machine without Docker.
# Idempotent: run it as often as you like; it changes and restarts only what is not ready.
#
#   PostgreSQL  127.0.0.1:5432  wal_level=logical, max_replication_slots/max_wal_senders >= 16
#   MariaDB     127.0.0.1:3306  as installed (started if it is not running)
#   Kafka API   127.0.0.1:9092  the tansu broker (crates.io), built once into a cache folder
#
# Environment (all optional):
#   SLUICE_CACHE   cache folder outside the clone (default: ~/.cache/sluice)
#   PGHOST PGPORT PGUSER         PostgreSQL (default 127.0.0.1 5432 postgres)
#   MYSQL_HOST MYSQL_PORT        MariaDB (default 127.0.0.1 3306, user root, no password)
#   SLUICE_SKIP_KAFKA=1          do not build or start the broker
#   SLUICE_FRESH_BROKER=1        restart a broker this script started, with an empty store
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
CACHE="${SLUICE_CACHE:-$HOME/.cache/sluice}"
PGHOST="${PGHOST:-127.0.0.1}"
PGPORT="${PGPORT:-5432}"
PGUSER="${PGUSER:-postgres}"
MYSQL_HOST="${MYSQL_HOST:-127.0.0.1}"
MYSQL_PORT="${MYSQL_PORT:-3306}"
TANSU_VERSION=0.6.0
TANSU_ROOT="$CACHE/tansu-$TANSU_VERSION"
TANSU_BIN="$TANSU_ROOT/bin/tansu"
TANSU_RUN="$CACHE/tansu-run"
KAFKA_PORT=9092
export PGHOST PGPORT PGUSER

say() { printf '[native-up] %s\n' "$*"; }
fail() { printf '[native-up] FAILED: %s\n' "$*" >&2; exit 1; }

# wait_for DESCRIPTION SECONDS COMMAND...: retries COMMAND until it succeeds or time runs out.
wait_for() {
  local what=$1 seconds=$2 deadline=$(( $(date +%s) + $2 )); shift 2
  until "$@" >/dev/null 2>&1; do
    if (( $(date +%s) >= deadline )); then fail "$what not ready within ${seconds}s"; fi
    sleep 0.5
  done
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
port_closed() { ! port_open "$1" "$2"; }
not_running() { ! kill -0 "$1" 2>/dev/null; }

mkdir -p "$CACHE"

# ---------------------------------------------------------------- PostgreSQL
pg_start() {
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [ -n "$version" ] || fail "no PostgreSQL cluster under /etc/postgresql"
  pg_ctlcluster --skip-systemctl-redirect "$version" main "$1" >/dev/null 2>&1 \
    || pg_ctlcluster "$version" main "$1" || fail "pg_ctlcluster $version main $1"
}
psql_q() { psql -X -q -t -A -v ON_ERROR_STOP=1 -d postgres -c "$1"; }

if ! pg_isready -q -h "$PGHOST" -p "$PGPORT"; then
  say "starting PostgreSQL"
  pg_start start
fi
wait_for "PostgreSQL at $PGHOST:$PGPORT" 60 pg_isready -q -h "$PGHOST" -p "$PGPORT"

needs_restart=0
[ "$(psql_q 'SHOW wal_level')" = logical ] || { psql_q "ALTER SYSTEM SET wal_level = logical"; needs_restart=1; }
for setting in max_replication_slots max_wal_senders; do
  if (( $(psql_q "SHOW $setting") < 16 )); then psql_q "ALTER SYSTEM SET $setting = 32"; needs_restart=1; fi
done
if (( $(psql_q "SHOW max_connections") < 200 )); then psql_q "ALTER SYSTEM SET max_connections = 200"; needs_restart=1; fi
if (( needs_restart )); then
  say "restarting PostgreSQL for wal_level=logical"
  pg_start restart
  wait_for "PostgreSQL after restart" 60 pg_isready -q -h "$PGHOST" -p "$PGPORT"
fi
[ "$(psql_q 'SHOW wal_level')" = logical ] || fail "PostgreSQL wal_level is still not logical"
say "PostgreSQL ready (wal_level=logical, max_replication_slots=$(psql_q 'SHOW max_replication_slots'))"

# ---------------------------------------------------------------- MariaDB
mysql_q() { mariadb -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u root -N -B -e "$1"; }

if ! mysql_q 'SELECT 1' >/dev/null 2>&1; then
  say "starting MariaDB"
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd >/dev/null 2>&1 || true
fi
wait_for "MariaDB at $MYSQL_HOST:$MYSQL_PORT" 60 mysql_q 'SELECT 1'

# The server runs with its own settings: the sink is measured on what users have. An
# earlier version of this script turned the binary log on (for a MySQL source that does not
# exist): that block is taken out again, and the server restarted once.
my_cnf=/etc/mysql/my.cnf
if grep -q '^# sluice: binary log' "$my_cnf" 2>/dev/null; then
  say "removing the binary log settings an earlier version of this script added to $my_cnf"
  sed -i '/^# sluice: binary log/,/^binlog_row_image = FULL$/d' "$my_cnf"
  # The blank line the block was appended after.
  sed -i -e :a -e '/^\n*$/{$d;N;ba' -e '}' "$my_cnf"
  say "restarting MariaDB"
  mariadb-admin -h "$MYSQL_HOST" -P "$MYSQL_PORT" -u root shutdown >/dev/null 2>&1 || true
  # start-stop-daemon --oknodo would take a server still shutting down for a running one.
  wait_for "MariaDB shutdown" 60 bash -c '! pgrep -x mariadbd'
  start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd >/dev/null 2>&1 || true
  wait_for "MariaDB after restart" 60 mysql_q 'SELECT 1'
fi
say "MariaDB ready (log_bin=$(mysql_q 'SELECT @@log_bin'))"

# ---------------------------------------------------------------- Kafka API (tansu)
if [ "${SLUICE_SKIP_KAFKA:-0}" = 1 ]; then
  say "skipping the Kafka broker (SLUICE_SKIP_KAFKA=1)"
  exit 0
fi

if [ ! -x "$TANSU_BIN" ]; then
  say "building tansu $TANSU_VERSION into $TANSU_ROOT (once; about 10-15 minutes on 2 cores)"
  # dynostore: memory:// storage; libsql: durable sqlite:// storage that survives kill -9.
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TANSU_ROOT" --target-dir "$CACHE/tansu-build" --quiet \
    || fail "cargo install tansu $TANSU_VERSION"
  rm -rf "$CACHE/tansu-build"
fi

# SLUICE_FRESH_BROKER=1 (the test command) restarts a broker this script started, with an
# empty store: tansu's SQLite storage slows down as it grows run after run.
if [ "${SLUICE_FRESH_BROKER:-0}" = 1 ] && [ -f "$TANSU_RUN/broker.pid" ]; then
  pid=$(cat "$TANSU_RUN/broker.pid")
  if [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = tansu ]; then
    say "stopping the running tansu (pid $pid) for a fresh store"
    kill "$pid" 2>/dev/null || true
    wait_for "tansu to stop" 30 not_running "$pid"
    wait_for "port $KAFKA_PORT to close" 30 port_closed 127.0.0.1 "$KAFKA_PORT"
  fi
fi

if ! port_open 127.0.0.1 "$KAFKA_PORT"; then
  say "starting tansu on 127.0.0.1:$KAFKA_PORT (sqlite storage in $TANSU_RUN)"
  mkdir -p "$TANSU_RUN"
  rm -f "$TANSU_RUN/tansu.db" "$TANSU_RUN/tansu.db-wal" "$TANSU_RUN/tansu.db-shm"
  # The broker reads .env from its working directory: give it one of ours (empty).
  : > "$TANSU_RUN/.env"
  (cd "$TANSU_RUN" && exec setsid "$TANSU_BIN" broker \
      --storage-engine "sqlite://tansu.db" \
      --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
      </dev/null >"$TANSU_RUN/broker.log" 2>&1 & echo $! > "$TANSU_RUN/broker.pid")
fi
wait_for "tansu broker at 127.0.0.1:$KAFKA_PORT (log: $TANSU_RUN/broker.log)" 60 port_open 127.0.0.1 "$KAFKA_PORT"
if [ -f "$TANSU_RUN/tansu.db" ]; then
  command -v sqlite3 >/dev/null || fail "sqlite3 (Debian package sqlite3) is needed to index tansu's storage"
  wait_for "indexes on tansu's storage" 30 sqlite3 -cmd ".timeout 10000" "$TANSU_RUN/tansu.db" ".read $HERE/tansu-indexes.sql"
fi
say "Kafka API ready at 127.0.0.1:$KAFKA_PORT (tansu $TANSU_VERSION; binary $TANSU_BIN)"
