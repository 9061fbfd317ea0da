//! PostgreSQL's text output format, decoded into [`Value`]s.
//!
//! Both pgoutput (text mode) and `COPY ... TO STDOUT` print values with the type's output
//! function, so one decoder serves the stream and the snapshot. Every connection sluice
//! reads values from pins the settings the output depends on ([`SESSION_SETTINGS`]): ISO
//! dates, UTC time zone, ISO 8601 intervals, hex bytea, shortest-exact floats. Malformed
//! text is an error naming the type, never a panic.

use crate::schema::PgType;
use crate::value::{Interval, MICROS_PER_DAY, MICROS_PER_SECOND, Value, days_from_civil, parse_uuid};

/// Session settings under which [`decode`] reads every value.
pub const SESSION_SETTINGS: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("TimeZone", "UTC"),
    ("IntervalStyle", "iso_8601"),
    ("bytea_output", "hex"),
    ("extra_float_digits", "1"),
];

/// `SESSION_SETTINGS` as a startup `options` string (`-c name=value ...`).
pub fn startup_options() -> String {
    SESSION_SETTINGS
        .iter()
        .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ").replace(',', "\\,")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `SESSION_SETTINGS` as SET statements for an ordinary connection.
pub fn set_statements() -> String {
    SESSION_SETTINGS.iter().map(|(k, v)| format!("SET {k} = '{v}';")).collect::<Vec<_>>().join(" ")
}

/// A value whose text does not parse as its type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {text:?} as {type_name}")]
pub struct DecodeError {
    pub type_name: String,
    pub text: String,
}

fn err(ty: &PgType, text: &str) -> DecodeError {
    let text = if text.len() > 64 { format!("{}...", &text[..text.floor_char_boundary(64)]) } else { text.to_string() };
    DecodeError { type_name: ty.name(), text }
}

/// Decodes one non-NULL value printed by the type's output function.
pub fn decode(ty: &PgType, text: &str) -> Result<Value, DecodeError> {
    let fail = || err(ty, text);
    Ok(match ty {
        PgType::Bool => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => return Err(fail()),
        },
        PgType::Int2 => Value::Int2(text.parse().map_err(|_| fail())?),
        PgType::Int4 => Value::Int4(text.parse().map_err(|_| fail())?),
        PgType::Int8 => Value::Int8(text.parse().map_err(|_| fail())?),
        PgType::Float4 => Value::Float4(parse_float(text).ok_or_else(fail)? as f32),
        PgType::Float8 => Value::Float8(parse_float(text).ok_or_else(fail)?),
        PgType::Numeric(_) => {
            if !is_numeric_text(text) {
                return Err(fail());
            }
            Value::Numeric(text.to_string())
        }
        PgType::Text(_) => Value::Text(text.to_string()),
        PgType::Json | PgType::Jsonb => Value::Json(text.to_string()),
        PgType::Bytea => Value::Bytes(parse_bytea(text).ok_or_else(fail)?),
        PgType::Date => Value::Date(parse_date(text).ok_or_else(fail)?),
        PgType::Time => Value::Time(parse_time(text).ok_or_else(fail)?),
        PgType::Timestamp => Value::Timestamp(parse_timestamp(text, false).ok_or_else(fail)?),
        PgType::TimestampTz => Value::TimestampTz(parse_timestamp(text, true).ok_or_else(fail)?),
        PgType::Interval => Value::Interval(parse_interval(text).ok_or_else(fail)?),
        PgType::Uuid => Value::Uuid(parse_uuid(text).ok_or_else(fail)?),
        PgType::Array(elem) => Value::Array(parse_array(elem, text)?),
    })
}

fn parse_float(text: &str) -> Option<f64> {
    match text {
        "NaN" => Some(f64::NAN),
        "Infinity" => Some(f64::INFINITY),
        "-Infinity" => Some(f64::NEG_INFINITY),
        _ => text.parse().ok(),
    }
}

/// Whether `text` is a numeric as PostgreSQL prints one: optional sign, digits, optional
/// fraction, optional exponent; or NaN / Infinity.
pub fn is_numeric_text(text: &str) -> bool {
    if matches!(text, "NaN" | "Infinity" | "-Infinity") {
        return true;
    }
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (body, None),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && digits(e)
    });
    !(int.is_empty() && frac.is_empty()) && digits(int) && digits(frac) && exponent_ok
}

fn parse_bytea(text: &str) -> Option<Vec<u8>> {
    if let Some(hex) = text.strip_prefix("\\x") {
        if hex.len() % 2 != 0 {
            return None;
        }
        return (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok()).collect();
    }
    // The older "escape" output: backslash-octal and doubled backslashes.
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            if bytes.get(i + 1) == Some(&b'\\') {
                out.push(b'\\');
                i += 2;
            } else {
                let oct = text.get(i + 1..i + 4)?;
                out.push(u8::from_str_radix(oct, 8).ok()?);
                i += 4;
            }
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Some(out)
}

/// Splits a trailing " BC" off and returns the astronomical year sign fix.
fn strip_bc(text: &str) -> (&str, bool) {
    match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    }
}

fn parse_ymd(text: &str, bc: bool) -> Option<i64> {
    let mut parts = text.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let year = if bc { 1 - year } else { year };
    Some(days_from_civil(year, month, day))
}

fn parse_date(text: &str) -> Option<i32> {
    match text {
        "infinity" => return Some(i32::MAX),
        "-infinity" => return Some(i32::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    i32::try_from(parse_ymd(text, bc)?).ok()
}

/// `HH:MM:SS[.ffffff]` to microseconds.
fn parse_time(text: &str) -> Option<i64> {
    let mut parts = text.splitn(3, ':');
    let h: i64 = parts.next()?.parse().ok()?;
    let m: i64 = parts.next()?.parse().ok()?;
    let sec = parts.next()?;
    let (s, frac) = sec.split_once('.').unwrap_or((sec, ""));
    let s: i64 = s.parse().ok()?;
    if !(0..=24).contains(&h) || !(0..60).contains(&m) || !(0..=60).contains(&s) {
        return None;
    }
    Some((h * 3600 + m * 60 + s) * MICROS_PER_SECOND + parse_fraction(frac)?)
}

/// Up to 6 fractional digits as microseconds.
fn parse_fraction(frac: &str) -> Option<i64> {
    if frac.is_empty() {
        return Some(0);
    }
    if frac.len() > 6 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v: i64 = frac.parse().ok()?;
    Some(v * 10i64.pow(6 - frac.len() as u32))
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff][+HH[:MM[:SS]]][ BC]`; the offset only with `with_tz`.
fn parse_timestamp(text: &str, with_tz: bool) -> Option<i64> {
    match text {
        "infinity" => return Some(i64::MAX),
        "-infinity" => return Some(i64::MIN),
        _ => {}
    }
    let (text, bc) = strip_bc(text);
    let (date, rest) = text.split_once([' ', 'T'])?;
    let days = parse_ymd(date, bc)?;
    let (time, offset) = if with_tz {
        let at = rest.rfind(['+', '-'])?;
        (&rest[..at], parse_offset(&rest[at..])?)
    } else {
        (rest, 0)
    };
    let micros = parse_time(time)?;
    days.checked_mul(MICROS_PER_DAY)?.checked_add(micros)?.checked_sub(offset * MICROS_PER_SECOND)
}

/// `+HH[:MM[:SS]]` to seconds east of UTC.
fn parse_offset(text: &str) -> Option<i64> {
    let sign = if text.starts_with('-') { -1 } else { 1 };
    let mut secs = 0;
    for (i, part) in text[1..].split(':').enumerate() {
        let v: i64 = part.parse().ok()?;
        secs += v * [3600, 60, 1].get(i)?;
    }
    Some(sign * secs)
}

/// ISO 8601 intervals as `IntervalStyle = iso_8601` prints them (`P1Y2M3DT4H5M6.5S`).
fn parse_interval(text: &str) -> Option<Interval> {
    let body = text.strip_prefix('P')?;
    let (date_part, time_part) = body.split_once('T').unwrap_or((body, ""));
    let mut out = Interval::default();
    let mut each = |part: &str, in_time: bool| -> Option<()> {
        let mut number = String::new();
        for c in part.chars() {
            if c.is_ascii_digit() || c == '-' || c == '.' || c == '+' {
                number.push(c);
                continue;
            }
            let n = std::mem::take(&mut number);
            match (in_time, c) {
                (false, 'Y') => out.months = out.months.checked_add(n.parse::<i32>().ok()?.checked_mul(12)?)?,
                (false, 'M') => out.months = out.months.checked_add(n.parse().ok()?)?,
                (false, 'W') => out.days = out.days.checked_add(n.parse::<i32>().ok()?.checked_mul(7)?)?,
                (false, 'D') => out.days = out.days.checked_add(n.parse().ok()?)?,
                (true, 'H') => out.micros += n.parse::<i64>().ok()? * 3_600 * MICROS_PER_SECOND,
                (true, 'M') => out.micros += n.parse::<i64>().ok()? * 60 * MICROS_PER_SECOND,
                (true, 'S') => {
                    let negative = n.starts_with('-');
                    let (whole, frac) = n
                        .trim_start_matches(['-', '+'])
                        .split_once('.')
                        .unwrap_or((n.trim_start_matches(['-', '+']), ""));
                    let micros = whole.parse::<i64>().ok()? * MICROS_PER_SECOND + parse_fraction(frac)?;
                    out.micros += if negative { -micros } else { micros };
                }
                _ => return None,
            }
        }
        number.is_empty().then_some(())
    };
    each(date_part, false)?;
    each(time_part, true)?;
    Some(out)
}

/// Parses an array literal (`{1,2,NULL,"a \"b\""}`, optionally `[1:2]={...}`), nested
/// arrays included, decoding each element as `elem`.
fn parse_array(elem: &PgType, text: &str) -> Result<Vec<Value>, DecodeError> {
    let array_type = PgType::Array(Box::new(elem.clone()));
    let fail = || err(&array_type, text);
    let body = match text.find("={") {
        Some(at) if text.starts_with('[') => &text[at + 1..],
        _ => text,
    };
    let mut parser = ArrayParser { bytes: body.as_bytes(), pos: 0 };
    let out = parser.array(elem).map_err(|_| fail())?;
    if parser.pos != parser.bytes.len() {
        return Err(fail());
    }
    Ok(out)
}

struct ArrayParser<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl ArrayParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn array(&mut self, elem: &PgType) -> Result<Vec<Value>, ()> {
        if self.peek() != Some(b'{') {
            return Err(());
        }
        self.pos += 1;
        let mut out = Vec::new();
        if self.peek() == Some(b'}') {
            self.pos += 1;
            return Ok(out);
        }
        loop {
            let value = match self.peek() {
                Some(b'{') => Value::Array(self.array(elem)?),
                Some(b'"') => {
                    let s = self.quoted()?;
                    decode(elem, &s).map_err(|_| ())?
                }
                Some(_) => {
                    let start = self.pos;
                    while !matches!(self.peek(), Some(b',' | b'}') | None) {
                        self.pos += 1;
                    }
                    let raw = std::str::from_utf8(&self.bytes[start..self.pos]).map_err(|_| ())?.trim();
                    if raw.eq_ignore_ascii_case("NULL") { Value::Null } else { decode(elem, raw).map_err(|_| ())? }
                }
                None => return Err(()),
            };
            out.push(value);
            match self.peek() {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(out);
                }
                _ => return Err(()),
            }
        }
    }

    fn quoted(&mut self) -> Result<String, ()> {
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.pos += 1;
                    return String::from_utf8(out).map_err(|_| ());
                }
                Some(b'\\') => {
                    out.push(*self.bytes.get(self.pos + 1).ok_or(())?);
                    self.pos += 2;
                }
                Some(b) => {
                    out.push(b);
                    self.pos += 1;
                }
                None => return Err(()),
            }
        }
    }
}

/// The fields of one line of `COPY ... TO STDOUT` text format, unescaped into one buffer
/// that is reused from line to line (no allocation per field: the snapshot splits every
/// field of every row).
#[derive(Debug, Default)]
pub struct CopyFields {
    buf: Vec<u8>,
    /// Each field's bytes in `buf`; `None` for `\N` (NULL).
    ranges: Vec<Option<std::ops::Range<usize>>>,
}

impl CopyFields {
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The fields in order as text (`None` for NULL); a field that is not UTF-8 is an error.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = Result<Option<&str>, String>> + '_ {
        self.ranges.iter().map(|r| match r {
            None => Ok(None),
            Some(r) => {
                std::str::from_utf8(&self.buf[r.clone()]).map(Some).map_err(|_| "COPY field is not UTF-8".into())
            }
        })
    }
}

/// Splits one line of `COPY ... TO STDOUT` text format into its fields, undoing the
/// backslash escapes; `\N` is NULL. The line excludes its newline.
pub fn split_copy_line(line: &[u8], fields: &mut CopyFields) -> Result<(), String> {
    let CopyFields { buf, ranges } = fields;
    buf.clear();
    ranges.clear();
    let mut start = 0;
    let mut is_null = false;
    let mut i = 0;
    loop {
        // The run of plain bytes up to the next tab or backslash is copied at once.
        let run = line[i..].iter().position(|&b| b == b'\t' || b == b'\\').map_or(line.len(), |p| i + p);
        buf.extend_from_slice(&line[i..run]);
        i = run;
        let Some(&b) = line.get(i) else { break };
        if b == b'\t' {
            ranges.push(if is_null { None } else { Some(start..buf.len()) });
            is_null = false;
            start = buf.len();
            i += 1;
            continue;
        }
        let next = *line.get(i + 1).ok_or("COPY line ends in a backslash")?;
        i += 2;
        match next {
            b'N' => is_null = true,
            b'n' => buf.push(b'\n'),
            b'r' => buf.push(b'\r'),
            b't' => buf.push(b'\t'),
            b'b' => buf.push(8),
            b'f' => buf.push(12),
            b'v' => buf.push(11),
            b'0'..=b'7' => {
                let mut v = (next - b'0') as u32;
                let mut n = 1;
                while n < 3 && matches!(line.get(i), Some(b'0'..=b'7')) {
                    v = v * 8 + (line[i] - b'0') as u32;
                    i += 1;
                    n += 1;
                }
                buf.push(v as u8);
            }
            b'x' => {
                let digits = line[i..].iter().take(2).take_while(|b| b.is_ascii_hexdigit()).count();
                // No digit at all leaves "" for from_str_radix, which refuses it.
                let value = std::str::from_utf8(&line[i..i + digits]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                buf.push(value.ok_or("bad \\x escape in COPY line")?);
                i += digits;
            }
            other => buf.push(other),
        }
    }
    ranges.push(if is_null { None } else { Some(start..buf.len()) });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn d(ty: PgType, s: &str) -> Value {
        decode(&ty, s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn scalars_decode() {
        assert_eq!(d(PgType::Bool, "t"), Value::Bool(true));
        assert_eq!(d(PgType::Int2, "-32768"), Value::Int2(i16::MIN));
        assert_eq!(d(PgType::Int8, "9223372036854775807"), Value::Int8(i64::MAX));
        assert_eq!(d(PgType::Float8, "1.5"), Value::Float8(1.5));
        assert!(matches!(d(PgType::Float8, "NaN"), Value::Float8(f) if f.is_nan()));
        assert_eq!(d(PgType::Float4, "-Infinity"), Value::Float4(f32::NEG_INFINITY));
        assert_eq!(d(PgType::Numeric(None), "-12.500"), Value::Numeric("-12.500".into()));
        assert_eq!(d(PgType::Numeric(None), "NaN"), Value::Numeric("NaN".into()));
        assert!(decode(&PgType::Numeric(None), "1.2.3").is_err());
        assert!(decode(&PgType::Int4, "99999999999").is_err());
        assert_eq!(d(PgType::Bytea, "\\x00ff10"), Value::Bytes(vec![0, 255, 16]));
        assert_eq!(d(PgType::Bytea, "a\\\\b\\001"), Value::Bytes(vec![b'a', b'\\', b'b', 1]));
        assert_eq!(
            d(PgType::Uuid, "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
            Value::Uuid(0xa0eebc999c0b4ef8bb6d6bb9bd380a11)
        );
    }

    #[test]
    fn temporal_values_decode() {
        assert_eq!(d(PgType::Date, "1970-01-02"), Value::Date(1));
        assert_eq!(d(PgType::Date, "infinity"), Value::Date(i32::MAX));
        assert_eq!(d(PgType::Date, "0001-01-01 BC"), Value::Date(days_from_civil(0, 1, 1) as i32));
        assert_eq!(d(PgType::Time, "24:00:00"), Value::Time(MICROS_PER_DAY));
        assert_eq!(d(PgType::Time, "01:02:03.5"), Value::Time(3_723_500_000));
        assert_eq!(d(PgType::Timestamp, "1970-01-01 00:00:01.000001"), Value::Timestamp(1_000_001));
        assert_eq!(d(PgType::TimestampTz, "1970-01-01 01:00:00+01"), Value::TimestampTz(0));
        assert_eq!(d(PgType::TimestampTz, "1970-01-01 00:00:00-05:30"), Value::TimestampTz(19_800_000_000));
        assert_eq!(d(PgType::TimestampTz, "-infinity"), Value::TimestampTz(i64::MIN));
        assert!(decode(&PgType::Timestamp, "2020-13-01 00:00:00").is_err());
        assert!(decode(&PgType::Time, "25:00:00").is_err());
    }

    #[test]
    fn intervals_decode() {
        assert_eq!(
            d(PgType::Interval, "P1Y2M3DT4H5M6.5S"),
            Value::Interval(Interval { months: 14, days: 3, micros: 14_706_500_000 })
        );
        assert_eq!(d(PgType::Interval, "PT0S"), Value::Interval(Interval::default()));
        assert_eq!(
            d(PgType::Interval, "P-1Y-2DT-1.25S"),
            Value::Interval(Interval { months: -12, days: -2, micros: -1_250_000 })
        );
        assert!(decode(&PgType::Interval, "1 day").is_err());
    }

    #[test]
    fn arrays_decode() {
        let int_array = PgType::Array(Box::new(PgType::Int4));
        assert_eq!(d(int_array.clone(), "{1,NULL,3}"), Value::Array(vec![Value::Int4(1), Value::Null, Value::Int4(3)]));
        assert_eq!(d(int_array.clone(), "{}"), Value::Array(vec![]));
        assert_eq!(d(int_array.clone(), "[0:1]={5,6}"), Value::Array(vec![Value::Int4(5), Value::Int4(6)]));
        assert_eq!(
            d(PgType::Array(Box::new(PgType::Text("text".into()))), r#"{"a,b","say \"hi\"",NULL,"NULL",plain}"#),
            Value::Array(vec![
                Value::Text("a,b".into()),
                Value::Text("say \"hi\"".into()),
                Value::Null,
                Value::Text("NULL".into()),
                Value::Text("plain".into()),
            ])
        );
        assert_eq!(
            d(int_array.clone(), "{{1,2},{3,4}}"),
            Value::Array(vec![
                Value::Array(vec![Value::Int4(1), Value::Int4(2)]),
                Value::Array(vec![Value::Int4(3), Value::Int4(4)])
            ])
        );
        assert!(decode(&int_array, "{1,2").is_err());
        assert!(decode(&int_array, "{1,x}").is_err());
    }

    #[test]
    fn copy_lines_split_and_unescape() {
        let mut f = CopyFields::default();
        let texts = |f: &CopyFields| {
            f.iter()
                .collect::<Result<Vec<_>, _>>()
                .unwrap()
                .into_iter()
                .map(|t| t.map(String::from))
                .collect::<Vec<_>>()
        };
        split_copy_line(b"1\ta\\tb\\\\c\\nd\t\\N\t", &mut f).unwrap();
        assert_eq!(texts(&f), vec![Some("1".into()), Some("a\tb\\c\nd".into()), None, Some(String::new())]);
        split_copy_line(b"\\101\\x41", &mut f).unwrap();
        assert_eq!(texts(&f), vec![Some("AA".into())]);
        split_copy_line(b"", &mut f).unwrap();
        assert_eq!(texts(&f), vec![Some(String::new())]);
        split_copy_line(b"\\xff", &mut f).unwrap();
        assert!(f.iter().next().unwrap().is_err(), "not UTF-8");
        assert!(split_copy_line(b"bad\\", &mut f).is_err());
        assert!(split_copy_line(b"\\xg", &mut f).is_err(), "\\x without a hex digit");
    }

    #[test]
    fn startup_options_escape_spaces() {
        assert!(startup_options().contains("-c DateStyle=ISO\\,\\ YMD"));
    }

    proptest! {
        #[test]
        fn decode_never_panics(s in ".{0,40}") {
            for ty in [PgType::Bool, PgType::Int4, PgType::Float8, PgType::Numeric(None), PgType::Bytea, PgType::Date,
                       PgType::Time, PgType::Timestamp, PgType::TimestampTz, PgType::Interval, PgType::Uuid,
                       PgType::Array(Box::new(PgType::Int4)), PgType::Array(Box::new(PgType::Text("text".into())))] {
                let _ = decode(&ty, &s);
            }
        }

        #[test]
        fn copy_split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut f = CopyFields::default();
            let _ = split_copy_line(&bytes, &mut f);
        }

        #[test]
        fn timestamps_round_trip(micros in -50_000_000_000_000_000i64..50_000_000_000_000_000i64) {
            let text = crate::value::format_timestamp(micros, ' ');
            prop_assert_eq!(decode(&PgType::Timestamp, &text).unwrap(), Value::Timestamp(micros));
        }
    }
}
