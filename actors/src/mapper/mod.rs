//! The column mapper actor: source changes to target rows, per sink.
//!
//! For each change the mapper decides what the target must do (SPEC.md "Mapping SQL"):
//!
//! | source change            | WHERE on the new row       | target                                 |
//! |--------------------------|----------------------------|----------------------------------------|
//! | read / insert            | true                       | upsert                                 |
//! | read / insert            | false or NULL              | nothing                                |
//! | update                   | true                       | upsert (update of the columns it has)  |
//! | update                   | false                      | delete (the row left the set)          |
//! | update                   | unknown (reads a TOASTed   | update if present (membership cannot   |
//! |                          | column that did not change)| have changed)                          |
//! | update changing the key  | -                          | delete the old key, then as an insert  |
//! | delete                   | -                          | delete by key                          |
//! | truncate                 | -                          | truncate                               |
//!
//! A target column computed from an unchanged TOAST value is left as it is in the target.
//! A change whose values cannot be converted or evaluated becomes a dead letter; the rest
//! of its batch goes on.

pub mod columnar;
pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, take};

use crate::error::{Context, Error, Result};
use crate::fault::Faults;
use crate::mailbox::{Mailbox, Sender, Weighted};
use crate::message::{Change, ChangeBatch, Checkpoint, Event, Op, Position, Row};
use crate::metrics as m;
use crate::schema::{TableId, TableSchema};
use crate::transport::envelope;
use crate::value::Value;
use plan::{CompiledMapping, MappingStatement, TargetTable};

/// What the target does with one mapped row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOp {
    /// Insert, or replace every column of the row with this key.
    Upsert,
    /// Update the row with this key if it exists; columns flagged `true` stay as they are.
    Update { unchanged: Vec<bool> },
    /// Delete the row with this key (only the key columns are meaningful).
    Delete,
}

/// Where a mapped row comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowMeta {
    pub op: Op,
    pub position: Position,
    pub commit_micros: i64,
    pub lsn: u64,
    pub xid: u32,
}

impl RowMeta {
    fn of(change: &Change) -> Self {
        Self {
            op: change.op,
            position: change.position,
            commit_micros: change.commit_micros,
            lsn: change.lsn,
            xid: change.xid,
        }
    }
}

/// Rows for one target table, in source order.
#[derive(Debug, Clone)]
pub struct MappedRows {
    pub target: Arc<TargetTable>,
    pub columns: RecordBatch,
    pub ops: Vec<RowOp>,
    pub meta: Vec<RowMeta>,
}

impl MappedRows {
    /// The rows flagged `true` in `keep` (one flag per row), in order; `None` if none is.
    pub fn filter(self, keep: &[bool]) -> Result<Option<Self>> {
        match keep.contains(&false) {
            true => self.select(keep),
            false => Ok(Some(self).filter(|r| !r.ops.is_empty())),
        }
    }

    /// Like [`Self::filter`], leaving `self` as it is (the columns are shared, not copied,
    /// when every row is kept).
    pub fn select(&self, keep: &[bool]) -> Result<Option<Self>> {
        if !keep.contains(&true) {
            return Ok(None);
        }
        if !keep.contains(&false) {
            return Ok(Some(self.clone()));
        }
        let columns = arrow::compute::filter_record_batch(&self.columns, &BooleanArray::from(keep.to_vec()))
            .context("select mapped rows")?;
        let ops = self.ops.iter().zip(keep).filter(|(_, k)| **k).map(|(x, _)| x.clone()).collect();
        let meta = self.meta.iter().zip(keep).filter(|(_, k)| **k).map(|(x, _)| *x).collect();
        Ok(Some(Self { target: self.target.clone(), columns, ops, meta }))
    }
}

/// A change a sink could not take, kept with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub source: TableId,
    pub target: Option<TableId>,
    pub op: Op,
    pub position: Position,
    pub error: String,
    /// The change as a Debezium envelope.
    pub change: String,
}

/// One item for a sink writer.
#[derive(Debug, Clone)]
pub enum SinkItem {
    Rows(MappedRows),
    Truncate { target: Arc<TargetTable>, meta: RowMeta },
    DeadLetter(DeadLetter),
}

impl SinkItem {
    pub fn rows(&self) -> usize {
        match self {
            SinkItem::Rows(r) => r.ops.len(),
            _ => 1,
        }
    }
}

/// The ordered stream into a sink writer.
#[derive(Debug, Clone)]
pub enum SinkEvent {
    Items(Vec<SinkItem>),
    Checkpoint(Checkpoint),
    /// A new snapshot of the sources of these targets starts.
    SnapshotBegin(Vec<Arc<TargetTable>>),
}

impl Weighted for SinkEvent {
    fn weight(&self) -> usize {
        match self {
            SinkEvent::Items(items) => items.iter().map(SinkItem::rows).sum::<usize>().max(1),
            _ => 1,
        }
    }
}

/// How one source table maps into a sink.
pub enum Target {
    Identity(Arc<TargetTable>),
    Sql(CompiledMapping),
}

impl Target {
    pub fn table(&self) -> &Arc<TargetTable> {
        match self {
            Target::Identity(t) => t,
            Target::Sql(c) => &c.target,
        }
    }
}

/// A sink's mapping: SQL statements, or the identity without a mapping file.
#[derive(Debug, Clone)]
pub enum Mapping {
    Identity,
    Sql(Vec<MappingStatement>),
}

/// Compiles and applies a sink's mapping, per source schema version.
pub struct Mapper {
    mapping: Mapping,
    compiled: HashMap<TableId, (Arc<TableSchema>, Arc<Vec<Target>>)>,
}

impl Mapper {
    pub fn new(mapping: Mapping) -> Self {
        Self { mapping, compiled: HashMap::new() }
    }

    /// The targets of a source table at this schema version (compiled once per version).
    pub async fn targets(&mut self, schema: &Arc<TableSchema>) -> Result<Arc<Vec<Target>>> {
        if let Some((s, t)) = self.compiled.get(&schema.id)
            && (Arc::ptr_eq(s, schema) || s.same_shape(schema))
        {
            return Ok(t.clone());
        }
        let targets = match &self.mapping {
            Mapping::Identity => vec![Target::Identity(Arc::new(TargetTable::identity(schema)))],
            Mapping::Sql(statements) => {
                let mut out = Vec::new();
                for s in statements.iter().filter(|s| s.source == schema.id) {
                    let compiled = plan::compile(s, schema).await.map_err(|e| {
                        Error::Fatal(format!("mapping {e} (source {} schema version {})", schema.id, schema.version))
                    })?;
                    out.push(Target::Sql(compiled));
                }
                out
            }
        };
        let targets = Arc::new(targets);
        self.compiled.insert(schema.id.clone(), (schema.clone(), targets.clone()));
        Ok(targets)
    }

    /// Maps one batch of changes into items for the sink, in order.
    pub fn map(batch: &ChangeBatch, targets: &[Target]) -> Vec<SinkItem> {
        let mut items = Vec::new();
        let mut segment: Vec<&Change> = Vec::new();
        for change in &batch.changes {
            if change.op == Op::Truncate {
                map_segment(&batch.schema, &segment, targets, &mut items);
                segment.clear();
                for t in targets {
                    items.push(SinkItem::Truncate { target: t.table().clone(), meta: RowMeta::of(change) });
                }
            } else {
                segment.push(change);
            }
        }
        map_segment(&batch.schema, &segment, targets, &mut items);
        items
    }
}

/// Which image of a change an evaluated row is.
#[derive(Clone, Copy)]
struct Plan {
    /// Evaluated row of the old image when the change deletes by it.
    delete: Option<usize>,
    /// Evaluated row of the new image.
    after: Option<usize>,
}

fn key_changed(schema: &TableSchema, before: &Row, after: &Row) -> bool {
    schema
        .columns
        .iter()
        .enumerate()
        .any(|(i, c)| c.key && !matches!(after[i], Value::Unchanged) && before[i] != after[i])
}

fn dead_letter(schema: &TableSchema, change: &Change, target: Option<&TargetTable>, error: String) -> SinkItem {
    SinkItem::DeadLetter(DeadLetter {
        source: schema.id.clone(),
        target: target.map(|t| t.name.clone()),
        op: change.op,
        position: change.position,
        error,
        change: envelope::change_json(schema, change),
    })
}

fn map_segment(schema: &TableSchema, changes: &[&Change], targets: &[Target], items: &mut Vec<SinkItem>) {
    if changes.is_empty() || targets.is_empty() {
        return;
    }
    match try_map_segment(schema, changes, targets) {
        Ok(mut out) => items.append(&mut out),
        Err(error) if changes.len() == 1 => items.push(dead_letter(schema, changes[0], None, error.chain())),
        // Find the change at fault: map one by one.
        Err(_) => {
            for c in changes {
                map_segment(schema, std::slice::from_ref(c), targets, items);
            }
        }
    }
}

fn try_map_segment<'a>(schema: &TableSchema, changes: &[&'a Change], targets: &[Target]) -> Result<Vec<SinkItem>> {
    let mut images: Vec<&'a Row> = Vec::with_capacity(changes.len() + 4);
    let mut plans = Vec::with_capacity(changes.len());
    fn push<'a>(images: &mut Vec<&'a Row>, row: &'a Option<Row>) -> Option<usize> {
        row.as_ref().map(|r| {
            images.push(r);
            images.len() - 1
        })
    }
    for c in changes.iter().copied() {
        let mut push = |row: &'a Option<Row>| push(&mut images, row);
        let plan = match c.op {
            Op::Read | Op::Insert => Plan { delete: None, after: push(&c.after) },
            Op::Delete => Plan { delete: push(&c.before), after: None },
            Op::Update => match (&c.before, &c.after) {
                (Some(b), Some(a)) if key_changed(schema, b, a) => {
                    Plan { delete: push(&c.before), after: push(&c.after) }
                }
                _ => Plan { delete: None, after: push(&c.after) },
            },
            Op::Truncate => Plan { delete: None, after: None },
        };
        plans.push(plan);
    }
    let width = schema.columns.len();
    let mut failures = Vec::new();
    let columns: Vec<ArrayRef> = (0..width)
        .map(|c| {
            let cells: Vec<&Value> = images.iter().map(|r| r.get(c).unwrap_or(&Value::Null)).collect();
            columnar::column(&schema.columns[c].pg_type, &cells, &mut failures)
        })
        .collect();
    let input = RecordBatch::try_new(schema.arrow_schema(), columns).context("build source batch")?;
    let unchanged: Vec<Option<Vec<bool>>> = images
        .iter()
        .map(|r| {
            r.iter()
                .any(|v| matches!(v, Value::Unchanged))
                .then(|| r.iter().map(|v| matches!(v, Value::Unchanged)).collect())
        })
        .collect();
    let failed_image: HashMap<usize, String> = failures.into_iter().collect();

    let mut out = Vec::new();
    let mut rejected = vec![false; changes.len()];
    for (i, (c, p)) in changes.iter().zip(&plans).enumerate() {
        if let Some(reason) = [p.delete, p.after].iter().flatten().find_map(|img| failed_image.get(img)) {
            rejected[i] = true;
            out.push(dead_letter(schema, c, None, reason.clone()));
        }
    }
    for target in targets {
        let table = target.table();
        let (arrays, filter, reads, filter_reads) = evaluate(target, &input)?;
        let mut indices: Vec<u32> = Vec::new();
        let mut ops = Vec::new();
        let mut meta = Vec::new();
        for (i, (c, p)) in changes.iter().zip(&plans).enumerate() {
            if rejected[i] {
                continue;
            }
            let m = RowMeta::of(c);
            let mut emit = |row: usize, op: RowOp| {
                indices.push(row as u32);
                ops.push(op);
                meta.push(m);
            };
            if let Some(d) = p.delete {
                emit(d, RowOp::Delete);
            }
            let Some(a) = p.after else { continue };
            let mask: Option<Vec<bool>> =
                unchanged[a].as_ref().map(|u| reads.iter().map(|r| r.iter().any(|s| u[*s])).collect());
            let mask = mask.filter(|m| m.iter().any(|x| *x));
            let verdict =
                filter.as_ref().map(|f| if f.is_null(a) { None } else { Some(f.value(a)) }).unwrap_or(Some(true));
            let filter_unknown = unchanged[a].as_ref().is_some_and(|u| filter_reads.iter().any(|s| u[*s]));
            match (c.op, verdict) {
                (Op::Update, _) if p.delete.is_some() && mask.is_some() => {
                    out.push(dead_letter(
                        schema,
                        c,
                        Some(table),
                        "the primary key changed while TOASTed columns were not sent; set REPLICA IDENTITY FULL on the source table".into(),
                    ));
                }
                (_, Some(true)) => emit(a, mask.map_or(RowOp::Upsert, |unchanged| RowOp::Update { unchanged })),
                (Op::Update, None) if filter_unknown => {
                    emit(a, RowOp::Update { unchanged: mask.unwrap_or_else(|| vec![false; arrays.len()]) })
                }
                (Op::Update, _) if p.delete.is_none() => emit(a, RowOp::Delete),
                _ => {}
            }
        }
        if indices.is_empty() {
            continue;
        }
        // Usually every image is emitted once, in order: the arrays are used as they are.
        let first = indices[0] as usize;
        let taken = if indices.iter().enumerate().all(|(k, &i)| i as usize == first + k) {
            arrays.iter().map(|a| a.slice(first, indices.len())).collect()
        } else {
            let idx = UInt32Array::from(indices);
            arrays
                .iter()
                .map(|a| take(a.as_ref(), &idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()
                .context("take rows")?
        };
        let columns =
            RecordBatch::try_new(table.schema.clone(), taken).context(format!("build rows of {}", table.name))?;
        out.push(SinkItem::Rows(MappedRows { target: table.clone(), columns, ops, meta }));
    }
    Ok(out)
}

type Evaluated<'a> = (Vec<ArrayRef>, Option<BooleanArray>, std::borrow::Cow<'a, [Vec<usize>]>, &'a [usize]);

/// The target columns (and filter) computed from the source batch.
fn evaluate<'a>(target: &'a Target, input: &RecordBatch) -> Result<Evaluated<'a>> {
    match target {
        Target::Identity(t) => {
            let reads: Vec<Vec<usize>> = (0..t.schema.fields().len()).map(|i| vec![i]).collect();
            Ok((input.columns().to_vec(), None, std::borrow::Cow::Owned(reads), &[]))
        }
        Target::Sql(c) => {
            let n = input.num_rows();
            let mut arrays = Vec::with_capacity(c.projections.len());
            for (p, field) in c.projections.iter().zip(c.target.schema.fields()) {
                let a =
                    p.evaluate(input).and_then(|v| v.into_array(n)).context(format!("evaluate {}", field.name()))?;
                let a = if a.data_type() == field.data_type() {
                    a
                } else {
                    cast(&a, field.data_type()).context(format!("cast {}", field.name()))?
                };
                arrays.push(a);
            }
            let filter = match &c.filter {
                Some(f) => {
                    let a = f.evaluate(input).and_then(|v| v.into_array(n)).context("evaluate WHERE")?;
                    Some(
                        a.as_any()
                            .downcast_ref::<BooleanArray>()
                            .cloned()
                            .ok_or_else(|| Error::Rejected("WHERE is not boolean".into()))?,
                    )
                }
                None => None,
            };
            Ok((arrays, filter, std::borrow::Cow::Borrowed(&c.reads), &c.filter_reads))
        }
    }
}

/// The mapper actor: maps each batch for its sink, keeping order and checkpoints.
pub async fn run(
    sink: String,
    mut mapper: Mapper,
    mut input: Mailbox<Event>,
    out: Sender<SinkEvent>,
    faults: Faults,
) -> Result<()> {
    while let Some(event) = input.recv().await {
        faults.hit_async("mapper", Some(&sink)).await?;
        match event {
            Event::Data(batch) => {
                let targets = mapper.targets(&batch.schema).await?;
                let items = Mapper::map(&batch, &targets);
                metrics::counter!(m::EVENTS_TOTAL, "stage" => "mapper", "table" => batch.table.to_string())
                    .increment(batch.len() as u64);
                if !items.is_empty() {
                    out.send(SinkEvent::Items(items)).await?;
                }
            }
            Event::Checkpoint(cp) => out.send(SinkEvent::Checkpoint(cp)).await?,
            Event::SnapshotBegin { tables, .. } => {
                let mut targets = Vec::new();
                for t in &tables {
                    targets.extend(mapper.targets(t).await?.iter().map(|x| x.table().clone()));
                }
                out.send(SinkEvent::SnapshotBegin(targets)).await?;
            }
            // The fan-out keeps rewinds to itself.
            Event::Rewound => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::{Column, PgType, ReplicaIdentity};
    use arrow::array::AsArray;
    use arrow::datatypes::Int64Type;

    fn schema() -> Arc<TableSchema> {
        let col = |name: &str, pg_type: PgType, key: bool| Column { name: name.into(), pg_type, nullable: !key, key };
        Arc::new(TableSchema {
            id: TableId::new("public", "users"),
            version: 1,
            columns: vec![
                col("id", PgType::Int8, true),
                col("email", PgType::Text("text".into()), false),
                col("bio", PgType::Text("text".into()), false),
            ],
            replica_identity: ReplicaIdentity::Default,
        })
    }

    fn change(op: Op, seq: u64, before: Option<Row>, after: Option<Row>) -> Change {
        Change { op, before, after, position: Position { lsn: 10, seq }, lsn: 1, xid: 1, commit_micros: 0 }
    }

    fn row(id: i64, email: Option<&str>, bio: Value) -> Row {
        vec![Value::Int8(id), email.map_or(Value::Null, |e| Value::Text(e.into())), bio]
    }

    async fn filtered_mapper() -> (Mapper, Arc<Vec<Target>>) {
        let statements = plan::parse(
            "m.sql",
            "INSERT INTO users_email (user_id, email, bio_len) SELECT id, lower(email), length(bio) FROM public.users WHERE email IS NOT NULL",
        )
        .unwrap();
        let mut m = Mapper::new(Mapping::Sql(statements));
        let t = m.targets(&schema()).await.unwrap();
        (m, t)
    }

    fn ops(items: &[SinkItem]) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for item in items {
            match item {
                SinkItem::Rows(r) => {
                    let ids = r.columns.column(0).as_primitive::<Int64Type>();
                    for (i, op) in r.ops.iter().enumerate() {
                        let name = match op {
                            RowOp::Upsert => "upsert".to_string(),
                            RowOp::Update { unchanged } => format!("update{unchanged:?}"),
                            RowOp::Delete => "delete".to_string(),
                        };
                        out.push((name, ids.value(i)));
                    }
                }
                SinkItem::Truncate { .. } => out.push(("truncate".into(), 0)),
                SinkItem::DeadLetter(d) => out.push((format!("dead: {}", d.error), 0)),
            }
        }
        out
    }

    #[tokio::test]
    async fn filter_transitions_insert_and_delete() {
        let (_, targets) = filtered_mapper().await;
        let s = schema();
        let batch = ChangeBatch {
            table: s.id.clone(),
            schema: s.clone(),
            changes: vec![
                change(Op::Insert, 1, None, Some(row(1, Some("A@x"), Value::Text("b".into())))),
                change(Op::Insert, 2, None, Some(row(2, None, Value::Null))),
                change(Op::Update, 3, None, Some(row(2, Some("b@x"), Value::Null))),
                change(Op::Update, 4, None, Some(row(1, None, Value::Null))),
                change(Op::Delete, 5, Some(row(2, None, Value::Null)), None),
                change(Op::Truncate, 6, None, None),
                change(Op::Update, 7, None, Some(row(3, Some("c@x"), Value::Unchanged))),
            ],
            snapshot_last: false,
        };
        let items = Mapper::map(&batch, &targets);
        assert_eq!(
            ops(&items),
            vec![
                ("upsert".into(), 1),
                ("upsert".into(), 2),
                ("delete".into(), 1),
                ("delete".into(), 2),
                ("truncate".into(), 0),
                ("update[false, false, true]".into(), 3),
            ]
        );
        let SinkItem::Rows(first) = &items[0] else { panic!() };
        assert_eq!(first.columns.column(1).as_string::<i32>().value(0), "a@x");
    }

    #[tokio::test]
    async fn key_changes_delete_the_old_key_and_identity_keeps_everything() {
        let s = schema();
        let mut m = Mapper::new(Mapping::Identity);
        let targets = m.targets(&s).await.unwrap();
        let batch = ChangeBatch {
            table: s.id.clone(),
            schema: s.clone(),
            changes: vec![change(
                Op::Update,
                1,
                Some(row(1, None, Value::Null)),
                Some(row(9, Some("x"), Value::Text("y".into()))),
            )],
            snapshot_last: false,
        };
        assert_eq!(ops(&Mapper::map(&batch, &targets)), vec![("delete".into(), 1), ("upsert".into(), 9)]);
        // The same shape compiles once.
        let again = m.targets(&Arc::new(TableSchema::clone(&s))).await.unwrap();
        assert!(Arc::ptr_eq(&again, &targets));
    }

    #[tokio::test]
    async fn unconvertible_values_are_dead_lettered_alone() {
        let statements =
            plan::parse("m.sql", "INSERT INTO t (id, n) SELECT id, CAST(email AS BIGINT) FROM public.users").unwrap();
        let mut m = Mapper::new(Mapping::Sql(statements));
        let s = schema();
        let targets = m.targets(&s).await.unwrap();
        let batch = ChangeBatch {
            table: s.id.clone(),
            schema: s.clone(),
            changes: vec![
                change(Op::Insert, 1, None, Some(row(1, Some("12"), Value::Null))),
                change(Op::Insert, 2, None, Some(row(2, Some("not a number"), Value::Null))),
                change(Op::Insert, 3, None, Some(row(3, Some("7"), Value::Null))),
            ],
            snapshot_last: false,
        };
        let got = ops(&Mapper::map(&batch, &targets));
        assert_eq!(got.len(), 3);
        assert_eq!(got[0], ("upsert".into(), 1));
        assert!(got[1].0.starts_with("dead: "), "{got:?}");
        assert_eq!(got[2], ("upsert".into(), 3));
    }
}
