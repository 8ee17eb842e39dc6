//! Pipeline schedules of V3 §3.2.1 (Figure 5, Table 2): 1F1B, ZB1P (ZB-H1) and DualPipe,
//! generated per device, simulated on a cost model, and compared with Table 2.
//!
//! **Cost model.** `F` = one forward chunk (one pipeline stage, one micro-batch), `B` = one *full*
//! backward chunk, `W` = its backward-for-weights part (so `B − W` is the backward-for-input part
//! a zero-bubble schedule runs first), `F&B` = a forward chunk and a backward chunk run
//! overlapped. These are Table 2's (and the DualPipe README's) definitions: `B` includes `W`.
//! Communication takes no time (DualPipe hides it; the paper's table ignores it) and sends are
//! asynchronous: a chunk's output reaches the neighbour when the chunk ends, or, where
//! `dualpipe.py` posts the send later, when the op it is held behind ends.
//!
//! **Simulation.** Every device runs its list of ops in order; an op starts when the device is
//! free and its inputs exist: a forward needs the previous stage's forward of that micro-batch,
//! a backward needs its own forward and the next stage's input gradient (the last stage starts
//! from the loss), a `W` needs its backward-for-input. All devices start at t = 0.
//!
//! **Bubble** (what Table 2 counts): the idle time of a device during the step,
//! `makespan − busy time`, taken on the device that idles most. For 1F1B and ZB1P every device
//! idles the same; in DualPipe the two middle ranks idle most.
//!
//! **Activation memory**: the largest number of micro-batch stage activations a device holds at
//! once (one unit = one stage's activations of one micro-batch), counted from the start of a
//! forward to the end of its backward (for input, when split: what `W` keeps is not counted, as
//! in the ZB and DualPipe accounting); an overlapped `F&B` holds both.
//!
//! **When Table 2 holds.** Under the schedules as their reference code builds them, the
//! simulated bubble equals Table 2 exactly in these regimes (tests sweep them):
//! - 1F1B `(PP−1)(F+B)`: any costs, any number of micro-batches;
//! - ZB1P `(PP−1)(F+B−2W)`: `W ≤ F` and `W ≤ B − W` (each deferred `W` fits in a gap the
//!   schedule leaves for it);
//! - DualPipe `(PP/2−1)(F&B+B−3W)`: `F = B − W` (forward = backward-for-input, the equal cells
//!   of Figure 5) and `W ≤ F`, any `F&B` in `[max(F,B), F+B]`.
//!
//! Outside them the formulas are not what the schedules do (the tests show one case each).

use std::collections::VecDeque;

use crate::error::{Error, Result};

/// Chunk execution times (any unit).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Costs {
    /// Forward chunk.
    pub f: f64,
    /// Full backward chunk (input + weights).
    pub b: f64,
    /// Backward-for-weights part of `b`.
    pub w: f64,
    /// Overlapped forward + backward chunk pair.
    pub fb: f64,
}

impl Costs {
    /// The cells of V3 Figure 5: F, backward for input and W one cell each, so B = 2 and F&B is
    /// drawn as F + B = 3.
    pub const FIGURE5: Costs = Costs {
        f: 1.0,
        b: 2.0,
        w: 1.0,
        fb: 3.0,
    };

    /// `f > 0`, `0 < w < b`, `max(f, b) ≤ fb ≤ f + b`.
    pub fn validate(&self) -> Result<()> {
        let c = *self;
        let checks: [(&'static str, f64, bool, &str); 4] = [
            ("f", c.f, c.f > 0.0, "F must be > 0"),
            ("b", c.b, c.b > c.w, "B (full backward) must exceed W"),
            ("w", c.w, c.w > 0.0, "W must be > 0"),
            (
                "fb",
                c.fb,
                c.fb >= c.f.max(c.b) && c.fb <= c.f + c.b,
                "F&B must lie in [max(F, B), F + B]",
            ),
        ];
        for (name, value, ok, why) in checks {
            if !(ok && value.is_finite()) {
                return Err(Error::Argument {
                    op: "schedule",
                    name,
                    value: value.to_string(),
                    why: why.into(),
                });
            }
        }
        Ok(())
    }
}

/// A pipeline schedule family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// One-forward-one-backward (PipeDream-Flush / Megatron), PP devices, one stage each.
    OneFOneB,
    /// Zero Bubble ZB-H1: 1F1B with the backward split into input and weight parts, the weight
    /// parts deferred into the cool-down; same memory as 1F1B.
    Zb1p,
    /// DualPipe (V3 §3.2.1): micro-batches fed from both ends, device r holds stages r and
    /// PP−1−r, forward and backward chunks of the two directions overlapped in pairs.
    DualPipe,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::OneFOneB => "1F1B",
            Method::Zb1p => "ZB1P",
            Method::DualPipe => "DualPipe",
        }
    }
}

/// One micro-batch of one direction (direction 0 enters at device 0; direction 1, DualPipe
/// only, enters at device PP−1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub dir: usize,
    pub mb: usize,
}

/// One unit of work on a device (its stage follows from the device and the direction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    F(Chunk),
    /// Full backward (input and weights).
    B(Chunk),
    /// Backward for input only; its `W` comes later.
    Bi(Chunk),
    /// Backward for weights of an earlier `Bi`.
    W(Chunk),
    /// A forward and a full backward, overlapped.
    Fb {
        f: Chunk,
        b: Chunk,
    },
}

/// One op in a device's order. `hold`: the forward output is sent only when the device's next
/// op ends (dualpipe.py posts some sends late).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub op: Op,
    pub hold: bool,
}

/// Per-device op orders.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub method: Method,
    pub pp: usize,
    /// Micro-batches in total (DualPipe: both directions together, half each).
    pub micro: usize,
    pub devices: Vec<Vec<Step>>,
}

impl Schedule {
    /// Directions (1 or 2).
    pub fn directions(&self) -> usize {
        if self.method == Method::DualPipe {
            2
        } else {
            1
        }
    }

    /// Micro-batches per direction.
    pub fn per_direction(&self) -> usize {
        self.micro / self.directions()
    }

    /// The stage direction `dir` runs on `device`.
    pub fn stage(&self, dir: usize, device: usize) -> usize {
        if dir == 0 {
            device
        } else {
            self.pp - 1 - device
        }
    }

    /// Model stages held per device: parameter memory in units of one stage (Table 2: 1× / 2×).
    pub fn stages_per_device(&self) -> usize {
        self.directions()
    }
}

/// Builds one device's order; `f`/`b`/`w` number the micro-batches in order per direction.
struct DeviceOrder {
    steps: Vec<Step>,
    next_f: [usize; 2],
    next_b: [usize; 2],
    pending_w: VecDeque<Chunk>,
}

impl DeviceOrder {
    fn new() -> Self {
        DeviceOrder {
            steps: Vec::new(),
            next_f: [0, 0],
            next_b: [0, 0],
            pending_w: VecDeque::new(),
        }
    }

    fn take_f(&mut self, dir: usize) -> Chunk {
        let c = Chunk {
            dir,
            mb: self.next_f[dir],
        };
        self.next_f[dir] += 1;
        c
    }

    fn take_b(&mut self, dir: usize) -> Chunk {
        let c = Chunk {
            dir,
            mb: self.next_b[dir],
        };
        self.next_b[dir] += 1;
        c
    }

    fn f(&mut self, dir: usize, hold: bool) {
        let c = self.take_f(dir);
        self.steps.push(Step { op: Op::F(c), hold });
    }

    /// A backward; `split`: input part now, weight part queued for a later `w()`.
    fn b(&mut self, dir: usize, split: bool) {
        let c = self.take_b(dir);
        let op = if split {
            self.pending_w.push_back(c);
            Op::Bi(c)
        } else {
            Op::B(c)
        };
        self.steps.push(Step { op, hold: false });
    }

    /// The oldest deferred weight gradient (FIFO, as WeightGradStore).
    fn w(&mut self) {
        let c = self
            .pending_w
            .pop_front()
            .expect("schedule pops only queued W");
        self.steps.push(Step {
            op: Op::W(c),
            hold: false,
        });
    }

    fn fb(&mut self, f_dir: usize, b_dir: usize) {
        let f = self.take_f(f_dir);
        let b = self.take_b(b_dir);
        self.steps.push(Step {
            op: Op::Fb { f, b },
            hold: false,
        });
    }
}

fn arg(name: &'static str, value: usize, why: &str) -> Error {
    Error::Argument {
        op: "schedule",
        name,
        value: value.to_string(),
        why: why.into(),
    }
}

/// 1F1B as Megatron builds it: device i runs `min(PP−1−i, m)` warm-up forwards, then
/// (F, B) pairs, then the remaining backwards. Needs `PP ≥ 1`, `m ≥ 1`.
pub fn one_f_one_b(pp: usize, micro: usize) -> Result<Schedule> {
    if pp == 0 {
        return Err(arg("pp", pp, "needs at least one stage"));
    }
    if micro == 0 {
        return Err(arg("micro", micro, "needs at least one micro-batch"));
    }
    let devices = (0..pp)
        .map(|i| {
            let mut d = DeviceOrder::new();
            let warmup = (pp - 1 - i).min(micro);
            // warm-up forwards
            for _ in 0..warmup {
                d.f(0, false);
            }
            // steady state: one forward, one backward
            for _ in 0..micro - warmup {
                d.f(0, false);
                d.b(0, false);
            }
            // cool-down backwards
            for _ in 0..warmup {
                d.b(0, false);
            }
            d.steps
        })
        .collect();
    Ok(Schedule {
        method: Method::OneFOneB,
        pp,
        micro,
        devices,
    })
}

/// ZB-H1 (Qi et al. 2023, "Zero Bubble Pipeline Parallelism" §3.1): device i runs
/// `PP−1−i` forwards, `i` × (F, B), `m−PP+1` × (F, B, W), `PP−1−i` × (B, W), `i` × W, where B is
/// the backward for input and W the deferred weight part (oldest first). At most PP micro-batches
/// in flight on device 0, as in 1F1B. Needs `m ≥ PP`.
pub fn zb1p(pp: usize, micro: usize) -> Result<Schedule> {
    if pp == 0 {
        return Err(arg("pp", pp, "needs at least one stage"));
    }
    if micro < pp {
        return Err(arg("micro", micro, "ZB1P needs at least PP micro-batches"));
    }
    let devices = (0..pp)
        .map(|i| {
            let mut d = DeviceOrder::new();
            for _ in 0..pp - 1 - i {
                d.f(0, false);
            }
            for _ in 0..i {
                d.f(0, false);
                d.b(0, true);
            }
            for _ in 0..micro + 1 - pp {
                d.f(0, false);
                d.b(0, true);
                d.w();
            }
            for _ in 0..pp - 1 - i {
                d.b(0, true);
                d.w();
            }
            for _ in 0..i {
                d.w();
            }
            d.steps
        })
        .collect();
    Ok(Schedule {
        method: Method::Zb1p,
        pp,
        micro,
        devices,
    })
}

/// DualPipe as `deepseek-ai/DualPipe` `dualpipe.py` `DualPipe.step` (`3da1bbe`) orders it, with
/// `h = min(r, PP−1−r)`, `n = m/2` micro-batches per direction, local phase 0 = the direction
/// that reaches rank r first (forward direction on the first half of the ranks, reverse on the
/// second):
/// 1. F0 × 2(PP/2−h−1); 2. (F0, F1) × (h+1); 3. (B1 input, W, F1) × (PP/2−h−1);
/// 4. (F0&B1, F1&B0) × (n−PP+h+1), the middle ranks run their first F0, B1 un-overlapped;
/// 5. (B1, F1&B0) × (PP/2−h−1); 6. (B1, B0) × (h+1), the second half split (zero bubble);
/// 7. (W, B0 input) × (PP/2−h−1); 8. W × (h+1).
///
/// Deferred sends (`hold`): in step 2 a non-middle rank sends each F0 after the F1 that follows
/// it, and a middle rank sends its last F1 after the next F0; that F0 (step 4 on a middle rank)
/// is sent after the B1 that follows it. Needs PP even, m even and `m ≥ 2·PP`.
pub fn dualpipe(pp: usize, micro: usize) -> Result<Schedule> {
    if pp < 2 || pp % 2 != 0 {
        return Err(arg("pp", pp, "DualPipe needs an even number of ranks ≥ 2"));
    }
    if micro % 2 != 0 || micro < 2 * pp {
        return Err(arg(
            "micro",
            micro,
            "DualPipe needs an even number of micro-batches ≥ 2·PP",
        ));
    }
    let half = pp / 2;
    let n = micro / 2;
    let devices = (0..pp)
        .map(|r| {
            let h = r.min(pp - 1 - r);
            let middle = h == half - 1;
            // local phase p → direction
            let dir = |p: usize| p ^ usize::from(r >= half);
            let mut d = DeviceOrder::new();
            // step 1: nF0
            for _ in 0..2 * (half - h - 1) {
                d.f(dir(0), false);
            }
            // step 2: nF0F1
            for i in 0..=h {
                d.f(dir(0), !middle);
                d.f(dir(1), middle && i == h);
            }
            // step 3: nB1W1F1 (input gradient sent before W)
            for _ in 0..half - h - 1 {
                d.b(dir(1), true);
                d.w();
                d.f(dir(1), false);
            }
            // step 4 (main): nF0B1F1B0
            for i in 0..n + h + 1 - pp {
                if i == 0 && middle {
                    // not overlapped "to further reduce bubble size"
                    d.f(dir(0), true);
                    d.b(dir(1), false);
                } else {
                    d.fb(dir(0), dir(1));
                }
                d.fb(dir(1), dir(0));
            }
            // step 5: nB1F1B0
            for _ in 0..half - h - 1 {
                d.b(dir(1), false);
                d.fb(dir(1), dir(0));
            }
            // step 6: nB1B0, the second half of these backwards split
            let mut split = false;
            // dualpipe.py's `step_6 // 2` with step_6 = h + 1
            let half_step6 = h.div_ceil(2);
            for i in 0..=h {
                if i == half_step6 && h % 2 == 1 {
                    split = true;
                }
                d.b(dir(1), split);
                if i == half_step6 && h % 2 == 0 {
                    split = true;
                }
                d.b(dir(0), split);
            }
            // step 7: nWB0
            for _ in 0..half - h - 1 {
                d.w();
                d.b(dir(0), true);
            }
            // step 8: nW
            for _ in 0..=h {
                d.w();
            }
            d.steps
        })
        .collect();
    Ok(Schedule {
        method: Method::DualPipe,
        pp,
        micro,
        devices,
    })
}

/// The schedule of `method`.
pub fn build(method: Method, pp: usize, micro: usize) -> Result<Schedule> {
    match method {
        Method::OneFOneB => one_f_one_b(pp, micro),
        Method::Zb1p => zb1p(pp, micro),
        Method::DualPipe => dualpipe(pp, micro),
    }
}

/// One executed op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span {
    pub device: usize,
    pub start: f64,
    pub end: f64,
    pub op: Op,
}

/// The simulated timeline and what Table 2 reports about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    pub spans: Vec<Span>,
    /// End of the last op (all devices start at 0).
    pub makespan: f64,
    /// Per device: time spent computing.
    pub busy: Vec<f64>,
    /// Per device: `makespan − busy`.
    pub idle: Vec<f64>,
    /// Per device: peak stage activations held.
    pub peak_activations: Vec<usize>,
}

impl Simulation {
    /// Table 2's bubble: the largest per-device idle time.
    pub fn bubble(&self) -> f64 {
        self.idle.iter().copied().fold(0.0, f64::max)
    }

    /// Table 2's activation memory: the largest per-device peak.
    pub fn activations(&self) -> usize {
        self.peak_activations.iter().copied().max().unwrap_or(0)
    }
}

/// Dependency bookkeeping: one slot per (direction, micro-batch, stage).
struct Ready {
    per_dir: usize,
    pp: usize,
    /// forward ended on its own device (its activations exist)
    f_end: Vec<Option<f64>>,
    /// forward output available to the next stage
    f_sent: Vec<Option<f64>>,
    /// input gradient available to the previous stage
    grad_sent: Vec<Option<f64>>,
    /// backward-for-input ended (its W may run)
    bi_end: Vec<Option<f64>>,
}

impl Ready {
    fn key(&self, c: Chunk, stage: usize) -> usize {
        (c.dir * self.per_dir + c.mb) * self.pp + stage
    }

    /// When the inputs of a forward of `c` at `stage` exist (`None`: not yet).
    fn forward(&self, c: Chunk, stage: usize) -> Option<f64> {
        if stage == 0 {
            Some(0.0)
        } else {
            self.f_sent[self.key(c, stage - 1)]
        }
    }

    /// When the inputs of a backward of `c` at `stage` exist.
    fn backward(&self, c: Chunk, stage: usize) -> Option<f64> {
        let own = self.f_end[self.key(c, stage)]?;
        if stage + 1 == self.pp {
            Some(own)
        } else {
            Some(own.max(self.grad_sent[self.key(c, stage + 1)]?))
        }
    }
}

fn op_cost(op: &Op, c: &Costs) -> f64 {
    match op {
        Op::F(_) => c.f,
        Op::B(_) => c.b,
        Op::Bi(_) => c.b - c.w,
        Op::W(_) => c.w,
        Op::Fb { .. } => c.fb,
    }
}

/// Every (direction, micro-batch, stage) has exactly one forward and one backward, on the
/// device holding the stage, and a `W` exactly when its backward was split.
pub fn check_structure(s: &Schedule) -> Result<()> {
    let per_dir = s.per_direction();
    let n = s.directions() * per_dir * s.pp;
    let (mut f, mut b, mut split, mut w) =
        (vec![0u32; n], vec![0u32; n], vec![false; n], vec![0u32; n]);
    let bad = |device: usize, why: String| Error::Argument {
        op: "schedule",
        name: "device order",
        value: device.to_string(),
        why,
    };
    for (device, steps) in s.devices.iter().enumerate() {
        let key = |c: &Chunk| -> Result<usize> {
            if c.dir >= s.directions() || c.mb >= per_dir {
                return Err(bad(device, format!("chunk {c:?} does not exist")));
            }
            Ok((c.dir * per_dir + c.mb) * s.pp + s.stage(c.dir, device))
        };
        for st in steps {
            match &st.op {
                Op::F(c) => f[key(c)?] += 1,
                Op::B(c) => b[key(c)?] += 1,
                Op::Bi(c) => {
                    let k = key(c)?;
                    b[k] += 1;
                    split[k] = true;
                }
                Op::W(c) => w[key(c)?] += 1,
                Op::Fb { f: cf, b: cb } => {
                    f[key(cf)?] += 1;
                    b[key(cb)?] += 1;
                }
            }
        }
    }
    for k in 0..n {
        let (stage, rest) = (k % s.pp, k / s.pp);
        let (dir, mb) = (rest / per_dir, rest % per_dir);
        if f[k] != 1 || b[k] != 1 || w[k] != u32::from(split[k]) {
            return Err(Error::Argument {
                op: "schedule",
                name: "chunk",
                value: format!("direction {dir}, micro-batch {mb}, stage {stage}"),
                why: format!(
                    "has {} forward(s), {} backward(s), {} W (split: {})",
                    f[k], b[k], w[k], split[k]
                ),
            });
        }
    }
    Ok(())
}

/// Run the schedule on the cost model (see the module doc). Errors: invalid costs, a
/// structurally wrong schedule, a deadlock (an op waiting for an input that is scheduled after
/// it), naming the blocked ops.
pub fn simulate(s: &Schedule, costs: &Costs) -> Result<Simulation> {
    costs.validate()?;
    check_structure(s)?;
    let per_dir = s.per_direction();
    let slots = s.directions() * per_dir * s.pp;
    let mut ready = Ready {
        per_dir,
        pp: s.pp,
        f_end: vec![None; slots],
        f_sent: vec![None; slots],
        grad_sent: vec![None; slots],
        bi_end: vec![None; slots],
    };
    let mut next = vec![0usize; s.pp];
    let mut free = vec![0.0f64; s.pp];
    let mut busy = vec![0.0f64; s.pp];
    // a forward whose send waits for the device's next op to end
    let mut held: Vec<Option<usize>> = vec![None; s.pp];
    let mut spans = Vec::new();
    let total: usize = s.devices.iter().map(Vec::len).sum();
    while spans.len() < total {
        let mut progressed = false;
        for dev in 0..s.pp {
            while let Some(step) = s.devices[dev].get(next[dev]) {
                // inputs of the op
                let stage = |c: &Chunk| s.stage(c.dir, dev);
                let inputs = match &step.op {
                    Op::F(c) => ready.forward(*c, stage(c)),
                    Op::B(c) | Op::Bi(c) => ready.backward(*c, stage(c)),
                    Op::W(c) => ready.bi_end[ready.key(*c, stage(c))],
                    Op::Fb { f, b } => {
                        match (ready.forward(*f, stage(f)), ready.backward(*b, stage(b))) {
                            (Some(x), Some(y)) => Some(x.max(y)),
                            _ => None,
                        }
                    }
                };
                let Some(inputs) = inputs else { break };
                // run it
                let start = inputs.max(free[dev]);
                let end = start + op_cost(&step.op, costs);
                free[dev] = end;
                busy[dev] += end - start;
                spans.push(Span {
                    device: dev,
                    start,
                    end,
                    op: step.op,
                });
                next[dev] += 1;
                progressed = true;
                // a held send goes out when this op ends
                if let Some(k) = held[dev].take() {
                    ready.f_sent[k] = Some(end);
                }
                // publish the outputs
                let mut forward_done = |c: &Chunk, hold: bool, ready: &mut Ready| {
                    let k = ready.key(*c, stage(c));
                    ready.f_end[k] = Some(end);
                    if hold {
                        held[dev] = Some(k);
                    } else {
                        ready.f_sent[k] = Some(end);
                    }
                };
                match &step.op {
                    Op::F(c) => forward_done(c, step.hold, &mut ready),
                    Op::B(c) => {
                        let k = ready.key(*c, stage(c));
                        ready.grad_sent[k] = Some(end);
                    }
                    Op::Bi(c) => {
                        let k = ready.key(*c, stage(c));
                        ready.grad_sent[k] = Some(end);
                        ready.bi_end[k] = Some(end);
                    }
                    Op::W(_) => {}
                    Op::Fb { f, b } => {
                        forward_done(f, step.hold, &mut ready);
                        let k = ready.key(*b, stage(b));
                        ready.grad_sent[k] = Some(end);
                    }
                }
            }
        }
        if !progressed {
            let blocked: Vec<String> = (0..s.pp)
                .filter_map(|d| {
                    s.devices[d]
                        .get(next[d])
                        .map(|st| format!("device {d}: {:?}", st.op))
                })
                .collect();
            return Err(Error::Argument {
                op: "schedule",
                name: "order",
                value: s.method.name().into(),
                why: format!(
                    "deadlock, every device waits for an input scheduled later: {}",
                    blocked.join("; ")
                ),
            });
        }
    }
    if let Some(d) = held.iter().position(Option::is_some) {
        // a send held behind nothing: the device's last op was a held forward
        return Err(arg(
            "device",
            d,
            "its last forward's send is held behind no op",
        ));
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let idle = busy.iter().map(|b| makespan - b).collect();
    let peak_activations = (0..s.pp).map(|d| peak_activations(&spans, d)).collect();
    Ok(Simulation {
        spans,
        makespan,
        busy,
        idle,
        peak_activations,
    })
}

/// Peak stage activations on `device`: +1 when a forward starts, −1 when its backward (for
/// input) ends; frees before allocations at equal times.
fn peak_activations(spans: &[Span], device: usize) -> usize {
    // (time, +1 alloc / −1 free)
    let mut events: Vec<(f64, i64)> = Vec::new();
    for sp in spans.iter().filter(|sp| sp.device == device) {
        match sp.op {
            Op::F(_) => events.push((sp.start, 1)),
            Op::B(_) | Op::Bi(_) => events.push((sp.end, -1)),
            Op::W(_) => {}
            Op::Fb { .. } => {
                events.push((sp.start, 1));
                events.push((sp.end, -1));
            }
        }
    }
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut live, mut peak) = (0i64, 0i64);
    for (_, d) in events {
        live += d;
        peak = peak.max(live);
    }
    peak as usize
}

/// Re-check a simulated timeline independently of the simulator: ops on one device do not
/// overlap and run in the schedule's order, and every op starts after its inputs ended.
pub fn check_timeline(s: &Schedule, sim: &Simulation) -> Result<()> {
    let bad = |why: String| Error::Argument {
        op: "schedule",
        name: "timeline",
        value: s.method.name().into(),
        why,
    };
    // when each (forward | input-gradient | backward-for-input) of a slot ended, from the spans
    let per_dir = s.per_direction();
    let key = |c: &Chunk, stage: usize| (c.dir * per_dir + c.mb) * s.pp + stage;
    let n = s.directions() * per_dir * s.pp;
    let (mut f_end, mut g_end) = (vec![f64::NAN; n], vec![f64::NAN; n]);
    for sp in &sim.spans {
        let st = |c: &Chunk| s.stage(c.dir, sp.device);
        match &sp.op {
            Op::F(c) => f_end[key(c, st(c))] = sp.end,
            Op::B(c) | Op::Bi(c) => g_end[key(c, st(c))] = sp.end,
            Op::W(_) => {}
            Op::Fb { f, b } => {
                f_end[key(f, st(f))] = sp.end;
                g_end[key(b, st(b))] = sp.end;
            }
        }
    }
    for dev in 0..s.pp {
        let mine: Vec<&Span> = sim.spans.iter().filter(|sp| sp.device == dev).collect();
        if mine.len() != s.devices[dev].len()
            || mine
                .iter()
                .zip(&s.devices[dev])
                .any(|(sp, st)| sp.op != st.op)
        {
            return Err(bad(format!("device {dev} did not run its ops in order")));
        }
        for pair in mine.windows(2) {
            if pair[1].start < pair[0].end {
                return Err(bad(format!(
                    "device {dev}: {:?} starts before {:?} ends",
                    pair[1].op, pair[0].op
                )));
            }
        }
    }
    for sp in &sim.spans {
        let st = |c: &Chunk| s.stage(c.dir, sp.device);
        let needs_forward = |c: &Chunk| -> Vec<f64> {
            if st(c) == 0 {
                vec![]
            } else {
                vec![f_end[key(c, st(c) - 1)]]
            }
        };
        let needs_backward = |c: &Chunk| -> Vec<f64> {
            let mut v = vec![f_end[key(c, st(c))]];
            if st(c) + 1 < s.pp {
                v.push(g_end[key(c, st(c) + 1)]);
            }
            v
        };
        let deps = match &sp.op {
            Op::F(c) => needs_forward(c),
            Op::B(c) | Op::Bi(c) => needs_backward(c),
            Op::W(c) => vec![g_end[key(c, st(c))]],
            Op::Fb { f, b } => [needs_forward(f), needs_backward(b)].concat(),
        };
        if let Some(d) = deps.iter().find(|&&d| d.is_nan() || d > sp.start) {
            return Err(bad(format!(
                "device {}: {:?} starts at {} before its input is ready at {d}",
                sp.device, sp.op, sp.start
            )));
        }
    }
    Ok(())
}

/// Table 2's bubble.
pub fn bubble_formula(method: Method, pp: usize, c: &Costs) -> f64 {
    let pp = pp as f64;
    match method {
        Method::OneFOneB => (pp - 1.0) * (c.f + c.b),
        Method::Zb1p => (pp - 1.0) * (c.f + c.b - 2.0 * c.w),
        Method::DualPipe => (pp / 2.0 - 1.0) * (c.fb + c.b - 3.0 * c.w),
    }
}

/// Table 2's activation memory (in stage activations per device): PP, PP, PP+1.
pub fn activation_formula(method: Method, pp: usize) -> usize {
    match method {
        Method::OneFOneB | Method::Zb1p => pp,
        Method::DualPipe => pp + 1,
    }
}

/// `None` when Table 2's bubble formula describes `method` under `c` (see the module doc),
/// otherwise the condition that fails.
pub fn formula_regime(method: Method, c: &Costs) -> Option<&'static str> {
    let bi = c.b - c.w;
    match method {
        Method::OneFOneB => None,
        Method::Zb1p if c.w > c.f || c.w > bi => Some("needs W ≤ F and W ≤ B − W"),
        Method::Zb1p => None,
        Method::DualPipe if (c.f - bi).abs() > 1e-12 * c.f.max(bi) || c.w > c.f => {
            Some("needs F = B − W and W ≤ F")
        }
        Method::DualPipe => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        // costs are small binary fractions; sums of a few hundred of them are exact in f64
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    #[test]
    fn figure5_shape_8_ranks_20_micro_batches() {
        let s = dualpipe(8, 20).unwrap();
        let sim = simulate(&s, &Costs::FIGURE5).unwrap();
        check_timeline(&s, &sim).unwrap();
        // Table 2 with Figure 5's cells: (8/2 − 1)(3 + 2 − 3) = 6
        assert!(close(sim.bubble(), 6.0), "{}", sim.bubble());
        // the middle ranks 3 and 4 idle most
        assert!(close(sim.idle[3], 6.0) && close(sim.idle[4], 6.0));
        assert_eq!(sim.activations(), 9);
        assert_eq!(s.stages_per_device(), 2);
        // every device runs 20 forwards and 20 backwards
        for dev in &s.devices {
            let fwd = dev
                .iter()
                .map(|st| match st.op {
                    Op::F(_) | Op::Fb { .. } => 1,
                    _ => 0,
                })
                .sum::<usize>();
            assert_eq!(fwd, 20);
        }
    }

    #[test]
    fn one_f_one_b_bubble_holds_for_any_costs() {
        for pp in [1, 2, 4, 8, 16] {
            for micro in [1, 3, pp, 2 * pp + 5] {
                for (f, b) in [(1.0, 2.0), (1.5, 1.0), (0.25, 3.75)] {
                    let c = Costs {
                        f,
                        b,
                        w: b / 2.0,
                        fb: f + b,
                    };
                    let s = one_f_one_b(pp, micro).unwrap();
                    let sim = simulate(&s, &c).unwrap();
                    check_timeline(&s, &sim).unwrap();
                    let want = bubble_formula(Method::OneFOneB, pp, &c);
                    // every device idles the same
                    assert!(
                        sim.idle.iter().all(|&i| close(i, want)),
                        "pp={pp} m={micro} {c:?}: {:?} vs {want}",
                        sim.idle
                    );
                    if micro >= pp {
                        assert_eq!(sim.activations(), pp);
                    }
                }
            }
        }
    }

    #[test]
    fn zb1p_bubble_holds_when_w_fits_the_gaps() {
        for pp in [2, 4, 8, 16] {
            for micro in [pp, 2 * pp + 3] {
                for (f, bi, w) in [
                    (1.0, 1.0, 1.0),
                    (2.0, 3.0, 1.0),
                    (3.0, 2.0, 2.0),
                    (1.0, 2.0, 0.5),
                    (1.5, 1.25, 0.75),
                ] {
                    let c = Costs {
                        f,
                        b: bi + w,
                        w,
                        fb: f + bi + w,
                    };
                    assert_eq!(formula_regime(Method::Zb1p, &c), None);
                    let s = zb1p(pp, micro).unwrap();
                    let sim = simulate(&s, &c).unwrap();
                    check_timeline(&s, &sim).unwrap();
                    let want = bubble_formula(Method::Zb1p, pp, &c);
                    assert!(
                        sim.idle.iter().all(|&i| close(i, want)),
                        "pp={pp} m={micro} {c:?}: {:?} vs {want}",
                        sim.idle
                    );
                    assert_eq!(sim.activations(), pp);
                }
            }
        }
        // outside the regime (W > F) a deferred W cannot hide and the bubble is larger
        let c = Costs {
            f: 1.0,
            b: 4.0,
            w: 2.0,
            fb: 5.0,
        };
        assert!(formula_regime(Method::Zb1p, &c).is_some());
        let sim = simulate(&zb1p(4, 8).unwrap(), &c).unwrap();
        assert!(sim.bubble() > bubble_formula(Method::Zb1p, 4, &c) + 1.0);
    }

    #[test]
    fn dualpipe_bubble_and_memory_match_table2_in_its_regime() {
        for pp in [2, 4, 6, 8, 16] {
            for micro in [2 * pp, 2 * pp + 6, 40] {
                if micro < 2 * pp {
                    continue;
                }
                for (f, w) in [
                    (1.0f64, 1.0),
                    (1.0, 0.5),
                    (2.0, 1.0),
                    (3.0, 2.0),
                    (1.5, 0.25),
                ] {
                    let b = f + w; // F = B − W
                    for fb in [f.max(b), (f + b + f.max(b)) / 2.0, f + b] {
                        let c = Costs { f, b, w, fb };
                        assert_eq!(formula_regime(Method::DualPipe, &c), None);
                        let s = dualpipe(pp, micro).unwrap();
                        let sim = simulate(&s, &c).unwrap();
                        check_timeline(&s, &sim).unwrap();
                        let want = bubble_formula(Method::DualPipe, pp, &c);
                        assert!(
                            close(sim.bubble(), want),
                            "pp={pp} m={micro} {c:?}: {} vs {want}",
                            sim.bubble()
                        );
                        assert_eq!(sim.activations(), pp + 1, "pp={pp} m={micro}");
                    }
                }
            }
        }
    }

    #[test]
    fn dualpipe_formula_is_not_what_happens_when_forward_and_input_backward_differ() {
        // F = 1, B − W = 2: the overlapped pairs wait on each other; simulation ≠ formula
        let c = Costs {
            f: 1.0,
            b: 3.0,
            w: 1.0,
            fb: 3.5,
        };
        assert!(formula_regime(Method::DualPipe, &c).is_some());
        let sim = simulate(&dualpipe(8, 20).unwrap(), &c).unwrap();
        assert!(!close(
            sim.bubble(),
            bubble_formula(Method::DualPipe, 8, &c)
        ));
    }

    #[test]
    fn bubbles_do_not_grow_with_micro_batches() {
        let c = Costs {
            f: 1.0,
            b: 2.0,
            w: 1.0,
            fb: 2.5,
        };
        let base = simulate(&dualpipe(8, 16).unwrap(), &c).unwrap().bubble();
        for m in [18, 20, 32, 64] {
            assert!(close(
                simulate(&dualpipe(8, m).unwrap(), &c).unwrap().bubble(),
                base
            ));
        }
    }

    #[test]
    fn broken_schedules_are_caught() {
        // a device that runs a backward before the forward it needs: deadlock
        let mut s = one_f_one_b(2, 2).unwrap();
        s.devices[1].swap(0, 1);
        let e = simulate(&s, &Costs::FIGURE5).unwrap_err();
        assert!(e.to_string().contains("deadlock"), "{e}");
        // a lost backward
        let mut s = one_f_one_b(2, 2).unwrap();
        s.devices[0].pop();
        let e = simulate(&s, &Costs::FIGURE5).unwrap_err();
        assert!(e.to_string().contains("0 backward"), "{e}");
        // a timeline whose op starts too early
        let s = one_f_one_b(2, 2).unwrap();
        let mut sim = simulate(&s, &Costs::FIGURE5).unwrap();
        let i = sim.spans.iter().position(|sp| sp.device == 1).unwrap();
        sim.spans[i].start -= 0.5;
        assert!(check_timeline(&s, &sim).is_err());
        // bad arguments
        assert!(dualpipe(6, 10).unwrap_err().to_string().contains("micro"));
        assert!(dualpipe(5, 20).unwrap_err().to_string().contains("pp"));
        assert!(zb1p(4, 3).is_err());
        assert!(simulate(
            &s,
            &Costs {
                f: 1.0,
                b: 1.0,
                w: 1.0,
                fb: 2.0
            }
        )
        .unwrap_err()
        .to_string()
        .contains("W"));
        assert!(simulate(
            &s,
            &Costs {
                f: 1.0,
                b: 2.0,
                w: 1.0,
                fb: 1.5
            }
        )
        .unwrap_err()
        .to_string()
        .contains("F&B"));
    }
}
