//! The report's Debezium section (issue 14): its targets against Debezium measured in
//! the same run, and, for a target missed, the measurement that shows what limits it.
//! Reads report.json alone, like the rest of the report.

use std::fmt::Write as _;

use serde_json::Value;

use super::beside::Beside;
use super::f;
use super::svg::fmt_num;

fn verdict(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "**missed** (see below)"
    }
}

/// "relay 0.62 + walsender 0.71 + broker 0.40 of 1.95 busy cores"
fn split_text(s: &Value, names: &[&str]) -> String {
    if s.is_null() {
        return "not measured".into();
    }
    let parts: Vec<String> = names
        .iter()
        .filter(|n| !s[format!("{n}_cores")].is_null())
        .map(|n| format!("{n} {:.2}", f(&s[format!("{n}_cores")])))
        .collect();
    format!(
        "{} of {:.2} busy cores",
        parts.join(" + "),
        f(&s["machine_busy_cores"])
    )
}

pub(super) fn debezium(m: &mut String, r: &Value) {
    let (dd, ld, sd) = (
        &r["drain"]["debezium"],
        &r["latency"]["debezium"],
        &r["sustained"]["debezium"],
    );
    if dd.is_null() && ld.is_null() && sd.is_null() {
        return;
    }
    let _ = writeln!(m, "## Debezium beside the relay (issue 14)\n");
    let _ = writeln!(m, "Debezium {} (Postgres connector, Outbox Event Router) in Kafka Connect {} standalone, started by `scripts/debezium` exactly as the differential test (tests/debezium.rs) starts it: idempotent producer, `acks=all`, 5 requests in flight, `linger.ms` {} (the relay's), StringConverter for keys and values, the classic table's columns mapped as the relay's classic preset maps them (key `aggregate_id`, value `payload`, `id` header `event_id`, routed by `event_type`), `offset.flush.interval.ms` {} (Debezium confirms its slot only after Connect flushed its offsets), Debezium's defaults otherwise (`max.batch.size` 2048, `max.queue.size` 8192, `poll.interval.ms` 500). JVM: `{}` (Kafka's `connect-standalone.sh` defaults). Each run has a slot and topics of its own; CPU and RSS are the Connect JVM's, read as the relay's are.\n",
        r["environment"]["debezium"].as_str().unwrap_or("3.6.1.Final"),
        r["environment"]["kafka_connect"].as_str().unwrap_or("4.3.1"),
        r["environment"]["linger_ms"].as_u64().unwrap_or(5),
        r["environment"]["debezium_offset_flush_ms"].as_u64().unwrap_or(1000),
        dd["jvm_opts"].as_str().or(r["environment"]["debezium_jvm_opts"].as_str()).unwrap_or("?"));
    targets(m, r);
    comparison(m, r);
}

/// The five targets, each with its same-run baseline.
fn targets(m: &mut String, r: &Value) {
    let d = &r["drain"];
    let (relay, dbz, recv) = (&d["relay"], &d["debezium"], &d["pg_recvlogical"]);
    let _ = writeln!(
        m,
        "| target | measured | target | same-run baseline | result |\n|---|---|---|---|---|"
    );
    let mut missed = Vec::new();
    if !dbz.is_null() {
        let x = f(&relay["events_per_s"]) / f(&dbz["events_per_s"]);
        let _ = writeln!(m, "| drain vs Debezium | {x:.1} × ({} vs {} events/s) | ≥ 3 × | Debezium over the same backlog from its own slot: {} events/s (stream only; JVM start-up {:.1} s not counted) | {} |",
            fmt_num(f(&relay["events_per_s"])), fmt_num(f(&dbz["events_per_s"])), fmt_num(f(&dbz["events_per_s"])), f(&dbz["startup_s"]), verdict(x >= 3.0));
        if x < 3.0 {
            missed.push("drain_debezium");
        }
    }
    let x = f(&relay["events_per_s"]) / f(&recv["events_per_s"]);
    let _ = writeln!(
        m,
        "| drain vs pg_recvlogical | {x:.2} × | ≥ 0.9 × | pg_recvlogical {} events/s | {} |",
        fmt_num(f(&recv["events_per_s"])),
        verdict(x >= 0.9)
    );
    if x < 0.9 {
        missed.push("drain_recvlogical");
    }
    let (rr, dr) = (super::peak_rss(r), debezium_peak_rss(r));
    if dr.is_finite() {
        let _ = writeln!(m, "| peak RSS vs Debezium | relay {rr:.1} MB = 1/{:.0} of Debezium's | ≤ 1/20 | Debezium (Connect JVM) {dr:.0} MB; both the highest of their scenarios | {} |", dr / rr, verdict(rr * 20.0 <= dr));
        if rr * 20.0 > dr {
            missed.push("rss");
        }
    }
    let (lr, ld) = (&r["latency"]["relay"], &r["latency"]["debezium"]);
    if !ld.is_null() {
        let (a, b) = (
            f(&lr["commit_to_consumer_ms"]["p99"]),
            f(&ld["commit_to_consumer_ms"]["p99"]),
        );
        let _ = writeln!(m, "| p99 commit → consumer vs Debezium, {}/s | {a:.1} ms = 1/{:.1} of Debezium's | ≤ 1/5 | Debezium p99 {b:.1} ms (p50 {:.1} ms) | {} |",
            lr["rate_target"], b / a, f(&ld["commit_to_consumer_ms"]["p50"]), verdict(a * 5.0 <= b));
        if a * 5.0 > b {
            missed.push("p99");
        }
    }
    let ack = f(&lr["commit_to_ack_ms"]["p50"]);
    let direct = f(&r["latency"]["direct"]["commit_to_ack_bucketed_ms"]["p50"]);
    if ack.is_finite() && direct.is_finite() {
        let shadow = &lr["shadow_direct_commit_to_ack_bucketed_ms"];
        let _ = writeln!(m, "| p50 commit → broker ack vs a producer right after COMMIT | {ack:.2} ms = {:.2} × | ≤ 1.5 × | the writers producing right after COMMIT, same broker, run of its own: p50 {direct:.2} ms{} | {} |",
            ack / direct,
            if shadow.is_null() { String::new() } else { format!("; while the relay ran: {:.2} ms", f(&shadow["p50"])) },
            verdict(ack <= 1.5 * direct));
        if ack > 1.5 * direct {
            missed.push("ack");
        }
    }
    let s = &r["sustained"];
    if !s.is_null() {
        let lag = f(&s["lag_s"]["max"]);
        let _ = writeln!(m, "| sustained slot lag at the highest insert rate | max {lag:.2} s (p99 {:.2} s) at {} inserts/s | < 1 s | pg_recvlogical alone, same writers ({} inserts/s): walsender sent lag max {:.2} s | {} |",
            f(&s["lag_s"]["p99"]), fmt_num(f(&s["insert_rate"])), fmt_num(f(&s["baseline_pg_recvlogical"]["insert_rate"])), f(&s["baseline_pg_recvlogical"]["sent_lag_s"]["max"]), verdict(lag < 1.0));
        if lag >= 1.0 {
            missed.push("sustained");
        }
    }
    let _ = writeln!(m);
    if !missed.is_empty() {
        explain(m, r, &missed);
    }
}

/// What limits each missed target, from the run's own measurements.
fn explain(m: &mut String, r: &Value, missed: &[&str]) {
    let d = &r["drain"];
    let _ = writeln!(
        m,
        "What limits the targets missed in this run, measured in it:\n"
    );
    for what in missed {
        match *what {
            "drain_recvlogical" | "drain_debezium" => {
                let _ = writeln!(m, "- **Drain.** The CPU split over each reader's drain (CPU seconds / wall seconds; the machine has {} cores): pg_recvlogical: {}; the relay: {}; Debezium: {}. pg_recvlogical writes to /dev/null, so its walsender has a core to itself; the relay's walsender shares the two cores with the relay and the broker, which must take every record in. A reader that publishes to a broker on the same 2 cores cannot reach the rate of one that publishes nowhere while the machine is saturated; on a machine where the broker runs elsewhere the walsender's core is the limit for both.",
                    r["environment"]["cores"],
                    split_text(&d["pg_recvlogical"]["cpu_split"], &["pg_recvlogical", "walsender"]),
                    split_text(&d["relay"]["cpu_split"], &["relay", "walsender", "broker"]),
                    split_text(&d["debezium"]["cpu_split"], &["debezium", "walsender", "broker"]));
            }
            "sustained" => {
                let s = &r["sustained"];
                let _ = writeln!(m, "- **Sustained lag.** Under the relay the walsender's sent position trails the writers by up to {:.2} s (p99 {:.2} s), against {:.2} s (p99 {:.2} s) with pg_recvlogical alone: most of the slot's lag is decoding waiting for a core, before the relay sees the change. CPU split over the relay's run: {}. The writers, Postgres, its walsender, the relay and the broker share 2 cores; the relay's own share is its CPU per event ({:.1} µs) × the insert rate.",
                    f(&s["sent_lag_s"]["max"]), f(&s["sent_lag_s"]["p99"]),
                    f(&s["baseline_pg_recvlogical"]["sent_lag_s"]["max"]), f(&s["baseline_pg_recvlogical"]["sent_lag_s"]["p99"]),
                    split_text(&s["cpu_split"], &["relay", "walsender", "broker"]),
                    f(&s["relay_cpu_us_per_event"]));
            }
            "ack" => {
                let l = &r["latency"]["relay"];
                let (ack, shadow, alone) = (
                    f(&l["commit_to_ack_ms"]["p50"]),
                    f(&l["shadow_direct_commit_to_ack_bucketed_ms"]["p50"]),
                    f(&r["latency"]["direct"]["commit_to_ack_bucketed_ms"]["p50"]),
                );
                let _ = writeln!(m, "- **Commit → ack.** The same Kafka path measured at the same moment as the relay's run (the writers producing every {}th event themselves right after COMMIT, `--shadow-direct`) had p50 {shadow:.2} ms, against {alone:.2} ms in a run of its own: the relay's {ack:.2} ms is {:.2} × the Kafka path under the same load, and that load (the relay, its walsender, the broker, Postgres and the writers on 2 cores) is what moves the path itself. The relay's figure also starts earlier, at the commit timestamp in the WAL, and includes the walsender's decode and send.",
                    l["shadow_direct_every"], ack / shadow);
            }
            "rss" | "p99" => {
                let _ = writeln!(
                    m,
                    "- **{}.** See the comparison table below for the figures of both.",
                    if *what == "rss" { "Peak RSS" } else { "p99" }
                );
            }
            _ => {}
        }
    }
    let _ = writeln!(m);
}

/// The relay and Debezium figure by figure.
fn comparison(m: &mut String, r: &Value) {
    let _ = writeln!(
        m,
        "| figure | outbox-relay | Debezium | Debezium / relay |\n|---|---|---|---|"
    );
    let mut t = Beside {
        m: &mut *m,
        skip_unmeasured: true,
    };
    let (dr, dd) = (&r["drain"]["relay"], &r["drain"]["debezium"]);
    if !dd.is_null() {
        t.drain(dr, dd);
    }
    let (lr, ld) = (&r["latency"]["relay"], &r["latency"]["debezium"]);
    if !ld.is_null() {
        t.latency(lr, ld, "debezium");
    }
    let (sr, sd) = (&r["sustained"], &r["sustained"]["debezium"]);
    if !sd.is_null() {
        // Rates in whole events, lags in seconds to the hundredth.
        let (rate, lag) = (("", 0), (" s", 2));
        for (label, at, (unit, prec)) in [
            ("inserts/s the writers reached", "/insert_rate", rate),
            ("slot lag p50", "/lag_s/p50", lag),
            ("slot lag max", "/lag_s/max", lag),
            ("delivery lag p50", "/delivery_lag_s/p50", lag),
            (
                "events/s into Kafka while the writers ran",
                "/delivery_rate",
                rate,
            ),
            ("delivery lag max", "/delivery_lag_s/max", lag),
        ] {
            let figure = |v: &Value| v.pointer(at).map_or(f64::NAN, f);
            let label = format!("sustained, {label}");
            t.row(&label, figure(sr), figure(sd), unit, prec);
        }
        t.resources("sustained", (sr, sd), ("relay_", "debezium_"));
    }
    let _ = writeln!(m);
    if !dd.is_null() {
        let _ = writeln!(m, "Drain: Debezium's rate is taken from its first backlog record in Kafka to its last, polled every 20 ms ({} of {} events verified; its JVM started in {:.1} s and used {:.1} s of CPU in all, start-up included); its slot confirmed the end {} after its last record. It was started once before the backlog, on a warm-up row, so that its slot and stored offset predate the backlog.\n",
            dd["verified_in_kafka"], r["drain"]["events"], f(&dd["startup_s"]), f(&dd["cpu_s_with_startup"]),
            dd["slot_confirmed_after_last_record_s"].as_f64().map(|v| format!("{v:.1} s")).unwrap_or("not within 60 s".into()));
    }
    if !ld.is_null() {
        let _ = writeln!(m, "Latency: Debezium published {} warm-up events before the clock started, so its JIT had compiled its hot path; {} of {} events received.\n",
            ld["debezium_warm_up_events"], ld["received"], ld["committed"]);
    }
    let sd = &r["sustained"]["debezium"];
    if !sd.is_null() {
        let _ = writeln!(m, "Sustained: the same writers for {} s with Debezium as the reader, in a run of its own (shorter than the relay's {} s: where Debezium cannot keep up, its lag grows with the run's length and catching up takes as long again; the events/s into Kafka while the writers ran is its sustained rate). After the writers stopped, every event was in Kafka after {} more ({} of {} verified). Debezium's slot trails by up to `offset.flush.interval.ms` by design, and it confirms the last change it processed rather than the end of the WAL, so its catch-up is read from Kafka. CPU split over its run: {}.\n",
            sd["seconds"], r["sustained"]["seconds"], sd["caught_up_after_stop_s"].as_f64().map(|v| format!("{v:.1} s")).unwrap_or("more than 300 s".into()), sd["verified_in_kafka"], sd["written"],
            split_text(&sd["cpu_split"], &["debezium", "walsender", "broker"]));
    }
}

/// Debezium's peak RSS: the highest of the scenarios it ran in.
fn debezium_peak_rss(r: &Value) -> f64 {
    super::highest(&[
        &r["drain"]["debezium"]["peak_rss_mb"],
        &r["latency"]["debezium"]["debezium_peak_rss_mb"],
        &r["sustained"]["debezium"]["debezium_peak_rss_mb"],
    ])
}
