//! What the PostgreSQL and MySQL sinks share: the unit protocol on top of a [`Database`].
//!
//! A unit is reduced ([`reduce`]) to one final state per key, then applied set-based per
//! target table: deletes, upserts, partial updates. Offsets are written last, in the same
//! transaction, so a unit and its position commit together.
//!
//! Rejected rows: a unit is first applied *unguarded*, without savepoints (each is a round
//! trip, and a unit has several parts). When the database rejects a part for its data
//! (constraint, value out of range), the transaction is rolled back and the unit applied
//! again *guarded*: each part under a savepoint, and a rejected part split in halves until
//! the rows at fault are isolated; those go to the dead-letter table in the same
//! transaction while the rest is applied. The writer still holds the unit, so the retry
//! loses nothing. Only the first write of a transaction can be retried that way; later
//! pieces of a transaction larger than a unit (written into the open transaction) are
//! applied guarded from the start.
//!
//! A commit may be durable later than it returns: PostgreSQL sinks commit asynchronously
//! (`synchronous_commit = off`, as PostgreSQL's own subscriptions do), which saves a WAL
//! flush per unit. Such a unit's checkpoint is held in `pending` until the database has
//! flushed its WAL past the commit, and only then returned to the writer to be
//! acknowledged upstream: a database crash can lose such commits, never the source's copy of
//! them (the slot still holds them, and the offsets roll back with the data). WAL is
//! flushed in order, so checkpoints are released in order.
//!
//! Lanes (`sink.lanes`, database sinks, direct transport): the sink applies over several
//! connections at once, each a *lane* owning the keys whose text hashes to it (a stable
//! hash, [`lanes_of`]: a key keeps its lane across restarts and versions). Each lane
//! commits its share of a unit with its own offsets row (partition `lane << 16`), so a
//! crash between lanes' commits leaves them at different positions: on open the sink
//! resumes from the lowest, and each lane skips the replayed rows it applied already
//! ([`merge_lanes`], `floors`). What lanes give up is the source transaction's atomicity
//! across keys in the target (another session may see one lane's share of a transaction
//! before the other's), and targets must not have foreign keys or unique constraints
//! other than the key between rows of different lanes. A unit holding a truncate is
//! *serial*: the other lanes commit what they hold first (without offsets: replaying it
//! is idempotent), then lane 0 applies the rest and commits every lane's offsets. DDL
//! waits for the lanes' transactions the same way. Offsets written by another number of
//! lanes make the first unit serial: every lane resumes from the lowest position and lane
//! 0 rewrites them all.
//!
//! Lanes are pipelined: each runs on a task of its own ([`Lane::serve`]) with a queue of
//! [`LANE_QUEUE`] jobs (writes and commits, in order), so a lane goes on with the next
//! unit while another still commits this one, and the writer splits the next unit
//! meanwhile. A unit's checkpoint is released once every lane committed its share (and the
//! WAL is flushed past those commits); lanes report through a channel the writer waits
//! on beside its mailbox ([`Sink::completed`]). Whatever needs every lane at once (a serial
//! unit, DDL, a new snapshot, a forced flush) first waits for the queues to drain and takes
//! the lanes back ([`DbSink::sync`]).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::error::{Context, Disposition, Error, Result};
use crate::mapper::plan::TargetTable;
use crate::mapper::{DeadLetter, MappedRows, SinkItem};
use crate::message::{Checkpoint, Position, StreamOffset};
use crate::metrics as m;
use crate::schema::TableId;
use crate::sink::Sink;
use crate::sink::reduce::{Part, Reduced, Step, reduce};

/// How a part of a reduced unit changes its target.
#[derive(Debug, Clone, Copy)]
pub enum PartOp<'a> {
    Upsert,
    /// Update existing rows, leaving the columns flagged `true` as they are.
    Update(&'a [bool]),
    Delete,
}

impl PartOp<'_> {
    fn label(&self) -> &'static str {
        match self {
            PartOp::Upsert => "upsert",
            PartOp::Update(_) => "update",
            PartOp::Delete => "delete",
        }
    }
}

/// How long a commit may wait for the database's own WAL flush before the writer's tick
/// forces one (PostgreSQL's WAL writer flushes every `wal_writer_delay`, 200 ms).
const FLUSH_AFTER: Duration = Duration::from_millis(100);

/// When a committed transaction is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// On return, and so is everything committed before.
    Now,
    /// Once the database's WAL is flushed up to `lsn`; it is flushed up to `flushed` now.
    At { lsn: u64, flushed: u64 },
}

/// One database dialect's operations, all inside the open transaction unless noted.
pub trait Database: Send {
    /// Opens a fresh connection and creates sluice's own tables if missing.
    fn connect(&mut self) -> impl Future<Output = Result<()>> + Send;
    fn read_offsets(&mut self, sink: &str) -> impl Future<Output = Result<Vec<StreamOffset>>> + Send;
    /// Opens a transaction that writes into `targets` (and maybe others, without COPY).
    fn begin(&mut self, targets: &[Arc<TargetTable>]) -> impl Future<Output = Result<()>> + Send;
    /// Creates the target table, or adds the columns it lacks; checks its key and types.
    /// Runs outside a transaction (MySQL commits implicitly around DDL).
    fn ensure_table(&mut self, target: &Arc<TargetTable>) -> impl Future<Output = Result<()>> + Send;
    /// Applies a part under the caller's savepoint (the dialect may use savepoints of its
    /// own inside to recover from an error it expects).
    fn apply(&mut self, target: &TargetTable, op: PartOp<'_>, part: &Part) -> impl Future<Output = Result<()>> + Send;
    /// Applies a target's parts of a unit, in order, without a savepoint: an error fails
    /// them all, and the caller rolls the transaction back. One after another by default;
    /// a dialect may send them together.
    fn apply_parts(
        &mut self,
        target: &TargetTable,
        parts: &[(PartOp<'_>, &Part)],
    ) -> impl Future<Output = Result<()>> + Send {
        async move {
            for (op, part) in parts {
                self.apply(target, *op, part).await?;
            }
            Ok(())
        }
    }
    fn truncate(&mut self, target: &TargetTable) -> impl Future<Output = Result<()>> + Send;
    fn savepoint(&mut self) -> impl Future<Output = Result<()>> + Send;
    fn release_savepoint(&mut self) -> impl Future<Output = Result<()>> + Send;
    fn rollback_to_savepoint(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Rolls the open transaction back.
    fn rollback(&mut self) -> impl Future<Output = Result<()>> + Send;
    fn dead_letters(&mut self, sink: &str, letters: &[DeadLetter]) -> impl Future<Output = Result<()>> + Send;
    fn clear_offsets(&mut self, sink: &str, stream: &str) -> impl Future<Output = Result<()>> + Send;
    /// Stores the offsets and commits the transaction.
    fn commit(&mut self, sink: &str, offsets: &[StreamOffset]) -> impl Future<Output = Result<Durable>> + Send;
    /// Flushes the WAL written so far (for commits that returned [`Durable::At`]) if it
    /// can, outside a transaction, and returns the position flushed.
    fn flush(&mut self, sink: &str) -> impl Future<Output = Result<u64>> + Send;
}

/// Lane `l`'s offsets rows store `partition | l << LANE_SHIFT` as their partition (lane 0
/// stores the partition itself, as a sink without lanes does).
const LANE_SHIFT: u32 = 16;

/// An offset as lane `lane` stores it.
fn on_lane(offset: &StreamOffset, lane: usize) -> StreamOffset {
    StreamOffset { partition: offset.partition | ((lane as i32) << LANE_SHIFT), ..offset.clone() }
}

/// What the stored offsets rows of a sink with `lanes` lanes mean: per stream and
/// partition the lowest position of its lanes (where the sink resumes), the position each
/// lane applied up to in `stream` if they stopped apart (empty if not), and whether the
/// rows were written by another number of lanes (then every lane resumes from the lowest
/// and the next commit rewrites them).
fn merge_lanes(rows: Vec<StreamOffset>, lanes: usize, stream: &str) -> (Vec<StreamOffset>, Vec<Position>, bool) {
    // Per (stream, partition): (lane, row).
    let mut groups: BTreeMap<(String, i32), Vec<(usize, StreamOffset)>> = BTreeMap::new();
    for row in rows {
        let lane = (row.partition >> LANE_SHIFT) as usize;
        let row = StreamOffset { partition: row.partition & ((1 << LANE_SHIFT) - 1), ..row };
        groups.entry((row.stream.clone(), row.partition)).or_default().push((lane, row));
    }
    let mut floors = Vec::new();
    let mut reshape = false;
    let mut merged = Vec::with_capacity(groups.len());
    for ((name, _), mut group) in groups {
        group.sort_by_key(|(lane, _)| *lane);
        if name == stream {
            let complete = group.len() == lanes && group.iter().enumerate().all(|(i, (lane, _))| i == *lane);
            reshape |= !complete;
            let positions: Vec<Position> = group.iter().map(|(_, o)| o.position).collect();
            if complete && positions.iter().any(|p| *p != positions[0]) {
                floors = positions;
            }
        }
        merged.extend(group.into_iter().map(|(_, o)| o).min_by_key(|o| o.position));
    }
    (merged, floors, reshape)
}

/// Each row's lane: a hash of its key's text (FNV-1a, then MurmurHash3's finalizer) modulo
/// `lanes`. It must not change across restarts and versions: lanes' stored positions
/// depend on it (pinned by a test).
fn lanes_of(rows: &MappedRows, lanes: usize) -> Result<Vec<usize>> {
    let options = arrow::util::display::FormatOptions::default();
    let formatters = rows
        .target
        .key
        .iter()
        .map(|k| arrow::util::display::ArrayFormatter::try_new(rows.columns.column(*k).as_ref(), &options))
        .collect::<std::result::Result<Vec<_>, _>>()
        .context("hash keys into lanes")?;
    let mut text = String::new();
    (0..rows.columns.num_rows())
        .map(|i| {
            let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
            for f in &formatters {
                text.clear();
                f.value(i).write(&mut text).context("hash keys into lanes")?;
                for b in text.bytes().chain([0xff]) {
                    hash = (hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
                }
            }
            // FNV's low bits follow the bytes' low bits alone: mix before the modulo.
            hash = (hash ^ (hash >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
            hash = (hash ^ (hash >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
            Ok(((hash ^ (hash >> 33)) % lanes as u64) as usize)
        })
        .collect()
}

/// One connection of a database sink, with its transaction.
struct Lane<D> {
    db: D,
    in_txn: bool,
}

impl<D: Database> Lane<D> {
    async fn begin(&mut self, targets: &[Arc<TargetTable>]) -> Result<()> {
        if !self.in_txn {
            self.db.begin(targets).await?;
            self.in_txn = true;
        }
        Ok(())
    }

    /// Stores `offsets` (as this lane stores them) and commits.
    async fn commit(&mut self, sink: &str, offsets: &[StreamOffset]) -> Result<Durable> {
        self.begin(&[]).await?;
        let durable = self.db.commit(sink, offsets).await?;
        self.in_txn = false;
        Ok(durable)
    }

    /// Runs this lane's jobs in order until its queue closes or a job fails (the failure is
    /// reported, the rest of the queue dropped), then hands the lane back.
    async fn serve(
        mut self,
        lane: usize,
        sink: String,
        mut jobs: mpsc::Receiver<Job>,
        done: mpsc::UnboundedSender<Report>,
    ) -> Self {
        while let Some(job) = jobs.recv().await {
            let result = match job {
                Job::Write { targets, items } => {
                    self.write(&sink, &targets, &items).await.map(|steps| Done::Wrote(count_applied(&sink, &steps)))
                }
                Job::Commit(offsets) => self.commit(&sink, &offsets).await.map(Done::Committed),
                // Not while a transaction larger than a unit is being written into.
                Job::Flush if self.in_txn => Ok(Done::Flushed(None)),
                Job::Flush => self.db.flush(&sink).await.map(|f| Done::Flushed(Some(f))),
            };
            let failed = result.is_err();
            if done.send((lane, result)).is_err() || failed {
                break;
            }
        }
        self
    }

    /// Commits the open transaction without offsets, if there is one.
    async fn barrier(&mut self, sink: &str) -> Result<()> {
        if self.in_txn {
            self.db.commit(sink, &[]).await?;
            self.in_txn = false;
        }
        Ok(())
    }

    /// Applies a part under a savepoint, isolating rejected rows by bisection.
    async fn apply_part(
        &mut self,
        sink: &str,
        target: &TargetTable,
        op: PartOp<'_>,
        part: &Part,
        dead: &mut Vec<DeadLetter>,
    ) -> Result<()> {
        let mut stack = vec![part.clone()];
        while let Some(p) = stack.pop() {
            self.db.savepoint().await?;
            match self.db.apply(target, op, &p).await {
                Ok(()) => self.db.release_savepoint().await?,
                Err(error) if error.disposition() == Disposition::DeadLetter => {
                    self.db.rollback_to_savepoint().await?;
                    if p.len() == 1 {
                        let meta = p.meta[0];
                        tracing::warn!(sink = %sink, table = %target.name, error = %error.chain(), "row rejected: dead-lettered");
                        dead.push(DeadLetter {
                            source: target.source.clone(),
                            target: Some(target.name.clone()),
                            op: meta.op,
                            position: meta.position,
                            error: error.chain(),
                            change: super::encode::row_json(&p.rows, 0),
                        });
                    } else {
                        let mid = p.len() / 2;
                        stack.push(p.slice(mid, p.len() - mid));
                        stack.push(p.slice(0, mid));
                    }
                }
                Err(error) => return Err(error),
            }
        }
        Ok(())
    }

    /// Applies reduced steps into the open transaction and returns the dead letters.
    async fn apply_steps(&mut self, sink: &str, steps: &[Step], guarded: bool) -> Result<Vec<DeadLetter>> {
        let mut dead = Vec::new();
        for step in steps {
            match step {
                Step::Truncate(target, _) => self.db.truncate(target).await?,
                Step::DeadLetter(d) => dead.push(d.clone()),
                Step::Apply(r) if guarded => {
                    for (op, part) in parts(r) {
                        self.apply_part(sink, &r.target, op, part, &mut dead).await?;
                    }
                }
                Step::Apply(r) => self.db.apply_parts(&r.target, &parts(r).collect::<Vec<_>>()).await?,
            }
        }
        Ok(dead)
    }

    /// Applies `items` into this lane's transaction (opening it on `targets`) and stores
    /// the rows it rejects as dead letters; returns the steps applied.
    async fn write(&mut self, sink: &str, targets: &[Arc<TargetTable>], items: &[SinkItem]) -> Result<Vec<Step>> {
        let steps = reduce(items)?;
        if steps.is_empty() {
            return Ok(steps);
        }
        let dead = if self.in_txn {
            self.apply_steps(sink, &steps, true).await?
        } else {
            // The first write of a transaction: unguarded, retried guarded if rejected.
            self.begin(targets).await?;
            match self.apply_steps(sink, &steps, false).await {
                Ok(dead) => dead,
                Err(error) if error.disposition() == Disposition::DeadLetter => {
                    tracing::info!(sink = %sink, error = %error.chain(), "a part was rejected: applying the unit again part by part");
                    self.db.rollback().await?;
                    self.in_txn = false;
                    self.begin(targets).await?;
                    self.apply_steps(sink, &steps, true).await?
                }
                Err(error) => return Err(error),
            }
        };
        if !dead.is_empty() {
            metrics::counter!(m::DEAD_LETTERS_TOTAL, "sink" => sink.to_string()).increment(dead.len() as u64);
            self.db.dead_letters(sink, &dead).await?;
        }
        Ok(steps)
    }
}

/// Jobs a pipelined lane's queue holds: about two units.
const LANE_QUEUE: usize = 4;

/// A pipelined lane's work, done in the order given.
enum Job {
    Write {
        targets: Arc<Vec<Arc<TargetTable>>>,
        items: Vec<SinkItem>,
    },
    /// Stores these offsets (as the lane stores them) and commits.
    Commit(Vec<StreamOffset>),
    /// Flushes the WAL, unless a transaction is open.
    Flush,
}

/// What a lane did with a job.
enum Done {
    /// The newest commit time of the rows applied.
    Wrote(i64),
    Committed(Durable),
    Flushed(Option<u64>),
}

/// A lane's report of a job: the lane, and what it did or why it failed.
type Report = (usize, Result<Done>);

/// Lanes running on tasks of their own (see the module documentation).
struct Pipeline<D> {
    jobs: Vec<mpsc::Sender<Job>>,
    tasks: Vec<tokio::task::JoinHandle<Lane<D>>>,
    reports: mpsc::UnboundedReceiver<Report>,
    /// Units given to the lanes to commit, oldest first.
    units: VecDeque<InFlight>,
    /// Per lane, how many of `units` it committed (they are the first ones).
    committed: Vec<usize>,
    /// A flush is queued on lane 0.
    flushing: bool,
}

/// A unit given to the pipelined lanes to commit.
struct InFlight {
    checkpoint: Checkpoint,
    /// Lanes that have not committed it yet.
    waiting: usize,
    /// The newest commit LSN of the lanes that have.
    lsn: u64,
}

impl<D> Drop for Pipeline<D> {
    /// A sink dropped with work queued (its writer failed or stopped) stops its lanes: the
    /// connections close and their open transactions roll back; what they held is
    /// replayed from the offsets.
    fn drop(&mut self) {
        self.tasks.iter().for_each(tokio::task::JoinHandle::abort);
    }
}

/// A database sink: the [`Sink`] contract over one or more connections ([`Lane`]s) to a
/// [`Database`] (see the module documentation for lanes).
pub struct DbSink<D> {
    name: String,
    /// The source stream (slot) whose changes lanes split (direct mode).
    stream: String,
    /// The lanes, when not pipelined.
    lanes: Vec<Lane<D>>,
    lane_count: usize,
    pipeline: Option<Pipeline<D>>,
    /// The newest WAL position the database reported flushed.
    flushed: u64,
    ensured: HashMap<TableId, Arc<TargetTable>>,
    newest_commit_micros: i64,
    /// Committed units not durable yet, with the WAL position they are durable at, and
    /// when they committed.
    pending: VecDeque<(u64, Checkpoint, Instant)>,
    /// The open unit goes through lane 0 alone, which commits every lane's offsets.
    serial: bool,
    /// Per lane, the newest position it applied, while lanes are apart after a crash
    /// between their commits: a replayed row is skipped by the lane that applied it.
    floors: Vec<Position>,
    /// The stored offsets were written by another number of lanes: the next unit is
    /// serial and rewrites them.
    reshape: bool,
}

impl<D: Database + 'static> DbSink<D> {
    /// A sink over one connection.
    pub fn new(name: impl Into<String>, db: D) -> Self {
        Self::with_lanes(name, String::new(), vec![db])
    }

    /// A sink applying `stream`'s changes over one connection per database in `dbs`.
    pub fn with_lanes(name: impl Into<String>, stream: impl Into<String>, dbs: Vec<D>) -> Self {
        Self {
            name: name.into(),
            stream: stream.into(),
            lane_count: dbs.len(),
            lanes: dbs.into_iter().map(|db| Lane { db, in_txn: false }).collect(),
            pipeline: None,
            flushed: 0,
            ensured: HashMap::new(),
            newest_commit_micros: 0,
            pending: VecDeque::new(),
            serial: false,
            floors: Vec::new(),
            reshape: false,
        }
    }

    /// The pending checkpoints durable once the WAL is flushed up to `flushed`, in order.
    fn release(&mut self, flushed: u64) -> Vec<Checkpoint> {
        let durable = self.pending.iter().take_while(|(lsn, ..)| *lsn <= flushed).count();
        self.pending.drain(..durable).map(|(_, cp, _)| cp).collect()
    }

    /// Commits the open transactions of lanes `from..` without offsets. Lanes apply
    /// disjoint keys, so only a statement that concerns them all (a truncate, DDL) has to
    /// wait for the others' transactions: committed early, their rows are replayed
    /// idempotently after a crash.
    async fn barrier(&mut self, from: usize) -> Result<()> {
        for lane in self.lanes.iter_mut().skip(from) {
            lane.barrier(&self.name).await?;
        }
        Ok(())
    }

    async fn ensure(&mut self, target: &Arc<TargetTable>) -> Result<()> {
        if self.ensured.get(&target.name).is_some_and(|t| Arc::ptr_eq(t, target) || t.as_ref() == target.as_ref()) {
            return Ok(());
        }
        if self.lane_count > 1 {
            // Lane 0 may change the table; every lane must see it.
            self.sync().await?;
            self.barrier(0).await?;
        }
        for lane in &mut self.lanes {
            lane.db.ensure_table(target).await?;
        }
        self.ensured.insert(target.name.clone(), target.clone());
        Ok(())
    }

    /// Drops the rows a lane applied already (lanes apart after a crash).
    fn after_floors(&self, items: Vec<SinkItem>) -> Result<Vec<SinkItem>> {
        let Some(newest) = self.floors.iter().max() else { return Ok(items) };
        let mut kept = Vec::with_capacity(items.len());
        for item in items {
            match item {
                SinkItem::Rows(rows) if rows.meta.iter().any(|m| m.position <= *newest) => {
                    let lanes = lanes_of(&rows, self.lane_count)?;
                    let keep: Vec<bool> =
                        rows.meta.iter().zip(&lanes).map(|(m, lane)| m.position > self.floors[*lane]).collect();
                    kept.extend(rows.filter(&keep)?.map(SinkItem::Rows));
                }
                other => kept.push(other),
            }
        }
        Ok(kept)
    }

    /// Each lane's share of `items`, by key; other items go to lane 0.
    fn split(&self, items: Vec<SinkItem>) -> Result<Vec<Vec<SinkItem>>> {
        let mut shares: Vec<Vec<SinkItem>> = (0..self.lane_count).map(|_| Vec::new()).collect();
        for item in items {
            match item {
                SinkItem::Rows(rows) => {
                    let lanes = lanes_of(&rows, self.lane_count)?;
                    for (l, share) in shares.iter_mut().enumerate() {
                        let keep: Vec<bool> = lanes.iter().map(|x| *x == l).collect();
                        share.extend(rows.select(&keep)?.map(SinkItem::Rows));
                    }
                }
                other => shares[0].push(other),
            }
        }
        Ok(shares)
    }

    /// Lanes on tasks of their own, started if they are not yet.
    fn pipeline(&mut self) -> &mut Pipeline<D> {
        if self.pipeline.is_none() {
            let (report, reports) = mpsc::unbounded_channel();
            let (mut jobs, mut tasks) = (Vec::new(), Vec::new());
            for (l, lane) in std::mem::take(&mut self.lanes).into_iter().enumerate() {
                let (tx, rx) = mpsc::channel(LANE_QUEUE);
                jobs.push(tx);
                tasks.push(tokio::spawn(lane.serve(l, self.name.clone(), rx, report.clone())));
            }
            let committed = vec![0; jobs.len()];
            self.pipeline = Some(Pipeline { jobs, tasks, reports, units: VecDeque::new(), committed, flushing: false });
        }
        self.pipeline.as_mut().expect("lanes pipelined")
    }

    /// Queues `job` on lane `lane`; a lane that stopped on an error returns its error.
    async fn send(&mut self, lane: usize, job: Job) -> Result<()> {
        if self.pipeline().jobs[lane].send(job).await.is_err() {
            self.sync().await?;
            return Err(Error::Restart(format!("sink {}: lane {lane} stopped", self.name)));
        }
        Ok(())
    }

    /// Takes in a lane's report: units every lane committed move to `pending`, in order.
    fn absorb(&mut self, (lane, done): Report) -> Result<()> {
        let Some(p) = self.pipeline.as_mut() else { return Ok(()) };
        match done? {
            Done::Wrote(newest) => self.newest_commit_micros = self.newest_commit_micros.max(newest),
            Done::Flushed(flushed) => {
                p.flushing = false;
                self.flushed = self.flushed.max(flushed.unwrap_or(0));
            }
            Done::Committed(durable) => {
                let Some(unit) = p.units.get_mut(p.committed[lane]) else {
                    return Err(Error::Fatal(format!(
                        "sink {}: lane {lane} committed a unit it was not given",
                        self.name
                    )));
                };
                unit.waiting -= 1;
                if let Durable::At { lsn, flushed } = durable {
                    unit.lsn = unit.lsn.max(lsn);
                    self.flushed = self.flushed.max(flushed);
                }
                p.committed[lane] += 1;
                while p.units.front().is_some_and(|u| u.waiting == 0) {
                    let unit = p.units.pop_front().expect("a unit");
                    p.committed.iter_mut().for_each(|c| *c -= 1);
                    self.pending.push_back((unit.lsn, unit.checkpoint, Instant::now()));
                }
            }
        }
        Ok(())
    }

    /// Takes in the reports the lanes have made so far, without waiting.
    fn poll(&mut self) -> Result<()> {
        while let Some(report) = self.pipeline.as_mut().and_then(|p| p.reports.try_recv().ok()) {
            self.absorb(report)?;
        }
        Ok(())
    }

    /// Waits until the pipelined lanes did every job queued and takes them back (a no-op
    /// when they are not pipelined); returns the first error a lane met.
    async fn sync(&mut self) -> Result<()> {
        let Some(p) = self.pipeline.as_mut() else { return Ok(()) };
        // Closing the queues ends each task once it did the jobs queued.
        p.jobs.clear();
        let tasks = std::mem::take(&mut p.tasks);
        let mut lanes = Vec::with_capacity(tasks.len());
        let mut panicked = None;
        for task in tasks {
            match task.await {
                Ok(lane) => lanes.push(lane),
                Err(e) => panicked = Some(Error::Fatal(format!("sink {}: a lane failed: {e}", self.name))),
            }
        }
        // Whatever happened, the sink is no longer pipelined once this returns.
        let polled = self.poll();
        let p = self.pipeline.take().expect("lanes pipelined");
        self.lanes = lanes;
        if let Some(error) = panicked {
            return Err(error);
        }
        polled?;
        if !p.units.is_empty() {
            return Err(Error::Restart(format!("sink {}: a lane stopped before it committed", self.name)));
        }
        Ok(())
    }

    /// Queues every lane's share of `items`.
    async fn write_pipelined(&mut self, targets: Vec<Arc<TargetTable>>, items: Vec<SinkItem>) -> Result<()> {
        let shares = self.split(items)?;
        let targets = Arc::new(targets);
        for (lane, items) in shares.into_iter().enumerate().filter(|(_, share)| !share.is_empty()) {
            self.send(lane, Job::Write { targets: targets.clone(), items }).await?;
        }
        self.poll()
    }

    /// Queues every lane's commit of the unit `checkpoint` closes, each with its own offsets.
    async fn commit_pipelined(&mut self, checkpoint: &Checkpoint, offsets: &[StreamOffset]) -> Result<()> {
        let lanes = self.lane_count;
        self.pipeline().units.push_back(InFlight { checkpoint: checkpoint.clone(), waiting: lanes, lsn: 0 });
        for lane in 0..lanes {
            self.send(lane, Job::Commit(offsets.iter().map(|o| on_lane(o, lane)).collect())).await?;
        }
        self.poll()
    }

    /// Lane 0 stores every lane's offsets (rewriting them all if they were written by
    /// another number of lanes) and commits.
    async fn commit_serial(&mut self, offsets: &[StreamOffset]) -> Result<Durable> {
        let all: Vec<StreamOffset> =
            (0..self.lane_count).flat_map(|l| offsets.iter().map(move |o| on_lane(o, l))).collect();
        let lane = &mut self.lanes[0];
        lane.begin(&[]).await?;
        if self.reshape && !offsets.is_empty() {
            lane.db.clear_offsets(&self.name, &self.stream).await?;
            self.reshape = false;
        }
        lane.commit(&self.name, &all).await
    }

    async fn read(&mut self) -> Result<(Vec<StreamOffset>, Vec<Position>, bool)> {
        let rows = self.lanes[0].db.read_offsets(&self.name).await?;
        Ok(merge_lanes(rows, self.lane_count, &self.stream))
    }
}

/// Counts what applied steps did, once they are in the transaction for good; returns the
/// newest commit time among them.
fn count_applied(sink: &str, steps: &[Step]) -> i64 {
    let mut newest_micros = 0;
    for step in steps {
        match step {
            Step::Truncate(_, meta) => {
                newest_micros = newest_micros.max(meta.commit_micros);
                metrics::counter!(m::SINK_ROWS_TOTAL, "sink" => sink.to_string(), "op" => "truncate").increment(1);
            }
            Step::DeadLetter(_) => {}
            Step::Apply(r) => {
                for (op, part) in parts(r) {
                    newest_micros = part.meta.iter().map(|m| m.commit_micros).fold(newest_micros, i64::max);
                    metrics::counter!(m::SINK_ROWS_TOTAL, "sink" => sink.to_string(), "op" => op.label())
                        .increment(part.len() as u64);
                }
            }
        }
    }
    newest_micros
}

/// A reduced target's parts in the order they apply: deletes, upserts, partial updates.
fn parts(r: &Reduced) -> impl Iterator<Item = (PartOp<'_>, &Part)> {
    let deletes = r.deletes.iter().map(|p| (PartOp::Delete, p));
    let upserts = r.upserts.iter().map(|p| (PartOp::Upsert, p));
    deletes.chain(upserts).chain(r.updates.iter().map(|(mask, p)| (PartOp::Update(mask), p)))
}

impl<D: Database + 'static> Sink for DbSink<D> {
    async fn open(&mut self) -> Result<Vec<StreamOffset>> {
        self.sync().await?;
        for lane in &mut self.lanes {
            lane.db.connect().await?;
            lane.in_txn = false;
        }
        self.ensured.clear();
        self.pending.clear();
        self.serial = false;
        let (offsets, floors, reshape) = self.read().await?;
        self.floors = floors;
        self.reshape = reshape;
        Ok(offsets)
    }

    async fn offsets(&mut self) -> Result<Vec<StreamOffset>> {
        self.lanes[0].db.connect().await?;
        Ok(self.read().await?.0)
    }

    async fn write(&mut self, items: Vec<SinkItem>) -> Result<()> {
        // DDL first, before the transaction (MySQL would commit it implicitly).
        let mut targets: Vec<Arc<TargetTable>> = Vec::new();
        for item in &items {
            let target = match item {
                SinkItem::Rows(r) => &r.target,
                SinkItem::Truncate { target, .. } => target,
                SinkItem::DeadLetter(_) => continue,
            };
            if !targets.iter().any(|t| Arc::ptr_eq(t, target)) {
                self.ensure(target).await?;
                targets.push(target.clone());
            }
        }
        let items = self.after_floors(items)?;
        let truncates = items.iter().any(|i| matches!(i, SinkItem::Truncate { .. }));
        if self.lane_count > 1 && !self.serial && (truncates || self.reshape) {
            // A truncate concerns every key: the other lanes' rows before it are committed
            // first, and lane 0 applies the rest of the unit.
            self.sync().await?;
            self.barrier(1).await?;
            self.serial = true;
        }
        if self.lane_count > 1 && !self.serial {
            return self.write_pipelined(targets, items).await;
        }
        let steps = self.lanes[0].write(&self.name, &targets, &items).await?;
        self.newest_commit_micros = self.newest_commit_micros.max(count_applied(&self.name, &steps));
        Ok(())
    }

    async fn commit(&mut self, checkpoint: &Checkpoint, offsets: Vec<StreamOffset>) -> Result<Vec<Checkpoint>> {
        let released = if self.lane_count == 1 || self.serial || self.reshape {
            self.sync().await?;
            let (lsn, flushed) = match self.commit_serial(&offsets).await? {
                Durable::Now => (0, u64::MAX),
                Durable::At { lsn, flushed } => (lsn, flushed),
            };
            self.pending.push_back((lsn, checkpoint.clone(), Instant::now()));
            self.release(flushed)
        } else {
            self.commit_pipelined(checkpoint, &offsets).await?;
            self.release(self.flushed)
        };
        self.serial = false;
        if self.floors.iter().max().is_some_and(|newest| checkpoint.position >= *newest) {
            self.floors.clear();
        }
        if self.newest_commit_micros > 0 {
            let lag = (chrono::Utc::now().timestamp_micros() - self.newest_commit_micros).max(0) as f64 / 1e6;
            metrics::gauge!(m::REPLICATION_LAG_SECONDS, "sink" => self.name.clone()).set(lag);
        }
        Ok(released)
    }

    /// Commits that waited [`FLUSH_AFTER`] for the database to flush them (or any, with
    /// `force`) are made durable now, with one WAL flush: while units keep coming, each
    /// commit releases what the database flushed meanwhile at no cost.
    async fn tick(&mut self, force: bool) -> Result<Vec<Checkpoint>> {
        if force {
            self.sync().await?;
        }
        self.poll()?;
        let waited = self.pending.front().is_some_and(|(.., at)| force || at.elapsed() >= FLUSH_AFTER);
        if let Some(p) = self.pipeline.as_mut() {
            // Pipelined: lane 0 flushes after the jobs it has queued.
            if waited && !p.flushing && p.jobs[0].try_send(Job::Flush).is_ok() {
                p.flushing = true;
            }
            return Ok(self.release(self.flushed));
        }
        // Not while a transaction larger than a unit is being written into.
        if !waited || self.lanes.iter().any(|l| l.in_txn) {
            return Ok(Vec::new());
        }
        let flushed = self.lanes[0].db.flush(&self.name).await?;
        self.flushed = self.flushed.max(flushed);
        Ok(self.release(flushed))
    }

    async fn completed(&mut self) -> Result<Vec<Checkpoint>> {
        let Some(p) = self.pipeline.as_mut() else { return std::future::pending().await };
        let Some(report) = p.reports.recv().await else {
            return Err(Error::Restart(format!("sink {}: its lanes stopped", self.name)));
        };
        self.absorb(report)?;
        self.poll()?;
        Ok(self.release(self.flushed))
    }

    async fn snapshot_begin(&mut self, targets: &[Arc<TargetTable>], stream: &str) -> Result<()> {
        self.sync().await?;
        let held = self.lanes[0].db.read_offsets(&self.name).await?;
        if !held.iter().any(|o| o.stream == stream) {
            return Ok(());
        }
        tracing::warn!(sink = %self.name, tables = targets.len(), "a new snapshot starts: emptying the target tables first");
        for t in targets {
            self.ensure(t).await?;
        }
        self.barrier(0).await?;
        let lane = &mut self.lanes[0];
        lane.begin(&[]).await?;
        for t in targets {
            lane.db.truncate(t).await?;
        }
        lane.db.clear_offsets(&self.name, stream).await?;
        lane.commit(&self.name, &[]).await?;
        if stream == self.stream {
            self.floors.clear();
            self.reshape = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(stream: &str, part: i32, lsn: u64) -> StreamOffset {
        StreamOffset {
            stream: stream.into(),
            partition: part,
            next_offset: 0,
            position: Position { lsn, seq: 0 },
            generation: 0,
            from_offset: None,
        }
    }

    #[test]
    fn lanes_apart_resume_from_the_lowest_with_a_floor_each() {
        let rows = vec![stored("slot", 1 << LANE_SHIFT, 10), stored("slot", 0, 20)];
        let (merged, floors, reshape) = merge_lanes(rows, 2, "slot");
        assert_eq!(merged, vec![stored("slot", 0, 10)]);
        assert_eq!(floors, vec![Position { lsn: 20, seq: 0 }, Position { lsn: 10, seq: 0 }]);
        assert!(!reshape);
        let (_, floors, _) = merge_lanes(vec![stored("slot", 0, 20), stored("slot", 1 << LANE_SHIFT, 20)], 2, "slot");
        assert!(floors.is_empty(), "lanes together need no floors");
    }

    #[test]
    fn rows_of_another_number_of_lanes_are_rewritten() {
        for (rows, lanes) in [
            (vec![stored("slot", 0, 20)], 2),
            (vec![stored("slot", 0, 20), stored("slot", 1 << LANE_SHIFT, 10)], 1),
            (vec![stored("slot", 0, 20), stored("slot", 2 << LANE_SHIFT, 10)], 2),
        ] {
            let lowest = rows.iter().map(|r| r.position).min();
            let (merged, floors, reshape) = merge_lanes(rows, lanes, "slot");
            assert!(reshape && floors.is_empty());
            assert_eq!(merged.iter().map(|o| o.position).min(), lowest);
            assert!(merged.iter().all(|o| o.partition == 0));
        }
        // Kafka partitions of other streams are kept as they are.
        let (merged, _, reshape) = merge_lanes(vec![stored("topic", 3, 5), stored("topic", 0, 7)], 1, "");
        assert_eq!(merged, vec![stored("topic", 0, 7), stored("topic", 3, 5)]);
        assert!(!reshape);
    }

    #[test]
    fn a_key_keeps_its_lane() {
        use arrow::array::{Int64Array, RecordBatch, StringArray};
        use arrow::datatypes::{DataType, Field, Schema};
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let ids = Int64Array::from_iter_values(1..=12);
        let names = StringArray::from_iter_values((1..=12).map(|i| format!("n{i}")));
        let rows = MappedRows {
            target: Arc::new(TargetTable {
                name: TableId::new("public", "t"),
                source: TableId::new("public", "t"),
                schema: schema.clone(),
                key: vec![0],
            }),
            columns: RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(names)]).expect("batch"),
            ops: vec![crate::mapper::RowOp::Upsert; 12],
            meta: vec![],
        };
        // Pinned: stored lane positions depend on these never changing.
        assert_eq!(lanes_of(&rows, 2).expect("lanes"), [0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!(lanes_of(&rows, 3).expect("lanes"), [0, 1, 2, 2, 0, 0, 0, 2, 1, 1, 2, 1]);
    }

    #[test]
    fn an_offset_on_lane_zero_is_stored_as_it_is() {
        assert_eq!(on_lane(&stored("t", 3, 1), 0), stored("t", 3, 1));
        assert_eq!(on_lane(&stored("t", 3, 1), 2), stored("t", 3 | 2 << LANE_SHIFT, 1));
    }
}
