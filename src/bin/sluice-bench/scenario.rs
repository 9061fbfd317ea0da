//! The measurements of sluice itself, for one transport.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mysql_async::prelude::Queryable;
use serde::Serialize;
use tokio_postgres::{Client, NoTls};

use crate::daemon::Daemon;
use crate::{Args, wait_for};

/// The local broker (tansu 0.6) holds every fetch for `fetch.wait.max.ms` even when data
/// is there, so a change waits 1.5 times that on average: a short wait, as
/// `conf/kafka.toml` advises for it (a Kafka broker answers as soon as data arrives).
/// librdkafka settings for the bundled broker (tansu), before `--kafka-option`s.
const TANSU_OPTIONS: [(&str, &str); 1] = [("fetch.wait.max.ms", "5")];
const PORT: u16 = 7891;
/// How long any one phase may take before the benchmark gives up on it.
const PHASE_LIMIT: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Direct,
    Kafka,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Direct => "direct",
            Transport::Kafka => "kafka",
        }
    }
}

/// What one transport measured.
#[derive(Debug, Default, Serialize)]
pub struct Figures {
    /// Sink kind -> rows/s.
    pub snapshot: BTreeMap<String, f64>,
    /// Sink kind -> events/s, all three sinks catching up at once in one daemon.
    pub catchup: BTreeMap<String, f64>,
    /// Events/s of a catch-up with the PostgreSQL sink alone (what native replication does).
    pub catchup_postgres_alone: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub peak_rss_mb: Option<f64>,
}

const KINDS: [&str; 3] = ["postgres", "mysql", "parquet"];

pub struct Bench {
    pub args: Args,
    pub dir: PathBuf,
    bin: PathBuf,
}

pub async fn pg(url: &str) -> anyhow::Result<Client> {
    let (client, connection) =
        tokio_postgres::connect(url, NoTls).await.with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Percentile `p` (0..=1) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied()
}

impl Bench {
    pub async fn new(args: Args) -> anyhow::Result<Bench> {
        let cache = std::env::var("SLUICE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/sluice"));
        let dir = args.dir.clone().unwrap_or_else(|| cache.join("bench"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let bin = std::env::current_exe()?.with_file_name("sluice");
        anyhow::ensure!(bin.exists(), "{} is missing: build the workspace's binaries first", bin.display());
        let bench = Bench { args, dir, bin };
        if bench.args.sinks_only || bench.args.kafka_only {
            return Ok(bench);
        }
        bench.ensure_source("bench_src", bench.args.rows).await?;
        if !bench.args.source_only
            && bench.args.transports.iter().any(|t| t == "kafka")
            && bench.kafka_rows() != bench.args.rows
        {
            bench.ensure_source("bench_src_k", bench.kafka_rows()).await?;
        }
        Ok(bench)
    }

    pub fn kafka_rows(&self) -> u64 {
        if self.args.kafka_rows == 0 { self.args.rows } else { self.args.kafka_rows.min(self.args.rows) }
    }

    pub fn kafka_changes(&self) -> u64 {
        if self.args.kafka_changes == 0 { self.args.changes } else { self.args.kafka_changes }
    }

    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.args.pg.trim_end_matches('/'))
    }

    /// A source database holding exactly `rows` users (kept between runs: filling a
    /// million rows takes a minute).
    pub async fn ensure_source(&self, db: &str, rows: u64) -> anyhow::Result<()> {
        let admin = pg(&self.url("postgres")).await?;
        let exists = admin.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&db]).await?.is_some();
        if exists {
            let client = pg(&self.url(db)).await?;
            let n: Option<i64> =
                client.query_opt("SELECT count(*) FROM users", &[]).await.ok().flatten().map(|r| r.get(0));
            if n == Some(rows as i64) {
                return Ok(());
            }
            drop_slots(&admin, db).await?;
            admin.batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)")).await?;
        }
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
        eprintln!("[bench] filling {db} with {rows} users");
        let (n, took) = loadgen::populate(&self.url(db), rows, 1).await?;
        eprintln!("[bench] {n} users in {:.1}s", took.as_secs_f64());
        pg(&self.url(db)).await?.batch_execute("VACUUM ANALYZE users").await?;
        Ok(())
    }

    /// Drops what the runs left (the source databases stay, for the next run).
    pub async fn cleanup(&self) {
        for slot in ["bench_snap", "bench_cu", "bench_lat", "bench_native"] {
            let _ = self.drop_slot(slot).await;
        }
        if let Ok(admin) = pg(&self.url("postgres")).await {
            for db in ["bench_t_pg", "bench_native", crate::sinks::NATIVE_PUBLISHER] {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await;
            }
        }
        if let Ok(mut c) = mysql_async::Conn::from_url(self.args.mysql.as_str()).await {
            let _ = c.query_drop("DROP DATABASE IF EXISTS `bench_t_my`").await;
        }
        let _ = std::fs::remove_dir_all(self.lake());
    }

    /// A fresh, empty PostgreSQL database.
    pub async fn fresh_pg(&self, db: &str) -> anyhow::Result<()> {
        let admin = pg(&self.url("postgres")).await?;
        drop_slots(&admin, db).await?;
        // One statement per call: several in one string run as a transaction block.
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)")).await?;
        admin.batch_execute(&format!("CREATE DATABASE {db}")).await?;
        Ok(())
    }

    pub async fn fresh_mysql(&self, db: &str) -> anyhow::Result<()> {
        let mut c = mysql_async::Conn::from_url(self.args.mysql.as_str()).await.context("connect to MariaDB")?;
        c.query_drop(format!("DROP DATABASE IF EXISTS `{db}`")).await?;
        c.query_drop(format!("CREATE DATABASE `{db}`")).await?;
        // The server's settings decide its apply rate more than the sink does: a small
        // buffer pool makes updates wait on disk reads, a small redo log on page flushes.
        let settings: Option<(String, u64, u64, u8)> = c
            .query_first(
                "SELECT VERSION(), @@innodb_buffer_pool_size >> 20, @@innodb_log_file_size >> 20, \
                 @@innodb_flush_log_at_trx_commit",
            )
            .await?;
        if let Some((version, pool, log, flush)) = settings {
            eprintln!(
                "[bench] MySQL target {version}: innodb_buffer_pool_size {pool} MB, innodb_log_file_size {log} MB, \
                 innodb_flush_log_at_trx_commit {flush}"
            );
        }
        c.disconnect().await?;
        Ok(())
    }

    pub fn mysql_url(&self, db: &str) -> String {
        format!("{}/{db}", self.args.mysql.trim_end_matches('/'))
    }

    /// Drops a replication slot if it exists and nothing uses it.
    pub async fn drop_slot(&self, slot: &str) -> anyhow::Result<()> {
        let admin = pg(&self.url("postgres")).await?;
        admin
            .execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active",
                &[&slot],
            )
            .await?;
        Ok(())
    }

    fn lake(&self) -> PathBuf {
        self.dir.join("lake")
    }

    fn sink_toml(&self, kind: &str, transport: Transport) -> String {
        // Through Kafka a sink applies over one connection.
        let lanes = |n: usize| if transport == Transport::Direct { n } else { 1 };
        match kind {
            "postgres" => {
                let lanes = lanes(self.args.pg_lanes);
                format!(
                    "[[sink]]\nname = \"postgres\"\nkind = \"postgres\"\nurl = \"{}\"\nlanes = {lanes}\n",
                    self.url("bench_t_pg")
                )
            }
            "mysql" => format!(
                "[[sink]]\nname = \"mysql\"\nkind = \"mysql\"\nurl = \"{}\"\nmapping = \"{}\"\nlanes = {}\n",
                self.mysql_url("bench_t_my"),
                concat!(env!("CARGO_MANIFEST_DIR"), "/queries/mysql.sql"),
                lanes(self.args.mysql_lanes)
            ),
            // Files every second, so that "durable" is not the default minute of buffering.
            _ => format!(
                "[[sink]]\nname = \"parquet\"\nkind = \"parquet\"\npath = \"{}\"\nrotate_secs = 1\n",
                self.lake().display()
            ),
        }
    }

    /// Fresh targets for these sink kinds.
    async fn fresh_targets(&self, kinds: &[&str]) -> anyhow::Result<()> {
        for k in kinds {
            match *k {
                "postgres" => self.fresh_pg("bench_t_pg").await?,
                "mysql" => self.fresh_mysql("bench_t_my").await?,
                _ => {
                    let _ = std::fs::remove_dir_all(self.lake());
                    std::fs::create_dir_all(self.lake())?;
                }
            }
        }
        Ok(())
    }

    /// Writes a configuration and starts the daemon on it.
    async fn daemon(
        &self,
        name: &str,
        source: &str,
        slot: &str,
        snapshot: &str,
        sinks: &[&str],
        transport: Transport,
    ) -> anyhow::Result<Daemon> {
        self.drop_slot(slot).await?;
        let transport_toml = match transport {
            Transport::Direct => String::new(),
            Transport::Kafka => {
                let prefix = format!("bench{}", chrono::Utc::now().timestamp_millis());
                let options = TANSU_OPTIONS.iter().map(|(k, v)| (k.to_string(), v.to_string()));
                let options: Vec<String> = options
                    .chain(self.args.kafka_option.iter().cloned())
                    .map(|(k, v)| format!("{k:?} = {v:?}"))
                    .collect();
                format!(
                    "[transport]\nkind = \"kafka\"\nbrokers = \"{}\"\ntopic_prefix = \"{prefix}\"\ngroup = \"{prefix}\"\n\
                     options = {{ {} }}\n",
                    self.args.kafka,
                    options.join(", ")
                )
            }
        };
        let sinks: String = sinks.iter().map(|k| self.sink_toml(k, transport)).collect();
        let pipeline: String = self.args.pipeline.iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
        let toml = format!(
            "[daemon]\nhttp = \"127.0.0.1:{PORT}\"\nstate_dir = \"{}\"\n\n[source]\nkind = \"postgres\"\nurl = \"{}\"\n\
             tables = [\"public.users\", \"public.orders\"]\nslot = \"{slot}\"\npublication = \"{slot}\"\nsnapshot = \"{snapshot}\"\n\n\
             [pipeline]\n{pipeline}\n{transport_toml}\n{sinks}",
            self.dir.join("state").display(),
            self.url(source),
        );
        let path = self.dir.join(format!("{name}-{}.toml", transport.name()));
        std::fs::write(&path, toml)?;
        Daemon::start(&self.bin, &path, PORT).await
    }

    /// All phases for one transport.
    pub async fn measure(&self, transport: Transport) -> anyhow::Result<Figures> {
        let mut figures = Figures::default();
        let mut rss: f64 = 0.0;
        if self.args.runs("snapshot") {
            for kind in KINDS {
                let (rate, peak) =
                    self.snapshot(transport, kind).await.with_context(|| format!("snapshot into {kind}"))?;
                eprintln!("[bench] {} snapshot into {kind}: {rate:.0} rows/s, peak RSS {peak:.1} MB", transport.name());
                figures.snapshot.insert(kind.into(), rate);
                rss = rss.max(peak);
            }
        }
        if self.args.runs("catchup") {
            let (alone, peak) = self.catchup(transport, &["postgres"]).await.context("catch-up (postgres alone)")?;
            if let Some((_, rate)) = alone.first() {
                eprintln!("[bench] {} catch-up into postgres alone: {rate:.0} events/s", transport.name());
                figures.catchup_postgres_alone = Some(*rate);
            }
            rss = rss.max(peak);
        }
        if self.args.runs("catchup-all") {
            let (rates, peak) = self.catchup(transport, &KINDS).await.context("catch-up")?;
            for (kind, rate) in rates {
                eprintln!("[bench] {} catch-up into {kind}: {rate:.0} events/s", transport.name());
                figures.catchup.insert(kind, rate);
            }
            eprintln!("[bench] {} catch-up peak RSS {peak:.1} MB", transport.name());
            rss = rss.max(peak);
        }
        if self.args.runs("latency") {
            let (p50, p99, peak) = self.latency(transport).await.context("latency")?;
            eprintln!("[bench] {} latency: p50 {p50:.2} ms, p99 {p99:.2} ms, peak RSS {peak:.1} MB", transport.name());
            (figures.latency_p50_ms, figures.latency_p99_ms) = (Some(p50), Some(p99));
            rss = rss.max(peak);
        }
        figures.peak_rss_mb = Some(rss);
        Ok(figures)
    }

    /// Rows/s of a snapshot into one sink kind, and the daemon's peak RSS.
    async fn snapshot(&self, transport: Transport, kind: &str) -> anyhow::Result<(f64, f64)> {
        let (source, rows) = match transport {
            Transport::Kafka if self.kafka_rows() != self.args.rows => ("bench_src_k", self.kafka_rows()),
            Transport::Kafka => ("bench_src", self.kafka_rows()),
            Transport::Direct => ("bench_src", self.args.rows),
        };
        // The MariaDB mapping keeps active users only.
        let expected: i64 = if kind == "mysql" {
            pg(&self.url(source)).await?.query_one("SELECT count(*) FROM users WHERE active", &[]).await?.get(0)
        } else {
            rows as i64
        };
        self.fresh_targets(&[kind]).await?;
        let started = Instant::now();
        let daemon = self.daemon("snapshot", source, "bench_snap", "initial", &[kind], transport).await?;
        let target = self.target(kind).await?;
        wait_for(&format!("{expected} rows in the {kind} sink"), PHASE_LIMIT, Duration::from_millis(100), || async {
            Ok(daemon.rows(kind)? >= expected as f64 && target.count().await? >= expected)
        })
        .await?;
        let rate = rows as f64 / started.elapsed().as_secs_f64();
        let peak = daemon.peak_rss_mb();
        daemon.stop().await?;
        self.drop_slot("bench_snap").await?;
        Ok((rate, peak))
    }

    async fn target(&self, kind: &str) -> anyhow::Result<Target> {
        Ok(match kind {
            "postgres" => Target::Pg(pg(&self.url("bench_t_pg")).await?),
            "mysql" => Target::My(self.mysql_url("bench_t_my")),
            _ => Target::Lake,
        })
    }

    /// Events/s per sink kind of a catch-up into these sinks, and the peak RSS.
    async fn catchup(&self, transport: Transport, kinds: &[&str]) -> anyhow::Result<(Vec<(String, f64)>, f64)> {
        let changes = if transport == Transport::Kafka { self.kafka_changes() } else { self.args.changes };
        self.ensure_source("bench_cu", self.args.catchup_users).await?;
        self.fresh_targets(kinds).await?;
        let daemon = self.daemon("catchup", "bench_cu", "bench_cu", "initial", kinds, transport).await?;
        let source = pg(&self.url("bench_cu")).await?;
        let users: i64 = source.query_one("SELECT count(*) FROM users", &[]).await?.get(0);
        let targets = Targets { pg: pg(&self.url("bench_t_pg")).await?, mysql: self.mysql_url("bench_t_my") };
        wait_for("the catch-up's initial copy", PHASE_LIMIT, Duration::from_millis(200), || async {
            Ok(daemon.get("/ready")?.0 == 200
                && (!kinds.contains(&"postgres") || count(&targets.pg, "users").await? >= users)
                && (!kinds.contains(&"parquet") || daemon.rows("parquet")? >= users as f64))
        })
        .await?;
        // Every sink must hold the whole copy before it is paused: one paused in the middle
        // would come back without a complete snapshot and the source would copy again. A
        // row written now (the copy has begun, so it is streamed after it, and the MariaDB
        // mapping keeps it) reaches each sink after its copy; the lake has every copied row
        // of both tables and then it.
        let copied_rows: i64 =
            source.query_one("SELECT (SELECT count(*) FROM users) + (SELECT count(*) FROM orders)", &[]).await?.get(0);
        let copied = insert_marker(&source).await?;
        wait_for("the end of the catch-up's initial copy", PHASE_LIMIT, Duration::from_millis(200), || async {
            Ok((!kinds.contains(&"postgres") || has_user(&targets.pg, copied).await?)
                && (!kinds.contains(&"mysql") || targets.mysql_has(copied).await?)
                && (!kinds.contains(&"parquet") || daemon.rows("parquet")? > copied_rows as f64))
        })
        .await?;
        for k in kinds {
            daemon.post(&format!("/api/pipelines/{k}/pause"))?;
        }
        eprintln!("[bench] {} catch-up: writing {changes} changes while the sinks are paused", transport.name());
        let summary = loadgen::run(workload(&self.url("bench_cu"), changes, 0, 5, false), Default::default()).await?;
        let marker = insert_marker(&source).await?;
        if transport == Transport::Kafka {
            // The consumers alone are measured: the producer first puts the backlog into Kafka.
            let mut last = -1.0;
            let deadline = Instant::now() + PHASE_LIMIT;
            loop {
                let now = daemon.metric("sluice_events_total", Some(("stage", "produced")))?;
                if now == last && now > 0.0 {
                    break;
                }
                anyhow::ensure!(Instant::now() < deadline, "the producer did not deliver the backlog in time");
                last = now;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
        let expected_lake = daemon.rows("parquet")? + summary.changes as f64 + 1.0;
        let started = Instant::now();
        for k in kinds {
            daemon.post(&format!("/api/pipelines/{k}/resume"))?;
        }
        let deadline = started + PHASE_LIMIT;
        let mut done: BTreeMap<String, f64> = BTreeMap::new();
        while done.len() < kinds.len() {
            anyhow::ensure!(Instant::now() < deadline, "the sinks did not catch up in time: {done:?}");
            let pending: Vec<&str> = kinds.iter().copied().filter(|k| !done.contains_key(*k)).collect();
            for k in pending {
                let seen = match k {
                    "postgres" => has_user(&targets.pg, marker).await?,
                    "mysql" => targets.mysql_has(marker).await?,
                    _ => daemon.rows("parquet")? >= expected_lake,
                };
                if seen {
                    done.insert(k.to_string(), started.elapsed().as_secs_f64());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rates = done.into_iter().map(|(k, secs)| (k, summary.changes as f64 / secs)).collect();
        let peak = daemon.peak_rss_mb();
        daemon.stop().await?;
        self.drop_slot("bench_cu").await?;
        Ok((rates, peak))
    }

    /// p50 and p99 of commit -> visible in the PostgreSQL sink (ms), and the peak RSS.
    async fn latency(&self, transport: Transport) -> anyhow::Result<(f64, f64, f64)> {
        self.ensure_source("bench_cu", self.args.catchup_users).await?;
        self.fresh_targets(&["postgres"]).await?;
        let daemon = self.daemon("latency", "bench_cu", "bench_lat", "never", &["postgres"], transport).await?;
        daemon.wait_ready(Duration::from_secs(60)).await?;
        let source = pg(&self.url("bench_cu")).await?;
        let target = pg(&self.url("bench_t_pg")).await?;
        // The first row creates the target table; then it learns when rows become visible.
        let warm = insert_marker(&source).await?;
        wait_for("the first row in the sink", Duration::from_secs(60), Duration::from_millis(50), || async {
            Ok(has_user(&target, warm).await.unwrap_or(false))
        })
        .await?;
        let latencies =
            measure_latency(&source, &target, &self.url("bench_cu"), self.args.latency_txns, self.args.latency_rate)
                .await?;
        let peak = daemon.peak_rss_mb();
        daemon.stop().await?;
        self.drop_slot("bench_lat").await?;
        let p = |q| percentile(&latencies, q).unwrap_or(f64::NAN);
        Ok((p(0.50), p(0.99), peak))
    }
}

/// Writes `txns` single-row inserts at `rate`/s into the source and returns, sorted, how
/// long each took from its commit-side time to its insertion in the target (ms). The
/// target's `users` table gets a `_visible_at` column stamped by the target itself.
pub async fn measure_latency(
    source: &Client,
    target: &Client,
    source_url: &str,
    txns: u64,
    rate: u64,
) -> anyhow::Result<Vec<f64>> {
    target
        .batch_execute("ALTER TABLE users ADD COLUMN IF NOT EXISTS _visible_at timestamptz DEFAULT clock_timestamp()")
        .await?;
    let from: i64 = source.query_one("SELECT coalesce(max(id), 0) FROM users", &[]).await?.get(0);
    let summary = loadgen::run(workload(source_url, txns, rate, 1, true), Default::default()).await?;
    wait_for("every latency row in the sink", Duration::from_secs(120), Duration::from_millis(100), || async {
        let n: i64 = target.query_one("SELECT count(*) FROM users WHERE id > $1", &[&from]).await?.get(0);
        Ok(n as u64 >= summary.changes)
    })
    .await?;
    let rows = target
        .query(
            "SELECT (extract(epoch FROM _visible_at - updated_at) * 1000)::float8 FROM users WHERE id > $1 ORDER BY 1",
            &[&from],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get::<_, f64>(0)).collect())
}

/// The load generator's options for the benchmark: `inserts_only` for the latency run.
pub fn workload(url: &str, count: u64, rate: u64, txn_size: usize, inserts_only: bool) -> loadgen::Options {
    let (mix, tables, connections) = if inserts_only {
        ("insert=100,update=0,delete=0", vec![loadgen::Table::Users], 1)
    } else {
        ("insert=40,update=45,delete=15", vec![loadgen::Table::Users, loadgen::Table::Orders], 4)
    };
    loadgen::Options {
        url: url.into(),
        rate,
        duration: None,
        count: Some(count),
        mix: mix.parse().expect("mix"),
        tables,
        seed: 11,
        connections,
        txn_size,
        progress: false,
    }
}

/// Inserts a recognisable active user (the last change of a phase); returns its id. Sinks
/// are polled for it by key: a lookup by another column scans the target, and took 8% of
/// the machine's CPU away from the catch-up it was timing.
pub async fn insert_marker(source: &Client) -> anyhow::Result<i64> {
    let email = format!("bench-marker-{}@example.com", chrono::Utc::now().timestamp_micros());
    let row = source
        .query_one(
            "INSERT INTO users (name, email, external_id, active) VALUES ('Bench Marker', $1, gen_random_uuid(), true) \
             RETURNING id",
            &[&email],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether the PostgreSQL target holds the user `id`.
pub async fn has_user(target: &Client, id: i64) -> anyhow::Result<bool> {
    Ok(target.query_opt("SELECT 1 FROM users WHERE id = $1", &[&id]).await?.is_some())
}

pub async fn count(client: &Client, table: &str) -> anyhow::Result<i64> {
    Ok(client.query_opt(&format!("SELECT count(*) FROM {table}"), &[]).await.ok().flatten().map_or(0, |r| r.get(0)))
}

async fn drop_slots(admin: &Client, db: &str) -> anyhow::Result<()> {
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = $1 AND NOT active",
            &[&db],
        )
        .await?;
    Ok(())
}

/// The catch-up's database sinks.
struct Targets {
    pg: Client,
    mysql: String,
}

impl Targets {
    async fn mysql_has(&self, id: i64) -> anyhow::Result<bool> {
        let mut c = mysql_async::Conn::from_url(self.mysql.as_str()).await?;
        let found: Option<i64> =
            c.exec_first("SELECT 1 FROM customers WHERE customer_id = ?", (id,)).await.unwrap_or(None);
        c.disconnect().await?;
        Ok(found.is_some())
    }
}

/// A snapshot's target, counted.
enum Target {
    Pg(Client),
    My(String),
    Lake,
}

impl Target {
    async fn count(&self) -> anyhow::Result<i64> {
        match self {
            Target::Pg(c) => count(c, "users").await,
            Target::My(url) => {
                let mut c = mysql_async::Conn::from_url(url.as_str()).await?;
                let n: Option<i64> = c.query_first("SELECT count(*) FROM customers").await.unwrap_or(Some(0));
                c.disconnect().await?;
                Ok(n.unwrap_or(0))
            }
            // The lake's rows are counted by the daemon at each durable flush.
            Target::Lake => Ok(i64::MAX),
        }
    }
}
