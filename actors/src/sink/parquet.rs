//! The Parquet sink: a change log per target table, in Hive-style folders, on a local
//! folder or an object store (S3).
//!
//! ```text
//! <root>/table=<t>/date=<yyyy-mm-dd>/part-<flush>-<first position>-<last position>.parquet
//! <root>/_dead_letter/part-<flush>.jsonl
//! <root>/_sluice/commit-<flush>.json          offsets durable after flush <flush>
//! ```
//!
//! Exactly once across crashes: rows accumulate in Parquet writers (compressed) and
//! nothing is acknowledged until a *flush* made them durable. A flush puts every file
//! (each put is atomic), then the commit marker naming the offsets it covers; a flush is
//! committed exactly when its marker exists. Files are also put early, under the number
//! of the flush to come, whenever the open writers hold `rotate_rows` or
//! [`MAX_HELD_BYTES`] (a snapshot commits only at its end; memory stays bounded). On open,
//! the newest marker gives the offsets to resume after, and files of later (interrupted)
//! flushes are deleted, so the replay that follows rewrites their rows once. Flushes
//! happen on `rotate_rows`, on `rotate_secs` (checked every second), at the end of a
//! snapshot and on a graceful stop.
//!
//! A file's bytes are held in memory until they reach one upload part (`part_bytes`: 5
//! MiB on S3, its smallest part, 1 MiB on a local folder); a larger file is streamed
//! from then on, part by part, into a multipart upload of a *partial* object
//! (`table=<t>/date=<d>/_partial-<flush>-<n>.parquet`, a name that Hive-style readers
//! skip), which becomes visible once complete and is renamed to its final name (the
//! position range is known only at its end) before the flush's marker. A partial object
//! carries its flush's number, so one left by a crash is deleted on open like any file of
//! an interrupted flush. Memory per file is then a part or two and the row group in
//! progress, whatever the file's size.
//!
//! Every row carries `_op`, `_commit_lsn`, `_seq`, `_commit_ts`, and `_unchanged` (the
//! columns an update left unchanged because the source did not resend them, written NULL).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    Array, ArrayRef, FixedSizeBinaryBuilder, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Context, Error, Result};
use crate::mapper::plan::TargetTable;
use crate::mapper::{DeadLetter, RowOp, SinkItem};
use crate::message::{Checkpoint, Position, StreamOffset};
use crate::metrics as m;
use crate::schema::{PG_TYPE_METADATA, TableId};
use crate::sink::Sink;
use crate::value::{format_date, parse_uuid};

/// Where and how the Parquet sink writes.
#[derive(Debug, Clone)]
pub struct ParquetOptions {
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix inside the store ("" for the root).
    pub prefix: String,
    /// Bytes of a file held before it is streamed, and of each part streamed: see
    /// [`part_bytes`].
    pub part_bytes: usize,
    pub rotate_rows: usize,
    pub rotate_secs: u64,
}

/// Opens the store behind a sink `path`: a local folder, or `s3://bucket/prefix`.
pub fn open_store(path: &str, s3: &S3Options) -> Result<(Arc<dyn ObjectStore>, String)> {
    if let Some(rest) = path.strip_prefix("s3://") {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &s3.endpoint {
            builder = builder.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(r) = &s3.region {
            builder = builder.with_region(r);
        }
        if let Some(k) = &s3.access_key_id {
            builder = builder.with_access_key_id(k);
        }
        if let Some(s) = &s3.secret_access_key {
            builder = builder.with_secret_access_key(s);
        }
        let store = builder.build().map_err(|e| Error::Fatal(format!("sink path {path}: {e}")))?;
        return Ok((Arc::new(store), prefix.trim_matches('/').to_string()));
    }
    std::fs::create_dir_all(path).context(format!("create folder {path}"))?;
    let store = object_store::local::LocalFileSystem::new_with_prefix(path)
        .map_err(|e| Error::Fatal(format!("sink path {path}: {e}")))?;
    Ok((Arc::new(store), String::new()))
}

/// The upload part size for a sink `path`: 5 MiB on S3 (the smallest part it takes but
/// the last), 1 MiB on a local folder.
pub fn part_bytes(path: &str) -> usize {
    if path.starts_with("s3://") { 5 << 20 } else { 1 << 20 }
}

/// Object-store settings for `s3://` paths (the names object_store uses).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

struct OpenFile {
    table: TableId,
    date: String,
    target: Arc<TargetTable>,
    writer: ArrowWriter<FileBytes>,
    first: Position,
    last: Position,
}

struct Finished {
    path: String,
    bytes: FileBytes,
}

/// File data held in memory, by all open files together, before the files are put early
/// (like `rotate_rows`): bounds the sink's memory whatever the row size and the number of
/// tables. Row groups in progress count too; bytes already streamed do not.
const MAX_HELD_BYTES: usize = 16 << 20;

/// A row group is closed early when its column writers hold this much (wide rows), else
/// at 8,192 rows: with 1 KB rows that is about 8 MB of buffers per open file.
const ROW_GROUP_MAX_BYTES: usize = 4 << 20;

/// Size of the pieces a file is held in while it is written.
const CHUNK_BYTES: usize = 1 << 20;

/// A file's bytes as a list of 1 MiB pieces. Growing never copies: a `Vec<u8>` doubles
/// and copies, and was measured holding 40 MB for a 24 MB file during a snapshot.
#[derive(Default)]
struct Chunks {
    done: Vec<bytes::Bytes>,
    current: Vec<u8>,
}

impl std::io::Write for Chunks {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.current.capacity() == 0 {
            self.current.reserve_exact(CHUNK_BYTES);
        }
        let n = buf.len().min(self.current.capacity() - self.current.len());
        self.current.extend_from_slice(&buf[..n]);
        if self.current.len() == self.current.capacity() {
            self.done.push(std::mem::take(&mut self.current).into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Chunks {
    fn len(&self) -> usize {
        self.done.iter().map(bytes::Bytes::len).sum::<usize>() + self.current.len()
    }

    fn into_pieces(mut self) -> Vec<bytes::Bytes> {
        if !self.current.is_empty() {
            self.done.push(self.current.into());
        }
        self.done
    }
}

/// Where a file's bytes go: held in memory, or streamed into the multipart upload of its
/// partial object (`written`: bytes given to the upload so far).
enum FileBytes {
    Held(Chunks),
    Streamed { upload: WriteMultipart, partial: Path, written: usize },
}

impl FileBytes {
    /// Bytes in memory: held, or buffered towards the next part of `part_bytes`.
    fn held(&self, part_bytes: usize) -> usize {
        match self {
            FileBytes::Held(chunks) => chunks.len(),
            FileBytes::Streamed { written, .. } => written % part_bytes,
        }
    }
}

/// The upload of a streaming file, taken out of it (the file is left empty and held).
fn take_upload(bytes: &mut FileBytes) -> Option<WriteMultipart> {
    match std::mem::replace(bytes, FileBytes::Held(Chunks::default())) {
        FileBytes::Streamed { upload, .. } => Some(upload),
        held => {
            *bytes = held;
            None
        }
    }
}

impl std::io::Write for FileBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            FileBytes::Held(chunks) => chunks.write(buf),
            FileBytes::Streamed { upload, written, .. } => {
                // Starts an upload of each part as it fills (a task): the sink waits for
                // them after each write (see `ParquetSink::stream_large_files`).
                upload.write(buf);
                *written += buf.len();
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The Parquet sink.
pub struct ParquetSink {
    name: String,
    options: ParquetOptions,
    open: Vec<OpenFile>,
    finished: Vec<Finished>,
    dead: Vec<DeadLetter>,
    /// Checkpoints committed by the writer, durable at the next flush.
    pending: Vec<Checkpoint>,
    offsets: HashMap<(String, i32), StreamOffset>,
    /// Rows since the last flush, and those of them still in the open writers.
    buffered_rows: usize,
    open_rows: usize,
    /// Files of the coming flush already put (their marker is still to come).
    spilled: Vec<String>,
    /// Files of the coming flush so far: numbers their names.
    parts: usize,
    /// Whether this incarnation's first flush removed what a previous one left late.
    swept: bool,
    oldest: Option<Instant>,
    flush: u64,
}

fn props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).expect("zstd level 1 is valid")))
        .set_max_row_group_row_count(Some(8 * 1024))
        .build()
}

fn table_folder(t: &TableId) -> String {
    if t.schema == "public" { t.name.clone() } else { t.to_string() }
}

fn position_text(p: Position) -> String {
    format!("{:X}_{:X}", p.lsn, p.seq)
}

/// The flush number in a file or marker name (`part-0000000012-...`, `commit-0000000012.json`,
/// `_partial-0000000012-...`).
fn flush_of(name: &str) -> Option<u64> {
    let file = name.rsplit('/').next()?;
    let rest = ["part-", "commit-", "_partial-"].iter().find_map(|p| file.strip_prefix(p))?;
    rest.split(['-', '.']).next()?.parse().ok()
}

fn is_uuid(f: &Field) -> bool {
    f.metadata().get(PG_TYPE_METADATA).map(String::as_str) == Some("uuid") && f.data_type() == &DataType::Utf8
}

/// Parquet (arrow-rs) cannot write month-day-nano intervals: they are written as ISO 8601
/// text (`P1Y2M3DT4H5M6.5S`), exactly.
fn is_interval(f: &Field) -> bool {
    matches!(f.data_type(), DataType::Interval(_))
}

fn interval_text(a: &ArrayRef) -> ArrayRef {
    use arrow::array::AsArray;
    use arrow::datatypes::IntervalMonthDayNanoType;
    let v = a.as_primitive::<IntervalMonthDayNanoType>();
    Arc::new(
        (0..v.len())
            .map(|i| {
                (!v.is_null(i)).then(|| {
                    let x = v.value(i);
                    crate::value::Interval { months: x.months, days: x.days, micros: x.nanoseconds / 1000 }.to_string()
                })
            })
            .collect::<StringArray>(),
    )
}

/// The file schema of a target: its columns (uuid as 16 bytes) and the change columns.
pub fn file_schema(target: &TargetTable) -> SchemaRef {
    let mut fields: Vec<Field> = target
        .schema
        .fields()
        .iter()
        .map(|f| {
            if is_uuid(f) {
                Field::new(f.name(), DataType::FixedSizeBinary(16), true)
            } else if is_interval(f) {
                Field::new(f.name(), DataType::Utf8, true)
            } else {
                f.as_ref().clone().with_nullable(true)
            }
        })
        .collect();
    fields.push(Field::new("_op", DataType::Utf8, false));
    fields.push(Field::new("_commit_lsn", DataType::Int64, false));
    fields.push(Field::new("_seq", DataType::Int64, false));
    fields.push(Field::new("_commit_ts", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), false));
    fields.push(Field::new("_unchanged", DataType::Utf8, true));
    Arc::new(Schema::new(fields))
}

impl ParquetSink {
    pub fn new(name: impl Into<String>, options: ParquetOptions) -> Self {
        Self {
            name: name.into(),
            options,
            open: Vec::new(),
            finished: Vec::new(),
            dead: Vec::new(),
            pending: Vec::new(),
            offsets: HashMap::new(),
            buffered_rows: 0,
            open_rows: 0,
            spilled: Vec::new(),
            parts: 0,
            swept: false,
            oldest: None,
            flush: 0,
        }
    }

    fn path(&self, rest: &str) -> Path {
        if self.options.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.options.prefix))
        }
    }

    fn finish_file(&mut self, file: OpenFile) -> Result<()> {
        let n = self.parts;
        self.parts += 1;
        let path = format!(
            "table={}/date={}/part-{:010}-{}-{}-{n}.parquet",
            table_folder(&file.table),
            file.date,
            self.flush,
            position_text(file.first),
            position_text(file.last)
        );
        let bytes = file.writer.into_inner().context(format!("finish parquet file for {}", file.table))?;
        self.finished.push(Finished { path, bytes });
        Ok(())
    }

    /// Open files that outgrew one part start streaming into a partial object; then
    /// waits until each streaming file has at most one part in flight (memory stays a
    /// part or two per file).
    async fn stream_large_files(&mut self) -> Result<()> {
        for i in 0..self.open.len() {
            let held = match self.open[i].writer.inner_mut() {
                FileBytes::Held(chunks) if chunks.len() >= self.options.part_bytes => std::mem::take(chunks),
                FileBytes::Held(_) => continue,
                FileBytes::Streamed { upload, partial, .. } => {
                    upload.wait_for_capacity(2).await.context(format!("upload part of {partial}"))?;
                    continue;
                }
            };
            let n = self.parts;
            self.parts += 1;
            let file = &self.open[i];
            let partial = self.path(&format!(
                "table={}/date={}/_partial-{:010}-{n}.parquet",
                table_folder(&file.table),
                file.date,
                self.flush
            ));
            let start =
                self.options.store.put_multipart(&partial).await.context(format!("start upload of {partial}"))?;
            let mut upload = WriteMultipart::new_with_chunk_size(start, self.options.part_bytes);
            let written = held.len();
            for piece in held.into_pieces() {
                upload.put(piece);
            }
            *self.open[i].writer.inner_mut() = FileBytes::Streamed { upload, partial, written };
        }
        Ok(())
    }

    /// Rows of one target, as written to its file(s), split by commit date.
    fn add_rows(
        &mut self,
        target: &Arc<TargetTable>,
        columns: &RecordBatch,
        ops: &[RowOp],
        meta: &[crate::mapper::RowMeta],
    ) -> Result<()> {
        let schema = file_schema(target);
        let n = ops.len();
        let mut by_date: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, m) in meta.iter().enumerate() {
            by_date
                .entry(format_date(m.commit_micros.div_euclid(crate::value::MICROS_PER_DAY) as i32))
                .or_default()
                .push(i);
        }
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for (i, f) in target.schema.fields().iter().enumerate() {
            let a = columns.column(i).clone();
            arrays.push(if is_uuid(f) {
                uuid_bytes(&a)?
            } else if is_interval(f) {
                interval_text(&a)
            } else {
                a
            });
        }
        let op_codes: Vec<&str> = ops
            .iter()
            .zip(meta)
            .map(|(op, m)| match (m.op, op) {
                (crate::message::Op::Truncate, _) => "t",
                (_, RowOp::Delete) => "d",
                _ => m.op.code(),
            })
            .collect();
        arrays.push(Arc::new(StringArray::from(op_codes)));
        arrays.push(Arc::new(Int64Array::from(meta.iter().map(|m| m.position.lsn as i64).collect::<Vec<_>>())));
        arrays.push(Arc::new(Int64Array::from(meta.iter().map(|m| m.position.seq as i64).collect::<Vec<_>>())));
        arrays.push(Arc::new(
            TimestampMicrosecondArray::from(meta.iter().map(|m| m.commit_micros).collect::<Vec<_>>())
                .with_timezone("UTC"),
        ));
        let names = target.schema.fields();
        arrays.push(Arc::new(StringArray::from(
            ops.iter()
                .map(|op| match op {
                    RowOp::Update { unchanged } if unchanged.iter().any(|u| *u) => Some(
                        unchanged
                            .iter()
                            .enumerate()
                            .filter(|(_, u)| **u)
                            .map(|(i, _)| names[i].name().as_str())
                            .collect::<Vec<_>>()
                            .join(","),
                    ),
                    _ => None,
                })
                .collect::<Vec<_>>(),
        )));
        let batch = RecordBatch::try_new(schema.clone(), arrays).context(format!("parquet rows of {}", target.name))?;
        for (date, rows) in by_date {
            let part = if rows.len() == n {
                batch.clone()
            } else {
                let idx = arrow::array::UInt32Array::from(rows.iter().map(|&r| r as u32).collect::<Vec<_>>());
                arrow::compute::take_record_batch(&batch, &idx).context("split rows by date")?
            };
            let first = meta[rows[0]].position;
            let last = meta[*rows.last().expect("rows of a date")].position;
            let at = self.open.iter().position(|f| f.table == target.name && f.date == date);
            if let Some(i) = at
                && self.open[i].target.as_ref() != target.as_ref()
            {
                let file = self.open.swap_remove(i);
                self.finish_file(file)?;
            }
            let at = self.open.iter().position(|f| f.table == target.name && f.date == date);
            let i = match at {
                Some(i) => i,
                None => {
                    let writer =
                        ArrowWriter::try_new(FileBytes::Held(Chunks::default()), schema.clone(), Some(props()))
                            .context("open parquet writer")?;
                    self.open.push(OpenFile {
                        table: target.name.clone(),
                        date,
                        target: target.clone(),
                        writer,
                        first,
                        last,
                    });
                    self.open.len() - 1
                }
            };
            let file = &mut self.open[i];
            file.writer.write(&part).context(format!("write parquet rows of {}", target.name))?;
            if file.writer.memory_size() >= ROW_GROUP_MAX_BYTES {
                file.writer.flush().context(format!("write a parquet row group of {}", target.name))?;
            }
            file.first = file.first.min(first);
            file.last = file.last.max(last);
        }
        self.buffered_rows += n;
        self.open_rows += n;
        self.oldest.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Removes the files of these tables and the rows buffered for them.
    async fn forget_tables(&mut self, targets: &[Arc<TargetTable>]) -> Result<()> {
        for t in targets {
            for path in list(&self.options.store, self.path(&format!("table={}", table_folder(&t.name)))).await? {
                self.options.store.delete(&path).await.context(format!("delete {path}"))?;
            }
        }
        let (dropped, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.open).into_iter().partition(|f| targets.iter().any(|t| t.name == f.table));
        self.open = kept;
        for mut file in dropped {
            if let Some(upload) = take_upload(file.writer.inner_mut()) {
                let _ = upload.abort().await;
            }
        }
        let forgotten =
            |path: &str| targets.iter().any(|t| path.starts_with(&format!("table={}/", table_folder(&t.name))));
        self.finished.retain(|f| !forgotten(&f.path));
        self.spilled.retain(|p| !forgotten(p));
        Ok(())
    }

    /// Deletes the files of flushes from this one on, but those named in `keep`: files of
    /// flushes that never committed, whose rows the replay writes again.
    async fn remove_uncommitted(&mut self, keep: &[String]) -> Result<()> {
        for path in list(&self.options.store, self.path("")).await? {
            let name = path.as_ref();
            if name.contains("_sluice/") || keep.iter().any(|k| name.ends_with(k.as_str())) {
                continue;
            }
            if flush_of(name).is_some_and(|f| f >= self.flush) {
                tracing::info!(sink = %self.name, file = name, "removing a file of an interrupted flush");
                self.options.store.delete(&path).await.context(format!("delete {path}"))?;
            }
        }
        Ok(())
    }

    /// Finishes the open files and puts every finished one, under the coming flush.
    async fn spill(&mut self) -> Result<()> {
        for file in std::mem::take(&mut self.open) {
            self.finish_file(file)?;
        }
        for f in std::mem::take(&mut self.finished) {
            put_file(&self.options.store, &self.path(&f.path), f.bytes).await?;
            self.spilled.push(f.path);
        }
        self.open_rows = 0;
        Ok(())
    }

    /// Bytes of file data in memory: open files (written row groups not streamed yet and
    /// the one in progress) and finished files not put yet.
    fn held_bytes(&self) -> usize {
        let part = self.options.part_bytes;
        let open: usize = self.open.iter().map(|f| f.writer.inner().held(part) + f.writer.memory_size()).sum();
        open + self.finished.iter().map(|f| f.bytes.held(part)).sum::<usize>()
    }

    fn due(&self) -> bool {
        self.buffered_rows >= self.options.rotate_rows
            || self.oldest.is_some_and(|t| t.elapsed() >= Duration::from_secs(self.options.rotate_secs))
            || (self.buffered_rows == 0 && self.dead.is_empty() && !self.pending.is_empty())
    }

    /// Puts every file, then the commit marker; returns the checkpoints now durable.
    async fn flush(&mut self) -> Result<Vec<Checkpoint>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        self.spill().await?;
        let mut names = std::mem::take(&mut self.spilled);
        if !self.dead.is_empty() {
            let lines: String = self
                .dead
                .drain(..)
                .map(|d| {
                    serde_json::json!({
                        "sink": self.name, "source_table": d.source.to_string(), "target_table": d.target.map(|t| t.to_string()),
                        "op": d.op.code(), "lsn": d.position.lsn, "seq": d.position.seq, "error": d.error, "change": d.change,
                    })
                    .to_string()
                        + "\n"
                })
                .collect();
            let name = format!("_dead_letter/part-{:010}.jsonl", self.flush);
            let path = self.path(&name);
            self.options.store.put(&path, PutPayload::from(lines.into_bytes())).await.context(format!("put {path}"))?;
            names.push(name);
        }
        // A previous incarnation aborted by a restart may still have finished a put after
        // `open` swept (a blocking file write outlives its task): the first flush of each
        // incarnation sweeps again before its marker makes such a file part of it.
        if !self.swept {
            self.remove_uncommitted(&names).await?;
            self.swept = true;
        }
        let durable = std::mem::take(&mut self.pending);
        let mut offsets: Vec<&StreamOffset> = self.offsets.values().collect();
        offsets.sort_by(|a, b| (&a.stream, a.partition).cmp(&(&b.stream, b.partition)));
        let marker = serde_json::json!({ "flush": self.flush, "offsets": offsets, "files": names });
        let path = self.path(&format!("_sluice/commit-{:010}.json", self.flush));
        self.options
            .store
            .put(&path, PutPayload::from(marker.to_string().into_bytes()))
            .await
            .context(format!("put {path}"))?;
        // Older markers are superseded; keep a few for inspection.
        if self.flush >= 10 {
            let old = self.path(&format!("_sluice/commit-{:010}.json", self.flush - 10));
            let _ = self.options.store.delete(&old).await;
        }
        metrics::counter!(m::SINK_ROWS_TOTAL, "sink" => self.name.clone(), "op" => "append")
            .increment(self.buffered_rows as u64);
        tracing::debug!(sink = %self.name, flush = self.flush, rows = self.buffered_rows, files = names.len(), "parquet flush committed");
        self.flush += 1;
        self.parts = 0;
        self.buffered_rows = 0;
        self.oldest = None;
        Ok(durable)
    }
}

impl Drop for ParquetSink {
    /// Aborts the uploads of files still streaming (a writer restart drops its sink), so
    /// they leave nothing behind: best effort, on the runtime the sink ran on.
    fn drop(&mut self) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let files =
            self.open.iter_mut().map(|f| f.writer.inner_mut()).chain(self.finished.iter_mut().map(|f| &mut f.bytes));
        for upload in files.filter_map(take_upload) {
            runtime.spawn(async move {
                let _ = upload.abort().await;
            });
        }
    }
}

/// Makes a finished file an object at `path`: one put of its bytes, or the end of its
/// upload and a rename. (A free function, like [`newest_commit`].)
async fn put_file(store: &Arc<dyn ObjectStore>, path: &Path, bytes: FileBytes) -> Result<()> {
    match bytes {
        FileBytes::Held(chunks) => {
            let payload: PutPayload = chunks.into_pieces().into_iter().collect();
            store.put(path, payload).await.context(format!("put {path}"))?;
        }
        FileBytes::Streamed { upload, partial, .. } => {
            upload.finish().await.context(format!("complete upload of {partial}"))?;
            store.rename(&partial, path).await.context(format!("rename {partial} to {path}"))?;
        }
    }
    Ok(())
}

/// Every object under `prefix`.
async fn list(store: &Arc<dyn ObjectStore>, prefix: Path) -> Result<Vec<Path>> {
    let found: Vec<_> = store.list(Some(&prefix)).try_collect().await.context(format!("list {prefix}"))?;
    Ok(found.into_iter().map(|o| o.location).collect())
}

fn uuid_bytes(a: &ArrayRef) -> Result<ArrayRef> {
    let strings =
        a.as_any().downcast_ref::<StringArray>().ok_or_else(|| Error::Rejected("uuid column is not text".into()))?;
    let mut b = FixedSizeBinaryBuilder::with_capacity(strings.len(), 16);
    for v in strings.iter() {
        match v.and_then(parse_uuid) {
            Some(u) => b.append_value(u.to_be_bytes()).context("uuid bytes")?,
            None => b.append_null(),
        }
    }
    Ok(Arc::new(b.finish()))
}

/// The newest commit marker under `markers`: its flush number and offsets. (A free
/// function: the sink itself is not `Sync`, its in-memory Parquet writers are not.)
async fn newest_commit(
    store: &Arc<dyn ObjectStore>,
    markers: Path,
    sink: &str,
) -> Result<Option<(u64, Vec<StreamOffset>)>> {
    let found = list(store, markers).await?;
    let Some((flush, path)) = found.iter().filter_map(|p| flush_of(p.as_ref()).map(|f| (f, p))).max_by_key(|(f, _)| *f)
    else {
        return Ok(None);
    };
    let got = store.get(path).await.context(format!("get {path}"))?;
    let bytes = got.bytes().await.context(format!("read {path}"))?;
    let bad = |e: serde_json::Error| Error::Fatal(format!("sink {sink}: bad commit marker {path}: {e}"));
    let marker: serde_json::Value = serde_json::from_slice(&bytes).map_err(bad)?;
    let offsets: Vec<StreamOffset> = serde_json::from_value(marker["offsets"].clone()).map_err(bad)?;
    Ok(Some((flush, offsets)))
}

impl Sink for ParquetSink {
    async fn offsets(&mut self) -> Result<Vec<StreamOffset>> {
        let markers = self.path("_sluice");
        Ok(newest_commit(&self.options.store, markers, &self.name).await?.map(|(_, o)| o).unwrap_or_default())
    }

    async fn open(&mut self) -> Result<Vec<StreamOffset>> {
        self.open.clear();
        self.finished.clear();
        self.dead.clear();
        self.pending.clear();
        self.offsets.clear();
        self.buffered_rows = 0;
        self.open_rows = 0;
        self.spilled.clear();
        self.parts = 0;
        self.oldest = None;
        let markers = self.path("_sluice");
        let committed = match newest_commit(&self.options.store, markers, &self.name).await? {
            Some((flush, offsets)) => {
                for o in offsets {
                    self.offsets.insert((o.stream.clone(), o.partition), o);
                }
                Some(flush)
            }
            None => None,
        };
        self.flush = committed.map_or(0, |f| f + 1);
        self.swept = false;
        self.remove_uncommitted(&[]).await?;
        Ok(self.offsets.values().cloned().collect())
    }

    async fn write(&mut self, items: Vec<SinkItem>) -> Result<()> {
        for item in items {
            match item {
                SinkItem::Rows(r) => self.add_rows(&r.target, &r.columns, &r.ops, &r.meta)?,
                // A snapshot starts over (Kafka transport): its change log replaces the old one.
                SinkItem::Truncate { target, meta } if meta.position == Position::START => {
                    tracing::warn!(sink = %self.name, table = %target.name, "a new snapshot starts: removing the table's files");
                    self.forget_tables(std::slice::from_ref(&target)).await?;
                }
                SinkItem::Truncate { target, meta } => {
                    let nulls: Vec<ArrayRef> =
                        target.schema.fields().iter().map(|f| arrow::array::new_null_array(f.data_type(), 1)).collect();
                    let columns = RecordBatch::try_new(target.schema.clone(), nulls).context("truncate row")?;
                    self.add_rows(&target, &columns, &[RowOp::Delete], &[meta])?;
                }
                SinkItem::DeadLetter(d) => {
                    metrics::counter!(m::DEAD_LETTERS_TOTAL, "sink" => self.name.clone()).increment(1);
                    self.dead.push(d);
                }
            }
        }
        if self.open_rows >= self.options.rotate_rows || self.held_bytes() >= MAX_HELD_BYTES {
            self.spill().await?;
        }
        self.stream_large_files().await
    }

    async fn commit(&mut self, checkpoint: &Checkpoint, offsets: Vec<StreamOffset>) -> Result<Vec<Checkpoint>> {
        // A lake has one writer: a starting offset that is not the held one means the
        // partition was applied elsewhere.
        for o in offsets.iter().filter(|o| o.from_offset.is_some()) {
            let held = self.offsets.get(&(o.stream.clone(), o.partition)).map(|h| h.next_offset);
            if held.is_some_and(|h| Some(h) != o.from_offset) {
                return Err(Error::Restart(format!(
                    "sink {}: partition {}/{} was applied elsewhere",
                    self.name, o.stream, o.partition
                )));
            }
        }
        for o in offsets {
            self.offsets.insert((o.stream.clone(), o.partition), o);
        }
        self.pending.push(checkpoint.clone());
        // The end of a snapshot is flushed at once: until then the lake holds nothing, and
        // a source that restarts would have to copy the tables again for every sink.
        if self.due() || checkpoint.position == Position::SNAPSHOT_DONE { self.flush().await } else { Ok(Vec::new()) }
    }

    async fn tick(&mut self, force: bool) -> Result<Vec<Checkpoint>> {
        if force || self.due() { self.flush().await } else { Ok(Vec::new()) }
    }

    async fn snapshot_begin(&mut self, targets: &[Arc<TargetTable>], stream: &str) -> Result<()> {
        if !self.offsets.keys().any(|(s, _)| s == stream) {
            return Ok(());
        }
        tracing::warn!(sink = %self.name, "a new snapshot starts: removing the files of the tables it copies");
        self.forget_tables(targets).await?;
        self.offsets.retain(|(s, _), _| s != stream);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_keep_every_byte_in_order() {
        use std::io::Write as _;
        let data: Vec<u8> = (0..(3 * CHUNK_BYTES + 12_345)).map(|i| (i * 31 % 251) as u8).collect();
        let mut chunks = Chunks::default();
        for piece in data.chunks(70_001) {
            chunks.write_all(piece).expect("write");
        }
        assert_eq!(chunks.len(), data.len());
        let pieces = chunks.into_pieces();
        let joined: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
        assert_eq!(joined, data);
        assert!(pieces.iter().all(|b| b.len() <= CHUNK_BYTES));
    }

    #[test]
    fn flush_numbers_parse_from_names() {
        assert_eq!(flush_of("x/table=users/date=2024-01-01/part-0000000012-0_1-0_9-0.parquet"), Some(12));
        assert_eq!(flush_of("_sluice/commit-0000000003.json"), Some(3));
        assert_eq!(flush_of("_dead_letter/part-0000000004.jsonl"), Some(4));
        assert_eq!(flush_of("table=users/date=2024-01-01/_partial-0000000005-3.parquet"), Some(5));
        assert_eq!(flush_of("other.txt"), None);
    }
}
