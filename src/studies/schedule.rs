//! `dsv3 schedule`: pipeline schedules (1F1B, ZB1P, DualPipe) simulated on a cost model, their
//! bubble and activation memory next to V3 Table 2, and a Figure-5-style timeline image.

use std::io::Write;
use std::path::PathBuf;

use dsv3_reference::train::dualpipe::{
    activation_formula, bubble_formula, build, check_timeline, formula_regime, simulate, Costs,
    Method, Op, Schedule, Simulation,
};

use crate::registry::error::Result;
use crate::registry::table::Table;
use crate::studies::plot::{Span, Timeline};

crate::choice! {
    /// What to show.
    pub enum ScheduleKind {
        OneFOneB = "1f1b",
        Zb1p = "zb1p",
        Dualpipe = "dualpipe",
        /// Bubble and memory of all three for PP ∈ {4, 8, 16} next to Table 2.
        Table = "table",
    }
}

#[derive(Debug, Clone)]
pub struct ScheduleParams {
    /// The schedule to simulate, or `table` for the bubble/memory table of all three.
    pub kind: ScheduleKind,
    /// Pipeline ranks PP.
    pub pp: usize,
    /// Micro-batches (DualPipe: both directions together).
    pub micro: usize,
    /// Forward chunk time F.
    pub f: f64,
    /// Full backward chunk time B (input + weights).
    pub b: f64,
    /// Backward-for-weights time W (part of B).
    pub w: f64,
    /// Overlapped forward+backward pair time F&B.
    pub fb: f64,
    /// Timeline image path (default: <kind>_pp<PP>_micro<M>.svg in the current directory).
    pub svg: Option<PathBuf>,
}

impl Default for ScheduleParams {
    /// V3's setting: DualPipe over 8 ranks, 20 micro-batches, F = 1, B = 2, W = 1, F&B = 3.
    fn default() -> Self {
        ScheduleParams {
            kind: ScheduleKind::Dualpipe,
            pp: 8,
            micro: 20,
            f: 1.0,
            b: 2.0,
            w: 1.0,
            fb: 3.0,
            svg: None,
        }
    }
}

impl ScheduleParams {
    fn costs(&self) -> Costs {
        Costs {
            f: self.f,
            b: self.b,
            w: self.w,
            fb: self.fb,
        }
    }
}

fn method(kind: ScheduleKind) -> Option<Method> {
    match kind {
        ScheduleKind::OneFOneB => Some(Method::OneFOneB),
        ScheduleKind::Zb1p => Some(Method::Zb1p),
        ScheduleKind::Dualpipe => Some(Method::DualPipe),
        ScheduleKind::Table => None,
    }
}

/// Table 2's bubble formula in words.
pub fn formula_text(m: Method) -> &'static str {
    match m {
        Method::OneFOneB => "(PP−1)(F+B)",
        Method::Zb1p => "(PP−1)(F+B−2W)",
        Method::DualPipe => "(PP/2−1)(F&B+B−3W)",
    }
}

/// Build, simulate and re-check one schedule.
pub fn run(m: Method, pp: usize, micro: usize, c: &Costs) -> Result<(Schedule, Simulation)> {
    // events, simulation and timeline drawing: about 1 KiB per (stage, micro-batch) pair
    // (measured: 0.34 GB for PP 4 × 100,000)
    crate::registry::limits::ensure_elements(
        &format!("schedule: --pp {pp} × --micro {micro}"),
        &[pp, micro],
        1024,
    )?;
    let s = build(m, pp, micro)?;
    let sim = simulate(&s, c)?;
    check_timeline(&s, &sim)?;
    Ok((s, sim))
}

/// One row of the bubble table.
#[derive(Debug, Clone)]
pub struct BubbleRow {
    pub pp: usize,
    pub method: Method,
    pub micro: usize,
    pub simulated: f64,
    pub formula: f64,
    pub activations: usize,
    pub activation_formula: usize,
    pub params: usize,
    pub regime: Option<&'static str>,
}

/// Table 2 for PP ∈ `pps`, micro-batches `max(20, 2·PP)` for every method.
pub fn bubble_table(pps: &[usize], c: &Costs) -> Result<Vec<BubbleRow>> {
    let mut rows = Vec::new();
    for &pp in pps {
        let micro = (2 * pp).max(20);
        for m in [Method::OneFOneB, Method::Zb1p, Method::DualPipe] {
            let (s, sim) = run(m, pp, micro, c)?;
            rows.push(BubbleRow {
                pp,
                method: m,
                micro,
                simulated: sim.bubble(),
                formula: bubble_formula(m, pp, c),
                activations: sim.activations(),
                activation_formula: activation_formula(m, pp),
                params: s.stages_per_device(),
                regime: formula_regime(m, c),
            });
        }
    }
    Ok(rows)
}

pub fn render_bubble_table(rows: &[BubbleRow]) -> String {
    let mut t = Table::new(&[
        "PP",
        "method",
        "micro",
        "bubble (simulated)",
        "Table 2 bubble",
        "= value",
        "activations (simulated)",
        "Table 2 activations",
        "params/device",
        "formula regime",
    ]);
    for r in rows {
        t.row(vec![
            r.pp.to_string(),
            r.method.name().into(),
            r.micro.to_string(),
            format!("{}", r.simulated),
            formula_text(r.method).into(),
            format!("{}", r.formula),
            r.activations.to_string(),
            format!(
                "{} = {}",
                if r.method == Method::DualPipe {
                    "PP+1"
                } else {
                    "PP"
                },
                r.activation_formula
            ),
            format!("{}×", r.params),
            r.regime.unwrap_or("yes").into(),
        ]);
    }
    t.render()
}

const F_COLOR: &str = "#f5a623";
const B_COLOR: &str = "#7ed321";
const BI_COLOR: &str = "#c3ef8f";
const W_COLOR: &str = "#7fb8f0";

/// Figure 5 as an SVG: one lane per device; forward orange, backward green, backward-for-input
/// light green, weights blue, an overlapped pair as its forward and backward halves side by
/// side. Labels: micro-batch ids, the reverse direction numbered after the forward one.
pub fn timeline(s: &Schedule, sim: &Simulation, c: &Costs) -> Timeline {
    let per_dir = s.per_direction();
    let id = |dir: usize, mb: usize| (dir * per_dir + mb).to_string();
    let mut spans = Vec::new();
    for sp in &sim.spans {
        let mut push = |start: f64, end: f64, label: String, color: &str| {
            spans.push(Span {
                lane: sp.device,
                start,
                end,
                label,
                color: color.into(),
            });
        };
        match sp.op {
            Op::F(ch) => push(sp.start, sp.end, id(ch.dir, ch.mb), F_COLOR),
            Op::B(ch) => push(sp.start, sp.end, id(ch.dir, ch.mb), B_COLOR),
            Op::Bi(ch) => push(sp.start, sp.end, id(ch.dir, ch.mb), BI_COLOR),
            Op::W(ch) => push(sp.start, sp.end, id(ch.dir, ch.mb), W_COLOR),
            Op::Fb { f, b } => {
                // split the pair's box in the ratio F : B
                let mid = sp.start + (sp.end - sp.start) * c.f / (c.f + c.b);
                push(sp.start, mid, id(f.dir, f.mb), F_COLOR);
                push(mid, sp.end, id(b.dir, b.mb), B_COLOR);
            }
        }
    }
    let dirs = if s.directions() == 2 {
        format!(
            " (0–{} from device 0, {}–{} from device {})",
            per_dir - 1,
            per_dir,
            2 * per_dir - 1,
            s.pp - 1
        )
    } else {
        String::new()
    };
    Timeline {
        title: format!(
            "{} PP={} m={}{dirs} F={} B={} W={} F&B={} bubble {} | F orange, B green, B-input light, W blue",
            s.method.name(),
            s.pp,
            s.micro,
            c.f,
            c.b,
            c.w,
            c.fb,
            sim.bubble()
        ),
        lane_labels: (0..s.pp).map(|d| format!("device {d}")).collect(),
        spans,
        px_per_unit: 22.0,
    }
}

/// `dsv3 schedule`: the run and its report, written to `out`.
pub fn report(a: &ScheduleParams, out: &mut dyn Write) -> Result<bool> {
    let c = a.costs();
    c.validate()?;
    let Some(m) = method(a.kind) else {
        let _ = writeln!(
            out,
            "Table 2 (V3 §3.2.1) against simulated schedules; F = {}, B = {}, W = {}, F&B = {}",
            c.f, c.b, c.w, c.fb
        );
        let rows = bubble_table(&[4, 8, 16], &c)?;
        let _ = write!(out, "{}", render_bubble_table(&rows));
        let agree = rows.iter().all(|r| {
            r.regime.is_some() || (r.simulated - r.formula).abs() <= 1e-9 * r.formula.abs().max(1.0)
        });
        let mem = rows.iter().all(|r| r.activations == r.activation_formula);
        let _ = writeln!(out,
            "bubble = max over devices of (makespan − busy time); activations = peak stage activations on a device. \
             Simulation {} Table 2 wherever the formula's regime holds; activation memory {}.",
            if agree { "equals" } else { "DIFFERS FROM" },
            if mem { "equals PP / PP+1" } else { "DIFFERS" }
        );
        return Ok(agree && mem);
    };
    let (s, sim) = run(m, a.pp, a.micro, &c)?;
    let _ = writeln!(
        out,
        "{}: PP = {}, {} micro-batches, F = {}, B = {}, W = {}, F&B = {}; makespan {}",
        m.name(),
        a.pp,
        a.micro,
        c.f,
        c.b,
        c.w,
        c.fb,
        sim.makespan
    );
    let mut t = Table::new(&["device", "ops", "busy", "idle", "peak activations"]);
    for d in 0..a.pp {
        t.row(vec![
            d.to_string(),
            s.devices[d].len().to_string(),
            format!("{}", sim.busy[d]),
            format!("{}", sim.idle[d]),
            sim.peak_activations[d].to_string(),
        ]);
    }
    let _ = write!(out, "{}", t.render());
    let formula = bubble_formula(m, a.pp, &c);
    let _ = writeln!(
        out,
        "bubble: simulated {} (max idle) | Table 2 {} = {} | {}",
        sim.bubble(),
        formula_text(m),
        formula,
        match formula_regime(m, &c) {
            None => "formula regime: yes".to_string(),
            Some(why) => format!("formula regime: no, {why}"),
        }
    );
    let _ =
        writeln!(out,
        "activation memory: simulated {} | Table 2 {}; parameter memory {}× (stages per device)",
        sim.activations(),
        activation_formula(m, a.pp),
        s.stages_per_device()
    );
    let path = a.svg.clone().unwrap_or_else(|| {
        let stem = match m {
            Method::OneFOneB => "1f1b",
            Method::Zb1p => "zb1p",
            Method::DualPipe => "dualpipe",
        };
        PathBuf::from(format!("{stem}_pp{}_micro{}.svg", a.pp, a.micro))
    });
    crate::registry::io::write_file(&path, timeline(&s, &sim, &c).to_svg().as_bytes())?;
    let _ = writeln!(out, "wrote {}", path.display());
    Ok(true)
}
