//! Statistics of the figures in report.json: percentiles, the relay's Prometheus
//! histogram read as histogram_quantile() does, exact values put into the same
//! buckets. Pure functions on numbers, so the report tests can pin them down.

use serde_json::{json, Value};

fn pct(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub(crate) fn summary(mut v: Vec<f64>) -> Value {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    json!({
        "n": v.len(),
        "p50": pct(&v, 0.50), "p90": pct(&v, 0.90), "p99": pct(&v, 0.99),
        "p999": pct(&v, 0.999), "max": v.last().copied().unwrap_or(f64::NAN),
        "mean": if v.is_empty() { f64::NAN } else { v.iter().sum::<f64>() / v.len() as f64 },
    })
}

/// A sample without labels from Prometheus text.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Percentiles (in ms) of a Prometheus histogram in seconds, interpolated linearly
/// inside the bucket that holds each rank, as `histogram_quantile()` does. The
/// relay's latency buckets grow by √2, so a figure can be off by part of a bucket's
/// width; "max" is the upper bound of the highest non-empty bucket.
pub(crate) fn histogram_summary(text: &str, name: &str) -> Value {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((le, count)) = rest.split_once("\"} ") else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap_or(f64::NAN)
        };
        buckets.push((le, count.trim().parse().unwrap_or(f64::NAN)));
    }
    bucket_summary(&buckets)
}

/// Exact latencies (ms) put into the relay's histogram buckets, so that a baseline
/// measured exactly can be compared with the relay's histogram at equal precision.
pub(crate) fn bucketed_summary(values_ms: &[f64]) -> Value {
    let bounds: Vec<f64> = (0..39)
        .map(|i| 0.0001 * std::f64::consts::SQRT_2.powi(i))
        .chain([f64::INFINITY])
        .collect();
    let buckets: Vec<(f64, f64)> = bounds
        .iter()
        .map(|&le| {
            (
                le,
                values_ms.iter().filter(|&&v| v / 1000.0 <= le).count() as f64,
            )
        })
        .collect();
    bucket_summary(&buckets)
}

/// Cumulative (upper bound in seconds, count) buckets → percentiles in ms.
fn bucket_summary(buckets: &[(f64, f64)]) -> Value {
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    let q = |q: f64| -> f64 {
        let rank = q * total;
        let mut prev = (0.0, 0.0);
        for &(le, n) in buckets {
            if n >= rank && n > prev.1 {
                if le.is_infinite() {
                    return prev.0 * 1000.0;
                }
                return (prev.0 + (le - prev.0) * (rank - prev.1) / (n - prev.1)) * 1000.0;
            }
            prev = (le, n);
        }
        f64::NAN
    };
    let max = buckets
        .iter()
        .scan(0.0, |seen, &(le, n)| {
            let grew = n > *seen;
            *seen = n;
            Some((le, grew))
        })
        .filter(|(_, grew)| *grew)
        .map(|(le, _)| le * 1000.0)
        .last()
        .unwrap_or(f64::NAN);
    json!({
        "n": total, "p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "p999": q(0.999),
        "max": max, "source": "histogram",
    })
}

/// (percentile, value) pairs for a percentile plot.
pub(crate) fn pct_curve(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut out = Vec::new();
    for i in 0..=200 {
        let q = i as f64 / 200.0;
        out.push((q * 100.0, pct(&s, q.max(0.0001))));
    }
    out
}
