//! Hand-written SVG charts (lines, log-scale bars) and the number format the report
//! shares with them. No plotting dependency, so the bench builds with what the relay
//! already depends on. Draws only what it is given and never reads report.json:
//! which figures go into a plot is plots.rs's business.

use std::fmt::Write as _;

const COLORS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];

pub(super) fn nice_step(range: f64) -> f64 {
    let raw = range / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    mag * if r < 1.5 {
        1.0
    } else if r < 3.5 {
        2.0
    } else if r < 7.5 {
        5.0
    } else {
        10.0
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub(crate) fn fmt_num(v: f64) -> String {
    if v.abs() >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v.abs() >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.abs() >= 1000.0 {
        format!("{:.1}k", v / 1e3)
    } else if v.abs() >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// A line chart's canvas: size and margins, in pixels.
const W: f64 = 820.0;
const H: f64 = 420.0;
const ML: f64 = 70.0;
const MR: f64 = 170.0;
const MT: f64 = 40.0;
const MB: f64 = 50.0;

/// The data range of a line chart and how it maps onto the canvas.
struct Frame {
    x0: f64,
    x1: f64,
    /// The y axis, in axis units (log10 of the value with `log_y`).
    ly0: f64,
    ly1: f64,
    log_y: bool,
}

impl Frame {
    fn new(series: &[(&str, Vec<(f64, f64)>)], log_y: bool) -> Frame {
        let pts = series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.1.is_finite());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 <= x0 {
            x1 = x0 + 1.0;
        }
        let ty = |y: f64| axis_y(y, log_y);
        let (ly0, ly1) = if log_y {
            (
                ty(y0.max(0.1)).floor(),
                ty(y1.max(0.1)).ceil().max(ty(y0.max(0.1)).floor() + 1.0),
            )
        } else {
            let step = nice_step((y1.max(0.0) - 0.0).max(1e-9));
            (0.0, ((y1.max(0.0) / step).ceil() * step).max(step))
        };
        Frame {
            x0,
            x1,
            ly0,
            ly1,
            log_y,
        }
    }

    fn px(&self, x: f64) -> f64 {
        ML + (x - self.x0) / (self.x1 - self.x0) * (W - ML - MR)
    }

    fn py(&self, y: f64) -> f64 {
        H - MB - (axis_y(y, self.log_y) - self.ly0) / (self.ly1 - self.ly0) * (H - MT - MB)
    }

    fn y_ticks(&self) -> Vec<f64> {
        let (ly0, ly1) = (self.ly0, self.ly1);
        if self.log_y {
            (ly0 as i32..=ly1 as i32).map(|e| 10f64.powi(e)).collect()
        } else {
            let st = nice_step(ly1 - ly0);
            (0..=((ly1 - ly0) / st).round() as i32)
                .map(|i| ly0 + i as f64 * st)
                .collect()
        }
    }
}

/// A value in y axis units: base-10 log with `log_y` (values ≤ 0.1 are clipped).
fn axis_y(y: f64, log_y: bool) -> f64 {
    if log_y {
        y.max(0.1).log10()
    } else {
        y
    }
}

/// A line chart; `log_y` uses a base-10 axis (values ≤ 0 are clipped).
pub(crate) fn svg_lines(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> String {
    let fr = Frame::new(series, log_y);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="{W}" height="{H}" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        (W - MR + ML) / 2.0,
        esc(title)
    );
    grid(&mut s, &fr);
    axes(&mut s, xl, yl);
    for (i, (name, pts)) in series.iter().enumerate() {
        line(&mut s, &fr, i, name, pts);
    }
    s.push_str("</svg>\n");
    s
}

/// Grid lines with their tick labels, x then y.
fn grid(s: &mut String, fr: &Frame) {
    let xs = nice_step(fr.x1 - fr.x0);
    let mut xv = (fr.x0 / xs).ceil() * xs;
    while xv <= fr.x1 + 1e-9 {
        let x = fr.px(xv);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{MT}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            H - MB,
            H - MB + 16.0,
            fmt_num(xv)
        );
        xv += xs;
    }
    for yv in fr.y_ticks() {
        let y = fr.py(yv);
        let _ = writeln!(
            s,
            r##"<line x1="{ML}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - MR,
            ML - 6.0,
            y + 4.0,
            fmt_num(yv)
        );
    }
}

/// The plot area's border and the axis titles.
fn axes(s: &mut String, xl: &str, yl: &str) {
    let _ = writeln!(
        s,
        r##"<rect x="{ML}" y="{MT}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        W - ML - MR,
        H - MT - MB
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (W - MR + ML) / 2.0,
        H - 12.0,
        esc(xl)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (H - MB + MT) / 2.0,
        (H - MB + MT) / 2.0,
        esc(yl)
    );
}

/// Series `i`: its polyline and its legend entry.
fn line(s: &mut String, fr: &Frame, i: usize, name: &str, pts: &[(f64, f64)]) {
    let col = COLORS[i % COLORS.len()];
    let path: Vec<String> = pts
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|&(x, y)| format!("{:.1},{:.1}", fr.px(x), fr.py(y)))
        .collect();
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{col}" stroke-width="1.8" points="{}"/>"#,
        path.join(" ")
    );
    let ly = MT + 10.0 + i as f64 * 18.0;
    let _ = writeln!(
        s,
        r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
        W - MR + 10.0,
        W - MR + 30.0,
        W - MR + 35.0,
        ly + 4.0,
        esc(name)
    );
}

/// Horizontal bars on a log axis (rates spanning 20/s to 100k+/s).
pub(crate) fn svg_bars(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (w, ml, mr, bh) = (820.0, 230.0, 110.0, 26.0);
    let h = 70.0 + bars.len() as f64 * (bh + 10.0) + 30.0;
    let vmax = bars.iter().map(|b| b.1).fold(1.0, f64::max);
    // The log axis starts at 1 (10^0): the smallest bar here is the classic poller's
    // ~20 events/s, and values below 1 are drawn at 1.
    let (l0, l1) = (0.0, vmax.log10().ceil());
    let px = |v: f64| ml + (v.max(1.0).log10() - l0) / (l1 - l0) * (w - ml - mr);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12"><rect width="{w}" height="{h}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        w / 2.0,
        esc(title)
    );
    let top = 45.0;
    let bottom = h - 30.0;
    for e in l0 as i32..=l1 as i32 {
        let x = px(10f64.powi(e));
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            bottom + 15.0,
            fmt_num(10f64.powi(e))
        );
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = top + 10.0 + i as f64 * (bh + 10.0);
        let col = COLORS[i % COLORS.len()];
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text><rect x="{ml}" y="{y:.1}" width="{:.1}" height="{bh}" fill="{col}"/><text x="{:.1}" y="{:.1}">{} {}</text>"#,
            ml - 8.0,
            y + bh / 2.0 + 4.0,
            esc(label),
            (px(*v) - ml).max(1.0),
            px(*v) + 6.0,
            y + bh / 2.0 + 4.0,
            fmt_num(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>\n");
    s
}
