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

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Disposition, Result};
use crate::mapper::plan::TargetTable;
use crate::mapper::{DeadLetter, SinkItem};
use crate::message::{Checkpoint, StreamOffset};
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

/// A database sink: the [`Sink`] contract over a [`Database`].
pub struct DbSink<D> {
    name: String,
    db: D,
    in_txn: bool,
    ensured: HashMap<TableId, Arc<TargetTable>>,
    newest_commit_micros: i64,
    /// Committed units not durable yet, with the WAL position they are durable at, and
    /// when they committed.
    pending: VecDeque<(u64, Checkpoint, Instant)>,
}

impl<D: Database> DbSink<D> {
    pub fn new(name: impl Into<String>, db: D) -> Self {
        Self {
            name: name.into(),
            db,
            in_txn: false,
            ensured: HashMap::new(),
            newest_commit_micros: 0,
            pending: VecDeque::new(),
        }
    }

    /// The pending checkpoints durable once the WAL is flushed up to `flushed`, in order.
    fn release(&mut self, flushed: u64) -> Vec<Checkpoint> {
        let durable = self.pending.iter().take_while(|(lsn, ..)| *lsn <= flushed).count();
        self.pending.drain(..durable).map(|(_, cp, _)| cp).collect()
    }

    async fn ensure(&mut self, target: &Arc<TargetTable>) -> Result<()> {
        if self.ensured.get(&target.name).is_some_and(|t| Arc::ptr_eq(t, target) || t.as_ref() == target.as_ref()) {
            return Ok(());
        }
        self.db.ensure_table(target).await?;
        self.ensured.insert(target.name.clone(), target.clone());
        Ok(())
    }

    async fn begin(&mut self, targets: &[Arc<TargetTable>]) -> Result<()> {
        if !self.in_txn {
            self.db.begin(targets).await?;
            self.in_txn = true;
        }
        Ok(())
    }

    /// Applies a part under a savepoint, isolating rejected rows by bisection.
    async fn apply_part(
        &mut self,
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
                        tracing::warn!(sink = %self.name, table = %target.name, error = %error.chain(), "row rejected: dead-lettered");
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
    async fn apply_steps(&mut self, steps: &[Step], guarded: bool) -> Result<Vec<DeadLetter>> {
        let mut dead = Vec::new();
        for step in steps {
            match step {
                Step::Truncate(target, _) => self.db.truncate(target).await?,
                Step::DeadLetter(d) => dead.push(d.clone()),
                Step::Apply(r) if guarded => {
                    for (op, part) in parts(r) {
                        self.apply_part(&r.target, op, part, &mut dead).await?;
                    }
                }
                Step::Apply(r) => self.db.apply_parts(&r.target, &parts(r).collect::<Vec<_>>()).await?,
            }
        }
        Ok(dead)
    }

    /// Counts what applied steps did, once they are in the transaction for good.
    fn applied(&mut self, steps: &[Step]) {
        for step in steps {
            match step {
                Step::Truncate(_, meta) => {
                    self.newest_commit_micros = self.newest_commit_micros.max(meta.commit_micros);
                    metrics::counter!(m::SINK_ROWS_TOTAL, "sink" => self.name.clone(), "op" => "truncate").increment(1);
                }
                Step::DeadLetter(_) => {}
                Step::Apply(r) => {
                    for (op, part) in parts(r) {
                        if let Some(newest) = part.meta.iter().map(|m| m.commit_micros).max() {
                            self.newest_commit_micros = self.newest_commit_micros.max(newest);
                        }
                        metrics::counter!(m::SINK_ROWS_TOTAL, "sink" => self.name.clone(), "op" => op.label())
                            .increment(part.len() as u64);
                    }
                }
            }
        }
    }
}

/// A reduced target's parts in the order they apply: deletes, upserts, partial updates.
fn parts(r: &Reduced) -> impl Iterator<Item = (PartOp<'_>, &Part)> {
    let deletes = r.deletes.iter().map(|p| (PartOp::Delete, p));
    let upserts = r.upserts.iter().map(|p| (PartOp::Upsert, p));
    deletes.chain(upserts).chain(r.updates.iter().map(|(mask, p)| (PartOp::Update(mask), p)))
}

impl<D: Database> Sink for DbSink<D> {
    async fn open(&mut self) -> Result<Vec<StreamOffset>> {
        self.db.connect().await?;
        self.in_txn = false;
        self.ensured.clear();
        self.pending.clear();
        self.db.read_offsets(&self.name).await
    }

    async fn offsets(&mut self) -> Result<Vec<StreamOffset>> {
        self.db.connect().await?;
        self.db.read_offsets(&self.name).await
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
        let steps = reduce(&items)?;
        let dead = if self.in_txn {
            self.apply_steps(&steps, true).await?
        } else {
            // The first write of a transaction: unguarded, retried guarded if rejected.
            self.begin(&targets).await?;
            match self.apply_steps(&steps, false).await {
                Ok(dead) => dead,
                Err(error) if error.disposition() == Disposition::DeadLetter => {
                    tracing::info!(sink = %self.name, error = %error.chain(), "a part was rejected: applying the unit again part by part");
                    self.db.rollback().await?;
                    self.in_txn = false;
                    self.begin(&targets).await?;
                    self.apply_steps(&steps, true).await?
                }
                Err(error) => return Err(error),
            }
        };
        self.applied(&steps);
        if !dead.is_empty() {
            metrics::counter!(m::DEAD_LETTERS_TOTAL, "sink" => self.name.clone()).increment(dead.len() as u64);
            self.db.dead_letters(&self.name, &dead).await?;
        }
        Ok(())
    }

    async fn commit(&mut self, checkpoint: &Checkpoint, offsets: Vec<StreamOffset>) -> Result<Vec<Checkpoint>> {
        self.begin(&[]).await?;
        let durable = self.db.commit(&self.name, &offsets).await?;
        self.in_txn = false;
        if self.newest_commit_micros > 0 {
            let lag = (chrono::Utc::now().timestamp_micros() - self.newest_commit_micros).max(0) as f64 / 1e6;
            metrics::gauge!(m::REPLICATION_LAG_SECONDS, "sink" => self.name.clone()).set(lag);
        }
        let (lsn, flushed) = match durable {
            Durable::Now => (0, u64::MAX),
            Durable::At { lsn, flushed } => (lsn, flushed),
        };
        self.pending.push_back((lsn, checkpoint.clone(), Instant::now()));
        Ok(self.release(flushed))
    }

    /// Commits that waited [`FLUSH_AFTER`] for the database to flush them (or any, with
    /// `force`) are made durable now, with one WAL flush: while units keep coming, each
    /// commit releases what the database flushed meanwhile at no cost.
    async fn tick(&mut self, force: bool) -> Result<Vec<Checkpoint>> {
        let waited = self.pending.front().is_some_and(|(.., at)| force || at.elapsed() >= FLUSH_AFTER);
        // Not while a transaction larger than a unit is being written into.
        if !waited || self.in_txn {
            return Ok(Vec::new());
        }
        let flushed = self.db.flush(&self.name).await?;
        Ok(self.release(flushed))
    }

    async fn snapshot_begin(&mut self, targets: &[Arc<TargetTable>], stream: &str) -> Result<()> {
        let held = self.db.read_offsets(&self.name).await?;
        if !held.iter().any(|o| o.stream == stream) {
            return Ok(());
        }
        tracing::warn!(sink = %self.name, tables = targets.len(), "a new snapshot starts: emptying the target tables first");
        for t in targets {
            self.ensure(t).await?;
        }
        self.begin(&[]).await?;
        for t in targets {
            self.db.truncate(t).await?;
        }
        self.db.clear_offsets(&self.name, stream).await?;
        self.db.commit(&self.name, &[]).await?;
        self.in_txn = false;
        Ok(())
    }
}
