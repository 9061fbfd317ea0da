//! The WAL reader actor: streams committed transactions from the replication slot.
//!
//! ```text
//!   PostgreSQL ──pgoutput──► WalReader ──Data..Data,Checkpoint(commit_lsn, end_lsn)──► downstream
//!       ▲                                                                               │
//!       └──── standby status: flush = confirm_lsn ◄── min over sinks of acknowledged ◄──┘
//! ```
//!
//! Why each confirmed LSN is safe: the reader confirms a transaction's `end_lsn` only when
//! every downstream acknowledged the checkpoint that closes that transaction, i.e. made it
//! durable. PostgreSQL resends every transaction that commits after the confirmed LSN, so a
//! crash anywhere replays work (downstream skips it by position) but never skips any.
//! When idle (everything emitted is acknowledged), a keepalive's WAL position becomes a
//! heartbeat checkpoint at `wal_end - 1`: every commit before `wal_end` has been streamed,
//! and every later one has a commit LSN of at least `wal_end`, so it still sorts after the
//! heartbeat; the slot then advances on a database whose tables do not change.
//!
//! Batching: while the stream has more to read at once, the changes of consecutive
//! transactions gather into one batch per table (up to `batch_rows`), and only the newest
//! transaction's checkpoint follows them: a busy stream of small transactions that touch
//! several tables travels as a few large batches (mapping, fan-out and sink units cost per
//! batch), an idle one is emitted as soon as its commit is read. A checkpoint still never
//! closes a unit that holds part of a later transaction (see [`Gather`]).
//!
//! Order: each table's changes keep their stream order; between tables, changes of one
//! unit may be reordered (sinks fold a unit per key, by position, see
//! [`reduce`](crate::sink::reduce)), except across a truncate: nothing read after it goes
//! out before it.
//!
//! Schema changes: a Relation message that differs from the table's current schema makes a
//! new [`TableSchema`] version; its rows start a new batch after the old version's, so every
//! batch carries the schema its rows follow.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::fault::Faults;
use crate::mailbox::Sender;
use crate::message::{Change, ChangeBatch, Checkpoint, Event, Op, Position};
use crate::metrics as m;
use crate::schema::{Column, PgType, TableId, TableSchema};
use crate::source::catalog;
use crate::source::pgoutput::{self, Message, OldImage, Relation, TupleValue};
use crate::value::{PG_EPOCH_MICROS, Value};

/// How the reader batches and beats.
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Changes per batch at most.
    pub batch_rows: usize,
    /// Minimum time between heartbeat checkpoints on an idle stream.
    pub heartbeat: Duration,
}

struct Txn {
    commit_lsn: u64,
    xid: u32,
    commit_micros: i64,
    seq: u64,
}

/// Changes read but not emitted yet, possibly of several transactions and tables, the
/// checkpoint of the newest transaction committed among them, and the confirm LSN of the
/// newest checkpoint sent downstream.
///
/// Invariants: `committed[i]` first changes of `batches[i]` belong to transactions that
/// ended at or before `ready`, the rest to the open one; whenever rows are emitted, `ready`
/// goes right after the committed ones and before the others, so a checkpoint never
/// closes a unit holding part of a later transaction. Batches before `barrier` take no
/// more changes (a truncate was read after them).
#[derive(Default)]
struct Gather {
    batches: Vec<ChangeBatch>,
    committed: Vec<usize>,
    barrier: usize,
    ready: Option<Checkpoint>,
    /// What every downstream must acknowledge before the stream is drained or idle.
    emitted: u64,
}

impl Gather {
    fn new(emitted: u64) -> Self {
        Self { emitted, ..Self::default() }
    }

    fn is_empty(&self) -> bool {
        self.batches.is_empty() && self.ready.is_none()
    }

    /// A transaction committed: everything gathered so far is committed.
    fn commit(&mut self, checkpoint: Checkpoint) {
        self.committed = self.batches.iter().map(ChangeBatch::len).collect();
        self.ready = Some(checkpoint);
    }

    /// Adds a change of a table (in `schema`'s version) to the table's batch; returns
    /// that batch's length.
    fn add(&mut self, schema: &Arc<TableSchema>, change: Change) -> usize {
        let truncate = change.op == Op::Truncate;
        let last = self.batches[self.barrier..].iter().rposition(|b| b.table == schema.id).map(|i| i + self.barrier);
        // Same version; a truncate joins only a batch that nothing was gathered after.
        let joins =
            |i: &usize| Arc::ptr_eq(&self.batches[*i].schema, schema) && (!truncate || *i + 1 == self.batches.len());
        let i = match last.filter(joins) {
            Some(i) => i,
            None => {
                self.batches.push(ChangeBatch {
                    table: schema.id.clone(),
                    schema: schema.clone(),
                    changes: Vec::with_capacity(16),
                    snapshot_last: false,
                });
                self.batches.len() - 1
            }
        };
        if truncate {
            self.barrier = i;
        }
        self.batches[i].changes.push(change);
        self.batches[i].len()
    }

    /// Sends what is gathered: committed rows, their checkpoint, then the open rows.
    async fn emit(&mut self, out: &Sender<Event>) -> Result<()> {
        for batch in &self.batches {
            // Counted per batch: a labelled counter costs a registry lookup.
            metrics::counter!(m::EVENTS_TOTAL, "stage" => "source", "table" => batch.table.to_string())
                .increment(batch.len() as u64);
        }
        let committed = std::mem::take(&mut self.committed);
        let batches = std::mem::take(&mut self.batches);
        self.barrier = 0;
        let Some(checkpoint) = self.ready.take() else {
            for batch in batches {
                out.send(Event::Data(Arc::new(batch))).await?;
            }
            return Ok(());
        };
        let mut open = Vec::new();
        for (i, mut batch) in batches.into_iter().enumerate() {
            let done = committed.get(i).copied().unwrap_or(0);
            let rest = batch.changes.split_off(done.min(batch.changes.len()));
            if !rest.is_empty() {
                open.push(ChangeBatch {
                    table: batch.table.clone(),
                    schema: batch.schema.clone(),
                    changes: rest,
                    snapshot_last: false,
                });
            }
            if !batch.is_empty() {
                out.send(Event::Data(Arc::new(batch))).await?;
            }
        }
        if let Some(confirm) = checkpoint.confirm_lsn {
            self.emitted = confirm;
        }
        out.send(Event::Checkpoint(checkpoint)).await?;
        for batch in open {
            out.send(Event::Data(Arc::new(batch))).await?;
        }
        Ok(())
    }
}

/// Decoding state that survives reconnections: relation and type caches, current schemas.
pub struct WalState {
    tables: HashSet<TableId>,
    /// Current schema per configured table (shared with the snapshot's versions).
    pub schemas: HashMap<TableId, Arc<TableSchema>>,
    relations: HashMap<u32, Option<Arc<TableSchema>>>,
    types: HashMap<(u32, i32), PgType>,
}

impl WalState {
    pub fn new(schemas: HashMap<TableId, Arc<TableSchema>>) -> Self {
        Self { tables: schemas.keys().cloned().collect(), schemas, relations: HashMap::new(), types: HashMap::new() }
    }
}

/// Streams until `stop` is set or the connection fails. Returns `Ok(true)` when stopped and
/// drained (everything emitted acknowledged), `Ok(false)` when a rewind was requested.
#[allow(clippy::too_many_arguments)]
pub async fn stream(
    repl: &mut ReplicationClient,
    catalog_client: &tokio_postgres::Client,
    state: &mut WalState,
    options: &WalOptions,
    out: &Sender<Event>,
    confirm: &mut watch::Receiver<u64>,
    rewind: &mut watch::Receiver<u64>,
    stop: &mut watch::Receiver<bool>,
    faults: &Faults,
) -> Result<bool> {
    let mut txn: Option<Txn> = None;
    let mut gather = Gather::new(*confirm.borrow());
    let mut last_heartbeat = Instant::now();
    let mut confirmed = *confirm.borrow_and_update();
    if rewind.has_changed().unwrap_or(false) {
        // A rewind asked for before this stream began (while the snapshot ended, or the
        // stream reconnected): this stream starts at the confirmed position, which is what
        // was asked for, and the fan-out, which forwards nothing to the sink that asked
        // until it hears so, must hear so. Swallowing the request starved that sink.
        rewind.borrow_and_update();
        out.send(Event::Rewound).await?;
    }
    let replication_metrics = repl.metrics();
    loop {
        let event = tokio::select! {
            biased;
            Ok(()) = stop.changed() => {
                if *stop.borrow() {
                    gather.emit(out).await?;
                    return drain(repl, confirm, gather.emitted).await.map(|_| true);
                }
                continue;
            }
            Ok(()) = rewind.changed() => {
                tracing::info!("rewind requested: reconnecting the replication stream at the confirmed position");
                return Ok(false);
            }
            changed = confirm.changed() => {
                if changed.is_ok() {
                    confirmed = *confirm.borrow_and_update();
                    repl.update_applied_lsn(Lsn::from_u64(confirmed));
                    metrics::gauge!(m::SOURCE_CONFIRMED_LSN).set(confirmed as f64);
                }
                continue;
            }
            event = repl.recv() => event,
            // Nothing more is waiting in the stream: what was gathered goes downstream.
            () = std::future::ready(()), if !gather.is_empty() => {
                gather.emit(out).await?;
                continue;
            }
        };
        let event = match event {
            Ok(Some(e)) => e,
            Ok(None) => return Err(Error::Protocol("replication stream ended".into())),
            Err(source) => return Err(Error::Replication { context: "read replication stream".into(), source }),
        };
        match event {
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = wal_end.as_u64();
                metrics::gauge!(m::SOURCE_LAG_BYTES).set(wal_end.saturating_sub(confirmed) as f64);
                let idle = txn.is_none() && gather.is_empty() && confirmed >= gather.emitted;
                if idle && wal_end > gather.emitted.max(1) && last_heartbeat.elapsed() >= options.heartbeat {
                    last_heartbeat = Instant::now();
                    gather.emitted = wal_end;
                    let position = Position { lsn: wal_end - 1, seq: Position::END };
                    out.send(Event::Checkpoint(Checkpoint::source(position, Some(wal_end)))).await?;
                }
            }
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                txn = Some(Txn {
                    commit_lsn: final_lsn.as_u64(),
                    xid,
                    commit_micros: commit_time_micros + PG_EPOCH_MICROS,
                    seq: 0,
                });
            }
            ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                if txn.take().is_none() {
                    return Err(Error::Protocol("Commit without Begin in the replication stream".into()));
                }
                faults.hit("wal")?;
                let position = Position::txn_end(lsn.as_u64());
                // Sent with what follows while the stream keeps coming (see `Gather`).
                gather.commit(Checkpoint::source(position, Some(end_lsn.as_u64())));
                let lag = replication_metrics.last_wal_end().as_u64().saturating_sub(confirmed);
                metrics::gauge!(m::SOURCE_LAG_BYTES).set(lag as f64);
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let message = pgoutput::decode(data).map_err(|e| Error::Protocol(e.to_string()))?;
                let at = Reading { lsn: wal_start.as_u64(), options, out };
                handle_message(message, at, &mut txn, &mut gather, catalog_client, state).await?;
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
    }
}

/// Waits (bounded by the caller's deadline) until everything emitted is confirmed, then
/// until the server was told.
async fn drain(repl: &mut ReplicationClient, confirm: &mut watch::Receiver<u64>, target: u64) -> Result<()> {
    while *confirm.borrow_and_update() < target {
        if confirm.changed().await.is_err() {
            break;
        }
    }
    let confirmed = *confirm.borrow();
    repl.update_applied_lsn(Lsn::from_u64(confirmed));
    let deadline = Instant::now() + Duration::from_secs(3);
    while repl.metrics().last_applied_lsn().as_u64() < confirmed && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tracing::info!(confirmed_lsn = %Lsn::from_u64(confirmed), "source drained");
    let _ = repl.shutdown().await;
    Ok(())
}

/// Where a message was read, and where its changes go.
struct Reading<'a> {
    lsn: u64,
    options: &'a WalOptions,
    out: &'a Sender<Event>,
}

/// Decodes one message into `gather`.
async fn handle_message(
    message: Message,
    at: Reading<'_>,
    txn: &mut Option<Txn>,
    gather: &mut Gather,
    catalog_client: &tokio_postgres::Client,
    state: &mut WalState,
) -> Result<()> {
    match message {
        Message::Relation(rel) => {
            // Rows of a new version start a new batch (`Gather::add`).
            let schema = relation_schema(&rel, catalog_client, state).await?;
            state.relations.insert(rel.oid, schema);
        }
        Message::Insert { relation, new } => {
            let Some(schema) = lookup(state, relation)? else { return Ok(()) };
            let after = decode(&schema, &new)?;
            push(txn, gather, schema, Op::Insert, None, Some(after), &at).await?;
        }
        Message::Update { relation, old, new } => {
            let Some(schema) = lookup(state, relation)? else { return Ok(()) };
            let before = old.as_ref().map(|(_, t)| decode(&schema, t)).transpose()?;
            let mut after = decode(&schema, &new)?;
            // With the whole old row at hand, an unchanged TOAST value is known.
            if let (Some((OldImage::Full, _)), Some(before)) = (&old, &before) {
                for (a, b) in after.iter_mut().zip(before) {
                    if matches!(a, Value::Unchanged) && !matches!(b, Value::Unchanged) {
                        *a = b.clone();
                    }
                }
            }
            push(txn, gather, schema, Op::Update, before, Some(after), &at).await?;
        }
        Message::Delete { relation, old } => {
            let Some(schema) = lookup(state, relation)? else { return Ok(()) };
            let before = decode(&schema, &old.1)?;
            push(txn, gather, schema, Op::Delete, Some(before), None, &at).await?;
        }
        Message::Truncate { relations, .. } => {
            for relation in relations {
                if let Some(schema) = lookup(state, relation)? {
                    push(txn, gather, schema, Op::Truncate, None, None, &at).await?;
                }
            }
        }
        Message::Type { .. } | Message::Origin { .. } | Message::Message { .. } => {}
        Message::Begin { .. } | Message::Commit { .. } => {
            return Err(Error::Protocol("unexpected Begin/Commit inside XLogData".into()));
        }
    }
    Ok(())
}

fn lookup(state: &WalState, relation: u32) -> Result<Option<Arc<TableSchema>>> {
    match state.relations.get(&relation) {
        Some(schema) => Ok(schema.clone()),
        None => Err(Error::Protocol(format!("change for relation {relation} before its Relation message"))),
    }
}

fn decode(schema: &TableSchema, tuple: &[TupleValue]) -> Result<Vec<Value>> {
    pgoutput::decode_tuple(schema.columns.iter().map(|c| (c.name.as_str(), &c.pg_type)), tuple)
        .map_err(|e| Error::Protocol(format!("table {}: {e}", schema.id)))
}

/// The schema a Relation message describes, as a new version if it changed; `None` for
/// tables sluice does not replicate.
async fn relation_schema(
    rel: &Relation,
    catalog_client: &tokio_postgres::Client,
    state: &mut WalState,
) -> Result<Option<Arc<TableSchema>>> {
    let id = TableId::new(&rel.namespace, &rel.name);
    if !state.tables.contains(&id) {
        return Ok(None);
    }
    let previous = state.schemas.get(&id).cloned();
    // REPLICA IDENTITY FULL flags every column as key: the primary key comes from the catalog.
    let all_flagged = rel.columns.iter().all(|c| c.key);
    let primary_key = if all_flagged { catalog::primary_key(catalog_client, &id).await? } else { Vec::new() };
    let mut columns = Vec::with_capacity(rel.columns.len());
    for c in &rel.columns {
        let pg_type = catalog::resolve_type(catalog_client, c.type_oid, c.type_modifier, &mut state.types).await?;
        let key = if all_flagged && !primary_key.is_empty() { primary_key.contains(&c.name) } else { c.key };
        let nullable = previous
            .as_ref()
            .and_then(|p| p.columns.iter().find(|pc| pc.name == c.name && pc.pg_type == pg_type))
            .map(|pc| pc.nullable)
            .unwrap_or(true);
        columns.push(Column { name: c.name.clone(), pg_type, nullable, key });
    }
    let candidate = TableSchema {
        id: id.clone(),
        version: previous.as_ref().map_or(1, |p| p.version),
        columns,
        replica_identity: rel.replica_identity,
    };
    let schema = match previous {
        Some(p) if same_columns(&p, &candidate) => p,
        Some(p) => {
            let next = Arc::new(TableSchema { version: p.version + 1, ..candidate });
            tracing::info!(table = %id, version = next.version, "source schema changed");
            next
        }
        None => Arc::new(candidate),
    };
    state.schemas.insert(id, schema.clone());
    Ok(Some(schema))
}

/// Columns equal by name, type and key; nullability is not in Relation messages.
fn same_columns(a: &TableSchema, b: &TableSchema) -> bool {
    a.columns.len() == b.columns.len()
        && a.columns.iter().zip(&b.columns).all(|(x, y)| x.name == y.name && x.pg_type == y.pg_type && x.key == y.key)
        && a.replica_identity == b.replica_identity
}

/// Adds a change to `gather`, sending what it holds once its table's batch is full.
async fn push(
    txn: &mut Option<Txn>,
    gather: &mut Gather,
    schema: Arc<TableSchema>,
    op: Op,
    before: Option<Vec<Value>>,
    after: Option<Vec<Value>>,
    at: &Reading<'_>,
) -> Result<()> {
    let Some(t) = txn.as_mut() else {
        return Err(Error::Protocol("row change outside a transaction".into()));
    };
    t.seq += 1;
    let change = Change {
        op,
        before,
        after,
        position: Position { lsn: t.commit_lsn, seq: t.seq },
        lsn: at.lsn,
        xid: t.xid,
        commit_micros: t.commit_micros,
    };
    if gather.add(&schema, change) >= at.options.batch_rows {
        gather.emit(at.out).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::mailbox;

    /// Table `t` (see `message::testing::inserts`) and an insert into it at (lsn, seq).
    fn change(lsn: u64, seq: u64) -> (Arc<TableSchema>, Change) {
        let mut batch = crate::message::testing::inserts([(lsn, seq)]);
        (batch.schema, batch.changes.remove(0))
    }

    fn other_table(schema: &Arc<TableSchema>, name: &str) -> Arc<TableSchema> {
        Arc::new(TableSchema { id: TableId::new("public", name), ..TableSchema::clone(schema) })
    }

    /// What reached the mailbox: `D`, the table and the positions of a data batch, `C` and
    /// the position of a checkpoint.
    fn drain(rx: &mut crate::mailbox::Mailbox<Event>) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(e) = rx.try_recv() {
            out.push(match e {
                Event::Data(b) => format!(
                    "D{}{:?}",
                    b.table.name,
                    b.changes.iter().map(|c| (c.position.lsn, c.position.seq)).collect::<Vec<_>>()
                ),
                Event::Checkpoint(cp) => format!("C{}", cp.position.lsn),
                other => format!("{other:?}"),
            });
        }
        out
    }

    #[tokio::test]
    async fn a_checkpoint_goes_between_committed_rows_and_the_open_transaction() {
        let (tx, mut rx) = mailbox::<Event>("t", "test", 100);
        let t = change(0, 0).0;
        let u = other_table(&t, "u");
        let mut gather = Gather::default();
        // Transactions 10 and 20 committed, 30 open: one checkpoint (20's) after the rows
        // of 10 and 20, one batch per table.
        gather.add(&t, change(10, 1).1);
        gather.add(&u, change(10, 2).1);
        gather.add(&t, change(10, 3).1);
        gather.commit(Checkpoint::source(Position::txn_end(10), Some(11)));
        gather.add(&t, change(20, 1).1);
        gather.commit(Checkpoint::source(Position::txn_end(20), Some(21)));
        gather.add(&u, change(30, 1).1);
        gather.emit(&tx).await.expect("emit");
        assert_eq!(gather.emitted, 21);
        assert_eq!(drain(&mut rx), vec!["Dt[(10, 1), (10, 3), (20, 1)]", "Du[(10, 2)]", "C20", "Du[(30, 1)]"]);
        assert!(gather.is_empty());
        // Only open rows: no checkpoint.
        gather.add(&t, change(30, 2).1);
        gather.emit(&tx).await.expect("emit");
        assert_eq!(gather.emitted, 21, "no checkpoint sent");
        assert_eq!(drain(&mut rx), vec!["Dt[(30, 2)]"]);
        // A checkpoint whose rows went out before: alone.
        gather.commit(Checkpoint::source(Position::txn_end(30), Some(31)));
        gather.emit(&tx).await.expect("emit");
        assert_eq!(gather.emitted, 31);
        assert_eq!(drain(&mut rx), vec!["C30"]);
    }

    #[tokio::test]
    async fn truncates_and_schema_versions_keep_their_place() {
        let (tx, mut rx) = mailbox::<Event>("t", "test", 100);
        let t = change(0, 0).0;
        let u = other_table(&t, "u");
        let t2 = Arc::new(TableSchema { version: 2, ..TableSchema::clone(&t) });
        let mut gather = Gather::default();
        gather.add(&t, change(50, 1).1);
        let mut truncate = change(50, 2).1;
        truncate.op = Op::Truncate;
        gather.add(&u, truncate);
        // After the truncate, `t` starts a new batch instead of joining the one before it.
        gather.add(&t, change(50, 3).1);
        gather.add(&u, change(50, 4).1);
        // A new version of `t`: a new batch after the old version's.
        gather.add(&t2, change(50, 5).1);
        gather.emit(&tx).await.expect("emit");
        assert_eq!(drain(&mut rx), vec!["Dt[(50, 1)]", "Du[(50, 2), (50, 4)]", "Dt[(50, 3)]", "Dt[(50, 5)]"]);
    }
}
