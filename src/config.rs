//! Op configuration: a JSON object validated against the op's declared fields.
//!
//! Unknown fields, wrong types and values outside a field's domain are errors naming the field;
//! missing fields take their defaults.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Ceilings of integer config fields (`FieldKind::Int`): what each field's type and meaning
/// allow, so that no value is truncated (SPEC.md "Resource ceilings").
pub mod ceil {
    /// Tile edges, promotion intervals: 2^20 elements, above any GEMM dimension of the model.
    pub const BLOCK: u64 = 1 << 20;
    /// Counts of experts, groups, nodes, GPUs, replicas, top-k: 2^16 (V3: 256 experts).
    pub const COUNT: u64 = crate::limits::MAX_MODEL_COUNT;
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

/// A validated config: every declared field present (defaults filled in), nothing else.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    op: &'static str,
    values: Map<String, Value>,
}

impl Config {
    /// Validate `raw` (a JSON object or `null`) against `fields`.
    pub fn parse(op: &'static str, fields: &[ConfigField], raw: &Value) -> Result<Self> {
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
        for f in fields {
            let v = match given.get(f.name) {
                Some(v) => v.clone(),
                None => serde_json::from_str(f.default).expect("config defaults are valid JSON"),
            };
            f.check(op, &v)?;
            values.insert(f.name.to_string(), v);
        }
        Ok(Config { op, values })
    }

    /// The defaults of `fields`.
    pub fn defaults(op: &'static str, fields: &[ConfigField]) -> Self {
        Self::parse(op, fields, &Value::Null).expect("defaults satisfy their own fields")
    }

    pub fn usize(&self, name: &str) -> usize {
        let v = self.get(name).as_u64().expect("validated integer");
        usize::try_from(v).expect("validated integers are within the field's range")
    }

    /// An integer field the model holds as `u32` (its range is declared within `u32`).
    pub fn u32(&self, name: &str) -> u32 {
        let v = self.get(name).as_u64().expect("validated integer");
        u32::try_from(v).expect("validated integers are within the field's range")
    }

    pub fn f64(&self, name: &str) -> f64 {
        self.get(name).as_f64().expect("validated number")
    }

    pub fn bool(&self, name: &str) -> bool {
        self.get(name).as_bool().expect("validated bool")
    }

    /// A choice field's string, `None` for null.
    pub fn choice(&self, name: &str) -> Option<&str> {
        self.get(name).as_str()
    }

    /// A copy with one field replaced (validated again).
    pub fn with(&self, fields: &[ConfigField], name: &str, value: Value) -> Result<Self> {
        let mut raw = self.values.clone();
        raw.insert(name.to_string(), value);
        Self::parse(self.op, fields, &Value::Object(raw))
    }

    pub fn as_json(&self) -> Value {
        Value::Object(self.values.clone())
    }

    fn get(&self, name: &str) -> &Value {
        self.values
            .get(name)
            .unwrap_or_else(|| panic!("{}: config field `{name}` is not declared", self.op))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIELDS: &[ConfigField] = &[
        ConfigField {
            name: "block_size",
            kind: FieldKind::Int {
                min: 1,
                max: 1 << 20,
            },
            default: "128",
            doc: "",
        },
        ConfigField {
            name: "scale_fmt",
            kind: FieldKind::Choice {
                values: &["ue8m0"],
                nullable: true,
            },
            default: "null",
            doc: "",
        },
    ];

    #[test]
    fn defaults_fill_missing_fields() {
        let c = Config::parse("op", FIELDS, &json!({"scale_fmt": "ue8m0"})).unwrap();
        assert_eq!(c.usize("block_size"), 128);
        assert_eq!(c.choice("scale_fmt"), Some("ue8m0"));
    }

    #[test]
    fn errors_name_the_field() {
        let e = Config::parse("op", FIELDS, &json!({"block_size": 0}))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`block_size`") && e.contains("1..=1048576"),
            "{e}"
        );
        // not truncated to its type: 2^32 + 13 is refused and printed whole
        let e = Config::parse("op", FIELDS, &json!({"block_size": 4294967309u64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4294967309") && e.contains("1..=1048576"), "{e}");
        let e = Config::parse("op", FIELDS, &json!({"scale_fmt": "e8m0"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"ue8m0\"|null"), "{e}");
        let e = Config::parse("op", FIELDS, &json!({"blocksize": 64}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `blocksize`"), "{e}");
        let e = Config::parse("op", FIELDS, &json!([1]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected a JSON object"), "{e}");
    }
}
