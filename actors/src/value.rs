//! Typed column values, and the calendar arithmetic shared by every codec.
//!
//! Invariants: temporal values are integers in the Arrow units of DESIGN.md (days since
//! 1970-01-01, microseconds since midnight or since the epoch, UTC for `TimestampTz`);
//! `infinity`/`-infinity` map to the type's `MAX`/`MIN`. Numerics keep PostgreSQL's exact
//! text (`"12.50"`, `"NaN"`), never a float. [`Value::Unchanged`] stands for an unchanged
//! TOASTed column the source did not resend: it is never written as NULL.

use std::fmt;

/// One column value of a row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    /// A TOASTed value unchanged by an update, which the source did not send.
    Unchanged,
    Bool(bool),
    Int2(i16),
    Int4(i32),
    Int8(i64),
    Float4(f32),
    Float8(f64),
    /// Exact decimal text as PostgreSQL prints it (also `NaN`, `Infinity`).
    Numeric(String),
    Text(String),
    Json(String),
    Bytes(Vec<u8>),
    /// Days since 1970-01-01.
    Date(i32),
    /// Microseconds since midnight.
    Time(i64),
    /// Microseconds since 1970-01-01 00:00 (no time zone).
    Timestamp(i64),
    /// Microseconds since 1970-01-01 00:00 UTC.
    TimestampTz(i64),
    Interval(Interval),
    Uuid(u128),
    Array(Vec<Value>),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// A PostgreSQL interval: months, days and microseconds are kept apart, as PostgreSQL does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interval {
    pub months: i32,
    pub days: i32,
    pub micros: i64,
}

impl fmt::Display for Interval {
    /// ISO 8601, as PostgreSQL's `IntervalStyle = iso_8601` prints it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.months == 0 && self.days == 0 && self.micros == 0 {
            return f.write_str("PT0S");
        }
        f.write_str("P")?;
        let (years, months) = (self.months / 12, self.months % 12);
        if years != 0 {
            write!(f, "{years}Y")?;
        }
        if months != 0 {
            write!(f, "{months}M")?;
        }
        if self.days != 0 {
            write!(f, "{}D", self.days)?;
        }
        if self.micros != 0 {
            f.write_str("T")?;
            let hours = self.micros / 3_600_000_000;
            let minutes = (self.micros % 3_600_000_000) / 60_000_000;
            let micros = self.micros % 60_000_000;
            if hours != 0 {
                write!(f, "{hours}H")?;
            }
            if minutes != 0 {
                write!(f, "{minutes}M")?;
            }
            if micros != 0 {
                let sign = if micros < 0 { "-" } else { "" };
                let abs = micros.unsigned_abs();
                let (secs, frac) = (abs / 1_000_000, abs % 1_000_000);
                if frac == 0 {
                    write!(f, "{sign}{secs}S")?;
                } else {
                    let frac = format!("{frac:06}");
                    write!(f, "{sign}{secs}.{}S", frac.trim_end_matches('0'))?;
                }
            }
        }
        Ok(())
    }
}

pub const MICROS_PER_SECOND: i64 = 1_000_000;
pub const MICROS_PER_DAY: i64 = 86_400 * MICROS_PER_SECOND;
/// Microseconds from the Unix epoch to PostgreSQL's, 2000-01-01.
pub const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering).
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Formats days since the epoch as `YYYY-MM-DD` (ISO 8601, astronomical years).
pub fn format_date(days: i32) -> String {
    let (y, m, d) = civil_from_days(days as i64);
    if (0..=9999).contains(&y) { format!("{y:04}-{m:02}-{d:02}") } else { format!("{y:+05}-{m:02}-{d:02}") }
}

/// Formats microseconds since midnight as `HH:MM:SS[.ffffff]`.
pub fn format_time(micros: i64) -> String {
    let secs = micros.div_euclid(MICROS_PER_SECOND);
    let frac = micros.rem_euclid(MICROS_PER_SECOND);
    let (h, m, s) = (secs / 3600, (secs % 3600) / 60, secs % 60);
    if frac == 0 { format!("{h:02}:{m:02}:{s:02}") } else { format!("{h:02}:{m:02}:{s:02}.{frac:06}") }
}

/// Formats epoch microseconds as `YYYY-MM-DDTHH:MM:SS[.ffffff]` (no zone suffix).
pub fn format_timestamp(micros: i64, separator: char) -> String {
    let days = micros.div_euclid(MICROS_PER_DAY);
    let time = micros.rem_euclid(MICROS_PER_DAY);
    format!("{}{separator}{}", format_date(days as i32), format_time(time))
}

/// Formats a UUID in its canonical hyphenated form.
pub fn format_uuid(uuid: u128) -> String {
    // By hand, one allocation: the two `format!`s this replaces were 2.3% of the daemon's
    // CPU in a catch-up of the load generator's tables (a uuid column in every row).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            text.push('-');
        }
        text.push(HEX[((uuid >> (124 - 4 * i)) & 0xf) as usize] as char);
    }
    text
}

/// Parses a hyphenated or plain hex UUID.
pub fn parse_uuid(s: &str) -> Option<u128> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let mut out: u128 = 0;
    let mut digits = 0;
    for c in s.chars() {
        if c == '-' {
            continue;
        }
        out = (out << 4) | c.to_digit(16)? as u128;
        digits += 1;
    }
    (digits == 32).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trips() {
        for days in [-719_468i64, -1, 0, 1, 365, 10_957, 19_000, 2_932_896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(format_date(0), "1970-01-01");
        assert_eq!(format_date(-1), "1969-12-31");
    }

    #[test]
    fn times_format() {
        assert_eq!(format_time(0), "00:00:00");
        assert_eq!(format_time(3_723_000_001), "01:02:03.000001");
        assert_eq!(format_timestamp(1_500_000, 'T'), "1970-01-01T00:00:01.500000");
        assert_eq!(format_timestamp(-1, ' '), "1969-12-31 23:59:59.999999");
    }

    #[test]
    fn uuids_round_trip() {
        let s = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        let u = parse_uuid(s).unwrap();
        assert_eq!(format_uuid(u), s);
        assert_eq!(format_uuid(0), "00000000-0000-0000-0000-000000000000");
        assert_eq!(format_uuid(u128::MAX), "ffffffff-ffff-ffff-ffff-ffffffffffff");
        assert_eq!(format_uuid(0x0123_4567_89ab_cdef_0011_2233_4455_6677), "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(parse_uuid("xyz"), None);
        assert_eq!(parse_uuid("a0eebc99"), None);
    }

    #[test]
    fn intervals_print_iso() {
        let i = Interval { months: 14, days: 3, micros: 4 * 3_600_000_000 + 5 * 60_000_000 + 6_500_000 };
        assert_eq!(i.to_string(), "P1Y2M3DT4H5M6.5S");
        assert_eq!(Interval::default().to_string(), "PT0S");
        assert_eq!(Interval { months: 0, days: 0, micros: -1_500_000 }.to_string(), "PT-1.5S");
    }
}
