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
//! A truncate drops the table's pending states and is applied in its place. A target
//! whose schema changes within the unit (a column added) starts a new segment, so every
//! step has one schema.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, new_null_array};
use arrow::compute::interleave;
use arrow::row::{OwnedRow, RowConverter, SortField};

use crate::error::{Context, Result};
use crate::mapper::plan::TargetTable;
use crate::mapper::{DeadLetter, MappedRows, RowMeta, RowOp, SinkItem};

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

type Cell = (usize, usize);
/// Rows of one update mask: for each, the cell of each column (`None`: unchanged).
type UpdateRows = Vec<(Vec<Option<Cell>>, RowMeta)>;

#[derive(Debug, Clone)]
enum State {
    Upsert(Vec<Cell>),
    Update(Vec<Option<Cell>>),
    Delete(Cell),
}

struct Segment {
    target: Arc<TargetTable>,
    converter: RowConverter,
    sources: Vec<RecordBatch>,
    metas: Vec<Vec<RowMeta>>,
    states: HashMap<OwnedRow, (State, RowMeta)>,
    order: Vec<OwnedRow>,
}

impl Segment {
    fn new(target: Arc<TargetTable>) -> Result<Self> {
        let fields = target.key.iter().map(|&k| SortField::new(target.schema.field(k).data_type().clone())).collect();
        let converter = RowConverter::new(fields).context(format!("key of {}", target.name))?;
        Ok(Self {
            target,
            converter,
            sources: Vec::new(),
            metas: Vec::new(),
            states: HashMap::new(),
            order: Vec::new(),
        })
    }

    fn add(&mut self, rows: &MappedRows) -> Result<()> {
        let src = self.sources.len();
        self.sources.push(rows.columns.clone());
        self.metas.push(rows.meta.clone());
        let keys: Vec<ArrayRef> = self.target.key.iter().map(|&k| rows.columns.column(k).clone()).collect();
        let converted = self.converter.convert_columns(&keys).context("encode keys")?;
        let width = self.target.schema.fields().len();
        for (i, op) in rows.ops.iter().enumerate() {
            let key = converted.row(i).owned();
            let meta = rows.meta[i];
            let cell = (src, i);
            let next = match (self.states.get(&key).map(|(s, _)| s), op) {
                (_, RowOp::Upsert) => State::Upsert(vec![cell; width]),
                (_, RowOp::Delete) => State::Delete(cell),
                (None, RowOp::Update { unchanged }) => {
                    State::Update(unchanged.iter().map(|u| (!u).then_some(cell)).collect())
                }
                (Some(State::Upsert(prev)), RowOp::Update { unchanged }) => {
                    State::Upsert(unchanged.iter().zip(prev).map(|(u, p)| if *u { *p } else { cell }).collect())
                }
                (Some(State::Update(prev)), RowOp::Update { unchanged }) => {
                    State::Update(unchanged.iter().zip(prev).map(|(u, p)| if *u { *p } else { Some(cell) }).collect())
                }
                (Some(State::Delete(d)), RowOp::Update { .. }) => State::Delete(*d),
            };
            if !self.states.contains_key(&key) {
                self.order.push(key.clone());
            }
            self.states.insert(key, (next, meta));
        }
        Ok(())
    }

    fn finish(self) -> Result<Option<Reduced>> {
        if self.states.is_empty() {
            return Ok(None);
        }
        let mut upserts: Vec<(Vec<Cell>, RowMeta)> = Vec::new();
        let mut updates: HashMap<Vec<bool>, UpdateRows> = HashMap::new();
        let mut update_order: Vec<Vec<bool>> = Vec::new();
        let mut deletes: Vec<(Cell, RowMeta)> = Vec::new();
        let mut states = self.states;
        for key in &self.order {
            let Some((state, meta)) = states.remove(key) else { continue };
            match state {
                State::Upsert(cells) => upserts.push((cells, meta)),
                State::Delete(cell) => deletes.push((cell, meta)),
                State::Update(cells) => {
                    let mask: Vec<bool> = cells.iter().map(Option::is_none).collect();
                    if !updates.contains_key(&mask) {
                        update_order.push(mask.clone());
                    }
                    updates.entry(mask).or_default().push((cells, meta));
                }
            }
        }
        let width = self.target.schema.fields().len();
        let column_arrays: Vec<Vec<&dyn Array>> =
            (0..width).map(|j| self.sources.iter().map(|b| b.column(j).as_ref()).collect()).collect();
        let build = |cells: &[Vec<Option<Cell>>]| -> Result<RecordBatch> {
            let mut arrays = Vec::with_capacity(width);
            for (j, field) in self.target.schema.fields().iter().enumerate() {
                let picks: Vec<Cell> = cells.iter().filter_map(|c| c[j]).collect();
                if picks.len() == cells.len() {
                    arrays.push(interleave(&column_arrays[j], &picks).context("assemble reduced rows")?);
                } else {
                    arrays.push(new_null_array(field.data_type(), cells.len()));
                }
            }
            RecordBatch::try_new(self.target.schema.clone(), arrays).context("assemble reduced rows")
        };
        let part = |rows: Vec<(Vec<Option<Cell>>, RowMeta)>| -> Result<Option<Part>> {
            if rows.is_empty() {
                return Ok(None);
            }
            let (cells, meta): (Vec<_>, Vec<_>) = rows.into_iter().unzip();
            Ok(Some(Part { rows: build(&cells)?, meta }))
        };
        let upserts = part(upserts.into_iter().map(|(c, m)| (c.into_iter().map(Some).collect(), m)).collect())?;
        let deletes = part(deletes.into_iter().map(|(c, m)| (vec![Some(c); width], m)).collect())?;
        let mut update_parts = Vec::with_capacity(update_order.len());
        for mask in update_order {
            let rows = updates.remove(&mask).unwrap_or_default();
            if let Some(p) = part(rows)? {
                update_parts.push((mask, p));
            }
        }
        Ok(Some(Reduced { target: self.target, upserts, updates: update_parts, deletes }))
    }
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
