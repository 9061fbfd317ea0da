//! The sinks alone (`--sinks-only`): rows/s of each sink writer and of the mapping stage,
//! without a source, in this process.
//!
//! A generator builds `users` changes like the load generator's (about 1 KB a row; half
//! inserts of new ids, half full-row updates of ids inserted before, in transactions of
//! `--txn-rows` changes) and feeds them through the same mapper and writer actors
//! the daemon runs, into one sink at a time on a fresh target. The rate is the rows of
//! the run over the time from the first change sent to the last checkpoint the sink made
//! durable. The mapping stage is timed apart on batches built beforehand: the identity
//! (no mapping file) and the renaming, lowercasing, filtering `queries/mysql.sql`.
//!
//! Beside each rate: the CPU time the sink's server and this process (generator, mapper,
//! writer) spent on the run, per million rows: a sink whose server needs more CPU for the
//! target rate than the machine's cores give cannot reach it, whatever the writer does.
//! For PostgreSQL, the reference: the same changes written into a publisher by the sink
//! (not timed), then drained by PostgreSQL's own logical replication into a fresh
//! subscriber (timed from the subscription's creation to its applying the last change),
//! unless `--skip-native`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sluice_actors::fault::Faults;
use sluice_actors::mailbox::{Sender, mailbox};
use sluice_actors::mapper::{self, Mapper, Mapping, SinkEvent, plan};
use sluice_actors::message::{Change, ChangeBatch, Checkpoint, Event, Op, Position, Row};
use sluice_actors::schema::{Column, PgType, ReplicaIdentity, TableId, TableSchema};
use sluice_actors::sink::parquet::{ParquetOptions, S3Options, open_store, part_bytes};
use sluice_actors::sink::{self, SinkSpec, WriterOptions};
use sluice_actors::supervisor::ActorThread;
use sluice_actors::value::Value;
use tokio::sync::watch;

use crate::native;
use crate::scenario::{Bench, has_user, insert_marker, pg};
use crate::wait_for;

/// Rows per mapped batch when the mapping stage is timed alone.
const MAP_BATCH_ROWS: usize = 1000;
/// Rows of batches the mapping stage is timed on.
const MAP_ROWS: usize = 200_000;
/// Parquet files are put every this many rows (the daemon's default is 100,000).
const PARQUET_ROTATE_ROWS: usize = 100_000;
/// The publisher of the native reference (`bench_native` is its subscriber).
pub const NATIVE_PUBLISHER: &str = "bench_native_pub";

#[derive(Debug, Serialize)]
pub struct SinkFigures {
    /// Rows/s per sink kind.
    pub rows_per_s: BTreeMap<String, f64>,
    /// CPU seconds per 1M rows per sink kind: its server's processes, and this process
    /// (the generator, the mapper and the writer).
    pub server_cpu_s_per_m: BTreeMap<String, f64>,
    pub bench_cpu_s_per_m: BTreeMap<String, f64>,
    /// PostgreSQL's own logical replication applying the same changes, rows/s, and its
    /// server's CPU seconds per 1M rows (walsender and apply worker).
    pub native_postgres_rows_per_s: Option<f64>,
    pub native_server_cpu_s_per_m: Option<f64>,
    /// Rows/s of the mapping stage alone: identity, and SQL (`queries/mysql.sql`).
    pub mapping_identity_rows_per_s: f64,
    pub mapping_sql_rows_per_s: f64,
    /// Peak RSS of the benchmark process (MB).
    pub peak_rss_mb: f64,
}

/// The `users` table of the load generator.
fn users_schema() -> Arc<TableSchema> {
    let col = |name: &str, pg_type: PgType, nullable: bool| Column { name: name.into(), pg_type, nullable, key: false };
    let text = || PgType::Text("text".into());
    let mut columns = vec![
        col("id", PgType::Int8, false),
        col("name", text(), false),
        col("email", text(), false),
        col("company", text(), true),
        col("address", text(), true),
        col("birthdate", PgType::Date, true),
        col("bio", text(), true),
        col("balance", PgType::Numeric(Some((12, 2))), false),
        col("attributes", PgType::Jsonb, true),
        col("external_id", PgType::Uuid, false),
        col("active", PgType::Bool, false),
        col("created_at", PgType::TimestampTz, false),
        col("updated_at", PgType::TimestampTz, false),
    ];
    columns[0].key = true;
    Arc::new(TableSchema {
        id: TableId::new("public", "users"),
        version: 1,
        columns,
        replica_identity: ReplicaIdentity::Default,
    })
}

/// Deterministic `users` changes: half inserts of new ids, half updates of earlier ones.
pub struct Generator {
    schema: Arc<TableSchema>,
    bios: Vec<String>,
    state: u64,
    inserted: i64,
    txn: u64,
}

const FIRST: [&str; 8] = ["Ada", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro"];
const LAST: [&str; 8] = ["Lovelace", "Rossi", "Nakamura", "Okafor", "Schmidt", "Haddad", "Moreau", "Silva"];
const COMPANY: [&str; 4] = ["Acme Corp", "Globex", "Initech", "Umbrella plc"];
const WORDS: [&str; 12] =
    ["lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit", "sed", "do", "tempor", "magna"];
/// Microseconds since the epoch of 2026-01-01.
const EPOCH_2026: i64 = 1_767_225_600_000_000;

impl Generator {
    pub fn new() -> Self {
        let mut g = Generator { schema: users_schema(), bios: Vec::new(), state: 42, inserted: 0, txn: 0 };
        // Bios of 500 to 1,000 bytes: rows of about 1 KB, stored inline (not TOASTed).
        g.bios = (0..64)
            .map(|_| {
                let len = 500 + (g.next() % 500) as usize;
                let mut bio = String::with_capacity(len + 16);
                while bio.len() < len {
                    bio.push_str(WORDS[(g.next() % WORDS.len() as u64) as usize]);
                    bio.push(' ');
                }
                bio
            })
            .collect();
        g
    }

    pub fn table(&self) -> &TableId {
        &self.schema.id
    }

    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn row(&mut self, id: i64, now: i64) -> Row {
        let r = self.next();
        let pick = |n: usize, shift: u32| ((r >> shift) as usize) % n;
        let (first, last) = (FIRST[pick(8, 0)], LAST[pick(8, 3)]);
        vec![
            Value::Int8(id),
            Value::Text(format!("{first} {last}")),
            Value::Text(format!("{}.{}{id}@example.com", first.to_lowercase(), last.to_lowercase())),
            Value::Text(COMPANY[pick(4, 6)].into()),
            Value::Text(format!("{} Market Street, Springfield", (r >> 8) % 9999)),
            Value::Date(((r >> 16) % 20_000) as i32 - 10_000),
            Value::Text(self.bios[pick(64, 24)].clone()),
            Value::Numeric(format!("{}.{:02}", (r >> 32) % 100_000, (r >> 48) % 100)),
            Value::Json(format!(r#"{{"plan": "pro", "score": {}, "tags": ["a", "b"]}}"#, (r >> 40) % 1000)),
            Value::Uuid(u128::from(r) << 64 | id as u128),
            Value::Bool(!r.is_multiple_of(10)),
            Value::TimestampTz(EPOCH_2026 + id),
            Value::TimestampTz(now),
        ]
    }

    /// The next transaction of `rows` changes, and the checkpoint that closes it.
    pub fn transaction(&mut self, rows: usize) -> (ChangeBatch, Checkpoint) {
        self.txn += 1;
        let lsn = self.txn * 1_000_000;
        let now = EPOCH_2026 + self.txn as i64 * 1000;
        let mut changes = Vec::with_capacity(rows);
        for seq in 1..=rows as u64 {
            let update = seq.is_multiple_of(2) && self.inserted > 0;
            let (op, id) = if update {
                (Op::Update, 1 + (self.next() % self.inserted as u64) as i64)
            } else {
                self.inserted += 1;
                (Op::Insert, self.inserted)
            };
            let after = self.row(id, now);
            changes.push(Change {
                op,
                before: None,
                after: Some(after),
                position: Position { lsn, seq },
                lsn: lsn - 1000 + seq,
                xid: self.txn as u32,
                commit_micros: now,
            });
        }
        let batch =
            ChangeBatch { table: self.schema.id.clone(), schema: self.schema.clone(), changes, snapshot_last: false };
        (batch, Checkpoint::source(Position::txn_end(lsn), Some(lsn + 1)))
    }

    /// Sends transactions of `txn_rows` changes, each followed by its checkpoint, until
    /// `rows` changes are sent (rounded up to whole transactions); returns the changes sent
    /// and the last checkpoint.
    pub async fn feed(&mut self, to: &Sender<Event>, rows: u64, txn_rows: usize) -> anyhow::Result<(u64, Checkpoint)> {
        let mut sent = 0;
        let mut last = Checkpoint::source(Position::START, None);
        while sent < rows {
            let (batch, checkpoint) = self.transaction(txn_rows);
            sent += batch.len() as u64;
            last = checkpoint.clone();
            to.send(Event::Data(Arc::new(batch))).await?;
            to.send(Event::Checkpoint(checkpoint)).await?;
        }
        Ok((sent, last))
    }
}

/// Rows/s of `rows` changes through the mapper and writer actors into `spec`'s sink.
async fn through_sink(kind: &str, spec: SinkSpec, rows: u64, txn_rows: usize) -> anyhow::Result<f64> {
    // The writer runs on a thread of its own, opened there, as in the daemon.
    let thread = ActorThread::start(&format!("{kind}.writer"))?;
    let (target, _) = spec.open_on(kind, &thread).await.with_context(|| format!("open the {kind} sink"))?;
    let capacity = 4096;
    let (to_mapper, mapper_in) = mailbox::<Event>(format!("{kind}.mapper"), "bench->mapper", capacity);
    let (to_writer, writer_in) = mailbox::<SinkEvent>(format!("{kind}.writer"), "mapper->writer", capacity);
    let (durable_tx, mut durable) = watch::channel(Position::START);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mapper_task =
        tokio::spawn(mapper::run(kind.into(), Mapper::new(Mapping::Identity), mapper_in, to_writer, Faults::default()));
    let options = WriterOptions { sink: kind.into(), stream: "bench".into(), max_unit_rows: 2000, durable: None };
    let on_commit = move |cp: Checkpoint| {
        durable_tx.send_replace(cp.position);
    };
    let writer_task = thread.spawn(sink::run(target, options, writer_in, on_commit, stop_rx, Faults::default()));
    let started = Instant::now();
    let (sent, last) = match Generator::new().feed(&to_mapper, rows, txn_rows).await {
        Ok(fed) => fed,
        // A closed mailbox means the mapper or the writer stopped: their error says why
        // (the writer's first: when it fails, the mapper only finds its mailbox closed).
        Err(closed) => {
            drop(to_mapper);
            writer_task.await??;
            mapper_task.await??;
            return Err(closed);
        }
    };
    // Nothing more comes: the writer makes what it holds durable as soon as it is idle.
    stop_tx.send_replace(true);
    let done = tokio::time::timeout(Duration::from_secs(1800), durable.wait_for(|p| *p >= last.position)).await;
    anyhow::ensure!(matches!(done, Ok(Ok(_))), "the {kind} sink did not make the last transaction durable in time");
    let rate = sent as f64 / started.elapsed().as_secs_f64();
    drop(to_mapper);
    mapper_task.await??;
    writer_task.await??;
    Ok(rate)
}

/// Rows/s of [`Mapper::map`] alone over batches built beforehand.
async fn mapping_rate(mapping: Mapping) -> anyhow::Result<f64> {
    let mut generator = Generator::new();
    let batches: Vec<ChangeBatch> =
        (0..MAP_ROWS / MAP_BATCH_ROWS).map(|_| generator.transaction(MAP_BATCH_ROWS).0).collect();
    let mut mapper = Mapper::new(mapping);
    let targets = mapper.targets(&generator.schema).await?;
    let started = Instant::now();
    let mut mapped = 0;
    for batch in &batches {
        mapped += Mapper::map(batch, &targets).iter().map(|i| i.rows()).sum::<usize>();
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(mapped > 0, "the mapping produced no rows");
    Ok(MAP_ROWS as f64 / elapsed)
}

pub async fn measure(bench: &Bench) -> anyhow::Result<SinkFigures> {
    let (rows, txn_rows) = (bench.args.rows, bench.args.txn_rows);
    let identity = mapping_rate(Mapping::Identity).await?;
    eprintln!("[bench] mapping stage, identity: {identity:.0} rows/s");
    let file = concat!(env!("CARGO_MANIFEST_DIR"), "/queries/mysql.sql");
    let statements = plan::load_file(std::path::Path::new(file)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sql = mapping_rate(Mapping::Sql(statements)).await?;
    eprintln!("[bench] mapping stage, SQL (rename, lower(), WHERE): {sql:.0} rows/s");

    let mut figures = SinkFigures {
        rows_per_s: BTreeMap::new(),
        server_cpu_s_per_m: BTreeMap::new(),
        bench_cpu_s_per_m: BTreeMap::new(),
        native_postgres_rows_per_s: None,
        native_server_cpu_s_per_m: None,
        mapping_identity_rows_per_s: identity,
        mapping_sql_rows_per_s: sql,
        peak_rss_mb: 0.0,
    };
    for kind in bench.args.sink_kinds.iter().map(String::as_str) {
        let spec = match kind {
            "postgres" => {
                bench.fresh_pg("bench_t_pg").await?;
                postgres_spec(bench, "bench_t_pg")?
            }
            "mysql" => {
                bench.fresh_mysql("bench_t_my").await?;
                SinkSpec::Mysql {
                    url: bench.mysql_url("bench_t_my"),
                    lanes: bench.args.mysql_lanes,
                    stream: "bench".into(),
                }
            }
            "parquet" => {
                let lake = bench.dir.join("lake");
                let _ = std::fs::remove_dir_all(&lake);
                let path = lake.to_string_lossy();
                let (store, prefix) = open_store(&path, &S3Options::default())?;
                let part_bytes = part_bytes(&path);
                SinkSpec::Parquet(ParquetOptions {
                    store,
                    prefix,
                    part_bytes,
                    rotate_rows: PARQUET_ROTATE_ROWS,
                    rotate_secs: 60,
                })
            }
            other => anyhow::bail!("--sink-kinds: unknown sink kind {other:?} (postgres, mysql, parquet)"),
        };
        let server = Cpu::of(kind);
        let own = Cpu::own();
        let rate = through_sink(kind, spec, rows, txn_rows).await.with_context(|| format!("the {kind} sink"))?;
        let (server, own) = (server.per_million(rows), own.per_million(rows));
        eprintln!(
            "[bench] {kind} sink: {rate:.0} rows/s ({rows} changes, 50/50 inserts/updates, {txn_rows} per transaction); \
             CPU per 1M rows: server {}, sluice-bench {}",
            secs(server),
            secs(own)
        );
        figures.rows_per_s.insert(kind.to_string(), rate);
        if let Some(s) = server {
            figures.server_cpu_s_per_m.insert(kind.to_string(), s);
        }
        if let Some(s) = own {
            figures.bench_cpu_s_per_m.insert(kind.to_string(), s);
        }
        if kind == "postgres" && !bench.args.skip_native {
            let (rate, server) = native_rate(bench, rows, txn_rows).await.context("native replication")?;
            eprintln!(
                "[bench] native replication of the same changes: {rate:.0} rows/s; server CPU per 1M rows {}",
                secs(server)
            );
            figures.native_postgres_rows_per_s = Some(rate);
            figures.native_server_cpu_s_per_m = server;
        }
    }
    figures.peak_rss_mb = crate::source::own_peak_rss_mb();
    Ok(figures)
}

fn secs(s: Option<f64>) -> String {
    s.map_or("n/a".into(), |s| format!("{s:.1} s"))
}

fn postgres_spec(bench: &Bench, db: &str) -> anyhow::Result<SinkSpec> {
    let config = Box::new(bench.url(db).parse().context("sink url")?);
    Ok(SinkSpec::Postgres { config, lanes: bench.args.pg_lanes, stream: "bench".into() })
}

/// Rows/s of PostgreSQL's own logical replication applying `rows` generated changes, and
/// its server's CPU seconds per 1M rows. The changes are written into a publisher whose
/// slot exists first, by the sluice sink (not timed: it only produces the WAL), then a
/// subscription created on a fresh subscriber drains them, up to a marker row written
/// last. The sink writes each unit's last state per key, as the source would have sent
/// it, so the publisher's WAL holds what the sink was given (less the few updates of keys
/// inserted in the same unit).
async fn native_rate(bench: &Bench, rows: u64, txn_rows: usize) -> anyhow::Result<(f64, Option<f64>)> {
    // Before the publisher is dropped: a leftover subscription keeps it in use.
    native::drop_leftover_subscription(bench).await;
    bench.fresh_pg(NATIVE_PUBLISHER).await?;
    let publisher = pg(&bench.url(NATIVE_PUBLISHER)).await?;
    loadgen::create_schema(&publisher).await?;
    native::publish(bench, NATIVE_PUBLISHER).await?;
    eprintln!("[bench] native replication: writing the same changes into a publisher");
    let spec = postgres_spec(bench, NATIVE_PUBLISHER)?;
    through_sink("postgres", spec, rows, txn_rows).await.context("writing the changes into the publisher")?;
    // The sink wrote explicit ids: the marker's id comes after them.
    publisher
        .batch_execute("SELECT setval(pg_get_serial_sequence('users', 'id'), (SELECT max(id) FROM users))")
        .await?;
    let marker = insert_marker(&publisher).await?;
    let subscriber = native::subscriber(bench).await?;
    let server = Cpu::of("postgres");
    let started = Instant::now();
    native::attach(bench, &subscriber, NATIVE_PUBLISHER, false).await?;
    wait_for("the native apply", native::LIMIT, Duration::from_millis(50), || has_user(&subscriber, marker)).await?;
    let rate = rows as f64 / started.elapsed().as_secs_f64();
    let server = server.per_million(rows);
    native::unsubscribe(bench, subscriber, NATIVE_PUBLISHER).await?;
    Ok((rate, server))
}

/// CPU time of a set of processes, from a starting reading.
struct Cpu {
    read: fn() -> Option<f64>,
    start: Option<f64>,
}

impl Cpu {
    /// The local server of a sink kind: PostgreSQL's processes, or MariaDB's (MySQL's).
    fn of(kind: &str) -> Cpu {
        let read: fn() -> Option<f64> = match kind {
            "postgres" => || server_cpu_secs(&["postgres"]),
            "mysql" => || server_cpu_secs(&["mariadbd", "mysqld"]),
            _ => || None,
        };
        Cpu { read, start: read() }
    }

    /// This process.
    fn own() -> Cpu {
        let read = || stat_times(std::path::Path::new("/proc/self/stat")).map(|t| t.own);
        Cpu { read, start: read() }
    }

    /// Seconds spent since the starting reading, per million of `rows`.
    fn per_million(&self, rows: u64) -> Option<f64> {
        Some(((self.read)()? - self.start?) * 1e6 / rows as f64)
    }
}

/// What /proc/<pid>/stat says of a process: its name, parent, CPU seconds of its own and
/// of its children that have exited and been waited for.
struct StatTimes {
    comm: String,
    ppid: u32,
    own: f64,
    reaped: f64,
}

/// /proc counts CPU time in ticks of USER_HZ, 100 per second on Linux's architectures.
const TICKS_PER_S: f64 = 100.0;

fn stat_times(path: &std::path::Path) -> Option<StatTimes> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The name is in parentheses and may hold spaces or parentheses itself.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).map(|t| t / TICKS_PER_S);
    Some(StatTimes {
        comm: stat[open + 1..close].to_string(),
        ppid: fields.get(1)?.parse().ok()?,
        own: tick(11)? + tick(12)?,
        reaped: tick(13)? + tick(14)?,
    })
}

/// CPU seconds used so far by the local server whose processes are named one of `names`:
/// every such process's own time, plus, for the server's root process (whose parent is
/// not one of them: PostgreSQL's postmaster), the time of its exited children (backends
/// of closed connections). `None` when no such process is visible.
fn server_cpu_secs(names: &[&str]) -> Option<f64> {
    let mut procs = Vec::new();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        if let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok())
            && let Some(t) = stat_times(&entry.path().join("stat"))
            && names.contains(&t.comm.as_str())
        {
            procs.push((pid, t));
        }
    }
    let pids: std::collections::HashSet<u32> = procs.iter().map(|(pid, _)| *pid).collect();
    let total = procs.iter().map(|(_, t)| t.own + if pids.contains(&t.ppid) { 0.0 } else { t.reaped }).sum();
    (!procs.is_empty()).then_some(total)
}
