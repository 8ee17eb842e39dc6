//! Op configuration: a JSON object validated against the op's declared fields, then read once
//! into the op's typed config struct.
//!
//! Each op declares its config with [`op_config!`](crate::op_config): one definition gives the
//! struct its functions read (`cfg.get::<QuantConfig>().block_size`: a misspelled field is a
//! compile error), the fields `dsv3 ops OP` prints (name, domain, default, doc) and the
//! validation. Unknown fields, wrong types and values outside a field's domain are errors
//! naming the field; missing fields take their defaults.

use std::any::Any;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::registry::error::{Error, Result};

/// Ceilings of integer config fields (`FieldKind::Int`): what each field's type and meaning
/// allow, so that no value is truncated (SPEC.md "Resource ceilings").
pub mod ceil {
    /// Tile edges, promotion intervals: 2^20 elements, above any GEMM dimension of the model.
    pub const BLOCK: u64 = 1 << 20;
    /// Counts of experts, groups, nodes, GPUs, replicas, top-k: 2^16 (V3: 256 experts).
    pub const COUNT: u64 = crate::registry::limits::MAX_MODEL_COUNT;
    /// Positions and step counters held as i32 by the official code and torch.
    pub const I32: u64 = i32::MAX as u64;
}

/// The domain of one config field.
#[derive(Debug, Clone, Copy)]
pub enum FieldKind {
    /// An integer in `min..=max` (the ceiling states what the field's own type and meaning
    /// allow, so that `4294967309` is refused rather than truncated to 13).
    Int { min: u64, max: u64 },
    /// A finite number > 0.
    PositiveFloat,
    /// A finite number ≥ 0 (rates and coefficients where 0 switches a term off).
    NonNegativeFloat,
    /// `true` / `false`.
    Bool,
    /// One of the listed strings; `null` allowed when `nullable`.
    Choice {
        values: &'static [&'static str],
        nullable: bool,
    },
}

/// One declared config field.
#[derive(Debug, Clone, Copy)]
pub struct ConfigField {
    pub name: &'static str,
    pub kind: FieldKind,
    /// The default as JSON text (`"128"`, `"null"`, `"\"f32\""`).
    pub default: &'static str,
    pub doc: &'static str,
}

impl ConfigField {
    /// `name: domain = default` for listings.
    pub fn describe(&self) -> String {
        let domain = match self.kind {
            FieldKind::Int { min, max } => format!("int in {min}..={max}"),
            FieldKind::PositiveFloat => "number > 0".to_string(),
            FieldKind::NonNegativeFloat => "number ≥ 0".to_string(),
            FieldKind::Bool => "bool".to_string(),
            FieldKind::Choice { values, nullable } => {
                let mut v: Vec<String> = values.iter().map(|s| format!("\"{s}\"")).collect();
                if nullable {
                    v.push("null".into());
                }
                v.join("|")
            }
        };
        format!("{}: {domain} = {}", self.name, self.default)
    }

    fn check(&self, op: &'static str, v: &Value) -> Result<()> {
        let bad = |why: String| Error::Config {
            op,
            msg: format!("field `{}` = {v}: {why}", self.name),
        };
        match self.kind {
            FieldKind::Int { min, max } => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(()),
                _ => Err(bad(format!("expected an integer in {min}..={max}"))),
            },
            FieldKind::PositiveFloat => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(()),
                _ => Err(bad("expected a finite number > 0".into())),
            },
            FieldKind::NonNegativeFloat => match v.as_f64() {
                Some(x) if x >= 0.0 && x.is_finite() => Ok(()),
                _ => Err(bad("expected a finite number ≥ 0".into())),
            },
            FieldKind::Bool => v
                .as_bool()
                .map(|_| ())
                .ok_or_else(|| bad("expected true or false".into())),
            FieldKind::Choice { values, nullable } => match v {
                Value::Null if nullable => Ok(()),
                Value::String(s) if values.contains(&s.as_str()) => Ok(()),
                _ => Err(bad(format!(
                    "expected one of {}",
                    self.describe().split_once(": ").map_or("", |x| x.1)
                ))),
            },
        }
    }
}

impl FieldKind {
    /// The domain of a choice field of `T`'s values.
    pub const fn choice<T: Choice>() -> Self {
        FieldKind::Choice {
            values: T::VALUES,
            nullable: false,
        }
    }

    /// The domain of a choice field of `T`'s values or `null` (read as `Option<T>`).
    pub const fn nullable<T: Choice>() -> Self {
        FieldKind::Choice {
            values: T::VALUES,
            nullable: true,
        }
    }
}

/// A choice field's type: an enum whose variants are the field's strings
/// ([`choice!`](crate::choice) declares one).
pub trait Choice: Sized + Copy + 'static {
    /// The strings, in variant order.
    const VALUES: &'static [&'static str];
    /// One line of help per value, where there is one (the CLI lists them).
    const HELP: &'static [&'static str] = &[];
    /// The variant of `VALUES[i]`.
    fn from_index(i: usize) -> Self;
    /// The string of this variant.
    fn name(self) -> &'static str;
    /// The variant spelled `s`.
    fn from_name(s: &str) -> Option<Self> {
        Self::VALUES
            .iter()
            .position(|v| *v == s)
            .map(Self::from_index)
    }
}

/// How a declared field's validated JSON is read into its Rust type.
pub trait FieldValue: Sized {
    fn read(v: &Value) -> Self;
}

impl FieldValue for usize {
    fn read(v: &Value) -> Self {
        let n = v.as_u64().expect("validated integer");
        usize::try_from(n).expect("validated integers are within the field's range")
    }
}

impl FieldValue for u32 {
    fn read(v: &Value) -> Self {
        let n = v.as_u64().expect("validated integer");
        u32::try_from(n).expect("validated integers are within the field's range")
    }
}

impl FieldValue for f64 {
    fn read(v: &Value) -> Self {
        v.as_f64().expect("validated number")
    }
}

impl FieldValue for bool {
    fn read(v: &Value) -> Self {
        v.as_bool().expect("validated bool")
    }
}

impl<T: Choice> FieldValue for T {
    fn read(v: &Value) -> Self {
        let s = v.as_str().expect("validated choice");
        let i = T::VALUES
            .iter()
            .position(|x| *x == s)
            .expect("validated choice");
        T::from_index(i)
    }
}

impl<T: Choice> FieldValue for Option<T> {
    fn read(v: &Value) -> Self {
        (!v.is_null()).then(|| T::read(v))
    }
}

/// An op's typed config, declared with [`op_config!`](crate::op_config).
pub trait OpConfig: Any + Send + Sync + Sized {
    /// The fields, as `dsv3 ops` lists them and [`Config::parse`] validates them.
    const FIELDS: &'static [ConfigField];
    /// The struct from validated values (every field present).
    fn from_values(values: &Map<String, Value>) -> Self;
}

/// What an op's config is: its fields (with any default this op sets differently) and how the
/// validated values become its typed struct.
#[derive(Clone, Copy)]
pub struct ConfigSchema {
    fields: &'static [ConfigField],
    /// `(field, default as JSON)` for the fields whose default this op changes.
    defaults: &'static [(&'static str, &'static str)],
    build: fn(&Map<String, Value>) -> Arc<dyn Any + Send + Sync>,
}

fn build<T: OpConfig>(values: &Map<String, Value>) -> Arc<dyn Any + Send + Sync> {
    Arc::new(T::from_values(values))
}

impl ConfigSchema {
    /// The schema of `T`.
    pub const fn of<T: OpConfig>() -> Self {
        ConfigSchema {
            fields: T::FIELDS,
            defaults: &[],
            build: build::<T>,
        }
    }

    /// The same fields with other defaults (`linear_fp8_wgrad`'s `out_dtype` is `"f32"`); a
    /// name that is not a field is caught by the registry's tests.
    pub const fn with_defaults(self, defaults: &'static [(&'static str, &'static str)]) -> Self {
        ConfigSchema { defaults, ..self }
    }

    /// The fields with this op's defaults.
    pub fn fields(&self) -> impl Iterator<Item = ConfigField> + '_ {
        self.fields.iter().map(|f| {
            let default = self
                .defaults
                .iter()
                .find(|(name, _)| *name == f.name)
                .map_or(f.default, |(_, d)| *d);
            ConfigField { default, ..*f }
        })
    }

    /// Whether the op takes no config.
    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The names of the changed defaults that are not fields (an empty list when the schema is
    /// consistent).
    pub fn unknown_defaults(&self) -> Vec<&'static str> {
        self.defaults
            .iter()
            .map(|(name, _)| *name)
            .filter(|name| !self.fields.iter().any(|f| f.name == *name))
            .collect()
    }
}

/// Declare a choice field's enum: `choice! { pub enum OutDtype { Bf16 = "bf16", F32 = "f32" } }`.
#[macro_export]
macro_rules! choice {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        $vis enum $name { $($(#[$vmeta])* $variant),+ }

        impl $crate::registry::config::Choice for $name {
            const VALUES: &'static [&'static str] = &[$($text),+];
            fn from_index(i: usize) -> Self {
                [$($name::$variant),+][i]
            }
            fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }
    };
}

/// Declare an op's typed config: one line per field, `name: Type = "default as JSON", domain,
/// "doc";` (the domain a [`FieldKind`]). Generates the struct (`pub` fields) and its
/// [`OpConfig`] implementation, so the fields `dsv3 ops` prints and the ones the op reads are
/// the same definition.
#[macro_export]
macro_rules! op_config {
    ($(#[$meta:meta])* $vis:vis struct $name:ident {
        $($field:ident : $ty:ty = $default:literal, $kind:expr, $doc:literal;)*
    }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis struct $name {
            $(#[doc = $doc] pub $field: $ty,)*
        }

        impl $crate::registry::config::OpConfig for $name {
            const FIELDS: &'static [$crate::registry::config::ConfigField] = &[$(
                $crate::registry::config::ConfigField {
                    name: stringify!($field),
                    kind: $kind,
                    default: $default,
                    doc: $doc,
                },
            )*];
            #[allow(unused_variables)]
            fn from_values(values: &serde_json::Map<String, serde_json::Value>) -> Self {
                $name {
                    $($field: <$ty as $crate::registry::config::FieldValue>::read(&values[stringify!($field)]),)*
                }
            }
        }
    };
}

op_config! {
    /// The config of an op that takes none.
    pub struct NoConfig {}
}

/// A validated config: every declared field present (defaults filled in), nothing else, and
/// the op's typed struct read from it.
#[derive(Clone)]
pub struct Config {
    op: &'static str,
    values: Map<String, Value>,
    typed: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.op, Value::Object(self.values.clone()))
    }
}

impl PartialEq for Config {
    fn eq(&self, other: &Self) -> bool {
        self.op == other.op && self.values == other.values
    }
}

impl Config {
    /// Validate `raw` (a JSON object or `null`) against `schema`.
    pub fn parse(op: &'static str, schema: &ConfigSchema, raw: &Value) -> Result<Self> {
        let fields: Vec<ConfigField> = schema.fields().collect();
        let given = match raw {
            Value::Null => Map::new(),
            Value::Object(m) => m.clone(),
            other => {
                return Err(Error::Config {
                    op,
                    msg: format!("expected a JSON object, got {other}"),
                })
            }
        };
        for key in given.keys() {
            if !fields.iter().any(|f| f.name == key) {
                let known: Vec<&str> = fields.iter().map(|f| f.name).collect();
                return Err(Error::Config {
                    op,
                    msg: format!(
                        "unknown field `{key}`; {op} takes: {}",
                        if known.is_empty() {
                            "no fields".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                });
            }
        }
        let mut values = Map::new();
        for f in &fields {
            let v = match given.get(f.name) {
                Some(v) => v.clone(),
                None => serde_json::from_str(f.default).expect("config defaults are valid JSON"),
            };
            f.check(op, &v)?;
            values.insert(f.name.to_string(), v);
        }
        let typed = (schema.build)(&values);
        Ok(Config { op, values, typed })
    }

    /// The defaults of `schema`.
    pub fn defaults(op: &'static str, schema: &ConfigSchema) -> Self {
        Self::parse(op, schema, &Value::Null).expect("defaults satisfy their own fields")
    }

    /// The op's typed config. Panics when `T` is not the op's config type (a dsv3 bug that
    /// every test running the op catches).
    pub fn get<T: OpConfig>(&self) -> &T {
        self.try_get().unwrap_or_else(|| {
            panic!(
                "{}: its config is not a {}",
                self.op,
                std::any::type_name::<T>()
            )
        })
    }

    /// The op's typed config if it is a `T`.
    pub fn try_get<T: OpConfig>(&self) -> Option<&T> {
        self.typed.downcast_ref::<T>()
    }

    pub fn as_json(&self) -> Value {
        Value::Object(self.values.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    crate::choice! {
        enum Fmt { Ue8m0 = "ue8m0" }
    }

    crate::op_config! {
        struct Quant {
            block_size: usize = "128", FieldKind::Int { min: 1, max: 1 << 20 }, "tile edge";
            scale_fmt: Option<Fmt> = "null", FieldKind::nullable::<Fmt>(), "scale format";
        }
    }

    const SCHEMA: ConfigSchema = ConfigSchema::of::<Quant>();

    #[test]
    fn defaults_fill_missing_fields_and_the_struct_reads_them() {
        let c = Config::parse("op", &SCHEMA, &json!({"scale_fmt": "ue8m0"})).unwrap();
        assert_eq!(
            c.get::<Quant>(),
            &Quant {
                block_size: 128,
                scale_fmt: Some(Fmt::Ue8m0)
            }
        );
        assert_eq!(
            c.as_json(),
            json!({"block_size": 128, "scale_fmt": "ue8m0"})
        );
        let c = Config::defaults("op", &SCHEMA);
        assert_eq!(c.get::<Quant>().scale_fmt, None);
        assert!(c.try_get::<NoConfig>().is_none());
    }

    #[test]
    fn an_op_may_change_a_default() {
        const OTHER: ConfigSchema = SCHEMA.with_defaults(&[("block_size", "64")]);
        assert_eq!(Config::defaults("op", &OTHER).get::<Quant>().block_size, 64);
        let listed: Vec<String> = OTHER.fields().map(|f| f.describe()).collect();
        assert_eq!(listed[0], "block_size: int in 1..=1048576 = 64");
        assert!(OTHER.unknown_defaults().is_empty());
        let bad = SCHEMA.with_defaults(&[("blocksize", "64")]);
        assert_eq!(bad.unknown_defaults(), vec!["blocksize"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("op", &SCHEMA, &json!({"block_size": 0}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`block_size`") && e.contains("1..=1048576"),
            "{e}"
        );
        // not truncated to its type: 2^32 + 13 is refused and printed whole
        let e = Config::parse("op", &SCHEMA, &json!({"block_size": 4294967309u64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4294967309") && e.contains("1..=1048576"), "{e}");
        let e = Config::parse("op", &SCHEMA, &json!({"scale_fmt": "e8m0"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"ue8m0\"|null"), "{e}");
        let e = Config::parse("op", &SCHEMA, &json!({"blocksize": 64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `blocksize`"), "{e}");
        let e = Config::parse("op", &SCHEMA, &json!([1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a JSON object"), "{e}");
    }
}
