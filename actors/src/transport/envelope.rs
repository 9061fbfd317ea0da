//! The Debezium envelope: sluice's changes as JSON and back (SPEC.md "Events on Kafka").
//!
//! Encodings follow Debezium's PostgreSQL connector with `decimal.handling.mode=string`,
//! `time.precision.mode=adaptive_time_microseconds`, `binary.handling.mode=bytes` and the
//! JSON converter with schemas disabled: numeric as string, date as days since the epoch,
//! time and timestamp as microseconds, timestamptz as an ISO-8601 string in UTC, interval as
//! microseconds (Debezium's `MicroDuration`), uuid and json as strings, bytea as base64,
//! arrays as JSON arrays. An unchanged TOAST value is Debezium's placeholder, which
//! [`decode_value`] turns back into [`Value::Unchanged`], so no sink ever writes it.
//!
//! The encoder writes JSON text directly (it is on the producer's hot path); the decoder
//! goes through `serde_json::Value` and accepts both sluice's and Debezium's output.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::Value as Json;

use crate::message::{Change, Op};
use crate::schema::{PgType, TableSchema};
use crate::value::{Interval, MICROS_PER_DAY, Value, format_timestamp, format_uuid, parse_uuid};

/// Debezium's `unavailable.value.placeholder`.
pub const UNAVAILABLE: &str = "__debezium_unavailable_value";

/// What the `source` block says besides the change itself.
#[derive(Debug, Clone)]
pub struct SourceInfo<'a> {
    /// `name`: the logical server name, sluice's topic prefix.
    pub name: &'a str,
    pub db: &'a str,
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json escapes exactly as JSON requires; writing into a String cannot fail.
    let _ = serde_json::to_writer(string_writer(out), s);
}

/// An `io::Write` over a `String` that only ever receives valid UTF-8 (serde_json output).
fn string_writer(out: &mut String) -> impl std::io::Write + '_ {
    struct W<'a>(&'a mut String);
    impl std::io::Write for W<'_> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.push_str(std::str::from_utf8(buf).map_err(std::io::Error::other)?);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    W(out)
}

fn push_float(out: &mut String, f: f64) {
    if f.is_finite() {
        let _ = write!(out, "{f}");
    } else if f.is_nan() {
        out.push_str("\"NaN\"");
    } else if f > 0.0 {
        out.push_str("\"Infinity\"");
    } else {
        out.push_str("\"-Infinity\"");
    }
}

/// ISO-8601 UTC with the fraction trimmed, as Debezium's `ZonedTimestamp`.
pub fn format_zoned(micros: i64) -> String {
    let s = format_timestamp(micros, 'T');
    let s = match s.split_once('.') {
        Some((whole, frac)) => {
            let frac = frac.trim_end_matches('0');
            if frac.is_empty() { whole.to_string() } else { format!("{whole}.{frac}") }
        }
        None => s,
    };
    format!("{s}Z")
}

/// Writes one value in Debezium's encoding.
pub fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Unchanged => push_json_str(out, UNAVAILABLE),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int2(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Int4(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Int8(i) => {
            let _ = write!(out, "{i}");
        }
        Value::Float4(f) => push_float(out, *f as f64),
        Value::Float8(f) => push_float(out, *f),
        Value::Numeric(s) | Value::Text(s) | Value::Json(s) => push_json_str(out, s),
        Value::Bytes(b) => push_json_str(out, &BASE64.encode(b)),
        Value::Date(d) => {
            let _ = write!(out, "{d}");
        }
        Value::Time(t) | Value::Timestamp(t) => {
            let _ = write!(out, "{t}");
        }
        Value::TimestampTz(t) => push_json_str(out, &format_zoned(*t)),
        Value::Interval(i) => push_json_str(out, &i.to_string()),
        Value::Uuid(u) => push_json_str(out, &format_uuid(*u)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(out, item);
            }
            out.push(']');
        }
    }
}

/// Writes `{"col": value, ...}` for the columns selected by `include`.
pub fn write_row(out: &mut String, schema: &TableSchema, row: &[Value], include: impl Fn(usize) -> bool) {
    out.push('{');
    let mut first = true;
    for (i, (column, value)) in schema.columns.iter().zip(row).enumerate() {
        if !include(i) {
            continue;
        }
        if !first {
            out.push(',');
        }
        first = false;
        push_json_str(out, &column.name);
        out.push(':');
        write_value(out, value);
    }
    out.push('}');
}

/// The message key: the primary-key columns of the row the change is about.
pub fn encode_key(schema: &TableSchema, change: &Change) -> Option<String> {
    let row = change.after.as_ref().or(change.before.as_ref())?;
    let mut out = String::with_capacity(32);
    write_row(&mut out, schema, row, |i| schema.columns[i].key);
    Some(out)
}

/// The message value: the envelope of one change. `snapshot` is `"true"`, `"false"` or
/// `"last"`; `now_ms` is when sluice processed it.
pub fn encode_envelope(
    schema: &TableSchema,
    change: &Change,
    source: &SourceInfo,
    snapshot: &str,
    now_ms: i64,
) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("{\"before\":");
    match &change.before {
        Some(b) => write_row(&mut out, schema, b, |_| true),
        None => out.push_str("null"),
    }
    out.push_str(",\"after\":");
    match &change.after {
        Some(a) => write_row(&mut out, schema, a, |_| true),
        None => out.push_str("null"),
    }
    out.push_str(",\"source\":{\"connector\":\"postgresql\",\"name\":");
    push_json_str(&mut out, source.name);
    out.push_str(",\"db\":");
    push_json_str(&mut out, source.db);
    out.push_str(",\"schema\":");
    push_json_str(&mut out, &schema.id.schema);
    out.push_str(",\"table\":");
    push_json_str(&mut out, &schema.id.name);
    let txid = if change.xid == 0 { "null".to_string() } else { change.xid.to_string() };
    let _ = write!(
        out,
        ",\"txId\":{txid},\"lsn\":{},\"ts_ms\":{},\"snapshot\":\"{snapshot}\"}},\"op\":\"{}\",\"ts_ms\":{now_ms}}}",
        if change.lsn == 0 { "null".to_string() } else { change.lsn.to_string() },
        change.commit_micros.div_euclid(1000),
        change.op.code(),
    );
    out
}

/// A value that does not decode as its column's type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("column {column}: cannot decode {json} as {type_name}")]
pub struct JsonDecodeError {
    pub column: String,
    pub json: String,
    pub type_name: String,
}

/// Decodes one value encoded as above (also Debezium's own output with the same settings).
pub fn decode_value(json: &Json, pg_type: &PgType) -> Option<Value> {
    if json.is_null() {
        return Some(Value::Null);
    }
    if json.as_str() == Some(UNAVAILABLE) {
        return Some(Value::Unchanged);
    }
    let float = |j: &Json| -> Option<f64> {
        match j {
            Json::Number(n) => n.as_f64(),
            Json::String(s) => match s.as_str() {
                "NaN" => Some(f64::NAN),
                "Infinity" => Some(f64::INFINITY),
                "-Infinity" => Some(f64::NEG_INFINITY),
                _ => None,
            },
            _ => None,
        }
    };
    Some(match pg_type {
        PgType::Bool => Value::Bool(json.as_bool()?),
        PgType::Int2 => Value::Int2(i16::try_from(json.as_i64()?).ok()?),
        PgType::Int4 => Value::Int4(i32::try_from(json.as_i64()?).ok()?),
        PgType::Int8 => Value::Int8(json.as_i64()?),
        PgType::Float4 => Value::Float4(float(json)? as f32),
        PgType::Float8 => Value::Float8(float(json)?),
        PgType::Numeric(_) => match json {
            Json::String(s) if crate::pgtext::is_numeric_text(s) => Value::Numeric(s.clone()),
            Json::Number(n) => Value::Numeric(n.to_string()),
            _ => return None,
        },
        PgType::Text(_) => Value::Text(json.as_str()?.to_string()),
        PgType::Json | PgType::Jsonb => match json {
            Json::String(s) => Value::Json(s.clone()),
            other => Value::Json(other.to_string()),
        },
        PgType::Bytea => {
            let s = json.as_str()?;
            if s == BASE64.encode(UNAVAILABLE) { Value::Unchanged } else { Value::Bytes(BASE64.decode(s).ok()?) }
        }
        PgType::Date => Value::Date(i32::try_from(json.as_i64()?).ok()?),
        PgType::Time => Value::Time(json.as_i64()?),
        PgType::Timestamp => Value::Timestamp(json.as_i64()?),
        PgType::TimestampTz => Value::TimestampTz(parse_zoned(json.as_str()?)?),
        PgType::Interval => match json {
            Json::Number(n) => Value::Interval(Interval { months: 0, days: 0, micros: n.as_i64()? }),
            Json::String(s) => match crate::pgtext::decode(&PgType::Interval, s).ok()? {
                v @ Value::Interval(_) => v,
                _ => return None,
            },
            _ => return None,
        },
        PgType::Uuid => Value::Uuid(parse_uuid(json.as_str()?)?),
        PgType::Array(elem) => {
            Value::Array(json.as_array()?.iter().map(|j| decode_value(j, elem)).collect::<Option<Vec<_>>>()?)
        }
    })
}

/// Parses `2024-01-15T10:30:00.123456Z` (or with an offset) into epoch microseconds.
pub fn parse_zoned(s: &str) -> Option<i64> {
    let s = s.trim();
    let (body, offset_secs) = if let Some(b) = s.strip_suffix('Z') {
        (b, 0)
    } else {
        let at = s.rfind(['+', '-']).filter(|&i| i > 10)?;
        let sign = if &s[at..at + 1] == "-" { -1 } else { 1 };
        let mut secs = 0i64;
        for (i, part) in s[at + 1..].split(':').enumerate() {
            secs += part.parse::<i64>().ok()? * [3600, 60, 1].get(i)?;
        }
        (&s[..at], sign * secs)
    };
    let (date, time) = body.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let (y, m, dd): (i64, u32, u32) = (d.next()?.parse().ok()?, d.next()?.parse().ok()?, d.next()?.parse().ok()?);
    let days = crate::value::days_from_civil(y, m, dd);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec): (i64, i64, i64) =
        (t.next()?.parse().ok()?, t.next()?.parse().ok()?, t.next().unwrap_or("0").parse().ok()?);
    let frac_digits: String = frac.chars().take(6).collect();
    let micros_frac = if frac_digits.is_empty() {
        0
    } else {
        frac_digits.parse::<i64>().ok()? * 10i64.pow(6 - frac_digits.len() as u32)
    };
    Some(days * MICROS_PER_DAY + (h * 3600 + mi * 60 + sec) * 1_000_000 + micros_frac - offset_secs * 1_000_000)
}

/// A change decoded from an envelope, with the table it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEnvelope {
    pub schema_name: String,
    pub table: String,
    pub op: Op,
    pub before: Option<serde_json::Map<String, Json>>,
    pub after: Option<serde_json::Map<String, Json>>,
    pub lsn: u64,
    pub xid: u32,
    /// Commit time in microseconds (`source.ts_ms` * 1000).
    pub commit_micros: i64,
    pub snapshot: String,
}

/// Parses an envelope's JSON (sluice's or Debezium's, schemas disabled or enabled).
pub fn parse_envelope(bytes: &[u8]) -> Result<DecodedEnvelope, String> {
    let mut json: Json = serde_json::from_slice(bytes).map_err(|e| format!("not JSON: {e}"))?;
    // With schemas enabled the envelope sits under "payload".
    if json.get("payload").is_some() && json.get("schema").is_some() {
        json = json["payload"].take();
    }
    let op = json.get("op").and_then(Json::as_str).and_then(Op::from_code).ok_or("missing or unknown \"op\"")?;
    let source = json.get("source").ok_or("missing \"source\"")?;
    let text = |k: &str| source.get(k).and_then(Json::as_str).map(str::to_string);
    let number = |k: &str| source.get(k).and_then(|v| v.as_u64().or_else(|| v.as_str().and_then(|s| s.parse().ok())));
    let row = |k: &str| json.get(k).and_then(Json::as_object).cloned();
    Ok(DecodedEnvelope {
        schema_name: text("schema").ok_or("missing source.schema")?,
        table: text("table").ok_or("missing source.table")?,
        op,
        before: row("before"),
        after: row("after"),
        lsn: number("lsn").unwrap_or(0),
        xid: number("txId").unwrap_or(0) as u32,
        commit_micros: source.get("ts_ms").and_then(Json::as_i64).unwrap_or(0) * 1000,
        snapshot: match source.get("snapshot") {
            Some(Json::String(s)) => s.clone(),
            Some(Json::Bool(b)) => b.to_string(),
            _ => "false".to_string(),
        },
    })
}

/// Decodes a row object with the table's schema. Columns the object lacks are NULL.
pub fn decode_row(schema: &TableSchema, object: &serde_json::Map<String, Json>) -> Result<Vec<Value>, JsonDecodeError> {
    schema
        .columns
        .iter()
        .map(|c| match object.get(&c.name) {
            None => Ok(Value::Null),
            Some(j) => decode_value(j, &c.pg_type).ok_or_else(|| JsonDecodeError {
                column: c.name.clone(),
                json: j.to_string().chars().take(64).collect(),
                type_name: c.pg_type.name(),
            }),
        })
        .collect()
}

/// A change as JSON, for dead letters and logs of rejected rows.
pub fn change_json(schema: &TableSchema, change: &Change) -> String {
    encode_envelope(schema, change, &SourceInfo { name: "sluice", db: "" }, "false", change.commit_micros / 1000)
}

/// The `sluice.schema` header: the table's schema as compact JSON, so a consumer decodes
/// values with their exact types (the envelope itself is schemaless).
pub fn schema_header(schema: &TableSchema) -> Vec<u8> {
    let columns: Vec<Json> = schema
        .columns
        .iter()
        .map(|c| serde_json::json!({ "name": c.name, "type": c.pg_type.name(), "key": c.key, "nullable": c.nullable }))
        .collect();
    let identity = match schema.replica_identity {
        crate::schema::ReplicaIdentity::Default => "d",
        crate::schema::ReplicaIdentity::Full => "f",
        crate::schema::ReplicaIdentity::Index => "i",
        crate::schema::ReplicaIdentity::Nothing => "n",
    };
    serde_json::json!({
        "schema": schema.id.schema, "table": schema.id.name, "version": schema.version, "identity": identity, "columns": columns,
    })
    .to_string()
    .into_bytes()
}

/// Reads a `sluice.schema` header back.
pub fn parse_schema_header(bytes: &[u8]) -> Result<TableSchema, String> {
    let j: Json = serde_json::from_slice(bytes).map_err(|e| format!("bad schema header: {e}"))?;
    let text = |v: &Json, k: &str| {
        v.get(k).and_then(Json::as_str).map(str::to_string).ok_or(format!("schema header lacks {k}"))
    };
    let columns = j
        .get("columns")
        .and_then(Json::as_array)
        .ok_or("schema header lacks columns")?
        .iter()
        .map(|c| {
            Ok(crate::schema::Column {
                name: text(c, "name")?,
                pg_type: PgType::from_type_name(&text(c, "type")?),
                key: c.get("key").and_then(Json::as_bool).unwrap_or(false),
                nullable: c.get("nullable").and_then(Json::as_bool).unwrap_or(true),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let identity = text(&j, "identity").unwrap_or_else(|_| "d".into());
    Ok(TableSchema {
        id: crate::schema::TableId::new(text(&j, "schema")?, text(&j, "table")?),
        version: j.get("version").and_then(Json::as_u64).unwrap_or(1) as u32,
        columns,
        replica_identity: crate::schema::ReplicaIdentity::from_code(identity.as_bytes()[0])
            .unwrap_or(crate::schema::ReplicaIdentity::Default),
    })
}

/// The `sluice.pos` header: the change's source position (`lsn/seq`).
pub fn position_header(p: crate::message::Position) -> String {
    format!("{}/{}", p.lsn, p.seq)
}

pub fn parse_position_header(bytes: &[u8]) -> Option<crate::message::Position> {
    let s = std::str::from_utf8(bytes).ok()?;
    let (lsn, seq) = s.split_once('/')?;
    Some(crate::message::Position { lsn: lsn.parse().ok()?, seq: seq.parse().ok()? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::Position;
    use crate::schema::{Column, ReplicaIdentity, TableId};

    fn schema() -> TableSchema {
        let col = |name: &str, pg_type: PgType, key: bool| Column { name: name.into(), pg_type, nullable: true, key };
        TableSchema {
            id: TableId::new("public", "t"),
            version: 1,
            columns: vec![
                col("id", PgType::Int4, true),
                col("n", PgType::Numeric(Some((10, 2))), false),
                col("d", PgType::Date, false),
                col("ts", PgType::Timestamp, false),
                col("tz", PgType::TimestampTz, false),
                col("b", PgType::Bytea, false),
                col("u", PgType::Uuid, false),
                col("j", PgType::Jsonb, false),
                col("a", PgType::Array(Box::new(PgType::Text("text".into()))), false),
                col("f", PgType::Float8, false),
                col("big", PgType::Text("text".into()), false),
            ],
            replica_identity: ReplicaIdentity::Default,
        }
    }

    fn row() -> Vec<Value> {
        vec![
            Value::Int4(1),
            Value::Numeric("12.50".into()),
            Value::Date(19_000),
            Value::Timestamp(1_700_000_000_123_456),
            Value::TimestampTz(1_700_000_000_120_000),
            Value::Bytes(vec![0, 1, 2]),
            Value::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11),
            Value::Json("{\"k\": [1, 2]}".into()),
            Value::Array(vec![Value::Text("x".into()), Value::Null]),
            Value::Float8(f64::NAN),
            Value::Unchanged,
        ]
    }

    #[test]
    fn envelopes_encode_debezium_style_and_decode_back() {
        let s = schema();
        let change = Change {
            op: Op::Update,
            before: None,
            after: Some(row()),
            position: Position { lsn: 100, seq: 1 },
            lsn: 99,
            xid: 7,
            commit_micros: 1_700_000_000_000_000,
        };
        let text = encode_envelope(&s, &change, &SourceInfo { name: "sluice", db: "app" }, "false", 5);
        let json: Json = serde_json::from_str(&text).unwrap();
        let after = &json["after"];
        assert_eq!(after["n"], "12.50");
        assert_eq!(after["d"], 19_000);
        assert_eq!(after["ts"], 1_700_000_000_123_456i64);
        assert_eq!(after["tz"], "2023-11-14T22:13:20.12Z");
        assert_eq!(after["b"], "AAEC");
        assert_eq!(after["u"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert_eq!(after["j"], "{\"k\": [1, 2]}");
        assert_eq!(after["a"], serde_json::json!(["x", null]));
        assert_eq!(after["f"], "NaN");
        assert_eq!(after["big"], UNAVAILABLE);
        assert_eq!(json["source"]["lsn"], 99);
        assert_eq!(json["source"]["txId"], 7);
        assert_eq!(json["op"], "u");
        assert_eq!(json["before"], Json::Null);
        assert_eq!(encode_key(&s, &change).unwrap(), "{\"id\":1}");

        let parsed = parse_envelope(text.as_bytes()).unwrap();
        assert_eq!((parsed.schema_name.as_str(), parsed.table.as_str(), parsed.op), ("public", "t", Op::Update));
        let decoded = decode_row(&s, parsed.after.as_ref().unwrap()).unwrap();
        let mut expected = row();
        expected[9] = Value::Float8(f64::NAN);
        for (i, (d, e)) in decoded.iter().zip(&expected).enumerate() {
            match (d, e) {
                (Value::Float8(a), Value::Float8(b)) if a.is_nan() && b.is_nan() => {}
                _ => assert_eq!(d, e, "column {i}"),
            }
        }
    }

    #[test]
    fn schema_and_position_headers_round_trip() {
        let s = schema();
        let back = parse_schema_header(&schema_header(&s)).unwrap();
        assert_eq!(back, s);
        let p = Position { lsn: 77, seq: 3 };
        assert_eq!(parse_position_header(position_header(p).as_bytes()), Some(p));
        assert!(parse_schema_header(b"{}").is_err());
    }

    #[test]
    fn zoned_timestamps_parse_with_offsets() {
        assert_eq!(parse_zoned("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_zoned("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(parse_zoned("1970-01-01T00:00:00.5Z"), Some(500_000));
        assert_eq!(format_zoned(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn bad_values_are_errors() {
        let s = schema();
        let mut obj = serde_json::Map::new();
        obj.insert("id".into(), Json::String("x".into()));
        assert!(decode_row(&s, &obj).is_err());
        assert!(parse_envelope(b"{}").is_err());
        assert!(parse_envelope(b"nope").is_err());
    }
}
