//! The typed protocol between actors.
//!
//! Data and control share one ordered stream of [`Event`]s: rows travel in
//! [`ChangeBatch`]es, and a [`Checkpoint`] closes each unit that may be committed and
//! acknowledged (a source transaction, a snapshot chunk). A sink never commits in the
//! middle of a unit, which is what makes source transactions atomic in direct mode.
//!
//! Every change carries its [`Position`] (`commit_lsn`, `seq`): positions are totally
//! ordered across the snapshot and the stream, so any stage can tell a replayed change from
//! a new one by comparing with the last position it made durable.

use std::sync::Arc;

use crate::schema::{TableId, TableSchema};
use crate::value::Value;

/// A row: one value per column of its [`TableSchema`], in column order.
pub type Row = Vec<Value>;

/// What happened to a row (Debezium's `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Op {
    /// A row read by the snapshot (`r`).
    Read,
    Insert,
    Update,
    Delete,
    /// The table was truncated; no row images.
    Truncate,
}

impl Op {
    /// Debezium's one-letter code.
    pub fn code(self) -> &'static str {
        match self {
            Op::Read => "r",
            Op::Insert => "c",
            Op::Update => "u",
            Op::Delete => "d",
            Op::Truncate => "t",
        }
    }

    pub fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "r" => Op::Read,
            "c" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            "t" => Op::Truncate,
            _ => return None,
        })
    }
}

/// A point in the source's history. Ordered: snapshot rows (`lsn == 0`, `seq` = row
/// ordinal), then the end of the snapshot, then stream changes by commit LSN and their
/// ordinal within the transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// Commit LSN of the change's transaction; 0 for snapshot rows.
    pub lsn: u64,
    /// Ordinal of the change within its transaction (from 1), or of the row in the snapshot.
    pub seq: u64,
}

impl Position {
    /// `seq` of the end of a unit (a whole transaction, the whole snapshot). Fits a SQL `bigint`.
    pub const END: u64 = i64::MAX as u64;
    /// Nothing applied yet.
    pub const START: Position = Position { lsn: 0, seq: 0 };
    /// The whole snapshot applied, no stream change yet.
    pub const SNAPSHOT_DONE: Position = Position { lsn: 0, seq: Self::END };

    /// The end of the transaction committed at `commit_lsn`.
    pub fn txn_end(commit_lsn: u64) -> Self {
        Position { lsn: commit_lsn, seq: Self::END }
    }

    pub fn is_snapshot(&self) -> bool {
        self.lsn == 0
    }
}

/// One change of one row.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub op: Op,
    /// Old image: key columns (others NULL) or the whole row with REPLICA IDENTITY FULL.
    pub before: Option<Row>,
    /// New image; may hold [`Value::Unchanged`] for TOASTed columns of updates.
    pub after: Option<Row>,
    pub position: Position,
    /// LSN of the change itself (Debezium's `source.lsn`); 0 for snapshot rows.
    pub lsn: u64,
    /// Source transaction id; 0 for snapshot rows.
    pub xid: u32,
    /// Commit time, microseconds since the epoch.
    pub commit_micros: i64,
}

/// Changes of one table, in source order.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    pub table: TableId,
    /// The schema every row of this batch follows. A new version travels with the first
    /// batch that uses it.
    pub schema: Arc<TableSchema>,
    pub changes: Vec<Change>,
    /// Snapshot batches: whether this is the table's last one (Debezium's `snapshot: last`).
    pub snapshot_last: bool,
}

impl ChangeBatch {
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Position of the last change.
    pub fn last_position(&self) -> Option<Position> {
        self.changes.last().map(|c| c.position)
    }
}

/// The end of a unit that may be committed: everything before it in the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The position a sink stores with its commit.
    pub position: Position,
    /// The source LSN to confirm once every sink has acknowledged this checkpoint
    /// (a transaction's end LSN); `None` where nothing new may be confirmed (snapshot).
    pub confirm_lsn: Option<u64>,
    /// Kafka mode: the consumed partition offsets this checkpoint covers; a sink stores
    /// these instead of `position`.
    pub offsets: Option<Arc<Vec<StreamOffset>>>,
}

impl Checkpoint {
    /// A checkpoint of the source stream (direct mode).
    pub fn source(position: Position, confirm_lsn: Option<u64>) -> Self {
        Self { position, confirm_lsn, offsets: None }
    }

    /// What a sink stores for this checkpoint, `stream` naming the source stream (the slot).
    pub fn stream_offsets(&self, stream: &str) -> Vec<StreamOffset> {
        match &self.offsets {
            Some(o) => o.as_ref().clone(),
            None => vec![StreamOffset {
                stream: stream.to_string(),
                partition: 0,
                next_offset: 0,
                position: self.position,
                generation: 0,
                from_offset: None,
            }],
        }
    }

    /// One checkpoint for two consecutive units: the newer position, and per partition the
    /// older `from_offset` with the newer offsets.
    pub fn merge(older: Checkpoint, newer: Checkpoint) -> Checkpoint {
        let offsets = match (older.offsets, newer.offsets.clone()) {
            (Some(old), Some(new)) => {
                let mut merged: Vec<StreamOffset> = old.as_ref().clone();
                for n in new.iter() {
                    match merged.iter_mut().find(|m| m.stream == n.stream && m.partition == n.partition) {
                        Some(m) => {
                            let from = m.from_offset;
                            *m = n.clone();
                            m.from_offset = from;
                        }
                        None => merged.push(n.clone()),
                    }
                }
                Some(Arc::new(merged))
            }
            (_, new) => new,
        };
        Checkpoint { offsets, ..newer }
    }
}

/// A durable position of one stream partition, as a sink stores it with its writes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StreamOffset {
    /// The replication slot (direct mode) or the Kafka topic.
    pub stream: String,
    /// Kafka partition; 0 in direct mode.
    pub partition: i32,
    /// Kafka: the next offset to consume; 0 in direct mode.
    pub next_offset: i64,
    /// The newest source position applied from this partition.
    pub position: Position,
    /// Kafka: the generation of the snapshot `position` follows (positions start over with
    /// each new snapshot); 0 in direct mode and for topics written by others.
    #[serde(default)]
    pub generation: u64,
    /// Kafka: the stored `next_offset` this unit started from. A sink commits only if it
    /// still holds exactly that (compare-and-set), which fences off a consumer whose
    /// partition moved to another one during a rebalance.
    #[serde(default)]
    pub from_offset: Option<i64>,
}

/// One item of the ordered stream between actors.
#[derive(Debug, Clone)]
pub enum Event {
    /// Shared: the fan-out hands the same batch to every sink.
    Data(Arc<ChangeBatch>),
    Checkpoint(Checkpoint),
    /// A (new) snapshot of these tables starts. A sink that already holds rows of this
    /// source empties the tables it maps them to, so rows deleted since its last snapshot
    /// do not survive a re-snapshot.
    SnapshotBegin {
        tables: Vec<Arc<TableSchema>>,
        /// The LSN the copy is consistent at: it grows with every new snapshot, so it
        /// also numbers the snapshot's generation.
        consistent_lsn: u64,
    },
    /// The stream starts again at the confirmed position (after a rewind request): what
    /// follows replays what came before, from at or before what every sink holds.
    Rewound,
}

impl Event {
    /// Rows carried, for bounding buffers by rows.
    pub fn rows(&self) -> usize {
        match self {
            Event::Data(b) => b.len(),
            _ => 0,
        }
    }
}

/// A sink's (or the Kafka producer's) durable progress, sent back upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Index of the acknowledging downstream (sink pipeline) in the fan-out.
    pub downstream: usize,
    pub checkpoint: Checkpoint,
}

/// Hand-built batches for unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::schema::{Column, PgType, ReplicaIdentity};

    /// Inserts into a one-column table `public.t (id bigint key)`, one per (commit LSN,
    /// seq) position, with `id` = seq.
    pub(crate) fn inserts(positions: impl IntoIterator<Item = (u64, u64)>) -> ChangeBatch {
        let schema = Arc::new(TableSchema {
            id: TableId::new("public", "t"),
            version: 1,
            columns: vec![Column { name: "id".into(), pg_type: PgType::Int8, nullable: false, key: true }],
            replica_identity: ReplicaIdentity::Default,
        });
        let changes = positions
            .into_iter()
            .map(|(lsn, seq)| Change {
                op: Op::Insert,
                before: None,
                after: Some(vec![Value::Int8(seq as i64)]),
                position: Position { lsn, seq },
                lsn,
                xid: 1,
                commit_micros: 0,
            })
            .collect();
        ChangeBatch { table: schema.id.clone(), schema, changes, snapshot_last: false }
    }
}
