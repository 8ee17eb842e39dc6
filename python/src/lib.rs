//! `dsv3._native`: the dsv3 library in-process for Python (the `dsv3` package wraps it).
//!
//! Tensors cross as `(name, dtype, shape, Staged)`: a [`Staged`] buffer is allocated here,
//! filled by numpy or torch through its address (one copy from the caller's tensor, whatever its
//! device and strides), then moved into the library without another copy. Outputs come back in
//! `Staged` buffers that numpy and torch view in place. Every error of the library is an
//! `InputError` (a `ValueError`) naming the culprit; a panic (a dsv3 bug) becomes a
//! `RuntimeError` and never crosses into the interpreter.

use std::path::Path;

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use dsv3::registry::check::Mode;
use dsv3::registry::io::TensorMap;
use dsv3::registry::tensor::{DType, Tensor};
use dsv3::registry::{self, OpEntry};

create_exception!(
    _native,
    InputError,
    PyValueError,
    "Bad input: an unknown op, a missing or extra tensor, a wrong dtype or shape, an invalid config, a NaN where forbidden. The message names the culprit."
);

/// A byte buffer owned by Rust that numpy and torch write to or read from in place.
#[pyclass(module = "dsv3._native")]
pub struct Staged {
    data: Vec<u8>,
}

#[pymethods]
impl Staged {
    /// The address of the first byte (valid while this object lives and is not consumed).
    #[getter]
    fn address(&mut self) -> usize {
        self.data.as_mut_ptr() as usize
    }

    #[getter]
    fn nbytes(&self) -> usize {
        self.data.len()
    }
}

/// One tensor crossing the boundary into dsv3: name, safetensors dtype name, shape, bytes.
type TensorArg = (String, String, Vec<usize>, Py<Staged>);
/// One tensor crossing back out of dsv3, in the same form.
type TensorOut = (String, String, Vec<usize>, Staged);

fn input_error(e: dsv3::Error) -> PyErr {
    match e {
        dsv3::Error::Internal(msg) => PyRuntimeError::new_err(format!(
            "internal error (a dsv3 bug, please report it): {msg}"
        )),
        other => InputError::new_err(other.to_string()),
    }
}

/// Run `f`, turning a panic (a dsv3 bug) into a `RuntimeError`.
fn guarded<T>(f: impl FnOnce() -> PyResult<T>) -> PyResult<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let what = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Err(PyRuntimeError::new_err(format!(
                "internal error (a dsv3 bug, please report it): {what}"
            )))
        }
    }
}

/// A buffer of `nbytes` zero bytes for the caller to fill (checked against the memory budget).
#[pyfunction]
fn alloc(nbytes: usize) -> PyResult<Staged> {
    dsv3::registry::limits::ensure_fits("staging a tensor for dsv3", Some(nbytes as u64))
        .map_err(input_error)?;
    Ok(Staged {
        data: vec![0; nbytes],
    })
}

/// The staged tensors as a map (their buffers moved out).
fn to_map(py: Python<'_>, role: &str, args: Vec<TensorArg>) -> PyResult<TensorMap> {
    let mut map = TensorMap::new();
    for (name, dtype, shape, staged) in args {
        let dt = DType::from_name(&dtype).ok_or_else(|| {
            InputError::new_err(format!(
                "{role} `{name}`: dtype {dtype} is not one dsv3 reads"
            ))
        })?;
        let data = std::mem::take(&mut staged.borrow_mut(py).data);
        let t = Tensor::from_bytes(dt, shape.clone(), data).ok_or_else(|| {
            InputError::new_err(format!(
                "{role} `{name}`: its bytes do not hold shape {shape:?} of {dtype}"
            ))
        })?;
        if map.insert(name.clone(), t).is_some() {
            return Err(InputError::new_err(format!("{role} `{name}` given twice")));
        }
    }
    Ok(map)
}

fn from_map(map: TensorMap) -> Vec<TensorOut> {
    map.into_iter()
        .map(|(name, t)| {
            (
                name,
                t.dtype.name().to_string(),
                t.shape,
                Staged { data: t.data },
            )
        })
        .collect()
}

fn op_and_config(
    op: &str,
    config: Option<&str>,
) -> PyResult<(&'static OpEntry, dsv3::registry::config::Config)> {
    let op = dsv3::ops::find(op).map_err(input_error)?;
    let raw: serde_json::Value = match config {
        None => serde_json::Value::Null,
        Some(text) => serde_json::from_str(text).map_err(|e| {
            InputError::new_err(format!("{}: config: not valid JSON: {e}", op.name))
        })?,
    };
    let cfg = op.parse_config(&raw).map_err(input_error)?;
    Ok((op, cfg))
}

/// The registered ops' names, in listing order.
#[pyfunction]
fn ops() -> Vec<String> {
    dsv3::ops::REGISTRY
        .iter()
        .map(|op| op.name.to_string())
        .collect()
}

/// One op's contract, config and tolerance as JSON (`dsv3 ops OP --json`).
#[pyfunction]
fn describe(op: &str) -> PyResult<String> {
    guarded(|| {
        let op = dsv3::ops::find(op).map_err(input_error)?;
        Ok(op.describe_json().to_string())
    })
}

/// The reference outputs of `op` on `inputs`.
#[pyfunction]
#[pyo3(signature = (op, inputs, config=None))]
fn reference(
    py: Python<'_>,
    op: &str,
    inputs: Vec<TensorArg>,
    config: Option<&str>,
) -> PyResult<Vec<TensorOut>> {
    let inputs = guarded(|| to_map(py, "input", inputs))?;
    py.detach(|| {
        guarded(|| {
            let (op, cfg) = op_and_config(op, config)?;
            let adapted = op.adapt_inputs(&inputs, &cfg, "").map_err(input_error)?;
            let inputs = adapted.as_ref().unwrap_or(&inputs);
            let b = op
                .contract()
                .check_inputs(inputs, &cfg, "")
                .map_err(input_error)?;
            let out = op.run_reference(inputs, &cfg, &b).map_err(input_error)?;
            Ok(from_map(registry::without_aux(out)))
        })
    })
}

/// Judge `outputs` against the reference: `(report JSON, the CLI's table, pass, the command
/// that reproduces a failure saved to save_to)`.
#[pyfunction]
#[pyo3(signature = (op, inputs, outputs, config=None, exact=false, save_to=None))]
fn check(
    py: Python<'_>,
    op: &str,
    inputs: Vec<TensorArg>,
    outputs: Vec<TensorArg>,
    config: Option<&str>,
    exact: bool,
    save_to: Option<String>,
) -> PyResult<(String, String, bool, Option<String>)> {
    let inputs = guarded(|| to_map(py, "input", inputs))?;
    let outputs = guarded(|| to_map(py, "output", outputs))?;
    py.detach(|| {
        guarded(|| {
            let (op, cfg) = op_and_config(op, config)?;
            let mode = if exact { Mode::Exact } else { Mode::Policy };
            let r = dsv3::registry::check::check(op, &inputs, &outputs, &cfg, mode, ("", ""))
                .map_err(input_error)?;
            let json = dsv3::registry::report::Envelope::new("check", Vec::new(), &r)
                .to_json()
                .map_err(input_error)?;
            let saved = match (&save_to, r.pass) {
                (Some(dir), false) => Some(
                    dsv3::registry::check::save_failure(
                        Path::new(dir),
                        op,
                        &inputs,
                        &outputs,
                        &cfg,
                    )
                    .map_err(input_error)?,
                ),
                _ => None,
            };
            Ok((json, dsv3::registry::check::render(&r), r.pass, saved))
        })
    })
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("InputError", m.py().get_type::<InputError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Staged>()?;
    m.add_function(wrap_pyfunction!(alloc, m)?)?;
    m.add_function(wrap_pyfunction!(ops, m)?)?;
    m.add_function(wrap_pyfunction!(describe, m)?)?;
    m.add_function(wrap_pyfunction!(reference, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    Ok(())
}
