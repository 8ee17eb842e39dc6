//! Minimal SVG figures for the study commands (`accum-study`, `balance-sim`, `schedule`): line
//! charts with optional log axes, and timelines of labelled boxes. Plain text output, no
//! dependencies, viewable in any browser.

use std::fmt::Write as _;

/// One series of a line chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Axis scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scale {
    Linear,
    Log10,
}

/// A line chart.
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: Scale,
    pub y_scale: Scale,
    pub series: Vec<Series>,
}

const PALETTE: &[&str] = &[
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
    "#7f7f7f", "#bcbd22",
];

/// Escape text for SVG.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn tr(v: f64, scale: Scale) -> Option<f64> {
    match scale {
        Scale::Linear => v.is_finite().then_some(v),
        Scale::Log10 => (v > 0.0 && v.is_finite()).then(|| v.log10()),
    }
}

/// A tick label: plain digits from 0.001 to 999999 (K = 4096 reads as 4096), else `1e{e}`.
fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 || (1e-3..1e6).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let e = a.log10().floor() as i32;
        let m = v / 10f64.powi(e);
        if (m - m.round()).abs() < 1e-9 && m.round() == 1.0 {
            format!("1e{e}")
        } else {
            format!("{}e{e}", (m * 100.0).round() / 100.0)
        }
    }
}

/// Ticks of a log axis over `[lo, hi]` (in log10 units): the decades inside the range, and when
/// fewer than three fit, the 2× and 5× (then every 1–9×) values as well, so that a range inside a
/// single decade still gets labelled ticks.
fn log_ticks(lo: f64, hi: f64) -> Vec<(f64, String)> {
    for mantissas in [
        &[1.0][..],
        &[1.0, 2.0, 5.0],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0],
    ] {
        let mut out = Vec::new();
        for e in (lo.floor() as i32 - 1)..=(hi.ceil() as i32) {
            for &m in mantissas {
                let v = m * 10f64.powi(e);
                let l = v.log10();
                if l >= lo - 1e-9 && l <= hi + 1e-9 {
                    out.push((l, number(v)));
                }
            }
        }
        if out.len() >= 3 {
            return out;
        }
    }
    // a range too narrow for any 1–9× value: its two ends
    vec![(lo, number(10f64.powf(lo))), (hi, number(10f64.powf(hi)))]
}

fn ticks(lo: f64, hi: f64, scale: Scale) -> Vec<(f64, String)> {
    match scale {
        Scale::Log10 => log_ticks(lo, hi),
        Scale::Linear => {
            let span = (hi - lo).max(1e-300);
            let step = 10f64.powf((span / 5.0).log10().floor());
            let step = [1.0, 2.0, 5.0, 10.0]
                .iter()
                .map(|m| m * step)
                .find(|s| span / s <= 6.0)
                .unwrap_or(step * 10.0);
            let mut v = (lo / step).ceil() * step;
            let mut out = Vec::new();
            while v <= hi + step * 1e-9 {
                out.push((v, number((v / step).round() * step)));
                v += step;
            }
            out
        }
    }
}

impl LineChart {
    /// Render to an SVG document.
    pub fn to_svg(&self) -> String {
        let (w, h, left, right, top, bottom) = (760.0, 460.0, 80.0, 200.0, 40.0, 60.0);
        let pts: Vec<(f64, f64)> = self
            .series
            .iter()
            .flat_map(|s| {
                s.points
                    .iter()
                    .filter_map(|&(x, y)| Some((tr(x, self.x_scale)?, tr(y, self.y_scale)?)))
            })
            .collect();
        let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
            (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
            |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
        );
        if pts.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        if self.y_scale == Scale::Linear && y0 > 0.0 {
            y0 = 0.0;
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if y1 - y0 < 1e-12 {
            y1 = y0 + 1.0;
        }
        let (pw, ph) = (w - left - right, h - top - bottom);
        let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            esc(&self.title)
        );
        for (v, label) in ticks(x0, x1, self.x_scale) {
            let x = sx(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 16.0,
                esc(&label)
            );
        }
        for (v, label) in ticks(y0, y1, self.y_scale) {
            let y = sy(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                left + pw,
                left - 6.0,
                y + 4.0,
                esc(&label)
            );
        }
        let _ = writeln!(
            s,
            r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 18.0,
            esc(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            top + ph / 2.0,
            top + ph / 2.0,
            esc(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let path: Vec<String> = series
                .points
                .iter()
                .filter_map(|&(x, y)| Some((tr(x, self.x_scale)?, tr(y, self.y_scale)?)))
                .map(|(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
            // small hollow markers drawn under nothing: the line stays visible through them;
            // none on dense series, where they would only blot it
            if path.len() <= 40 {
                for p in &path {
                    let (x, y) = p.split_once(',').expect("x,y");
                    let _ = writeln!(
                        s,
                        r#"<circle cx="{x}" cy="{y}" r="2.5" fill="white" fill-opacity="0.6" stroke="{color}" stroke-width="1.2"/>"#
                    );
                }
            }
            let ly = top + 14.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="3"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                w - right + 12.0,
                w - right + 36.0,
                w - right + 42.0,
                ly + 4.0,
                esc(&series.label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

/// One bar of a [`BarChart`].
pub struct Bar {
    pub label: String,
    pub value: f64,
    /// The text printed after the bar (the value with its unit).
    pub text: String,
    /// Palette index: bars of one kind share a colour.
    pub color: usize,
}

/// A horizontal bar chart (linear or log axis), one labelled bar per row.
pub struct BarChart {
    pub title: String,
    pub x_label: String,
    pub scale: Scale,
    pub bars: Vec<Bar>,
}

impl BarChart {
    /// Render to an SVG document.
    pub fn to_svg(&self) -> String {
        let (w, left, right, top, row) = (860.0, 230.0, 150.0, 44.0, 24.0);
        let ph = row * self.bars.len().max(1) as f64;
        let h = top + ph + 56.0;
        let pw = w - left - right;
        let vals: Vec<f64> = self
            .bars
            .iter()
            .filter_map(|b| tr(b.value, self.scale))
            .collect();
        let hi = vals.iter().copied().fold(f64::MIN, f64::max);
        let (x0, x1) = match self.scale {
            Scale::Linear => (0.0, if hi > 0.0 { hi } else { 1.0 }),
            Scale::Log10 => {
                let lo = vals.iter().copied().fold(f64::MAX, f64::min);
                if vals.is_empty() {
                    (0.0, 1.0)
                } else {
                    (lo.floor(), hi.ceil().max(lo.floor() + 1.0))
                }
            }
        };
        let sx = |v: f64| left + (v - x0) / (x1 - x0) * pw;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="24" font-size="15" text-anchor="middle">{}</text>"#,
            w / 2.0,
            esc(&self.title)
        );
        for (v, label) in ticks(x0, x1, self.scale) {
            let x = sx(v);
            let _ = writeln!(
                s,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                top + ph,
                top + ph + 16.0,
                esc(&label)
            );
        }
        for (i, b) in self.bars.iter().enumerate() {
            let y = top + row * i as f64;
            let end = tr(b.value, self.scale).map_or(left, |v| sx(v).max(left));
            let color = PALETTE[b.color % PALETTE.len()];
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><rect x="{left}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
                left - 8.0,
                y + row * 0.65,
                esc(&b.label),
                y + row * 0.15,
                (end - left).max(0.5),
                row * 0.7,
                end + 6.0,
                y + row * 0.65,
                esc(&b.text)
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{left}" y1="{top}" x2="{left}" y2="{:.1}" stroke="black"/><text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            top + ph,
            left + pw / 2.0,
            h - 14.0,
            esc(&self.x_label)
        );
        s.push_str("</svg>\n");
        s
    }
}

/// One box of a timeline.
pub struct Span {
    pub lane: usize,
    pub start: f64,
    pub end: f64,
    pub label: String,
    pub color: String,
}

/// Lanes of labelled boxes over time (pipeline schedules).
pub struct Timeline {
    pub title: String,
    pub lane_labels: Vec<String>,
    pub spans: Vec<Span>,
    /// Time units per pixel column (boxes are at least this readable).
    pub px_per_unit: f64,
}

impl Timeline {
    pub fn to_svg(&self) -> String {
        let t_end = self.spans.iter().map(|s| s.end).fold(0.0, f64::max);
        let (left, top, lane_h) = (70.0, 40.0, 26.0);
        let w = left + t_end * self.px_per_unit + 20.0;
        let h = top + lane_h * self.lane_labels.len() as f64 + 20.0;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w:.0}" height="{h:.0}" font-family="sans-serif" font-size="11">"#
        );
        let _ = writeln!(s, r#"<rect width="{w:.0}" height="{h:.0}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="22" font-size="14">{}</text>"#,
            esc(&self.title)
        );
        for (i, l) in self.lane_labels.iter().enumerate() {
            let y = top + lane_h * i as f64;
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
                left - 6.0,
                y + lane_h / 2.0 + 4.0,
                esc(l)
            );
        }
        for sp in &self.spans {
            let x = left + sp.start * self.px_per_unit;
            let bw = (sp.end - sp.start) * self.px_per_unit;
            let y = top + lane_h * sp.lane as f64 + 2.0;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y:.1}" width="{bw:.1}" height="{:.1}" fill="{}" stroke="black" stroke-width="0.5"/>"#,
                lane_h - 4.0,
                sp.color
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                x + bw / 2.0,
                y + lane_h / 2.0 + 2.0,
                esc(&sp.label)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_chart_draws_every_series_and_skips_nonpositive_log_points() {
        let c = LineChart {
            title: "t <1>".into(),
            x_label: "K".into(),
            y_label: "err".into(),
            x_scale: Scale::Log10,
            y_scale: Scale::Log10,
            series: vec![
                Series {
                    label: "a".into(),
                    points: vec![(512.0, 1e-3), (4096.0, 2e-2)],
                },
                Series {
                    label: "b".into(),
                    points: vec![(512.0, 0.0), (4096.0, 1e-4)],
                },
            ],
        };
        let svg = c.to_svg();
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(
            svg.matches("<circle").count(),
            3,
            "the zero on a log axis is skipped"
        );
        assert!(svg.contains("t &lt;1&gt;"));
    }

    #[test]
    fn timeline_places_boxes_by_time() {
        let t = Timeline {
            title: "x".into(),
            lane_labels: vec!["r0".into(), "r1".into()],
            spans: vec![Span {
                lane: 1,
                start: 2.0,
                end: 3.0,
                label: "F0".into(),
                color: "#fff".into(),
            }],
            px_per_unit: 10.0,
        };
        let svg = t.to_svg();
        assert!(
            svg.contains(r#"<rect x="90.0" y="68.0" width="10.0""#),
            "{svg}"
        );
    }

    #[test]
    fn log_ticks_label_a_single_decade_and_k_as_numbers() {
        // 128 … 16384 (K in accum-study): decades 1000 and 10000 plus 2× and 5× values, digits
        let t = log_ticks(128f64.log10(), 16384f64.log10());
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["200", "500", "1000", "2000", "5000", "10000"]);
        // inside one decade: 2 … 8 gets every integer
        let t = log_ticks(2f64.log10(), 8f64.log10());
        let labels: Vec<&str> = t.iter().map(|(_, l)| l.as_str()).collect();
        assert_eq!(labels, ["2", "3", "4", "5", "6", "7", "8"]);
        // wide ranges keep the decades, in exponent form beyond 10^6
        let t = log_ticks(-9.0, 12.0);
        assert_eq!(t.first().unwrap().1, "1e-9");
        assert_eq!(t.last().unwrap().1, "1e12");
        assert!(t.iter().any(|(_, l)| l == "1000"));
        assert_eq!(number(0.25), "0.25");
        assert_eq!(number(2.5e9), "2.5e9");
    }

    #[test]
    fn bar_chart_draws_every_bar_with_its_text() {
        let c = BarChart {
            title: "t".into(),
            x_label: "parameters".into(),
            scale: Scale::Log10,
            bars: vec![
                Bar {
                    label: "experts".into(),
                    value: 6.5e11,
                    text: "650B".into(),
                    color: 0,
                },
                Bar {
                    label: "norms".into(),
                    value: 1e6,
                    text: "1M".into(),
                    color: 1,
                },
                Bar {
                    label: "none".into(),
                    value: 0.0,
                    text: "0".into(),
                    color: 1,
                },
            ],
        };
        let svg = c.to_svg();
        assert_eq!(svg.matches("<rect x=").count(), 3);
        for t in ["650B", "1M", "experts", "norms", "1e6", "1e12"] {
            assert!(svg.contains(t), "{t}");
        }
    }
}
