//! `sluice-bench`: the benchmark that compares sluice with PostgreSQL's own logical
//! replication on the local services (not a test: it prints figures, asserts nothing).
//!
//! For each transport (direct, Kafka) it measures, one after another, with a release
//! build of `sluice` run as a child process:
//! 1. snapshot of an N-row `users` table into each sink kind (rows/s);
//! 2. streaming catch-up: M changes written while the sinks are paused, then drained
//!    (events/s per sink): once with the PostgreSQL sink alone (the figure compared with
//!    native replication, which also applies into one database), then with all three
//!    sinks sharing the daemon;
//! 3. latency: single-row transactions at 100/s, commit -> visible in the PostgreSQL sink
//!    (p50/p99), from the row's commit-side `updated_at` and a `_visible_at` column the
//!    benchmark adds to the target table with `DEFAULT clock_timestamp()`;
//! 4. the daemon's peak RSS (`VmHWM`).
//!
//! Then the same through a publication and a subscription into a second database on the
//! same server (slot created first, `create_slot = false`), and prints one JSON line and
//! a table with the sluice / native ratios.

#![allow(unreachable_pub)] // a binary: `pub` only shares items between its modules

mod daemon;
mod kafka;
mod native;
mod scenario;
mod sinks;
mod source;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde_json::json;

use crate::scenario::{Bench, Figures, Transport};

#[derive(Parser, Debug, Clone)]
#[command(name = "sluice-bench", about = "sluice against PostgreSQL's own logical replication, on the local services")]
pub struct Args {
    /// Rows of `users` for the snapshot.
    #[arg(long, default_value_t = 1_000_000)]
    pub rows: u64,
    /// Rows of `users` for the snapshot through Kafka (the local broker is far slower
    /// than a Kafka cluster); 0: the same as --rows.
    #[arg(long, default_value_t = 100_000)]
    pub kafka_rows: u64,
    /// Changes written while the sinks are paused, for the catch-up.
    #[arg(long, default_value_t = 500_000)]
    pub changes: u64,
    /// Users in the source of the catch-up, latency and streaming-decode runs (updates and
    /// deletes need rows). The default fits in PostgreSQL's default shared_buffers; a
    /// larger one (500,000 users are about 600 MB) shows the apply into a table that does
    /// not, where the server's page reads and writes decide the rate.
    #[arg(long, default_value_t = 10_000)]
    pub catchup_users: u64,
    /// Changes for the catch-up through Kafka; 0: the same as --changes.
    #[arg(long, default_value_t = 100_000)]
    pub kafka_changes: u64,
    /// Single-row transactions for the latency, at --latency-rate per second.
    #[arg(long, default_value_t = 1000)]
    pub latency_txns: u64,
    #[arg(long, default_value_t = 100)]
    pub latency_rate: u64,
    /// Transports to measure: direct, kafka.
    #[arg(long, value_delimiter = ',', default_value = "direct,kafka")]
    pub transports: Vec<String>,
    /// Phases to run: snapshot (into each sink kind), catchup (into the PostgreSQL sink
    /// alone), catchup-all (into the three sinks at once), latency. The native reference
    /// runs the snapshot, catchup and latency ones.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "snapshot,catchup,catchup-all,latency",
        value_parser = ["snapshot", "catchup", "catchup-all", "latency"]
    )]
    pub phases: Vec<String>,
    /// Skip PostgreSQL's native replication.
    #[arg(long)]
    pub skip_native: bool,
    /// Measure only the source: snapshot rows/s of --rows users and streaming decode
    /// events/s of a --changes backlog, into a consumer that discards.
    #[arg(long)]
    pub source_only: bool,
    /// Measure only the sinks: --rows generated `users` changes (50/50 inserts and
    /// updates) through the mapper and writer actors into each sink kind, with the CPU
    /// its server spent, and the mapping stage alone; for PostgreSQL, also native
    /// replication applying the same changes (unless --skip-native).
    #[arg(long, conflicts_with = "source_only")]
    pub sinks_only: bool,
    /// Measure only the Kafka transport: --rows generated `users` changes through the
    /// producer actor to the broker, then read back by the consumer actor into a
    /// discarding end.
    #[arg(long, conflicts_with_all = ["source_only", "sinks_only"])]
    pub kafka_only: bool,
    /// Extra librdkafka settings for the Kafka transport, in --kafka-only and in the
    /// daemon's `[transport.options]` (`--kafka-option linger.ms=20`, repeatable).
    #[arg(long, value_parser = parse_key_value)]
    pub kafka_option: Vec<(String, String)>,
    /// Settings of the daemon's `[pipeline]` section (`--pipeline mailbox_rows=1024`,
    /// repeatable), to compare tunings on the same workload.
    #[arg(long, value_parser = parse_key_value)]
    pub pipeline: Vec<(String, String)>,
    /// Connections the PostgreSQL sink applies over (its `lanes`; direct transport and
    /// --sinks-only).
    #[arg(long, default_value_t = 1)]
    pub pg_lanes: usize,
    /// Connections the MySQL sink applies over (its `lanes`; direct transport and
    /// --sinks-only).
    #[arg(long, default_value_t = 1)]
    pub mysql_lanes: usize,
    /// Sink kinds for --sinks-only.
    #[arg(long, value_delimiter = ',', default_value = "postgres,mysql,parquet")]
    pub sink_kinds: Vec<String>,
    /// Changes per generated transaction (--sinks-only, --kafka-only).
    #[arg(long, default_value_t = 1000)]
    pub txn_rows: usize,
    /// PostgreSQL server (a superuser; databases bench_* are created and dropped). The
    /// default is the local server's Unix socket when it has one, else 127.0.0.1:5432; sluice
    /// and the native subscription both connect the way this says.
    #[arg(long, env = "SLUICE_BENCH_PG", default_value_t = default_pg())]
    pub pg: String,
    #[arg(long, env = "SLUICE_BENCH_MYSQL", default_value = "mysql://root@127.0.0.1:3306")]
    pub mysql: String,
    #[arg(long, env = "SLUICE_BENCH_KAFKA", default_value = "127.0.0.1:9092")]
    pub kafka: String,
    /// Where the configurations, logs and the lake go.
    #[arg(long, env = "SLUICE_BENCH_DIR")]
    pub dir: Option<std::path::PathBuf>,
    /// Also write the JSON line to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

impl Args {
    pub fn runs(&self, phase: &str) -> bool {
        self.phases.iter().any(|p| p == phase)
    }
}

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

fn print_table(results: &[(Transport, Figures)], native: Option<&native::NativeFigures>) {
    println!();
    println!("{:<28} {:>14} {:>14} {:>14}", "", "direct", "kafka", "pg native");
    let get = |t: Transport| results.iter().find(|(x, _)| *x == t).map(|(_, f)| f);
    let row = |label: &str, f: &dyn Fn(&Figures) -> Option<f64>, n: Option<f64>, digits: usize| {
        println!(
            "{label:<28} {:>14} {:>14} {:>14}",
            cell(get(Transport::Direct).and_then(f), digits),
            cell(get(Transport::Kafka).and_then(f), digits),
            cell(n, digits)
        );
    };
    row(
        "snapshot rows/s  postgres",
        &|f| f.snapshot.get("postgres").copied(),
        native.and_then(|n| n.snapshot_rows_per_s),
        0,
    );
    row("snapshot rows/s  mysql", &|f| f.snapshot.get("mysql").copied(), None, 0);
    row("snapshot rows/s  parquet", &|f| f.snapshot.get("parquet").copied(), None, 0);
    row("catch-up ev/s postgres alone", &|f| f.catchup_postgres_alone, native.and_then(|n| n.catchup_events_per_s), 0);
    row("catch-up events/s postgres", &|f| f.catchup.get("postgres").copied(), None, 0);
    row("catch-up events/s mysql", &|f| f.catchup.get("mysql").copied(), None, 0);
    row("catch-up events/s parquet", &|f| f.catchup.get("parquet").copied(), None, 0);
    row("latency p50 (ms)", &|f| f.latency_p50_ms, native.and_then(|n| n.latency_p50_ms), 2);
    row("latency p99 (ms)", &|f| f.latency_p99_ms, native.and_then(|n| n.latency_p99_ms), 2);
    row("peak RSS (MB)", &|f| f.peak_rss_mb, None, 1);
}

/// The local server's Unix socket if it has one: its walsender writes a message per change,
/// and over loopback TCP each of those writes costs it more than decoding the change (the
/// streaming decode ran at 106k events/s over TCP, 197k over the socket, on 2 cores).
fn default_pg() -> String {
    const SOCKET_DIR: &str = "/var/run/postgresql";
    if std::path::Path::new(SOCKET_DIR).join(".s.PGSQL.5432").exists() {
        format!("postgres://postgres@{}", SOCKET_DIR.replace('/', "%2F"))
    } else {
        "postgres://postgres@127.0.0.1:5432".into()
    }
}

fn main() -> anyhow::Result<()> {
    // The daemon's allocator settings: the in-process measurements (--sinks-only,
    // --source-only, --kafka-only) run the daemon's actors.
    sluice::allocator::configure();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    let bench = Bench::new(args.clone()).await.context("prepare the benchmark")?;
    let load_before = load();
    // One component alone: its figures in one JSON line.
    let component = if args.source_only {
        Some(("sluice-source", serde_json::to_value(source::measure(&bench).await.context("the source alone")?)?))
    } else if args.sinks_only {
        Some(("sluice-sinks", serde_json::to_value(sinks::measure(&bench).await.context("the sinks alone")?)?))
    } else if args.kafka_only {
        Some((
            "sluice-kafka",
            serde_json::to_value(kafka::measure(&bench).await.context("the Kafka transport alone")?)?,
        ))
    } else {
        None
    };
    if let Some((name, figures)) = component {
        let line = json!({
            "bench": name, "cores": num_cores(), "load_before": load_before, "load_after": load(),
            "pg": args.pg, "rows": args.rows, "changes": args.changes, "catchup_users": args.catchup_users,
            "txn_rows": args.txn_rows,
            "figures": figures,
        });
        emit(&line, &args)?;
        bench.cleanup().await;
        return Ok(());
    }
    eprintln!("[bench] machine load before: {load_before}; cores: {}; PostgreSQL at {}", num_cores(), args.pg);
    let mut results = Vec::new();
    // `--transports ''` measures native replication alone.
    for t in args.transports.iter().filter(|t| !t.is_empty()) {
        let transport = match t.as_str() {
            "direct" => Transport::Direct,
            "kafka" => Transport::Kafka,
            other => anyhow::bail!("--transports: unknown transport {other:?} (direct, kafka)"),
        };
        results.push((transport, bench.measure(transport).await.with_context(|| format!("the {t} transport"))?));
    }
    let native =
        if args.skip_native { None } else { Some(native::measure(&bench).await.context("native replication")?) };
    let load_after = load();
    let direct = results.iter().find(|(t, _)| *t == Transport::Direct).map(|(_, f)| f);
    let ratios = native.as_ref().map(|n| {
        json!({
            "snapshot": ratio(direct.and_then(|f| f.snapshot.get("postgres").copied()), n.snapshot_rows_per_s),
            // The PostgreSQL sink alone, as the subscription is alone.
            "catchup": ratio(direct.and_then(|f| f.catchup_postgres_alone), n.catchup_events_per_s),
            // Below 1 is better: sluice's p99 over native's.
            "latency_p99": ratio(direct.and_then(|f| f.latency_p99_ms), n.latency_p99_ms),
        })
    });
    let line = json!({
        "bench": "sluice",
        "cores": num_cores(),
        "load_before": load_before,
        "load_after": load_after,
        "pg": args.pg,
        "rows": args.rows,
        "kafka_rows": bench.kafka_rows(),
        "changes": args.changes,
        "catchup_users": args.catchup_users,
        "kafka_changes": bench.kafka_changes(),
        "latency_txns": args.latency_txns,
        "results": results.iter().map(|(t, f)| (t.name().to_string(), serde_json::to_value(f).unwrap_or_default())).collect::<serde_json::Map<_, _>>(),
        "native": native,
        "ratios_direct_over_native": ratios,
    });
    emit(&line, &args)?;
    print_table(&results, native.as_ref());
    if let Some(r) = &ratios {
        println!(
            "\nsluice (direct) / native: snapshot {}x, catch-up {}x, p99 latency {}x (lower is better)",
            cell(r["snapshot"].as_f64(), 2),
            cell(r["catchup"].as_f64(), 2),
            cell(r["latency_p99"].as_f64(), 2)
        );
    }
    println!("machine: {} cores, load {load_before} before, {load_after} after", num_cores());
    bench.cleanup().await;
    Ok(())
}

/// Prints the JSON line, and writes it to `--json` if given.
fn emit(line: &serde_json::Value, args: &Args) -> anyhow::Result<()> {
    println!("{line}");
    if let Some(path) = &args.json {
        std::fs::write(path, format!("{line}\n")).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not key=value"))
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Polls `check` every `every` until it holds; fails after `timeout` naming `what`.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}
