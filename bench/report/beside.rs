//! The tables that set the relay's figures beside another run's of the same
//! scenarios (Debezium's, the exactly-once relay's), figure by figure with the
//! ratio other / relay: one row format for both, so the two tables read alike.

use std::fmt::Write as _;

use serde_json::Value;

use super::f;
use super::svg::fmt_num;

/// The rows of one such table, written into the report.
pub(super) struct Beside<'m> {
    pub(super) m: &'m mut String,
    /// Leave out a row whose two figures are both missing, as the Debezium table
    /// always has; the exactly-once table writes such a row with NaN.
    pub(super) skip_unmeasured: bool,
}

impl Beside<'_> {
    /// `| label | a | b | b / a |`, both figures in `unit` to `prec` decimals.
    pub(super) fn row(&mut self, label: &str, a: f64, b: f64, unit: &str, prec: usize) {
        if self.skip_unmeasured && !a.is_finite() && !b.is_finite() {
            return;
        }
        let _ = writeln!(
            self.m,
            "| {label} | {a:.prec$}{unit} | {b:.prec$}{unit} | {:.2} |",
            b / a
        );
    }

    /// The drain's rate, CPU per event and peak RSS of both runs.
    pub(super) fn drain(&mut self, a: &Value, b: &Value) {
        let (ra, rb) = (f(&a["events_per_s"]), f(&b["events_per_s"]));
        let _ = writeln!(
            self.m,
            "| drain, events/s | {} | {} | {:.2} |",
            fmt_num(ra),
            fmt_num(rb),
            rb / ra
        );
        self.resources("drain", (a, b), ("", ""));
    }

    /// The latency's commit → consumer percentiles at `b`'s rate, then CPU per
    /// event and peak RSS of the relay and of `b_process` (whose figures `b` holds
    /// as `{b_process}_cpu_us_per_event`, …).
    pub(super) fn latency(&mut self, a: &Value, b: &Value, b_process: &str) {
        let (ca, cb) = (&a["commit_to_consumer_ms"], &b["commit_to_consumer_ms"]);
        for (q, name) in [("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")] {
            let label = format!(
                "latency at {}/s, commit → consumer {name}",
                b["rate_target"]
            );
            self.row(&label, f(&ca[q]), f(&cb[q]), " ms", 2);
        }
        let b_prefix = format!("{b_process}_");
        self.resources("latency", (a, b), ("relay_", &b_prefix));
    }

    /// A scenario's CPU per event and peak RSS of both runs, held in each as
    /// `{prefix}cpu_us_per_event` and `{prefix}peak_rss_mb`.
    pub(super) fn resources(
        &mut self,
        scenario: &str,
        runs: (&Value, &Value),
        prefixes: (&str, &str),
    ) {
        let ((a, b), (pa, pb)) = (runs, prefixes);
        let figure = |v: &Value, prefix: &str, name: &str| f(&v[format!("{prefix}{name}")]);
        for (label, name, unit) in [
            ("CPU µs/event", "cpu_us_per_event", ""),
            ("peak RSS", "peak_rss_mb", " MB"),
        ] {
            let (x, y) = (figure(a, pa, name), figure(b, pb, name));
            self.row(&format!("{scenario}, {label}"), x, y, unit, 1);
        }
    }
}
