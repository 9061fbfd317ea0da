//! Sink writers: PostgreSQL, MySQL/MariaDB and Parquet, behind one contract.
//!
//! The writer actor ([`run`]) takes mapped items and checkpoints from its mailbox and groups
//! them into *units*: everything up to a checkpoint, several checkpoints when they queue up
//! (natural batching: one commit per burst, no waiting when idle). A unit becomes durable
//! together with its checkpoint's offsets, in one sink transaction, and only then is the
//! checkpoint acknowledged upstream. A source transaction is never split across commits;
//! one larger than `max_unit_rows` is written in pieces into the still-open transaction.

pub mod db;
pub mod encode;
pub mod mysql;
pub mod parquet;
pub mod pgbinary;
pub mod postgres;
pub mod reduce;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::Result;
use crate::fault::Faults;
use crate::mailbox::Mailbox;
use crate::mapper::plan::TargetTable;
use crate::mapper::{SinkEvent, SinkItem};
use crate::message::{Checkpoint, Position, StreamOffset};
use crate::supervisor::ActorThread;

/// A sink's contract with its writer actor.
///
/// - [`Sink::open`] is called once per incarnation, before anything else, and returns the
///   offsets the sink holds durably; the pipeline resumes after them.
/// - [`Sink::write`] adds items to the open unit, in order. Nothing written is visible or
///   durable before [`Sink::commit`].
/// - [`Sink::commit`] closes the unit: everything written since the last commit becomes
///   durable together with `offsets`, atomically (after a crash either both are there or
///   neither). It returns the checkpoints that are durable now, in order: the one given
///   for MySQL; possibly none (and later several, from a commit or a tick) for a sink
///   that makes units durable in batches, like Parquet files, or after its commit
///   returns, like PostgreSQL (asynchronous commit). Only returned checkpoints are
///   acknowledged.
/// - [`Sink::tick`] is called every [`TICK`] and at a graceful stop (`force`), for sinks
///   that make data durable on time or some time after their commit returns.
/// - [`Sink::completed`] resolves when work the sink does in the background (pipelined
///   lanes) made checkpoints durable; the writer waits on it beside its mailbox, so it
///   must be cancel safe. A forced tick waits for that work.
/// - Writes must be idempotent per key for database sinks (upserts, deletes by key), so a
///   unit replayed after a crash before its commit lands once.
/// - A row the sink rejects permanently goes to its dead-letter store inside the same unit.
pub trait Sink: Send {
    fn open(&mut self) -> impl Future<Output = Result<Vec<StreamOffset>>> + Send;
    /// Reads the durable offsets without changing anything: another incarnation of the
    /// sink may be writing meanwhile (Kafka partition assignments read them this way).
    fn offsets(&mut self) -> impl Future<Output = Result<Vec<StreamOffset>>> + Send;
    fn write(&mut self, items: Vec<SinkItem>) -> impl Future<Output = Result<()>> + Send;
    fn commit(
        &mut self,
        checkpoint: &Checkpoint,
        offsets: Vec<StreamOffset>,
    ) -> impl Future<Output = Result<Vec<Checkpoint>>> + Send;
    fn tick(&mut self, force: bool) -> impl Future<Output = Result<Vec<Checkpoint>>> + Send {
        let _ = force;
        async { Ok(Vec::new()) }
    }
    fn completed(&mut self) -> impl Future<Output = Result<Vec<Checkpoint>>> + Send {
        std::future::pending()
    }
    /// A new snapshot of these targets' sources starts. A sink that holds offsets for
    /// `stream` (it received data before) empties the targets and forgets the offsets, so
    /// rows deleted at the source since are not kept.
    fn snapshot_begin(&mut self, targets: &[Arc<TargetTable>], stream: &str)
    -> impl Future<Output = Result<()>> + Send;
}

/// How often a writer ticks its sink.
pub const TICK: Duration = Duration::from_millis(100);

/// How a writer groups its work.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub sink: String,
    /// The source stream name (the slot) that direct-mode checkpoints belong to.
    pub stream: String,
    /// Rows per unit before it is committed even if more is queued.
    pub max_unit_rows: usize,
    /// Direct mode: the source position this sink holds durably; anything at or before it
    /// is a replay and is skipped (Kafka mode: `None`, the consumer seeks instead). A new
    /// snapshot clears it: its rows sort before any streamed position.
    pub durable: Option<Position>,
}

/// Drops the rows of `items` at or before `floor` (already durable in this sink).
fn after_floor(items: Vec<SinkItem>, floor: Position) -> Result<Vec<SinkItem>> {
    let mut kept = Vec::with_capacity(items.len());
    for item in items {
        match item {
            SinkItem::Rows(rows) => {
                let keep: Vec<bool> = rows.meta.iter().map(|m| m.position > floor).collect();
                kept.extend(rows.filter(&keep)?.map(SinkItem::Rows));
            }
            SinkItem::Truncate { meta, .. } if meta.position <= floor => {}
            SinkItem::DeadLetter(d) if d.position <= floor => {}
            other => kept.push(other),
        }
    }
    Ok(kept)
}

/// Items with their row count, kept as they are added and taken.
#[derive(Default)]
struct Counted {
    items: Vec<SinkItem>,
    rows: usize,
}

impl Counted {
    fn extend(&mut self, items: Vec<SinkItem>) {
        self.rows += items.iter().map(SinkItem::rows).sum::<usize>();
        self.items.extend(items);
    }

    fn append(&mut self, other: &mut Counted) {
        self.rows += std::mem::take(&mut other.rows);
        self.items.append(&mut other.items);
    }

    fn take(&mut self) -> Vec<SinkItem> {
        self.rows = 0;
        std::mem::take(&mut self.items)
    }
}

/// The writer actor, on a sink already [`Sink::open`]ed. `on_commit` is called with each
/// checkpoint once it is durable. Once `stop` is set, it also makes what it holds durable
/// whenever it is idle (a graceful stop drains the pipeline before the actors are stopped).
pub async fn run<S: Sink>(
    mut sink: S,
    options: WriterOptions,
    mut input: Mailbox<SinkEvent>,
    on_commit: impl Fn(Checkpoint) + Send,
    mut stop: watch::Receiver<bool>,
    faults: Faults,
) -> Result<()> {
    let name = options.sink.as_str();
    let mut floor = options.durable;
    // Items up to `ready` (the newest checkpoint received), then items after it.
    let mut unit = Counted::default();
    let mut tail = Counted::default();
    let mut ready: Option<Checkpoint> = None;
    let mut draining = *stop.borrow();
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = if ready.is_some() {
            match input.try_recv() {
                Some(e) => e,
                None => {
                    flush(&mut sink, &options, &mut unit, &mut ready, &on_commit, &faults).await?;
                    if draining {
                        // Stopping and idle: what a sink holds back (Parquet files, commits
                        // the database has not flushed yet) is made durable now.
                        sink.tick(true).await?.into_iter().for_each(&on_commit);
                    }
                    continue;
                }
            }
        } else {
            tokio::select! {
                event = input.recv() => match event {
                    Some(e) => e,
                    None => return Ok(()),
                },
                _ = ticks.tick() => {
                    sink.tick(draining).await?.into_iter().for_each(&on_commit);
                    continue;
                }
                done = sink.completed() => {
                    done?.into_iter().for_each(&on_commit);
                    continue;
                }
                Ok(()) = stop.changed() => {
                    // Stopping: the source emits no more; make everything held durable
                    // as soon as it is applied, and keep serving until stopped.
                    draining = *stop.borrow();
                    if draining {
                        sink.tick(true).await?.into_iter().for_each(&on_commit);
                    }
                    continue;
                }
            }
        };
        faults.hit_async("writer", Some(name)).await?;
        match event {
            SinkEvent::Items(items) => {
                match floor {
                    Some(floor) => tail.extend(after_floor(items, floor)?),
                    None => tail.extend(items),
                }
                if unit.rows + tail.rows >= options.max_unit_rows {
                    if ready.is_some() {
                        flush(&mut sink, &options, &mut unit, &mut ready, &on_commit, &faults).await?;
                    }
                    if tail.rows >= options.max_unit_rows {
                        // A transaction larger than a unit: write it into the open transaction.
                        sink.write(tail.take()).await?;
                    }
                }
            }
            SinkEvent::Checkpoint(cp) if cp.offsets.is_none() && floor.is_some_and(|d| cp.position <= d) => {
                // A replayed checkpoint: what it closes is durable already.
                on_commit(cp);
            }
            SinkEvent::Checkpoint(cp) => {
                unit.append(&mut tail);
                ready = Some(match ready.take() {
                    Some(older) => Checkpoint::merge(older, cp),
                    None => cp,
                });
                if unit.rows >= options.max_unit_rows {
                    flush(&mut sink, &options, &mut unit, &mut ready, &on_commit, &faults).await?;
                }
            }
            SinkEvent::SnapshotBegin(targets) => {
                if ready.is_some() {
                    flush(&mut sink, &options, &mut unit, &mut ready, &on_commit, &faults).await?;
                }
                sink.snapshot_begin(&targets, &options.stream).await?;
                floor = None;
            }
        }
    }
}

async fn flush<S: Sink>(
    sink: &mut S,
    options: &WriterOptions,
    unit: &mut Counted,
    ready: &mut Option<Checkpoint>,
    on_commit: &(impl Fn(Checkpoint) + Send),
    faults: &Faults,
) -> Result<()> {
    let Some(cp) = ready.take() else { return Ok(()) };
    if !unit.items.is_empty() {
        sink.write(unit.take()).await?;
    }
    // Fault injection point: written but not committed.
    faults.hit_async("commit", Some(&options.sink)).await?;
    let offsets = cp.stream_offsets(&options.stream);
    sink.commit(&cp, offsets).await?.into_iter().for_each(on_commit);
    Ok(())
}

/// How to build a sink of any kind, once per writer incarnation.
#[derive(Debug, Clone)]
pub enum SinkSpec {
    /// `lanes` connections apply disjoint keys of `stream` at once (see [`db`]).
    Postgres {
        config: Box<tokio_postgres::Config>,
        lanes: usize,
        stream: String,
    },
    /// `lanes` as above.
    Mysql {
        url: String,
        lanes: usize,
        stream: String,
    },
    Parquet(parquet::ParquetOptions),
}

/// What the connections of a sink of `lanes` lanes are called in messages: the sink's
/// name, then "<name> (lane 1)" and so on.
fn lane_names(name: &str, lanes: usize) -> impl Iterator<Item = String> + '_ {
    (0..lanes.max(1)).map(move |l| if l == 0 { name.to_string() } else { format!("{name} (lane {l})") })
}

/// A sink of any kind (static dispatch over the three).
pub enum AnySink {
    Postgres(Box<db::DbSink<postgres::PgDatabase>>),
    Mysql(Box<db::DbSink<mysql::MySqlDatabase>>),
    Parquet(Box<parquet::ParquetSink>),
}

impl SinkSpec {
    /// A fresh, unconnected sink named `name`.
    pub fn build(&self, name: &str) -> Result<AnySink> {
        Ok(match self {
            SinkSpec::Postgres { config, lanes, stream } => {
                let dbs = lane_names(name, *lanes).map(|n| postgres::PgDatabase::new(config.as_ref().clone(), n));
                AnySink::Postgres(Box::new(db::DbSink::with_lanes(name, stream.clone(), dbs.collect())))
            }
            SinkSpec::Mysql { url, lanes, stream } => {
                let dbs = lane_names(name, *lanes).map(|n| mysql::MySqlDatabase::new(url, n));
                AnySink::Mysql(Box::new(db::DbSink::with_lanes(name, stream.clone(), dbs.collect::<Result<_>>()?)))
            }
            SinkSpec::Parquet(options) => AnySink::Parquet(Box::new(parquet::ParquetSink::new(name, options.clone()))),
        })
    }

    /// A sink named `name`, opened on `thread` for its writer (its connections are driven
    /// there, see [`ActorThread`]): the sink and the offsets it holds.
    pub async fn open_on(&self, name: &str, thread: &ActorThread) -> Result<(AnySink, Vec<StreamOffset>)> {
        let mut sink = self.build(name)?;
        let (sink, offsets) = thread
            .run(async move {
                let offsets = sink.open().await;
                (sink, offsets)
            })
            .await?;
        Ok((sink, offsets?))
    }
}

macro_rules! each_sink {
    ($self:expr, $s:ident => $body:expr) => {
        match $self {
            AnySink::Postgres($s) => $body,
            AnySink::Mysql($s) => $body,
            AnySink::Parquet($s) => $body,
        }
    };
}

impl Sink for AnySink {
    async fn open(&mut self) -> Result<Vec<StreamOffset>> {
        each_sink!(self, s => s.open().await)
    }

    async fn offsets(&mut self) -> Result<Vec<StreamOffset>> {
        each_sink!(self, s => s.offsets().await)
    }

    async fn write(&mut self, items: Vec<SinkItem>) -> Result<()> {
        each_sink!(self, s => s.write(items).await)
    }

    async fn commit(&mut self, checkpoint: &Checkpoint, offsets: Vec<StreamOffset>) -> Result<Vec<Checkpoint>> {
        each_sink!(self, s => s.commit(checkpoint, offsets).await)
    }

    async fn tick(&mut self, force: bool) -> Result<Vec<Checkpoint>> {
        each_sink!(self, s => s.tick(force).await)
    }

    async fn completed(&mut self) -> Result<Vec<Checkpoint>> {
        each_sink!(self, s => s.completed().await)
    }

    async fn snapshot_begin(&mut self, targets: &[Arc<TargetTable>], stream: &str) -> Result<()> {
        each_sink!(self, s => s.snapshot_begin(targets, stream).await)
    }
}
