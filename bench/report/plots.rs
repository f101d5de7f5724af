//! Which plots the report has and what goes into them, from report.json alone (never
//! from live measurements), so a saved report can be re-rendered.

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use super::f;
use super::svg::{svg_bars, svg_lines};

/// Writes the plots of the scenarios in `r`; returns their file names, in the order
/// the report shows them.
pub(super) fn write_plots(out: &Path, r: &Value) -> Result<Vec<String>> {
    let mut files = Vec::new();
    let d = &r["drain"];
    if !d.is_null() {
        std::fs::write(out.join("throughput.svg"), throughput(r, d))?;
        files.push("throughput.svg".into());
    }
    let l = &r["latency"];
    if !l.is_null() {
        std::fs::write(out.join("latency.svg"), latency(l))?;
        files.push("latency.svg".into());
    }
    let s = &r["sustained"];
    if let Some(ps) = s["samples"].as_array() {
        write_sustained(out, s, ps)?;
        files.extend([
            "sustained_lag_seconds.svg".into(),
            "sustained_lag_bytes.svg".into(),
            "sustained_rate.svg".into(),
        ]);
    }
    Ok(files)
}

/// An array of [x, y] pairs.
fn pairs(v: &Value) -> Vec<(f64, f64)> {
    v.as_array()
        .map(|a| a.iter().map(|p| (f(&p[0]), f(&p[1]))).collect())
        .unwrap_or_default()
}

/// Drain rates of every reader, and of the pollers when they ran.
fn throughput(r: &Value, d: &Value) -> String {
    let mut bars = vec![
        (
            "pg_recvlogical (decode only)".to_string(),
            f(&d["pg_recvlogical"]["events_per_s"]),
        ),
        (
            "rdkafka producer (broker intake)".to_string(),
            f(&d["broker_intake"]["events_per_s"]),
        ),
        ("outbox-relay".to_string(), f(&d["relay"]["events_per_s"])),
    ];
    if !d["relay_exactly_once"].is_null() {
        bars.push((
            "outbox-relay, exactly-once".into(),
            f(&d["relay_exactly_once"]["events_per_s"]),
        ));
    }
    if !d["debezium"].is_null() {
        bars.push((
            "Debezium (Connect, Event Router)".into(),
            f(&d["debezium"]["events_per_s"]),
        ));
    }
    if !r["pollers"].is_null() {
        bars.push((
            "tuned poller (100 ms, 500)".into(),
            f(&r["pollers"]["tuned"]["events_per_s"]),
        ));
        bars.push((
            "classic poller (5 s, 100)".into(),
            f(&r["pollers"]["classic"]["events_per_s"]),
        ));
    }
    svg_bars(
        &format!(
            "Backlog drain, {} events of ~500 B (log scale)",
            d["events"]
        ),
        "events/s",
        &bars,
    )
}

/// Commit → consumer percentile curves of every publisher.
fn latency(l: &Value) -> String {
    let mut series = vec![("outbox-relay", pairs(&l["relay"]["curve"]))];
    if !l["relay_exactly_once"].is_null() {
        series.push((
            "outbox-relay, exactly-once",
            pairs(&l["relay_exactly_once"]["curve"]),
        ));
    }
    for (k, label) in [
        ("debezium", "Debezium"),
        ("relay_low_rate", "outbox-relay, lower rate"),
        ("debezium_low_rate", "Debezium, lower rate"),
    ] {
        if !l[k].is_null() {
            series.push((label, pairs(&l[k]["curve"])));
        }
    }
    series.extend([
        ("direct produce (baseline)", pairs(&l["direct"]["curve"])),
        ("tuned poller", pairs(&l["tuned_poller"]["curve"])),
        ("classic poller", pairs(&l["classic_poller"]["curve"])),
    ]);
    svg_lines(
        "Commit → record received by a consumer",
        "percentile",
        "latency, ms (log)",
        &series,
        true,
    )
}

/// Lag in seconds and in bytes over time, and the insert rate.
fn write_sustained(out: &Path, s: &Value, ps: &[Value]) -> Result<()> {
    let pick = |i: usize, scale: f64| -> Vec<(f64, f64)> {
        ps.iter().map(|p| (f(&p[0]), f(&p[i]) / scale)).collect()
    };
    let dl = pairs(&s["delivery_samples"]);
    std::fs::write(
        out.join("sustained_lag_seconds.svg"),
        svg_lines(
            "Sustained: relay lag in seconds",
            "time, s",
            "lag, s",
            &[
                ("confirmed (slot)", pick(3, 1.0)),
                ("delivered (Kafka)", dl),
            ],
            false,
        ),
    )?;
    std::fs::write(
        out.join("sustained_lag_bytes.svg"),
        svg_lines(
            "Sustained: unconfirmed WAL (pg_current_wal_lsn − confirmed_flush_lsn)",
            "time, s",
            "lag, MB",
            &[("lag (MB)", pick(2, 1e6))],
            false,
        ),
    )?;
    let rate: Vec<(f64, f64)> = s["per_second"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (f(&p["t"]), f(&p["inserts_per_s"])))
        .collect();
    std::fs::write(
        out.join("sustained_rate.svg"),
        svg_lines(
            "Sustained: inserts per second (one-event transactions)",
            "time, s",
            "events/s",
            &[("inserts/s", rate)],
            false,
        ),
    )?;
    Ok(())
}
