//! Configuration: a TOML file plus `SLUICE__SECTION__KEY` environment overrides.
//!
//! Invariants: every struct denies unknown keys; defaults are named constants with the
//! reason they are what they are; [`Config::validate`] runs before anything connects and
//! reports every problem at once, each naming its dotted key (`sink[1].rotate_rows`).
//! Secrets in URLs are never shown: use [`mask_url`] wherever a URL is printed.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sluice_actors::schema::TableId;
use sluice_actors::source::SnapshotMode;
use sluice_actors::supervisor::RestartPolicy;

/// Loopback only: the HTTP API can pause pipelines and must not be exposed by default.
pub const DEFAULT_HTTP: &str = "127.0.0.1:7878";
/// Relative to the working directory, like the examples' data folders.
pub const DEFAULT_STATE_DIR: &str = "var/sluice";
/// Long enough to drain a full pipeline of small transactions, short enough for systemd.
pub const DEFAULT_SHUTDOWN_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_SLOT: &str = "sluice";
pub const DEFAULT_PUBLICATION: &str = "sluice";
pub const DEFAULT_TOPIC_PREFIX: &str = "sluice";
pub const DEFAULT_GROUP: &str = "sluice";
/// Three partitions let two or three consumers share a table's topic.
pub const DEFAULT_PARTITIONS: i32 = 3;
/// Rows per mailbox: about one source batch of slack per hop. Measured with 1 KB rows:
/// 4,096 gave the same catch-up and snapshot rates, and 13 MB more peak RSS in a
/// snapshot into PostgreSQL (98 -> 85 MB).
pub const DEFAULT_MAILBOX_ROWS: usize = 1024;
/// Rows per batch from the source: large enough to amortise per-batch costs.
pub const DEFAULT_BATCH_ROWS: usize = 1000;
/// Rows per sink write at most when changes queue up. A unit is held three times over
/// (changes, Arrow batch, statement), so this bounds memory: measured on 1 KB rows, a
/// snapshot peaks at 80 MB RSS with 2,000 and 160 MB with 20,000, at the same speed.
pub const DEFAULT_MAX_UNIT_ROWS: usize = 2_000;
/// Two snapshot connections: the machine this runs on is often small.
pub const DEFAULT_SNAPSHOT_PARALLELISM: usize = 2;
/// Tables above this many rows are copied in primary-key ranges.
pub const DEFAULT_SNAPSHOT_CHUNK_ROWS: u64 = 250_000;
/// An idle source confirms its position this often (keeps the slot from holding WAL).
pub const DEFAULT_HEARTBEAT_SECS: u64 = 10;
pub const DEFAULT_ROTATE_ROWS: usize = 100_000;
pub const DEFAULT_ROTATE_SECS: u64 = 60;
/// The most connections a database sink applies over (`sink.lanes`).
pub const MAX_LANES: usize = 16;
pub const DEFAULT_BACKOFF_BASE_MS: u64 = 500;
pub const DEFAULT_BACKOFF_MAX_MS: u64 = 30_000;
/// Ten restarts in five minutes: a transient outage recovers, a permanent one escalates.
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
pub const DEFAULT_RESTART_WINDOW_SECS: u64 = 300;
/// Direct transport: how long a sink whose mailbox stays full may hold the other sinks
/// back before it is detached (it catches up on its own after a restart).
pub const DEFAULT_SINK_STALL_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: DaemonConfig,
    pub source: SourceConfig,
    #[serde(default)]
    pub transport: TransportConfig,
    #[serde(default, rename = "sink")]
    pub sinks: Vec<SinkConfig>,
    #[serde(default)]
    pub pipeline: PipelineConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonConfig {
    #[serde(default = "default_http")]
    pub http: String,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log_format: LogFormat,
    /// A tracing filter (`info`, `sluice=debug`); `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub log_level: String,
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout_secs: u64,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            http: default_http(),
            state_dir: default_state_dir(),
            log_format: LogFormat::Human,
            log_level: default_log_level(),
            shutdown_timeout_secs: DEFAULT_SHUTDOWN_TIMEOUT_SECS,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    Postgres,
    Mysql,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub url: String,
    pub tables: Vec<String>,
    #[serde(default = "default_slot")]
    pub slot: String,
    #[serde(default = "default_publication")]
    pub publication: String,
    #[serde(default = "default_snapshot")]
    pub snapshot: SnapshotMode,
    #[serde(default = "default_snapshot_parallelism")]
    pub snapshot_parallelism: usize,
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    #[default]
    Direct,
    Kafka,
}

/// Which part of a Kafka pipeline this daemon runs (scale-out: one `source` daemon,
/// several `sinks` daemons sharing the consumer groups).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    All,
    Source,
    Sinks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    #[serde(default)]
    pub kind: TransportKind,
    #[serde(default)]
    pub role: Role,
    #[serde(default)]
    pub brokers: Option<String>,
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    #[serde(default = "default_group")]
    pub group: String,
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Producer compression: lz4 or zstd (snappy batches were seen lost on some brokers).
    #[serde(default = "default_compression")]
    pub compression: String,
    /// This daemon's stable identity in the consumer groups (Kafka static membership,
    /// `group.instance.id`): unique per daemon and kept across its restarts, it lets a
    /// restarted daemon take its partitions back at once. Unset: dynamic membership.
    #[serde(default)]
    pub instance: Option<String>,
    /// Extra librdkafka settings for every Kafka client (`"security.protocol" = "SSL"`...).
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            kind: TransportKind::Direct,
            role: Role::All,
            brokers: None,
            topic_prefix: default_topic_prefix(),
            group: default_group(),
            partitions: DEFAULT_PARTITIONS,
            replication_factor: 1,
            compression: default_compression(),
            instance: None,
            options: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    Postgres,
    Mysql,
    Parquet,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub name: String,
    pub kind: SinkKind,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub mapping: Option<PathBuf>,
    #[serde(default)]
    pub rotate_rows: Option<usize>,
    #[serde(default)]
    pub rotate_secs: Option<u64>,
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub access_key_id: Option<String>,
    #[serde(default)]
    pub secret_access_key: Option<String>,
    /// Overrides `pipeline.restart` for this sink.
    #[serde(default)]
    pub restart: Option<RestartPolicy>,
    /// Database sinks, direct transport: connections applying disjoint keys at once.
    #[serde(default)]
    pub lanes: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    #[serde(default = "default_mailbox_rows")]
    pub mailbox_rows: usize,
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    #[serde(default = "default_max_unit_rows")]
    pub max_unit_rows: usize,
    #[serde(default = "default_restart")]
    pub restart: RestartPolicy,
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_restart_window_secs")]
    pub restart_window_secs: u64,
    #[serde(default = "default_sink_stall_timeout_secs")]
    pub sink_stall_timeout_secs: u64,
    /// Threads the sink writers run on; 0: one per sink, at most one per two cores.
    #[serde(default)]
    pub writer_threads: usize,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            mailbox_rows: DEFAULT_MAILBOX_ROWS,
            batch_rows: DEFAULT_BATCH_ROWS,
            max_unit_rows: DEFAULT_MAX_UNIT_ROWS,
            restart: RestartPolicy::OnFailure,
            backoff_base_ms: DEFAULT_BACKOFF_BASE_MS,
            backoff_max_ms: DEFAULT_BACKOFF_MAX_MS,
            max_restarts: DEFAULT_MAX_RESTARTS,
            restart_window_secs: DEFAULT_RESTART_WINDOW_SECS,
            sink_stall_timeout_secs: DEFAULT_SINK_STALL_TIMEOUT_SECS,
            writer_threads: 0,
        }
    }
}

fn default_http() -> String {
    DEFAULT_HTTP.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_log_level() -> String {
    "info".into()
}
fn default_shutdown_timeout() -> u64 {
    DEFAULT_SHUTDOWN_TIMEOUT_SECS
}
fn default_slot() -> String {
    DEFAULT_SLOT.into()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.into()
}
fn default_snapshot() -> SnapshotMode {
    SnapshotMode::Initial
}
fn default_snapshot_parallelism() -> usize {
    DEFAULT_SNAPSHOT_PARALLELISM
}
fn default_snapshot_chunk_rows() -> u64 {
    DEFAULT_SNAPSHOT_CHUNK_ROWS
}
fn default_heartbeat_secs() -> u64 {
    DEFAULT_HEARTBEAT_SECS
}
fn default_topic_prefix() -> String {
    DEFAULT_TOPIC_PREFIX.into()
}
fn default_group() -> String {
    DEFAULT_GROUP.into()
}
fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}
fn default_replication_factor() -> i32 {
    1
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_mailbox_rows() -> usize {
    DEFAULT_MAILBOX_ROWS
}
fn default_batch_rows() -> usize {
    DEFAULT_BATCH_ROWS
}
fn default_max_unit_rows() -> usize {
    DEFAULT_MAX_UNIT_ROWS
}
fn default_restart() -> RestartPolicy {
    RestartPolicy::OnFailure
}
fn default_backoff_base_ms() -> u64 {
    DEFAULT_BACKOFF_BASE_MS
}
fn default_backoff_max_ms() -> u64 {
    DEFAULT_BACKOFF_MAX_MS
}
fn default_max_restarts() -> u32 {
    DEFAULT_MAX_RESTARTS
}
fn default_restart_window_secs() -> u64 {
    DEFAULT_RESTART_WINDOW_SECS
}
fn default_sink_stall_timeout_secs() -> u64 {
    DEFAULT_SINK_STALL_TIMEOUT_SECS
}

/// A configuration that cannot be loaded: one line per problem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub problems: Vec<String>,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let lines: Vec<String> = self.problems.iter().map(|p| format!("{}: {p}", self.file)).collect();
        f.write_str(&lines.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

/// Turns the `config` crate's messages into "key: problem".
fn explain(e: config::ConfigError) -> String {
    let text = e.to_string();
    // "... for key `source.url` in ..." / "missing field `url`" / "unknown field `x`, expected ..."
    let key = text.split("for key `").nth(1).and_then(|s| s.split('`').next()).map(str::to_string);
    let field = |marker: &str| text.split(marker).nth(1).and_then(|s| s.split('`').next()).map(str::to_string);
    if let Some(f) = field("unknown field `") {
        let at = key.map(|k| format!("{k}.")).unwrap_or_default();
        return format!("{at}{f}: unknown key");
    }
    if let Some(f) = field("missing field `") {
        let at = key.map(|k| format!("{k}.")).unwrap_or_default();
        return format!("{at}{f}: missing key");
    }
    if let Some(k) = key {
        let reason = text.split(" for key `").next().unwrap_or(&text);
        return format!("{k}: {reason}");
    }
    text
}

impl Config {
    /// What a command starts with: the configuration and the folder its relative paths
    /// start from. A bad configuration is printed (every problem) and becomes exit code 1.
    pub fn load_for_command(path: &Path) -> Result<(Config, PathBuf), std::process::ExitCode> {
        match Config::load(path) {
            Ok(c) => Ok((c, path.parent().unwrap_or(Path::new(".")).to_path_buf())),
            Err(e) => {
                eprintln!("{e}");
                Err(std::process::ExitCode::from(1))
            }
        }
    }

    /// Reads `path` and the environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let fail = |problems: Vec<String>| ConfigError { file: file.clone(), problems };
        if !path.exists() {
            return Err(fail(vec!["file not found".into()]));
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("SLUICE").prefix_separator("__").separator("__").try_parsing(true),
            )
            .build()
            .map_err(|e| fail(vec![explain(e)]))?;
        let config: Config = raw.try_deserialize().map_err(|e| fail(vec![explain(e)]))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.validate(base).map_err(fail)?;
        Ok(config)
    }

    /// Every problem, each naming its key. Relative mapping paths are checked against
    /// `base` and then the working directory.
    pub fn validate(&self, base: &Path) -> Result<(), Vec<String>> {
        let mut p = Vec::new();
        if self.daemon.http.parse::<SocketAddr>().is_err() {
            p.push(format!("daemon.http: {:?} is not an address like 127.0.0.1:7878", self.daemon.http));
        }
        if self.source.kind == SourceKind::Mysql {
            p.push("source.kind: a MySQL source is not supported yet; use \"postgres\"".into());
        }
        if let Err(e) = check_url(&self.source.url, &["postgres", "postgresql"]) {
            p.push(format!("source.url: {e}"));
        }
        if self.source.tables.is_empty() {
            p.push("source.tables: list at least one table (\"schema.table\")".into());
        }
        let mut seen_tables = HashSet::new();
        for (i, t) in self.source.tables.iter().enumerate() {
            match TableId::parse(t) {
                None => p.push(format!("source.tables[{i}]: {t:?} is not a table name like \"public.users\"")),
                Some(id) if !seen_tables.insert(id.clone()) => {
                    p.push(format!("source.tables[{i}]: {id} is listed twice"))
                }
                Some(_) => {}
            }
        }
        for (key, value) in [("source.slot", &self.source.slot), ("source.publication", &self.source.publication)] {
            if value.is_empty()
                || value.len() > 63
                || !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                p.push(format!("{key}: {value:?} must be 1-63 lowercase letters, digits or underscores"));
            }
        }
        if self.source.snapshot_parallelism == 0 {
            p.push("source.snapshot_parallelism: must be > 0".into());
        }
        if self.transport.kind == TransportKind::Direct && self.transport.role != Role::All {
            p.push("transport.role: \"source\" and \"sinks\" need transport.kind = \"kafka\"".into());
        }
        if self.transport.kind == TransportKind::Kafka {
            match &self.transport.brokers {
                None => p.push("transport.brokers: required when transport.kind = \"kafka\"".into()),
                Some(b) if b.trim().is_empty() => p.push("transport.brokers: must not be empty".into()),
                Some(_) => {}
            }
            if self.transport.partitions < 1 {
                p.push("transport.partitions: must be > 0".into());
            }
            if !matches!(self.transport.compression.as_str(), "lz4" | "zstd" | "gzip" | "none") {
                p.push(format!(
                    "transport.compression: {:?} must be lz4, zstd, gzip or none",
                    self.transport.compression
                ));
            }
        }
        if self.sinks.is_empty() && self.transport.role != Role::Source {
            p.push("sink: configure at least one [[sink]]".into());
        }
        let mut names = HashSet::new();
        for (i, s) in self.sinks.iter().enumerate() {
            let at = format!("sink[{i}]");
            if s.name.is_empty() || !s.name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                p.push(format!("{at}.name: {:?} must be letters, digits, '-' or '_'", s.name));
            } else if s.name == "source" {
                p.push(format!("{at}.name: \"source\" names the source's pipeline; choose another name"));
            } else if !names.insert(s.name.clone()) {
                p.push(format!("{at}.name: {:?} is used by another sink", s.name));
            }
            match s.lanes {
                Some(_) if s.kind == SinkKind::Parquet => {
                    p.push(format!("{at}.lanes: only PostgreSQL and MySQL sinks apply over lanes"))
                }
                Some(n) if !(1..=MAX_LANES).contains(&n) => {
                    p.push(format!("{at}.lanes: {n} is not between 1 and {MAX_LANES}"))
                }
                Some(n) if n > 1 && self.transport.kind == TransportKind::Kafka => p.push(format!(
                    "{at}.lanes: {n} lanes need the direct transport (through Kafka a sink applies over one)"
                )),
                _ => {}
            }
            match s.kind {
                SinkKind::Postgres | SinkKind::Mysql => {
                    let schemes: &[&str] =
                        if s.kind == SinkKind::Postgres { &["postgres", "postgresql"] } else { &["mysql", "mariadb"] };
                    match &s.url {
                        None => p.push(format!("{at}.url: required for a {:?} sink", s.kind).to_lowercase()),
                        Some(u) => {
                            if let Err(e) = check_url(u, schemes) {
                                p.push(format!("{at}.url: {e}"));
                            }
                        }
                    }
                    for (key, set) in [
                        ("path", s.path.is_some()),
                        ("rotate_rows", s.rotate_rows.is_some()),
                        ("rotate_secs", s.rotate_secs.is_some()),
                    ] {
                        if set {
                            p.push(format!("{at}.{key}: only for parquet sinks"));
                        }
                    }
                }
                SinkKind::Parquet => {
                    if s.path.as_deref().is_none_or(str::is_empty) {
                        p.push(format!("{at}.path: required for a parquet sink (a folder or s3://bucket/prefix)"));
                    }
                    if s.url.is_some() {
                        p.push(format!("{at}.url: not used by parquet sinks; set path"));
                    }
                    if s.rotate_rows == Some(0) {
                        p.push(format!("{at}.rotate_rows: must be > 0"));
                    }
                    if s.rotate_secs == Some(0) {
                        p.push(format!("{at}.rotate_secs: must be > 0"));
                    }
                }
            }
            if let Some(m) = &s.mapping
                && resolve(base, m).is_none()
            {
                p.push(format!("{at}.mapping: file {} not found", m.display()));
            }
        }
        let pl = &self.pipeline;
        for (key, v) in [
            ("pipeline.mailbox_rows", pl.mailbox_rows),
            ("pipeline.batch_rows", pl.batch_rows),
            ("pipeline.max_unit_rows", pl.max_unit_rows),
        ] {
            if v == 0 {
                p.push(format!("{key}: must be > 0"));
            }
        }
        if pl.backoff_base_ms == 0 || pl.backoff_max_ms < pl.backoff_base_ms {
            p.push("pipeline.backoff_base_ms: must be > 0 and at most pipeline.backoff_max_ms".into());
        }
        if p.is_empty() { Ok(()) } else { Err(p) }
    }

    /// A sink's mapping file path as found (relative to the config file, then the cwd).
    pub fn mapping_path(&self, base: &Path, sink: &SinkConfig) -> Option<PathBuf> {
        sink.mapping.as_ref().and_then(|m| resolve(base, m))
    }
}

fn resolve(base: &Path, p: &Path) -> Option<PathBuf> {
    if p.is_absolute() {
        return p.exists().then(|| p.to_path_buf());
    }
    [base.join(p), p.to_path_buf()].into_iter().find(|c| c.exists())
}

fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{:?} is not a URL ({e})", mask_url(url)))?;
    if !schemes.contains(&parsed.scheme()) {
        return Err(format!("scheme {:?} is not one of {}", parsed.scheme(), schemes.join(", ")));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(format!("{} has no host", mask_url(url)));
    }
    Ok(())
}

/// The URL with its password replaced by `****`; text that is not a URL is shown up to
/// its first `@` only.
pub fn mask_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => match url.rsplit_once('@') {
            Some((_, host)) => format!("****@{host}"),
            None => url.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked() {
        assert_eq!(mask_url("postgres://app:s3cret@db:5432/app"), "postgres://app:****@db:5432/app");
        assert_eq!(mask_url("mysql://root@127.0.0.1/x"), "mysql://root@127.0.0.1/x");
        assert_eq!(mask_url("not a url:pw@host"), "****@host");
    }

    #[test]
    fn config_messages_name_the_key() {
        let e = config::Config::builder()
            .add_source(config::File::from_str(
                "[source]\nkind = \"postgres\"\nurl = 1\ntables = []\nbogus = 2",
                config::FileFormat::Toml,
            ))
            .build()
            .unwrap()
            .try_deserialize::<Config>()
            .unwrap_err();
        let msg = explain(e);
        assert!(msg.contains("bogus") || msg.contains("source"), "{msg}");
    }
}
