//! Latency percentiles (nearest rank) in milliseconds.

use std::time::Duration;

use serde_json::{json, Value};

/// Percentiles of one set of samples, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latency {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// From durations.
    pub fn of(samples: impl Iterator<Item = Duration>) -> Self {
        Self::of_micros(samples.map(|d| d.as_micros() as i64).collect())
    }

    /// From signed microseconds (a latency minus a fixed delay may be negative).
    pub fn of_micros(mut us: Vec<i64>) -> Self {
        if us.is_empty() {
            return Self::default();
        }
        us.sort_unstable();
        let rank = |q: f64| {
            let i = ((q * us.len() as f64).ceil() as usize).clamp(1, us.len()) - 1;
            us[i] as f64 / 1000.0
        };
        Self {
            count: us.len(),
            mean: us.iter().sum::<i64>() as f64 / us.len() as f64 / 1000.0,
            p50: rank(0.50),
            p95: rank(0.95),
            p99: rank(0.99),
            max: rank(1.0),
        }
    }

    /// `p50 1.23  p95 4.56  p99 7.89  max 12.00  (mean 2.00)`.
    pub fn text(&self) -> String {
        format!(
            "p50 {:.2}  p95 {:.2}  p99 {:.2}  max {:.2}  (mean {:.2})",
            self.p50, self.p95, self.p99, self.max, self.mean
        )
    }

    pub fn json(&self) -> Value {
        let r = |v: f64| (v * 1000.0).round() / 1000.0;
        json!({"count": self.count, "mean_ms": r(self.mean), "p50_ms": r(self.p50),
               "p95_ms": r(self.p95), "p99_ms": r(self.p99), "max_ms": r(self.max)})
    }
}
