//! Golden tests of what the bench computes without the stack: write_plots and
//! write_markdown on two synthetic reports, and the statistics report.json is made
//! of, must give byte for byte the files in bench/report/testdata (made by the code
//! before the split into modules). After an intentional change of the output:
//! BENCH_BLESS=1 cargo test --features bench --bin outbox-bench, and review the
//! diff of testdata/.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::stats::{bucketed_summary, histogram_summary, metric_value, pct_curve, summary};
use super::svg::{fmt_num, nice_step};
use super::{write_markdown, write_plots};
// The small parsers and the WAL-age interpolation the scenarios build report.json
// with: pure functions too, pinned down in the same golden file.
use crate::scenarios::{parse_seq, wal_age};
use crate::stack::pg::{conninfo, fmt_lsn, parse_lsn};
use crate::stack::relay::relay_setting;

fn curve(scale: f64) -> Value {
    json!((0..=20)
        .map(|i| json!([i as f64 * 5.0, scale * 1.37f64.powi(i)]))
        .collect::<Vec<_>>())
}

fn lat(p50: f64) -> Value {
    json!({"n": 1000, "p50": p50, "p90": p50 * 1.6, "p99": p50 * 4.1,
           "p999": p50 * 9.3, "max": p50 * 21.7, "mean": p50 * 1.2})
}

fn hist(p50: f64) -> Value {
    let mut v = lat(p50);
    v["source"] = json!("histogram");
    v
}

fn publisher(rate: u64, p50: f64) -> Value {
    json!({
        "rate_target": rate, "seconds": 30, "writers": 4, "committed": rate * 30,
        "achieved_rate": rate as f64 * 0.9987, "received": rate * 30,
        "verified_in_kafka": rate * 30 + 1, "commit_to_consumer_ms": lat(p50),
        "commit_to_record_timestamp_ms": lat(p50 * -0.1),
        "record_timestamp_type": "CreateTime", "curve": curve(p50 / 3.0),
    })
}

fn sustained(full: bool) -> Value {
    let samples: Vec<Value> = (0..37)
        .map(|i| {
            let t = i as f64 * 0.1 + 0.013;
            json!([
                t,
                i * 2113,
                (i % 7) * 1_234_567,
                0.05 + (i % 5) as f64 * 0.21
            ])
        })
        .collect();
    let delivery: Vec<Value> = (0..8)
        .map(|i| json!([i as f64 * 0.5 + 0.02, (i % 3) as f64 * 0.33]))
        .collect();
    let per_second: Vec<Value> = (0..3)
        .map(|s| {
            json!({"t": s + 1, "inserts_per_s": 21000 + s * 917,
                        "lag_bytes_max": 7_000_000 + s, "lag_s_max": 0.8 + s as f64 / 10.0})
        })
        .collect();
    let mut s = json!({
        "baseline_pg_recvlogical": {
            "seconds": 3, "writers": 4, "written": 78_463, "insert_rate": 26146.77,
            "sent_lag_s": lat(0.0004), "sent_lag_bytes": lat(8928.0),
            "cpu_us_per_event": 5.03,
        },
        "sent_lag_s": lat(0.026),
        "max_inflight": 5000.0,
        "seconds": 3, "writers": 4, "written": 65_815,
        "insert_rate": 21920.38,
        "lag_s": lat(0.123), "lag_bytes": lat(2_548_632.0),
        "delivery_lag_s": lat(0.077),
        "delivery_samples": delivery,
        "caught_up_after_stop_s": if full { json!(0.1733) } else { Value::Null },
        "verified_in_kafka": 65_815,
        "relay_cpu_s": 12.81, "relay_cpu_us_per_event": 19.47, "relay_peak_rss_mb": 26.26,
        "per_second": per_second,
        "samples": samples,
    });
    if full {
        s["inflight"] = lat(108.0);
        s["inflight_at_limit_fraction"] = json!(0.0371);
    }
    s
}

/// A relay's latency run: its process's CPU seconds, CPU µs per event and peak
/// RSS, and the p50s of the shadow baseline (every 10th event) measured beside it,
/// as is and in the relay's buckets.
fn relay_figures(run: &mut Value, (cpu_s, cpu_us, rss_mb): (f64, f64, f64), shadow: (f64, f64)) {
    run["relay_cpu_s"] = json!(cpu_s);
    run["relay_cpu_us_per_event"] = json!(cpu_us);
    run["relay_peak_rss_mb"] = json!(rss_mb);
    run["shadow_direct_every"] = json!(10);
    run["shadow_direct_commit_to_ack_ms"] = lat(shadow.0);
    run["shadow_direct_commit_to_ack_bucketed_ms"] = hist(shadow.1);
}

/// Every section and every optional part present (the exactly-once runs too).
fn full() -> Value {
    let mut relay = publisher(5000, 4.965);
    relay["commit_to_ack_ms"] = hist(4.71);
    relay_figures(&mut relay, (5.43, 36.2, 13.05), (6.02, 5.64));
    let mut direct = publisher(5000, 4.341);
    direct["commit_to_ack_ms"] = lat(4.07);
    direct["commit_to_ack_bucketed_ms"] = hist(4.02);
    // The relay with --delivery exactly-once (issue 13): no commit → ack, its
    // Kafka transactions and a read_committed count instead.
    let mut relay_eos = publisher(5000, 21.38);
    relay_eos["delivery"] = json!("exactly-once");
    relay_figures(&mut relay_eos, (7.91, 52.7, 14.62), (6.31, 5.9));
    relay_eos["kafka_transactions_committed"] = json!(9_412.0);
    relay_eos["kafka_transactions_aborted"] = json!(0.0);
    relay_eos["events_per_kafka_transaction"] = json!(15.94);
    relay_eos["kafka_commit_ms"] = hist(9.87);
    relay_eos["read_committed"] = json!({"records": 150_000, "distinct": 150_000, "duplicates": 0});
    // Debezium beside the relay (issue 14).
    let mut debezium = publisher(5000, 2154.8);
    debezium["debezium_cpu_s"] = json!(33.0);
    debezium["debezium_cpu_us_per_event"] = json!(219.8);
    debezium["debezium_peak_rss_mb"] = json!(906.3);
    debezium["debezium_warm_up_events"] = json!(5000);
    let mut relay_low = publisher(1000, 3.9);
    relay_low["commit_to_ack_ms"] = hist(3.5);
    relay_low["relay_cpu_us_per_event"] = json!(60.1);
    relay_low["relay_peak_rss_mb"] = json!(12.4);
    let mut debezium_low = publisher(1000, 61.7);
    debezium_low["debezium_cpu_us_per_event"] = json!(301.0);
    debezium_low["debezium_peak_rss_mb"] = json!(702.5);
    debezium_low["debezium_warm_up_events"] = json!(5000);
    let split = |who: &str, a: f64| {
        let mut v = json!({"wall_s": 7.29, "machine_busy_cores": 1.87,
                           "walsender_cores": 0.61, "broker_cores": 0.42});
        v[format!("{who}_cores")] = json!(a);
        v
    };
    let mut sustained = sustained(true);
    sustained["cpu_split"] = split("relay", 0.44);
    let mut sd = json!({
        "seconds": 60, "writers": 4, "written": 1_016_461, "insert_rate": 16940.9,
        "lag_s": lat(10.33), "lag_bytes": lat(412_000_000.0),
        "delivery_lag_s": lat(10.01), "delivery_rate": 8113.2,
        "sent_lag_s": lat(9.9), "caught_up_after_stop_s": 61.3,
        "verified_in_kafka": 1_016_461,
        "debezium_cpu_s": 124.4, "debezium_cpu_us_per_event": 122.4,
        "debezium_peak_rss_mb": 1970.2,
    });
    sd["cpu_split"] = split("debezium", 1.2);
    sustained["debezium"] = sd;
    json!({
        "environment": {
            "started_utc": "2026-12-02 19:15", "args": "--events 1000000", "cores": 2,
            "cpu": "Intel(R) Xeon(R) Processor", "shared_machine": true,
            "loadavg_start": "1.95 1.87 1.45", "loadavg_end": "7.78 6.35 3.90",
            "git_head": "8c1dd1f", "src_dirty": true,
            "postgres": "postgres (PostgreSQL) 15.18",
            "kafka": "Apache Kafka 4.3.1 (KRaft, one node)", "librdkafka": "2.12.1",
            "fetch_wait_ms": 1, "linger_ms": 1,
            "relay_args": "--max-inflight 5000", "events": 1_000_000,
            "latency_rate": 5000, "sustained_secs": 3, "poll_secs": 60,
            "bench_seconds": 957.43,
            "debezium": "3.6.1.Final", "kafka_connect": "4.3.1",
            "debezium_jvm_opts": "-Xms256m -Xmx2g -XX:+UseG1GC",
            "debezium_offset_flush_ms": 1000,
        },
        "drain": {
            "events": 1_000_000, "payload_bytes": 495.89, "wal_bytes": 860_030_408u64,
            "write": {"seconds": 9.4467, "events_per_s": 105857.23},
            "end_lsn": "0/34D45340",
            "pg_recvlogical": {"seconds": 5.0794, "events_per_s": 196874.83,
                               "cpu_split": split("pg_recvlogical", 0.21)},
            "relay": {"seconds": 7.2865, "events_per_s": 137239.6,
                      "verified_in_kafka": 1_000_000, "cpu_s": 5.06,
                      "cpu_us_per_event": 5.06, "peak_rss_mb": 26.41,
                      "cpu_split": split("relay", 0.69)},
            "debezium": {"seconds": 110.9, "events_per_s": 9017.4, "startup_s": 8.43,
                         "seconds_with_startup": 119.3, "cpu_s": 174.0,
                         "cpu_us_per_event": 174.0, "cpu_s_with_startup": 187.4,
                         "peak_rss_mb": 1386.7, "cpu_split": split("debezium", 1.57),
                         "verified_in_kafka": 1_000_000,
                         "slot_confirmed_after_last_record_s": 1.2,
                         "jvm_opts": "-Xms256m -Xmx2g -XX:+UseG1GC"},
            "relay_exactly_once": {"seconds": 9.1183, "events_per_s": 109669.6,
                      "verified_in_kafka": 1_000_000, "cpu_s": 5.87,
                      "cpu_us_per_event": 5.87, "peak_rss_mb": 27.93,
                      "delivery": "exactly-once",
                      "progress_topic": "bench.6931a2b0.drain.progress",
                      "read_committed": {"records": 1_000_000, "distinct": 1_000_000,
                                         "duplicates": 0},
                      "kafka_transactions_committed": 412.0,
                      "kafka_transactions_aborted": 0.0,
                      "events_per_kafka_transaction": 2427.18,
                      "kafka_commit_ms": hist(23.4)},
            "broker_intake": {"seconds": 3.6448, "events_per_s": 274362.31,
                              "acked": 1_000_000, "failed": 0,
                              "bench_process_cpu_s": 3.72, "verified_in_kafka": 1_000_000},
        },
        "pollers": {
            "classic": {"interval_ms": 5000, "batch": 100, "skip_locked": false,
                        "seconds": 60.106, "published": 1200, "events_per_s": 19.96,
                        "verified_in_kafka": 1200},
            "tuned": {"interval_ms": 100, "batch": 500, "skip_locked": true,
                      "seconds": 60.114, "published": 253_000, "events_per_s": 4208.66,
                      "verified_in_kafka": 253_000},
        },
        "latency": {
            "direct": direct,
            "relay": relay,
            "relay_exactly_once": relay_eos,
            "debezium": debezium,
            "relay_low_rate": relay_low,
            "debezium_low_rate": debezium_low,
            "tuned_poller": publisher(2000, 66.39),
            "classic_poller": publisher(10, 2505.35),
        },
        "sustained": sustained,
    })
}

/// The other side of every optional branch: no pollers, no shadow run, no
/// in-flight samples, no catch-up, no exactly-once runs, an older environment
/// (nisshi, defaults).
fn sparse() -> Value {
    let mut relay = publisher(5000, 4.965);
    relay["commit_to_ack_ms"] = hist(4.71);
    let mut direct = publisher(5000, 4.341);
    direct["commit_to_ack_ms"] = lat(4.07);
    json!({
        "environment": {
            "started_utc": "2025-01-01 00:00", "cores": 1,
            "git_head": "abc1234", "src_dirty": false, "nisshi": "nisshi 0.1",
            "fetch_wait_ms": 100, "linger_ms": 5, "relay_args": "",
        },
        "drain": {
            "events": 200_000, "payload_bytes": 495.0, "wal_bytes": 172_000_000u64,
            "write": {"seconds": 2.0, "events_per_s": 100000.0},
            "pg_recvlogical": {"seconds": 1.0, "events_per_s": 200000.0},
            "relay": {"seconds": 1.6, "events_per_s": 125000.0,
                      "verified_in_kafka": 200_000, "cpu_s": 1.0,
                      "cpu_us_per_event": 5.0, "peak_rss_mb": 20.0},
            "broker_intake": {"seconds": 0.8, "events_per_s": 250000.0,
                              "bench_process_cpu_s": 0.7, "verified_in_kafka": 200_000},
        },
        "latency": {"direct": direct, "relay": relay},
        "sustained": sustained(false),
    })
}

/// Figures missing from runs that did run: the Debezium table leaves out a row
/// whose two figures are both missing, the exactly-once table writes it as NaN.
fn gaps() -> Value {
    let mut r = full();
    for (run, figure) in [
        ("/drain/relay", "cpu_us_per_event"),
        ("/drain/debezium", "cpu_us_per_event"),
        ("/latency/relay", "relay_cpu_us_per_event"),
        ("/latency/relay_exactly_once", "relay_cpu_us_per_event"),
        ("/latency/debezium", "debezium_peak_rss_mb"),
        ("/sustained", "delivery_rate"),
        ("/sustained/debezium", "delivery_rate"),
    ] {
        if let Some(Value::Object(o)) = r.pointer_mut(run) {
            o.remove(figure);
        }
    }
    r
}

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/report/testdata")
}

/// Renders `r` into a scratch directory; returns (file name, contents), sorted.
fn render(name: &str, r: &Value) -> Vec<(String, Vec<u8>)> {
    let out =
        std::env::temp_dir().join(format!("outbox-bench-render-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let plots = write_plots(&out, r).unwrap();
    write_markdown(&out, r, &plots).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    std::fs::remove_dir_all(&out).unwrap();
    files
}

fn golden(name: &str, r: Value) {
    let got = render(name, &r);
    let dir = testdata().join(name);
    if std::env::var_os("BENCH_BLESS").is_some() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (f, body) in &got {
            std::fs::write(dir.join(f), body).unwrap();
        }
        return;
    }
    let mut want: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e} (BENCH_BLESS=1 writes it)", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    want.sort();
    let names: Vec<&String> = got.iter().map(|g| &g.0).collect();
    assert_eq!(names, want.iter().collect::<Vec<_>>(), "files of {name}");
    for (f, body) in &got {
        let expected = std::fs::read(dir.join(f)).unwrap();
        assert!(
            *body == expected,
            "{name}/{f} differs from {}",
            dir.join(f).display()
        );
    }
}

#[test]
fn renders_full_report_unchanged() {
    golden("full", full());
}

#[test]
fn renders_sparse_report_unchanged() {
    golden("sparse", sparse());
}

#[test]
fn renders_report_with_gaps_unchanged() {
    golden("gaps", gaps());
}

/// The figures report.json is made of, from fixed inputs: summaries, the
/// histogram reading, percentile curves, WAL ages and the small parsers.
fn stats_figures() -> Value {
    let v: Vec<f64> = (1..=997)
        .map(|i| ((i * 7919) % 1009) as f64 / 7.0)
        .collect();
    let hist_text = "# TYPE outbox_commit_to_ack_seconds histogram\n\
        outbox_commit_to_ack_seconds_bucket{le=\"0.001\"} 3\n\
        outbox_commit_to_ack_seconds_bucket{le=\"0.0014142135623730952\"} 40\n\
        outbox_commit_to_ack_seconds_bucket{le=\"0.002\"} 90\n\
        outbox_commit_to_ack_seconds_bucket{le=\"0.0028284271247461905\"} 99\n\
        outbox_commit_to_ack_seconds_bucket{le=\"0.004\"} 99\n\
        outbox_commit_to_ack_seconds_bucket{le=\"+Inf\"} 100\n\
        outbox_inflight_events 4711\n";
    let wal: Vec<(f64, u64)> = (0..20)
        .map(|i| (i as f64 * 0.1, (i * i * 1000) as u64))
        .collect();
    let args: Vec<String> = ["--max-inflight", "250", "--x"].map(String::from).to_vec();
    let setting = [
        relay_setting(&args, "--max-inflight"),
        relay_setting(&args, "--x"),
    ];
    let lsn = [
        fmt_lsn(parse_lsn("1A/2B3C").unwrap()),
        parse_lsn("0/0").unwrap().to_string(),
    ];
    let seq = [
        parse_seq(b"{\"pad\": \"x\", \"seq\": 12345}"),
        parse_seq(b"{\"seq\": -1}"),
    ];
    let steps = [
        nice_step(1.0),
        nice_step(7.3),
        nice_step(420.0),
        nice_step(0.012),
    ];
    let nums = [0.0, 0.123, 4.56, 78.9, 1234.0, 56789.0, 1.5e6].map(fmt_num);
    json!({
        "summary": summary(v.clone()),
        "summary_empty": summary(Vec::new()),
        "bucketed": bucketed_summary(&v),
        "histogram": histogram_summary(hist_text, "outbox_commit_to_ack_seconds"),
        "histogram_missing": histogram_summary(hist_text, "nope"),
        "curve": pct_curve(&v),
        "wal_age": (0..20).map(|i| wal_age(&wal, i, (i * 700) as u64)).collect::<Vec<_>>(),
        "metric": metric_value(hist_text, "outbox_inflight_events"),
        "setting": setting,
        "lsn": lsn,
        "conninfo": conninfo("postgres://bench@127.0.0.1:55470/bench_drain"),
        "seq": seq,
        "nice_step": steps,
        "fmt_num": nums,
    })
}

#[test]
fn stats_figures_unchanged() {
    let got = serde_json::to_string_pretty(&stats_figures()).unwrap() + "\n";
    let path = testdata().join("stats.json");
    if std::env::var_os("BENCH_BLESS").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap();
    assert!(got == want, "stats figures differ from {}", path.display());
}

/// Re-renders a saved report.json (BENCH_REPORT_JSON) into BENCH_RENDER_OUT:
/// `cargo test --features bench --bin outbox-bench -- --ignored rerender`.
#[test]
#[ignore]
fn rerender_saved_report() {
    let src = std::env::var("BENCH_REPORT_JSON").expect("BENCH_REPORT_JSON");
    let out = PathBuf::from(std::env::var("BENCH_RENDER_OUT").expect("BENCH_RENDER_OUT"));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let plots = write_plots(&out, &r).unwrap();
    write_markdown(&out, &r, &plots).unwrap();
}
