//! The report: report.json's statistics, and report.md and the SVG plots rendered
//! from report.json. Rendering reads only the JSON, so it can be tested (and re-run)
//! without the stack.

mod beside;
mod debezium;
mod markdown;
mod plots;
pub(crate) mod stats;
mod svg;
#[cfg(test)]
mod tests;

use std::path::Path;

use anyhow::Result;
use serde_json::Value;

use markdown::write_markdown;
use plots::write_plots;

/// Writes the plots, report.json and report.md of `report` into `out`.
pub(crate) fn write(out: &Path, report: &Value) -> Result<()> {
    let plots = write_plots(out, report)?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(report)?,
    )?;
    write_markdown(out, report, &plots)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// The relay's peak RSS: the highest of the scenarios that ran.
pub(super) fn peak_rss(r: &Value) -> f64 {
    highest(&[
        &r["drain"]["relay"]["peak_rss_mb"],
        &r["latency"]["relay"]["relay_peak_rss_mb"],
        &r["sustained"]["relay_peak_rss_mb"],
    ])
}

/// The highest of the figures present (NaN when none is).
pub(super) fn highest(figures: &[&Value]) -> f64 {
    figures
        .iter()
        .map(|v| f(v))
        .filter(|v| v.is_finite())
        .fold(f64::NAN, f64::max)
}
