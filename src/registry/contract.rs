//! Tensor contracts: the names, dtypes and shape rules of an op's inputs and outputs.
//!
//! A shape rule is a list of [`Dim`]s. Named sizes (`M`, `K`) are bound by the first tensor that
//! mentions them and must agree everywhere else; derived sizes divide a named size by a config
//! field (`K/block_size`, `ceil(N/block_size)`); `...` matches any number of leading dims.

use std::collections::BTreeMap;

use crate::registry::config::Config;
use crate::registry::error::{Error, Result, Role};
use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};

/// An integer config field a shape rule uses (`block_size`, `top_k`): its name for messages
/// and listings, and how to read it from the op's typed config.
#[derive(Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub get: fn(&Config) -> usize,
}

impl std::fmt::Debug for Param {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// One dimension of a shape rule.
#[derive(Debug, Clone, Copy)]
pub enum Dim {
    /// Zero or more leading dimensions, all bound together (first position only).
    Batch,
    /// A named size.
    Var(&'static str),
    /// `var / param`; the division must be exact (declare a [`Constraint`]).
    Div(&'static str, Param),
    /// `⌈var / param⌉`.
    CeilDiv(&'static str, Param),
    /// A literal size.
    Fixed(usize),
    /// The size a config field gives (`top_k`).
    Field(Param),
    /// A size computed from sizes bound before it and the config (the rows of a padded buffer).
    Rule(Rule),
}

/// A size rule: `name` for messages, `get` from the bindings so far and the config.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    pub name: &'static str,
    pub get: fn(&Bindings, &Config) -> usize,
}

/// Name, dtypes and shape rule of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorSpec {
    pub name: &'static str,
    /// Accepted dtypes. For outputs the reference's dtype (which may depend on the config) must
    /// be one of these and the candidate must match it.
    pub dtypes: &'static [DType],
    pub shape: &'static [Dim],
    pub doc: &'static str,
}

/// A relation between sizes and config fields.
#[derive(Debug, Clone, Copy)]
pub enum Constraint {
    /// `var % param == 0`.
    MultipleOf(&'static str, Param),
    /// `var ≥ 1`, with the reason: a size the op cannot be empty in (experts to route to).
    /// Other sizes may be 0: the op's result is then empty too (or, for a reduction, the
    /// empty sum).
    NonEmpty(&'static str, &'static str),
    /// `var` even and ≥ 2, with the reason (RoPE rotates pairs of features).
    EvenNonEmpty(&'static str, &'static str),
}

impl TensorSpec {
    /// `x: F32|BF16 [..., K]`.
    pub fn describe(&self) -> String {
        let dtypes: Vec<&str> = self.dtypes.iter().map(|d| d.name()).collect();
        format!(
            "{}: {} {}",
            self.name,
            dtypes.join("|"),
            shape_rule(self.shape)
        )
    }
}

/// `[..., K/block_size]`.
pub fn shape_rule(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape
        .iter()
        .map(|d| match d {
            Dim::Batch => "...".to_string(),
            Dim::Var(v) => v.to_string(),
            Dim::Div(v, f) => format!("{v}/{}", f.name),
            Dim::CeilDiv(v, f) => format!("ceil({v}/{})", f.name),
            Dim::Fixed(n) => n.to_string(),
            Dim::Field(f) => f.name.to_string(),
            Dim::Rule(r) => r.name.to_string(),
        })
        .collect();
    format!("[{}]", dims.join(", "))
}

impl Constraint {
    pub fn describe(&self) -> String {
        match self {
            Constraint::MultipleOf(v, f) => format!("{v} % {} == 0", f.name),
            Constraint::NonEmpty(v, _) => format!("{v} ≥ 1"),
            Constraint::EvenNonEmpty(v, _) => format!("{v} even, ≥ 2"),
        }
    }
}

/// Sizes bound while checking a contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bindings {
    pub vars: BTreeMap<&'static str, usize>,
    /// The leading dims matched by `...` (empty when the rule has none or they are absent).
    pub batch: Option<Vec<usize>>,
    /// Which tensor bound each name, for error messages.
    by: BTreeMap<&'static str, &'static str>,
}

impl Bindings {
    pub fn get(&self, var: &str) -> usize {
        self.vars[var]
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .vars
            .iter()
            .map(|(k, v)| format!("{k} = {v} (from `{}`)", self.by[k]))
            .collect();
        if let Some(b) = &self.batch {
            parts.push(format!("... = {b:?}"));
        }
        parts.join(", ")
    }
}

/// The op-level part of a contract check.
pub struct Contract<'a> {
    pub op: &'static str,
    pub inputs: &'a [TensorSpec],
    pub outputs: &'a [TensorSpec],
    pub constraints: &'a [Constraint],
}

impl Contract<'_> {
    /// Check names, dtypes and shapes of `inputs`; bind the named sizes. `place` says where the
    /// tensors came from (` in IN.safetensors`) for messages.
    pub fn check_inputs(
        &self,
        inputs: &TensorMap,
        config: &Config,
        place: &str,
    ) -> Result<Bindings> {
        check_names(self.op, Role::Input, self.inputs, inputs, place)?;
        let mut b = Bindings::default();
        for spec in self.inputs {
            let t = &inputs[spec.name];
            check_dtype(self.op, Role::Input, spec, t.dtype)?;
            self.bind(spec, t, config, &mut b)?;
        }
        for c in self.constraints {
            // (the size, the violated rule) of a broken constraint
            let broken = match *c {
                Constraint::NonEmpty(v, why) | Constraint::EvenNonEmpty(v, why) => {
                    let n = b.get(v);
                    let even = matches!(c, Constraint::EvenNonEmpty(..));
                    (n == 0 || (even && n % 2 != 0))
                        .then(|| (v, format!("{}, got {v} = {n} ({why})", c.describe())))
                }
                Constraint::MultipleOf(v, f) => {
                    let (n, d) = (b.get(v), (f.get)(config));
                    (n % d != 0).then(|| (v, format!("{v} = {n} a multiple of {} = {d}", f.name)))
                }
            };
            if let Some((v, rule)) = broken {
                let by = b.by[v];
                return Err(Error::Shape {
                    op: self.op,
                    role: Role::Input,
                    name: by.to_string(),
                    got: inputs[by].shape.clone(),
                    expected: format!("{} with {rule}", shape_rule(self.spec(by).shape)),
                });
            }
        }
        Ok(b)
    }

    /// Check names, dtypes (against the reference's) and shapes of candidate `outputs`.
    pub fn check_outputs(
        &self,
        outputs: &TensorMap,
        reference: &TensorMap,
        b: &Bindings,
        config: &Config,
        place: &str,
    ) -> Result<()> {
        check_names(self.op, Role::Output, self.outputs, outputs, place)?;
        for spec in self.outputs {
            let got = &outputs[spec.name];
            let want = &reference[spec.name];
            check_dtype(self.op, Role::Output, spec, got.dtype)?;
            if got.dtype != want.dtype {
                return Err(Error::DType {
                    op: self.op,
                    role: Role::Output,
                    name: spec.name.into(),
                    got: got.dtype.name().into(),
                    expected: want.dtype.name().into(),
                    hint: format!(" (with config {})", config.as_json()),
                });
            }
            let expected = self.expected_shape(spec, b, config);
            if got.shape != expected {
                return Err(Error::Shape {
                    op: self.op,
                    role: Role::Output,
                    name: spec.name.into(),
                    got: got.shape.clone(),
                    expected: format!(
                        "{} = {expected:?} ({})",
                        shape_rule(spec.shape),
                        b.describe()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Working memory of the outputs the inputs' bindings imply, with
    /// [`crate::registry::limits::WORKING_BYTES`] per element and zero-size dims counted as one: what
    /// `run` and `check` need on top of the loaded inputs, checked before the reference
    /// allocates.
    pub fn output_bytes(&self, b: &Bindings, config: &Config) -> Option<u64> {
        let mut total = 0u64;
        for spec in self.outputs {
            let shape = self.expected_shape(spec, b, config);
            let bytes = crate::registry::limits::extent(&shape)?
                .checked_mul(crate::registry::limits::WORKING_BYTES)?;
            total = total.checked_add(bytes)?;
        }
        Some(total)
    }

    /// The concrete shape of an output under bound sizes.
    pub fn expected_shape(&self, spec: &TensorSpec, b: &Bindings, config: &Config) -> Vec<usize> {
        let mut shape = Vec::new();
        for d in spec.shape {
            match *d {
                Dim::Batch => shape.extend(b.batch.clone().unwrap_or_default()),
                Dim::Var(v) => shape.push(b.get(v)),
                Dim::Div(v, f) => shape.push(b.get(v) / (f.get)(config)),
                Dim::CeilDiv(v, f) => shape.push(b.get(v).div_ceil((f.get)(config))),
                Dim::Fixed(n) => shape.push(n),
                Dim::Field(f) => shape.push((f.get)(config)),
                Dim::Rule(r) => shape.push((r.get)(b, config)),
            }
        }
        shape
    }

    fn spec(&self, name: &str) -> &TensorSpec {
        self.inputs
            .iter()
            .chain(self.outputs)
            .find(|s| s.name == name)
            .expect("declared tensor")
    }

    fn bind(&self, spec: &TensorSpec, t: &Tensor, config: &Config, b: &mut Bindings) -> Result<()> {
        let err = |b: &Bindings, why: String| Error::Shape {
            op: self.op,
            role: Role::Input,
            name: spec.name.into(),
            got: t.shape.clone(),
            expected: if b.vars.is_empty() && b.batch.is_none() {
                format!("{} ({why})", shape_rule(spec.shape))
            } else {
                format!("{} ({why}; {})", shape_rule(spec.shape), b.describe())
            },
        };
        let has_batch = matches!(spec.shape.first(), Some(Dim::Batch));
        let fixed_rank = spec.shape.len() - usize::from(has_batch);
        let rank = t.shape.len();
        if (has_batch && rank < fixed_rank) || (!has_batch && rank != fixed_rank) {
            let need = if has_batch {
                format!("rank ≥ {fixed_rank}")
            } else {
                format!("rank {fixed_rank}")
            };
            return Err(err(b, format!("{need}, got rank {rank}")));
        }
        let lead = rank - fixed_rank;
        if has_batch {
            let batch = t.shape[..lead].to_vec();
            match &b.batch {
                Some(prev) if *prev != batch => {
                    return Err(err(b, format!("leading dims {batch:?} differ")))
                }
                _ => b.batch = Some(batch),
            }
        }
        for (d, &n) in spec
            .shape
            .iter()
            .skip(usize::from(has_batch))
            .zip(&t.shape[lead..])
        {
            let want = match *d {
                Dim::Batch => unreachable!("`...` only leads"),
                Dim::Var(v) => match b.vars.get(v) {
                    None => {
                        b.vars.insert(v, n);
                        b.by.insert(v, spec.name);
                        continue;
                    }
                    Some(&w) => (w, v.to_string()),
                },
                Dim::Div(v, f) => (b.get(v) / (f.get)(config), format!("{v}/{}", f.name)),
                Dim::CeilDiv(v, f) => (
                    b.get(v).div_ceil((f.get)(config)),
                    format!("ceil({v}/{})", f.name),
                ),
                Dim::Fixed(w) => (w, w.to_string()),
                Dim::Field(f) => ((f.get)(config), f.name.to_string()),
                Dim::Rule(r) => ((r.get)(b, config), r.name.to_string()),
            };
            if want.0 != n {
                return Err(err(b, format!("{} must be {}, got {n}", want.1, want.0)));
            }
        }
        Ok(())
    }
}

fn check_names(
    op: &'static str,
    role: Role,
    specs: &[TensorSpec],
    given: &TensorMap,
    place: &str,
) -> Result<()> {
    for spec in specs {
        if !given.contains_key(spec.name) {
            return Err(Error::MissingTensor {
                op,
                role,
                name: spec.name,
                spec: spec.describe(),
                place: place.to_string(),
            });
        }
    }
    if let Some(extra) = given
        .keys()
        .find(|k| !specs.iter().any(|s| s.name == k.as_str()))
    {
        let known: Vec<String> = specs.iter().map(|s| format!("`{}`", s.name)).collect();
        return Err(Error::ExtraTensor {
            op,
            role,
            name: extra.clone(),
            place: place.to_string(),
            known: known.join(", "),
        });
    }
    Ok(())
}

fn check_dtype(op: &'static str, role: Role, spec: &TensorSpec, got: DType) -> Result<()> {
    if spec.dtypes.contains(&got) {
        return Ok(());
    }
    let expected: Vec<&str> = spec.dtypes.iter().map(|d| d.name()).collect();
    let fp8 = spec
        .dtypes
        .iter()
        .find(|d| matches!(d, DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0));
    let hint = match (got, fp8) {
        (DType::U8 | DType::I8, Some(f)) => format!(
            " (raw FP8 codes saved as {got}? store them with their float8 dtype, e.g. torch: `t.view(torch.{})`)",
            match f {
                DType::F8E4M3 => "float8_e4m3fn",
                DType::F8E5M2 => "float8_e5m2",
                _ => "float8_e8m0fnu",
            }
        ),
        _ => String::new(),
    };
    Err(Error::DType {
        op,
        role,
        name: spec.name.into(),
        got: got.name().into(),
        expected: expected.join(" or "),
        hint,
    })
}
