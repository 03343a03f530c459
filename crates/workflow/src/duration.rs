//! Durations as specs write them: `500ms`, `30s`, `10m`, `1h`, or a sum such as `1h30m`.
//!
//! A bare number is refused: `timeout: 30` is ambiguous (seconds? minutes?) and a spec
//! that means something else than its author thinks is worse than one that does not
//! load.

use std::time::Duration;

/// The longest duration a spec may ask for (30 days): keeps deadline arithmetic far
/// from overflow and catches typos such as `10000h`.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Nothing to parse.
    #[error("empty duration (write e.g. 500ms, 30s, 10m, 1h)")]
    Empty,
    /// A number without `ms`, `s`, `m` or `h` after it.
    #[error("{0:?}: a number needs a unit: ms, s, m or h (e.g. 30s)")]
    MissingUnit(String),
    /// A unit other than `ms`, `s`, `m`, `h`.
    #[error("{0:?}: unknown unit (use ms, s, m or h)")]
    UnknownUnit(String),
    /// Not of the form number + unit.
    #[error("{0:?}: not a duration (write e.g. 500ms, 30s, 10m, 1h or 1h30m)")]
    Malformed(String),
    /// Longer than [`MAX_DURATION`].
    #[error("{0:?}: longer than the maximum of 30 days")]
    TooLong(String),
}

/// Parses `500ms`, `30s`, `10m`, `1h` and sums of them (`1h30m`, `1m30s`).
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let t = s.trim();
    if t.is_empty() {
        return Err(DurationError::Empty);
    }
    let bytes = t.as_bytes();
    let mut i = 0;
    let mut total: u128 = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return Err(DurationError::Malformed(s.to_owned()));
        }
        // At most 12 digits: anything longer is far past MAX_DURATION anyway.
        if i - start > 12 {
            return Err(DurationError::TooLong(s.to_owned()));
        }
        let n: u128 = t[start..i]
            .parse()
            .map_err(|_| DurationError::Malformed(s.to_owned()))?;
        let ustart = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        let ms_per = match &t[ustart..i] {
            "" if i == bytes.len() => return Err(DurationError::MissingUnit(s.to_owned())),
            "" => return Err(DurationError::Malformed(s.to_owned())),
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            _ => return Err(DurationError::UnknownUnit(s.to_owned())),
        };
        total += n * ms_per;
        if total > MAX_DURATION.as_millis() {
            return Err(DurationError::TooLong(s.to_owned()));
        }
    }
    // `total` is at most MAX_DURATION in milliseconds, well inside u64.
    Ok(Duration::from_millis(
        u64::try_from(total).unwrap_or(u64::MAX),
    ))
}

/// Formats a duration the way specs write them (`1h30m`, `500ms`), for messages.
pub fn format_duration(d: Duration) -> String {
    let mut ms = d.as_millis();
    if ms == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, per) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
        if ms >= per {
            out.push_str(&format!("{}{unit}", ms / per));
            ms %= per;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sums() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 0s "), Ok(Duration::ZERO));
    }

    #[test]
    fn refuses_bad_ones() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("30"),
            Err(DurationError::MissingUnit(_))
        ));
        assert!(matches!(
            parse_duration("3d"),
            Err(DurationError::UnknownUnit(_))
        ));
        assert!(matches!(
            parse_duration("m"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("1.5s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("-1s"),
            Err(DurationError::Malformed(_))
        ));
        assert!(matches!(
            parse_duration("721h"),
            Err(DurationError::TooLong(_))
        ));
        assert!(matches!(
            parse_duration("99999999999999999999s"),
            Err(DurationError::TooLong(_))
        ));
    }

    #[test]
    fn formats() {
        assert_eq!(
            format_duration(Duration::from_millis(5_400_500)),
            "1h30m500ms"
        );
        assert_eq!(format_duration(Duration::ZERO), "0s");
    }
}
