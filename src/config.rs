//! Op configuration: a JSON object validated against the op's declared fields.
//!
//! Unknown fields, wrong types and values outside a field's domain are errors naming the field;
//! missing fields take their defaults.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// The domain of one config field.
#[derive(Debug, Clone, Copy)]
pub enum FieldKind {
    /// An integer ≥ 1.
    PositiveInt,
    /// A finite number > 0.
    PositiveFloat,
    /// A finite number ≥ 0 (rates and coefficients where 0 switches a term off).
    NonNegativeFloat,
    /// An integer ≥ 0.
    NonNegativeInt,
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
            FieldKind::PositiveInt => "int ≥ 1".to_string(),
            FieldKind::PositiveFloat => "number > 0".to_string(),
            FieldKind::NonNegativeFloat => "number ≥ 0".to_string(),
            FieldKind::NonNegativeInt => "int ≥ 0".to_string(),
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
            FieldKind::PositiveInt => match v.as_u64() {
                Some(n) if n >= 1 => Ok(()),
                _ => Err(bad("expected an integer ≥ 1".into())),
            },
            FieldKind::PositiveFloat => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(()),
                _ => Err(bad("expected a finite number > 0".into())),
            },
            FieldKind::NonNegativeFloat => match v.as_f64() {
                Some(x) if x >= 0.0 && x.is_finite() => Ok(()),
                _ => Err(bad("expected a finite number ≥ 0".into())),
            },
            FieldKind::NonNegativeInt => match v.as_u64() {
                Some(_) => Ok(()),
                None => Err(bad("expected an integer ≥ 0".into())),
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
        self.get(name).as_u64().expect("validated integer") as usize
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
            kind: FieldKind::PositiveInt,
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
        assert!(e.contains("`block_size`") && e.contains("≥ 1"), "{e}");
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
