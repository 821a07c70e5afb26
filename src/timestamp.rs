//! Microsecond UTC timestamps: WorkOS `updated_at` versions and local write times, and the clock.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// A UTC instant with microsecond precision, stored as `YYYY-MM-DDTHH:MM:SS.ffffffZ` so that text
/// order is time order in both databases. WorkOS sends milliseconds; a version with finer digits
/// keeps six of them, so two versions within one millisecond still order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

/// Why a timestamp could not be read.
#[derive(Debug, thiserror::Error)]
#[error("not an ISO-8601 timestamp between years 0000 and 9999: {0:?}")]
pub struct TimestampError(String);

impl Timestamp {
    /// Earliest and latest instants that keep the text form fixed-width (years 0000..=9999).
    const MIN_US: i64 = -62_167_219_200_000_000;
    const MAX_US: i64 = 253_402_300_799_999_999;

    /// From microseconds since the Unix epoch.
    pub const fn from_micros(us: i64) -> Option<Self> {
        if us >= Self::MIN_US && us <= Self::MAX_US {
            Some(Self(us))
        } else {
            None
        }
    }

    /// From milliseconds since the Unix epoch.
    pub const fn from_millis(ms: i64) -> Option<Self> {
        match ms.checked_mul(1000) {
            Some(us) => Self::from_micros(us),
            None => None,
        }
    }

    /// Microseconds since the Unix epoch.
    pub fn micros(self) -> i64 {
        self.0
    }

    /// Milliseconds since the Unix epoch (rounded down).
    pub fn millis(self) -> i64 {
        self.0.div_euclid(1000)
    }

    /// Parses RFC 3339 (any offset, any fraction); digits beyond microseconds are truncated.
    pub fn parse(text: &str) -> Result<Self, TimestampError> {
        let err = || TimestampError(text.chars().take(64).collect());
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| err())?;
        let us = parsed.unix_timestamp_nanos().div_euclid(1000);
        i64::try_from(us)
            .ok()
            .and_then(Self::from_micros)
            .ok_or_else(err)
    }

    /// The current system time.
    pub fn now() -> Self {
        let us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as i64);
        Self(us)
    }
}

impl fmt::Display for Timestamp {
    /// Writes `YYYY-MM-DDTHH:MM:SS.ffffffZ` digit by digit (it is on every delivery's path several
    /// times; through the `time` crate's formatter each took about ten times the instructions).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const US_PER_DAY: i64 = 86_400_000_000;
        let (year, month, day) = civil_from_days(self.0.div_euclid(US_PER_DAY));
        let us_of_day = self.0.rem_euclid(US_PER_DAY);
        let year = u32::try_from(year)
            .ok()
            .filter(|y| *y <= 9999)
            .ok_or(fmt::Error)?;
        let seconds_of_day = (us_of_day / 1_000_000) as u32; // < 86_400
        let us_of_second = (us_of_day % 1_000_000) as u32;
        let mut text = *b"0000-00-00T00:00:00.000000Z";
        let mut put = |at: usize, width: usize, mut value: u32| {
            for slot in text[at..at + width].iter_mut().rev() {
                *slot = b'0' + (value % 10) as u8;
                value /= 10;
            }
        };
        put(0, 4, year);
        put(5, 2, month);
        put(8, 2, day);
        put(11, 2, seconds_of_day / 3_600);
        put(14, 2, seconds_of_day / 60 % 60);
        put(17, 2, seconds_of_day % 60);
        put(20, 6, us_of_second);
        // Only ASCII digits and separators were written.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

/// The proleptic Gregorian (year, month, day) of a count of days since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, in 400-year eras of 146,097 days that start on March 1st).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..=146_096
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the year from March 1st
    let mp = (5 * doy + 2) / 153; // month from March, 0..=11
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
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
            ("2023-11-18T17:10:15.121Z", "2023-11-18T17:10:15.121000Z"),
            ("2023-11-18T17:10:15Z", "2023-11-18T17:10:15.000000Z"),
            ("2023-11-18T17:10:15.1219Z", "2023-11-18T17:10:15.121900Z"),
            (
                "2023-11-18T17:10:15.123456789Z",
                "2023-11-18T17:10:15.123456Z",
            ),
            (
                "2023-11-18T19:10:15.121+02:00",
                "2023-11-18T17:10:15.121000Z",
            ),
            ("1969-12-31T23:59:59.999Z", "1969-12-31T23:59:59.999000Z"),
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

    /// What `Display` wrote before it formatted by hand, through the `time` crate.
    fn through_time_crate(ts: Timestamp) -> String {
        use time::macros::format_description;
        let format = format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
        );
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(ts.micros()) * 1_000)
            .unwrap()
            .format(&format)
            .unwrap()
    }

    #[test]
    fn formats_the_edges_of_the_range_and_of_leap_years() {
        let cases = [
            (Timestamp::MIN_US, "0000-01-01T00:00:00.000000Z"),
            (Timestamp::MAX_US, "9999-12-31T23:59:59.999999Z"),
            (0, "1970-01-01T00:00:00.000000Z"),
            (-1, "1969-12-31T23:59:59.999999Z"),
            (951_782_400_000_000, "2000-02-29T00:00:00.000000Z"),
            (-2_203_891_200_000_000, "1900-03-01T00:00:00.000000Z"),
            (-62_162_121_600_000_000, "0000-02-29T00:00:00.000000Z"),
            (1_709_251_199_999_999, "2024-02-29T23:59:59.999999Z"),
        ];
        for (us, expected) in cases {
            let ts = Timestamp::from_micros(us).unwrap();
            assert_eq!(ts.to_string(), expected, "{us} us");
            assert_eq!(through_time_crate(ts), expected, "{us} us through time");
        }
    }

    proptest::proptest! {
        #[test]
        fn formats_as_the_time_crate_does(us in Timestamp::MIN_US..=Timestamp::MAX_US) {
            let ts = Timestamp::from_micros(us).unwrap();
            proptest::prop_assert_eq!(ts.to_string(), through_time_crate(ts));
        }

        #[test]
        fn formats_days_near_the_epoch_as_the_time_crate_does(us in -5_000_000_000_000_000i64..5_000_000_000_000_000) {
            let ts = Timestamp::from_micros(us).unwrap();
            proptest::prop_assert_eq!(ts.to_string(), through_time_crate(ts));
        }
    }

    #[test]
    fn text_order_is_time_order() {
        let a = Timestamp::parse("2023-11-18T17:10:15.121Z").unwrap();
        let b = Timestamp::parse("2023-11-18T17:10:15.122Z").unwrap();
        assert!(a < b && a.to_string() < b.to_string());
    }

    #[test]
    fn versions_within_one_millisecond_keep_their_order() {
        let later = Timestamp::parse("2023-11-18T17:10:15.0009Z").unwrap();
        let earlier = Timestamp::parse("2023-11-18T17:10:15.0001Z").unwrap();
        assert!(earlier < later, "sub-millisecond digits are kept");
        assert!(
            earlier.to_string() < later.to_string(),
            "and so is text order"
        );
    }
}
