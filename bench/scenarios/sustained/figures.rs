//! The sustained section of report.json from the raw samples: lag in seconds
//! interpolated on the WAL's own timeline, delivery lag, per-second maxima. Pure
//! functions of what was sampled, so they never touch the stack.

use serde_json::{json, Value};

use super::{LagSamples, RelayRun};
use crate::log;
use crate::report::stats::summary;

/// The report's "sustained" section.
/// `who` names the reader's CPU and RSS keys ("relay", "debezium").
pub(super) fn figures(baseline: Value, run: RelayRun, who: &str) -> Value {
    let RelayRun {
        secs,
        writers: nw,
        max_inflight,
        lag: LagSamples {
            samples,
            sent,
            inflight,
        },
        ksamples,
        written,
        write_s,
        caught_up,
        verified,
        cpu,
        rss,
        cpu_split,
    } = run;
    let (wal_t, series) = lag_series(&samples);
    let delivery = delivery_lag(&ksamples, &samples);
    let delivery_steady: Vec<f64> = delivery
        .iter()
        .filter(|x| x.0 >= 1.0)
        .map(|x| x.1)
        .collect();
    let per_sec = per_second(&series, secs);
    // Ignore the first second (writers connecting) for the "throughout" figures.
    let steady: Vec<f64> = series.iter().filter(|x| x.0 >= 1.0).map(|x| x.3).collect();
    let steady_b: Vec<f64> = series
        .iter()
        .filter(|x| x.0 >= 1.0)
        .map(|x| x.2 as f64)
        .collect();
    log(format!(
        "sustained/{who}: {written} events ({:.0}/s), lag max {:.2} s, caught up {:?} s after stop, verified {verified}",
        written as f64 / write_s,
        steady.iter().cloned().fold(0.0, f64::max),
        caught_up
    ));
    let sent_lag: Vec<f64> = (0..wal_t.len().min(sent.len()))
        .filter(|&i| wal_t[i].0 >= 1.0)
        .map(|i| wal_age(&wal_t, i, sent[i]))
        .collect();
    let at_limit = inflight
        .iter()
        .filter(|&&v| v >= 0.95 * max_inflight)
        .count();
    let mut out = json!({
        "baseline_pg_recvlogical": baseline,
        "sent_lag_s": summary(sent_lag),
        "inflight": summary(inflight.clone()),
        "inflight_at_limit_fraction": at_limit as f64 / inflight.len().max(1) as f64,
        "max_inflight": max_inflight,
        "seconds": secs, "writers": nw, "written": written,
        "insert_rate": written as f64 / write_s,
        "lag_s": summary(steady), "lag_bytes": summary(steady_b),
        "delivery_lag_s": summary(delivery_steady),
        // Events in Kafka per second while the writers ran: the reader's
        // sustained rate when it cannot keep up with them.
        "delivery_rate": ksamples.last().map(|&(t, n)| n as f64 / t).unwrap_or(f64::NAN),
        "cpu_split": cpu_split,
        "delivery_samples": delivery.iter().map(|x| json!([x.0, x.1])).collect::<Vec<_>>(),
        "caught_up_after_stop_s": caught_up,
        "verified_in_kafka": verified,
        "per_second": per_sec,
        "samples": series.iter().map(|x| json!([x.0, x.1, x.2, x.3])).collect::<Vec<_>>(),
    });
    out[format!("{who}_cpu_s")] = json!(cpu);
    out[format!("{who}_cpu_us_per_event")] = json!(cpu * 1e6 / written as f64);
    out[format!("{who}_peak_rss_mb")] = json!(rss);
    out
}

/// How long ago (s) at sample `i` the WAL insert position was at `pos`, interpolated
/// between the (t, WAL position) samples up to `i`.
pub(crate) fn wal_age(samples: &[(f64, u64)], i: usize, pos: u64) -> f64 {
    let t = samples[i].0;
    if pos >= samples[i].1 {
        return 0.0;
    }
    match samples[..=i].iter().position(|s| s.1 >= pos) {
        None | Some(0) => t,
        Some(j) => {
            let ((ta, wa), (tb, wb)) = (samples[j - 1], samples[j]);
            let f = if wb > wa {
                pos.saturating_sub(wa) as f64 / (wb - wa) as f64
            } else {
                1.0
            };
            t - (ta + f * (tb - ta))
        }
    }
}

/// Per sample: (t s, events written, lag bytes, lag s).
type LagPoint = (f64, u64, u64, f64);

/// The WAL position over time, and the lag at each sample.
fn lag_series(samples: &[(f64, u64, u64, u64)]) -> (Vec<(f64, u64)>, Vec<LagPoint>) {
    // Lag in seconds at sample i: how long ago the WAL insert position was where the
    // confirmed position is now (linear between samples).
    let wal_t: Vec<(f64, u64)> = samples.iter().map(|s| (s.0, s.2)).collect();
    let series: Vec<LagPoint> = samples
        .iter()
        .enumerate()
        .map(|(i, &(t, n, wal, conf))| (t, n, wal.saturating_sub(conf), wal_age(&wal_t, i, conf)))
        .collect();
    (wal_t, series)
}

/// Delivery lag: how long ago the writers had committed as many events as Kafka holds.
fn delivery_lag(ksamples: &[(f64, i64)], samples: &[(f64, u64, u64, u64)]) -> Vec<(f64, f64)> {
    ksamples
        .iter()
        .map(|&(t, n)| {
            let n = n.max(0) as u64;
            let j = samples.iter().position(|s| s.1 >= n);
            let lag = match j {
                Some(0) => 0.0,
                None => samples.last().map(|l| t - l.0).unwrap_or(0.0),
                Some(j) => {
                    let (ta, na, _, _) = samples[j - 1];
                    let (tb, nb, _, _) = samples[j];
                    let f = if nb > na {
                        (n - na) as f64 / (nb - na) as f64
                    } else {
                        1.0
                    };
                    (t - (ta + f * (tb - ta))).max(0.0)
                }
            };
            (t, lag)
        })
        .collect()
}

/// Per second: max lag in that second and inserts in that second.
fn per_second(series: &[LagPoint], secs: u64) -> Vec<Value> {
    let mut per_sec: Vec<Value> = Vec::new();
    let mut prev_n = 0;
    for s in 0..secs {
        let in_sec: Vec<_> = series
            .iter()
            .filter(|x| x.0 >= s as f64 && x.0 < (s + 1) as f64)
            .collect();
        if in_sec.is_empty() {
            continue;
        }
        let last_n = in_sec.last().unwrap().1;
        per_sec.push(json!({
            "t": s + 1,
            "inserts_per_s": last_n - prev_n,
            "lag_bytes_max": in_sec.iter().map(|x| x.2).max().unwrap(),
            "lag_s_max": in_sec.iter().map(|x| x.3).fold(0.0, f64::max),
        }));
        prev_n = last_n;
    }
    per_sec
}
