"""dsv3: the reference oracle for DeepSeek-V3's math, in-process from PyTorch and pytest.

Is this kernel output right? ``dsv3.check`` recomputes an op's outputs with the readable
reference and judges yours element by element under the op's derived tolerance policy, exactly
as ``dsv3 check`` on the command line does (same library, no subprocess, no temporary files)::

    import dsv3
    report = dsv3.check("act_quant", {"x": x}, {"y": y, "s": s})
    assert report.passed, report
    dsv3.assert_check("fp8_gemm", {"a": a, "a_s": a_s, "b": b, "b_s": b_s}, {"c": c},
                      config={"accumulation": "tensor_core_bound"})

Tensors are torch tensors (any device, any strides: copied once into dsv3) or numpy arrays
(bf16 and FP8 as ``ml_dtypes`` dtypes). ``dsv3.ops()`` lists the ops and ``dsv3.describe(op)``
gives one op's tensors, config fields and tolerance. Bad input raises :class:`InputError` (a
``ValueError``) naming the culprit.
"""

import json as _json
import os as _os

import numpy as _np

from . import _native
from ._native import InputError

__all__ = ["ops", "describe", "reference", "check", "assert_check", "Report", "InputError"]
__version__ = _native.__version__

# safetensors dtype names <-> numpy dtype names (ml_dtypes for bf16 and FP8) and torch dtypes
_NUMPY_NAMES = {
    "float32": "F32",
    "float64": "F64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "bool": "BOOL",
}
_DTYPE_NAMES = {v: k for k, v in _NUMPY_NAMES.items()}
_TORCH_NAMES = {
    "torch.float32": "F32",
    "torch.float64": "F64",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.float8_e8m0fnu": "F8_E8M0",
    "torch.int8": "I8",
    "torch.int16": "I16",
    "torch.int32": "I32",
    "torch.int64": "I64",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


class _Memory:
    """A numpy view of a staged buffer; keeps the buffer alive as the array's base."""

    def __init__(self, staged):
        self._staged = staged
        self.__array_interface__ = {
            "shape": (staged.nbytes,),
            "typestr": "|u1",
            "data": (staged.address, False),
            "version": 3,
        }


def _is_torch(x):
    return type(x).__module__.startswith("torch") and hasattr(x, "data_ptr")


def _numpy_dtype(name, what):
    np_name = _DTYPE_NAMES[name]
    if np_name in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e8m0fnu"):
        try:
            import ml_dtypes
        except ImportError:  # pragma: no cover - depends on the environment
            raise InputError(f"{what}: dtype {name} needs the ml_dtypes package for numpy arrays "
                             "(pip install ml_dtypes), or pass torch tensors") from None
        return _np.dtype(getattr(ml_dtypes, np_name))
    return _np.dtype(np_name)


def _stage(role, name, x):
    """(name, dtype, shape, staged buffer) of one tensor, copied once into dsv3's memory."""
    if _is_torch(x):
        import torch

        dtype = _TORCH_NAMES.get(str(x.dtype))
        if dtype is None:
            raise InputError(f"{role} `{name}`: dtype {x.dtype} is not one dsv3 reads "
                             f"(float32, bfloat16, float16, float8_e4m3fn, float8_e5m2, float8_e8m0fnu, int32, int64, bool)")
        shape = list(x.shape)
        staged = _native.alloc(x.numel() * x.element_size())
        if staged.nbytes:
            dst = torch.from_numpy(_np.asarray(_Memory(staged)))
            # one copy from wherever x lives (any device, any strides) into dsv3's buffer
            dst.view(x.dtype).view(x.shape).copy_(x.detach())
            del dst
        return (name, dtype, shape, staged)
    if isinstance(x, (_np.ndarray, _np.generic)):
        x = _np.asarray(x)
        dtype = _NUMPY_NAMES.get(x.dtype.name)
        if dtype is None:
            raise InputError(f"{role} `{name}`: numpy dtype {x.dtype} is not one dsv3 reads")
        staged = _native.alloc(x.nbytes)
        if staged.nbytes:
            dst = _np.asarray(_Memory(staged)).view(x.dtype).reshape(x.shape)
            dst[...] = x
            del dst
        return (name, dtype, list(x.shape), staged)
    raise InputError(f"{role} `{name}`: expected a torch tensor or a numpy array, got {type(x).__name__}")


def _stage_map(role, tensors):
    if not isinstance(tensors, dict):
        raise InputError(f"{role}s: expected a dict of name -> tensor, got {type(tensors).__name__}")
    for k in tensors:
        if not isinstance(k, str):
            raise InputError(f"{role}s: tensor names must be strings, got {k!r}")
    return [_stage(role, k, v) for k, v in tensors.items()]


def _config_json(op, config):
    if config is None:
        return None
    if isinstance(config, str):
        try:
            config = _json.loads(config)
        except ValueError as e:
            raise InputError(f"{op}: config: not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise InputError(f"{op}: config: expected a dict or a JSON object, got {type(config).__name__}")
    return _json.dumps(config)


def _unstage(name, dtype, shape, staged, like_torch):
    """A numpy array (or CPU torch tensor) viewing the staged buffer in place."""
    if like_torch:
        import torch

        tdtype = getattr(torch, {"BOOL": "bool"}.get(dtype, _DTYPE_NAMES[dtype]))
        if staged.nbytes == 0:
            return torch.empty(shape, dtype=tdtype)
        raw = torch.from_numpy(_np.asarray(_Memory(staged)))
        return raw.view(tdtype).view(shape)
    npdtype = _numpy_dtype(dtype, f"output `{name}`")
    if staged.nbytes == 0:
        return _np.zeros(shape, dtype=npdtype)
    return _np.asarray(_Memory(staged)).view(npdtype).reshape(shape)


def ops():
    """The registered ops, in listing order (``dsv3 ops``)."""
    return list(_native.ops())


def describe(op):
    """One op in detail as a dict: tensors (name, dtypes, shape rule), constraints, config fields
    with their domains and defaults, the tolerance policy, GPU backends, generator sizes
    (``dsv3 ops OP``)."""
    return _json.loads(_native.describe(op))


def reference(op, inputs, config=None):
    """The reference outputs of ``op`` on ``inputs`` (a dict name -> tensor), of the kind of the
    inputs: torch tensors in, CPU torch tensors out (FP8 as ``torch.float8_e4m3fn`` ...); numpy
    in, numpy out (bf16 and FP8 as ``ml_dtypes`` dtypes). ``config`` is a dict or a JSON string."""
    staged = _stage_map("input", inputs)
    like_torch = any(_is_torch(v) for v in inputs.values())
    out = _native.reference(op, staged, _config_json(op, config))
    return {name: _unstage(name, dtype, shape, s, like_torch) for name, dtype, shape, s in out}


class Report:
    """The verdict of :func:`check`: ``passed``, ``exit_code`` (0 or 1, as ``dsv3 check``),
    ``tensors`` (per output tensor: ``exact_fraction``, ``max_abs``, ``max_rel``, ``max_ulp``,
    ``similarity``, ``worst_index``, ``expected``, ``actual``, ``violations`` and the rest of the
    CLI report), ``str(report)`` (the CLI's table) and :meth:`to_json` (the CLI's ``--report``)."""

    def __init__(self, op, json_text, table, passed, saved=None):
        self.op = op
        self._json = json_text
        self._table = table
        self.passed = bool(passed)
        self.exit_code = 0 if passed else 1
        self.saved = saved
        data = _json.loads(json_text)
        self.config = data.get("config")
        self.tensors = {}
        for t in data["tensors"]:
            worst = t.get("worst") or {}
            d = dict(t)
            d["similarity"] = t.get("similarity_diff")
            d["worst_index"] = tuple(worst["index"]) if worst else None
            d["expected"] = worst.get("want_value")
            d["actual"] = worst.get("got_value")
            self.tensors[t["name"]] = d

    def __bool__(self):
        return self.passed

    def __str__(self):
        return self._table

    def __repr__(self):
        return f"<dsv3.Report {self.op}: {'PASS' if self.passed else 'FAIL'}>"

    def to_json(self):
        """The report as ``dsv3 check --report`` writes it (schema_version, dsv3_version, ...)."""
        return self._json

    def failure_message(self):
        """A torch.testing-style message: the op, each failing tensor, the number of violating
        elements, the worst index with expected vs actual."""
        lines = [f"dsv3 check {self.op}: the outputs do not match the reference (config {_json.dumps(self.config)})"]
        for name, t in self.tensors.items():
            if t.get("pass"):
                continue
            judged = t["numel"] - t["ignored"]
            lines.append(f"Tensor `{name}` ({t['dtype']} {t['shape']}):")
            lines.append(f"Mismatched elements: {t['violations']} / {judged} "
                         f"({100.0 * t['violations'] / max(judged, 1):.4f}%)")
            worst = t.get("worst") or {}
            if worst:
                lines.append(f"Worst violation at index {_element(worst)}")
            first = (t.get("first_violations") or [None])[0]
            if first and first["index"] != worst.get("index"):
                lines.append(f"First violation at index {_element(first)}")
            lines.append(f"Policy: {t['policy']}")
        if self.saved:
            lines.append(f"The failing case is saved; reproduce it with:\n  {self.saved}")
        return "\n".join(lines)


def _element(e):
    """`(i, j): actual A vs expected B (|Δ| d, u ulp)` for one element of a report."""
    diff = "NaN" if e.get("abs_err") is None else f"{e['abs_err']:.6g}"
    ulp = "" if e.get("ulp") is None else f", {e['ulp']} ulp"
    text = f"{tuple(e['index'])}: actual {e['got']} vs expected {e['want']} (|Δ| {diff}{ulp})"
    if e["got"] == e["want"]:
        text += " -- the reference's bits, wrong under the policy (judged through another output: see Policy)"
    return text


def check(op, inputs, outputs, config=None, exact=False, save_to=None):
    """Judge your ``outputs`` of ``op`` on ``inputs`` (dicts name -> tensor) against the
    reference, each element under the op's tolerance policy (``exact=True``: bit for bit).
    Returns a :class:`Report`; raises :class:`InputError` on bad input. With ``save_to=DIR`` a
    failing case is written there (inputs.safetensors, outputs.safetensors, config.json,
    reproduce.sh) and ``report.saved`` holds the ``dsv3 check`` command that reproduces it."""
    staged_in = _stage_map("input", inputs)
    staged_out = _stage_map("output", outputs)
    json_text, table, passed, saved = _native.check(
        op, staged_in, staged_out, _config_json(op, config), bool(exact),
        None if save_to is None else _os.fspath(save_to))
    return Report(op, json_text, table, passed, saved)


def assert_check(op, inputs, outputs, config=None, exact=False, save_to=None):
    """:func:`check`, raising ``AssertionError`` with a torch.testing-style message when the
    outputs fail (the op, the tensor, the worst index, expected vs actual, "Mismatched elements:
    3 / 20000"). ``save_to=DIR`` (or the environment variable ``DSV3_SAVE_FAILURES``) saves a
    failing case there and the message gives the one-line ``dsv3 check`` that reproduces it.
    Returns the :class:`Report` when it passes."""
    if save_to is None:
        save_to = _os.environ.get("DSV3_SAVE_FAILURES") or None
    report = check(op, inputs, outputs, config=config, exact=exact, save_to=save_to)
    if not report.passed:
        raise AssertionError(report.failure_message())
    return report
