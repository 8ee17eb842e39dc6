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

fn ticks(lo: f64, hi: f64, scale: Scale) -> Vec<(f64, String)> {
    match scale {
        // only the decades inside the plotted range
        Scale::Log10 => (lo.floor() as i32..=hi.ceil() as i32)
            .filter(|&e| f64::from(e) >= lo - 1e-9 && f64::from(e) <= hi + 1e-9)
            .map(|e| (f64::from(e), format!("1e{e}")))
            .collect(),
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
                out.push((v, format!("{}", (v / step).round() * step)));
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
            for p in &path {
                let (x, y) = p.split_once(',').expect("x,y");
                let _ = writeln!(s, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
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
}
