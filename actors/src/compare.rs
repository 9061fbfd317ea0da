//! Canonical cell text, so rows read back from different databases compare equal when
//! they hold the same values (`sluice validate`).
//!
//! Each side prints a cell its own way (`t` / `1`, `12.5` / `12.50`, `+00` / no zone,
//! `{"a":1}` / `{"a": 1}`); [`canonical`] turns any of those into one text per Arrow type
//! of the target column, and [`row_hash`] hashes a row of canonical cells.

use std::hash::{Hash, Hasher};

use arrow::datatypes::{DataType, Field, IntervalUnit};

use crate::mapper::columnar::parse_decimal;
use crate::pgtext;
use crate::schema::{PG_TYPE_METADATA, PgType};
use crate::sink::encode::format_decimal;
use crate::transport::envelope::parse_zoned;
use crate::value::{Value, format_time, format_timestamp};

fn json_canonical(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text).map(|v| v.to_string()).unwrap_or_else(|_| text.to_string())
}

fn timestamp_micros(text: &str) -> Option<i64> {
    let t = text.trim();
    match t {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    if let Some(v) = pgtext::decode(&PgType::TimestampTz, t).ok().or_else(|| pgtext::decode(&PgType::Timestamp, t).ok())
    {
        return match v {
            Value::TimestampTz(m) | Value::Timestamp(m) => Some(m),
            _ => None,
        };
    }
    parse_zoned(&t.replace(' ', "T"))
}

/// The canonical text of one non-NULL cell of a column of type `field`.
pub fn canonical(field: &Field, text: &str) -> String {
    let is_json = matches!(field.metadata().get(PG_TYPE_METADATA).map(String::as_str), Some("json" | "jsonb"));
    match field.data_type() {
        DataType::Boolean => match text {
            "t" | "true" | "1" | "TRUE" => "true".into(),
            "f" | "false" | "0" | "FALSE" => "false".into(),
            other => other.into(),
        },
        DataType::Int16 | DataType::Int32 | DataType::Int64 => {
            text.trim().parse::<i64>().map(|v| v.to_string()).unwrap_or_else(|_| text.into())
        }
        DataType::Float32 => text.trim().parse::<f32>().map(|v| v.to_string()).unwrap_or_else(|_| text.into()),
        DataType::Float64 => text.trim().parse::<f64>().map(|v| v.to_string()).unwrap_or_else(|_| text.into()),
        DataType::Decimal128(p, s) => {
            parse_decimal(text.trim(), *p, *s).map(|v| format_decimal(v, *s)).unwrap_or_else(|| text.into())
        }
        DataType::Utf8 if is_json => json_canonical(text),
        DataType::Binary => {
            let hex = text.strip_prefix("\\x").unwrap_or(text);
            hex.to_ascii_lowercase()
        }
        DataType::Date32 => text.trim().get(..10).unwrap_or(text).to_string(),
        DataType::Time64(_) => match pgtext::decode(&PgType::Time, text.trim()) {
            Ok(Value::Time(m)) => format_time(m),
            _ => text.into(),
        },
        DataType::Timestamp(_, _) => {
            timestamp_micros(text).map(|m| format_timestamp(m, ' ')).unwrap_or_else(|| text.into())
        }
        DataType::Interval(IntervalUnit::MonthDayNano) => match pgtext::decode(&PgType::Interval, text.trim()) {
            Ok(Value::Interval(i)) => i.to_string(),
            _ => text.into(),
        },
        DataType::List(inner) => {
            let inner_field = Field::new("item", inner.data_type().clone(), true);
            let items: Vec<Option<String>> = if text.starts_with('[') {
                match serde_json::from_str::<Vec<serde_json::Value>>(text) {
                    Ok(v) => v
                        .into_iter()
                        .map(|j| match j {
                            serde_json::Value::Null => None,
                            serde_json::Value::String(s) => Some(s),
                            other => Some(other.to_string()),
                        })
                        .collect(),
                    Err(_) => return text.into(),
                }
            } else {
                match pgtext::decode(&PgType::Array(Box::new(PgType::Text("text".into()))), text) {
                    Ok(Value::Array(v)) => v
                        .into_iter()
                        .map(|x| match x {
                            Value::Text(s) => Some(s),
                            _ => None,
                        })
                        .collect(),
                    _ => return text.into(),
                }
            };
            let canon: Vec<String> =
                items.iter().map(|i| i.as_deref().map_or("NULL".into(), |s| canonical(&inner_field, s))).collect();
            format!("[{}]", canon.join(","))
        }
        _ => text.into(),
    }
}

/// A stable hash of a row of canonical cells (`None` for NULL).
pub fn row_hash(cells: &[Option<String>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    cells.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn different_spellings_compare_equal() {
        let b = Field::new("b", DataType::Boolean, true);
        assert_eq!(canonical(&b, "t"), canonical(&b, "1"));
        let d = Field::new("d", DataType::Decimal128(10, 2), true);
        assert_eq!(canonical(&d, "12.5"), canonical(&d, "12.50"));
        let ts =
            Field::new("t", DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, Some("UTC".into())), true);
        assert_eq!(canonical(&ts, "2024-01-01 10:00:00.5+00"), canonical(&ts, "2024-01-01 10:00:00.500000"));
        let j = Field::new("j", DataType::Utf8, true)
            .with_metadata(HashMap::from([(PG_TYPE_METADATA.to_string(), "jsonb".to_string())]));
        assert_eq!(canonical(&j, "{\"a\": 1, \"b\": [1, 2]}"), canonical(&j, "{\"b\":[1,2],\"a\":1}"));
        let l = Field::new("l", DataType::List(std::sync::Arc::new(Field::new("item", DataType::Int32, true))), true);
        assert_eq!(canonical(&l, "{1,NULL,3}"), canonical(&l, "[1,null,3]"));
        let bin = Field::new("x", DataType::Binary, true);
        assert_eq!(canonical(&bin, "\\x0AFF"), canonical(&bin, "0aff"));
        assert_ne!(row_hash(&[Some("1".into()), None]), row_hash(&[Some("1".into()), Some(String::new())]));
    }
}
