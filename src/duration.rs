//! The one duration parser, for flags, TOML values and PostgreSQL's own
//! settings alike.

use std::time::Duration;

/// What a duration without a unit counts: seconds for the relay's own
/// options, milliseconds for PostgreSQL's settings (`SHOW wal_sender_timeout`
/// prints `60s`, `1min` or a bare `0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareNumber {
    Seconds,
    Millis,
}

/// The one duration parser: `7d`, `12h`, `30m`, `1min`, `45s`, `500ms`,
/// `1.5h`, or a bare number counted as `bare` says.
pub fn parse_duration(s: &str, bare: BareNumber) -> Result<Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration: expected e.g. 7d, 12h, 30m, 45s"))?;
    let secs = match unit.trim() {
        "" if bare == BareNumber::Millis => n / 1000.0,
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        "d" | "day" | "days" => n * 86_400.0,
        "w" | "week" | "weeks" => n * 7.0 * 86_400.0,
        other => {
            return Err(format!(
                "{s:?}: unknown unit {other:?} (use ms, s, m, h, d or w)"
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}
