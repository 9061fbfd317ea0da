//! Rows of [`Value`]s to Arrow arrays, column by column.
//!
//! A value that its column's Arrow type cannot hold (a `NaN` numeric in a `Decimal128`, a
//! nested array) does not fail the batch: its row is reported with the reason, so the
//! change can be dead-lettered while the others go on. [`Value::Unchanged`] becomes NULL
//! here; callers keep track of it separately.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryBuilder, BooleanBuilder, Date32Builder, Decimal128Builder, Float32Builder, Float64Builder,
    Int16Builder, Int32Builder, Int64Builder, IntervalMonthDayNanoBuilder, ListArray, StringBuilder,
    Time64MicrosecondBuilder, TimestampMicrosecondBuilder, new_null_array,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, IntervalMonthDayNano};

use crate::schema::PgType;
use crate::value::{Value, format_uuid};

/// Rows (by index into the input) whose value could not be converted, with the reason.
pub type Failures = Vec<(usize, String)>;

/// Builds the Arrow array of one column from `cells` (one per row).
pub fn column(pg_type: &PgType, cells: &[&Value], failures: &mut Failures) -> ArrayRef {
    let n = cells.len();
    let mut fail =
        |row: usize, what: &dyn std::fmt::Display| failures.push((row, format!("{} value {what}", pg_type.name())));
    macro_rules! build {
        ($builder:expr, $($pat:pat => $val:expr),+) => {{
            let mut b = $builder;
            for (row, v) in cells.iter().enumerate() {
                match v {
                    Value::Null | Value::Unchanged => b.append_null(),
                    $($pat => b.append_value($val),)+
                    other => {
                        fail(row, &format!("{other:?} does not match the column type"));
                        b.append_null();
                    }
                }
            }
            Arc::new(b.finish()) as ArrayRef
        }};
    }
    match pg_type {
        PgType::Bool => build!(BooleanBuilder::with_capacity(n), Value::Bool(x) => *x),
        PgType::Int2 => build!(Int16Builder::with_capacity(n), Value::Int2(x) => *x),
        PgType::Int4 => build!(Int32Builder::with_capacity(n), Value::Int4(x) => *x),
        PgType::Int8 => build!(Int64Builder::with_capacity(n), Value::Int8(x) => *x),
        PgType::Float4 => build!(Float32Builder::with_capacity(n), Value::Float4(x) => *x),
        PgType::Float8 => build!(Float64Builder::with_capacity(n), Value::Float8(x) => *x),
        PgType::Numeric(_) => match pg_type.arrow_type() {
            DataType::Decimal128(p, s) => {
                let mut b = Decimal128Builder::with_capacity(n);
                for (row, v) in cells.iter().enumerate() {
                    match v {
                        Value::Numeric(text) => match parse_decimal(text, p, s) {
                            Some(x) => b.append_value(x),
                            None => {
                                fail(row, &format!("{text:?} does not fit numeric({p},{s})"));
                                b.append_null();
                            }
                        },
                        _ => b.append_null(),
                    }
                }
                Arc::new(b.finish().with_precision_and_scale(p, s).expect("precision checked by arrow_type"))
                    as ArrayRef
            }
            _ => build!(StringBuilder::with_capacity(n, n * 8), Value::Numeric(x) => x.as_str()),
        },
        PgType::Text(_) | PgType::Json | PgType::Jsonb => {
            build!(StringBuilder::with_capacity(n, n * 16), Value::Text(x) => x.as_str(), Value::Json(x) => x.as_str())
        }
        PgType::Uuid => build!(StringBuilder::with_capacity(n, n * 36), Value::Uuid(x) => format_uuid(*x)),
        PgType::Bytea => build!(BinaryBuilder::with_capacity(n, n * 16), Value::Bytes(x) => x.as_slice()),
        PgType::Date => build!(Date32Builder::with_capacity(n), Value::Date(x) => *x),
        PgType::Time => build!(Time64MicrosecondBuilder::with_capacity(n), Value::Time(x) => *x),
        PgType::Timestamp => build!(TimestampMicrosecondBuilder::with_capacity(n), Value::Timestamp(x) => *x),
        PgType::TimestampTz => {
            let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
            for (row, v) in cells.iter().enumerate() {
                match v {
                    Value::TimestampTz(x) => b.append_value(*x),
                    Value::Null | Value::Unchanged => b.append_null(),
                    other => {
                        fail(row, &format!("{other:?} does not match the column type"));
                        b.append_null();
                    }
                }
            }
            Arc::new(b.finish())
        }
        PgType::Interval => build!(
            IntervalMonthDayNanoBuilder::with_capacity(n),
            Value::Interval(i) => IntervalMonthDayNano::new(i.months, i.days, i.micros.saturating_mul(1000))
        ),
        PgType::Array(elem) => list(elem, cells, failures),
    }
}

fn list(elem: &PgType, cells: &[&Value], failures: &mut Failures) -> ArrayRef {
    let mut offsets = Vec::with_capacity(cells.len() + 1);
    offsets.push(0i32);
    let mut valid = Vec::with_capacity(cells.len());
    let mut children: Vec<&Value> = Vec::new();
    let mut owners: Vec<usize> = Vec::new();
    for (row, v) in cells.iter().enumerate() {
        match v {
            Value::Array(items) if items.iter().any(|i| matches!(i, Value::Array(_))) => {
                failures.push((row, "multi-dimensional arrays are not supported".into()));
                valid.push(false);
            }
            Value::Array(items) => {
                children.extend(items.iter());
                owners.extend(std::iter::repeat_n(row, items.len()));
                valid.push(true);
            }
            _ => valid.push(false),
        }
        offsets.push(children.len() as i32);
    }
    let mut child_failures = Vec::new();
    let values = column(elem, &children, &mut child_failures);
    failures.extend(child_failures.into_iter().map(|(i, e)| (owners[i], e)));
    let field = Arc::new(Field::new("item", elem.arrow_type(), true));
    let nulls = NullBuffer::from(valid);
    match ListArray::try_new(field.clone(), OffsetBuffer::new(offsets.into()), values, Some(nulls)) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            failures.extend((0..cells.len()).map(|r| (r, e.to_string())));
            new_null_array(&DataType::List(field), cells.len())
        }
    }
}

/// Parses exact decimal text into an `i128` scaled by `scale`, within `precision` digits.
pub fn parse_decimal(text: &str, precision: u8, scale: i8) -> Option<i128> {
    let (negative, body) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let scale = scale.max(0) as usize;
    if frac.len() > scale && frac[scale..].bytes().any(|b| b != b'0') {
        return None;
    }
    let mut digits = String::with_capacity(int.len() + scale);
    digits.push_str(int.trim_start_matches('0'));
    let frac_used = &frac[..frac.len().min(scale)];
    digits.push_str(frac_used);
    digits.extend(std::iter::repeat_n('0', scale - frac_used.len()));
    let significant = digits.trim_start_matches('0');
    if significant.len() > precision as usize {
        return None;
    }
    let v: i128 = if significant.is_empty() { 0 } else { significant.parse().ok()? };
    Some(if negative { -v } else { v })
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int32Type};

    #[test]
    fn decimals_parse_exactly() {
        assert_eq!(parse_decimal("12.50", 12, 2), Some(1250));
        assert_eq!(parse_decimal("-0.01", 12, 2), Some(-1));
        assert_eq!(parse_decimal("7", 5, 2), Some(700));
        assert_eq!(parse_decimal("1.235", 12, 2), None);
        assert_eq!(parse_decimal("1.230", 12, 2), Some(123));
        assert_eq!(parse_decimal("1000", 3, 0), None);
        assert_eq!(parse_decimal("NaN", 12, 2), None);
        assert_eq!(parse_decimal("", 12, 2), None);
    }

    #[test]
    fn columns_build_with_failures_reported() {
        let cells = [Value::Numeric("1.5".into()), Value::Null, Value::Numeric("NaN".into()), Value::Unchanged];
        let refs: Vec<&Value> = cells.iter().collect();
        let mut failures = Vec::new();
        let a = column(&PgType::Numeric(Some((10, 2))), &refs, &mut failures);
        let d = a.as_primitive::<Decimal128Type>();
        assert_eq!(d.value(0), 150);
        assert!(d.is_null(1) && d.is_null(2) && d.is_null(3));
        assert_eq!(failures.len(), 1);
        assert_eq!(failures[0].0, 2);
    }

    #[test]
    fn lists_build() {
        let cells = [
            Value::Array(vec![Value::Int4(1), Value::Null]),
            Value::Null,
            Value::Array(vec![]),
            Value::Array(vec![Value::Array(vec![Value::Int4(1)])]),
        ];
        let refs: Vec<&Value> = cells.iter().collect();
        let mut failures = Vec::new();
        let a = column(&PgType::Array(Box::new(PgType::Int4)), &refs, &mut failures);
        let l = a.as_list::<i32>();
        assert_eq!(l.len(), 4);
        assert_eq!(l.value(0).as_primitive::<Int32Type>().values().to_vec(), vec![1, 0]);
        assert!(l.is_null(1));
        assert_eq!(l.value(2).len(), 0);
        assert_eq!(failures.iter().map(|f| f.0).collect::<Vec<_>>(), vec![3]);
    }
}
