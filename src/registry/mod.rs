//! The registry core: what an op is ([`OpEntry`]: tensor contract, typed config, reference,
//! GPU implementations, tolerance policy, input generator), and everything that judges outputs
//! against it. The ops themselves and their list ([`crate::ops::REGISTRY`]) live in
//! [`crate::ops`]; nothing here depends on a particular op.
//!
//! Adding an op means: a reference function in `reference/`, one entry in `src/ops/`, a
//! kernel in `gpu/kernels/` with its wrapper (optional), and fixture cases in the generator.

pub mod adapt;
pub mod check;
pub mod compare;
pub mod config;
pub mod contract;
pub mod error;
pub mod gpu;
pub mod io;
pub mod limits;
pub mod progress;
pub mod report;
pub mod rng;
pub mod table;
pub mod tensor;
pub mod tolerance;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema};
use crate::registry::contract::{Constraint, Contract, TensorSpec};
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;

/// Reference implementation: validated inputs and config → outputs.
pub type RefFn = fn(&TensorMap, &Config) -> Result<TensorMap>;
/// GPU implementation (same contract as the reference).
pub type GpuFn = fn(&gpu::Device, &TensorMap, &Config) -> Result<TensorMap>;
/// Whether a GPU backend implements a config: `Ok(())`, or `Err(reason)` when it declines it
/// (the backend is then skipped for that config, never failed, and reports say why).
pub type SupportsFn = fn(&Config) -> std::result::Result<(), &'static str>;
/// The layouts an op accepts besides its contract's (DeepGEMM's packed and MN-major scales),
/// converted to the contract: `Ok(None)` when `inputs` need nothing; `place` says where they
/// came from in errors.
pub type AdaptFn = fn(&OpEntry, &TensorMap, &Config, &str) -> Result<Option<TensorMap>>;
/// The tolerance policy of one output, given everything the comparison can see.
pub type PolicyFn = for<'a> fn(&PolicyCtx<'a>) -> Policy<'a>;
/// Random inputs satisfying the contract under `config`; `sizes` pins named sizes (`M`, `K`),
/// the others are drawn small. Refuses (before allocating) inputs that would not fit in
/// memory.
pub type GenFn = fn(&mut Rng, &Config, &Sizes) -> Result<TensorMap>;

/// Named sizes requested from a generator (`dsv3 gen --size M=4096`). It records which names
/// the generator asks for, so that a size the op's generator does not use is refused instead of
/// silently ignored ([`OpEntry::generate_inputs`]).
#[derive(Debug, Clone, Default)]
pub struct Sizes {
    pinned: BTreeMap<String, usize>,
    asked: RefCell<BTreeSet<String>>,
}

impl Sizes {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pin `name` to `value`.
    pub fn insert(&mut self, name: impl Into<String>, value: usize) {
        self.pinned.insert(name.into(), value);
    }

    /// The pinned value of `name` (and a note that the generator asked for it).
    pub fn get(&self, name: &str) -> Option<&usize> {
        self.asked.borrow_mut().insert(name.to_string());
        self.pinned.get(name)
    }

    /// The pinned value of `name`, else one drawn uniformly from `lo..=hi` (the generators'
    /// usual size).
    pub fn or_draw(&self, name: &str, rng: &mut Rng, lo: usize, hi: usize) -> usize {
        self.get(name).copied().unwrap_or_else(|| rng.range(lo, hi))
    }

    /// Whether no size is pinned.
    pub fn is_empty(&self) -> bool {
        self.pinned.is_empty()
    }

    /// The pinned sizes.
    pub fn pinned(&self) -> &BTreeMap<String, usize> {
        &self.pinned
    }

    /// The names a generator has asked for so far.
    pub fn asked(&self) -> BTreeSet<String> {
        self.asked.borrow().clone()
    }
}

impl FromIterator<(&'static str, usize)> for Sizes {
    fn from_iter<I: IntoIterator<Item = (&'static str, usize)>>(iter: I) -> Self {
        let mut s = Sizes::new();
        for (k, v) in iter {
            s.insert(k, v);
        }
        s
    }
}

/// What a [`PolicyFn`] may look at.
pub struct PolicyCtx<'a> {
    pub output: &'a str,
    pub inputs: &'a TensorMap,
    pub candidate: &'a TensorMap,
    pub reference: &'a TensorMap,
    pub config: &'a Config,
}

/// One GPU implementation of an op (an op may have several backends, e.g. CUDA cores and
/// Tensor Cores); each is judged against the reference under the op's tolerance policy.
pub struct GpuImpl {
    /// Backend name shown by `verify` (`"cuda"`, `"simt"`, `"wgmma"`).
    pub backend: &'static str,
    pub run: GpuFn,
    /// The `.cu` file of the kernel.
    pub kernel: &'static str,
    /// The configs this backend implements (SPEC.md "GPU kernels" lists the declined ones).
    pub supports: SupportsFn,
}

impl GpuImpl {
    /// `Some(reason)` when this backend declines `config`.
    pub fn declines(&self, config: &Config) -> Option<&'static str> {
        (self.supports)(config).err()
    }
}

/// [`SupportsFn`] of a backend that implements every config of its op.
pub fn every_config(_: &Config) -> std::result::Result<(), &'static str> {
    Ok(())
}

/// One registered operation.
pub struct OpEntry {
    pub name: &'static str,
    /// Where the math comes from: equation numbers, paper section, official symbol.
    pub source: &'static str,
    pub summary: &'static str,
    pub inputs: &'static [TensorSpec],
    pub outputs: &'static [TensorSpec],
    pub constraints: &'static [Constraint],
    /// The op's config (its typed struct and fields: [`crate::op_config!`]).
    pub config: ConfigSchema,
    /// Other input layouts the op accepts (`None`: only the contract's).
    pub adapt: Option<AdaptFn>,
    pub reference: RefFn,
    /// `path::function` of the reference implementation (SPEC.md links it).
    pub reference_fn: &'static str,
    /// GPU implementations (empty when there is none).
    pub gpu: &'static [GpuImpl],
    pub policy: PolicyFn,
    /// The policy in words, with its reason (SPEC.md repeats it).
    pub policy_doc: &'static str,
    pub generate: GenFn,
    /// Configs (JSON objects) the property tests, the GPU diff and the benches sweep, besides the
    /// defaults: one per config branch.
    pub test_configs: &'static [&'static str],
    /// Named sizes of DeepSeek-V3's real shapes (at reduced M) for benches and GPU tests.
    pub v3_sizes: &'static [&'static [(&'static str, usize)]],
}

impl OpEntry {
    pub fn contract(&self) -> Contract<'_> {
        Contract {
            op: self.name,
            inputs: self.inputs,
            outputs: self.outputs,
            constraints: self.constraints,
        }
    }

    /// `inputs` in the contract's layout when the op accepts another one they are in
    /// ([`OpEntry::adapt`]); `Ok(None)` when they need nothing.
    pub fn adapt_inputs(
        &self,
        inputs: &TensorMap,
        config: &Config,
        place: &str,
    ) -> Result<Option<TensorMap>> {
        match self.adapt {
            Some(adapt) => adapt(self, inputs, config, place),
            None => Ok(None),
        }
    }

    /// Run the reference on contract-checked `inputs` (`bindings` from
    /// [`Contract::check_inputs`]) and check that its outputs have the contract's names, dtypes
    /// and shapes, so that an adapter's mistake is an [`Error::Internal`], never a wrong-shaped
    /// file or a panic later on. The map may also hold auxiliary tensors ([`is_aux`] names)
    /// that the op's policy reuses; [`without_aux`] removes them before anything is written.
    pub fn run_reference(
        &self,
        inputs: &TensorMap,
        config: &Config,
        bindings: &crate::registry::contract::Bindings,
    ) -> Result<TensorMap> {
        let contract = self.contract();
        crate::registry::limits::ensure_fits(
            &format!("{}: the reference's outputs for these inputs", self.name),
            contract.output_bytes(bindings, config),
        )?;
        let outputs = (self.reference)(inputs, config)?;
        let contract_outputs = outputs.keys().filter(|k| !is_aux(k)).count();
        for spec in self.outputs {
            let Some(t) = outputs.get(spec.name) else {
                return Err(Error::Internal(format!(
                    "{}: the reference returned no `{}`",
                    self.name, spec.name
                )));
            };
            let shape = contract.expected_shape(spec, bindings, config);
            if t.shape != shape
                || !spec.dtypes.contains(&t.dtype)
                || t.data.len() != t.numel() * t.dtype.size()
            {
                return Err(Error::Internal(format!(
                    "{}: the reference's `{}` is {} {:?}; the contract says {} {shape:?}",
                    self.name,
                    spec.name,
                    t.dtype,
                    t.shape,
                    crate::registry::contract::shape_rule(spec.shape)
                )));
            }
        }
        if contract_outputs != self.outputs.len() {
            return Err(Error::Internal(format!(
                "{}: the reference returned {} tensors for {} outputs",
                self.name,
                outputs.len(),
                self.outputs.len()
            )));
        }
        Ok(outputs)
    }

    /// The size names this op's generator reads (found by running it once on its defaults).
    pub fn size_names(&self, config: &Config) -> Vec<String> {
        let probe = Sizes::new();
        let _ = (self.generate)(&mut Rng::new(0), config, &probe);
        probe.asked().into_iter().collect()
    }

    /// Random inputs from the generator with `sizes` pinned: refuses a size name the generator
    /// does not read, and a request whose inputs would not fit in memory
    /// ([`crate::registry::limits`]), before generating anything large.
    pub fn generate_inputs(
        &self,
        rng: &mut Rng,
        config: &Config,
        sizes: &Sizes,
    ) -> Result<TensorMap> {
        let known = self.size_names(config);
        for name in sizes.pinned().keys() {
            if !known.contains(name) {
                return Err(Error::Usage(format!(
                    "{}: its generator has no size named `{name}`; its sizes are {}",
                    self.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
        }
        (self.generate)(rng, config, sizes).map_err(|e| match e {
            Error::TooLarge { what, need, limit } => Error::TooLarge {
                what: format!(
                    "{}: {what} (with {})",
                    self.name,
                    sizes
                        .pinned()
                        .iter()
                        .map(|(k, v)| format!("{k} = {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                need,
                limit,
            },
            other => other,
        })
    }

    /// Everything `dsv3 ops OP` prints, as JSON (`dsv3 ops --json`): tensors with dtypes and
    /// shape rules, constraints, config fields with domains and defaults, the tolerance policy,
    /// GPU backends and generator sizes.
    pub fn describe_json(&self) -> serde_json::Value {
        use serde_json::json;
        let tensors = |specs: &[TensorSpec]| -> Vec<serde_json::Value> {
            specs
                .iter()
                .map(|s| {
                    json!({
                        "name": s.name,
                        "dtypes": s.dtypes.iter().map(|d| d.name()).collect::<Vec<_>>(),
                        "shape": crate::registry::contract::shape_rule(s.shape),
                        "doc": s.doc,
                    })
                })
                .collect()
        };
        json!({
            "name": self.name,
            "summary": self.summary,
            "source": self.source,
            "reference": self.reference_fn,
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
            "constraints": self.constraints.iter().map(|c| c.describe()).collect::<Vec<_>>(),
            "config": self.config.fields().map(|f| json!({
                "name": f.name,
                "domain": f.describe().split_once(": ").map_or(String::new(), |(_, d)| d.split(" = ").next().unwrap_or("").to_string()),
                "default": serde_json::from_str::<serde_json::Value>(f.default).unwrap_or(serde_json::Value::Null),
                "doc": f.doc,
            })).collect::<Vec<_>>(),
            "tolerance": self.policy_doc,
            "gpu": self.gpu.iter().map(|g| json!({"backend": g.backend, "kernel": g.kernel})).collect::<Vec<_>>(),
            "generator_sizes": self.size_names(&self.default_config()),
        })
    }

    /// Parse and validate a config (`null` = all defaults).
    pub fn parse_config(&self, raw: &serde_json::Value) -> Result<Config> {
        Config::parse(self.name, &self.config, raw)
    }

    pub fn default_config(&self) -> Config {
        Config::defaults(self.name, &self.config)
    }

    /// The default config followed by every entry of `test_configs`.
    pub fn configs(&self) -> Vec<Config> {
        let mut v = vec![self.default_config()];
        for raw in self.test_configs {
            let json: serde_json::Value = serde_json::from_str(raw)
                .unwrap_or_else(|e| panic!("{}: test config {raw}: {e}", self.name));
            v.push(
                self.parse_config(&json)
                    .unwrap_or_else(|e| panic!("{}: test config {raw}: {e}", self.name)),
            );
        }
        v
    }

    /// `v3_sizes` as [`Sizes`] maps.
    pub fn v3_sizes(&self) -> Vec<Sizes> {
        self.v3_sizes
            .iter()
            .map(|set| set.iter().copied().collect())
            .collect()
    }
}

/// Whether a reference tensor is auxiliary (for the op's policy, not an output): `aux:` names.
pub fn is_aux(name: &str) -> bool {
    name.starts_with("aux:")
}

/// The contract outputs of a reference map (its auxiliary tensors removed).
pub fn without_aux(mut map: TensorMap) -> TensorMap {
    map.retain(|k, _| !is_aux(k));
    map
}
