//! Metric names: the Prometheus interface of SPEC.md, in one place.
//!
//! Labels are fixed per metric and documented here; values never carry row contents.

/// Counter `{stage, table}`: changes that passed a stage (`source`, `snapshot`, `mapper`,
/// `produced`, `consumed`).
pub const EVENTS_TOTAL: &str = "sluice_events_total";
/// Gauge: bytes of WAL between the server's current position and the confirmed position.
pub const SOURCE_LAG_BYTES: &str = "sluice_source_lag_bytes";
/// Gauge `{sink}`: seconds between the commit of the newest applied change and its apply.
pub const REPLICATION_LAG_SECONDS: &str = "sluice_replication_lag_seconds";
/// Counter `{sink, op}`: rows written by a sink (`insert`/`update`/`delete`/`upsert`/`truncate`).
pub const SINK_ROWS_TOTAL: &str = "sluice_sink_rows_total";
/// Counter `{sink}`: changes sent to the dead-letter store.
pub const DEAD_LETTERS_TOTAL: &str = "sluice_dead_letters_total";
/// Counter `{actor}`: restarts made by the supervisor.
pub const ACTOR_RESTARTS_TOTAL: &str = "sluice_actor_restarts_total";
/// Gauge `{actor}`: rows queued in the actor's mailbox.
pub const MAILBOX_DEPTH: &str = "sluice_mailbox_depth";
/// Counter `{actor}`: rows (units) ever put into the actor's mailbox; minus the depth, what
/// the actor took.
pub const MAILBOX_SENT_TOTAL: &str = "sluice_mailbox_sent_total";
/// Gauge `{table}`: rows copied by the running snapshot.
pub const SNAPSHOT_ROWS: &str = "sluice_snapshot_rows";
/// Gauge `{table}`: estimated rows of the table being copied (`pg_class.reltuples`).
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "sluice_snapshot_rows_estimated";
/// Gauge `{sink}`: 1 while the sink's pipeline streams, 0 otherwise.
pub const PIPELINE_UP: &str = "sluice_pipeline_up";
/// Gauge: the LSN the source confirmed to PostgreSQL.
pub const SOURCE_CONFIRMED_LSN: &str = "sluice_source_confirmed_lsn";
