//! Arrow cells in PostgreSQL's binary COPY format, for the columns whose types it covers.
//!
//! The text format makes the server split every line into fields, undo the escapes and run
//! each type's input function (`int8in`, `timestamptz_in`, `numeric_in`, ...): in a catch-up
//! that was a third of the sink backend's time. In the binary format each field comes with
//! its length and in the type's send format, so the server reads it as it is. The catch
//! is that the bytes must be exactly what the *target column's* type expects, so a column
//! is written in binary only when its declared type is one of [`Cell`]'s and the Arrow
//! type is one that converts to it without loss; a COPY whose columns are not all covered
//! is sent as text ([`super::encode::copy_text`]).
//!
//! Pure functions, tested against the text format's meaning. Sentinels keep their meaning:
//! PostgreSQL's infinite dates and timestamps are `i32::MIN/MAX` and `i64::MIN/MAX`, the
//! same values the decoder gives them, so they are written as they are.

use arrow::array::{Array, ArrayRef, AsArray};
use arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, TimeUnit,
    TimestampMicrosecondType,
};

use crate::schema::{PgType, oid};
use crate::value::{MICROS_PER_DAY, PG_EPOCH_MICROS, parse_uuid};

/// The file header: signature, flags, header extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The file trailer: a tuple with -1 fields.
const TRAILER: &[u8] = &[0xff, 0xff];
/// Days from 1970-01-01 to PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_DAYS: i32 = (PG_EPOCH_MICROS / MICROS_PER_DAY) as i32;

/// A column's binary form: the target type, with the Arrow types that convert into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `numeric`, from a decimal with a scale >= 0 and at most 35 digits.
    Numeric,
    /// `text` and `varchar`: the UTF-8 bytes.
    Text,
    /// `json`: the text; `jsonb`: a version byte, then the text.
    Json,
    Jsonb,
    Bytea,
    Date,
    /// `timestamp` and `timestamptz` alike: microseconds since 2000-01-01 (UTC).
    Timestamp,
    /// From its canonical text (what the decoder produces for `uuid`).
    Uuid,
    /// A one-dimensional array of `text`, `integer` or `bigint` (the element type's OID).
    Array(u32),
}

impl Cell {
    /// The binary form for a column declared `pg_type` (as `format_type` prints it, or as
    /// sluice creates it) that receives `arrow` values; `None` when text must carry it.
    pub fn for_column(pg_type: &str, arrow: &DataType) -> Option<Cell> {
        let cell = match (PgType::from_type_name(pg_type), arrow) {
            (PgType::Bool, DataType::Boolean) => Cell::Bool,
            (PgType::Int2, DataType::Int16) => Cell::Int2,
            (PgType::Int4, DataType::Int16 | DataType::Int32) => Cell::Int4,
            (PgType::Int8, DataType::Int16 | DataType::Int32 | DataType::Int64) => Cell::Int8,
            (PgType::Float4, DataType::Float32) => Cell::Float4,
            (PgType::Float8, DataType::Float32 | DataType::Float64) => Cell::Float8,
            // Up to 35 digits, so the value scaled to whole base-10000 digits fits a u128.
            (PgType::Numeric(_), DataType::Decimal128(p, s)) if *s >= 0 && *p <= 35 => Cell::Numeric,
            (PgType::Text(name), DataType::Utf8)
                if ["text", "character varying", "varchar"].contains(&name.split('(').next().unwrap_or("").trim()) =>
            {
                Cell::Text
            }
            (PgType::Json, DataType::Utf8) => Cell::Json,
            (PgType::Jsonb, DataType::Utf8) => Cell::Jsonb,
            (PgType::Bytea, DataType::Binary) => Cell::Bytea,
            (PgType::Date, DataType::Date32) => Cell::Date,
            (PgType::Timestamp, DataType::Timestamp(TimeUnit::Microsecond, None)) => Cell::Timestamp,
            (PgType::TimestampTz, DataType::Timestamp(TimeUnit::Microsecond, Some(_))) => Cell::Timestamp,
            (PgType::Uuid, DataType::Utf8) => Cell::Uuid,
            (PgType::Array(element), DataType::List(item)) => match (*element, item.data_type()) {
                (PgType::Text(name), DataType::Utf8) if name == "text" => Cell::Array(oid::TEXT),
                (PgType::Int4, DataType::Int32) => Cell::Array(oid::INT4),
                (PgType::Int8, DataType::Int64) => Cell::Array(oid::INT8),
                _ => return None,
            },
            _ => return None,
        };
        Some(cell)
    }
}

/// Whether every cell of `columns` can be written in binary as `cells` say: only `uuid`
/// columns can fail (their text must be canonical); such a part goes as text, where the
/// server reads other spellings or reports the bad value itself.
pub fn encodable(columns: &[&ArrayRef], cells: &[Cell]) -> bool {
    columns.iter().zip(cells).all(|(a, c)| {
        *c != Cell::Uuid || {
            let s = a.as_string::<i32>();
            (0..s.len()).all(|r| s.is_null(r) || canonical_uuid(s.value(r)).is_some())
        }
    })
}

/// The rows of `columns` from `start` on in binary COPY format, whole rows only, stopping
/// after the row that brings the data to `budget` bytes; returns the data and the next
/// row. The header comes first when `start` is 0, the trailer after the last row.
/// `columns` must be [`encodable`] as `cells`.
pub fn copy_binary(columns: &[&ArrayRef], cells: &[Cell], start: usize, budget: usize) -> (Vec<u8>, usize) {
    let rows = columns.first().map_or(0, |a| a.len());
    let mut out = Vec::with_capacity(budget.min((rows - start.min(rows)) * columns.len() * 16) + HEADER.len());
    if start == 0 {
        out.extend_from_slice(HEADER);
    }
    let mut r = start;
    // At least one row, whatever the header took.
    while r < rows && (r == start || out.len() < budget) {
        out.extend_from_slice(&(columns.len() as i16).to_be_bytes());
        for (a, c) in columns.iter().zip(cells) {
            write_cell(&mut out, a, *c, r);
        }
        r += 1;
    }
    if r == rows {
        out.extend_from_slice(TRAILER);
    }
    (out, r)
}

fn field(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// An integer column's value at `row`, widened.
fn integer(array: &ArrayRef, row: usize) -> i64 {
    match array.data_type() {
        DataType::Int16 => array.as_primitive::<Int16Type>().value(row) as i64,
        DataType::Int32 => array.as_primitive::<Int32Type>().value(row) as i64,
        _ => array.as_primitive::<Int64Type>().value(row),
    }
}

fn write_cell(out: &mut Vec<u8>, array: &ArrayRef, cell: Cell, row: usize) {
    if array.is_null(row) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return;
    }
    match cell {
        Cell::Bool => field(out, &[array.as_boolean().value(row) as u8]),
        Cell::Int2 => field(out, &(integer(array, row) as i16).to_be_bytes()),
        Cell::Int4 => field(out, &(integer(array, row) as i32).to_be_bytes()),
        Cell::Int8 => field(out, &integer(array, row).to_be_bytes()),
        Cell::Float4 => field(out, &array.as_primitive::<Float32Type>().value(row).to_be_bytes()),
        Cell::Float8 => {
            let v = match array.data_type() {
                DataType::Float32 => array.as_primitive::<Float32Type>().value(row) as f64,
                _ => array.as_primitive::<Float64Type>().value(row),
            };
            field(out, &v.to_be_bytes())
        }
        Cell::Numeric => {
            let DataType::Decimal128(_, scale) = array.data_type() else { unreachable!("Cell::for_column") };
            write_numeric(out, array.as_primitive::<Decimal128Type>().value(row), *scale as u16);
        }
        Cell::Text | Cell::Json => field(out, array.as_string::<i32>().value(row).as_bytes()),
        Cell::Jsonb => {
            let text = array.as_string::<i32>().value(row).as_bytes();
            out.extend_from_slice(&(text.len() as i32 + 1).to_be_bytes());
            out.push(1);
            out.extend_from_slice(text);
        }
        Cell::Bytea => field(out, array.as_binary::<i32>().value(row)),
        Cell::Date => {
            let days = array.as_primitive::<Date32Type>().value(row);
            let days = if days == i32::MIN || days == i32::MAX { days } else { days.saturating_sub(PG_EPOCH_DAYS) };
            field(out, &days.to_be_bytes())
        }
        Cell::Timestamp => {
            let micros = array.as_primitive::<TimestampMicrosecondType>().value(row);
            let micros =
                if micros == i64::MIN || micros == i64::MAX { micros } else { micros.saturating_sub(PG_EPOCH_MICROS) };
            field(out, &micros.to_be_bytes())
        }
        Cell::Uuid => {
            let uuid = canonical_uuid(array.as_string::<i32>().value(row)).unwrap_or_default();
            field(out, &uuid.to_be_bytes())
        }
        Cell::Array(element) => write_array(out, &array.as_list::<i32>().value(row), element),
    }
}

/// An array's send format: dimensions, a has-nulls flag, the element type, then each
/// dimension's length and lower bound (1), then the elements as fields. An empty array has
/// no dimensions.
fn write_array(out: &mut Vec<u8>, values: &ArrayRef, element: u32) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let dims: i32 = if values.is_empty() { 0 } else { 1 };
    out.extend_from_slice(&dims.to_be_bytes());
    out.extend_from_slice(&i32::from(values.null_count() > 0).to_be_bytes());
    out.extend_from_slice(&element.to_be_bytes());
    if dims == 1 {
        out.extend_from_slice(&(values.len() as i32).to_be_bytes());
        out.extend_from_slice(&1i32.to_be_bytes());
    }
    let cell = match element {
        oid::TEXT => Cell::Text,
        oid::INT4 => Cell::Int4,
        _ => Cell::Int8,
    };
    for i in 0..values.len() {
        write_cell(out, values, cell, i);
    }
    let len = (out.len() - at - 4) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// `numeric`'s send format: base-10000 digits aligned on the decimal point, most
/// significant first, with the weight of the first and the display scale. Zero digits at
/// either end are allowed (the server strips them).
fn write_numeric(out: &mut Vec<u8>, value: i128, scale: u16) {
    // Scale up to whole base-10000 fractional digits: 4 decimal digits each.
    let frac_digits = scale.div_ceil(4);
    let mut magnitude = value.unsigned_abs() * 10u128.pow(u32::from(frac_digits * 4 - scale));
    let mut digits: Vec<u16> = Vec::with_capacity(10);
    while magnitude > 0 {
        digits.push((magnitude % 10_000) as u16);
        magnitude /= 10_000;
    }
    // Least significant first so far; the fractional ones must all be there.
    while digits.len() < frac_digits as usize && !digits.is_empty() {
        digits.push(0);
    }
    digits.reverse();
    let weight = digits.len() as i16 - frac_digits as i16 - 1;
    let (weight, sign) = if digits.is_empty() { (0, 0u16) } else { (weight, if value < 0 { 0x4000 } else { 0 }) };
    out.extend_from_slice(&(8 + 2 * digits.len() as i32).to_be_bytes());
    out.extend_from_slice(&(digits.len() as i16).to_be_bytes());
    out.extend_from_slice(&weight.to_be_bytes());
    out.extend_from_slice(&sign.to_be_bytes());
    out.extend_from_slice(&scale.to_be_bytes());
    for d in digits {
        out.extend_from_slice(&d.to_be_bytes());
    }
}

/// A UUID's 128 bits when its text has the canonical shape `uuid_out` prints (what the
/// decoder produces); other spellings, valid or not, go as text for the server to judge.
fn canonical_uuid(text: &str) -> Option<u128> {
    let b = text.as_bytes();
    (b.len() == 36 && [8, 13, 18, 23].iter().all(|&i| b[i] == b'-')).then(|| parse_uuid(text)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Decimal128Array, Int64Array, ListArray, StringArray, TimestampMicrosecondArray};
    use std::sync::Arc;

    fn numeric(value: i128, scale: u16) -> Vec<u8> {
        let mut out = Vec::new();
        write_numeric(&mut out, value, scale);
        out
    }

    /// ndigits, weight, sign, dscale, digits.
    fn numeric_parts(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[u16]) -> Vec<u8> {
        let mut out = (8 + 2 * digits.len() as i32).to_be_bytes().to_vec();
        for v in [ndigits as u16, weight as u16, sign, dscale].into_iter().chain(digits.iter().copied()) {
            out.extend_from_slice(&v.to_be_bytes());
        }
        out
    }

    #[test]
    fn numerics_in_base_10000() {
        assert_eq!(numeric(1250, 2), numeric_parts(2, 0, 0, 2, &[12, 5000])); // 12.50
        assert_eq!(numeric(-1, 2), numeric_parts(1, -1, 0x4000, 2, &[100])); // -0.01
        assert_eq!(numeric(0, 3), numeric_parts(0, 0, 0, 3, &[])); // 0.000
        assert_eq!(numeric(5, 8), numeric_parts(2, -1, 0, 8, &[0, 5])); // 0.00000005
        assert_eq!(numeric(123_456_789, 0), numeric_parts(3, 2, 0, 0, &[1, 2345, 6789]));
        let big = 10i128.pow(35) - 1; // 35 nines, scale 3
        let encoded = numeric(big, 3);
        assert_eq!(&encoded[4..12], &[0, 9, 0, 7, 0, 0, 0, 3]); // 9 digits, weight 7, dscale 3
    }

    #[test]
    fn only_canonical_uuids_go_binary() {
        let v = 0xa0ee_bc99_9c0b_4ef8_bb6d_6bb9_bd38_0a11u128;
        assert_eq!(canonical_uuid("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"), Some(v));
        assert_eq!(canonical_uuid("A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11"), Some(v));
        for other in [
            "{A0EEBC99-9C0B4EF8-BB6D6BB9-BD380A11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a111",
            " a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1 ",
            "g0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd38-a11",
        ] {
            assert_eq!(canonical_uuid(other), None, "{other}");
        }
    }

    #[test]
    fn cells_follow_the_declared_type() {
        assert_eq!(Cell::for_column("bigint", &DataType::Int32), Some(Cell::Int8));
        assert_eq!(Cell::for_column("integer", &DataType::Int64), None);
        assert_eq!(Cell::for_column("numeric(12,2)", &DataType::Decimal128(12, 2)), Some(Cell::Numeric));
        assert_eq!(Cell::for_column("numeric", &DataType::Decimal128(38, 2)), None);
        assert_eq!(Cell::for_column("character varying(40)", &DataType::Utf8), Some(Cell::Text));
        assert_eq!(Cell::for_column("inet", &DataType::Utf8), None);
        let tz = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
        assert_eq!(Cell::for_column("timestamp with time zone", &tz), Some(Cell::Timestamp));
        assert_eq!(Cell::for_column("timestamp without time zone", &tz), None);
    }

    #[test]
    fn rows_in_pieces_with_header() {
        let id: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None]));
        let ts: ArrayRef = Arc::new(
            TimestampMicrosecondArray::from(vec![Some(PG_EPOCH_MICROS + 5), Some(i64::MAX)]).with_timezone("UTC"),
        );
        let uuid: ArrayRef = Arc::new(StringArray::from(vec![None, Some("00000000-0000-0000-0000-0000000000ff")]));
        let dec: ArrayRef =
            Arc::new(Decimal128Array::from(vec![Some(1250), None]).with_precision_and_scale(12, 2).unwrap());
        let columns = [&id, &ts, &uuid, &dec];
        let cells = [Cell::Int8, Cell::Timestamp, Cell::Uuid, Cell::Numeric];
        assert!(encodable(&columns, &cells));
        let (all, next) = copy_binary(&columns, &cells, 0, usize::MAX);
        assert_eq!(next, 2);
        let mut expected = HEADER.to_vec();
        expected.extend_from_slice(&4i16.to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 5]);
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&numeric(1250, 2));
        expected.extend_from_slice(&4i16.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&[0, 0, 0, 8, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&16i32.to_be_bytes());
        expected.extend_from_slice(&0xffu128.to_be_bytes());
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(TRAILER);
        assert_eq!(all, expected);
        let (first, next) = copy_binary(&columns, &cells, 0, 1);
        assert_eq!(next, 1);
        let (second, next) = copy_binary(&columns, &cells, next, 1);
        assert_eq!((next, [first, second].concat()), (2, all));
        let tags: ArrayRef =
            Arc::new(ListArray::from_iter_primitive::<Int32Type, _, _>(vec![Some(vec![Some(7), None]), Some(vec![])]));
        let (arrays, _) = copy_binary(&[&tags], &[Cell::Array(oid::INT4)], 0, usize::MAX);
        let mut expected = HEADER.to_vec();
        for (tuple, fields) in [(1i16, vec![1i32, 1, 23, 2, 1, 4, 7, -1]), (1, vec![0, 0, 23])] {
            expected.extend_from_slice(&tuple.to_be_bytes());
            expected.extend_from_slice(&(4 * fields.len() as i32).to_be_bytes());
            fields.iter().for_each(|f| expected.extend_from_slice(&f.to_be_bytes()));
        }
        expected.extend_from_slice(TRAILER);
        assert_eq!(arrays, expected);
        let list = DataType::List(Arc::new(arrow::datatypes::Field::new("item", DataType::Utf8, true)));
        assert_eq!(Cell::for_column("text[]", &list), Some(Cell::Array(oid::TEXT)));
        assert_eq!(Cell::for_column("character varying[]", &list), None);
        let bad: ArrayRef = Arc::new(StringArray::from(vec![Some("not a uuid")]));
        assert!(!encodable(&[&bad], &[Cell::Uuid]));
    }
}
