//! The source alone (`--source-only`): the snapshot and the streaming decode of the
//! PostgreSQL source into a consumer that counts and discards, in this process.
//!
//! 1. snapshot: the N-row `users` table of `bench_src`, rows/s until the snapshot's end;
//! 2. streaming: a slot is created, M changes are written while nothing reads it, then
//!    the source reads the backlog: events/s until the M-th change.
//!
//! Checkpoints are acknowledged as they come, as a sink that applies at once would.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sluice_actors::fault::Faults;
use sluice_actors::mailbox::mailbox;
use sluice_actors::message::{Event, Position};
use sluice_actors::schema::TableId;
use sluice_actors::source::snapshot::SnapshotOptions;
use sluice_actors::source::wal::WalOptions;
use sluice_actors::source::{self, PgSourceOptions, SnapshotMode, SourceLinks};
use tokio::sync::watch;

use crate::scenario::{Bench, workload};
use crate::wait_for;

const SLOT: &str = "bench_source";

#[derive(Debug, Serialize)]
pub struct SourceFigures {
    pub snapshot_rows_per_s: f64,
    pub streaming_events_per_s: f64,
    /// Peak RSS of the benchmark process, which holds the source (MB).
    pub peak_rss_mb: f64,
}

/// A running source whose changes are counted and dropped.
struct Counting {
    changes: Arc<AtomicU64>,
    snapshot_done: watch::Receiver<bool>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<sluice_actors::error::Result<()>>,
    _rewind: watch::Sender<u64>,
}

impl Counting {
    fn start(bench: &Bench, db: &str, snapshot: SnapshotMode) -> anyhow::Result<Counting> {
        let options = PgSourceOptions {
            pg: bench.url(db).parse().context("source url")?,
            tables: vec![TableId::new("public", "users"), TableId::new("public", "orders")],
            slot: SLOT.into(),
            publication: SLOT.into(),
            snapshot,
            // The daemon's defaults.
            snapshot_options: SnapshotOptions { batch_rows: 1000, parallelism: 2, chunk_rows: 250_000 },
            wal_options: WalOptions { batch_rows: 1000, heartbeat: Duration::from_secs(10) },
        };
        let (out, mut input) = mailbox::<Event>("discard", "source->discard", 4096);
        let (confirm_tx, confirm) = watch::channel(0u64);
        let (rewind, rewind_rx) = watch::channel(0u64);
        let (stop, stop_rx) = watch::channel(false);
        let (done_tx, snapshot_done) = watch::channel(false);
        let links = SourceLinks { out, confirm, rewind: rewind_rx, stop: stop_rx, downstream: None };
        let task = tokio::spawn(source::run(options, links, Faults::default()));
        let changes = Arc::new(AtomicU64::new(0));
        let counted = changes.clone();
        tokio::spawn(async move {
            while let Some(event) = input.recv().await {
                match event {
                    Event::Data(batch) => {
                        counted.fetch_add(batch.changes.len() as u64, Ordering::Relaxed);
                    }
                    Event::Checkpoint(cp) => {
                        if cp.position == Position::SNAPSHOT_DONE {
                            done_tx.send_replace(true);
                        }
                        if let Some(lsn) = cp.confirm_lsn {
                            confirm_tx.send_if_modified(|c| std::mem::replace(c, lsn.max(*c)) < lsn);
                        }
                    }
                    _ => {}
                }
            }
        });
        Ok(Counting { changes, snapshot_done, stop, task, _rewind: rewind })
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(30), self.task).await.context("the source did not stop")???;
        Ok(())
    }
}

pub fn own_peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub async fn measure(bench: &Bench) -> anyhow::Result<SourceFigures> {
    // 1. Snapshot.
    bench.drop_slot(SLOT).await?;
    let started = Instant::now();
    let mut counting = Counting::start(bench, "bench_src", SnapshotMode::Initial)?;
    let done = tokio::time::timeout(Duration::from_secs(1800), counting.snapshot_done.wait_for(|d| *d))
        .await
        .map(|r| r.is_ok());
    anyhow::ensure!(done == Ok(true), "the snapshot did not end in time");
    let rows = counting.changes.load(Ordering::Relaxed);
    let snapshot_rows_per_s = rows as f64 / started.elapsed().as_secs_f64();
    eprintln!("[bench] source snapshot: {rows} rows, {snapshot_rows_per_s:.0} rows/s into a discarding consumer");
    counting.stop().await?;
    bench.drop_slot(SLOT).await?;

    // 2. Streaming: a backlog of M changes in the slot, then read at once.
    bench.ensure_source("bench_cu", bench.args.catchup_users).await?;
    let counting = Counting::start(bench, "bench_cu", SnapshotMode::Never)?;
    let admin = crate::scenario::pg(&bench.url("postgres")).await?;
    wait_for("the slot", Duration::from_secs(60), Duration::from_millis(100), || async {
        Ok(admin
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn IS NOT NULL",
                &[&SLOT],
            )
            .await?
            .is_some())
    })
    .await?;
    counting.stop().await?;
    let changes = bench.args.changes;
    eprintln!("[bench] source streaming: writing {changes} changes while nothing reads the slot");
    let summary = loadgen::run(workload(&bench.url("bench_cu"), changes, 0, 5, false), Default::default()).await?;
    let started = Instant::now();
    let counting = Counting::start(bench, "bench_cu", SnapshotMode::Never)?;
    wait_for("the backlog decoded", Duration::from_secs(1800), Duration::from_millis(20), || async {
        Ok(counting.changes.load(Ordering::Relaxed) >= summary.changes)
    })
    .await?;
    let streaming_events_per_s = summary.changes as f64 / started.elapsed().as_secs_f64();
    eprintln!("[bench] source streaming: {streaming_events_per_s:.0} events/s into a discarding consumer");
    counting.stop().await?;
    bench.drop_slot(SLOT).await?;
    Ok(SourceFigures { snapshot_rows_per_s, streaming_events_per_s, peak_rss_mb: own_peak_rss_mb() })
}
