//! Reducing a unit of mapped rows to the last state of each key, for database sinks.
//!
//! A database sink applies a unit set-based: one upsert, one delete and a few partial
//! updates per target table, instead of one statement per change. That is only correct if
//! each key appears once, in its final state, so changes to the same key are folded in
//! order:
//!
//! | state \ then | upsert   | update (some columns unchanged)          | delete |
//! |--------------|----------|------------------------------------------|--------|
//! | none         | upsert   | update                                   | delete |
//! | upsert       | upsert   | upsert, unchanged columns from the state | delete |
//! | update       | upsert   | update, columns from the newest that has | delete |
//! | delete       | upsert   | delete (the row is gone)                 | delete |
//!
//! Changes fold in position order. Items arrive in that order per source table, but the
//! WAL reader gathers a unit's changes per table, so a target fed by two source tables can
//! receive them out of order: its rows are then sorted by position (stably: the delete and
//! the insert of a key change share one position) before they fold.
//!
//! A truncate drops the table's pending states and is applied in its place. A target
//! whose schema changes within the unit (a column added) starts a new segment, so every
//! step has one schema.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow::compute::interleave;
use arrow::row::{Row, RowConverter, Rows, SortField};

use crate::error::{Context, Result};
use crate::mapper::plan::TargetTable;
use crate::mapper::{DeadLetter, MappedRows, RowMeta, RowOp, SinkItem};
use crate::message::Position;

/// Rows of one kind for one target, with where each came from.
#[derive(Debug, Clone)]
pub struct Part {
    pub rows: RecordBatch,
    pub meta: Vec<RowMeta>,
}

impl Part {
    pub fn len(&self) -> usize {
        self.meta.len()
    }

    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }

    /// The rows at `range`, for bisecting a rejected write.
    pub fn slice(&self, start: usize, len: usize) -> Part {
        Part { rows: self.rows.slice(start, len), meta: self.meta[start..start + len].to_vec() }
    }
}

/// The final state of every key of one target in a unit.
#[derive(Debug, Clone)]
pub struct Reduced {
    pub target: Arc<TargetTable>,
    pub upserts: Option<Part>,
    /// Partial updates, one part per set of unchanged columns.
    pub updates: Vec<(Vec<bool>, Part)>,
    /// Rows to delete (key columns are meaningful).
    pub deletes: Option<Part>,
}

/// One step of applying a unit, in order.
#[derive(Debug, Clone)]
pub enum Step {
    Truncate(Arc<TargetTable>, RowMeta),
    Apply(Reduced),
    DeadLetter(DeadLetter),
}

/// A value of the unit: (item, row).
type Cell = (usize, usize);

#[derive(Debug, Clone)]
enum State {
    /// Every column from one row (the common case), or column by column.
    Upsert(Cells),
    /// The columns to set (`None`: unchanged).
    Update(Vec<Option<Cell>>),
    Delete(Cell),
}

/// Rows of one update mask: the cells of each (`None`: unchanged), and where it came from.
type UpdateRows<'a> = Vec<(&'a [Option<Cell>], RowMeta)>;

#[derive(Debug, Clone)]
enum Cells {
    Row(Cell),
    Columns(Vec<Cell>),
}

impl Cells {
    fn get(&self, column: usize) -> Cell {
        match self {
            Cells::Row(c) => *c,
            Cells::Columns(cs) => cs[column],
        }
    }
}

/// The rows of one target (in one schema) in a unit.
struct Segment<'a> {
    target: Arc<TargetTable>,
    converter: RowConverter,
    items: Vec<&'a MappedRows>,
    keys: Vec<Rows>,
    /// Every row, in arrival order.
    rows: Vec<Cell>,
    /// Whether arrival order is position order so far.
    ordered: bool,
    last: Option<Position>,
}

impl<'a> Segment<'a> {
    fn new(target: Arc<TargetTable>) -> Result<Self> {
        let fields = target.key.iter().map(|&k| SortField::new(target.schema.field(k).data_type().clone())).collect();
        let converter = RowConverter::new(fields).context(format!("key of {}", target.name))?;
        Ok(Self { target, converter, items: Vec::new(), keys: Vec::new(), rows: Vec::new(), ordered: true, last: None })
    }

    fn add(&mut self, rows: &'a MappedRows) -> Result<()> {
        let item = self.items.len();
        let keys: Vec<ArrayRef> = self.target.key.iter().map(|&k| rows.columns.column(k).clone()).collect();
        self.keys.push(self.converter.convert_columns(&keys).context("encode keys")?);
        self.items.push(rows);
        for (i, m) in rows.meta.iter().enumerate() {
            self.ordered &= self.last.is_none_or(|last| last <= m.position);
            self.last = Some(m.position);
            self.rows.push((item, i));
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<Reduced>> {
        let Segment { target, items, keys, mut rows, ordered, .. } = self;
        if rows.is_empty() {
            return Ok(None);
        }
        if !ordered {
            rows.sort_by_key(|&(item, i)| items[item].meta[i].position);
        }
        // The final state of each key, in the order keys were first seen.
        let mut index: HashMap<Row<'_>, usize> = HashMap::with_capacity(rows.len());
        let mut states: Vec<(State, RowMeta)> = Vec::with_capacity(rows.len());
        for &(item, i) in &rows {
            let cell = (item, i);
            let meta = items[item].meta[i];
            let slot = match index.entry(keys[item].row(i)) {
                Entry::Occupied(e) => Some(*e.get()),
                Entry::Vacant(e) => {
                    e.insert(states.len());
                    None
                }
            };
            let prev = slot.map(|k| &states[k].0);
            let next = match (prev, &items[item].ops[i]) {
                (_, RowOp::Upsert) => State::Upsert(Cells::Row(cell)),
                (_, RowOp::Delete) => State::Delete(cell),
                (None, RowOp::Update { unchanged }) => {
                    State::Update(unchanged.iter().map(|u| (!u).then_some(cell)).collect())
                }
                (Some(State::Upsert(prev)), RowOp::Update { unchanged }) => State::Upsert(Cells::Columns(
                    unchanged.iter().enumerate().map(|(j, u)| if *u { prev.get(j) } else { cell }).collect(),
                )),
                (Some(State::Update(prev)), RowOp::Update { unchanged }) => {
                    State::Update(unchanged.iter().zip(prev).map(|(u, p)| if *u { *p } else { Some(cell) }).collect())
                }
                (Some(State::Delete(d)), RowOp::Update { .. }) => State::Delete(*d),
            };
            match slot {
                Some(k) => states[k] = (next, meta),
                None => states.push((next, meta)),
            }
        }
        drop(index);
        let mut upserts: Vec<(&Cells, RowMeta)> = Vec::new();
        let mut updates: HashMap<Vec<bool>, UpdateRows<'_>> = HashMap::new();
        let mut update_order: Vec<Vec<bool>> = Vec::new();
        let mut deletes: Vec<(Cell, RowMeta)> = Vec::new();
        for (state, meta) in &states {
            match state {
                State::Upsert(cells) => upserts.push((cells, *meta)),
                State::Delete(cell) => deletes.push((*cell, *meta)),
                State::Update(cells) => {
                    let mask: Vec<bool> = cells.iter().map(Option::is_none).collect();
                    if !updates.contains_key(&mask) {
                        update_order.push(mask.clone());
                    }
                    updates.entry(mask).or_default().push((cells, *meta));
                }
            }
        }
        let batches: Vec<&RecordBatch> = items.iter().map(|m| &m.columns).collect();
        let upserts = (!upserts.is_empty())
            .then(|| {
                let picks = |j: usize| Some(upserts.iter().map(|(c, _)| c.get(j)).collect());
                Ok::<_, crate::error::Error>(Part {
                    rows: assemble(&target, &batches, upserts.len(), picks)?,
                    meta: upserts.iter().map(|(_, m)| *m).collect(),
                })
            })
            .transpose()?;
        let deletes = (!deletes.is_empty())
            .then(|| {
                let picks = |_: usize| Some(deletes.iter().map(|(c, _)| *c).collect());
                Ok::<_, crate::error::Error>(Part {
                    rows: assemble(&target, &batches, deletes.len(), picks)?,
                    meta: deletes.iter().map(|(_, m)| *m).collect(),
                })
            })
            .transpose()?;
        let mut update_parts = Vec::with_capacity(update_order.len());
        for mask in update_order {
            let rows = updates.remove(&mask).unwrap_or_default();
            let picks = |j: usize| rows.iter().map(|(c, _)| c[j]).collect::<Option<Vec<Cell>>>();
            let part = Part {
                rows: assemble(&target, &batches, rows.len(), picks)?,
                meta: rows.iter().map(|(_, m)| *m).collect(),
            };
            update_parts.push((mask, part));
        }
        Ok(Some(Reduced { target, upserts, updates: update_parts, deletes }))
    }
}

/// A batch of `len` rows of `target`'s schema whose column `j` holds the cells `picks(j)`
/// (`None`: nulls, for columns an update leaves unchanged). Picks that are one item's rows
/// in order are sliced, not copied.
fn assemble(
    target: &TargetTable,
    batches: &[&RecordBatch],
    len: usize,
    picks: impl Fn(usize) -> Option<Vec<Cell>>,
) -> Result<RecordBatch> {
    let mut arrays = Vec::with_capacity(target.schema.fields().len());
    for (j, field) in target.schema.fields().iter().enumerate() {
        let array = match picks(j) {
            None => new_null_array(field.data_type(), len),
            Some(p) => match contiguous(&p) {
                Some((item, start)) => batches[item].column(j).slice(start, p.len()),
                None => {
                    let columns: Vec<&dyn Array> = batches.iter().map(|b| b.column(j).as_ref()).collect();
                    interleave(&columns, &p).context("assemble reduced rows")?
                }
            },
        };
        arrays.push(array);
    }
    RecordBatch::try_new(target.schema.clone(), arrays).context("assemble reduced rows")
}

/// `Some((item, first row))` when `picks` are consecutive rows of one item.
fn contiguous(picks: &[Cell]) -> Option<(usize, usize)> {
    let &(item, start) = picks.first()?;
    picks.iter().enumerate().all(|(k, &(it, row))| it == item && row == start + k).then_some((item, start))
}

/// Folds the items of a unit into steps: truncates and dead letters in place, and per
/// target one [`Reduced`] per segment.
pub fn reduce(items: &[SinkItem]) -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut segments: Vec<Segment> = Vec::new();
    for item in items {
        match item {
            SinkItem::DeadLetter(d) => steps.push(Step::DeadLetter(d.clone())),
            SinkItem::Truncate { target, meta } => {
                // Everything pending for this table is wiped by the truncate.
                segments.retain(|s| s.target.name != target.name);
                steps.push(Step::Truncate(target.clone(), *meta));
            }
            SinkItem::Rows(rows) => {
                let at = segments.iter().position(|s| s.target.name == rows.target.name);
                let same_schema = at.is_some_and(|i| {
                    let t = &segments[i].target;
                    Arc::ptr_eq(t, &rows.target) || t.as_ref() == rows.target.as_ref()
                });
                let index = match (at, same_schema) {
                    (Some(i), true) => i,
                    (Some(i), false) => {
                        let old = segments.remove(i);
                        if let Some(r) = old.finish()? {
                            steps.push(Step::Apply(r));
                        }
                        segments.push(Segment::new(rows.target.clone())?);
                        segments.len() - 1
                    }
                    (None, _) => {
                        segments.push(Segment::new(rows.target.clone())?);
                        segments.len() - 1
                    }
                };
                segments[index].add(rows)?;
            }
        }
    }
    for s in segments {
        if let Some(r) = s.finish()? {
            steps.push(Step::Apply(r));
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Op, Position};
    use crate::schema::TableId;
    use arrow::array::{AsArray, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Int64Type, Schema};

    fn target() -> Arc<TargetTable> {
        Arc::new(TargetTable {
            name: TableId::new("public", "t"),
            source: TableId::new("public", "s"),
            schema: Arc::new(Schema::new(vec![
                Field::new("id", DataType::Int64, true),
                Field::new("a", DataType::Utf8, true),
                Field::new("b", DataType::Utf8, true),
            ])),
            key: vec![0],
        })
    }

    fn meta(seq: u64) -> RowMeta {
        RowMeta { op: Op::Update, position: Position { lsn: 1, seq }, commit_micros: 0, lsn: 0, xid: 0 }
    }

    fn rows(t: &Arc<TargetTable>, data: &[(i64, Option<&str>, Option<&str>, RowOp)]) -> SinkItem {
        let ids = Int64Array::from(data.iter().map(|d| d.0).collect::<Vec<_>>());
        let a = StringArray::from(data.iter().map(|d| d.1).collect::<Vec<_>>());
        let b = StringArray::from(data.iter().map(|d| d.2).collect::<Vec<_>>());
        SinkItem::Rows(MappedRows {
            target: t.clone(),
            columns: RecordBatch::try_new(t.schema.clone(), vec![Arc::new(ids), Arc::new(a), Arc::new(b)]).unwrap(),
            ops: data.iter().map(|d| d.3.clone()).collect(),
            meta: (0..data.len() as u64).map(meta).collect(),
        })
    }

    #[test]
    fn changes_fold_to_the_last_state_per_key() {
        let t = target();
        let keep_b = RowOp::Update { unchanged: vec![false, false, true] };
        let items = vec![
            rows(&t, &[(1, Some("a1"), Some("b1"), RowOp::Upsert), (2, Some("x"), None, RowOp::Upsert)]),
            rows(&t, &[(1, Some("a2"), None, keep_b.clone()), (2, None, None, RowOp::Delete)]),
            rows(
                &t,
                &[
                    (3, Some("a3"), None, keep_b.clone()),
                    (4, None, None, RowOp::Delete),
                    (4, Some("n"), Some("m"), RowOp::Upsert),
                ],
            ),
        ];
        let steps = reduce(&items).unwrap();
        assert_eq!(steps.len(), 1);
        let Step::Apply(r) = &steps[0] else { panic!() };
        let up = r.upserts.as_ref().unwrap();
        assert_eq!(up.rows.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![1, 4]);
        // Key 1: a from the update, b kept from the earlier upsert.
        assert_eq!(up.rows.column(1).as_string::<i32>().value(0), "a2");
        assert_eq!(up.rows.column(2).as_string::<i32>().value(0), "b1");
        let del = r.deletes.as_ref().unwrap();
        assert_eq!(del.rows.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![2]);
        assert_eq!(r.updates.len(), 1);
        assert_eq!(r.updates[0].0, vec![false, false, true]);
        assert_eq!(r.updates[0].1.rows.column(0).as_primitive::<Int64Type>().value(0), 3);
    }

    #[test]
    fn rows_of_two_sources_fold_in_position_order() {
        let t = target();
        let at = |item: SinkItem, seqs: &[u64]| match item {
            SinkItem::Rows(mut r) => {
                r.meta = seqs.iter().map(|&s| meta(s)).collect();
                SinkItem::Rows(r)
            }
            other => other,
        };
        // Gathered per source table: the second source's change of key 1 sits between
        // the first source's two, but arrives after both.
        let first =
            at(rows(&t, &[(1, Some("a1"), None, RowOp::Upsert), (1, Some("a3"), None, RowOp::Upsert)]), &[1, 3]);
        let second =
            at(rows(&t, &[(1, Some("b2"), None, RowOp::Upsert), (2, Some("b4"), None, RowOp::Upsert)]), &[2, 4]);
        let steps = reduce(&[first, second]).unwrap();
        let Step::Apply(r) = &steps[0] else { panic!() };
        let up = r.upserts.as_ref().unwrap();
        assert_eq!(up.rows.column(1).as_string::<i32>().iter().collect::<Vec<_>>(), vec![Some("a3"), Some("b4")]);
        assert_eq!(up.meta.iter().map(|m| m.position.seq).collect::<Vec<_>>(), vec![3, 4]);
    }

    #[test]
    fn truncate_drops_pending_rows_and_keeps_its_place() {
        let t = target();
        let items = vec![
            rows(&t, &[(1, Some("a"), None, RowOp::Upsert)]),
            SinkItem::Truncate { target: t.clone(), meta: meta(9) },
            rows(&t, &[(2, Some("b"), None, RowOp::Upsert)]),
        ];
        let steps = reduce(&items).unwrap();
        assert!(matches!(steps[0], Step::Truncate(..)));
        let Step::Apply(r) = &steps[1] else { panic!() };
        assert_eq!(r.upserts.as_ref().unwrap().rows.column(0).as_primitive::<Int64Type>().values().to_vec(), vec![2]);
        assert_eq!(steps.len(), 2);
    }

    #[test]
    fn a_schema_change_starts_a_new_segment() {
        let t1 = target();
        let mut t2 = TargetTable::clone(&t1);
        let mut fields: Vec<Field> = t2.schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("c", DataType::Int64, true));
        t2.schema = Arc::new(Schema::new(fields));
        let t2 = Arc::new(t2);
        let second = SinkItem::Rows(MappedRows {
            target: t2.clone(),
            columns: RecordBatch::try_new(
                t2.schema.clone(),
                vec![
                    Arc::new(Int64Array::from(vec![1])),
                    Arc::new(StringArray::from(vec![Some("z")])),
                    Arc::new(StringArray::from(vec![None::<&str>])),
                    Arc::new(Int64Array::from(vec![5])),
                ],
            )
            .unwrap(),
            ops: vec![RowOp::Upsert],
            meta: vec![meta(2)],
        });
        let steps = reduce(&[rows(&t1, &[(1, Some("a"), None, RowOp::Upsert)]), second]).unwrap();
        assert_eq!(steps.len(), 2);
        let (Step::Apply(a), Step::Apply(b)) = (&steps[0], &steps[1]) else { panic!() };
        assert_eq!(a.target.schema.fields().len(), 3);
        assert_eq!(b.target.schema.fields().len(), 4);
    }
}
