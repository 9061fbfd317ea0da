//! The snapshot actor: copies the tables as they were at the slot's consistent point.
//!
//! ```text
//!   replication conn: CREATE_REPLICATION_SLOT ... (SNAPSHOT 'export')  -> consistent LSN, snapshot name
//!   N readers:        BEGIN REPEATABLE READ; SET TRANSACTION SNAPSHOT name;
//!                     COPY (SELECT .. WHERE pk in chunk ORDER BY pk) TO STDOUT   (chunks taken in order)
//!   emitter:          chunk 0, chunk 1, ... in order -> Read changes, positions (0, 1..n)
//!   stream:           starts at the consistent LSN: every later commit is in the stream,
//!                     every earlier one in the snapshot, none in both.
//! ```
//!
//! Invariant: the emission order depends only on the exported snapshot (chunk bounds are
//! computed inside it, rows are ordered by primary key), so a rewind that copies again from
//! the same snapshot yields the same rows at the same positions, and downstream skips what
//! it already has by position. Readers work ahead by at most one small channel each, so
//! memory stays bounded whatever the table size.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::mpsc;

use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::mailbox::Sender;
use crate::message::{Change, ChangeBatch, Checkpoint, Event, Op, Position, Row};
use crate::metrics as m;
use crate::pgtext;
use crate::schema::{PgType, TableSchema, quote_ident};
use crate::source::catalog::{self, TableInfo};

/// How to copy.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Rows per emitted batch.
    pub batch_rows: usize,
    /// Connections copying in parallel.
    pub parallelism: usize,
    /// Tables estimated larger than this are copied in primary-key ranges of about this size.
    pub chunk_rows: u64,
}

/// A range of one table to copy.
#[derive(Debug, Clone)]
struct Chunk {
    table: usize,
    /// SQL condition on the key (`None`: the whole table).
    condition: Option<String>,
    /// Whether this is the table's last chunk.
    last: bool,
}

type ChunkRows = std::result::Result<Vec<Row>, Error>;
/// Chunks not yet taken by a reader, in emission order, each with its channel.
type ChunkQueue = Arc<Mutex<VecDeque<(Chunk, mpsc::Sender<ChunkRows>)>>>;

/// Copies `tables` inside the exported snapshot `snapshot_name` and emits them, ending with
/// a checkpoint at [`Position::SNAPSHOT_DONE`] that confirms `consistent_lsn`.
pub async fn run(
    pg: &tokio_postgres::Config,
    snapshot_name: &str,
    consistent_lsn: u64,
    tables: &[TableInfo],
    options: &SnapshotOptions,
    out: &Sender<Event>,
    faults: &Faults,
) -> Result<()> {
    let started = Instant::now();
    let parallelism = options.parallelism.max(1);
    let mut readers = Vec::with_capacity(parallelism);
    for i in 0..parallelism {
        readers.push(import_snapshot(pg, snapshot_name, i).await?);
    }
    let chunks = plan_chunks(&readers[0], tables, options.chunk_rows).await?;
    tracing::info!(tables = tables.len(), chunks = chunks.len(), parallelism, "snapshot started");
    for t in tables {
        let id = t.schema.id.to_string();
        metrics::gauge!(m::SNAPSHOT_ROWS_ESTIMATED, "table" => id.clone()).set(t.estimated_rows.max(0) as f64);
        metrics::gauge!(m::SNAPSHOT_ROWS, "table" => id).set(0.0);
    }
    let schemas = tables.iter().map(|t| t.schema.clone()).collect();
    out.send(Event::SnapshotBegin { tables: schemas, consistent_lsn }).await?;

    // One small channel per chunk; readers take chunks in order.
    let mut receivers = Vec::with_capacity(chunks.len());
    let mut jobs = VecDeque::with_capacity(chunks.len());
    for chunk in &chunks {
        let (tx, rx) = mpsc::channel::<ChunkRows>(2);
        receivers.push(rx);
        jobs.push_back((chunk.clone(), tx));
    }
    let jobs = Arc::new(Mutex::new(jobs));
    let schemas: Arc<Vec<Arc<TableSchema>>> = Arc::new(tables.iter().map(|t| t.schema.clone()).collect());
    let mut tasks = Vec::with_capacity(parallelism);
    for client in readers {
        let (jobs, schemas, batch_rows) = (jobs.clone(), schemas.clone(), options.batch_rows.max(1));
        tasks.push(tokio::spawn(async move { read_chunks(client, jobs, schemas, batch_rows).await }));
    }
    let _abort_readers = AbortOnDrop(tasks.iter().map(|t| t.abort_handle()).collect());

    let snapshot_micros = chrono::Utc::now().timestamp_micros();
    let mut ordinal: u64 = 0;
    let mut copied = vec![0u64; tables.len()];
    let mut last_log = Instant::now();
    let mut pending: Option<ChangeBatch> = None;
    for (chunk, mut rx) in chunks.iter().zip(receivers) {
        let schema = &tables[chunk.table].schema;
        while let Some(rows) = rx.recv().await {
            let rows = rows?;
            faults.hit("snapshot")?;
            let changes: Vec<Change> = rows
                .into_iter()
                .map(|row| {
                    ordinal += 1;
                    Change {
                        op: Op::Read,
                        before: None,
                        after: Some(row),
                        position: Position { lsn: 0, seq: ordinal },
                        lsn: 0,
                        xid: 0,
                        commit_micros: snapshot_micros,
                    }
                })
                .collect();
            copied[chunk.table] += changes.len() as u64;
            metrics::gauge!(m::SNAPSHOT_ROWS, "table" => schema.id.to_string()).set(copied[chunk.table] as f64);
            metrics::counter!(m::EVENTS_TOTAL, "stage" => "snapshot", "table" => schema.id.to_string())
                .increment(changes.len() as u64);
            if let Some(previous) = pending.take() {
                emit(out, previous).await?;
            }
            pending =
                Some(ChangeBatch { table: schema.id.clone(), schema: schema.clone(), changes, snapshot_last: false });
            if last_log.elapsed() >= Duration::from_secs(5) {
                last_log = Instant::now();
                let estimated = tables[chunk.table].estimated_rows.max(1) as f64;
                tracing::info!(
                    table = %schema.id,
                    rows = copied[chunk.table],
                    percent = format!("{:.0}", (copied[chunk.table] as f64 / estimated * 100.0).min(100.0)),
                    "snapshot progress"
                );
            }
        }
        if chunk.last {
            if let Some(mut last) = pending.take() {
                last.snapshot_last = true;
                emit(out, last).await?;
            }
            tracing::info!(table = %schema.id, rows = copied[chunk.table], "table copied");
        }
    }
    for task in tasks {
        task.await.map_err(|e| Error::Panicked(e.to_string()))??;
    }
    out.send(Event::Checkpoint(Checkpoint::source(Position::SNAPSHOT_DONE, Some(consistent_lsn)))).await?;
    let total: u64 = copied.iter().sum();
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        rows = total,
        seconds = format!("{secs:.1}"),
        rows_per_sec = format!("{:.0}", total as f64 / secs.max(1e-9)),
        "snapshot done"
    );
    Ok(())
}

/// Emits one batch and a checkpoint after it: a snapshot batch may be committed alone.
async fn emit(out: &Sender<Event>, batch: ChangeBatch) -> Result<()> {
    let position = batch.last_position().unwrap_or(Position::START);
    out.send(Event::Data(Arc::new(batch))).await?;
    out.send(Event::Checkpoint(Checkpoint::source(position, None))).await?;
    Ok(())
}

struct AbortOnDrop(Vec<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Opens a connection inside the exported snapshot.
async fn import_snapshot(pg: &tokio_postgres::Config, snapshot_name: &str, i: usize) -> Result<tokio_postgres::Client> {
    let client = catalog::connect(pg, &format!("source (snapshot reader {i})")).await?;
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            crate::schema::quote_literal(snapshot_name)
        ))
        .await
        .context("import the exported snapshot")?;
    Ok(client)
}

fn is_integer(t: &PgType) -> bool {
    matches!(t, PgType::Int2 | PgType::Int4 | PgType::Int8)
}

/// Splits big tables with a single integer key into key ranges; others are one chunk.
async fn plan_chunks(client: &tokio_postgres::Client, tables: &[TableInfo], chunk_rows: u64) -> Result<Vec<Chunk>> {
    let mut chunks = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let keys: Vec<_> = t.schema.columns.iter().filter(|c| c.key).collect();
        let estimated = t.estimated_rows.max(0) as u64;
        if keys.len() == 1 && is_integer(&keys[0].pg_type) && chunk_rows > 0 && estimated > chunk_rows {
            let key = quote_ident(&keys[0].name);
            let row = client
                .query_one(&format!("SELECT min({key})::bigint, max({key})::bigint FROM {}", t.schema.id.quoted()), &[])
                .await
                .context(format!("read key range of {}", t.schema.id))?;
            if let (Some(lo), Some(hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)) {
                let n = estimated.div_ceil(chunk_rows).max(1) as i128;
                let span = (hi as i128 - lo as i128 + 1).max(1);
                let step = (span + n - 1) / n;
                let mut bounds = Vec::new();
                let mut b = lo as i128 + step;
                while b <= hi as i128 {
                    bounds.push(b as i64);
                    b += step;
                }
                let mut lower: Option<i64> = None;
                for upper in bounds.iter().copied().map(Some).chain([None]) {
                    let condition = match (lower, upper) {
                        (None, Some(u)) => format!("{key} < {u}"),
                        (Some(l), Some(u)) => format!("{key} >= {l} AND {key} < {u}"),
                        (Some(l), None) => format!("{key} >= {l}"),
                        (None, None) => "true".to_string(),
                    };
                    chunks.push(Chunk { table: i, condition: Some(condition), last: upper.is_none() });
                    lower = upper;
                }
                continue;
            }
        }
        chunks.push(Chunk { table: i, condition: None, last: true });
    }
    Ok(chunks)
}

/// A reader: takes chunks in order and streams their rows into each chunk's channel.
async fn read_chunks(
    client: tokio_postgres::Client,
    jobs: ChunkQueue,
    schemas: Arc<Vec<Arc<TableSchema>>>,
    batch_rows: usize,
) -> Result<()> {
    loop {
        let Some((chunk, tx)) = jobs.lock().expect("snapshot job queue").pop_front() else { return Ok(()) };
        let schema = &schemas[chunk.table];
        if let Err(error) = copy_chunk(&client, schema, &chunk, batch_rows, &tx).await {
            let _ = tx.send(Err(error)).await;
            return Ok(());
        }
    }
}

async fn copy_chunk(
    client: &tokio_postgres::Client,
    schema: &TableSchema,
    chunk: &Chunk,
    batch_rows: usize,
    tx: &mpsc::Sender<ChunkRows>,
) -> Result<()> {
    let columns = schema.columns.iter().map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let order = schema.columns.iter().filter(|c| c.key).map(|c| quote_ident(&c.name)).collect::<Vec<_>>().join(", ");
    let condition = chunk.condition.as_deref().map(|c| format!(" WHERE {c}")).unwrap_or_default();
    let sql = format!("COPY (SELECT {columns} FROM {}{condition} ORDER BY {order}) TO STDOUT", schema.id.quoted());
    let stream = client.copy_out(sql.as_str()).await.context(format!("copy {}", schema.id))?;
    futures::pin_mut!(stream);
    let mut parser = CopyParser::new(schema);
    let mut rows = Vec::with_capacity(batch_rows);
    while let Some(bytes) = stream.next().await {
        let bytes = bytes.context(format!("copy {}", schema.id))?;
        parser.feed(&bytes, &mut rows)?;
        while rows.len() >= batch_rows {
            let rest = rows.split_off(batch_rows);
            if tx.send(Ok(std::mem::replace(&mut rows, rest))).await.is_err() {
                return Ok(());
            }
        }
    }
    parser.finish(&mut rows)?;
    if !rows.is_empty() {
        let _ = tx.send(Ok(rows)).await;
    }
    Ok(())
}

/// Turns `COPY ... TO STDOUT` text output into rows, across chunk boundaries.
pub struct CopyParser<'a> {
    schema: &'a TableSchema,
    partial: Vec<u8>,
    fields: pgtext::CopyFields,
}

impl<'a> CopyParser<'a> {
    pub fn new(schema: &'a TableSchema) -> Self {
        Self { schema, partial: Vec::new(), fields: pgtext::CopyFields::default() }
    }

    /// Parses every complete line of `bytes` (plus what an earlier call left over).
    pub fn feed(&mut self, bytes: &[u8], rows: &mut Vec<Row>) -> Result<()> {
        let mut start = 0;
        while let Some(nl) = bytes[start..].iter().position(|&b| b == b'\n') {
            let end = start + nl;
            if self.partial.is_empty() {
                let row = self.parse_line(&bytes[start..end])?;
                rows.push(row);
            } else {
                let mut line = std::mem::take(&mut self.partial);
                line.extend_from_slice(&bytes[start..end]);
                let row = self.parse_line(&line)?;
                rows.push(row);
            }
            start = end + 1;
        }
        self.partial.extend_from_slice(&bytes[start..]);
        Ok(())
    }

    /// Fails on a truncated last line.
    pub fn finish(&mut self, rows: &mut Vec<Row>) -> Result<()> {
        if !self.partial.is_empty() {
            let line = std::mem::take(&mut self.partial);
            rows.push(self.parse_line(&line)?);
        }
        Ok(())
    }

    fn parse_line(&mut self, line: &[u8]) -> Result<Row> {
        let table = &self.schema.id;
        pgtext::split_copy_line(line, &mut self.fields)
            .map_err(|e| Error::Protocol(format!("snapshot of {table}: {e}")))?;
        if self.fields.len() != self.schema.columns.len() {
            return Err(Error::Protocol(format!(
                "snapshot of {table}: COPY line has {} fields, table has {} columns",
                self.fields.len(),
                self.schema.columns.len()
            )));
        }
        self.fields
            .iter()
            .zip(&self.schema.columns)
            .map(|(field, column)| {
                let fail = |e: &dyn std::fmt::Display| {
                    Error::Protocol(format!("snapshot of {table}, column {}: {e}", column.name))
                };
                match field.map_err(|e| fail(&e))? {
                    None => Ok(crate::value::Value::Null),
                    Some(text) => pgtext::decode(&column.pg_type, text).map_err(|e| fail(&e)),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, ReplicaIdentity, TableId};
    use crate::value::Value;

    fn schema() -> TableSchema {
        TableSchema {
            id: TableId::new("public", "t"),
            version: 1,
            columns: vec![
                Column { name: "id".into(), pg_type: PgType::Int4, nullable: false, key: true },
                Column { name: "s".into(), pg_type: PgType::Text("text".into()), nullable: true, key: false },
            ],
            replica_identity: ReplicaIdentity::Default,
        }
    }

    #[test]
    fn copy_lines_split_across_chunks_parse() {
        let s = schema();
        let mut p = CopyParser::new(&s);
        let mut rows = Vec::new();
        p.feed(b"1\ta\\tb\n2\t\\N\n3\t", &mut rows).unwrap();
        assert_eq!(rows.len(), 2);
        p.feed(b"x", &mut rows).unwrap();
        p.feed(b"y\n", &mut rows).unwrap();
        p.finish(&mut rows).unwrap();
        assert_eq!(
            rows,
            vec![
                vec![Value::Int4(1), Value::Text("a\tb".into())],
                vec![Value::Int4(2), Value::Null],
                vec![Value::Int4(3), Value::Text("xy".into())],
            ]
        );
        let mut bad = Vec::new();
        assert!(p.feed(b"1\n", &mut bad).is_err());
    }
}
