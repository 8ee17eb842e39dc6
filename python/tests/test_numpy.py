"""The API on numpy arrays (bf16 and FP8 as ml_dtypes dtypes): ops, describe, reference, check,
assert_check, reports; expected values from ml_dtypes' FP8 cast (an external oracle) and the
official act_quant's definition written beside each test."""

import json
import subprocess

import ml_dtypes
import numpy as np
import pytest

import dsv3
from conftest import read_safetensors

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def official_act_quant(x, block=128):
    """OFF kernel.py act_quant: per 1×block tile s = amax/448, y = e4m3(x/s) (RNE, in f32)."""
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    s = np.maximum(np.abs(tiles).max(axis=-1), np.float32(1e-4)) / np.float32(448)
    y = (tiles / s[..., None]).astype(E4M3).reshape(x.shape)
    return y, s.astype(np.float32)


def test_ops_and_describe_are_what_the_cli_prints(cli):
    listing = json.loads(subprocess.run([cli, "ops", "--json"], capture_output=True, text=True, check=True).stdout)
    assert dsv3.ops() == [op["name"] for op in listing["ops"]]
    for op in dsv3.ops():
        one = json.loads(subprocess.run([cli, "ops", op, "--json"], capture_output=True, text=True, check=True).stdout)
        assert dsv3.describe(op) == one


def test_describe_gives_tensors_config_defaults_and_tolerance():
    d = dsv3.describe("act_quant")
    assert [t["name"] for t in d["inputs"]] == ["x"]
    assert [(t["name"], t["dtypes"], t["shape"]) for t in d["outputs"]] == [
        ("y", ["F8_E4M3"], "[..., K]"), ("s", ["F32"], "[..., K/block_size]")]
    assert {f["name"]: f["default"] for f in d["config"]} == {"block_size": 128, "scale_fmt": None}
    assert "2.5 f32-ulp" in d["tolerance"]


def test_reference_equals_the_official_act_quant():
    x = randn(4, 512)
    out = dsv3.reference("act_quant", {"x": x})
    y, s = official_act_quant(x)
    assert out["y"].dtype == E4M3 and out["y"].shape == (4, 512)
    assert out["s"].dtype == np.float32 and out["s"].shape == (4, 4)
    np.testing.assert_array_equal(out["s"], s)
    np.testing.assert_array_equal(out["y"].view(np.uint8), y.view(np.uint8))


def test_reference_reads_strided_and_bf16_arrays():
    base = randn(256, 6)
    x = base.T[:, :]  # a transposed (non-contiguous) view
    assert not x.flags.c_contiguous
    want = dsv3.reference("act_quant", {"x": np.ascontiguousarray(x)})
    got = dsv3.reference("act_quant", {"x": x})
    np.testing.assert_array_equal(got["y"].view(np.uint8), want["y"].view(np.uint8))
    xb = randn(3, 2, 256).astype(ml_dtypes.bfloat16)  # leading dims, bf16
    out = dsv3.reference("act_quant", {"x": xb})
    y, s = official_act_quant(xb.astype(np.float32))
    assert out["y"].shape == (3, 2, 256) and out["s"].shape == (3, 2, 2)
    np.testing.assert_array_equal(out["y"].view(np.uint8), y.view(np.uint8))


def test_config_is_a_dict_or_a_json_string():
    x = randn(2, 256)
    a = dsv3.reference("act_quant", {"x": x}, config={"scale_fmt": "ue8m0"})
    b = dsv3.reference("act_quant", {"x": x}, config='{"scale_fmt": "ue8m0"}')
    np.testing.assert_array_equal(a["s"], b["s"])
    # ue8m0: every scale a power of two (mantissa bits zero) at or above amax/448
    assert not (a["s"].view(np.uint32) & 0x7FFFFF).any()
    assert (a["s"] >= official_act_quant(x)[1]).all()


def test_check_passes_the_reference_and_reports_like_the_cli():
    x = randn(4, 256)
    out = dsv3.reference("act_quant", {"x": x})
    r = dsv3.check("act_quant", {"x": x}, out)
    assert r.passed and r.exit_code == 0 and bool(r)
    t = r.tensors["y"]
    assert t["exact_fraction"] == 1.0 and t["violations"] == 0 and t["max_abs"] == 0
    assert t["worst_index"] is None
    assert "verdict: PASS" in str(r)
    data = json.loads(r.to_json())
    assert data["schema_version"] >= 1 and data["command"] == "check" and data["pass"] is True


def planted(y, where):
    """y with the E4M3 codes at `where` moved one code away from zero."""
    y = y.copy()
    codes = y.view(np.uint8)
    for i in where:
        codes[i] += 1
    return y


def test_check_names_the_violations():
    x = randn(4, 256)
    out = dsv3.reference("act_quant", {"x": x})
    y = planted(out["y"], [(1, 7), (2, 9)])
    r = dsv3.check("act_quant", {"x": x}, {"y": y, "s": out["s"]})
    assert not r.passed and r.exit_code == 1
    t = r.tensors["y"]
    assert t["violations"] == 2 and t["exact"] == 1022 and t["max_ulp"] == 1
    i = t["worst_index"]
    assert isinstance(i, tuple) and i in [(1, 7), (2, 9)]
    assert t["expected"] == float(out["y"][i].astype(np.float32))
    assert t["actual"] == float(y[i].astype(np.float32))
    assert r.tensors["s"]["pass"] and r.tensors["s"]["violations"] == 0
    assert "verdict: FAIL" in str(r) and "FAIL (2 bad)" in str(r)


def test_exact_mode_is_bit_for_bit():
    # a code one ulp off at an exact midpoint is within the policy but not exact
    x = np.zeros((1, 128), np.float32)
    x[0, 0] = 448.0
    x[0, 1] = 1.0625  # the midpoint between the E4M3 codes 1.0 and 1.125 (s = 1)
    out = dsv3.reference("act_quant", {"x": x})
    assert float(out["y"][0, 1].astype(np.float32)) == 1.0  # ties to even
    y = planted(out["y"], [(0, 1)])
    assert dsv3.check("act_quant", {"x": x}, {"y": y, "s": out["s"]}).passed
    r = dsv3.check("act_quant", {"x": x}, {"y": y, "s": out["s"]}, exact=True)
    assert not r.passed and r.tensors["y"]["violations"] == 1 and r.tensors["y"]["worst_index"] == (0, 1)


def test_assert_check_message_and_saved_case(tmp_path, cli):
    x = randn(4, 256)
    out = dsv3.reference("act_quant", {"x": x})
    y = planted(out["y"], [(3, 100)])
    with pytest.raises(AssertionError) as e:
        dsv3.assert_check("act_quant", {"x": x}, {"y": y, "s": out["s"]}, save_to=tmp_path / "case")
    msg = str(e.value)
    assert "act_quant" in msg and "Tensor `y`" in msg
    assert "Mismatched elements: 1 / 1024" in msg
    assert "index (3, 100)" in msg and "vs expected" in msg
    saved = read_safetensors(tmp_path / "case/inputs.safetensors")
    np.testing.assert_array_equal(saved["x"], x)
    assert (tmp_path / "case/outputs.safetensors").is_file() and (tmp_path / "case/config.json").is_file()
    command = msg.split("reproduce it with:\n", 1)[1].strip()
    assert command.startswith("dsv3 check act_quant")
    run = subprocess.run(command.replace("dsv3", cli, 1), shell=True, capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "FAIL (1 bad)" in run.stdout


def test_save_failures_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DSV3_SAVE_FAILURES", str(tmp_path))
    x = randn(2, 128)
    out = dsv3.reference("act_quant", {"x": x})
    with pytest.raises(AssertionError, match="dsv3 check act_quant"):
        dsv3.assert_check("act_quant", {"x": x}, {"y": planted(out["y"], [(0, 0)]), "s": out["s"]})
    assert (tmp_path / "inputs.safetensors").is_file()
    # a passing check returns its report and saves nothing more
    monkeypatch.setenv("DSV3_SAVE_FAILURES", str(tmp_path / "pass"))
    assert dsv3.assert_check("act_quant", {"x": x}, out).passed
    assert not (tmp_path / "pass").exists()


def moe_inputs(seed=1):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((5, 32)).astype(np.float32),
            "weight": rng.standard_normal((16, 32)).astype(np.float32),
            "e_score_correction_bias": (0.01 * rng.standard_normal(16)).astype(np.float32)}


MOE = {"top_k": 4, "n_group": 4, "topk_group": 2}


def test_int32_expert_ids_as_routers_write_them():
    inputs = moe_inputs()
    out = dsv3.reference("moe_gate", inputs, config=MOE)
    assert out["topk_ids"].dtype == np.int64 and out["topk_ids"].shape == (5, 4)
    ids32 = out["topk_ids"].astype(np.int32)[:, ::-1]  # any order within a token
    w = out["topk_weights"][:, ::-1]
    assert dsv3.check("moe_gate", inputs, {"topk_ids": ids32, "topk_weights": w}, config=MOE).passed
    wrong = ids32.copy()
    wrong[2, 0] = next(e for e in range(16) if e not in wrong[2])
    r = dsv3.check("moe_gate", inputs, {"topk_ids": wrong, "topk_weights": w}, config=MOE)
    assert not r.passed and r.tensors["topk_ids"]["violations"] >= 1


def test_int32_positions_and_indices_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 2, 64)).astype(np.float32)
    p64 = np.array([0, 5, 4095], np.int64)
    a = dsv3.reference("rope", {"x": x, "positions": p64})
    b = dsv3.reference("rope", {"x": x, "positions": p64.astype(np.int32)})
    np.testing.assert_array_equal(a["y"], b["y"])
