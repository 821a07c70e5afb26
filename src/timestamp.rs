//! Millisecond UTC timestamps: WorkOS `updated_at` versions and local write times, and the clock.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// A UTC instant with millisecond precision, stored as `YYYY-MM-DDTHH:MM:SS.mmmZ` so that text order
/// is time order in both databases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Why a timestamp could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not an ISO-8601 timestamp between years 0000 and 9999: {0:?}")]
pub struct TimestampError(String);

impl Timestamp {
    /// Earliest and latest instants that keep the text form fixed-width (years 0000..=9999).
    const MIN_MS: i64 = -62_167_219_200_000;
    const MAX_MS: i64 = 253_402_300_799_999;

    /// From milliseconds since the Unix epoch.
    pub fn from_millis(ms: i64) -> Option<Self> {
        (Self::MIN_MS..=Self::MAX_MS)
            .contains(&ms)
            .then_some(Self(ms))
    }

    /// Milliseconds since the Unix epoch.
    pub fn millis(self) -> i64 {
        self.0
    }

    /// Parses RFC 3339 (any offset, any fraction); sub-millisecond digits are truncated.
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError(text.chars().take(64).collect());
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| err())?;
        let ms = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
        i64::try_from(ms)
            .ok()
            .and_then(Self::from_millis)
            .ok_or_else(err)
    }

    /// The current system time.
    pub fn now() -> Self {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        Self(ms)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        );
        let instant = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.0) * 1_000_000)
            .map_err(|_| fmt::Error)?;
        let text = instant.format(&format).map_err(|_| fmt::Error)?;
        f.write_str(&text)
    }
}

impl TryFrom<String> for Timestamp {
    type Error = TimestampError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl serde::Serialize for Timestamp {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where "now" comes from; tests replace it.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Timestamp;
}

/// The system clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_the_canonical_text_form() {
        let cases = [
            ("2023-11-18T17:10:15.121Z", "2023-11-18T17:10:15.121Z"),
            ("2023-11-18T17:10:15Z", "2023-11-18T17:10:15.000Z"),
            ("2023-11-18T17:10:15.1219Z", "2023-11-18T17:10:15.121Z"),
            ("2023-11-18T19:10:15.121+02:00", "2023-11-18T17:10:15.121Z"),
            ("1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999Z"),
        ];
        for (input, expected) in cases {
            let ts = Timestamp::parse(input).unwrap();
            assert_eq!(ts.to_string(), expected, "canonical form of {input}");
            assert_eq!(
                Timestamp::parse(expected).unwrap(),
                ts,
                "re-parse of {input}"
            );
        }
    }

    #[test]
    fn rejects_text_that_is_not_a_timestamp() {
        for input in [
            "",
            "yesterday",
            "2023-11-18",
            "2023-13-01T00:00:00Z",
            "1700000000",
        ] {
            assert!(
                Timestamp::parse(input).is_err(),
                "{input:?} must be rejected"
            );
        }
    }

    #[test]
    fn text_order_is_time_order() {
        let a = Timestamp::parse("2023-11-18T17:10:15.121Z").unwrap();
        let b = Timestamp::parse("2023-11-18T17:10:15.122Z").unwrap();
        assert!(a < b && a.to_string() < b.to_string());
    }
}
