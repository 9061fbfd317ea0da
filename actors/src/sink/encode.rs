//! Arrow cells as SQL values: PostgreSQL `COPY ... FROM STDIN` text format, and MySQL
//! statement parameters (binary protocol).
//!
//! Pure functions, unit-tested. Values keep their exact meaning: decimals print from their
//! scaled integers, timestamps in ISO form (UTC for time-zone aware ones), binary as hex for
//! PostgreSQL and as its bytes for MySQL, floats with the shortest exact representation
//! (MySQL receives the double itself). Arrays are PostgreSQL array literals; MySQL receives
//! them as JSON arrays.

use std::fmt::Write as _;

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type,
    IntervalMonthDayNanoType, IntervalUnit, Time64MicrosecondType, TimeUnit, TimestampMicrosecondType,
};

use mysql_async::Value as MyValue;

use crate::value::{Interval, MICROS_PER_DAY, civil_from_days, format_time};

/// Which text to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// PostgreSQL COPY text format (tab separated, backslash escapes, `\N` for NULL).
    PgCopy,
    /// The text of a MySQL statement parameter the server converts to the column's type.
    MySql,
}

/// Formats a decimal's scaled integer.
pub fn format_decimal(v: i128, scale: i8) -> String {
    if scale <= 0 {
        let zeros = "0".repeat((-scale) as usize);
        return if v == 0 { "0".to_string() } else { format!("{v}{zeros}") };
    }
    let scale = scale as usize;
    let digits = v.unsigned_abs().to_string();
    let padded =
        if digits.len() <= scale { format!("{}{digits}", "0".repeat(scale - digits.len() + 1)) } else { digits };
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{}{int}.{frac}", if v < 0 { "-" } else { "" })
}

/// PostgreSQL date input (`YYYY-MM-DD`, `... BC` before year 1), `infinity` for the extremes.
fn pg_date(days: i32) -> String {
    match days {
        i32::MAX => "infinity".into(),
        i32::MIN => "-infinity".into(),
        _ => {
            let (y, m, d) = civil_from_days(days as i64);
            if y > 0 { format!("{y:04}-{m:02}-{d:02}") } else { format!("{:04}-{m:02}-{d:02} BC", 1 - y) }
        }
    }
}

fn pg_timestamp(micros: i64, utc: bool) -> String {
    match micros {
        i64::MAX => return "infinity".into(),
        i64::MIN => return "-infinity".into(),
        _ => {}
    }
    let days = micros.div_euclid(MICROS_PER_DAY);
    let time = micros.rem_euclid(MICROS_PER_DAY);
    let date = pg_date(days as i32);
    let (date, bc) = match date.strip_suffix(" BC") {
        Some(d) => (d.to_string(), " BC"),
        None => (date, ""),
    };
    format!("{date} {}{}{bc}", format_time(time), if utc { "+00" } else { "" })
}

/// MySQL DATETIME(6) text in UTC; `None` outside the years 1000-9999 MySQL supports.
fn mysql_datetime(micros: i64) -> Option<String> {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let time = micros.rem_euclid(MICROS_PER_DAY);
    let (y, m, d) = civil_from_days(days);
    (1000..=9999).contains(&y).then(|| format!("{y:04}-{m:02}-{d:02} {}", format_time(time)))
}

/// PostgreSQL float input.
fn float_text(f: f64) -> String {
    if f.is_finite() {
        format!("{f}")
    } else if f.is_nan() {
        "NaN".into()
    } else if f > 0.0 {
        "Infinity".into()
    } else {
        "-Infinity".into()
    }
}

/// The text of one non-null cell, before dialect escaping; `None` when the dialect cannot
/// hold the value (it is written as NULL).
fn cell_text(array: &ArrayRef, row: usize, dialect: Dialect) -> Option<String> {
    Some(match array.data_type() {
        DataType::Boolean => if array.as_boolean().value(row) { "t" } else { "f" }.into(),
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row).to_string(),
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row).to_string(),
        DataType::Int64 => array.as_primitive::<Int64Type>().value(row).to_string(),
        DataType::Float32 => float_text(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => float_text(array.as_primitive::<Float64Type>().value(row)),
        DataType::Decimal128(_, s) => format_decimal(array.as_primitive::<Decimal128Type>().value(row), *s),
        DataType::Utf8 => array.as_string::<i32>().value(row).to_string(),
        DataType::Binary => {
            let bytes = array.as_binary::<i32>().value(row);
            let mut s = String::with_capacity(bytes.len() * 2 + 2);
            s.push_str("\\x");
            for b in bytes {
                let _ = write!(s, "{b:02x}");
            }
            s
        }
        DataType::Date32 => {
            let days = array.as_primitive::<Date32Type>().value(row);
            match dialect {
                Dialect::PgCopy => pg_date(days),
                Dialect::MySql => mysql_datetime(days as i64 * MICROS_PER_DAY)?[..10].to_string(),
            }
        }
        DataType::Time64(TimeUnit::Microsecond) => {
            format_time(array.as_primitive::<Time64MicrosecondType>().value(row))
        }
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            let micros = array.as_primitive::<TimestampMicrosecondType>().value(row);
            match dialect {
                Dialect::PgCopy => pg_timestamp(micros, tz.is_some()),
                Dialect::MySql => mysql_datetime(micros)?,
            }
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => {
            let v = array.as_primitive::<IntervalMonthDayNanoType>().value(row);
            Interval { months: v.months, days: v.days, micros: v.nanoseconds / 1000 }.to_string()
        }
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            let values = list.value(row);
            match dialect {
                Dialect::PgCopy => pg_array_literal(&values),
                Dialect::MySql => json_array(&values),
            }
        }
        _ => return None,
    })
}

/// `{1,NULL,"a b"}`: every element quoted except NULLs, which is always valid input.
fn pg_array_literal(values: &ArrayRef) -> String {
    let mut out = String::from("{");
    for i in 0..values.len() {
        if i > 0 {
            out.push(',');
        }
        if values.is_null(i) {
            out.push_str("NULL");
            continue;
        }
        let text = cell_text(values, i, Dialect::PgCopy).unwrap_or_default();
        out.push('"');
        for c in text.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(c);
        }
        out.push('"');
    }
    out.push('}');
    out
}

fn json_array(values: &ArrayRef) -> String {
    let items: Vec<serde_json::Value> = (0..values.len())
        .map(|i| {
            if values.is_null(i) {
                return serde_json::Value::Null;
            }
            let text = cell_text(values, i, Dialect::MySql).unwrap_or_default();
            match values.data_type() {
                DataType::Int16 | DataType::Int32 | DataType::Int64 | DataType::Float32 | DataType::Float64 => {
                    serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
                }
                DataType::Boolean => serde_json::Value::Bool(text == "1"),
                _ => serde_json::Value::String(text),
            }
        })
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// One cell as PostgreSQL prints it (unescaped); `None` for NULL.
pub fn cell_string(array: &ArrayRef, row: usize) -> Option<String> {
    if array.is_null(row) { None } else { cell_text(array, row, Dialect::PgCopy) }
}

/// Appends one cell in PostgreSQL COPY text format.
pub fn write_copy_cell(out: &mut Vec<u8>, array: &ArrayRef, row: usize) {
    if array.is_null(row) {
        out.extend_from_slice(b"\\N");
        return;
    }
    // The commonest types are written without a `String` in between.
    match array.data_type() {
        DataType::Utf8 => return write_copy_escaped(out, array.as_string::<i32>().value(row).as_bytes()),
        DataType::Int64 => return write_integer(out, array.as_primitive::<Int64Type>().value(row)),
        DataType::Int32 => return write_integer(out, array.as_primitive::<Int32Type>().value(row)),
        _ => {}
    }
    match cell_text(array, row, Dialect::PgCopy) {
        None => out.extend_from_slice(b"\\N"),
        Some(text) => write_copy_escaped(out, text.as_bytes()),
    }
}

fn write_integer(out: &mut Vec<u8>, v: impl std::fmt::Display) {
    use std::io::Write as _;
    let _ = write!(out, "{v}");
}

/// Appends `text` with COPY's backslash escapes; runs without special bytes are copied
/// at once.
fn write_copy_escaped(out: &mut Vec<u8>, text: &[u8]) {
    let mut from = 0;
    for (i, &b) in text.iter().enumerate() {
        let escape: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\t' => b"\\t",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            _ => continue,
        };
        out.extend_from_slice(&text[from..i]);
        out.extend_from_slice(escape);
        from = i + 1;
    }
    out.extend_from_slice(&text[from..]);
}

/// The rows of `columns` from `start` on as COPY text, whole rows only, stopping after the
/// row that brings the text to `budget` bytes; returns the text and the next row to write.
pub fn copy_text(columns: &[&ArrayRef], start: usize, budget: usize) -> (Vec<u8>, usize) {
    let rows = columns.first().map_or(0, |a| a.len());
    let mut out = Vec::with_capacity(budget.min((rows - start.min(rows)) * columns.len() * 12) + 64);
    let mut r = start;
    while r < rows && out.len() < budget {
        for (i, a) in columns.iter().enumerate() {
            if i > 0 {
                out.push(b'\t');
            }
            write_copy_cell(&mut out, a, r);
        }
        out.push(b'\n');
        r += 1;
    }
    (out, r)
}

/// A value MySQL cannot hold (NaN, infinity, a date outside the years 1000-9999).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0} cannot be stored in MySQL")]
pub struct Unrepresentable(pub String);

/// One cell as a MySQL statement parameter: numbers as numbers, binary as its bytes, the
/// rest as the text the server converts to the column's type (decimals, dates, times,
/// JSON); an error for a value MySQL cannot hold.
pub fn mysql_value(array: &ArrayRef, row: usize) -> Result<MyValue, Unrepresentable> {
    if array.is_null(row) {
        return Ok(MyValue::NULL);
    }
    let finite = |f: f64| if f.is_finite() { Ok(f) } else { Err(Unrepresentable(float_text(f))) };
    Ok(match array.data_type() {
        DataType::Boolean => MyValue::Int(array.as_boolean().value(row).into()),
        DataType::Int16 => MyValue::Int(array.as_primitive::<Int16Type>().value(row).into()),
        DataType::Int32 => MyValue::Int(array.as_primitive::<Int32Type>().value(row).into()),
        DataType::Int64 => MyValue::Int(array.as_primitive::<Int64Type>().value(row)),
        DataType::Float32 => MyValue::Float(finite(array.as_primitive::<Float32Type>().value(row).into())? as f32),
        DataType::Float64 => MyValue::Double(finite(array.as_primitive::<Float64Type>().value(row))?),
        DataType::Utf8 => MyValue::Bytes(array.as_string::<i32>().value(row).as_bytes().to_vec()),
        DataType::Binary => MyValue::Bytes(array.as_binary::<i32>().value(row).to_vec()),
        _ => match cell_text(array, row, Dialect::MySql) {
            Some(text) => MyValue::Bytes(text.into_bytes()),
            None => {
                return Err(Unrepresentable(
                    cell_text(array, row, Dialect::PgCopy).unwrap_or_else(|| format!("a {} value", array.data_type())),
                ));
            }
        },
    })
}

/// One row as a JSON object of its cells' text, for dead letters.
pub fn row_json(batch: &arrow::array::RecordBatch, row: usize) -> String {
    let mut map = serde_json::Map::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        let value = if array.is_null(row) {
            serde_json::Value::Null
        } else {
            cell_text(array, row, Dialect::PgCopy).map_or(serde_json::Value::Null, serde_json::Value::String)
        };
        map.insert(field.name().clone(), value);
    }
    serde_json::Value::Object(map).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{
        BinaryArray, BooleanArray, Date32Array, Decimal128Array, Float64Array, Int32Array, ListArray, StringArray,
        TimestampMicrosecondArray,
    };
    use std::sync::Arc;

    #[test]
    fn decimals_format() {
        assert_eq!(format_decimal(1250, 2), "12.50");
        assert_eq!(format_decimal(-1, 2), "-0.01");
        assert_eq!(format_decimal(5, 0), "5");
        assert_eq!(format_decimal(5, -2), "500");
        assert_eq!(format_decimal(0, 3), "0.000");
    }

    #[test]
    fn copy_text_escapes_and_formats() {
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("a\tb\\c\nd"), None]));
        let ts: ArrayRef =
            Arc::new(TimestampMicrosecondArray::from(vec![Some(1_500_000), Some(i64::MAX)]).with_timezone("UTC"));
        let bin: ArrayRef = Arc::new(BinaryArray::from(vec![Some(&[0u8, 255][..]), Some(&[][..])]));
        let dec: ArrayRef =
            Arc::new(Decimal128Array::from(vec![Some(1234), None]).with_precision_and_scale(10, 2).unwrap());
        let (out, next) = copy_text(&[&text, &ts, &bin, &dec], 0, usize::MAX);
        assert_eq!(next, 2);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "a\\tb\\\\c\\nd\t1970-01-01 00:00:01.500000+00\t\\\\x00ff\t12.34\n\\N\tinfinity\t\\\\x\t\\N\n"
        );
        // A budget ends the text after the row that reaches it, and the rest follows.
        let (first, next) = copy_text(&[&text, &ts, &bin, &dec], 0, 1);
        assert_eq!(next, 1);
        let (second, next) = copy_text(&[&text, &ts, &bin, &dec], next, 1);
        assert_eq!((next, [first, second].concat()), (2, copy_text(&[&text, &ts, &bin, &dec], 0, usize::MAX).0));
        assert_eq!(copy_text(&[&text], 2, 1), (Vec::new(), 2));
    }

    #[test]
    fn dates_before_year_one_are_bc() {
        let d: ArrayRef = Arc::new(Date32Array::from(vec![-719_893]));
        let mut out = Vec::new();
        write_copy_cell(&mut out, &d, 0);
        assert!(String::from_utf8(out).unwrap().ends_with(" BC"));
    }

    #[test]
    fn arrays_are_pg_literals_and_json_for_mysql() {
        let list: ArrayRef =
            Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![Some(vec![Some(1), None])]));
        let mut out = Vec::new();
        write_copy_cell(&mut out, &list, 0);
        assert_eq!(String::from_utf8(out).unwrap(), "{\"1\",NULL}");
        assert_eq!(mysql_value(&list, 0), Ok(MyValue::Bytes(b"[1,null]".to_vec())));
    }

    #[test]
    fn mysql_values_keep_their_type() {
        let text: ArrayRef = Arc::new(StringArray::from(vec![Some("it's \\ ok"), None]));
        let b: ArrayRef = Arc::new(BooleanArray::from(vec![true]));
        let i: ArrayRef = Arc::new(Int32Array::from(vec![-5]));
        let bin: ArrayRef = Arc::new(BinaryArray::from(vec![&[1u8, 255][..]]));
        let dec: ArrayRef = Arc::new(Decimal128Array::from(vec![-1]).with_precision_and_scale(10, 2).unwrap());
        let day: ArrayRef = Arc::new(Date32Array::from(vec![1]));
        let values: Vec<MyValue> =
            [&text, &b, &i, &bin, &dec, &day].iter().map(|a| mysql_value(a, 0).unwrap()).collect();
        assert_eq!(
            values,
            [
                MyValue::Bytes(b"it's \\ ok".to_vec()),
                MyValue::Int(1),
                MyValue::Int(-5),
                MyValue::Bytes(vec![1, 255]),
                MyValue::Bytes(b"-0.01".to_vec()),
                MyValue::Bytes(b"1970-01-02".to_vec()),
            ]
        );
        assert_eq!(mysql_value(&text, 1), Ok(MyValue::NULL));
        let f: ArrayRef = Arc::new(Float64Array::from(vec![f64::NAN, 0.1]));
        assert_eq!(mysql_value(&f, 0), Err(Unrepresentable("NaN".into())));
        assert_eq!(mysql_value(&f, 1), Ok(MyValue::Double(0.1)));
        let far: ArrayRef = Arc::new(TimestampMicrosecondArray::from(vec![i64::MAX]));
        assert!(mysql_value(&far, 0).is_err());
    }
}
