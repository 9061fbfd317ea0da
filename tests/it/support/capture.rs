//! The source actor alone, feeding a capture that acknowledges every checkpoint.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_actors::fault::Faults;
use sluice_actors::mailbox::mailbox;
use sluice_actors::message::{Change, Event, Position};
use sluice_actors::schema::TableId;
use sluice_actors::source::snapshot::SnapshotOptions;
use sluice_actors::source::wal::WalOptions;
use sluice_actors::source::{self, PgSourceOptions, SnapshotMode, SourceLinks};
use tokio::sync::watch;

use super::wait_until;

pub fn options(url: &str, slot: &str, tables: &[&str], snapshot: SnapshotMode) -> PgSourceOptions {
    PgSourceOptions {
        pg: url.parse().expect("source url"),
        tables: tables.iter().map(|t| TableId::parse(t).expect("table")).collect(),
        slot: slot.into(),
        publication: slot.into(),
        snapshot,
        snapshot_options: SnapshotOptions { batch_rows: 100, parallelism: 2, chunk_rows: 1000 },
        wal_options: WalOptions { batch_rows: 100, heartbeat: Duration::from_millis(500) },
    }
}

/// A running source whose events are collected; checkpoints are acknowledged at once
/// (unless `auto_ack` is off).
pub struct Capture {
    pub events: Arc<Mutex<Vec<Event>>>,
    pub confirm: Arc<watch::Sender<u64>>,
    pub stop: watch::Sender<bool>,
    /// The source's rewind channel (held so that it stays open).
    rewind: watch::Sender<u64>,
    pub task: tokio::task::JoinHandle<sluice_actors::error::Result<()>>,
    collector: tokio::task::JoinHandle<()>,
}

impl Capture {
    pub fn start(options: PgSourceOptions, downstream: Option<Position>, faults: Faults, auto_ack: bool) -> Capture {
        let (out, mut input) = mailbox::<Event>("capture", "capture", 10_000);
        let (confirm_tx, confirm_rx) = watch::channel(0u64);
        let (rewind_tx, rewind_rx) = watch::channel(0u64);
        let (stop_tx, stop_rx) = watch::channel(false);
        let links = SourceLinks { out, confirm: confirm_rx, rewind: rewind_rx, stop: stop_rx, downstream };
        let task = tokio::spawn(source::run(options, links, faults));
        let events = Arc::new(Mutex::new(Vec::new()));
        let confirm = Arc::new(confirm_tx);
        let collector = {
            let (events, confirm) = (events.clone(), confirm.clone());
            tokio::spawn(async move {
                while let Some(e) = input.recv().await {
                    if auto_ack
                        && let Event::Checkpoint(cp) = &e
                        && let Some(lsn) = cp.confirm_lsn
                    {
                        confirm.send_if_modified(|c| {
                            if lsn > *c {
                                *c = lsn;
                                true
                            } else {
                                false
                            }
                        });
                    }
                    events.lock().expect("events").push(e);
                }
            })
        };
        Capture { events, confirm, stop: stop_tx, rewind: rewind_tx, task, collector }
    }

    /// Asks the source to rewind to its confirmed position, as a restarted sink does.
    pub fn rewind(&self) {
        self.rewind.send_modify(|n| *n += 1);
    }

    /// How many times the source announced a rewind.
    pub fn rewounds(&self) -> usize {
        self.events.lock().expect("events").iter().filter(|e| matches!(e, Event::Rewound)).count()
    }

    /// Every change received so far, in order.
    pub fn changes(&self) -> Vec<Change> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match e {
                Event::Data(b) => Some(b.changes.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    pub fn checkpoints(&self) -> Vec<sluice_actors::message::Checkpoint> {
        self.events
            .lock()
            .expect("events")
            .iter()
            .filter_map(|e| match e {
                Event::Checkpoint(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    /// Waits until the snapshot's end is acknowledged.
    pub async fn snapshot_done(&self, timeout: Duration) {
        wait_until("snapshot done", timeout, || async {
            self.checkpoints().iter().any(|c| c.position == Position::SNAPSHOT_DONE)
        })
        .await;
    }

    pub async fn wait_changes(&self, n: usize, timeout: Duration) -> Vec<Change> {
        wait_until(&format!("{n} changes"), timeout, || async { self.changes().len() >= n }).await;
        self.changes()
    }

    /// Graceful stop: waits for the source to drain and return.
    pub async fn stop(self) -> sluice_actors::error::Result<()> {
        self.stop.send_replace(true);
        let r =
            tokio::time::timeout(Duration::from_secs(20), self.task).await.expect("source stops").expect("source task");
        self.collector.abort();
        r
    }

    /// Stops without draining (like a crash).
    pub fn abort(self) {
        self.task.abort();
        self.collector.abort();
    }
}
