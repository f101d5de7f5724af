//! Hand-written SVG charts (lines, log-scale bars) and the number format the report
//! shares with them. No plotting dependency, so the bench builds with what the relay
//! already depends on; output must stay byte-identical for the same input.

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

/// A line chart; `log_y` uses a base-10 axis (values ≤ 0 are clipped).
pub(crate) fn svg_lines(
    title: &str,
    xl: &str,
    yl: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    log_y: bool,
) -> String {
    let (w, h, ml, mr, mt, mb) = (820.0, 420.0, 70.0, 170.0, 40.0, 50.0);
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
    let ty = |y: f64| if log_y { y.max(0.1).log10() } else { y };
    let (ly0, ly1) = if log_y {
        (
            ty(y0.max(0.1)).floor(),
            ty(y1.max(0.1)).ceil().max(ty(y0.max(0.1)).floor() + 1.0),
        )
    } else {
        let step = nice_step((y1.max(0.0) - 0.0).max(1e-9));
        (0.0, ((y1.max(0.0) / step).ceil() * step).max(step))
    };
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let py = |y: f64| h - mb - (ty(y) - ly0) / (ly1 - ly0) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="{w}" height="{h}" fill="white"/>
<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>
"#,
        (w - mr + ml) / 2.0,
        esc(title)
    );
    // axes and grid
    let xs = nice_step(x1 - x0);
    let mut xv = (x0 / xs).ceil() * xs;
    while xv <= x1 + 1e-9 {
        let x = px(xv);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{mt}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
            h - mb,
            h - mb + 16.0,
            fmt_num(xv)
        );
        xv += xs;
    }
    let yticks: Vec<f64> = if log_y {
        (ly0 as i32..=ly1 as i32).map(|e| 10f64.powi(e)).collect()
    } else {
        let st = nice_step(ly1 - ly0);
        (0..=((ly1 - ly0) / st).round() as i32)
            .map(|i| ly0 + i as f64 * st)
            .collect()
    };
    for yv in yticks {
        let y = py(yv);
        let _ = writeln!(
            s,
            r##"<line x1="{ml}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            w - mr,
            ml - 6.0,
            y + 4.0,
            fmt_num(yv)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
        w - ml - mr,
        h - mt - mb
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
        (w - mr + ml) / 2.0,
        h - 12.0,
        esc(xl)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}</text>"#,
        (h - mb + mt) / 2.0,
        (h - mb + mt) / 2.0,
        esc(yl)
    );
    for (i, (name, pts)) in series.iter().enumerate() {
        let col = COLORS[i % COLORS.len()];
        let path: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{col}" stroke-width="1.8" points="{}"/>"#,
            path.join(" ")
        );
        let ly = mt + 10.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{col}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            w - mr + 10.0,
            w - mr + 30.0,
            w - mr + 35.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
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
