"""Shared helpers of the dsv3 package's tests: the repository, a safetensors reader/writer
written from the format's definition (8-byte little-endian header length, JSON header,
row-major bytes), and the `dsv3` CLI binary the verdicts are compared with."""

import json
import os
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "fixtures"

# safetensors dtype name -> numpy dtype
NUMPY = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in NUMPY.items()}


def read_safetensors(path):
    """name -> numpy array of every tensor in a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, end = t["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=NUMPY[t["dtype"]]).reshape(t["shape"]).copy()
    return out


def write_safetensors(path, tensors):
    """Write name -> numpy array as a safetensors file."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def dsv3_binary():
    """The `dsv3` CLI: $DSV3_BIN (set by the Rust test that runs this suite), else the
    repository's release or debug build; None when there is none."""
    for candidate in (os.environ.get("DSV3_BIN"), REPO / "target/release/dsv3", REPO / "target/debug/dsv3",
                      shutil.which("dsv3")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    return None


@pytest.fixture(scope="session")
def cli():
    path = dsv3_binary()
    if path is None:
        pytest.skip("SKIP: no dsv3 binary (set DSV3_BIN or run `cargo build --release`) to compare verdicts with")
    return path


def fixture_cases():
    return json.loads((FIXTURES / "manifest.json").read_text())["cases"]


def case_tensors(case, role):
    """A fixture case's inputs or outputs under their contract names."""
    ref = case[role]
    stored = read_safetensors(FIXTURES / ref["file"])
    return {name: stored[in_file] for name, in_file in ref["tensors"].items()}
