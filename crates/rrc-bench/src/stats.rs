//! Latency summaries.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Records latencies in nanoseconds, 1 ns to 60 s at 3 significant digits.
pub struct Latencies {
    hist: Histogram<u64>,
}

impl Default for Latencies {
    fn default() -> Self {
        Latencies {
            hist: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
        }
    }
}

impl Latencies {
    pub fn record(&mut self, d: Duration) {
        let ns = (d.as_nanos() as u64).clamp(1, 60_000_000_000);
        self.hist.record(ns).expect("clamped into range");
    }

    pub fn add(&mut self, other: &Latencies) {
        self.hist.add(&other.hist).expect("same bounds");
    }

    /// The distribution as `points` (latency in µs, fraction of requests
    /// at or below it), for a plot.
    pub fn cdf(&self, points: usize) -> Vec<(f64, f64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        (0..=points)
            .map(|i| {
                // Denser towards the tail, where the modes differ.
                let q = 1.0 - (1.0 - i as f64 / points as f64).powi(3);
                (self.hist.value_at_quantile(q) as f64 / 1000.0, q)
            })
            .collect()
    }

    pub fn summary(&self) -> Summary {
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: self.hist.len(),
            mean_us: self.hist.mean() / 1000.0,
            p50_us: us(self.hist.value_at_quantile(0.50)),
            p90_us: us(self.hist.value_at_quantile(0.90)),
            p99_us: us(self.hist.value_at_quantile(0.99)),
            p999_us: us(self.hist.value_at_quantile(0.999)),
            max_us: us(self.hist.max()),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles() {
        let mut l = Latencies::default();
        for i in 1..=100u64 {
            l.record(Duration::from_micros(i));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert!((s.p50_us - 50.0).abs() < 0.1, "{s:?}");
        assert!((s.p99_us - 99.0).abs() < 0.1, "{s:?}");
        assert!((s.max_us - 100.0).abs() < 0.1, "{s:?}");
    }
}
